"""Resource limits, signals and non-finite losses (issue 13): what cannot fit is refused before it is
allocated, SIGTERM ends a job promptly in every phase, and a diverging run stops without saving it."""

import json
import math
import os
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import pytest
import torch

from mimo_spec import build_model
from mimo_spec.config import compose_config
from mimo_spec.errors import ConfigError, DataError, InputError
from mimo_spec.train.checkpoint import list_checkpoints
from mimo_spec.train.metrics import read_metrics

from conftest import ROOT

TINY = ["data.num_samples=64", "data.eval_samples=8", "train.eval_batches=1", "train.log_every=1000",
        "train.num_threads=1"]

# Runs the real CLI in a subprocess. PROBE names a function to wrap: the wrapper writes the marker file
# MARK when it is called for the PROBE_AT-th time (the test then sends a real SIGTERM), and may then sleep
# PROBE_SLEEP seconds (a slow phase: data building, evaluating, saving) before calling the real function.
PROBE = r'''
import os, sys, time
from pathlib import Path
import importlib
module_name, attr = os.environ["PROBE"].rsplit(".", 1)
module = importlib.import_module(module_name)
real = getattr(module, attr)
calls = {"n": 0}
def probe(*a, **kw):
    calls["n"] += 1
    if calls["n"] == int(os.environ.get("PROBE_AT", "1")):
        Path(os.environ["MARK"]).write_text("reached")
        time.sleep(float(os.environ.get("PROBE_SLEEP", "0")))
    return real(*a, **kw)
setattr(module, attr, probe)
sys.argv = ["mimo-spec", *sys.argv[1:]]
from mimo_spec.app import main
main()
'''


def _signalled_run(tmp_path: Path, args: list[str], probe: str, at: int = 1, sleep: float = 0.0,
                   timeout: float = 90.0) -> tuple[subprocess.CompletedProcess, float]:
    """Run the CLI with a probe, SIGTERM it when the probe is reached; (result, seconds from signal to exit)."""
    script = tmp_path / "probe_cli.py"
    script.write_text(PROBE)
    mark = tmp_path / f"mark_{probe.rsplit('.', 1)[1]}_{at}"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(PROBE=probe, PROBE_AT=str(at), PROBE_SLEEP=str(sleep), MARK=str(mark),
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while not mark.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert mark.exists(), proc.communicate(timeout=30)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.time() - sent


# ------------------------------------------------------------------------------------------- SIGTERM

def test_sigterm_before_the_loop_ends_at_once_with_a_message(tmp_path):
    # building the data (slow here: the probe sleeps 60 s in it): nothing to save, exit 128 + 15 at once
    r, took = _signalled_run(tmp_path, ["train.steps=3", *TINY, "hydra.run.dir=build"],
                             "mimo_spec.data.build_dataset", sleep=60)
    assert r.returncode == 143, r.stderr
    assert "interrupted: SIGTERM received while building the model and the data; nothing was saved" in r.stderr
    assert "Traceback" not in r.stderr and took < 30, (took, r.stderr)
    assert not list_checkpoints(tmp_path / "build" / "checkpoints")


def test_sigterm_while_collating_undoes_the_step_and_saves_the_last_complete_one(tmp_path):
    # 60 micro-batches a step: the signal lands while a step's samples are taken and collated
    args = ["train.steps=50", "train.grad_accum=60", "train.batch_size=1", "modality=[]", "train.eval_every=0",
            "data.eval_samples=0", "data.num_samples=100000", "train.log_every=1000", "train.num_threads=1",
            "hydra.run.dir=coll"]
    r, took = _signalled_run(tmp_path, args, "mimo_spec.data.batch.collate", at=2 * 60 + 30, sleep=2)
    run = tmp_path / "coll"
    assert r.returncode == 0, r.stderr
    assert "received signal 15 during step 3: saved checkpoint at step 2" in r.stdout, r.stdout
    assert took < 30, took
    (ckpt,) = list_checkpoints(run / "checkpoints")
    state = json.loads((ckpt / "state.json").read_text())
    assert ckpt.name == "step_000002" and state["data_position"] == 2 * 60  # the cut step is not counted
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"
    assert len(read_metrics(run / "metrics.csv")) == 2


def test_sigterm_while_evaluating_or_saving_in_the_loop_and_in_an_eval_job(tmp_path):
    # during the loop's evaluation (a held-out split of 5000 samples, all evaluated): the step is complete
    args = ["train.steps=20", "train.eval_every=1", "data.eval_samples=5000", "train.eval_batches=null",
            "data.num_samples=64", "train.log_every=1000", "train.num_threads=1", "hydra.run.dir=ev"]
    r, took = _signalled_run(tmp_path, args, "mimo_spec.data.batch.collate", at=2, sleep=1)  # 1st eval batch
    assert r.returncode == 0, r.stderr
    assert "received signal 15: saved checkpoint at step 1" in r.stdout and took < 30, (took, r.stdout)
    assert [p.name for p in list_checkpoints(tmp_path / "ev" / "checkpoints")] == ["step_000001"]

    # during a checkpoint save (the probe sleeps 3 s in it): the save completes, then the run stops
    args = ["train.steps=20", "train.checkpoint.every=2", *TINY, "train.eval_every=0", "hydra.run.dir=sv"]
    r, took = _signalled_run(tmp_path, args, "mimo_spec.train.loop.save_checkpoint", sleep=3)
    assert r.returncode == 0, r.stderr
    assert "the checkpoint of step 2 is already saved" in r.stdout, r.stdout
    assert [p.name for p in list_checkpoints(tmp_path / "sv" / "checkpoints")] == ["step_000002"]
    assert not list((tmp_path / "sv" / "checkpoints").glob(".tmp*")) and took < 30

    # an eval job of that checkpoint (the probe sleeps 60 s in evaluate): ended at once, no eval.json
    r, took = _signalled_run(tmp_path, ["action=eval", f"eval.checkpoint={tmp_path / 'sv'}", "hydra.run.dir=job"],
                             "mimo_spec.train.loop.evaluate", sleep=60)
    assert r.returncode == 143 and "SIGTERM received while evaluating; nothing was saved" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and took < 30 and not (tmp_path / "job" / "eval.json").exists()


# ----------------------------------------------------------------------------------- non-finite loss

def test_a_diverging_run_stops_keeps_the_last_good_checkpoint_and_says_failed(tmp_path):
    from mimo_spec.train.loop import Diverged, train
    from mimo_spec.weights import load_weights

    run = tmp_path / "run"
    c = compose_config(["train.steps=30", "train.lr=1e30", "train.warmup_steps=0", "train.grad_clip=null",
                        "train.checkpoint.every=1", "train.eval_every=0", *TINY])
    with pytest.raises(Diverged) as e:
        train(c, run)
    msg = str(e.value)
    assert msg.startswith("train: the ") and "the training diverged" in msg and "train.lr" in e.value.problems[0].hint
    step = int(msg.split(" at step ")[1].split(":")[0])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "failed" and f"at step {step}" in metrics["error"]
    kept = list_checkpoints(run / "checkpoints")
    assert all(int(p.name[5:]) < step for p in kept)  # nothing from the bad step on
    assert metrics["last_checkpoint"] == (str(kept[-1]) if kept else None)
    model = build_model(c)
    for p in kept:  # every checkpoint kept holds finite weights
        load_weights(model, p / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    assert all(math.isfinite(float(r["loss"])) for r in read_metrics(run / "metrics.csv"))

    # the CLI: exit 2, a config error naming the step, no traceback
    from test_bad_inputs import run_cli_in_process

    code, out, err = run_cli_in_process(["train.steps=30", "train.lr=1e30", "train.warmup_steps=0", *TINY,
                                         "train.eval_every=0", "hydra.run.dir=cli"], tmp_path)
    assert code == 2 and err.startswith("mimo-spec: config error:") and "Traceback" not in err, err
    assert "the training diverged" in err and "hint: lower train.lr" in err
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["status"] == "failed"


def test_a_diverging_run_under_torchrun_stops_every_rank_together(tmp_path):
    from test_parallel_run import torchrun

    r = torchrun(2, ROOT / "cli.py", "parallel=fsdp", "train.steps=6", "train.lr=1e30", "train.warmup_steps=0",
                 "train.grad_clip=null", "train.batch_size=4", "data.num_samples=32", "data.eval_samples=4",
                 "train.eval_every=0", "train.checkpoint.every=1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                 timeout=240)
    assert r.returncode != 0 and r.stderr.count("mimo-spec: config error") == 2, r.stderr[-3000:]
    assert r.stderr.count("exitcode  : 2") >= 1 and "terminate called" not in r.stderr, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    step = int(metrics["error"].split(" at step ")[1].split(":")[0])
    assert metrics["status"] == "failed" and "the training diverged" in metrics["error"]
    assert [int(p.name[5:]) for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == list(range(1, step))[-2:]


# ------------------------------------------------------------------------------------------- memory

def test_step_memory_is_estimated_against_the_machine_before_allocating():
    from mimo_spec.data import build_dataset
    from mimo_spec.train.limits import check_step_memory, machine_memory
    from mimo_spec.data.tokenizer import build_tokenizer

    cfg = compose_config(TINY)
    model = build_model(cfg)
    data = build_dataset(cfg.data, model, build_tokenizer(cfg.data, model))
    tc = {"batch_size": 8, "grad_accum": 4}
    check_step_memory(model, data, tc)  # the default run fits
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        check_step_memory(model, data, {"batch_size": 100_000_000})
    assert e.value.problems[0].path == "train.batch_size" and "needs at least" in str(e.value)
    with pytest.raises(ConfigError) as e:
        check_step_memory(model, data, {"batch_size": 8, "grad_accum": 1_000_000_000})
    assert e.value.problems[0].path == "train.grad_accum"
    assert time.perf_counter() - t0 < 5
    # more items per sample than could ever fit: sampled within the length limit, not counted down for ever
    many = build_dataset(compose_config([*TINY, "data.max_items_per_sample=1000000000"]).data, model,
                         build_tokenizer(cfg.data, model))
    t0 = time.perf_counter()
    assert all(len(many[i]["input_ids"]) <= many.max_len for i in range(5)) and time.perf_counter() - t0 < 10
    # the limit is this machine's memory, from sysconf (psutil need not be installed)
    assert machine_memory() <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert machine_memory() > 256 * 2**20


def test_big_models_still_validate_on_meta_and_the_sample_order_is_bounded(tmp_path):
    from test_bad_inputs import run_cli_in_process

    from mimo_spec.data.loader import SampleOrder

    code, out, err = run_cli_in_process(["action=validate", "model=llama3_70b", "modality=[]"], tmp_path)
    assert code == 0 and "config is valid" in out, err

    class Endless(torch.utils.data.Dataset):
        def __len__(self):
            return 10**12

    with pytest.raises(ConfigError) as e:
        SampleOrder(len(Endless()), seed=0)
    assert e.value.problems[0].path == "data.num_samples"
    # seeds up to 2**63 - 1 order the data (the epoch is mixed in without overflowing 64 bits)
    order = SampleOrder(10, seed=2**63 - 1)
    assert sorted(order[p] for p in range(10)) == list(range(10))


def test_max_new_tokens_is_refused_beyond_the_lm_and_clamped_after_the_prompt(capsys):
    from mimo_spec.jobs import _new_tokens

    model = build_model(compose_config(TINY))
    lm_max = model.language_model.max_seq_len
    with pytest.raises(ConfigError) as e:
        _new_tokens(model, 10, 10**9, "cpu")
    assert e.value.problems[0].path == "generate.max_new_tokens" and str(lm_max) in str(e.value)
    assert _new_tokens(model, 10, 5, "cpu") == 5
    assert _new_tokens(model, lm_max - 20, 100, "cpu") == 20
    assert "generating at most 20 tokens" in capsys.readouterr().err
    with pytest.raises(InputError, match="leaving no room"):  # the prompt, a runtime input, not the config
        _new_tokens(model, lm_max, 1, "cpu")

    # the Python API refuses what generate() does not implement instead of silently sampling
    from mimo_spec.generation import generate

    ids = torch.tensor([[1, 2, 3]])
    for kw, path in (({"strategy": "beam"}, "strategy"), ({"max_new_tokens": -3}, "max_new_tokens"),
                     ({"top_k": -5}, "top_k"), ({"top_p": 0.0}, "top_p"),
                     ({"strategy": "sample", "temperature": 0.0}, "temperature"),
                     ({"temperature": float("nan")}, "temperature")):
        with pytest.raises(InputError) as e:
            generate(model, ids, **kw)
        assert e.value.problems[0].path == path, kw
    assert len(generate(model, ids, max_new_tokens=2, eos_id=None).tokens) == 2
    with pytest.raises(ConfigError, match="the KV cache for 3 prompt"):  # before allocating ~1 PiB
        generate(model, ids, max_new_tokens=10**12)


def _wav(path: Path, rate: int, seconds: float, freq: float = 440.0) -> Path:
    n = int(rate * seconds)
    t = torch.arange(n) / rate
    pcm = (torch.sin(2 * math.pi * freq * t) * 12000).to(torch.int16)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.numpy().tobytes())
    return path


def test_media_files_that_would_decode_to_too_much_are_data_errors(tmp_path):
    from PIL import Image

    from mimo_spec.data.preprocess import read_wav

    from mimo_spec.data.media import MediaProcessor

    model = build_model(compose_config(["modality=[vision_clip,audio_whisper]", *TINY]))
    media = MediaProcessor(model, audio_overflow="truncate")  # one window per file, whatever its length
    # a header declaring 1 Hz: refused at once, naming the file
    one_hz = _wav(tmp_path / "one_hz.wav", 16000, 0.5)
    raw = bytearray(one_hz.read_bytes())
    raw[24:28] = (1).to_bytes(4, "little")  # sample rate
    raw[28:32] = (2).to_bytes(4, "little")  # byte rate
    one_hz.write_bytes(bytes(raw))
    t0 = time.perf_counter()
    with pytest.raises(DataError) as e:
        media.audio(one_hz, "sample 3")
    assert e.value.problems[0].path == "sample 3" and "declares a sample rate of 1 Hz" in str(e.value)
    assert e.value.kind == "data" and time.perf_counter() - t0 < 2

    # a long file: only what the features use is decoded, and the features are those of its start
    frames = max(f for _, f in media.audio_encoders.values())
    window = frames * 160 / 16000
    long = _wav(tmp_path / "long.wav", 16000, 3 * window + 1)
    short = _wav(tmp_path / "short.wav", 16000, window + 0.01)
    x, _ = read_wav(long, max_seconds=window)
    assert x.numel() <= frames * 160 + 2
    a, b = media.audio(long), media.audio(short)
    assert all(torch.equal(a[k]["input_features"], b[k]["input_features"]) for k in a)
    # 8 kHz: only the start is decoded and resampled
    slow = media.audio(_wav(tmp_path / "slow.wav", 8000, 3 * window + 1))
    assert all(v["input_features"].isfinite().all() for v in slow.values())

    # an image whose padded square would take terabytes: refused before the canvas is made
    thin = tmp_path / "thin.png"
    Image.new("RGB", (1_000_000, 1), (200, 10, 10)).save(thin)
    with pytest.raises(DataError) as e:
        media.image(thin, "sample 7")
    assert e.value.problems[0].path == "sample 7" and "thin.png" in str(e.value) and "needs at least" in str(e.value)


def test_weights_finite_checks_every_weight_in_one_read():
    """The save-time check (one flag per weight, one read back) finds a single inf or nan in any weight."""
    from mimo_spec.train.loop import _weights_finite

    model = build_model(compose_config(TINY), seed=0)
    assert _weights_finite(model)
    names = [n for n, p in model.named_parameters()]
    for name, bad in ((names[0], float("nan")), (names[-1], float("inf"))):
        p = dict(model.named_parameters())[name]
        with torch.no_grad():
            keep = p.view(-1)[0].clone()
            p.view(-1)[0] = bad
            assert not _weights_finite(model), name
            p.view(-1)[0] = keep
    assert _weights_finite(model)
