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
(exact: attention is causal and padded labels are ignored); packed rows are
``data.max_seq_len`` long already.

Packed rows (``document_ids``): every stage takes the ids of its microbatch (a
keyword input torch's schedule splits with the rows on every stage, not an
activation sent between stages) and computes what one process computes: positions
restarting at each document and attention kept inside it; the last stage's loss
counts no document's first token (:func:`mimo_spec.loss.causal_lm_loss`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mimo_spec.data.batch import pad_batch, to_device
from mimo_spec.loss import IGNORE_INDEX, causal_lm_loss

SCHEDULES = ("1f1b", "gpipe")
_COUNT = "__count__"
_ROWS = "__rows__"  # per sample: rows of its items in the inputs packed by a grid
_BY_ROWS = "@rows"  # a packed input sent per sample by rows, not per item


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

def pack_items(modality_inputs: dict, items_per_sample: dict, batch: int, model: nn.Module | None = None
               ) -> dict[str, torch.Tensor]:
    """{modality: {encoder: {kwarg: (N, ...)}}} -> flat {"m/enc/kw": (B, max, ...), "m/__count__": (B,)}.

    Inputs packed by a grid (items of any size: their rows are patches, item after item; ``model`` says
    which) travel per sample as ``"m/enc/kw@rows"`` (B, most rows of a sample, ...) with each sample's
    row count in ``"m/enc/__rows__"`` (B,); the grids themselves go per item like any other input."""
    from mimo_spec.models.items import grid_of, item_rows

    packs: dict[str, torch.Tensor] = {}
    for name, encoders in modality_inputs.items():
        counts = torch.tensor(items_per_sample.get(name, [0] * batch), dtype=torch.long)
        most = max(int(counts.max()), 1)
        slots = torch.arange(most)[None] < counts[:, None]  # (B, max): which slots hold an item
        packs[f"{name}/{_COUNT}"] = counts
        mod = model.modalities[name] if model is not None else None
        for enc, kws in encoders.items():
            encoder = mod.src.encoders[enc] if mod is not None else None
            g = grid_of(encoder, kws) if encoder is not None else None
            rowwise = set(g[1]) if g is not None else set()
            if rowwise:  # each sample's rows: the rows of its items
                rows = item_rows(encoder, kws)
                bounds = torch.tensor([0, *counts.tolist()]).cumsum(0).tolist()
                per_sample = torch.tensor([sum(rows[bounds[i]:bounds[i + 1]]) for i in range(batch)])
                packs[f"{name}/{enc}/{_ROWS}"] = per_sample
                room = torch.arange(max(int(per_sample.max()), 1))[None] < per_sample[:, None]
            for kw, t in kws.items():
                if kw in rowwise:
                    padded = t.new_zeros(batch, room.shape[1], *t.shape[1:])
                    padded[room] = t
                    packs[f"{name}/{enc}/{kw}{_BY_ROWS}"] = padded
                    continue
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
        rows = {rest.split("/", 1)[0]: parts.pop(rest) for rest in list(parts) if rest.endswith(f"/{_ROWS}")}
        # a microbatch without items of a modality the batch has still runs its encoders (on no item),
        # so every data-parallel rank of the stage runs the same collectives
        for rest, t in parts.items():
            enc, kw = rest.split("/", 1)
            held = counts
            if kw.endswith(_BY_ROWS):
                kw, held = kw[: -len(_BY_ROWS)], rows[enc]
            slots = torch.arange(t.shape[1], device=t.device)[None] < held.to(t.device)[:, None]
            out.setdefault(name, {}).setdefault(enc, {})[kw] = t[slots]
    return out


class PipelineStageModule(nn.Module):
    """What one stage runs: (first) embed + encode, a slice of the layers, (last) norm + LM head."""

    def __init__(self, model: nn.Module, stage: int, stages: int, layers: range):
        super().__init__()
        self.model = model
        self.first, self.last, self.layer_ids = stage == 0, stage == stages - 1, layers

    def forward(self, x: torch.Tensor, document_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, **packs: torch.Tensor) -> torch.Tensor:
        """``x``: input_ids (B, S) on the first stage, else the previous stage's hidden states;
        ``document_ids`` (B, S): this microbatch's packed documents (every stage gets them), or None;
        ``positions`` (B, 3, S): M-RoPE positions from the items' grids (batch first, so they split with
        the rows), or None."""
        lm = self.model.language_model
        b, s = x.shape[:2]
        if positions is not None:  # (B, 3, S) -> (3, B, S)
            positions = positions.permute(1, 0, 2)
        elif document_ids is not None:  # as MimoModel.forward: positions restart at every document
            from mimo_spec.models.mimo import positions_from_document_ids

            positions = positions_from_document_ids(document_ids)
        elif lm.position_embedding_kind != "none":
            positions = torch.arange(s, device=x.device)[None].expand(b, s)
        additions = {}  # DeepStack features for the first stage's layers (checked when the layout started)
        if self.first:  # x: input_ids (B, S)
            embeds, additions = self.model.embed_with_additions(x, unpack_items(packs))
            x = lm.add_positions(embeds, positions)
        rope, attn_mask, is_causal = lm.attention_inputs(x, positions, None, document_ids)
        for i in self.layer_ids:
            x = lm.layers[i](x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
            if i in additions:
                x = x + additions[i].to(x.dtype)
        if self.last:
            return lm.logits(lm.norm(x))
        return x


class PipelineRunner:
    """Runs this rank's stage of the language model under a ``torch.distributed.pipelining`` schedule."""

    def __init__(self, model: nn.Module, stage: int, stages: int, microbatches: int, schedule: str,
                 pp_group, device: torch.device, seq_len: int, pad_id: int = 0, rows: int = 0):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        self.stage, self.stages, self.seq_len, self.pad_id, self.device = stage, stages, seq_len, pad_id, device
        self.first, self.last = stage == 0, stage == stages - 1
        layers = stage_layers(len(model.language_model.layers), stages)[stage]
        self.module = PipelineStageModule(model, stage, stages, layers)
        self.pipe_stage = PipelineStage(self.module, stage, stages, device, group=pp_group)
        self.model = model
        self.total_tokens = 1
        # rows per batch (0: the first batch's); stage-to-stage shapes are fixed after the first step
        self.rows = int(rows)
        kind = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[schedule]
        # losses are already divided by the global token count, so micro-batch gradients are summed
        self.schedule = kind(self.pipe_stage, microbatches, loss_fn=self._loss, scale_grads=False)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The last stage's loss of one microbatch: :func:`mimo_spec.loss.causal_lm_loss` (vocab-sharded
        logits stay sharded: the step runs in the layout's train context) over the step's global token
        count. ``target``: (B, S, 2 or 3) labels, loss_mask and, for packed rows, document_ids (see
        :meth:`_target`), split with the samples."""
        labels, loss_mask = target[..., 0].long(), target[..., 1]
        document_ids = target[..., 2].long() if target.shape[-1] > 2 else None
        return causal_lm_loss(logits, labels, loss_mask, document_ids, num_tokens=self.total_tokens)

    def _target(self, batch: dict) -> torch.Tensor:
        """What the schedule hands the last stage's loss: labels, loss_mask and (packed rows) document_ids
        stacked (B, S, 2 or 3) in float64 (exact for any label or document id) from the padded batch."""
        labels = batch["labels"]
        mask = batch.get("loss_mask")
        parts = [labels, torch.ones_like(labels) if mask is None else mask]
        if batch.get("document_ids") is not None:
            parts.append(batch["document_ids"])
        return torch.stack([p.double() for p in parts], dim=-1)

    def _padded(self, batch: dict) -> dict:
        """``batch`` right-padded to the pipeline's length (pad ids, ignored labels, a document of its own)
        and, with fewer rows than the pipeline's (stage shapes are fixed: e.g. a share whose samples were
        all skipped), filled up with empty rows (pad ids, no label, no item)."""
        from mimo_spec.errors import InputError

        rows, length = batch["input_ids"].shape
        if length > self.seq_len:
            raise InputError(f"a batch of length {length} exceeds the pipeline's {self.seq_len}",
                             path="data.max_seq_len")
        out = pad_batch(batch, self.seq_len, self.pad_id)
        self.rows = self.rows or int(rows)
        if rows > self.rows:
            raise InputError(f"a batch of {rows} rows exceeds the pipeline's {self.rows}",
                             path="train.batch_size", hint="pipeline stages take batches of one size")
        if rows < self.rows:
            extra = self.rows - rows
            out = dict(out)
            for key, value in (("input_ids", self.pad_id), ("labels", IGNORE_INDEX), ("attention_mask", 0),
                               ("loss_mask", 0), ("document_ids", 0)):
                t = out.get(key)
                if t is not None:
                    out[key] = torch.cat([t, t.new_full((extra, t.shape[1]), value)])
            out["items_per_sample"] = {m: list(c) + [0] * extra for m, c in (out.get("items_per_sample") or {}).items()}
        return out

    def _run(self, batch: dict, total_tokens: int, train: bool) -> float:
        """One (local) batch through the pipeline; the sum of its microbatch losses on the last stage, else 0."""
        padded = self._padded(batch)
        ids = padded["input_ids"].to(self.device)  # the schedule hands its inputs to the stage as they are
        self.total_tokens = total_tokens
        losses: list[torch.Tensor] = []
        call = self.schedule.step if train else self.schedule.eval
        # packed rows: every stage takes its microbatch's document ids (split with the rows by the schedule)
        docs = ({"document_ids": padded["document_ids"].to(self.device)} if padded.get("document_ids") is not None
                else {})
        positions = self._positions(batch, padded)
        if positions is not None:  # M-RoPE: computed here, on the host, from the whole batch's grids
            docs["positions"] = positions.to(self.device)
        if self.first:
            self.model.prepare_inputs(batch["input_ids"], batch.get("modality_inputs") or {},
                                      items_per_sample=batch.get("items_per_sample"))
            packs = pack_items(batch.get("modality_inputs") or {}, padded.get("items_per_sample") or {},
                               ids.shape[0], self.model)
            call(ids, **docs, **to_device(packs, self.device, self._host_packs(packs)))
        elif self.last:
            call(target=self._target(padded).to(self.device), losses=losses, **docs)
        else:
            call(**docs)
        return float(sum(float(x.detach()) for x in losses))

    def _positions(self, batch: dict, padded: dict) -> torch.Tensor | None:
        """M-RoPE positions (rows, 3, seq_len) of the padded batch (padding at position 0), or None. Every
        stage computes them from its copy of the batch (the grids are host data: no communication)."""
        pos = self.model.position_ids(batch["input_ids"], batch.get("modality_inputs") or {},
                                      document_ids=batch.get("document_ids"))
        if pos is None:
            return None
        rows, length = padded["input_ids"].shape
        out = pos.new_zeros(rows, 3, length)
        out[: pos.shape[1], :, : pos.shape[2]] = pos.permute(1, 0, 2)
        return out

    def _host_packs(self, packs: dict) -> set[str]:
        """The packed inputs that stay on the host: the items' grids (and their counts)."""
        from mimo_spec.data.batch import host_keys

        grids = host_keys(self.model)
        return {k for k in packs if k.rsplit("/", 1)[-1] in grids}

    def train_batch(self, batch: dict, total_tokens: int) -> float:
        return self._run(batch, total_tokens, train=True)

    def eval_batch(self, batch: dict) -> float:
        """Summed next-token NLL of the batch (last stage; 0 elsewhere)."""
        with torch.no_grad():
            return self._run(batch, 1, train=False)
