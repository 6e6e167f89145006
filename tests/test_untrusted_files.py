"""Files an attacker or a damaged disk can leave where mimo-spec reads: safetensors headers that lie
about their bytes, planted sweep records, a run directory's metrics.csv that is not a file."""

import json
import os
import struct

import pytest

from mimo_spec.errors import ConfigError, InputError

from test_bad_inputs import run_cli_in_process


def _safetensors(path, entry, data=b"\0" * 64):
    raw = json.dumps({"w": entry}).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("entry,why", [
    ({"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 4]}, "spans 4 bytes, but its shape [4, 4]"),
    ({"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 64]}, "non-negative whole numbers"),
    ({"dtype": "F32", "shape": "16", "data_offsets": [0, 64]}, "non-negative whole numbers"),
    ({"dtype": "F32", "shape": [16], "data_offsets": [-8, 56]}, "begin <= end"),
    ({"dtype": "F32", "shape": [16], "data_offsets": [64, 0]}, "begin <= end"),
    ({"dtype": "F32", "shape": [16], "data_offsets": [0.5, 64.5]}, "begin <= end"),
    ({"dtype": "F8_E4M3", "shape": [16], "data_offsets": [0, 64]}, "needs 16"),
    ({"dtype": "F32", "shape": [16], "data_offsets": [0, 32, 64]}, "malformed header entry"),
])
def test_a_safetensors_header_must_describe_its_bytes_exactly(tmp_path, entry, why):
    """A header whose offsets or shape disagree would make the importer read other tensors' bytes
    (or the header itself) as weights; it is refused, naming the tensor."""
    from mimo_spec.interop.hf_safetensors import read_header

    _safetensors(tmp_path / "model.safetensors", entry)
    with pytest.raises(InputError, match="not a safetensors file") as e:
        read_header(tmp_path / "model.safetensors")
    assert why in str(e.value)
    _safetensors(tmp_path / "ok.safetensors", {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]})
    assert read_header(tmp_path / "ok.safetensors")["w"].shape == (4, 4)


def test_json_metadata_files_are_bounded(tmp_path):
    from mimo_spec.interop.hf_safetensors import HFCheckpoint

    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError, match="nested too deeply"):
        HFCheckpoint(tmp_path)
    (tmp_path / "config.json").write_text('{"vocab_size": ' + "9" * 5000 + "}")
    with pytest.raises(InputError, match="unreadable JSON"):
        HFCheckpoint(tmp_path)


def test_planted_sweep_records_do_not_hang_the_summary(tmp_path):
    """A sweep folder may hold a job record planted by someone else: an alias bomb or a FIFO as
    .hydra/overrides.yaml, a FIFO as metrics.json. The summary reads them with limits."""
    from mimo_spec.sweep import collect_jobs

    bomb = tmp_path / "bomb" / ".hydra"
    bomb.mkdir(parents=True)
    lines = ["- &a [1,1,1,1,1,1,1,1,1]"] + [f"- &{c} [{', '.join(['*' + p] * 9)}]"
                                             for p, c in zip("abcdef", "bcdefg")]
    (bomb / "overrides.yaml").write_text("\n".join(lines) + "\n")
    fifo = tmp_path / "fifo" / ".hydra"
    fifo.mkdir(parents=True)
    os.mkfifo(fifo / "overrides.yaml")
    os.mkfifo(tmp_path / "fifo" / "metrics.json")
    ok = tmp_path / "ok" / ".hydra"
    ok.mkdir(parents=True)
    (ok / "overrides.yaml").write_text("- seed=1\n")
    rows = {r["job"]: r for r in collect_jobs(tmp_path)}
    assert rows["ok"]["overrides"] == ["seed=1"]
    assert rows["bomb"]["overrides"] == ["<unreadable overrides.yaml>"]
    assert rows["fifo"]["status"] == "failed"


def test_a_metrics_csv_that_is_not_a_file_is_refused_on_resume(tmp_path):
    run = tmp_path / "run"
    small = ["data.num_samples=16", "data.eval_samples=4", "train.steps=2", "train.log_every=100",
             "train.num_threads=1", f"hydra.run.dir={run}"]
    code, _, err = run_cli_in_process(small, tmp_path)
    assert code == 0, err
    (run / "metrics.csv").unlink()
    os.mkfifo(run / "metrics.csv")
    code, _, err = run_cli_in_process([*small[:-4], "train.steps=3", *small[-3:]], tmp_path)
    assert code == 2 and "metrics.csv in the run directory is not a regular file" in err, err
    assert "Traceback" not in err


def test_a_yaml_file_given_to_build_model_is_checked_for_interpolation_bombs(tmp_path):
    """init_from's config.yaml and build_model(path) read YAML outside Hydra: the same bounds apply."""
    import time

    from mimo_spec import build_model

    lines = ["b0: [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [
        f"b{i}: [{', '.join([repr('${b' + str(i - 1) + '}')] * 10)}]" for i in range(1, 10)]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\ndtype: '${b9}'\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="b[4-9]"):
        build_model(tmp_path / "bomb.yaml")
    assert time.perf_counter() - start < 10


def test_generate_names_a_wrong_model_a_meta_model_and_an_eos_outside_the_vocabulary(tmp_path):
    import torch

    from mimo_spec import build_model
    from mimo_spec.generation import generate

    from conftest import tiny_config

    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(InputError, match="expected a MimoModel"):
        generate(5, ids)
    with pytest.raises(InputError, match="meta device"):
        generate(build_model(tiny_config(), device="meta"), ids)
    model = build_model(tiny_config(), seed=0)
    with pytest.raises(InputError, match=r"eos_id: token id 1000000 is outside the vocabulary \[0, 256\)"):
        generate(model, ids, eos_id=10**6)
    assert len(generate(model, ids, max_new_tokens=2, eos_id=255).tokens) >= 1


def test_import_paths_must_be_strings(tmp_path):
    code, _, err = run_cli_in_process(["action=import", "import_hf.source=/nonexistent", "import_hf.output=[a]"],
                                      tmp_path)
    assert code == 2 and "import_hf.output: expected a folder path (a string)" in err, err
