"""Fault injection: a killed save, a real full disk, a folder made read-only mid-run and SIGTERM never
cost a good checkpoint."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from mimo_spec import build_model
from mimo_spec.config import compose_config
from mimo_spec.errors import StorageError
from mimo_spec.train.checkpoint import list_checkpoints, load_checkpoint
from mimo_spec.train.loop import train
from mimo_spec.train.optim import build_optimizer
from mimo_spec.train.schema import validate_train_config

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


@contextlib.contextmanager
def _tmpfs(path, size_kb):
    """A real, small filesystem at ``path`` (root only: skipped where mount is refused); always unmounted."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a tmpfs (needs root and the mount command): {e}")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {path} (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


CKPT_KB = 9300  # one checkpoint of the SMALL model (weights + AdamW state) is about 9.1 MB


def test_a_full_disk_gives_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path):
    """A real full filesystem: room for one checkpoint, not two. safetensors reports the full disk as
    its own SafetensorError; the run ends with a storage error naming the checkpoint it could not
    write and the last good one, the temporary folder is gone, and that checkpoint loads."""
    with _tmpfs(tmp_path / "disk", CKPT_KB + 2500) as disk:
        with pytest.raises(StorageError) as e:
            train(compose_config([*SMALL, "train.steps=6", "train.checkpoint.every=2"]), disk / "run")
        msg = str(e.value)
        assert "No space left on device" in msg, msg
        assert "cannot write checkpoint" in msg and "step_000004" in msg, msg
        assert f"the last good checkpoint is {disk / 'run' / 'checkpoints' / 'step_000002'}" in msg, msg
        ckpts = disk / "run" / "checkpoints"
        assert [p.name for p in list_checkpoints(ckpts)] == ["step_000002"]
        assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp")]
        model = build_model(compose_config(SMALL))
        optimizer = build_optimizer(model, validate_train_config(compose_config(SMALL).train))
        assert load_checkpoint(ckpts / "step_000002", model, optimizer)["step"] == 2

        # the CLI end to end, on the same full disk: exit 2, one readable error, no traceback
        shutil.rmtree(disk / "run")
        r = _start(disk / "cli", "train.steps=6", "train.checkpoint.every=2")
        out, err = r.communicate(timeout=180)
        assert r.returncode == 2, err[-3000:]
        assert err.startswith(("mimo-spec: storage error", "mimo-spec: checkpoint error")), err[-3000:]
        assert "Traceback" not in err and "No space left on device" in err, err[-3000:]
        kept = list_checkpoints(disk / "cli" / "checkpoints")
        assert kept, err
        load_checkpoint(kept[-1], build_model(compose_config(SMALL)))


def test_a_checkpoint_folder_made_read_only_mid_run_is_a_clean_error(tmp_path):
    """``mount -o remount,ro`` of the run's checkpoint filesystem while the CLI trains: exit 2 with a
    storage error, no traceback, and the checkpoints written before still load."""
    run = tmp_path / "run"
    with _tmpfs(run / "checkpoints", 4 * CKPT_KB):
        proc = _start(run, "train.steps=100000", "train.checkpoint.every=2", "train.checkpoint.keep_last=1")
        try:
            deadline = time.time() + 90
            while not list_checkpoints(run / "checkpoints"):
                assert time.time() < deadline and proc.poll() is None, proc.communicate()[1][-3000:]
                time.sleep(0.02)
            while True:  # refused (busy) while a save holds a file open: retry between saves
                r = subprocess.run(["mount", "-o", "remount,ro", str(run / "checkpoints")], capture_output=True,
                                   text=True)
                if r.returncode == 0:
                    break
                assert time.time() < deadline and proc.poll() is None, r.stderr
                time.sleep(0.01)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 2, err[-3000:]
        assert err.startswith("mimo-spec: storage error"), err[-3000:]
        assert "Read-only file system" in err and "Traceback" not in err, err[-3000:]
        kept = list_checkpoints(run / "checkpoints")
        assert kept
        load_checkpoint(kept[-1], build_model(compose_config(SMALL)))
