"""Expert parallelism (``ep``) under torchrun (gloo, CPU): a mixture-of-experts LM trained 3 steps with its
experts split over ranks equals one process; its distributed checkpoints load in one process and under
other layouts; ``action=layout`` draws the EP groups; bad ``ep`` values are config errors naming both paths."""

import pickle
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(Path(__file__).parent))
from parallel_worker import MOE, config  # noqa: E402
from ranks import run_ranks  # noqa: E402
from test_parallel_run import RTOL, assert_same_weights, losses  # noqa: E402


def moe_weights(run_dir: Path) -> dict:
    """The last checkpoint's weights, loaded into the one-process MoE model."""
    from mimo_spec.builders import build_model
    from mimo_spec.train.checkpoint import list_checkpoints, load_checkpoint

    model = build_model(config("single", MOE), seed=0)
    load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1], model)
    return model.state_dict()


def test_expert_parallel_matches_single_process_and_reshards(tmp_path):
    """2 ranks: the all-to-all dispatch against the local one (also with ranks receiving no row); DDP + EP 2,
    then one more step from its checkpoint under FSDP (ep 1). 4 ranks: FSDP 4 x EP 2 (experts FSDP over the 2
    ranks holding the same experts), DDP 4 x EP 2 (their gradients summed over those 2), the split layout
    (encoders FSDP on ranks 0-1, the LM on ranks 2-3 with EP 2), TP 2 x FSDP 2 with and without EP 2 (the
    experts split over the data-parallel ranks; the shared expert TP-sharded), and the 2-rank EP checkpoint
    resumed under FSDP 4 x EP 2. The router's load-balancing and z losses count (weights > 0): each rank's share
    of them is the whole batch's (expert.GlobalRouterStats), also when a rank's share counts no token (prompts
    only: moe_prompt_share, EP 2 and DDP against one process)."""
    from mimo_spec.train.loop import train

    r = run_ranks(2, ROOT / "tests" / "parallel_worker.py", tmp_path,
                  "moe_dispatch,moe_prompt_share:ep2,moe_prompt_share:ddp,moe:ep2,moe_resume:ep2:fsdp")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    r = run_ranks(4, ROOT / "tests" / "parallel_worker.py", tmp_path,
                 "moe:fsdp_ep2,moe:ep2_dp4,moe:split_ep,moe:tp2_fsdp_ep2,moe:tp2_fsdp,moe_resume:ep2:fsdp_ep2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    train(config("single", MOE), tmp_path / "single")
    train(config("single", [*MOE, "train.steps=4"]), tmp_path / "single4")

    ref, ref_weights = losses(tmp_path / "single"), moe_weights(tmp_path / "single")
    assert any(".experts.gate_up" in k for k in ref_weights)
    for layout in ("ep2", "fsdp_ep2", "ep2_dp4", "split_ep", "tp2_fsdp_ep2", "tp2_fsdp"):
        assert losses(tmp_path / f"moe_{layout}") == pytest.approx(ref, rel=RTOL), layout
        assert_same_weights(moe_weights(tmp_path / f"moe_{layout}"), ref_weights)  # a DCP checkpoint, one process
    # each rank saved its own experts: the expert weights' chunks are the two halves of the experts
    # (EP 2; also beside TP 2, whose ranks hold the same experts); under FSDP 4 x EP 2 each rank one expert (its
    # EP half, FSDP-sharded over the 2 ranks holding it)
    for layout, want in (("ep2", [(0, 2), (2, 2)]), ("fsdp_ep2", [(0, 1), (1, 1), (2, 1), (3, 1)]),
                         ("tp2_fsdp_ep2", [(0, 2), (2, 2)])):
        meta = pickle.loads((tmp_path / f"moe_{layout}" / "checkpoints" / "step_000003" / ".metadata").read_bytes())
        chunks = meta.state_dict_metadata["model.language_model.layers.0.mlp.experts.gate_up"].chunks
        assert sorted((c.offsets[0], c.sizes[0]) for c in chunks) == want, layout
    # the EP checkpoint (experts sharded over 2 ranks) resumes under FSDP without EP and under FSDP 4 x EP 2
    next_loss = losses(tmp_path / "single4")[-1]
    for target in ("fsdp", "fsdp_ep2"):
        assert losses(tmp_path / f"moe_resume_ep2_{target}")[-1] == pytest.approx(next_loss, rel=RTOL), target
    assert_same_weights(moe_weights(tmp_path / "moe_resume_ep2_fsdp_ep2"), moe_weights(tmp_path / "single4"))


@pytest.fixture(scope="module")
def moe_meta():
    from mimo_spec import build_model

    return build_model(config("single", MOE), device="meta")


def _problems(parallel, model, world):
    from mimo_spec.errors import ConfigError
    from mimo_spec.parallel.layout import resolve

    with pytest.raises(ConfigError) as e:
        resolve(parallel, model, world)
    return {p.path: str(p) for p in e.value.problems}


def test_ep_layouts_and_errors(moe_meta, cli):
    from mimo_spec import build_model
    from mimo_spec.parallel.expert import ep_groups
    from mimo_spec.parallel.layout import render_rank_map, resolve

    layout = resolve({"default": {"dp_shard": 4}, "modules": {"language": {"ep": 2}}}, moe_meta, 4)
    lm = layout.modules["language"]
    assert lm.ep == 2 and ep_groups(lm) == [[0, 1], [2, 3]]
    assert layout.modules["images"].ep == 1
    assert "EP groups [0,1] [2,3]" in render_rank_map(layout)
    # ep not dividing the experts: both paths named
    p = _problems({"default": {"dp_shard": 3}, "modules": {"language": {"ep": 3}}}, moe_meta, 3)
    assert "model.params.num_experts" in p["parallel.modules.language.ep"] and "4 experts" in p[
        "parallel.modules.language.ep"]
    # ep not dividing the data-parallel degree
    p = _problems({"default": {"dp_shard": 2}, "modules": {"language": {"ep": 4}}}, moe_meta, 2)
    assert "dp_replicate x dp_shard" in p["parallel.modules.language.ep"]
    # ep on a module without MoE layers (the images' encoder; the dense LM)
    p = _problems({"default": {"dp_shard": 2, "ep": 2}}, moe_meta, 2)
    assert set(p) == {"parallel.default.ep"} and "modalities.images.params.num_experts" in p["parallel.default.ep"]
    dense = build_model(config("single"), device="meta")
    p = _problems({"default": {"dp_shard": 2}, "modules": {"language": {"ep": 2}}}, dense, 2)
    assert "model.params.num_experts" in p["parallel.modules.language.ep"]
    # ep beside tp: EP groups of the ranks with the same TP index; beside pp: refused with the other key's path
    layout = resolve({"default": {"dp_shard": 2, "tp": 2}, "modules": {"language": {"ep": 2}}}, moe_meta, 4)
    assert ep_groups(layout.modules["language"]) == [[0, 2], [1, 3]]
    p = _problems({"default": {"dp_shard": 2, "pp": 2}, "modules": {"language": {"ep": 2}}}, moe_meta, 4)
    assert "parallel.default.pp" in p["parallel.modules.language.ep"]
    # action=layout draws the EP groups of the shipped example
    r = cli("action=layout", "parallel=fsdp_ep2", "world_size=4", *MOE)
    assert r.returncode == 0, r.stderr
    assert "language: ranks 0-3" in r.stdout and "ep=2" in r.stdout and "EP groups [0,1] [2,3]" in r.stdout
    assert "pp0 dpr0 dps3 tp0 ep1" in r.stdout and "FSDP-sharded over the 2 ranks" in r.stdout
