"""A native-resolution model (preset=qwen2_vl_tiny: images of different sizes, and videos through the images'
tower by inputs_from, M-RoPE) under the layouts that move embeddings between ranks (gloo, CPU): encoders on
their own ranks (split: chunks of items of different sizes sent with their token counts) and modalities
bridged across data-parallel layouts (chunks all-gathered, padded to the largest and trimmed) train as one
process does; what they cannot carry (DeepStack, a modality away from the encoders it runs through) is
refused by name."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from parallel_worker import NATIVE_SPLIT, native_config  # noqa: E402
from ranks import run_ranks  # noqa: E402
from test_parallel_run import RTOL, assert_same_weights  # noqa: E402

from conftest import ROOT  # noqa: E402


def _metrics(run_dir: Path) -> tuple[list[float], list[float]]:
    """(the loss of every step and the final eval loss, the gradient norm of every step)."""
    import csv

    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return [float(r["loss"]) for r in rows] + [float(rows[-1]["eval_loss"])], [float(r["grad_norm"]) for r in rows]


def _moves(run_dir: Path) -> dict:
    """How far each tensor moved from the seed-0 start in the run's last checkpoint (SGD: its gradient sums)."""
    from mimo_spec.builders import build_model
    from mimo_spec.train.checkpoint import list_checkpoints, load_checkpoint

    start = build_model(native_config("single"), seed=0).state_dict()
    model = build_model(native_config("single"), seed=0)
    load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1], model)
    return {k: v - start[k] for k, v in model.state_dict().items()}


def assert_trains_alike(run_dir: Path, single: Path) -> None:
    """Losses and eval loss within RTOL, gradient norms within 1e-4 (as tests/test_parallel_packing.py) and
    every tensor's move within WEIGHT_TOL of the single-process move's scale: M-RoPE positions missing on
    the language-model ranks move the weights by 2e-2 of that scale while the losses stay within 2e-6."""
    (got, got_norms), (ref, ref_norms) = _metrics(run_dir), _metrics(single)
    assert len(ref) == 4
    assert got == pytest.approx(ref, rel=RTOL), run_dir.name
    assert got_norms == pytest.approx(ref_norms, rel=1e-4), run_dir.name
    try:
        assert_same_weights(_moves(run_dir), _moves(single))
    except AssertionError as e:
        raise AssertionError(f"{run_dir.name}: {e}") from None


def _layout(case: str, world: int):
    from mimo_spec.builders import build_model
    from mimo_spec.parallel.layout import resolve
    from mimo_spec.run_config import RunConfig

    layout, extra = NATIVE_SPLIT[case]
    cfg = native_config(layout, extra)
    model = build_model(cfg, seed=0, device="meta")
    return resolve(RunConfig.from_config(cfg).parallel.layout, model, world), model


def test_split_and_bridged_layouts_place_the_modalities_as_intended():
    """What each 2-rank case (trained in tests/test_parallel_native.py's torchrun) exercises: split2 puts both
    modalities on rank 0; bridged gives both their own data-parallel layout (FSDP) next to the replicated LM."""
    split, model = _layout("split2", 2)
    assert not split.colocated and split.modules["videos"].ranks == split.modules["images"].ranks == range(0, 1)
    assert model.modalities["videos"].inputs_from == "images" and not model.modalities["videos"].encoders
    bridged, _ = _layout("bridged", 2)
    lm = bridged.modules["language"]
    for name in ("images", "videos"):
        assert (bridged.modules[name].dp_shard, lm.dp_replicate) == (2, 2), name


def test_split_over_four_ranks_chunks_items_and_slices_positions(tmp_path):
    """Encoders FSDP on ranks 0-1 (each encodes its chunk of the items, of different sizes), the LM FSDP on
    ranks 2-3 (each takes its samples' embeddings and M-RoPE positions out of the whole batch)."""
    from mimo_spec.train.loop import train

    layout, _ = _layout("split4", 4)
    assert layout.modules["images"].dp == layout.modules["videos"].dp == layout.modules["language"].dp == 2
    r = run_ranks(4, ROOT / "tests" / "parallel_worker.py", tmp_path, "native_split:split4", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    train(native_config("single"), tmp_path / "single")
    assert_trains_alike(tmp_path / "native_split_split4", tmp_path / "single")


def _check(layout, model, pp: int = 1):
    """ParallelContext's refusal for ``layout`` (no process group: the check reads the layout only)."""
    from mimo_spec.parallel.parallelize import ParallelContext

    ctx = object.__new__(ParallelContext)
    ctx.layout, ctx.pp = layout, pp
    ctx._check_items_of_any_size(model)


def test_split_layouts_refuse_what_they_cannot_carry_by_name():
    from mimo_spec.builders import build_model
    from mimo_spec.errors import ConfigError
    from mimo_spec.parallel.layout import resolve
    from mimo_spec.run_config import RunConfig

    for case, world in (("split2", 2), ("bridged", 2), ("split4", 4)):  # what the runs above carry is accepted
        _check(*_layout(case, world))
    # videos on ranks of their own: they would have no encoder to run through
    cfg = native_config("hetero_split", ["parallel.default.ranks.size=1", "parallel.modules.language.tp=1",
                                         "parallel.modules.language.ranks={offset: 2, size: 1}",
                                         "+parallel.modules.videos={ranks: {offset: 1, size: 1}}"])
    model = build_model(cfg, seed=0, device="meta")
    layout = resolve(RunConfig.from_config(cfg).parallel.layout, model, 3)
    with pytest.raises(ConfigError) as e:
        _check(layout, model)
    message = str(e.value)
    assert message.startswith("parallel.modules.videos:") and "inputs_from" in message, message
    assert "the encoders of 'images'" in message, message
    assert "ranks 0..0" in message and "ranks 1..1" in message, message

    # DeepStack (a modality feeding deeper LM layers, and one using its encoders) under split, bridged, pp
    images = SimpleNamespace(deepstack_projections=[object()], inputs_from=None)
    images.src = images
    videos = SimpleNamespace(deepstack_projections=None, inputs_from="images", src=images)
    for case, world, order in (("split2", 2, ("images", "videos")), ("bridged", 2, ("videos", "images"))):
        deep = SimpleNamespace(modalities={n: {"images": images, "videos": videos}[n] for n in order})
        with pytest.raises(ConfigError) as e:
            _check(_layout(case, world)[0], deep)
        assert f"modalities.{order[0]}" in str(e.value) and "deepstack_projections" in str(e.value), str(e.value)
        if order[0] == "videos":
            assert "through the encoders of 'images'" in str(e.value), str(e.value)
    cfg = native_config("pp2", ["model.params.tie_embeddings=false"])
    model = build_model(cfg, seed=0, device="meta")
    pp = resolve(RunConfig.from_config(cfg).parallel.layout, model, 2)
    # a pipeline adds DeepStack features on its first stage: they must feed that stage's layers (0 of 0..1)
    lm = SimpleNamespace(layers=[object(), object()])
    images.deepstack_lm_layers = [1]
    with pytest.raises(ConfigError, match=r"modalities.images.params.deepstack_lm_layers: .* after language-model "
                                          r"layers \[1\], past the first pipeline stage's layers 0..0"):
        _check(pp, SimpleNamespace(modalities={"images": images}, language_model=lm), pp=2)
    images.deepstack_lm_layers = [0]
    _check(pp, SimpleNamespace(modalities={"images": images}, language_model=lm), pp=2)
    _check(pp, model, pp=2)  # items of any size and inputs_from go through the pipeline
