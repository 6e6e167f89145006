"""The run directory: one run at a time, no mixed runs, no clobbered record, no partial metrics, no secrets."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mimo_spec.config import compose_config
from mimo_spec.errors import ConfigError
from mimo_spec.rundir import LOCK_NAME, RECORD_FILES, RunLock, lock_run_dir
from mimo_spec.train.checkpoint import list_checkpoints
from mimo_spec.train.loop import train
from mimo_spec.train.metrics import read_metrics

from conftest import ROOT
from test_bad_inputs import run_cli_in_process

SMALL = ["data.num_samples=64", "data.eval_samples=8", "train.eval_every=0", "train.log_every=100000",
         "train.num_threads=1"]


def _stamp(run: Path) -> dict:
    """Each record file's identity: an atomic rewrite (even with the same bytes) changes the inode."""
    return {name: ((run / name).stat().st_ino, (run / name).stat().st_mtime_ns, (run / name).read_bytes())
            for name in RECORD_FILES}


def _steps(run: Path) -> list[int]:
    return [int(r["step"]) for r in read_metrics(run / "metrics.csv")]


def _env():
    return {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}


def test_a_refused_command_never_mixes_runs_nor_touches_the_record(tmp_path):
    run = tmp_path / "run"
    code, out, err = run_cli_in_process([*SMALL, "train.steps=4", "train.checkpoint.every=2",
                                         f"hydra.run.dir={run}"], tmp_path)
    assert code in (0, None), err
    before, metrics_before = _stamp(run), (run / "metrics.csv").read_bytes()
    ckpts = [p.name for p in list_checkpoints(run / "checkpoints")]
    assert ckpts == ["step_000002", "step_000004"] and not (run / LOCK_NAME).exists()

    bad_json = tmp_path / "chats.json"
    bad_json.write_text(json.dumps([{"id": "0", "image": "missing.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]}]))
    refused = {
        "fresh start over checkpoints": ([*SMALL, "train.steps=4", "train.resume=none"],
                                         ["train.resume", str(run), "hydra.run.dir=", "train.resume=auto"]),
        "config changed": ([*SMALL, "train.steps=6", "train.lr=0.01"], ["the config changed", "train.lr"]),
        "bad config": ([*SMALL, "train.steps=6", "model.params.num_kv_heads=3"], ["num_kv_heads"]),
        "bad data": (["train.steps=6", "train.num_threads=1", "data=llava_json", f"data.path={bad_json}.gone"],
                     ["chats.json.gone"]),  # (a missing image is skipped when read: data.on_bad_sample)
        "another run's checkpoint": ([*SMALL, "train.steps=6", f"train.resume={tmp_path / 'other'}"],
                                     ["train.resume", "already holds checkpoints"]),
        "back to an older checkpoint": ([*SMALL, "train.steps=6",
                                         f"train.resume={run / 'checkpoints' / 'step_000002'}"],
                                        ["train.resume", "newer checkpoints (step_000004)", "hydra.run.dir="]),
    }
    # a second run elsewhere, to resume from
    assert run_cli_in_process([*SMALL, "train.steps=2", f"hydra.run.dir={tmp_path / 'other'}"], tmp_path)[0] in (0, None)
    for what, (args, expected) in refused.items():
        code, out, err = run_cli_in_process([*args, f"hydra.run.dir={run}"], tmp_path)
        assert code == 2 and "Traceback" not in err, (what, err)
        for text in expected:
            assert text in err, (what, text, err)
        assert _stamp(run) == before, what  # the record of the run that lives there is untouched
        assert (run / "metrics.csv").read_bytes() == metrics_before, what
        assert [p.name for p in list_checkpoints(run / "checkpoints")] == ckpts, what
        assert not (run / LOCK_NAME).exists(), what  # released on errors too
    # read-only actions never replace the record of a run that trained there
    for action in ("validate", "summary", "print"):
        code, out, err = run_cli_in_process([f"action={action}", "model.params.num_layers=3", f"hydra.run.dir={run}"],
                                            tmp_path)
        assert code in (0, None), (action, err)
        assert _stamp(run) == before, action
    # the Python API refuses a fresh start over checkpoints too
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(compose_config([*SMALL, "train.steps=4", "train.resume=none"]), run)
    # a run that starts writes its record: the resumed run's overrides
    code, out, err = run_cli_in_process([*SMALL, "train.steps=6", "train.checkpoint.every=2", f"hydra.run.dir={run}"],
                                        tmp_path)
    assert code in (0, None), err
    assert "train.steps=6" in (run / "overrides.yaml").read_text()
    assert _steps(run) == [1, 2, 3, 4, 5, 6]
    # validate and summary in a new directory still record what they checked
    assert run_cli_in_process(["action=validate", f"hydra.run.dir={tmp_path / 'v'}"], tmp_path)[0] in (0, None)
    assert all((tmp_path / "v" / name).exists() for name in RECORD_FILES)


def test_two_processes_on_one_run_dir_and_a_stale_lock(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *SMALL, "train.steps=100000",
                              "train.checkpoint.every=3", f"hydra.run.dir={run}"], cwd=tmp_path, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and not list_checkpoints(run / "checkpoints"):
            assert first.poll() is None, first.communicate()
            time.sleep(0.1)
        holder = json.loads((run / LOCK_NAME).read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        second = subprocess.run([sys.executable, str(ROOT / "cli.py"), *SMALL, "train.steps=100000",
                                 f"hydra.run.dir={run}"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
        assert "hydra.run.dir" in second.stderr and f"in use by process {first.pid}" in second.stderr
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    # the killed run's lock is left behind; its process is gone: the next run takes it over with a note
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == first.pid
    last = int(list_checkpoints(run / "checkpoints")[-1].name[5:])
    code, out, err = run_cli_in_process([*SMALL, f"train.steps={last + 2}", f"hydra.run.dir={run}"], tmp_path)
    assert code in (0, None), err
    assert f"took over the lock of {run} from process {first.pid}" in err
    assert not (run / LOCK_NAME).exists()  # released at the end
    steps = _steps(run)  # one run's rows, whole, in order: nothing garbled
    assert steps == list(range(1, last + 3)), steps
    # a lock file naming a live process of this host (one that holds no flock) is respected
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK_NAME).write_text(f"{sleeper.pid}\n")
        code, out, err = run_cli_in_process([*SMALL, f"train.steps={last + 4}", f"hydra.run.dir={run}"], tmp_path)
        assert code == 2 and f"in use by process {sleeper.pid}" in err, err
        assert _steps(run) == steps
    finally:
        sleeper.kill()
        sleeper.wait()


def test_only_rank_zero_locks_and_the_lock_is_reentrant(tmp_path, monkeypatch):
    with RunLock.acquire(tmp_path) as outer:
        with RunLock.acquire(tmp_path):  # the CLI holds it, then the training loop takes it again
            pass
        assert (tmp_path / LOCK_NAME).exists() and outer._count == 1
    assert not (tmp_path / LOCK_NAME).exists()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert lock_run_dir(tmp_path) is None and not (tmp_path / LOCK_NAME).exists()
    monkeypatch.setenv("RANK", "0")
    lock = lock_run_dir(tmp_path)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    # filesystems without flock: the lock is a file made with O_CREAT|O_EXCL; a dead holder's is taken over
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname()}))
    first = RunLock(tmp_path)
    first._take_exclusive()
    assert "took over" in first.note and json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    other = RunLock(tmp_path / "." / "")  # the same directory, as a second taker would see it
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": sleeper.pid}))
        with pytest.raises(ConfigError, match=f"in use by process {sleeper.pid}"):
            other._take_exclusive()
    finally:
        sleeper.kill()
        sleeper.wait()
    first._count = 1
    first.release()


_REWRITER = """
import sys
from pathlib import Path
from mimo_spec.train.metrics import MetricsWriter, truncate_metrics
fields = ["step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "eval_loss", "eval_ppl"]
n = int(sys.argv[2])
m = MetricsWriter(Path(sys.argv[1]), fields, resume=True)
print("ready", flush=True)
while True:  # a resume's rewrite, again and again
    truncate_metrics(m, n)
"""


def test_metrics_csv_is_whole_after_a_sigkill_during_the_resume_rewrite(tmp_path):
    fields = "step,loss,lr,grad_norm,tokens_per_s,elapsed_s,eval_loss,eval_ppl"
    n = 20000
    text = fields + "\r\n" + "".join(f"{i},0.{i:06d},0.001,1.5,1000.0,{i}.5,,\r\n" for i in range(1, n + 1))
    csv = tmp_path / "metrics.csv"
    csv.write_bytes(text.encode())
    rng = random.Random(0)
    env = {**_env(), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _REWRITER, str(tmp_path), str(n)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.communicate()
        # freeze the rewriting process at 30 random moments: the file on disk is what a kill right
        # then would leave; then one real SIGKILL in the middle of some rewrite
        for _ in range(30):
            time.sleep(rng.uniform(0.005, 0.05))
            os.kill(proc.pid, signal.SIGSTOP)
            while Path(f"/proc/{proc.pid}/stat").exists() and \
                    Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "Tt":
                time.sleep(0.001)
            try:
                assert csv.read_bytes() == text.encode()  # never empty, never partial
            finally:
                os.kill(proc.pid, signal.SIGCONT)
        time.sleep(rng.uniform(0.05, 0.2))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert csv.read_bytes() == text.encode()
    # a row cut short by a kill is dropped by the next resume, not glued to the next row
    with open(csv, "ab") as f:
        f.write(b"20001,0.5")
    from mimo_spec.train.metrics import MetricsWriter, truncate_metrics

    m = MetricsWriter(tmp_path, fields.split(","), resume=True)
    truncate_metrics(m, n + 10)
    m.log({"step": n + 1, "loss": 0.25})
    m.close()
    rows = read_metrics(csv)
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]  # a killed rewrite's leftovers are gone
    assert len(rows) == n + 1 and rows[-1]["step"] == str(n + 1) and rows[-1]["loss"] == "0.25"


def test_secrets_from_the_environment_stay_out_of_the_run_files(tmp_path, monkeypatch):
    secret = "s3cr3t-" + os.urandom(6).hex()
    monkeypatch.setenv("MIMO_TEST_TOKEN", secret)
    run = tmp_path / "run"
    args = [*SMALL, "train.steps=2", "train.checkpoint.every=1", "+auth.token=${oc.env:MIMO_TEST_TOKEN}", "+auth.header=Bearer ${auth.token}",
            "+copy=${auth}", "+plain=${model.params.hidden_size}", f"hydra.run.dir={run}"]
    code, out, err = run_cli_in_process(args, tmp_path)
    assert code in (0, None), err
    leaks = [p for p in run.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaks, leaks
    from omegaconf import OmegaConf

    record = OmegaConf.load(run / "resolved_config.yaml")
    raw = OmegaConf.to_container(record, resolve=False)
    assert raw["auth"] == {"token": "${oc.env:MIMO_TEST_TOKEN}", "header": "Bearer ${auth.token}"}
    assert raw["copy"] == "${auth}"
    assert raw["plain"] == record.model.params.hidden_size  # what does not come from the environment is resolved
    assert "+auth.token=${oc.env:MIMO_TEST_TOKEN}" in OmegaConf.to_container(OmegaConf.load(run / "overrides.yaml"))
    assert record.auth.header == f"Bearer {secret}"  # the record still resolves where the variable is set
    # resuming (a rotated secret is no config change) and evaluating the checkpoint still work
    monkeypatch.setenv("MIMO_TEST_TOKEN", secret + "-rotated")
    code, out, err = run_cli_in_process([*args[:-1], f"hydra.run.dir={run}", "train.steps=3"], tmp_path)
    assert code in (0, None) and "resumed from" in out, err
    code, out, err = run_cli_in_process(["action=eval", f"eval.checkpoint={run}", f"hydra.run.dir={tmp_path / 'ev'}"],
                                        tmp_path)
    assert code in (0, None) and "eval loss" in out, err
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaks, leaks
    # the README's recipe re-runs the job from its record (here: checks it), with the secret still out of the files
    again = tmp_path / "again"
    code, out, err = run_cli_in_process(["--config-dir", str(run), "--config-name", "resolved_config",
                                         "action=validate", f"hydra.run.dir={again}"], tmp_path)
    assert code in (0, None), err
    assert not [p for p in again.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_a_sweep_job_whose_dir_is_in_use_writes_nothing_there(tmp_path, capsys):
    from mimo_spec.app import run
    from mimo_spec.sweep import run_sweep_job

    job = tmp_path / "0"
    job.mkdir()
    (job / "metrics.json").write_text('{"status": "completed", "final_loss": 1.0}\n')  # the live job's result
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (job / LOCK_NAME).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        assert run_sweep_job(compose_config(["action=validate"]), ["action=validate"], job, run) is None
    finally:
        sleeper.kill()
        sleeper.wait()
    assert f"in use by process {sleeper.pid}" in capsys.readouterr().err
    assert json.loads((job / "metrics.json").read_text())["final_loss"] == 1.0
    assert sorted(p.name for p in job.iterdir()) == sorted([LOCK_NAME, "metrics.json"])


def test_a_refused_sweep_job_keeps_the_earlier_runs_results(tmp_path):
    """Re-running a sweep into a job dir that holds a finished run, with a changed config: the job is
    refused (config changed) and that run's metrics.json stays; the summary shows the refusal."""
    import json

    small = ["data.num_samples=32", "data.eval_samples=4", "train.steps=2", "train.log_every=100",
             "train.num_threads=1", f"hydra.sweep.dir={tmp_path / 'sw'}", "hydra.sweep.subdir=A"]
    code, _, err = run_cli_in_process(["-m", *small, "train.lr=1e-3"], tmp_path)
    assert code == 0, err
    job = tmp_path / "sw" / "A"
    before = (job / "metrics.json").read_bytes()
    assert json.loads(before)["status"] == "completed"
    code, _, err = run_cli_in_process(["-m", *small, "train.lr=0.5"], tmp_path)
    assert code == 2 and "the config changed: train.lr" in err, err
    assert (job / "metrics.json").read_bytes() == before
    assert json.loads((job / "sweep_job.json").read_text())["status"] == "invalid"
    assert "invalid" in (tmp_path / "sw" / "sweep_summary.md").read_text()


def test_a_secret_quoted_by_an_error_stays_out_of_a_sweeps_files(tmp_path, monkeypatch):
    """An invalid value read from the environment is quoted by its error; the sweep's files
    (each job's metrics.json, the summary) show the interpolation instead of the value."""
    monkeypatch.setenv("MIMO_TEST_SECRET", "hunter2-not-a-number")
    code, _, err = run_cli_in_process(["-m", f"hydra.sweep.dir={tmp_path / 'sw'}", "action=validate", "seed=1,2",
                                       "model.params.num_layers=${oc.env:MIMO_TEST_SECRET}"], tmp_path)
    assert code == 2, err
    files = [p for p in (tmp_path / "sw").rglob("*") if p.is_file()]
    assert any(p.name == "sweep_summary.md" for p in files)
    assert "${oc.env:MIMO_TEST_SECRET}" in (tmp_path / "sw" / "sweep_summary.md").read_text()
    assert not [p for p in files if "hunter2" in p.read_text(errors="replace")]


def test_rerunning_a_finished_run_shows_no_empty_progress_line(tmp_path):
    """A run re-started in its finished run dir resumes at its last step and runs none: it says so and prints
    the record's figures, not a progress line of 'loss nan 0 tok/s' (what it showed before)."""
    run = tmp_path / "run"
    args = [*SMALL, "train.steps=2", "train.checkpoint.every=1", f"hydra.run.dir={run}"]
    code, first, err = run_cli_in_process(args, tmp_path)
    assert code in (0, None), err
    code, out, err = run_cli_in_process(args, tmp_path)
    assert code in (0, None) and "resumed from" in out and "completed: 2 steps" in out, err
    assert "nan" not in out + err and "0 tok/s" not in out + err, out + err
