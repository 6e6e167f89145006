"""Shipped layouts under torchrun (gloo, CPU): 3 optimizer steps equal the single-process run,
distributed checkpoints resume under another layout (and in one process), a failing rank ends the job."""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from ranks import run_ranks

sys.path.insert(0, str(Path(__file__).parent))
from parallel_worker import MIXED, config  # noqa: E402

RTOL = 1e-5
# Weights after 3 AdamW steps: Adam's normalised update turns reduction-order noise in near-zero
# gradients into differences of ~1e-5 of a tensor's scale (3.04e-5 seen once, on an encoder bias
# that only some ranks' shares train); 1e-4 still catches any real mistake (a wrong shard or a
# missing reduction is off by >1e-3).
WEIGHT_TOL = 1e-4


def torchrun(nproc, *args, timeout=300, cwd=None):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "HYDRA_FULL_ERROR")}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The last checkpoint's weights, loaded in this (single) process whatever layout wrote them."""
    from mimo_spec.builders import build_model
    from mimo_spec.train.checkpoint import list_checkpoints, load_checkpoint

    model = build_model(config("single"), seed=0)
    load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1], model)
    return model.state_dict()


def assert_same_weights(got, ref):
    assert got.keys() == ref.keys()
    for k in ref:
        scale = ref[k].abs().max().clamp(min=1e-6)
        diff = float((got[k] - ref[k]).abs().max() / scale)
        assert diff <= WEIGHT_TOL, f"{k}: max difference {diff:.2e} of the tensor's scale"


def test_two_rank_layouts_match_single_process_and_checkpoints_reshard(tmp_path):
    """One torchrun (2 processes) trains every 2-rank layout for 3 steps and resumes across layouts
    (one test, so pytest-xdist never starts that group twice); then the single-process references."""
    from mimo_spec.train.loop import train

    out = tmp_path
    layouts = ["ddp", "fsdp", "tp2", "tp2_fsdp", "hetero_colocated", "fsdp_ac", "pp2", "pp2_gpipe", "split2"]
    mixed = ["ddp", "fsdp", "pp2"]
    scenarios = ",".join(layouts + ["resume:tp2:fsdp", "resume:fsdp:tp2", "resume:tp2:pp2", "resume:pp2:fsdp"]
                         + [f"mixed:{layout}" for layout in mixed])
    r = run_ranks(2, ROOT / "tests" / "parallel_worker.py", out, scenarios)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    train(config("single"), out / "single")
    train(config("single", ["train.steps=4"]), out / "single4")
    train(config("single", ["train.steps=4", f"train.resume={out / 'tp2'}"]), out / "single_from_tp2")

    ref, ref_weights = losses(out / "single"), final_weights(out / "single")
    for layout in layouts:  # 3 optimizer steps: same losses and weights as one process
        assert losses(out / layout) == pytest.approx(ref, rel=RTOL), layout
        assert_same_weights(final_weights(out / layout), ref_weights)
        files = sorted(p.name for p in (out / layout / "checkpoints" / "step_000003").iterdir())
        assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(files), layout  # one shard file per rank
    # a checkpoint written under one layout resumes under another, and in one process, with the same next loss
    next_loss = losses(out / "single4")[-1]
    for source, target in [("tp2", "fsdp"), ("fsdp", "tp2"), ("tp2", "pp2"), ("pp2", "fsdp")]:
        assert losses(out / f"resume_{source}_{target}")[-1] == pytest.approx(next_loss, rel=RTOL), (source, target)
    assert losses(out / "single_from_tp2")[-1] == pytest.approx(next_loss, rel=RTOL)
    assert_same_weights(final_weights(out / "single_from_tp2"), final_weights(out / "single4"))

    # a rank whose share of a batch holds no image still runs the encoder (on no item) in step with
    # the rank that has images: the same losses and weights as one process
    assert empty_image_shares(config("single", MIXED)), "the mixed data no longer leaves a rank without images"
    train(config("single", MIXED), out / "single_mixed")
    for layout in mixed:
        assert losses(out / f"mixed_{layout}") == pytest.approx(losses(out / "single_mixed"), rel=RTOL), layout
        assert_same_weights(final_weights(out / f"mixed_{layout}"), final_weights(out / "single_mixed"))


def empty_image_shares(cfg, ranks: int = 2) -> list[int]:
    """The steps of ``cfg``'s run where the batch has images but some rank's share of it has none."""
    from mimo_spec.builders import build_model
    from mimo_spec.data import build_dataset
    from mimo_spec.data.loader import SampleOrder
    from mimo_spec.data.tokenizer import build_tokenizer

    model = build_model(cfg, device="meta")
    data = build_dataset(cfg.data, model, build_tokenizer(cfg.data, model), "train")
    order, size, steps = SampleOrder(len(data), int(cfg.train.seed)), int(cfg.train.batch_size), []
    for step in range(int(cfg.train.steps)):
        counts = [data[order[step * size + k]].get("num_items", {}).get("images", 0) for k in range(size)]
        shares = [sum(counts[r * size // ranks:(r + 1) * size // ranks]) for r in range(ranks)]
        if sum(shares) and 0 in shares:
            steps.append(step)
    return steps


def test_four_ranks_tp_with_data_parallel(tmp_path):
    """2-D meshes on 4 processes: TP 2 x FSDP 2, TP 2 x replicated DP 2, the heterogeneous colocated
    layout (LM TP 2 x FSDP 2, images FSDP 4: embeddings cross between the two data-parallel layouts)
    2 pipeline stages x 2 data-parallel replicas, and the split layout (images FSDP on ranks 0-1 feeding
    the LM, TP 2 on ranks 2-3)."""
    layouts = ("tp2_fsdp", "tp2", "hetero_colocated", "pp2", "hetero_split")
    mixed = ("pp2", "fsdp", "tp2_fsdp")  # 2 stages x 2 replicas (microbatches without images), FSDP over 4
    # ranks, TP 2 x FSDP 2 (a TP-sharded encoder on a share without images)
    r = run_ranks(4, ROOT / "tests" / "parallel_worker.py", tmp_path,
                 ",".join(list(layouts) + [f"mixed:{layout}" for layout in mixed]))
    assert r.returncode == 0, r.stderr[-6000:]
    from mimo_spec.train.loop import train

    train(config("single"), tmp_path / "single")
    for layout in layouts:
        assert losses(tmp_path / layout) == pytest.approx(losses(tmp_path / "single"), rel=RTOL)
        assert_same_weights(final_weights(tmp_path / layout), final_weights(tmp_path / "single"))
    assert empty_image_shares(config("single", MIXED), ranks=4)
    train(config("single", MIXED), tmp_path / "single_mixed")
    for layout in mixed:
        assert losses(tmp_path / f"mixed_{layout}") == pytest.approx(losses(tmp_path / "single_mixed"), rel=RTOL)
        assert_same_weights(final_weights(tmp_path / f"mixed_{layout}"), final_weights(tmp_path / "single_mixed"))


def test_a_failing_rank_ends_every_rank(tmp_path):
    t0 = time.monotonic()
    r = torchrun(2, ROOT / "tests" / "parallel_worker.py", tmp_path, "fail", timeout=200)
    assert r.returncode != 0
    # ended by torchrun once rank 1 fails, not by the collectives' 300 s timeout (45 s seen on a loaded machine,
    # most of it three interpreters importing torch)
    assert time.monotonic() - t0 < 150
    assert "rank 1 fails on purpose" in r.stderr


def test_cli_under_torchrun(tmp_path):
    r = torchrun(2, ROOT / "cli.py", "parallel=fsdp", "train.steps=2", "train.batch_size=4", "data.num_samples=32",
                 "data.eval_samples=4", "train.eval_batches=1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert len(losses(tmp_path / "run")) == 2
    assert (tmp_path / "run" / "checkpoints" / "step_000002" / ".metadata").exists()
    # action=eval shards the checkpoint by the command's layout and gives the one-process loss
    from conftest import run_cli

    r = run_cli(["action=eval", f"eval.checkpoint={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'eval1'}"],
                tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = json.loads((tmp_path / "eval1" / "eval.json").read_text())
    for layout in ("fsdp", "pp2"):
        # the CLI's own main as 2 ranks (tests/ranks.py: torchrun's environment without its start-up cost)
        r = run_ranks(2, ROOT / "cli.py", "action=eval", f"eval.checkpoint={tmp_path / 'run'}", f"parallel={layout}",
                      f"hydra.run.dir={tmp_path / ('eval_' + layout)}", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-4000:]
        got = json.loads((tmp_path / f"eval_{layout}" / "eval.json").read_text())
        assert got["layout"] == layout and got["eval_tokens"] == ref["eval_tokens"] > 0
        assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=RTOL), layout
        assert r.stdout.count("eval loss") == 1  # rank 0 reports
    r = torchrun(2, ROOT / "cli.py", "parallel=single", f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path)
    # every rank ends with the one-line config error (exit 2) before any process group starts
    assert r.returncode != 0 and "mimo-spec: config error" in r.stderr
    assert "parallel.default: degrees (all 1, product 1) do not match the span of 2 ranks" in r.stderr
    assert "exitcode  : 2" in r.stderr
