"""LoRA / DoRA adapters under torchrun (gloo, CPU): 3 steps under DDP, FSDP, TP 2 (adapter A/B sharded along
their base layers), the pipeline (pp2) and the split layout (images and LM on their own ranks), each with
packing and activation checkpointing, equal one process: the same losses, and the same adapter (and
projector) weights loaded from the adapter-only DCP checkpoints."""

import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(Path(__file__).parent))
from peft_worker import peft_config  # noqa: E402
from ranks import run_ranks  # noqa: E402
from test_parallel_run import RTOL, assert_same_weights, losses  # noqa: E402

WORKER = ROOT / "tests" / "peft_worker.py"


def trained(run_dir: Path) -> dict[str, torch.Tensor]:
    """The last checkpoint's tensors (adapters and projector only) loaded in one process."""
    from mimo_spec.builders import build_model
    from mimo_spec.peft import base_loaded, trainable_keys
    from mimo_spec.train.checkpoint import list_checkpoints, load_checkpoint

    model = build_model(peft_config("single", True), seed=0)
    base_loaded(model)
    load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1], model)
    sd = model.state_dict()
    return {k: sd[k] for k in trainable_keys(model)}


def test_adapters_train_under_parallel_layouts_like_one_process(tmp_path):
    from mimo_spec.train.loop import train

    scenarios = ["ddp", "fsdp", "tp2", "pp2"]  # every one with packing and activation checkpointing
    r = run_ranks(2, WORKER, tmp_path, ",".join(f"{sc}:packed_ac" for sc in scenarios))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    train(peft_config("single", True), tmp_path / "single")
    ref_losses, ref_weights = losses(tmp_path / "single"), trained(tmp_path / "single")
    assert any(k.endswith("adapter.lora_B_q") for k in ref_weights) and any(k.endswith("adapter.magnitude_up")
                                                                            for k in ref_weights)
    assert all(".adapter." in k or ".input_projections." in k for k in ref_weights)
    assert any(float(v.abs().max()) > 0 for k, v in ref_weights.items() if "lora_B" in k)  # the adapters trained
    for sc in scenarios:
        run = tmp_path / f"{sc}_packed_ac"
        assert losses(run) == pytest.approx(ref_losses, rel=RTOL), sc
        assert_same_weights(trained(run), ref_weights)
