"""Split layouts: modalities on some ranks, the language model on others, as two pipeline stages.

Every rank reads the same global batch. The ranks of a modality (its own data-parallel
layout, e.g. FSDP) each encode one contiguous chunk of the batch's items and send it
point to point to every language-model rank; each language-model rank puts the items
of its local samples at their placeholders (``MimoModel.forward(modality_embeddings=)``)
and runs forward and backward. The gradient of each received chunk goes back to the
rank that encoded it, scaled by 1/tp (the tensor-parallel peers of a data-parallel
slice all consume the same items), and the encoder rank runs its backward with the
sum. With the global token count in every loss weight this gives the single-process
gradients on both sides.

Each rank keeps only the modules it holds: the others' parameters are dropped after
the (identically seeded) full build, so checkpoint keys stay the single-process ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from mimo_spec.parallel.env import p2p
from mimo_spec.parallel.layout import LANGUAGE, Layout

_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def drop_unheld(model: nn.Module, layout: Layout, rank: int) -> None:
    """Remove the parameters of every module this rank does not hold (a modality keeps its empty shell,
    whose placeholder token the language model still needs)."""
    for name, m in layout.modules.items():
        if rank in m.ranks:
            continue
        module = model.language_model if name == LANGUAGE else model.modalities[name]
        for child, _ in list(module.named_children()):
            setattr(module, child, nn.ModuleDict() if isinstance(getattr(module, child), nn.ModuleDict) else None)


def _chunk(inputs: dict, index: int, parts: int) -> tuple[dict, int, int, int]:
    """Rank ``index`` of ``parts``'s items [lo, hi) of {encoder: {kwarg: (N, ...)}}, padded to the chunk size
    with copies of item 0; returns (items, lo, hi, chunk size)."""
    from mimo_spec.parallel.bridge import take_items

    n = next(iter(next(iter(inputs.values())).values())).shape[0]
    size = math.ceil(n / parts)
    lo, hi = min(n, index * size), min(n, (index + 1) * size)
    out = take_items(inputs, lo, hi, size)
    return out, lo, hi, size


class SplitRunner:
    """One rank's side of a split layout: encoder ranks encode and send, language-model ranks receive."""

    def __init__(self, drun, model: nn.Module):
        self.drun, self.model, self.layout, self.rank = drun, model, drun.layout, drun.rank
        lm = self.layout.modules[LANGUAGE]
        self.lm_ranks = list(lm.ranks)
        self.is_lm = self.rank in lm.ranks
        self.tp = lm.tp
        # modalities in a fixed order, with the ranks that encode them
        self.encoders = [(name, m) for name, m in self.layout.modules.items()
                         if name != LANGUAGE and model.modalities[name].special_token_id is not None]

    # ---- encoder side -------------------------------------------------------------------
    def _encode_and_send(self, batch: dict, train: bool) -> list[tuple[torch.Tensor, int]]:
        """Encode this rank's chunk of every held modality's items and send it; (embeddings, real rows) per
        modality with items. Every rank of a modality encodes the same number of items (padded with copies
        of item 0), so FSDP's collectives run on all of them."""
        sent = []
        for name, m in self.encoders:
            if self.rank not in m.ranks:
                continue
            items = (batch.get("modality_inputs") or {}).get(name)
            if items is None:  # no item of this modality in the batch: nothing is sent (the LM side knows)
                continue
            c = m.coords(self.rank)
            mine, lo, hi, size = _chunk(items, c["dp_replicate"] * m.dp_shard + c["dp_shard"], m.dp)
            with torch.set_grad_enabled(train):
                emb = self.model.modalities[name].encode(mine)
            rows = emb.shape[0] // size * (hi - lo)
            self._send_tensor(emb[:rows])
            sent.append((emb, rows))
        return sent

    def _send_tensor(self, t: torch.Tensor) -> None:
        head = torch.tensor([t.shape[0], t.shape[1], _DTYPES.index(t.dtype)])
        for r in self.lm_ranks:
            p2p("send", head, r)
            if t.shape[0]:
                p2p("send", t.detach().contiguous(), r)

    def _receive_grads(self, sent) -> None:
        """Sum every language-model rank's gradient for the rows this rank sent, then backward."""
        for emb, rows in sent:
            total = torch.zeros_like(emb)
            if rows:
                buf = torch.empty_like(emb[:rows])
                for r in self.lm_ranks:
                    p2p("recv", buf, r)
                    total[:rows] += buf
            if emb.requires_grad:  # padding rows get zeros; an empty chunk still runs FSDP's backward
                emb.backward(total)

    # ---- language-model side ------------------------------------------------------------
    def _receive(self, global_batch: dict, lo_sample: int, hi_sample: int, train: bool):
        """{modality: embeddings of the local samples' items}, and the received leaves (for gradients)."""
        embeddings, leaves = {}, []
        for name, m in self.encoders:
            if name not in (global_batch.get("modality_inputs") or {}):
                continue  # the encoder ranks sent nothing either
            chunks = []
            for src in m.ranks:
                head = torch.empty(3, dtype=torch.long)
                p2p("recv", head, src)
                if head[0] > 0:
                    buf = torch.empty(int(head[0]), int(head[1]), dtype=_DTYPES[int(head[2])])
                    p2p("recv", buf, src)
                    buf.requires_grad_(train)
                    chunks.append((src, buf))
            counts = global_batch["items_per_sample"][name]
            n = sum(counts)
            everything = torch.cat([b for _, b in chunks])
            tokens = everything.shape[0] // n
            lo, hi = sum(counts[:lo_sample]), sum(counts[:hi_sample])
            embeddings[name] = everything[lo * tokens: hi * tokens]
            leaves.extend(chunks)
        return embeddings, leaves

    def _send_grads(self, leaves) -> None:
        for src, buf in leaves:
            grad = buf.grad if buf.grad is not None else torch.zeros_like(buf)
            p2p("send", (grad / self.tp).contiguous(), src)

    # ---- one batch -----------------------------------------------------------------------
    def run(self, batch: dict, total_tokens: int, train: bool, lm_step) -> float:
        """The global ``batch`` through both sides. Encoder ranks encode and send their items (and, in
        training, run their backward with the gradients sent back); language-model ranks receive the
        embeddings of their local samples and call ``lm_step(local_batch, modality_embeddings)`` (forward,
        loss and, in training, backward; see ``mimo_spec.train.step``), whose value they return; 0 elsewhere."""
        if not self.is_lm:
            self.model.prepare_inputs(batch["input_ids"], batch.get("modality_inputs") or {},
                                      items_per_sample=batch.get("items_per_sample"))
            sent = self._encode_and_send(batch, train)
            if train:
                self._receive_grads(sent)
            return 0.0
        per = batch["input_ids"].shape[0] // self.drun.dp_size
        lo, hi = self.drun.dp_rank * per, (self.drun.dp_rank + 1) * per
        local = self.drun.local_batch(batch, self.model)
        embeddings, leaves = self._receive(batch, lo, hi, train)
        value = lm_step(local, embeddings)
        if train:
            self._send_grads(leaves)
        return value
