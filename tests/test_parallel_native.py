"""A native-resolution model (preset=qwen2_vl_tiny: images of different sizes and videos through one tower,
M-RoPE) under 2 ranks (gloo, CPU), one torchrun: DDP, FSDP, TP, pp2 (with DeepStack too), split and bridged
train as one process does, with ranks whose share of a batch has no image or no video; DeepStack past the
first pipeline stage is refused by name (4 ranks and the other refusals: tests/test_parallel_native_split.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from parallel_worker import NATIVE_LAYOUTS, native_config  # noqa: E402
from test_parallel_native_split import assert_trains_alike  # noqa: E402
from ranks import run_ranks  # noqa: E402
from test_parallel_run import RTOL, losses  # noqa: E402

from conftest import ROOT  # noqa: E402


def test_native_resolution_model_under_ddp_fsdp_tp_equals_one_process(tmp_path):
    from mimo_spec.train.loop import train

    # split on 4 ranks and the refusals: test_parallel_native_split.py
    scenarios = ("native:ddp,native:fsdp,native:tp2,native:pp2,native:pp2_deep,native_deep_late,"
                 "native_split:split2,native_split:bridged")
    r = run_ranks(2, ROOT / "tests" / "parallel_worker.py", tmp_path, scenarios, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    train(native_config("single"), tmp_path / "single")
    single = losses(tmp_path / "single")
    assert len(single) == 3
    for layout in ("ddp", "fsdp", "tp2"):
        assert losses(tmp_path / f"native_{layout}") == pytest.approx(single, rel=RTOL), layout
    # encoders on their own rank (split2) and both modalities bridged: losses, eval loss, gradient norms and
    # every tensor's movement as one process's
    for case in ("split2", "bridged"):
        assert_trains_alike(tmp_path / f"native_split_{case}", tmp_path / "single")
    # pipeline stages: items packed per sample by their patch rows, M-RoPE positions on every stage
    train(native_config("single", NATIVE_LAYOUTS["single_untied"]), tmp_path / "single_untied")
    assert losses(tmp_path / "native_pp2") == pytest.approx(losses(tmp_path / "single_untied"), rel=RTOL)
    # DeepStack on the first stage's layers; past them, refused naming the key
    train(native_config("single", NATIVE_LAYOUTS["single_deep"]), tmp_path / "single_deep")
    deep = losses(tmp_path / "single_deep")
    assert deep != losses(tmp_path / "single_untied")  # the DeepStack features change the model
    assert losses(tmp_path / "native_pp2_deep") == pytest.approx(deep, rel=RTOL)
    for rank in (0, 1):
        message = (tmp_path / f"native_deep_late_rank{rank}.txt").read_text()
        assert "modalities.images.params.deepstack_lm_layers" in message and "past the first pipeline stage" in message
