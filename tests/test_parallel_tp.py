"""Tensor parallelism under torchrun (gloo, CPU), against single-process numbers: the vocab-parallel
loss (the LM head's logits stay sharded on the vocabulary, never gathered for the loss), TP with
tied embeddings (one vocab-sharded weight for the embedding and the head, saved and resumed through
DCP), ``action=generate`` under tp2 / fsdp / ddp giving the single-process tokens, and attention biases on
q and v only (Whisper's) sharded with their heads."""

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(Path(__file__).parent))
from parallel_worker import config  # noqa: E402
from ranks import run_ranks  # noqa: E402
from test_parallel_run import RTOL, assert_same_weights, losses  # noqa: E402
from tp_worker import TIED  # noqa: E402

WORKER = ROOT / "tests" / "tp_worker.py"


def eval_loss(run_dir: Path) -> float:
    with open(run_dir / "metrics.csv") as f:
        return float(list(csv.DictReader(f))[-1]["eval_loss"])


def final_weights(run_dir: Path, extra=()) -> dict[str, torch.Tensor]:
    """The last checkpoint's weights loaded in this (single) process, whatever layout wrote them."""
    from mimo_spec.builders import build_model
    from mimo_spec.train.checkpoint import list_checkpoints, load_checkpoint

    model = build_model(config("single", list(extra)), seed=0)
    load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1], model)
    return model.state_dict()


def generated(folder: Path) -> list[int]:
    return json.loads((folder / "generation.json").read_text())["tokens"]


def single_generation(out: Path, source: str) -> list[int]:
    """``action=generate`` in this process from ``out/source``'s checkpoint (the reference tokens)."""
    from mimo_spec.config import compose_config
    from mimo_spec.jobs import run_generate

    target = out / f"gen_single_{source}"
    target.mkdir()
    run_generate(compose_config(["action=generate", f"generate.checkpoint={out / source}",
                                 "generate.max_new_tokens=12", "generate.prompt=Describe the shape."]), target)
    return generated(target)


def check_loss(result: dict, sharded: bool) -> None:
    """One step's loss, gradients and (gathered) logits equal the unsharded model's; sharded logits
    never cross ranks whole (no all-gather; nothing larger than the hidden states is reduced)."""
    assert result["loss"] == pytest.approx(result["ref_loss"], rel=RTOL)
    assert result["grad_rel_diff"] < 1e-5 and result["logits_diff"] < 1e-5, result
    b_s_v = result["logits_shape"][0] * result["logits_shape"][1] * result["vocab"]
    if sharded:
        assert result["vocab_sharded"] and result["local_vocab"] == result["vocab"] // 2
        assert result["all_gathers"] == 0 and result["largest_all_reduce"] < b_s_v // 2, result
    else:  # loss_parallel: false gathers the full logits on every TP rank, as before
        assert not result["vocab_sharded"] and result["largest_all_gather"] == b_s_v


def test_two_ranks_vocab_parallel_loss_tied_embeddings_and_generation(tmp_path):
    """One torchrun (2 processes) for every check (one test, so pytest-xdist never starts it twice)."""
    from mimo_spec.train.loop import train

    out = tmp_path
    scenarios = ["loss:tp2", "loss:tp2:tied", "loss:tp2:gather",
                 "train:tp2:tied", "train:fsdp:tied", "resume:train_tp2_tied:tp2:tied", "train:tp2", "train:tp2:qknorm",
                 "generate:tp2:train_tp2", "generate:fsdp:train_tp2", "generate:ddp:train_tp2", "generate:pp2:train_tp2",
                 "generate:tp2:train_tp2_tied", "generate:fsdp:train_tp2_tied", "plugin", "qv_attention"]
    r = run_ranks(2, WORKER, out, ",".join(scenarios))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]

    # 1. the vocab-parallel loss: same loss and gradients (ignored labels, loss mask, packed documents)
    check_loss(json.loads((out / "loss_tp2.json").read_text()), sharded=True)
    check_loss(json.loads((out / "loss_tp2_tied.json").read_text()), sharded=True)
    check_loss(json.loads((out / "loss_tp2_gather.json").read_text()), sharded=False)

    # 2. tied embeddings under TP (and FSDP): 3 steps and the held-out loss as in one process; the
    # DCP checkpoint holds the one tied weight, loads in one process and resumes under TP
    train(config("single", [TIED]), out / "single_tied")
    train(config("single", [TIED, "train.steps=4"]), out / "single_tied4")
    ref_weights = final_weights(out / "single_tied", [TIED])
    assert "language_model.lm_head.weight" not in ref_weights
    for run in ("train_tp2_tied", "train_fsdp_tied"):
        assert losses(out / run) == pytest.approx(losses(out / "single_tied"), rel=RTOL), run
        assert eval_loss(out / run) == pytest.approx(eval_loss(out / "single_tied"), rel=RTOL), run
        assert_same_weights(final_weights(out / run, [TIED]), ref_weights)
    resumed = out / "resume_train_tp2_tied_tp2"
    assert losses(resumed)[-1] == pytest.approx(losses(out / "single_tied4")[-1], rel=RTOL)
    assert_same_weights(final_weights(resumed, [TIED]), final_weights(out / "single_tied4", [TIED]))

    # per-head q/k RMSNorms (Qwen3's, one weight shared by the heads): their gradients summed over the TP ranks,
    # so the weights are one process's (each rank kept its heads' share alone: off by 7e-3 after 3 steps)
    from tp_worker import QK_NORM

    train(config("single", [QK_NORM]), out / "single_qknorm")
    ref_weights = final_weights(out / "single_qknorm", [QK_NORM])
    assert any(k.endswith("attn.q_norm.weight") for k in ref_weights)
    assert losses(out / "train_tp2_qknorm") == pytest.approx(losses(out / "single_qknorm"), rel=RTOL)
    assert_same_weights(final_weights(out / "train_tp2_qknorm", [QK_NORM]), ref_weights)

    # 3. generation under parallel layouts: the single-process tokens, and only rank 0 writes
    for source, layouts in (("train_tp2", ("tp2", "fsdp", "ddp", "pp2")), ("train_tp2_tied", ("tp2", "fsdp"))):
        ref = single_generation(out, source)
        assert len(ref) == 12 and (source == "train_tp2_tied" or len(set(ref)) > 1)  # a telling sequence
        for layout in layouts:
            folder = out / f"gen_{layout}_{source}"
            assert generated(folder / "rank0") == ref, (source, layout)
            assert not any((folder / "rank1").iterdir()), (source, layout)

    # 4. TP plans live in a registry keyed by class: a plugin's own module class (and its subclass, by
    # inheritance) registered there is sharded (column- then row-wise) with the unsharded numbers
    plugin = json.loads((out / "plugin.json").read_text())
    assert plugin["subclass_plan"] and plugin["out_diff"] < 1e-6 and plugin["grad_diff"] < 1e-5, plugin
    for part in ("0", "1"):
        assert plugin["placements"][f"{part}.up.weight"] == "(Shard(dim=0),)", plugin
        assert plugin["placements"][f"{part}.down.weight"] == "(Shard(dim=1),)", plugin
        assert plugin["local_rows"][f"{part}.up.weight"] == 8  # 16 rows over 2 ranks

    # 5. an attention with q and v biases only (Whisper's, qkv_bias "qv"): the biases are sharded with their
    # heads (q: 4 heads of 8 -> 16 rows a rank, v: 2 kv heads -> 8), the unsharded numbers
    qv = json.loads((out / "qv_attention.json").read_text())
    assert qv["out_diff"] < 1e-5 and qv["grad_diff"] < 1e-5, qv
    for part in ("0", "1"):
        assert qv["placements"][f"{part}.q_bias"] == qv["placements"][f"{part}.v_bias"] == "(Shard(dim=0),)", qv
        assert (qv["local_rows"][f"{part}.q_bias"], qv["local_rows"][f"{part}.v_bias"]) == (16, 8), qv
    # and per-head q/k LayerNorm weights (Chameleon's, (heads, head_dim)) go with their heads: 2 q heads, 1 kv head
    rows = {k: qv["local_rows"][f"2.attn.{k}"] for k in ("q_norm_weight", "q_norm_bias", "k_norm_weight", "k_norm_bias")}
    assert rows == {"q_norm_weight": 2, "q_norm_bias": 2, "k_norm_weight": 1, "k_norm_bias": 1}, qv
    assert qv["placements"]["2.attn.q_norm_weight"] == qv["placements"]["2.attn.k_norm_bias"] == "(Shard(dim=0),)", qv


def test_four_ranks_tied_embeddings_under_tp_and_fsdp(tmp_path):
    """2-D mesh: TP 2 x FSDP 2 with tied embeddings (the embedding is vocab-sharded over TP and
    sharded again by FSDP, the head reads it through the language model's FSDP unit); generation
    under pp2 x dp2 from a TP 2 x FSDP 2 checkpoint; per-head q/k norms under TP 2 x FSDP 2 equal one process."""
    from mimo_spec.train.loop import train

    # and generation under pp2 on 4 ranks (the model replicated on every rank)
    r = run_ranks(4, WORKER, tmp_path,
                  "train:tp2_fsdp:tied,train:tp2_fsdp,generate:pp2:train_tp2_fsdp,train:tp2_fsdp:qknorm")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    ref = single_generation(tmp_path, "train_tp2_fsdp")
    assert len(ref) == 12 and len(set(ref)) > 1
    assert generated(tmp_path / "gen_pp2_train_tp2_fsdp" / "rank0") == ref
    assert not any(any((tmp_path / "gen_pp2_train_tp2_fsdp" / f"rank{r}").iterdir()) for r in (1, 2, 3))
    train(config("single", [TIED]), tmp_path / "single_tied")
    assert losses(tmp_path / "train_tp2_fsdp_tied") == pytest.approx(losses(tmp_path / "single_tied"), rel=RTOL)
    assert_same_weights(final_weights(tmp_path / "train_tp2_fsdp_tied", [TIED]),
                        final_weights(tmp_path / "single_tied", [TIED]))
    # per-head q/k RMSNorms under TP 2 x FSDP 2: their FSDP shards' gradients summed over the TP peers
    from tp_worker import QK_NORM

    train(config("single", [QK_NORM]), tmp_path / "single_qknorm")
    assert losses(tmp_path / "train_tp2_fsdp_qknorm") == pytest.approx(losses(tmp_path / "single_qknorm"), rel=RTOL)
    assert_same_weights(final_weights(tmp_path / "train_tp2_fsdp_qknorm", [QK_NORM]),
                        final_weights(tmp_path / "single_qknorm", [QK_NORM]))


def test_loss_parallel_key_and_tied_embeddings_in_layouts():
    """``loss_parallel`` is validated like every layout key; tied embeddings are no longer refused under TP."""
    from omegaconf import OmegaConf

    from mimo_spec.builders import build_model
    from mimo_spec.errors import ConfigError
    from mimo_spec.parallel.layout import resolve

    cfg = config("tp2", ["+parallel.default.loss_parallel=maybe"])
    model = build_model(config("single", [TIED]), device="meta")
    with pytest.raises(ConfigError) as e:
        resolve(OmegaConf.to_container(cfg.parallel), model, 2)
    (problem,) = e.value.problems
    assert problem.path == "parallel.default.loss_parallel" and "expected true or false" in problem.message
    layout = resolve(OmegaConf.to_container(config("tp2", ["+parallel.default.loss_parallel=false"]).parallel),
                     model, 2)
    assert layout.modules["language"].loss_parallel is False and layout.modules["language"].tp == 2  # tied: fine


@pytest.mark.parametrize("layout, world", [("pp2", 2), ("hetero_split", 4), ("tp2", 2)])
def test_generation_replicates_the_model_under_pipeline_and_split_layouts(monkeypatch, capsys, layout, world):
    """Pipeline stages and split layouts hold no whole model on a rank: generation replicates it instead."""
    from omegaconf import OmegaConf

    from mimo_spec.builders import build_model
    from mimo_spec.generation import generation_layout

    model = build_model(config("single"), device="meta")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    chosen = generation_layout(OmegaConf.to_container(config(layout).parallel, resolve=True), model)
    if layout == "tp2":
        assert chosen["name"] == "tp2" and not capsys.readouterr().err
    else:
        assert chosen["default"] == {"dp_replicate": -1}
        assert f"layout {layout} splits the model over ranks" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()
