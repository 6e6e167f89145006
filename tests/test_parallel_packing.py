"""Packed batches (rows of several samples kept apart by ``document_ids``) through the training step:
in one process the packed batch's loss and gradients equal those of the same samples unpacked (one per
row), and under every shipped layout (2 gloo processes) a few optimizer steps on packed batches give the
single-process losses, gradient norms, eval NLL and weights."""

import csv
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(Path(__file__).parent))
from parallel_worker import (PACK_LEN, PACK_LOOP, PACK_PAD, PACK_ROWS, config, pack_rows,  # noqa: E402
                             packed_samples, packed_train)
from ranks import run_ranks  # noqa: E402
from test_parallel_run import RTOL, assert_same_weights  # noqa: E402

# 2-rank cases: every shipped layout that runs on 2 processes, the split layout shrunk to 2 ranks
# (images on rank 0, the language model on rank 1), the other pipeline schedule, and bridged images
# (the LM replicated, images FSDP-sharded)
LAYOUTS = ["ddp", "fsdp", "tp2", "tp2_fsdp", "hetero_colocated", "pp2", "pp2_gpipe", "split2", "bridged"]
# the training loop with data.packing under the layouts packing changes most (pipeline, split, shares)
LOOP_LAYOUTS = ["pp2", "split2", "ddp"]


def _model():
    from mimo_spec.builders import build_model

    torch.manual_seed(0)
    return build_model(config("single"), seed=0)


def _grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _step(batch: dict, **drop) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of one training step (train/step.forward_backward, one process) on ``batch``."""
    from mimo_spec.train.step import forward_backward

    model = _model()
    batch = {k: v for k, v in batch.items() if k not in drop}
    loss = forward_backward(model, batch, int(batch["num_tokens"]), device="cpu")
    return loss, _grads(model)


def test_packed_batch_equals_unpacked_samples_in_one_process():
    """The rows' samples collated one per row (right-padded, no document ids) give the same loss and
    gradients as the packed rows: positions restart, attention stays inside each sample, no sample's
    first token is predicted from the one before it."""
    from mimo_spec.data.batch import collate, pad_batch

    torch.set_num_threads(1)
    packed, rows = pack_rows(packed_samples(_model(), 7, 40), PACK_ROWS, PACK_LEN)
    samples = [s for row in rows for s in row]
    assert len(samples) >= 2 * PACK_ROWS and all(len(row) >= 2 for row in rows)  # really packed
    assert sum(packed["items_per_sample"]["images"]) > 0
    unpacked = collate(samples, PACK_PAD)
    assert unpacked["num_tokens"] == packed["num_tokens"]
    assert int(packed["attention_mask"].sum()) == int(unpacked["attention_mask"].sum())

    loss_p, grads_p = _step(packed)
    loss_u, grads_u = _step(unpacked)
    assert loss_p == pytest.approx(loss_u, rel=RTOL)
    assert grads_p.keys() == grads_u.keys() and len(grads_p) > 10
    for k in grads_u:
        scale = grads_u[k].abs().max().clamp(min=1e-8)
        assert float((grads_p[k] - grads_u[k]).abs().max() / scale) < 1e-4, k

    # the same rows without their document ids are another computation (the check above can fail)
    loss_flat, _ = _step(packed, document_ids=True)
    assert abs(loss_flat - loss_u) > 1e-3 * abs(loss_u)

    # padded further (as step_tokens pads a rank's share to its global batch's length): each row's new
    # positions get a document of their own, and nothing changes
    longer = pad_batch(packed, PACK_LEN + 9, PACK_PAD)
    docs = longer["document_ids"]
    assert torch.equal(docs[:, PACK_LEN:], (packed["document_ids"].amax(1, keepdim=True) + 1).expand(-1, 9))
    assert torch.equal(longer["labels"][:, PACK_LEN:], torch.full((PACK_ROWS, 9), -100))
    assert _step(longer)[0] == pytest.approx(loss_u, rel=RTOL)


@pytest.fixture(scope="module")
def reference() -> dict:
    """The single-process run of the packed steps, and how far each tensor moved from the start."""
    ref = packed_train("single")
    assert min(ref["eval_tokens"]) > 0 and len(ref["losses"]) == 3
    ref["start"] = _model().state_dict()
    ref["moved"] = {k: v - ref["start"][k] for k, v in ref["weights"].items()}
    assert sum(bool(m.any()) for m in ref["moved"].values()) > 0.8 * len(ref["moved"])  # nearly every tensor trains
    return ref


def run_group(out: Path, nproc: int, scenarios: list[str]) -> None:
    """One torchrun of ``nproc`` processes running tests/parallel_worker.py's ``scenarios``."""
    r = run_ranks(nproc, ROOT / "tests" / "parallel_worker.py", out, ",".join(scenarios))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]


def check_layouts(out: Path, layouts: list[str], nproc: int, ref: dict, shares: dict, bridged: set) -> None:
    """The packed steps trained under each of ``layouts`` (scenarios ``packed:<layout>``) give the
    single-process losses, gradient norms, eval NLLs and weights. ``shares``: layout -> each rank's share
    of the rows (data-parallel ranks load their share, cut short and padded back by step_tokens; else
    None: the global batch, sliced by ParallelContext.local_batch); ``bridged``: layouts whose images
    are encoded under their own data-parallel layout."""
    for layout in layouts:
        ranks = [torch.load(out / f"packed_{layout}_rank{r}.pt") for r in range(nproc)]
        got = ranks[-1]  # (the losses are summed over ranks: every rank has them)
        assert [x["share"] for x in ranks] == shares.get(layout, [None] * nproc), layout  # what the case exercises
        assert got["bridges"] == (["images"] if layout in bridged else []), layout
        assert got["losses"] == pytest.approx(ref["losses"], rel=RTOL), layout
        assert got["norms"] == pytest.approx(ref["norms"], rel=1e-4), layout
        assert got["eval_nll"] == pytest.approx(ref["eval_nll"], rel=RTOL), layout
        weights = {}
        for held in ranks:  # a pipeline stage or split span holds part of the model
            for k, v in held["weights"].items():
                if k in weights:
                    assert torch.equal(weights[k], v), (layout, k)
                weights[k] = v
        try:
            assert_same_weights(weights, ref["weights"])
            # how far each tensor moved (SGD: the sums of its clipped gradients), to the scale of that move
            assert_same_weights({k: v - ref["start"][k] for k, v in weights.items()}, ref["moved"])
        except AssertionError as e:
            raise AssertionError(f"{layout}: {e}") from None


def test_packed_batches_train_alike_under_every_layout(tmp_path, reference):
    """2 processes: 3 steps of packed batches (in step 1 one share of the rows holds no image) under every
    layout that runs on 2 ranks, the 2-rank split layout, the other pipeline schedule and bridged images."""
    run_group(tmp_path, 2, [f"packed:{x}" for x in LAYOUTS] + [f"loop_packed:{x}" for x in LOOP_LAYOUTS])
    check_layouts(tmp_path, LAYOUTS, 2, reference, {"ddp": [(0, 2), (2, 4)], "fsdp": [(0, 2), (2, 4)]},
                  {"bridged", "hetero_colocated"})
    # the training loop itself on packed rows (data.packing: its planner, per-rank loading, step_tokens)
    from mimo_spec.train.loop import train

    train(config("single", PACK_LOOP), tmp_path / "loop_packed_single")
    ref = csv_rows(tmp_path / "loop_packed_single")
    assert all(float(r["padding_fraction"]) < 0.5 for r in ref)  # really packed (one sample per row: ~0.8)
    for layout in LOOP_LAYOUTS:
        got = csv_rows(tmp_path / f"loop_packed_{layout}")
        for key in ("loss", "grad_norm", "eval_loss"):
            assert [float(r[key] or 0) for r in got] == pytest.approx([float(r[key] or 0) for r in ref], rel=RTOL), \
                (layout, key)


def test_packed_batches_on_four_ranks(tmp_path, reference):
    """4 processes, where 2 cannot show it: 2 pipeline stages x 2 data-parallel shares (each pipeline runs
    its share's rows, cut short and padded back) and the shipped split layout (images FSDP on ranks 0-1,
    the LM TP on ranks 2-3, each encoder rank sending its chunk of the items to both LM ranks)."""
    run_group(tmp_path, 4, ["packed:pp2", "packed:hetero_split"])
    check_layouts(tmp_path, ["pp2", "hetero_split"], 4, reference, {"pp2": [(0, 2), (2, 4), (0, 2), (2, 4)]}, set())


def csv_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))
