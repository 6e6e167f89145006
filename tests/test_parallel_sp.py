"""Ulysses sequence parallelism (``sp``) under torchrun (gloo, CPU): the language model's forward and backward
on sequence slices with all-to-all over heads equal one process (GQA, M-RoPE positions, packed documents, a
padding mask, a length sp does not divide); 3 training steps on hand-packed rows whose images straddle the
slice boundary under sp2 (2 ranks, the global batch) and FSDP 4 x SP 2 (4 ranks, each pair of SP ranks loading
its share), then the eval NLL of a whole batch and of a shorter one, give the single-process losses, gradient
norms and weights; ``action=layout`` draws the SP groups; bad ``sp`` values are config
errors naming both paths."""

import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(Path(__file__).parent))
from parallel_worker import PACK_LEN, config, packed_steps  # noqa: E402
from test_parallel_packing import _model, check_layouts, reference  # noqa: E402,F401  (a fixture)
from ranks import run_ranks  # noqa: E402


def _straddling_images(batches: list[dict], boundary: int) -> int:
    """How many images' placeholder runs cross position ``boundary`` (the slice boundary of sp2)."""
    image_token = _model().modalities["images"].special_token_id
    found = 0
    for batch in batches:
        ids = batch["input_ids"]
        found += int(((ids[:, boundary - 1] == image_token) & (ids[:, boundary] == image_token)).sum())
    return found


def test_sequence_parallel_matches_single_process(tmp_path, reference):  # noqa: F811
    def group(nproc, scenarios):
        r = run_ranks(nproc, ROOT / "tests" / "sp_worker.py", tmp_path, ",".join(scenarios))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]

    group(2, ["unit", "packed:sp2"])
    group(4, ["unit", "packed:fsdp_sp2"])  # unit: one SP group of 4 (8 heads, 4 kv heads)
    assert all((tmp_path / f"unit_rank{r}.ok").exists() for r in range(4))
    # an image's placeholders straddle the slice boundary: its embeddings reach both ranks' slices
    assert _straddling_images(packed_steps(_model()), PACK_LEN // 2) >= 1
    check_layouts(tmp_path, ["sp2"], 2, reference, {"sp2": [None, None]}, set())
    # 4 ranks: 2 data-parallel shares of 2 SP ranks each (both SP ranks load the same share)
    check_layouts(tmp_path, ["fsdp_sp2"], 4, reference, {"fsdp_sp2": [(0, 2), (0, 2), (2, 4), (2, 4)]}, set())


def _problems(parallel, model, world, train=None):
    from mimo_spec.errors import ConfigError
    from mimo_spec.parallel.layout import resolve

    with pytest.raises(ConfigError) as e:
        resolve(parallel, model, world, train=train)
    return {p.path: str(p) for p in e.value.problems}


def test_sp_layouts_and_errors(capsys):
    from mimo_spec import build_model
    from mimo_spec.parallel.layout import render_rank_map, resolve
    from mimo_spec.parallel.sequence import slice_bounds, sp_groups

    model = build_model(config("single"), device="meta")  # 4 heads, 2 kv heads
    layout = resolve({"default": {"dp_shard": -1}, "modules": {"language": {"sp": 2}}}, model, 4, train={"batch_size": 2})
    lm = layout.modules["language"]
    assert lm.sp == 2 and lm.shares == 2 and sp_groups(lm) == [[0, 1], [2, 3]]
    assert [lm.sp_index(r) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert "SP groups [0,1] [2,3]" in render_rank_map(layout)
    assert [slice_bounds(13, 4, i) for i in range(4)] == [(0, 4, 4), (4, 8, 4), (8, 12, 4), (12, 13, 4)]
    # sp not dividing the heads: both paths named (kv heads 2, sp 4)
    p = _problems({"default": {"dp_replicate": 4}, "modules": {"language": {"sp": 4}}}, model, 4)
    assert "model.params.num_kv_heads" in p["parallel.modules.language.sp"] and "2 key/value heads" in p[
        "parallel.modules.language.sp"]
    # sp not dividing the data-parallel ranks; beside tp, pp: refused naming the other key
    p = _problems({"default": {"dp_replicate": 3}, "modules": {"language": {"sp": 2}}}, model, 3)
    assert "dp_replicate x dp_shard" in p["parallel.modules.language.sp"]
    p = _problems({"default": {"dp_shard": 2, "tp": 2}, "modules": {"language": {"sp": 2}}}, model, 4)
    assert "parallel.default.tp" in p["parallel.modules.language.sp"]
    p = _problems({"default": {"dp_shard": 2, "pp": 2}, "modules": {"language": {"sp": 2}}}, model, 4)
    assert "parallel.default.pp" in p["parallel.modules.language.sp"]
    # on a modality (through the default); a batch that does not split over the shares; DPO; bridged images
    p = _problems({"default": {"dp_shard": 2, "sp": 2}}, model, 2)
    assert "parallel.modules.language" in p["parallel.default.sp"]
    p = _problems({"default": {"dp_shard": 4}, "modules": {"language": {"sp": 2}}}, model, 4, {"batch_size": 3})
    assert "2 data-parallel shares" in p["train.batch_size"]
    p = _problems({"default": {"dp_shard": 2}, "modules": {"language": {"sp": 2}}}, model, 2,
                  {"batch_size": 2, "objective": "dpo"})
    assert "dpo" in p["parallel.modules.language.sp"]
    p = _problems({"default": {"dp_replicate": 2}, "modules": {"language": {"sp": 2}, "images": {"dp_replicate": 1,
                                                                                               "dp_shard": 2}}},
                  model, 2)
    assert "parallel.modules.language.sp" in p["parallel.modules.images"]
    # action=layout draws the SP groups of the shipped example (the CLI's action, in this process)
    from mimo_spec.config import compose_config
    from mimo_spec.parallel.layout import run_layout_action

    assert run_layout_action(compose_config(["action=layout", "parallel=fsdp_sp2", "world_size=4"])) == 0
    out = capsys.readouterr().out
    assert "sp=2" in out and "SP groups [0,1] [2,3]" in out and "pp0 dpr0 dps3 tp0 sp1" in out
