"""Ulysses sequence parallelism (``sp``, the language module): every sequence split over the ``sp`` ranks of a
group, attention heads exchanged by all-to-all around attention (DeepSpeed-Ulysses' design).

``sp`` is carved out of the language model's data-parallel ranks, as ``ep`` is: the ``dp = dp_replicate *
dp_shard`` ranks (row-major, ``dp_shard`` innermost) form ``dp / sp`` groups of ``sp`` neighbouring ranks. The
ranks of a group load the same samples (one data-parallel share: ``ParallelContext.dp_size`` counts shares);
rank ``i`` of a group runs the language model's layers on the tokens ``[i*c, (i+1)*c)`` of every sequence,
``c = ceil(S / sp)`` (the sequence is padded at its end to ``sp * c`` inside the forward; padding is never
scored). Parameters stay data parallel over all ``dp`` ranks (FSDP2 shards them over the SP ranks too, as
torchtitan does), and gradients are summed over all of them: each rank's loss is its slice's share of the
step's loss.

The forward (:class:`SequenceParallelLM`, installed as the language model's ``forward``):

- the modality embeddings are placed at their placeholders and the positions (plain, packed documents, M-RoPE)
  are computed on the whole sequence before the split, so a rank's rotary angles are the global positions of
  its slice, and an item whose placeholders straddle a slice boundary is split like any other tokens;
- encoders run on whole items: every rank of a group encodes all of its share's items (replicated work; their
  gradients sum over the group, each rank's carrying only its slice's placeholders);
- in every attention layer (``Attention.attention_hook``) one all-to-all turns q, k, v ``(B, heads, S/sp, D)``
  into ``(B, heads/sp, S, D)``, the layer's own attention runs on the whole sequence (causal, document masks of
  packed rows, padding masks, GQA: rank ``i`` holds query heads ``[i*h/sp, ...)`` and their kv heads
  ``[i*hkv/sp, ...)``), and a second all-to-all returns ``(B, heads, S/sp, D)``; both are differentiable;
- the final hidden states come back ``(B, S, H)``: in training (gradients on) zeros outside the rank's slice,
  and the training step (``ParallelContext.local_batch``) scores only the slice's next-token predictions by a
  loss mask (the labels stay whole, so the shift is done before the split: the slice's last token predicts the
  next slice's first label); without gradients (evaluation) all-gathered, so every rank has the whole
  sequence's logits.

Not supported (refused by the layout checks): pipeline stages, tensor parallelism, expert parallelism, MoE
router losses, output modalities, split layouts and modalities with another data-parallel layout; a KV cache
(generation) under ``sp``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimo_spec.errors import InputError

SP_DIMS = ("pp", "sdp", "sp", "tp")  # the mesh of an SP module: pp, its data-parallel shares, sp, tp


def slice_bounds(length: int, sp: int, index: int) -> tuple[int, int, int]:
    """Rank ``index``'s real tokens ``[lo, hi)`` of a sequence of ``length`` split over ``sp`` ranks, and the
    slice length ``c = ceil(length / sp)`` (the padded sequence is ``sp * c``; a slice may hold padding only)."""
    chunk = -(-length // sp)
    lo = min(index * chunk, length)
    return lo, min(lo + chunk, length), chunk


def sp_groups(m) -> list[list[int]]:
    """The SP groups of a module layout ``m`` (ranks sharing the same samples), each ascending."""
    groups = []
    for stage in range(m.pp):
        for share in range(m.dp // m.sp):
            for t in range(m.tp):
                groups.append([m.offset + ((stage * m.dp + share * m.sp + i) * m.tp) + t for i in range(m.sp)])
    return groups


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` (sp, ...): chunk ``j`` to rank ``j`` of ``group``; returns (sp, ...) with chunk ``j`` from rank ``j``.
    Differentiable (backward runs the reverse exchange)."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

    return wait_tensor(all_to_all_single_autograd(x.contiguous(), None, None, group))


class UlyssesAttention:
    """``Attention.attention_hook`` under sequence parallelism: sequence slices in, head groups for attention,
    sequence slices out. ``group``: the SP process group, ``sp`` its size."""

    def __init__(self, group, sp: int):
        self.group, self.sp = group, sp

    def __call__(self, core, q, k, v, **kw):
        n = self.sp
        B, h, s, D = q.shape
        hkv = k.shape[1]
        # one exchange for q, k and v: (B, n, heads/n, s, D) each, head groups side by side, rank-major
        x = torch.cat([t.reshape(B, n, t.shape[1] // n, s, D) for t in (q, k, v)], dim=2).transpose(0, 1)
        x = _all_to_all(x, self.group)  # (n, B, c, s, D): chunk j is rank j's slice of this rank's heads
        x = x.permute(1, 2, 0, 3, 4).reshape(B, -1, n * s, D)  # (B, c, S, D), slices in sequence order
        q, k, v = x.split([h // n, hkv // n, hkv // n], dim=1)
        y = core(q.contiguous(), k.contiguous(), v.contiguous(), **kw)  # (B, h/n, S, D)
        y = y.reshape(B, h // n, n, s, D).permute(2, 0, 1, 3, 4)  # (n, B, h/n, s, D): slice j goes to rank j
        y = _all_to_all(y, self.group)  # chunk j: head group j of this rank's slice
        return y.transpose(0, 1).reshape(B, h, s, D)


def _pad_seq(t: torch.Tensor | None, pad: int, value=None) -> torch.Tensor | None:
    """``t`` (..., S) padded by ``pad`` positions at the end of its last dim: with ``value``, else its last
    value repeated (positions and document ids: padding joins the last document, after every real token)."""
    if t is None or pad == 0:
        return t
    if value is not None:
        return F.pad(t, (0, pad), value=value)
    return torch.cat([t, t[..., -1:].expand(*t.shape[:-1], pad)], dim=-1)


class SequenceParallelLM:
    """The language model's ``forward`` under sequence parallelism (see the module docstring): the same
    arguments and result as ``GPT.forward``; this rank runs the layers on its slice."""

    def __init__(self, lm: nn.Module, group, sp: int, index: int):
        self.lm, self.group, self.sp, self.index = lm, group, sp, index

    def __call__(self, inputs_embeds: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                 kv_cache=None, layer_additions: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        lm, n = self.lm, self.sp
        if kv_cache is not None:
            raise InputError("a KV cache (incremental decoding) cannot run under sequence parallelism",
                             path="kv_cache", hint="generate in one process, or with a layout without sp")
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != lm.hidden_size:
            raise InputError(f"expected shape (B, S, {lm.hidden_size}), got {tuple(inputs_embeds.shape)}",
                             path="inputs_embeds")
        B, S, _ = inputs_embeds.shape
        if position_ids is not None:
            lm._check_position_ids(position_ids, B, S)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: no mask (as GPT.forward)
        if lm.position_embedding_kind == "learned" and S > lm.max_seq_len:
            raise InputError(f"sequence length {S} exceeds max_seq_len {lm.max_seq_len}", path="inputs_embeds",
                             hint="truncate the input or raise max_seq_len")
        if position_ids is None and lm.position_embedding_kind != "none":
            position_ids = torch.arange(S, device=inputs_embeds.device)[None].expand(B, S)
        x = lm.add_positions(inputs_embeds, position_ids)
        _, _, chunk = slice_bounds(S, n, self.index)
        pad = chunk * n - S
        if pad:  # at the end: causal attention keeps every real token from seeing it
            x = F.pad(x, (0, 0, 0, pad))
            position_ids = _pad_seq(position_ids, pad)
            document_ids = _pad_seq(document_ids, pad)
            attention_mask = _pad_seq(attention_mask, pad, value=0)
        # rotary angles and the mask of the whole (padded) sequence; each rank rotates its slice's q and k
        rope, attn_mask, is_causal = lm.attention_inputs(x, position_ids, attention_mask, document_ids)
        a, b = self.index * chunk, (self.index + 1) * chunk
        if rope is not None:
            rope = (rope[0][:, a:b], rope[1][:, a:b])
        x = x[:, a:b]
        if layer_additions:
            bad = [i for i in layer_additions if not 0 <= i < len(lm.layers)]
            if bad:
                raise InputError(f"layer {bad[0]} is not a layer of this {len(lm.layers)}-layer model",
                                 path="layer_additions", hint="check the modality's deepstack_lm_layers")
        for i, layer in enumerate(lm.layers):
            x = layer(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
            if layer_additions and i in layer_additions:
                x = x + F.pad(layer_additions[i], (0, 0, 0, pad))[:, a:b].to(x.dtype)
        x = lm.norm(x)
        if torch.is_grad_enabled():  # training: the slice in place, zeros elsewhere (only the slice is scored)
            return F.pad(x, (0, 0, a, chunk * n - b))[:, :S]
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(n)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)[:, :S]


def sp_unsupported(lm: nn.Module) -> str | None:
    """Why ``lm`` cannot run under sequence parallelism (None: it can): it needs GPT's layer interface
    (``add_positions``, ``attention_inputs``, ``layers`` of blocks whose ``attn`` takes an attention hook, ``norm``)."""
    need = ("add_positions", "attention_inputs", "layers", "norm", "_check_position_ids")
    missing = [a for a in need if not hasattr(lm, a)]
    if missing:
        return f"{type(lm).__name__} lacks {', '.join(missing)}"
    if any(not hasattr(getattr(block, "attn", None), "attention_hook") for block in lm.layers):
        return f"the layers of {type(lm).__name__} have no attention hook"
    return None


def install_sequence_parallel(lm: nn.Module, group, sp: int, index: int) -> None:
    """Run ``lm`` (a GPT) under Ulysses sequence parallelism over ``group`` (``sp`` ranks; this rank ``index``):
    its forward takes the slice (:class:`SequenceParallelLM`) and every attention layer exchanges heads."""
    why = sp_unsupported(lm)
    if why is not None:
        raise ValueError(f"sequence parallelism: {why}")
    hook = UlyssesAttention(group, sp)
    for block in lm.layers:
        block.attn.attention_hook = hook
    lm.forward = SequenceParallelLM(lm, group, sp, index)


def sequence_share(batch: dict, sp: int, index: int) -> dict:
    """This rank's part of a data-parallel share under sequence parallelism: the same rows, whole, with a loss mask
    that counts only the next-token predictions made at the rank's slice ``[lo, hi)`` (labels ``lo+1 .. hi``),
    and ``num_tokens`` those counted tokens (the SP ranks' counts sum to the share's)."""
    from mimo_spec.loss import token_weights

    labels = batch["labels"]
    lo, hi, _ = slice_bounds(labels.shape[1], sp, index)
    keep = torch.zeros_like(labels)
    keep[:, lo + 1:hi + 1] = 1
    out = dict(batch)
    mask = batch.get("loss_mask")
    out["loss_mask"] = keep if mask is None else mask * keep.to(mask.dtype)
    out["num_tokens"] = int(token_weights(labels, out["loss_mask"], out.get("document_ids")).sum())
    return out
