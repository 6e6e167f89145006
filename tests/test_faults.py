"""Fault injection: a killed save, a full disk and SIGTERM never cost a good checkpoint."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from mimo_spec import build_model
from mimo_spec.config import compose_config
from mimo_spec.errors import InputError
from mimo_spec.train.checkpoint import list_checkpoints, load_checkpoint
from mimo_spec.train.loop import train

from conftest import ROOT

SMALL = ["data.num_samples=128", "data.eval_samples=8", "train.eval_every=0", "train.log_every=100000",
         "train.num_threads=1"]


def _start(run_dir, *extra):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *SMALL, f"hydra.run.dir={run_dir}", *extra],
                            cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_rows(csv, rows, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if csv.exists() and len(csv.read_text().splitlines()) > rows:
            return
        time.sleep(0.05)
    raise AssertionError(f"{csv} did not reach {rows} rows")


def test_sigkill_during_checkpoint_saves_leaves_loadable_checkpoints(tmp_path):
    run = tmp_path / "run"
    # saving every step: most of the time is spent writing checkpoints, so the kill lands in one
    for rows in (3, 7):
        proc = _start(run, "train.steps=2000", "train.checkpoint.every=1", "train.checkpoint.keep_last=2")
        _wait_rows(run / "metrics.csv", rows)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        found = list_checkpoints(run / "checkpoints")
        assert found
        for ckpt in found:  # every checkpoint that is listed is complete
            load_checkpoint(ckpt, build_model(compose_config(SMALL)))
    last = int(list_checkpoints(run / "checkpoints")[-1].name[5:])
    proc = _start(run, f"train.steps={last + 3}", "train.checkpoint.every=1", "train.checkpoint.keep_last=2")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "resumed from" in out and f"completed: {last + 3} steps" in out


def test_a_full_disk_gives_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # the first checkpoint (model, optimizer, rng) fits; the next does not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(InputError) as e:
        train(compose_config([*SMALL, "train.steps=6", "train.checkpoint.every=2"]), tmp_path)
    assert "No space left on device" in str(e.value) and "step_000002" in str(e.value)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_000002"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    load_checkpoint(tmp_path / "checkpoints" / "step_000002", build_model(compose_config(SMALL)))
