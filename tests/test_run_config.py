"""One typed RunConfig, checked once; typed sections below it; build_model free of processes; error kinds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mimo_spec import build_model
from mimo_spec.config import compose_config
from mimo_spec.errors import (CheckpointError, ConfigError, DataError, InputError, MimoError, StorageError,
                              format_error)
from mimo_spec.run_config import RunConfig
from mimo_spec.train.schema import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = ["train.steps=2", "train.batch_size=2", "train.eval_every=0", "train.checkpoint.every=0",
        "data.num_samples=8", "data.eval_samples=2"]


def _count_checks(monkeypatch) -> dict[str, int]:
    """Counts, per section, how often its schema checks a raw section (constructs its typed model)."""
    from mimo_spec.data import SyntheticDataConfig

    counts = {"train": 0, "data": 0}

    def counting(section, cls):
        original = cls.__init__

        def init(self, *args, **kwargs):
            counts[section] += 1
            original(self, *args, **kwargs)
        monkeypatch.setattr(cls, "__init__", init)

    counting("train", TrainConfig)
    counting("data", SyntheticDataConfig)
    return counts


def test_a_training_run_checks_each_section_once(tmp_path, monkeypatch, capsys):
    from mimo_spec.app import run

    counts = _count_checks(monkeypatch)
    cfg = compose_config(["action=train", *TINY])
    assert run(cfg, [], tmp_path) == 0
    assert counts == {"train": 1, "data": 1}
    state = json.loads(next((tmp_path / "checkpoints").glob("step_*/state.json")).read_text())
    assert state["config"]["train"]["steps"] == 2 and "hydra" not in state["config"]  # the recorded config


def test_run_config_is_typed_and_lists_every_problem_at_once():
    run = RunConfig.from_config(compose_config(["parallel=fsdp", "train.lr=0.5", "seed=7"]))
    assert isinstance(run.train, TrainConfig) and run.train.lr == 0.5 and run.seed == 7 == run.train_seed
    assert run.data.source == "synthetic" and run.summary.depth == 3 and run.eval is not None
    assert run.parallel.layout["name"] == "fsdp" and run.model.language_model.path == "model"
    with pytest.raises(ConfigError) as e:
        RunConfig.from_config(compose_config(["train.lr=-1", "data.num_samples=0", "generate.top_p=0", "seed=-1"]))
    assert {p.path for p in e.value.problems} == {"train.lr", "data.num_samples", "generate.top_p", "seed",
                                                  "train.seed", "data.seed"}  # both read ${seed}
    # action=summary needs its own section only: the others are not checked (nor typed)
    run = RunConfig.from_config(compose_config(["train.lr=-1", "summary.depth=2"]), sections=("summary",))
    assert run.train is None and run.summary.depth == 2


def test_the_optimizer_and_the_schedule_read_the_typed_section():
    """Defaults live in TrainConfig only: a subclass with other defaults is honoured as it stands."""
    from mimo_spec.train.optim import build_optimizer, lr_factor

    class Other(TrainConfig):
        eps: float = 1e-3
        betas: tuple[float, float] = (0.5, 0.6)
        min_lr_ratio: float = 0.25
        warmup_steps: int = 0

    model = build_model(compose_config([]), seed=0)
    opt = build_optimizer(model, Other(steps=10, batch_size=1, lr=0.1))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["eps"] == 1e-3 and opt.defaults["betas"] == (0.5, 0.6)
    assert lr_factor(10, Other(steps=10, batch_size=1, lr=0.1)) == pytest.approx(0.25)
    sgd = build_optimizer(model, Other(steps=10, batch_size=1, lr=0.1, optimizer="sgd", momentum=0.5))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.5


def test_build_model_knows_nothing_of_processes(monkeypatch):
    """WORLD_SIZE and an impossible layout in the config: build_model builds the model all the same."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = compose_config(["parallel=tp2", "model.params.num_kv_heads=1"])
    model = build_model(cfg, seed=0, train=TrainConfig(steps=1, batch_size=1, lr=0.1))
    assert model.language_model.num_kv_heads == 1 and not hasattr(model.spec, "parallel")
    assert "parallel" not in model.spec.to_dict()


def test_error_kinds_are_not_config_errors():
    for cls, kind in ((InputError, "input"), (DataError, "data"), (CheckpointError, "checkpoint"),
                      (StorageError, "storage")):
        err = cls("broken", path="somewhere")
        assert isinstance(err, MimoError) and not isinstance(err, ConfigError)
        assert format_error(err).startswith(f"mimo-spec: {kind} error:")
    assert issubclass(DataError, InputError) and issubclass(CheckpointError, InputError)
    assert format_error(ConfigError("bad", path="x")) == "mimo-spec: config error:\n  x: bad"


def _cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})}, cwd=cwd)


def test_cli_names_a_damaged_checkpoint_a_checkpoint_error(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "state.json").write_text("{not json")
    r = _cli("action=eval", f"eval.checkpoint={ckpt}", f"hydra.run.dir={tmp_path / 'out'}")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("mimo-spec: checkpoint error") and "Traceback" not in r.stderr, r.stderr


def test_a_bug_in_a_registered_component_keeps_its_traceback(tmp_path):
    (tmp_path / "buggy_mod.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        from mimo_spec.registry import register

        @register("projector", "buggy_projector")
        class Buggy(nn.Module):
            def __init__(self, in_features: int = 16, out_features: int = 32):
                super().__init__()
                self.width = len(in_features)  # the bug: a TypeError inside the component

            def tokens_out(self, tokens):
                return tokens
    """))
    node = "modalities.images.submodules.input_projections.clip"
    r = _cli("action=validate", "allow_imports=[buggy_mod]", f"{node}.module=buggy_mod.Buggy",
             f"hydra.run.dir={tmp_path / 'out'}", env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 1, r.stderr
    assert "Traceback" in r.stderr and "TypeError: object of type 'int' has no len()" in r.stderr, r.stderr
    assert "config error" not in r.stderr
