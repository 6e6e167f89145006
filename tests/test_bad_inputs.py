"""A corpus of bad inputs: every mistake ends in one readable error that names where and what."""

import contextlib
import io
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mimo_spec import build_model
from mimo_spec.errors import ConfigError, InputError

from conftest import tiny_config

# one corpus file per area (cli_cases*.yaml), read together
CASES = [case for f in sorted((Path(__file__).parent / "bad_inputs").glob("cli_cases*.yaml"))
         for case in yaml.safe_load(f.read_text()) or []]


def run_cli_in_process(args, cwd: Path):
    """Run the CLI's main() in this process (much faster than a subprocess): (code, stdout, stderr)."""
    from hydra.core.global_hydra import GlobalHydra

    from mimo_spec.app import main

    GlobalHydra.instance().clear()
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = ["mimo-spec", *args]
    out, err, code = io.StringIO(), io.StringIO(), 0
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as e:
                code = e.code
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
        GlobalHydra.instance().clear()
    return code, out.getvalue(), err.getvalue()


def test_the_corpus_is_large_and_names_are_unique():
    names = [c["name"] for c in CASES]
    assert len(names) >= 40 and len(set(names)) == len(names)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_cli_bad_input(case, tmp_path):
    for rel, text in (case.get("files") or {}).items():
        f = tmp_path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    before = {p for p in tmp_path.rglob("*")}
    args = [a.replace("{tmp}", str(tmp_path)) for a in case["args"]] + ["train.num_threads=1"] * (
        not any(a.startswith("action=") and a != "action=train" for a in case["args"]))
    code, out, err = run_cli_in_process(args, tmp_path)
    assert code == 2, (code, out, err)
    kind = case.get("kind", "config")  # config | input | data | checkpoint | storage
    assert "Traceback" not in err and err.startswith(f"mimo-spec: {kind} error"), err
    assert case["path"].replace("{tmp}", str(tmp_path)) in err, err
    assert case["message"] in err, err
    assert "hint:" in err, err
    if case.get("hint"):
        assert case["hint"] in err, err
    # nothing half-written: no temporary files, and no checkpoint or metrics from a run that failed
    new = {p for p in tmp_path.rglob("*")} - before
    assert not [p for p in new if ".tmp" in p.name], new
    assert not [p for p in new if p.name in ("metrics.csv", "metrics.json") or p.name.startswith("step_")], new


# --- runtime inputs -------------------------------------------------------------------------------
IMG = 250


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config(), seed=0)


def _ids(n_placeholders=4, seq=12):
    ids = torch.randint(0, 200, (1, seq), generator=torch.Generator().manual_seed(0))
    ids[0, :n_placeholders] = IMG
    return ids


PX = torch.randn(1, 3, 16, 16)
RUNTIME = {
    "placeholder_count_mismatch": (lambda m: m.prepare_inputs(_ids(3), {"images": {"clip": {"pixel_values": PX}}}),
                                   "modality_inputs.images", "sample 0 has 3 placeholder tokens"),
    "placeholders_without_inputs": (lambda m: m.prepare_inputs(_ids(4), {}), "modality_inputs.images",
                                    "sample 0 has 4 placeholder tokens (id 250) but its items produce 0"),
    "missing_encoder_input": (lambda m: m(_ids(), {"images": {}}), "modality_inputs.images.clip",
                              "missing inputs for encoder 'clip'"),
    "unknown_modality": (lambda m: m(_ids(), {"video": {}}), "modality_inputs.video", "unknown input modality"),
    "unknown_encoder": (lambda m: m(_ids(), {"images": {"clip": {"pixel_values": PX}, "dino": {}}}),
                        "modality_inputs.images.dino", "unknown encoder 'dino'"),
    "wrong_rank": (lambda m: m(_ids(), {"images": {"clip": {"pixel_values": PX[0]}}}),
                   "modality_inputs.images.clip.pixel_values", "expected shape (N, 3, 16, 16)"),
    "wrong_channels": (lambda m: m(_ids(), {"images": {"clip": {"pixel_values": PX[:, :1]}}}),
                       "modality_inputs.images.clip.pixel_values", "got (1, 1, 16, 16)"),
    "wrong_dtype": (lambda m: m(_ids(), {"images": {"clip": {"pixel_values": PX.long()}}}),
                    "modality_inputs.images.clip.pixel_values", "floating-point tensor"),
    "unexpected_kwarg": (lambda m: m(_ids(), {"images": {"clip": {"pixel_values": PX, "mask": PX}}}),
                         "modality_inputs.images.clip.mask", "unexpected input 'mask'"),
    "labels_wrong_shape": (lambda m: m(_ids(), {"images": {"clip": {"pixel_values": PX}}}, labels=_ids()[:, :3]),
                           "labels", "expected shape (1, 12)"),
    "sequence_too_long": (lambda m: m(torch.zeros(1, 500, dtype=torch.long)), "input_ids",
                          "sequence length 500 exceeds the language model's max_seq_len 128"),
    "input_ids_not_2d": (lambda m: m(torch.zeros(5, dtype=torch.long)), "input_ids", "expected input_ids of shape"),
}


@pytest.mark.parametrize("name", list(RUNTIME))
def test_runtime_bad_input(name, model):
    fn, path, message = RUNTIME[name]
    with pytest.raises(InputError) as e:
        fn(model)
    assert str(e.value).startswith(path + ":"), str(e.value)
    assert message in str(e.value)


def test_bad_weight_files(tmp_path, model):
    from mimo_spec.weights import load_weights, save_weights

    good = save_weights(model, tmp_path / "model.safetensors")
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or not a safetensors file"):
        load_weights(model, tmp_path / "cut.safetensors")
    with pytest.raises(InputError, match="weights file not found"):
        load_weights(model, tmp_path / "none.safetensors")
    other = build_model(tiny_config(model={"module": "gpt", "params": {
        "vocab_size": 256, "hidden_size": 32, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2, "ffn_hidden_size": 64,
        "max_seq_len": 128}}))
    with pytest.raises(InputError, match="unexpected tensors: language_model.layers.1"):
        load_weights(other, good)


def test_config_files_that_do_not_exist_or_do_not_parse(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        build_model(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  module: gpt\n  params: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        build_model(bad)
    assert f"{bad}:4:1: YAML syntax error" in str(e.value)
