"""Run by tests/test_parallel_run.py under torchrun: several layouts in one process group.

Usage: torchrun --nproc-per-node N tests/parallel_worker.py OUT_DIR SCENARIO[,SCENARIO...]
A scenario is ``<layout>`` (train 3 steps), ``fsdp_ac`` (fsdp with activation checkpointing), ``mixed:<layout>``
(3 steps on data where some rank's share of a batch has no image), ``resume:<from>:<layout>`` (one more step from
<from>'s checkpoint under <layout>), ``fail`` (rank 1 raises mid-run), ``packed:<case>`` (3 steps of
hand-packed rows through the training step; writes OUT_DIR/packed_<case>_rank<r>.pt) or ``loop_packed:<case>``
(the training loop with data.packing); a case is a layout or a name in PACK_VARIANTS. ``moe:<layout>`` and
``moe_resume:<from>:<layout>``: the same for the mixture-of-experts LM of MOE (tests/test_parallel_moe.py).
"""

import os
import sys
from pathlib import Path

import torch

from mimo_spec.config import compose_config
from mimo_spec.train.loop import train

COMMON = ["train.steps=3", "train.batch_size=4", "train.eval_every=0", "train.eval_batches=1",
          "train.checkpoint.every=0", "train.log_every=100", "data.num_samples=64", "data.eval_samples=4",
          "model.params.num_layers=2"]


# a mixture-of-experts LM: 4 SwiGLU experts, top-2, beside a shared expert (tests/test_parallel_moe.py)
MOE = ["++model.params.num_experts=4", "++model.params.num_experts_per_tok=2", "++model.params.moe_ffn_hidden_size=24",
       "++model.params.shared_expert_ffn_hidden_size=48", "++model.params.router_aux_loss_weight=0.05",
       "++model.params.router_z_loss_weight=0.01"]
# MoE scenarios beyond the shipped layouts: name -> (layout, overrides). split_ep: the encoders FSDP on ranks 0-1,
# the MoE LM on ranks 2-3 with its experts split over them (EP 2); ep2_dp4: ep2 on 4 ranks (DDP 4, EP 2: each
# expert on 2 ranks, its gradients summed over them)
MOE_VARIANTS = {"split_ep": ("hetero_split", ["parallel.modules.language.tp=1", "+parallel.modules.language.ep=2"]),
                "ep2_dp4": ("ep2", []),
                # TP 2 x FSDP 2 with the experts split over the 2 data-parallel ranks (each TP rank dispatches
                # its replicated tokens in its own EP group), and TP 2 x FSDP 2 with every expert on every rank
                "tp2_fsdp_ep2": ("tp2_fsdp", ["+parallel.modules.language.ep=2"]), "tp2_fsdp": ("tp2_fsdp", [])}

# 70% of the samples text-only: some rank's share of a batch holds no image (steps 1 and 2)
MIXED = ["data.text_only_fraction=0.7"]


def config(layout: str, extra=()):
    return compose_config([f"parallel={layout}", *COMMON, *extra])


def main() -> None:
    out, scenarios = Path(sys.argv[1]), sys.argv[2].split(",")
    torch.set_num_threads(1)
    for sc in scenarios:
        if sc == "fail":
            if int(os.environ["RANK"]) == 1:
                raise RuntimeError("rank 1 fails on purpose")
            train(config("ddp", ["train.steps=50"]), out / "fail")
        elif sc.startswith("resume:"):
            _, source, layout = sc.split(":")
            train(config(layout, ["train.steps=4", f"train.resume={out / source}"]), out / f"resume_{source}_{layout}")
        elif sc == "split2":  # images on rank 0, the language model on rank 1
            train(config("hetero_split", ["parallel.default.ranks.size=1", "parallel.modules.language.tp=1",
                                          "parallel.modules.language.ranks={offset: 1, size: 1}"]), out / sc)
        elif sc.startswith("mixed:"):  # ranks whose share has no image still run the encoder (on none)
            layout = sc.split(":")[1]
            train(config(layout, MIXED), out / f"mixed_{layout}")
        elif sc == "pp2_gpipe":  # the other pipeline schedule
            train(config("pp2", ["parallel.default.pp_schedule=gpipe"]), out / sc)
        elif sc == "fsdp_ac":  # activation checkpointing of every 2nd block, under FSDP
            train(config("fsdp", ["+parallel.default.activation_checkpoint={mode: every, every: 2}"]), out / sc)
        elif sc.startswith("data:"):  # real files, packed, 2 DataLoader workers per rank (test_parallel_data.py)
            _, layout, mode = sc.split(":")
            extra = {"full": [], "stop": ["train.stop_after_steps=2"], "resume": []}[mode]
            train(data_config(layout, out, extra), out / f"data_{layout}_{'full' if mode == 'full' else 'split'}")
        elif sc.startswith("loop_packed:"):  # the training loop on packed rows (data.packing) of synthetic samples
            name = sc.split(":")[1]
            layout, extra = PACK_VARIANTS.get(name, (name, []))
            train(config(layout, PACK_LOOP + extra), out / f"loop_packed_{name}")
        elif sc.startswith("native:"):  # a Qwen2-VL-shaped model: images of different sizes and videos
            case = sc.split(":")[1]
            layout = case.split("_")[0]
            train(native_config(layout, NATIVE_LAYOUTS.get(case, [])), out / f"native_{case}")
        elif sc == "native_deep_late":  # DeepStack past the first pipeline stage: refused by name
            from mimo_spec.errors import ConfigError

            try:
                train(native_config("pp2", [*DEEP, "modalities.images.params.deepstack_lm_layers=[1]"]), out / sc)
            except ConfigError as e:
                (out / f"{sc}_rank{os.environ['RANK']}.txt").write_text(str(e))
        elif sc.startswith("native_split:"):  # the same model under split / bridged layouts (NATIVE_SPLIT)
            name = sc.split(":")[1]
            layout, extra = NATIVE_SPLIT[name]
            train(native_config(layout, extra), out / f"native_split_{name}")
        elif sc.startswith("moe:"):  # a mixture-of-experts LM (MOE) under a layout, e.g. expert parallel
            name = sc.split(":")[1]
            layout, extra = MOE_VARIANTS.get(name, (name, []))
            train(config(layout, [*MOE, *extra]), out / f"moe_{name}")
        elif sc.startswith("moe_resume:"):  # one more step of the MoE LM from <from>'s checkpoint under <layout>
            _, source, layout = sc.split(":")
            train(config(layout, [*MOE, "train.steps=4", f"train.resume={out / ('moe_' + source)}"]),
                  out / f"moe_resume_{source}_{layout}")
        elif sc == "moe_dispatch":  # ExpertDispatch against the local path, rows and gradients (raises if not)
            moe_dispatch()
        elif sc.startswith("moe_prompt_share:"):  # a rank whose share counts no token (raises if not one process)
            moe_prompt_share(sc.split(":", 1)[1])
        elif sc.startswith("packed:"):  # hand-packed rows (document_ids) through the layout's training step
            name = sc.split(":")[1]
            layout, extra = PACK_VARIANTS.get(name, (name, []))
            packed_run(out, layout, extra, name=name)
        else:
            train(config(sc), out / sc)
        settle()
    from mimo_spec.parallel.env import shutdown_distributed

    shutdown_distributed()


# SGD: weights move by gradient sums (see data_overrides); 70% text-only samples: some rank's share of a
# batch holds no image or no video
NATIVE = ["train.optimizer=sgd", "train.lr=0.2", "train.warmup_steps=0", "data.text_only_fraction=0.5"]


# pipeline stages cannot share a tied embedding: pp2 and its single-process reference untie it
# DeepStack (Qwen3-VL's): the tower's layer-0 features, merged, added after LM layer 0 (the first stage's)
DEEP = ["modalities.images.submodules.encoders.vit.params.deepstack_layers=[0]",
        "+modalities.images.submodules.deepstack_projections=[{module: patch_merger, params: {in_features: 64, "
        "out_features: 128, norm_after_merge: true}}]", "model.params.tie_embeddings=false"]
NATIVE_LAYOUTS = {"pp2": ["model.params.tie_embeddings=false"], "single_untied": ["model.params.tie_embeddings=false"],
                  "pp2_deep": DEEP, "single_deep": DEEP}


# split and bridged layouts for the native-resolution model: name -> (layout, overrides). Videos go
# through the images' tower (inputs_from), so they sit on its ranks
NATIVE_SPLIT = {
    "split2": ("hetero_split", ["parallel.default.ranks.size=1", "parallel.modules.language.tp=1",
                                "parallel.modules.language.ranks={offset: 1, size: 1}"]),
    # images and videos FSDP-sharded on 2 ranks, the LM replicated: both bridged (chunks of items of
    # different sizes all-gathered), the videos through the images' tower
    "bridged": ("ddp", ["+parallel.modules.images={dp_replicate: 1, dp_shard: -1}",
                        "+parallel.modules.videos={dp_replicate: 1, dp_shard: -1}"]),
    # 4 ranks: the encoders FSDP on ranks 0-1 (each encodes a chunk of the items), the LM FSDP on ranks
    # 2-3 (each takes its samples' items and M-RoPE positions)
    "split4": ("hetero_split", ["parallel.modules.language.tp=1"]),
}


def moe_dispatch() -> None:
    """Every rank routes its own tokens through an MoE whose 4 experts are split over the ranks (all-to-all) and
    through the same MoE with every expert local: equal outputs, token gradients and (summed over the ranks)
    expert gradients; also when every token picks experts 0 and 1 (the ranks holding 2 and 3 receive no row)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from mimo_spec.components.moe import MoE
    from mimo_spec.parallel.env import init_distributed
    from mimo_spec.parallel.expert import shard_experts

    rank, world = init_distributed().rank, dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    for skew in (False, True):
        torch.manual_seed(0)
        ref = MoE(16, 12, 4, 2, shared_ffn_hidden_size=8, bias_balancing=skew)
        if skew:
            ref.router_bias.copy_(torch.tensor([10.0, 10.0, -10.0, -10.0]))
        ep = MoE(16, 12, 4, 2, shared_ffn_hidden_size=8, bias_balancing=skew)
        ep.load_state_dict(ref.state_dict())
        shard_experts(ep, mesh["ep"], rank)
        x = torch.randn(5 + 3 * rank, 16, generator=torch.Generator().manual_seed(rank))
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ref(xa), ep(xb)
        (ya * torch.arange(16)).sum().backward()
        (yb * torch.arange(16)).sum().backward()
        assert torch.allclose(ya, yb, atol=1e-6), (skew, (ya - yb).abs().max())
        assert torch.allclose(xa.grad, xb.grad, atol=1e-6), skew
        per = 4 // world
        for name in ("gate_up", "down"):
            full = getattr(ref.experts, name).grad.clone()
            dist.all_reduce(full)  # the single process's gradient: every rank's tokens
            got = getattr(ep.experts, name).grad.to_local()
            assert torch.allclose(full[rank * per:(rank + 1) * per], got, atol=1e-6), (skew, name)
        if skew:
            assert int(ref.routing.counts[2:].sum()) == 0


def moe_prompt_share(layout: str) -> None:
    """Two SGD steps of an MoE LM (router aux and z losses on) on a global batch whose second half, the last
    rank's share, has every label -100 (prompts only): under ``layout`` the losses and weights equal one process,
    which routes (and counts in its router losses) every real token whatever its label."""
    import torch

    from mimo_spec.builders import build_model
    from mimo_spec.config import compose_config
    from mimo_spec.loss import token_weights
    from mimo_spec.parallel.parallelize import start_parallel
    from mimo_spec.run_config import RunConfig
    from mimo_spec.train.optim import build_optimizer, set_lr
    from mimo_spec.train.step import clip_grads, forward_backward

    def batch(step):
        g = torch.Generator().manual_seed(100 + step)
        ids = torch.randint(3, 64, (4, 12), generator=g)
        mask = torch.zeros(4, 12, dtype=torch.long)
        for i, n in enumerate((12, 9, 5, 7)):
            mask[i, :n] = 1
        ids[mask == 0] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[2:] = -100
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "modality_inputs": {},
                "items_per_sample": {}, "num_tokens": int(token_weights(labels, None, None).sum())}

    def run(name):
        cfg = compose_config([f"parallel={name}", "modality=[]", "model.params.num_layers=2",
                              "model.params.vocab_size=64", "++model.params.num_experts=4",
                              "++model.params.num_experts_per_tok=2", "++model.params.moe_ffn_hidden_size=24",
                              "++model.params.router_aux_loss_weight=0.5", "++model.params.router_z_loss_weight=0.1",
                              "train.optimizer=sgd", "train.lr=0.05", "train.warmup_steps=0", "train.weight_decay=0.0"])
        rc = RunConfig.from_config(cfg)
        model = build_model(cfg, seed=0)
        drun = None if name == "single" else start_parallel(rc.parallel.layout, rc.train.model_dump(), model)
        model.train()
        opt = build_optimizer(model, rc.train)
        out = []
        for step in range(2):
            set_lr(opt, step, rc.train)
            opt.zero_grad(set_to_none=True)
            b = batch(step)
            loss = forward_backward(model, b, b["num_tokens"], device="cpu", drun=drun)
            out.append(drun.all_sum(loss) if drun is not None else loss)
            clip_grads(model, None, drun)
            opt.step()
        weights = drun.full_state_dict(model) if drun is not None else model.state_dict()
        return out, {k: v.detach().clone() for k, v in weights.items()}

    ref, ref_w = run("single")
    got, got_w = run(layout)
    assert all(abs(a - b) < 1e-5 for a, b in zip(ref, got)), (layout, ref, got)
    worst = max((ref_w[k].float() - got_w[k].float()).abs().max().item() for k in ref_w)
    assert worst < 1e-5, (layout, worst)


def native_config(layout: str, extra=()):
    """preset=qwen2_vl_tiny (native-resolution images and videos, M-RoPE) under ``layout``."""
    return compose_config(["preset=qwen2_vl_tiny", f"parallel={layout}", *COMMON, *NATIVE, *extra])


def data_overrides(out: Path) -> list[str]:
    """LLaVA-format JSONL with PNG files written by tests/test_parallel_data.py under OUT_DIR/data."""
    return ["data=llava_json", f"data.path={out / 'data' / 'chats.jsonl'}", f"data.image_folder={out / 'data'}",
            "data.eval_fraction=0.1", "data.num_workers=2", "data.packing=true", "data.max_seq_len=160",
            "data.max_bad_fraction=0.6", "train.steps=4", "train.checkpoint.every=2", "train.eval_every=4",
            # SGD: weights move by gradient sums; AdamW turns reduction-order noise in near-zero gradients (the
            # image encoder's, on steps where one rank has no image) into loss differences of ~4e-4 by step 3
            "train.optimizer=sgd", "train.lr=0.2", "train.warmup_steps=0"]


def data_config(layout: str, out: Path, extra=()):
    """``config`` on the real files of ``data_overrides`` (the synthetic source's keys left out)."""
    common = [c for c in COMMON if not c.startswith("data.")]
    return compose_config([f"parallel={layout}", *common, *data_overrides(out), *extra])


def settle() -> None:
    """Between scenarios: every rank frees the last scenario's process groups at the same point."""
    import gc

    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# ---- packed batches (tests/test_parallel_packing.py) ------------------------------------------------

SPLIT2 = ["parallel.default.ranks.size=1", "parallel.modules.language.tp=1",
          "parallel.modules.language.ranks={offset: 1, size: 1}"]  # images on rank 0, the LM on rank 1
# packed-batch scenarios beyond the shipped layouts: name -> (layout, overrides)
PACK_VARIANTS = {"split2": ("hetero_split", SPLIT2), "pp2_gpipe": ("pp2", ["parallel.default.pp_schedule=gpipe"]),
                 # the LM replicated on 2 ranks, images FSDP-sharded: bridged (every rank loads the global
                 # batch, ParallelContext.local_batch takes its rows)
                 "bridged": ("ddp", ["+parallel.modules.images={dp_replicate: 1, dp_shard: -1}"])}
PACK_LOOP = ["data.packing=true", "data.max_seq_len=160"]  # the loop's own packing (train.batch_size rows)
PACK_PAD, PACK_ROWS, PACK_LEN, PACK_STEPS = 258, 4, 96, 3  # byte tokenizer's pad id; rows x length; steps
# SGD with momentum: the weights move by (clipped) gradient sums, so comparing how far each tensor moved
# compares gradients; AdamW's per-element normalisation would turn reduction-order noise in near-zero
# gradients (an encoder bias element at 2e-8 while the tensor's are 4e-4) into visible weight differences
PACK_TRAIN = ["train.optimizer=sgd", "train.lr=0.2", "train.warmup_steps=0"]


def packed_samples(model, seed: int, count: int, images: bool = True) -> list[dict]:
    """``count`` samples in the collate format (input_ids, labels, items, num_items): 3..20 text tokens around
    0..2 images (16 placeholders each), labels -100 at placeholders and on a short prompt."""
    g = torch.Generator().manual_seed(seed)
    mod = model.modalities["images"]
    out = []
    for _ in range(count):
        n_img = int(torch.randint(0, 3, (), generator=g)) if images else 0
        text = torch.randint(3, 250, (int(torch.randint(3, 21, (), generator=g)),), generator=g)
        cut = int(torch.randint(0, text.shape[0] + 1, (), generator=g))
        items = mod.example_inputs(n_img, generator=g)
        place = torch.full((n_img * mod.tokens_per_item(items),), mod.special_token_id)
        ids = torch.cat([text[:cut], place, text[cut:]]).long()
        labels = ids.clone()
        labels[ids == mod.special_token_id] = -100
        labels[:int(torch.randint(0, 3, (), generator=g))] = -100  # a prompt the loss skips
        sample = {"input_ids": ids, "labels": labels, "num_items": {"images": n_img}, "items": {}}
        if n_img:
            sample["items"]["images"] = items
        out.append(sample)
    return out


def pack_rows(samples: list[dict], rows: int, length: int) -> tuple[dict, list[list[dict]]]:
    """Samples packed in order into ``rows`` rows of ``length`` tokens (a sample that does not fit starts
    the next row; samples left over are not used): the packed batch format -- document_ids numbering each
    row's samples 0, 1, ... and its padding tail the next number, items row by row, per-row item counts,
    num_tokens without ignored labels or document starts -- and the samples of each row."""
    per_row: list[list[dict]] = [[]]
    for s in samples:
        used = sum(int(x["input_ids"].shape[0]) for x in per_row[-1])
        if used + int(s["input_ids"].shape[0]) > length:
            if len(per_row) == rows:
                break
            per_row.append([])
        per_row[-1].append(s)
    assert len(per_row) == rows, "not enough samples for the rows"
    ids = torch.full((rows, length), PACK_PAD, dtype=torch.long)
    labels = torch.full((rows, length), -100, dtype=torch.long)
    mask = torch.zeros((rows, length), dtype=torch.long)
    docs = torch.zeros((rows, length), dtype=torch.long)
    counted, pixels, counts = 0, [], []
    for r, row in enumerate(per_row):
        at = 0
        for d, s in enumerate(row):
            n = int(s["input_ids"].shape[0])
            ids[r, at:at + n], labels[r, at:at + n], mask[r, at:at + n], docs[r, at:at + n] = \
                s["input_ids"], s["labels"], 1, d
            counted += int((s["labels"][1:] != -100).sum())  # a document's first token is never predicted
            at += n
            if s["num_items"]["images"]:
                pixels.append(s["items"]["images"]["clip"]["pixel_values"])
        docs[r, at:] = len(row)
        counts.append(sum(s["num_items"]["images"] for s in row))
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask, "document_ids": docs,
             "modality_inputs": {"images": {"clip": {"pixel_values": torch.cat(pixels)}}} if pixels else {},
             "items_per_sample": {"images": counts}, "num_tokens": counted}
    return batch, per_row


def packed_steps(model) -> list[dict]:
    """The packed global batches of every step; in step 1 the last two rows hold no image (a data-parallel
    share without items of a modality its global batch has)."""
    steps = []
    for step in range(PACK_STEPS):
        if step == 1:
            top, _ = pack_rows(packed_samples(model, 100 + step, 40), PACK_ROWS // 2, PACK_LEN)
            bottom, _ = pack_rows(packed_samples(model, 200 + step, 40, images=False), PACK_ROWS // 2, PACK_LEN)
            steps.append(concat_rows(top, bottom))
        else:
            steps.append(pack_rows(packed_samples(model, 100 + step, 40), PACK_ROWS, PACK_LEN)[0])
    return steps


def concat_rows(a: dict, b: dict) -> dict:
    out = {k: torch.cat([a[k], b[k]]) for k in ("input_ids", "labels", "attention_mask", "document_ids")}
    out["modality_inputs"] = a["modality_inputs"] or b["modality_inputs"]  # (b has no image)
    out["items_per_sample"] = {"images": a["items_per_sample"]["images"] + b["items_per_sample"]["images"]}
    out["num_tokens"] = a["num_tokens"] + b["num_tokens"]
    return out


def loaded_share(batch: dict, share: tuple[int, int]) -> dict:
    """What a rank's loader would give for rows [lo, hi) of ``batch``, cut after its last real token (so
    step_tokens pads it back to the global length): rows, their items and counts, their token count."""
    lo, hi = share
    counts = batch["items_per_sample"]["images"]
    end = int(batch["attention_mask"][lo:hi].sum(1).max())
    out = {k: batch[k][lo:hi, :end] for k in ("input_ids", "labels", "attention_mask", "document_ids")}
    out["items_per_sample"] = {"images": counts[lo:hi]}
    first, last = sum(counts[:lo]), sum(counts[:hi])
    out["modality_inputs"] = {"images": {"clip": {"pixel_values": batch["modality_inputs"]["images"]["clip"][
        "pixel_values"][first:last]}}} if last > first else {}
    docs = out["document_ids"]
    out["num_tokens"] = int(((out["labels"][:, 1:] != -100) & (docs[:, 1:] == docs[:, :-1])).sum())
    out["share"] = share
    return out


def packed_train(layout: str, extra=()) -> dict:
    """PACK_STEPS optimizer steps on :func:`packed_steps` under ``layout`` (one process for ``single``), as
    the training loop runs them; then the summed eval NLL of step 0's batch. Returns the losses, gradient
    norms, eval NLL and this rank's parameters in the single-process layout (a stage / span holds a part)."""
    from mimo_spec.builders import build_model
    from mimo_spec.data.batch import empty_parts
    from mimo_spec.data.loader import step_tokens
    from mimo_spec.parallel.parallelize import start_parallel
    from mimo_spec.run_config import RunConfig
    from mimo_spec.train.optim import build_optimizer, set_lr
    from mimo_spec.train.step import clip_grads, eval_nll, forward_backward

    cfg = config(layout, PACK_TRAIN + list(extra))
    run = RunConfig.from_config(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, seed=0)
    batches = packed_steps(model)
    empty = empty_parts(model)
    drun = start_parallel(run.parallel.layout, run.train.model_dump(), model) if layout != "single" else None
    if drun is not None and drun.pp > 1:
        drun.start_pipeline(model, PACK_LEN, PACK_PAD)
    model.train()
    optimizer = build_optimizer(model, run.train)
    losses, norms = [], []
    for step, batch in enumerate(batches):
        set_lr(optimizer, step, run.train)
        optimizer.zero_grad(set_to_none=True)
        share = drun.data_share(PACK_ROWS) if drun is not None else None
        micro, total, _ = step_tokens([batch if share is None else loaded_share(batch, share)], drun, PACK_PAD,
                                      empty)
        assert total == batch["num_tokens"], (total, batch["num_tokens"])
        loss = forward_backward(model, micro[0], total, device="cpu", drun=drun)
        losses.append(drun.all_sum(loss) if drun is not None else loss)
        norms.append(clip_grads(model, run.train.grad_clip, drun))
        optimizer.step()
    model.eval()
    # a whole batch, and one of 2 rows cut short (pipelines pad it to their length and row count)
    small = {k: v for k, v in loaded_share(batches[2], (0, 2)).items() if k != "share"}
    nll = [eval_nll(model, b, device="cpu", drun=drun) for b in (batches[0], small)]
    if drun is not None and (drun.split or drun.pipeline) is not None:  # each rank scored its share
        nll = [drun.all_sum(x) for x in nll]
    weights = drun.full_state_dict(model) if drun is not None else model.state_dict()
    return {"losses": losses, "norms": norms, "eval_nll": nll, "eval_tokens": [batches[0]["num_tokens"],
                                                                                small["num_tokens"]],
            "weights": {k: v.detach().clone() for k, v in weights.items()},
            "share": share, "bridges": sorted(drun.bridges) if drun is not None else []}


def packed_run(out: Path, layout: str, extra=(), name: str | None = None) -> None:
    """:func:`packed_train` under ``layout``; each rank saves what it holds to OUT/packed_<name>_rank<r>.pt."""
    result = packed_train(layout, extra)
    torch.save(result, out / f"packed_{name or layout}_rank{int(os.environ['RANK'])}.pt")


if __name__ == "__main__":
    main()
