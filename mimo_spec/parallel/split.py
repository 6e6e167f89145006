"""Split layouts: modalities on some ranks, the language model on others, as two pipeline stages.

Every rank reads the same global batch. The ranks of a modality (its own data-parallel
layout, e.g. FSDP) each encode one contiguous chunk of the batch's items and send it
point to point to every language-model rank, after a header with its size and the token
count of each of its items (items may differ in size: native-resolution encoders); each
language-model rank puts the items of its local samples at their placeholders
(``MimoModel.forward(modality_embeddings=)``) and runs forward and backward. Positions
that depend on the items (M-RoPE) are computed there on the host from the whole batch's
grids (``MimoModel.position_ids`` needs no encoder) and sliced to the local rows. The
gradient of each received chunk goes back to the rank that encoded it, scaled by 1/tp
(the tensor-parallel peers of a data-parallel slice all consume the same items), and
the encoder rank runs its backward with the sum. With the global token count in every loss weight this gives the single-process
gradients on both sides.

Each rank keeps only the modules it holds: the others' parameters are dropped after
the (identically seeded) full build, so checkpoint keys stay the single-process ones.
A modality taking another's encoders (``inputs_from``: videos through the image tower)
sits on its source's ranks (``ParallelContext`` refuses anything else), encodes through
them there, and its gradients join the source's in one backward.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mimo_spec.parallel.env import p2p
from mimo_spec.parallel.layout import LANGUAGE, Layout

_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def drop_unheld(model: nn.Module, layout: Layout, rank: int) -> None:
    """Remove the parameters of every module this rank does not hold (a modality keeps its empty shell,
    whose placeholder token the language model still needs). A held modality with ``inputs_from`` runs
    through its source's encoders, so its source must be held too (the layout check guarantees it)."""
    for name, m in layout.modules.items():
        if rank in m.ranks or name == LANGUAGE:
            continue
        users = [n for n, mod in model.modalities.items()
                 if getattr(mod, "inputs_from", None) == name and rank in layout.modules[n].ranks]
        if users:
            raise RuntimeError(f"rank {rank} holds modality {users[0]!r}, which encodes through the encoders "
                               f"of {name!r} (inputs_from), but not {name!r}")
    for name, m in layout.modules.items():
        if rank in m.ranks:
            continue
        module = model.language_model if name == LANGUAGE else model.modalities[name]
        for child, _ in list(module.named_children()):
            setattr(module, child, nn.ModuleDict() if isinstance(getattr(module, child), nn.ModuleDict) else None)


def _device_of(module: nn.Module) -> torch.device:
    """Where ``module``'s (local) parameters live: the device its inputs go to."""
    p = next(module.parameters(), None)
    if p is None:
        return torch.device("cpu")
    return p.to_local().device if hasattr(p, "to_local") else p.device


def _comm_device() -> torch.device:
    """The device point-to-point buffers live on: this rank's GPU under NCCL, else the CPU (gloo)."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
        """Encode this rank's chunk of every held modality's items (contiguous chunks of ceil(items / dp):
        the last ranks' may be shorter or empty, where the encoder still runs, on one blank item, so
        FSDP's collectives stay in step) and send it; (embeddings, rows) per modality with items."""
        from mimo_spec.data.batch import host_keys, to_device
        from mimo_spec.models.items import modality_item_count, slice_modality_items
        from mimo_spec.parallel.bridge import chunk_bounds

        sent = []
        for name, m in self.encoders:
            if self.rank not in m.ranks:
                continue
            items = (batch.get("modality_inputs") or {}).get(name)
            if items is None:  # no item of this modality in the batch: nothing is sent (the LM side knows)
                continue
            mod = self.model.modalities[name]
            c = m.coords(self.rank)
            lo, hi = chunk_bounds(modality_item_count(mod, items), m.dp)[c["dp_replicate"] * m.dp_shard + c["dp_shard"]]
            mine = slice_modality_items(mod, items, lo, hi)
            tokens = mod.item_tokens(mine)  # per item, from shapes and grids (host)
            mine = to_device(mine, _device_of(mod.src), host_keys(self.model))
            with torch.set_grad_enabled(train):
                emb = mod.encode(mine)
            if emb.shape[0] != sum(tokens):
                raise RuntimeError(f"modality {name!r}: items {lo}..{hi} gave {emb.shape[0]} embeddings, their "
                                   f"item_tokens say {sum(tokens)}")
            self._send_tensor(emb, tokens)
            sent.append((emb, emb.shape[0]))
        return sent

    def _send_tensor(self, t: torch.Tensor, tokens: list[int]) -> None:
        """To every LM rank: a header (rows, width, dtype, items), the items' token counts, the rows."""
        dev = _comm_device()
        head = torch.tensor([t.shape[0], t.shape[1], _DTYPES.index(t.dtype), len(tokens)], device=dev)
        counts = torch.tensor(tokens, dtype=torch.long, device=dev)
        for r in self.lm_ranks:
            p2p("send", head, r)
            if tokens:
                p2p("send", counts, r)
            if t.shape[0]:
                p2p("send", t.detach().to(dev).contiguous(), r)

    def _receive_grads(self, sent) -> None:
        """Sum every language-model rank's gradient for the rows this rank sent, then one backward over
        every modality's embeddings (modalities sharing an encoder through inputs_from: one pass through it)."""
        outs, grads = [], []
        for emb, rows in sent:
            total = torch.zeros_like(emb)
            if rows:
                buf = torch.empty(emb.shape, dtype=emb.dtype, device=_comm_device())
                for r in self.lm_ranks:
                    p2p("recv", buf, r)
                    total += buf.to(total.device)
            if emb.requires_grad:  # an empty chunk still runs FSDP's backward (zero gradients)
                outs.append(emb)
                grads.append(total)
        if outs:
            torch.autograd.backward(outs, grads)

    # ---- language-model side ------------------------------------------------------------
    def _receive(self, global_batch: dict, lo_sample: int, hi_sample: int, train: bool):
        """{modality: embeddings of the local samples' items}, and the received leaves (for gradients)."""
        embeddings, leaves = {}, []
        dev = _comm_device()
        for name, m in self.encoders:
            if name not in (global_batch.get("modality_inputs") or {}):
                continue  # the encoder ranks sent nothing either
            chunks, tokens = [], []
            for src in m.ranks:
                head = torch.empty(4, dtype=torch.long, device=dev)
                p2p("recv", head, src)
                rows, width, dtype, items = (int(x) for x in head.tolist())
                if items:
                    counts = torch.empty(items, dtype=torch.long, device=dev)
                    p2p("recv", counts, src)
                    tokens.extend(int(x) for x in counts.tolist())
                if rows > 0:
                    buf = torch.empty(rows, width, dtype=_DTYPES[dtype], device=dev)
                    p2p("recv", buf, src)
                    buf.requires_grad_(train)
                    chunks.append((src, buf))
            counts = global_batch["items_per_sample"][name]
            if len(tokens) != sum(counts):
                raise RuntimeError(f"modality {name!r}: the encoder ranks sent {len(tokens)} items, the batch "
                                   f"has {sum(counts)}")
            lo, hi = sum(counts[:lo_sample]), sum(counts[:hi_sample])
            first, last = sum(tokens[:lo]), sum(tokens[:hi])
            if chunks:
                embeddings[name] = torch.cat([b for _, b in chunks])[first:last]
            else:  # items without tokens (none here): an empty block of the model's width
                embeddings[name] = torch.zeros(0, width, dtype=_DTYPES[dtype], device=dev)
            leaves.extend(chunks)
        return embeddings, leaves

    def _send_grads(self, leaves) -> None:
        for src, buf in leaves:
            grad = buf.grad if buf.grad is not None else torch.zeros_like(buf)
            p2p("send", (grad / self.tp).contiguous(), src)

    def _local_batch(self, batch: dict, lo: int, hi: int) -> dict:
        """This LM rank's samples [lo, hi) of the global ``batch``, without the items (they arrive encoded;
        this rank's model holds no encoder to slice them with), and with the positions that depend on the
        items (M-RoPE), computed on the host from the whole batch's grids and sliced to these rows."""
        local = self.drun.local_batch({**batch, "modality_inputs": {}}, self.model)
        local = dict(local)
        local["modality_inputs"] = {}
        pos = batch.get("position_ids")
        if pos is None and batch.get("modality_inputs"):
            pos = self.model.position_ids(batch["input_ids"], batch["modality_inputs"],
                                          document_ids=batch.get("document_ids"))
        if pos is not None:  # M-RoPE's (3, B, S): rows on dim 1
            local["position_ids"] = pos[:, lo:hi] if pos.dim() == 3 else pos[lo:hi]
        return local

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
        local = self._local_batch(batch, lo, hi)
        embeddings, leaves = self._receive(batch, lo, hi, train)
        value = lm_step(local, embeddings)
        if train:
            self._send_grads(leaves)
        return value
