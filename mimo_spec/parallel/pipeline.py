"""Pipeline parallelism for the language model, on ``torch.distributed.pipelining``.

The language model's layers are cut into ``pp`` consecutive slices, one per stage.
The first stage also embeds the text and runs every input modality (encoders and
projectors, placed at their placeholders exactly as in one process); the last
stage applies the final norm and the LM head and computes the loss. Each rank
keeps only what its stage runs: the rest of the model is dropped after the
(identically seeded) full build, so parameter names, and with them checkpoints,
stay those of the single-process model, and ``torch.distributed.checkpoint``
reshards between pipelined and other layouts.

Microbatches are cut by ``torch.distributed.pipelining`` along the batch dim.
Modality items are per item, not per sample, so they travel as per-sample padded
tensors (``(B, max items, ...)`` plus a count per sample) that split with the
samples; the first stage unpads them. Stage-to-stage shapes are fixed after the
first step, so every batch is right-padded to the dataset's longest sample
(exact: attention is causal and padded labels are ignored).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimo_spec.models.mimo import IGNORE_INDEX

SCHEDULES = ("1f1b", "gpipe")
_COUNT = "__count__"


def stage_layers(num_layers: int, stages: int) -> list[range]:
    """Consecutive layer slices, one per stage; later stages take the remainder (the first also encodes)."""
    base, extra = divmod(num_layers, stages)
    sizes = [base + (1 if s >= stages - extra else 0) for s in range(stages)]
    starts = [sum(sizes[:s]) for s in range(stages)]
    return [range(a, a + n) for a, n in zip(starts, sizes)]


def keep_stage(model: nn.Module, stage: int, stages: int) -> range:
    """Drop from ``model`` (in place) everything stage ``stage`` does not run; returns its layer ids."""
    lm = model.language_model
    mine = stage_layers(len(lm.layers), stages)[stage]
    for i in range(len(lm.layers)):
        if i not in mine:
            lm.layers[i] = None
    if stage > 0:
        lm.token_embedding = None
        if getattr(lm, "position_embedding", None) is not None:
            lm.position_embedding = None
        for name in list(model.modalities.keys()):
            del model.modalities[name]
    if stage < stages - 1:
        lm.norm = None
        if getattr(lm, "lm_head", None) is not None:
            lm.lm_head = None
    return mine


# ---- modality items <-> per-sample padded tensors ------------------------------------------

def pack_items(modality_inputs: dict, items_per_sample: dict, batch: int) -> dict[str, torch.Tensor]:
    """{modality: {encoder: {kwarg: (N, ...)}}} -> flat {"m/enc/kw": (B, max, ...), "m/__count__": (B,)}."""
    packs: dict[str, torch.Tensor] = {}
    for name, encoders in modality_inputs.items():
        counts = torch.tensor(items_per_sample.get(name, [0] * batch), dtype=torch.long)
        most = max(int(counts.max()), 1)
        slots = torch.arange(most)[None] < counts[:, None]  # (B, max): which slots hold an item
        packs[f"{name}/{_COUNT}"] = counts
        for enc, kws in encoders.items():
            for kw, t in kws.items():
                padded = t.new_zeros(batch, most, *t.shape[1:])
                padded[slots] = t
                packs[f"{name}/{enc}/{kw}"] = padded
    return packs


def unpack_items(packs: dict[str, torch.Tensor]) -> dict:
    """The inverse of :func:`pack_items` for one microbatch (a modality with no item in it: empty tensors)."""
    by_modality: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in packs.items():
        name, rest = key.split("/", 1)
        by_modality.setdefault(name, {})[rest] = t
    out: dict = {}
    for name, parts in by_modality.items():
        counts = parts.pop(_COUNT)
        # a microbatch without items of a modality the batch has still runs its encoders (on no item),
        # so every data-parallel rank of the stage runs the same collectives
        for rest, t in parts.items():
            slots = torch.arange(t.shape[1], device=t.device)[None] < counts[:, None]
            enc, kw = rest.split("/", 1)
            out.setdefault(name, {}).setdefault(enc, {})[kw] = t[slots]
    return out


class PipelineStageModule(nn.Module):
    """What one stage runs: (first) embed + encode, a slice of the layers, (last) norm + LM head."""

    def __init__(self, model: nn.Module, stage: int, stages: int, layers: range):
        super().__init__()
        self.model = model
        self.first, self.last, self.layer_ids = stage == 0, stage == stages - 1, layers

    def forward(self, x: torch.Tensor, **packs: torch.Tensor) -> torch.Tensor:
        lm = self.model.language_model
        b, s = x.shape[:2]
        positions = None
        if lm.position_embedding_kind != "none":
            positions = torch.arange(s, device=x.device)[None].expand(b, s)
        if self.first:  # x: input_ids (B, S)
            x = lm.add_positions(self.model.embed_inputs(x, unpack_items(packs)), positions)
        rope, attn_mask, is_causal = lm.attention_inputs(x, positions, None, None)
        for i in self.layer_ids:
            x = lm.layers[i](x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        if self.last:
            return lm.logits(lm.norm(x))
        return x


class PipelineRunner:
    """Runs this rank's stage of the language model under a ``torch.distributed.pipelining`` schedule."""

    def __init__(self, model: nn.Module, stage: int, stages: int, microbatches: int, schedule: str,
                 pp_group, device: torch.device, seq_len: int, pad_id: int = 0):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        self.stage, self.stages, self.seq_len, self.pad_id = stage, stages, seq_len, pad_id
        self.first, self.last = stage == 0, stage == stages - 1
        layers = stage_layers(len(model.language_model.layers), stages)[stage]
        self.module = PipelineStageModule(model, stage, stages, layers)
        self.pipe_stage = PipelineStage(self.module, stage, stages, device, group=pp_group)
        self.model = model
        self.total_tokens = 1
        kind = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[schedule]
        # losses are already divided by the global token count, so micro-batch gradients are summed
        self.schedule = kind(self.pipe_stage, microbatches, loss_fn=self._loss, scale_grads=False)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        if isinstance(logits, DTensor):  # a vocab-sharded LM head
            logits = logits.full_tensor()
        shift = logits[:, :-1].float()
        nll = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), labels[:, 1:].reshape(-1),
                              ignore_index=IGNORE_INDEX, reduction="sum")
        return nll / self.total_tokens

    def _padded(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        ids, labels = batch["input_ids"], batch["labels"]
        extra = self.seq_len - ids.shape[1]
        if extra < 0:
            from mimo_spec.errors import InputError

            raise InputError(f"a batch of length {ids.shape[1]} exceeds the pipeline's {self.seq_len}",
                             path="data.max_seq_len")
        if extra:
            ids = F.pad(ids, (0, extra), value=self.pad_id)
            labels = F.pad(labels, (0, extra), value=IGNORE_INDEX)
        return ids, labels

    def _run(self, batch: dict, total_tokens: int, train: bool) -> float:
        """One (local) batch through the pipeline; the sum of its microbatch losses on the last stage, else 0."""
        ids, labels = self._padded(batch)
        self.total_tokens = total_tokens
        losses: list[torch.Tensor] = []
        call = self.schedule.step if train else self.schedule.eval
        if self.first:
            self.model.prepare_inputs(batch["input_ids"], batch.get("modality_inputs") or {},
                                      items_per_sample=batch.get("items_per_sample"))
            packs = pack_items(batch.get("modality_inputs") or {}, batch.get("items_per_sample") or {},
                               ids.shape[0])
            call(ids, **packs)
        elif self.last:
            call(target=labels, losses=losses)
        else:
            call()
        return float(sum(float(x.detach()) for x in losses))

    def train_batch(self, batch: dict, total_tokens: int) -> float:
        return self._run(batch, total_tokens, train=True)

    def eval_batch(self, batch: dict) -> float:
        """Summed next-token NLL of the batch (last stage; 0 elsewhere)."""
        with torch.no_grad():
            return self._run(batch, 1, train=False)


def evaluate_distributed(drun, dataset, collate_fn, batch_size: int, max_batches: int | None) -> dict[str, float]:
    """Token-weighted held-out loss under a pipeline or split layout: each data-parallel rank evaluates
    its share. Pipeline stages need every batch full size (fixed shapes), a split layout a multiple
    of the data-parallel degree; filler samples (no counted token) make up the difference."""
    model = (drun.pipeline or drun.split).model
    model.eval()
    nll, tokens = 0.0, 0
    n = len(dataset)
    for b, start in enumerate(range(0, n, batch_size)):
        if max_batches and b >= max_batches:
            break
        samples = [dataset[i] for i in range(start, min(n, start + batch_size))]
        missing = batch_size - len(samples) if drun.pipeline is not None else -len(samples) % drun.dp_size
        batch = collate_fn(samples + [filler_sample(samples[0])] * missing)
        tokens += int(batch["num_tokens"])
        with torch.no_grad():
            if drun.pipeline is not None:
                nll += drun.pipeline.eval_batch(drun.local_batch(batch, model))
            else:
                nll += drun.split.run(batch, 1, train=False)
    model.train()
    loss = drun.all_sum(nll) / max(tokens, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": tokens}


def filler_sample(sample: dict) -> dict:
    """A filler sample (fixed batch shapes): one ignored token, no modality item."""
    ids = sample["input_ids"][:1]
    return {"input_ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX), "num_items": {}, "items": {}}
