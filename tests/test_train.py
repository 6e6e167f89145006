"""The training job: loss falls, run files, exact resume, SIGTERM, eval/generate from checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mimo_spec import build_model
from mimo_spec.config import compose_config
from mimo_spec.errors import ConfigError, InputError
from mimo_spec.train.checkpoint import list_checkpoints, load_checkpoint
from mimo_spec.train.loop import train
from mimo_spec.train.metrics import read_metrics
from mimo_spec.train.optim import lr_factor, param_groups
from mimo_spec.train.schema import TrainConfig, validate_train_config

from conftest import ROOT

SMALL = ["data.num_samples=256", "data.eval_samples=16", "train.eval_batches=2", "train.log_every=1000"]


def cfg(*overrides):
    return compose_config([*SMALL, *overrides])


def losses(run: Path) -> list[float]:
    return [float(r["loss"]) for r in read_metrics(run / "metrics.csv")]


def test_resume_is_exact_and_the_loss_falls(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    c = cfg("train.steps=40", "train.checkpoint.every=10", "train.eval_every=20")
    result = train(c, whole)
    assert result["status"] == "completed" and result["steps"] == 40
    curve = losses(whole)
    assert sum(curve[-5:]) / 5 < 0.6 * sum(curve[:5]) / 5, curve
    for name in ("metrics.csv", "metrics.json", "loss.png"):
        assert (whole / name).stat().st_size > 0
    assert any((whole / "tb").iterdir())
    assert [p.name for p in list_checkpoints(whole / "checkpoints")] == ["step_000030", "step_000040"]  # keep_last 2
    rows = read_metrics(whole / "metrics.csv")
    assert rows[19]["eval_loss"] and rows[39]["eval_loss"] and not rows[10]["eval_loss"]

    first = train(cfg("train.steps=40", "train.checkpoint.every=10", "train.eval_every=20",
                      "train.stop_after_steps=17"), split)
    assert first["status"] == "interrupted" and first["steps"] == 17
    resumed = train(cfg("train.steps=40", "train.checkpoint.every=10", "train.eval_every=20"), split)
    assert resumed["status"] == "completed"
    assert losses(split) == curve  # bit for bit, including the steps redone after the checkpoint
    a = build_model(c)
    b = build_model(c)
    load_checkpoint(whole / "checkpoints" / "step_000040", a)
    load_checkpoint(split / "checkpoints" / "step_000040", b)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_gradient_accumulation_matches_the_big_batch(tmp_path):
    one = train(cfg("train.steps=3", "train.batch_size=8", "train.grad_accum=1", "train.eval_every=0"), tmp_path / "a")
    two = train(cfg("train.steps=3", "train.batch_size=4", "train.grad_accum=2", "train.eval_every=0"), tmp_path / "b")
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert la == pytest.approx(lb, rel=1e-5)
    assert one["final_loss"] == pytest.approx(two["final_loss"], rel=1e-5)


def test_sgd_bf16_and_schedules(tmp_path):
    r = train(cfg("train.steps=4", "train.optimizer=sgd", "train.precision=bf16", "train.schedule=linear",
                  "train.eval_every=0"), tmp_path)
    assert r["status"] == "completed" and r["final_loss"] == r["final_loss"]  # finite
    tc = TrainConfig(steps=100, batch_size=1, lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, tc) == pytest.approx(0.1) and lr_factor(9, tc) == pytest.approx(1.0)
    assert lr_factor(99, tc) == pytest.approx(0.1, abs=1e-3)
    assert lr_factor(55, tc.model_copy(update={"schedule": "linear"})) == pytest.approx(0.55)
    assert lr_factor(70, tc.model_copy(update={"schedule": "constant"})) == 1.0


def test_the_top_level_dtype_is_the_dtype_training_builds_in(tmp_path):
    """``dtype=bfloat16`` trains bf16 weights (it was only used by summary before); the default stays fp32."""
    from safetensors import safe_open

    dtypes = {}
    for name in ("bfloat16", "float32"):
        r = train(cfg("train.steps=2", "train.eval_every=0", f"dtype={name}"), tmp_path / name)
        assert r["status"] == "completed" and r["final_loss"] == r["final_loss"]
        with safe_open(str(list_checkpoints(tmp_path / name / "checkpoints")[-1] / "model.safetensors"), "pt") as f:
            dtypes[name] = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"bfloat16": {"BF16"}, "float32": {"F32"}}
    # eval builds the checkpoint's model in the dtype it was trained in
    from mimo_spec.jobs import _load_trained
    from mimo_spec.run_config import RunConfig

    run = RunConfig.from_config(compose_config(["action=eval", f"eval.checkpoint={tmp_path / 'bfloat16'}"]))
    model = _load_trained(run, "eval")[3]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_per_module_learning_rates_and_llava_stages():
    c = compose_config(["train=llava_stage2"])
    model = build_model(c)
    groups = param_groups(model, validate_train_config(c.train))
    by_name = {g["name"]: g["lr"] for g in groups}
    assert by_name["modalities.*.input_projections.*"] == 1e-3 and by_name["language_model"] == 2e-5
    assert all(not p.requires_grad for p in model.modalities["images"].encoders.parameters())
    stage1 = compose_config(["train=llava_stage1"])
    m1 = build_model(stage1)
    trainable = {n.split(".")[0] + "." + n.split(".")[2] if n.startswith("modalities") else n.split(".")[0]
                 for n, p in m1.named_parameters() if p.requires_grad}
    assert trainable == {"modalities.input_projections"}
    with pytest.raises(ConfigError, match=r"train.param_groups.0.modules: 'modalities.\*.projector' matches no"):
        param_groups(model, validate_train_config({**c.train, "param_groups": [{"modules": "modalities.*.projector",
                                                                                  "lr": 1.0}]}))


def test_resume_refuses_a_changed_config_and_skips_a_damaged_checkpoint(tmp_path):
    run = tmp_path / "run"
    train(cfg("train.steps=6", "train.checkpoint.every=2", "train.checkpoint.keep_last=3", "train.eval_every=0"), run)
    with pytest.raises(ConfigError, match=r"the config changed: train.lr: 0.002 -> 0.01"):
        train(cfg("train.steps=8", "train.lr=0.01", "train.eval_every=0"), run)
    # a half-written newest checkpoint: the previous good one is used
    newest = list_checkpoints(run / "checkpoints")[-1]
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    out = subprocess.run([sys.executable, "-c", (
        "import sys; sys.path.insert(0, 'tests'); from test_train import cfg; from mimo_spec.train.loop import train; "
        f"r = train(cfg('train.steps=8', 'train.checkpoint.every=2', 'train.checkpoint.keep_last=3', "
        f"'train.eval_every=0'), {str(run)!r}); print(r['status'])")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "skipping damaged checkpoint" in out.stdout and "step_000006" in out.stdout
    assert "resumed from" in out.stdout and "step_000004" in out.stdout


def test_a_checkpoint_from_before_a_key_existed_resumes_when_the_key_is_at_its_default(tmp_path, capsys):
    """A run saved by an older mimo-spec lacks keys added since (train.dpo.disable_dropout, data.max_bad_fraction):
    resuming it with those keys at their defaults is the same run; set to something else, it is a change."""
    run = tmp_path / "run"
    common = ["train.checkpoint.every=2", "train.eval_every=0"]
    train(cfg("train.steps=2", *common), run)
    state_file = list_checkpoints(run / "checkpoints")[-1] / "state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["train"]["dpo"]["disable_dropout"]
    del state["config"]["data"]["max_bad_fraction"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=r"data.max_bad_fraction: '<absent>' -> 0.5"):
        train(cfg("train.steps=3", *common, "data.max_bad_fraction=0.5"), run)
    capsys.readouterr()
    result = train(cfg("train.steps=3", *common), run)  # an SFT run: train.dpo.* does nothing, whatever its value
    assert result["status"] == "completed" and "resumed from" in capsys.readouterr().out
    # a key whose absence meant the run did not do it (a DPO run's dropout was not turned off before
    # disable_dropout existed): the new default is a change, the old behaviour is not
    from mimo_spec.train.loop import config_changes

    old_dpo = {"train": {"objective": "dpo", "dpo": {"beta": 0.1}}}
    assert config_changes(old_dpo, {"train": {"objective": "dpo", "dpo": {"beta": 0.1, "disable_dropout": True}}}) \
        == ["train.dpo.disable_dropout: '<absent>' -> True"]
    assert config_changes(old_dpo, {"train": {"objective": "dpo", "dpo": {"beta": 0.1, "disable_dropout": False}}}) == []


def test_running_a_completed_run_again_keeps_its_numbers_and_metrics_json_is_strict(tmp_path):
    """The same command again resumes at the last step and runs none: metrics.json keeps the run's final loss,
    speed and padding (it became final_loss NaN, tokens_per_s 0), and is strict JSON (no bare NaN)."""
    run = tmp_path / "run"
    first = train(cfg("train.steps=4", "train.checkpoint.every=2", "train.eval_every=0"), run)
    again = train(cfg("train.steps=4", "train.checkpoint.every=2", "train.eval_every=0"), run)

    def strict(text):
        return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))

    written = strict((run / "metrics.json").read_text())
    assert again["final_loss"] == pytest.approx(first["final_loss"], abs=1e-5)
    assert written["final_loss"] == pytest.approx(first["final_loss"], abs=1e-5)
    assert written["tokens_per_s"] > 0 and written["padding_fraction"] is not None
    from mimo_spec.atomic import write_json_atomic

    write_json_atomic(tmp_path / "x.json", {"a": float("nan"), "b": [float("inf"), 1.5]})
    assert strict((tmp_path / "x.json").read_text()) == {"a": None, "b": [None, 1.5]}


def _damage_newest(run: Path, how: str) -> None:
    """One kind of damage (or crafting) of the newest checkpoint's optimizer state or state.json."""
    from safetensors.torch import load_file, save_file

    newest = list_checkpoints(run / "checkpoints")[-1]
    opt = newest / "optimizer.safetensors"
    state_file = newest / "state.json"
    state = json.loads(state_file.read_text())
    if how in ("moment_shape", "step_values"):
        tensors = load_file(str(opt))
        key = "0.exp_avg" if how == "moment_shape" else "0.step"
        tensors[key] = torch.zeros(3) if how == "moment_shape" else torch.zeros(5)
        save_file(tensors, str(opt))
        return
    if how == "scalars":
        state["optimizer"]["scalars"] = []
    elif how == "betas":
        state["optimizer"]["param_groups"][0]["betas"] = "ab"
    elif how == "data_state":
        state["data_state"] = [1]
    elif how == "deferred":
        state["data_state"]["deferred"] = [["x"]]
    elif how == "position":
        state["data_state"]["position"] = state["data_position"] + 5
    elif how == "skipped":
        state["data_skipped"] = "x"
    state_file.write_text(json.dumps(state))


def test_a_damaged_or_crafted_optimizer_state_or_state_json_falls_back_and_pruning_keeps_the_new_save(tmp_path,
                                                                                                       capsys):
    """Optimizer moments of the wrong shape (the fused AdamW kernel would write past them), a multi-value step,
    and state.json fields of the wrong type are a damaged checkpoint: the resume falls back to the previous
    one instead of crashing (or corrupting memory). A backup copy (step_000004.bak) is not a checkpoint. After
    such a fall-back, pruning keeps the checkpoint just written even though a newer (damaged) one is there."""
    import shutil

    base = tmp_path / "base"
    common = ["train.checkpoint.every=2", "train.checkpoint.keep_last=3", "train.eval_every=0"]
    train(cfg("train.steps=4", *common), base)
    for how in ("moment_shape", "step_values", "scalars", "betas", "data_state", "deferred", "position", "skipped"):
        run = tmp_path / how
        shutil.copytree(base, run)
        _damage_newest(run, how)
        capsys.readouterr()
        result = train(cfg("train.steps=5", *common, "train.resume=auto"), run)
        out = capsys.readouterr().out
        assert result["status"] == "completed", how
        assert f"skipping damaged checkpoint {run / 'checkpoints' / 'step_000004'}" in out, (how, out)
        assert f"resumed from {run / 'checkpoints' / 'step_000002'}" in out, (how, out)
    run = tmp_path / "bak"
    shutil.copytree(base, run)
    shutil.copytree(run / "checkpoints" / "step_000004", run / "checkpoints" / "step_000004.bak")
    # leftovers of saves killed midway: a gone process's, an earlier distributed save's; a live process's stays
    gone = subprocess.Popen(["true"])
    gone.wait()
    leftovers = [run / "checkpoints" / f".tmp-step_000003-{gone.pid}", run / "checkpoints" / ".tmp-step_000001"]
    live = run / "checkpoints" / ".tmp-step_000003-1"
    for d in (*leftovers, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    capsys.readouterr()
    train(cfg("train.steps=6", *common, "train.resume=auto"), run)
    assert f"resumed from {run / 'checkpoints' / 'step_000004'}" in capsys.readouterr().out
    assert not any(d.exists() for d in leftovers) and live.exists()
    # keep_last=1 after falling back past a damaged newest checkpoint: the new step 3 stays
    run = tmp_path / "prune"
    shutil.copytree(base, run)
    _damage_newest(run, "moment_shape")
    train(cfg("train.steps=5", "train.checkpoint.every=1", "train.checkpoint.keep_last=1", "train.eval_every=0",
              "train.resume=auto", "train.stop_after_steps=1"), run)
    names = [c.name for c in list_checkpoints(run / "checkpoints")]
    assert names == ["step_000003", "step_000004"], names


def test_checkpoint_from_a_different_model_names_the_tensors(tmp_path):
    train(cfg("train.steps=2", "train.eval_every=0"), tmp_path)
    other = build_model(cfg("model.params.num_layers=3"))
    with pytest.raises(InputError, match=r"missing tensors: language_model.layers.2"):
        load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1], other)
    wider = build_model(cfg("model.params.ffn_hidden_size=512"))
    with pytest.raises(InputError, match=r"shape mismatch: language_model.layers.0.mlp.fc1.weight: file"):
        load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1], wider)


def test_cli_default_job_then_eval_generate_and_sigterm(cli, tmp_path):
    r = cli("train.steps=30", "data.num_samples=256", "train.eval_every=0")
    assert r.returncode == 0, r.stderr
    run = next(p.parent for p in cli.cwd.glob("outputs/*/*/metrics.json"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["final_loss"] < 0.6 * metrics["first_loss"]
    for name in ("resolved_config.yaml", "overrides.yaml", "versions.json", "loss.png", "metrics.csv"):
        assert (run / name).exists(), name
    assert "loss" in r.stdout and "completed: 30 steps" in r.stdout

    r = cli("action=eval", f"eval.checkpoint={run}")
    assert r.returncode == 0, r.stderr
    assert "eval loss" in r.stdout and "perplexity" in r.stdout
    # data overrides take effect (another eval split); model overrides would be ignored: refused by name
    tokens = lambda out: int(out.rsplit("(", 1)[1].split()[0])  # noqa: E731 - "(N tokens, path)"
    r2 = cli("action=eval", f"eval.checkpoint={run}", "data.eval_samples=4", "data.seed=7")
    assert r2.returncode == 0, r2.stderr
    assert tokens(r2.stdout) < tokens(r.stdout)
    for bad, key in (("model.params.num_layers=1", "model.params.num_layers"), ("dtype=bfloat16", "dtype")):
        r2 = cli("action=eval", f"eval.checkpoint={run}", bad)
        assert r2.returncode == 2 and f"{key}: action=eval uses the model the checkpoint was trained with" in r2.stderr
        assert "Traceback" not in r2.stderr
    # naming the run's own model (as a layout check of the command's model may need) is no change: it runs
    r2 = cli("action=eval", f"eval.checkpoint={run}", "model=llama_tiny", "modality=[vision_clip]", "dtype=float32")
    assert r2.returncode == 0 and tokens(r2.stdout) == tokens(r.stdout), r2.stderr
    r2 = cli("action=generate", f"generate.checkpoint={run}", "data.eval_samples=4", "generate.prompt=Hi")
    assert r2.returncode == 2 and "data.eval_samples: action=generate uses the model and data" in r2.stderr

    from mimo_spec.data.synthetic import render_image
    from PIL import Image

    img = render_image("red", "circle", 32)
    png = tmp_path / "red.png"
    Image.fromarray((img.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()).save(png)
    r = cli("action=generate", f"generate.checkpoint={run}", f"generate.images=[{png}]",
            "generate.prompt=What is in the picture?", "generate.max_new_tokens=8")
    assert r.returncode == 0, r.stderr
    gen_run = sorted(cli.cwd.glob("outputs/*/*/generation.json"))[-1]
    record = json.loads(gen_run.read_text())
    assert len(record["tokens"]) >= 1 and record["text"].strip() == r.stdout.strip().splitlines()[0].strip()

    r = cli("action=eval")
    assert r.returncode == 2 and "eval.checkpoint: missing" in r.stderr and "Traceback" not in r.stderr

    # SIGTERM: a checkpoint is saved and the run ends cleanly
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "train.steps=5000", "train.eval_every=0",
                             "data.num_samples=256", "hydra.run.dir=sig"], cwd=cli.cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    csv = cli.cwd / "sig" / "metrics.csv"
    deadline = time.time() + 60
    while time.time() < deadline and (not csv.exists() or len(csv.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    saved = list_checkpoints(cli.cwd / "sig" / "checkpoints")
    assert saved and json.loads((cli.cwd / "sig" / "metrics.json").read_text())["status"] == "interrupted"
    assert f"saved checkpoint at step {int(saved[-1].name[5:])}" in out


def test_generate_writes_output_modality_images(tmp_path, monkeypatch):
    from omegaconf import OmegaConf
    from PIL import Image

    from mimo_spec import jobs
    from mimo_spec.components.language.gpt import GPT

    train(cfg("modality=[vision_clip,image_gen]", "train.steps=2", "train.eval_every=0"), tmp_path / "run")
    plain = GPT.logits  # make the LM open an image (its begin token, id 1003) first
    monkeypatch.setattr(GPT, "logits", lambda self, h: plain(self, h).index_fill(-1, torch.tensor([1003]), 1e4))
    gen_cfg = compose_config(["action=generate", f"generate.checkpoint={tmp_path / 'run'}",
                              "generate.prompt=draw a red circle", "generate.max_new_tokens=70"])  # 66: an item
    assert jobs.run_generate(gen_cfg, tmp_path) == 0
    record = json.loads((tmp_path / "generation.json").read_text())
    png = Path(record["outputs"]["image_out"][0])
    assert Image.open(png).size == (32, 32) and record["tokens"][:66] == [1003] + [1002] * 64 + [1004]
    codes = record["codes"]["image_out"][0]
    assert len(codes) == 64 and all(0 <= c < 7 for c in codes)
    # the PNG is the tokenizer's painting of those codes
    from mimo_spec.components.tokenizers.palette import PatchPalette

    painted = (PatchPalette(32, 4).decode(torch.tensor([codes]))[0] * 255).round().byte().permute(1, 2, 0)
    assert torch.equal(torch.from_numpy(__import__("numpy").asarray(Image.open(png))), painted)
    # output_modality= starts the item at once, with guidance
    gen_cfg = compose_config(["action=generate", f"generate.checkpoint={tmp_path / 'run'}", "generate.prompt=draw",
                              "generate.max_new_tokens=1", "generate.output_modality=image_out",
                              "generate.guidance_scale=3.0"])
    monkeypatch.setattr(GPT, "logits", plain)
    assert jobs.run_generate(gen_cfg, tmp_path) == 0
    record = json.loads((tmp_path / "generation.json").read_text())
    assert record["tokens"] == [1003] + [1002] * 64 + [1004] and len(record["codes"]["image_out"][0]) == 64
    assert OmegaConf.is_config(gen_cfg)


def test_eval_on_another_data_group_keeps_the_checkpoints_tokenizer_and_image_processing(tmp_path):
    """action=eval with data=<another group> reads that data, but with the tokenizer, template and image
    processing the checkpoint was trained with unless the command sets them too; single data.* keys change only
    themselves."""
    from omegaconf import OmegaConf

    from mimo_spec.jobs import _eval_data
    from mimo_spec.run_config import RunConfig, build_meta_model

    (tmp_path / "d.jsonl").write_text("")
    trained_data = compose_config(["data=llava_json", f"data.path={tmp_path / 'd.jsonl'}", "data.image_resize=crop",
                                   "data.image_mean=[0.5,0.5,0.5]"]).data
    trained = OmegaConf.create({"data": OmegaConf.to_container(trained_data, resolve=True)})
    overrides = ["action=eval", "data=webdataset", f"data.path={tmp_path / 's.tar'}", "data.image_resample=lanczos"]
    command = compose_config(overrides)
    run = RunConfig.from_config(command, spec=build_meta_model(command).spec)
    data = _eval_data(trained, run, ["data", "data.path", "data.image_resample"])
    assert data.source == "webdataset" and str(tmp_path / "s.tar") in str(data.path)
    assert data.image_resize == "crop" and list(data.image_mean) == [0.5] * 3 and data.image_resample == "lanczos"
    data = _eval_data(trained, run, ["data.image_resample"])
    assert data.source == "llava_json" and data.image_resample == "lanczos" and data.image_resize == "crop"
