"""The CLI: actions, run records, and config errors as one block with exit code 2."""

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mimo_spec import build_model


def _run_dir(cwd: Path) -> Path:
    dirs = [p.parent for p in cwd.glob("outputs/*/*/resolved_config.yaml")]
    assert len(dirs) == 1, list(cwd.rglob("*"))
    return dirs[0]


def test_default_run_prints_summary_and_writes_a_rebuildable_record(cli):
    r = cli("action=summary", "model.params.num_layers=3", "freeze=[modalities.images.encoders.*]")
    assert r.returncode == 0, r.stderr
    assert "language_model" in r.stdout and "modalities.images" in r.stdout and "encoders.clip" in r.stdout
    assert "trainable" in r.stdout and "frozen" in r.stdout
    run = _run_dir(cli.cwd)
    assert OmegaConf.load(run / "overrides.yaml") == ["action=summary", "model.params.num_layers=3",
                                                      "freeze=[modalities.images.encoders.*]"]
    versions = json.loads((run / "versions.json").read_text())
    assert versions["torch"] == torch.__version__ and versions["mimo_spec"]
    assert OmegaConf.load(run / "spec.yaml").model.params.num_layers == 3
    model = build_model(run / "resolved_config.yaml", device="meta")
    assert len(model.language_model.layers) == 3
    exact = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert f"exact: {exact:,} parameters ({exact - frozen:,} trainable, {frozen:,} frozen)" in r.stdout
    assert not list(run.glob(".*.tmp*"))  # atomic writes leave no temporaries


def test_summary_of_a_70b_config_on_meta(cli):
    r = cli("action=summary", "model=llama3_70b", "modality=[vision_clip,audio_whisper]", "dtype=bfloat16")
    assert r.returncode == 0, r.stderr
    assert "80 x TransformerBlock" in r.stdout and "GiB" in r.stdout and "at bfloat16" in r.stdout


def test_validate_list_and_print(cli):
    r = cli("action=validate")
    assert r.returncode == 0 and "config is valid" in r.stdout
    r = cli("action=validate", "modalities.images.params.special_token_id=4000",
            "model.params.num_kv_heads=3")
    assert r.returncode == 2
    assert "modalities.images.params.special_token_id: token id 4000 is outside the vocabulary [0, 1024)" in r.stderr
    assert "num_heads (4) must be divisible by num_kv_heads (3)" in r.stderr
    assert "Traceback" not in r.stderr
    r = cli("action=list")
    assert r.returncode == 0
    for name in ("gpt", "clip_vit", "whisper_encoder", "mlp", "linear", "identity", "pixel_shuffle_mlp"):
        assert f"  {name}  (" in r.stdout
    assert "feature_layer: int  [default -1]" in r.stdout
    r = cli("action=print", "model.params.hidden_size=64")
    assert r.returncode == 0
    printed = OmegaConf.create(r.stdout)
    assert printed.modalities.images.submodules.input_projections.clip.params.out_features == 64


def test_config_errors_exit_2_without_traceback(cli, tmp_path):
    cases = {
        ("model.params.hiden_size=3",): "model.params.hiden_size: unknown key",
        ("model=llama_tiy",): "no config option 'llama_tiy' in group 'model'",
        ("action=summry",): "did you mean summary?",
        ("modalities.images.submodules.encoders.clip.module=clip_vt",): "did you mean clip_vit?",
        ("action=validate", "model.params.num_layers=two"): "model.params.num_layers: expected int, got str 'two'",
    }
    for args, expected in cases.items():
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert expected in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and "hint:" in r.stderr
    r = cli("action=validate", "model.params.hiden_size=3")
    assert "did you mean hidden_size?" in r.stderr


def test_malformed_yaml_names_file_line_and_column(cli, tmp_path):
    conf = tmp_path / "extra" / "modality"
    conf.mkdir(parents=True)
    bad = conf / "broken.yaml"
    bad.write_text("# @package modalities.broken\nmodule: modality\nparams: {special_token_id: 1002\n")
    r = cli("action=validate", f"hydra.searchpath=[file://{tmp_path / 'extra'}]", "modality=[broken]")
    assert r.returncode == 2, r.stderr
    assert f"{bad}:4:1" in r.stderr and "YAML syntax error" in r.stderr
    assert "Traceback" not in r.stderr


def test_debug_switch_shows_the_traceback(cli):
    r = cli("action=validate", "model.params.num_layers=two", "debug=true")
    assert r.returncode != 0 and "Traceback" in r.stderr
    r = cli("action=validate", "model.params.num_layers=two", env={"HYDRA_FULL_ERROR": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_console_script_is_the_same_app(cli):
    import shutil
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "mimo-spec"
    exe = str(exe) if exe.exists() else shutil.which("mimo-spec")
    assert exe, "the mimo-spec console script is installed with the package"
    r = subprocess.run([exe, "action=validate"], cwd=cli.cwd, capture_output=True, text=True)
    assert r.returncode == 0 and "config is valid" in r.stdout


def test_generate_from_a_native_resolution_model_with_an_image_and_a_video(cli, tmp_path):
    """action=generate with generate.images and generate.videos on a Qwen2-VL-shaped run: the prompt's tags
    take the files in order, each expanded to its own placeholder count (an unreadable video: the data tests)."""
    import av
    import numpy as np
    from PIL import Image

    Image.new("RGB", (40, 24), (200, 30, 30)).save(tmp_path / "red.png")
    with av.open(str(tmp_path / "clip.mp4"), "w") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
        for i in range(8):
            frame = av.VideoFrame.from_ndarray(np.full((32, 48, 3), i * 30, dtype=np.uint8), format="rgb24")
            c.mux(s.encode(frame))
        c.mux(s.encode())
    from mimo_spec.config import compose_config
    from mimo_spec.train.loop import train

    run = tmp_path / "run"  # trained in this process (the CLI path of training is tested above)
    train(compose_config(["preset=qwen2_vl_tiny", "train.steps=1", "train.eval_every=0", "data.num_samples=8",
                          "data.eval_samples=2"]), run)
    out = tmp_path / "gen"
    r = cli("action=generate", f"generate.checkpoint={run}", f"generate.images=[{tmp_path / 'red.png'}]",
            f"generate.videos=[{tmp_path / 'clip.mp4'}]", 'generate.prompt="<image> then <video>: what changes?"',
            "generate.max_new_tokens=3", f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr
    record = json.loads((out / "generation.json").read_text())
    assert len(record["tokens"]) == 3 and record["prompt"] == "<image> then <video>: what changes?"



def test_generate_keeps_the_items_grids_on_the_host(tmp_path, monkeypatch):
    """action=generate moves the prompt's inputs to the model's device but leaves the items' grids on the host,
    as training does (data.batch.host_keys): the towers read them there, so on a GPU a grid moved to the device
    would cost a device read-back per use and skip the host-side input checks."""
    from PIL import Image

    import mimo_spec.data.batch as batch_module
    from mimo_spec import jobs
    from mimo_spec.config import compose_config
    from mimo_spec.train.loop import train

    Image.new("RGB", (40, 24), (200, 30, 30)).save(tmp_path / "red.png")
    run = tmp_path / "run"
    train(compose_config(["preset=qwen2_vl_tiny", "train.steps=1", "train.eval_every=0", "data.num_samples=8",
                          "data.eval_samples=2"]), run)
    kept = []
    plain = batch_module.to_device

    def recording(x, device, keep=frozenset()):
        if isinstance(x, dict):
            kept.append(set(keep))
        return plain(x, device, keep)

    monkeypatch.setattr(batch_module, "to_device", recording)
    gen = compose_config(["action=generate", f"generate.checkpoint={run}", f"generate.images=[{tmp_path / 'red.png'}]",
                          'generate.prompt="<image> what colour?"', "generate.max_new_tokens=2"])
    (tmp_path / "gen").mkdir()  # the run directory Hydra makes
    assert jobs.run_generate(gen, tmp_path / "gen") == 0
    assert kept and all("image_grid_thw" in k and "video_grid_thw" in k for k in kept), kept
    assert len(json.loads((tmp_path / "gen" / "generation.json").read_text())["tokens"]) == 2
