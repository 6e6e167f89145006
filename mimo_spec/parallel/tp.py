"""Tensor parallelism from the plans components declare.

A component class states its plan as attributes (see ``layers.Attention``)::

    tp_plan = {"qkv": "colwise", "out": "rowwise"}   # child -> style
    tp_split = ("num_heads", "num_kv_heads")          # must divide by tp; each rank keeps 1/tp
    tp_divides = ("vocab_size",)                      # must divide by tp
    def tp_fused_parts(self): {"qkv": [q_rows, k_rows, v_rows]}

A fused projection (rows ``[q; k; v]``) is sharded part by part: its rows are
interleaved before sharding so rank r holds ``[q_r; k_r; v_r]``, and
:func:`canonical` undoes it wherever weights leave the model (checkpoints,
comparisons), so saved tensors always have the single-process layout.

The LM head's style ``vocab_head`` keeps the logits sharded on the vocabulary (a DTensor,
``Shard(-1)``) so the loss is computed without ever gathering (B, S, V) logits on one rank
(:func:`vocab_parallel_cross_entropy`); :func:`full_logits` gathers them where a caller really
needs all of them (generation, ``MimoOutput.logits``). With the layout's ``loss_parallel: false``
the head gathers its output instead (``colwise_gather``). A tied head (``tie_embeddings``) is the
vocabulary-sharded embedding weight itself (:func:`tied_logits`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

STYLES = ("colwise", "rowwise", "embedding", "colwise_gather", "vocab_head")


def _style(kind: str, loss_parallel: bool = True):
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if kind == "vocab_head":  # logits stay a vocab-sharded DTensor for the vocab-parallel loss
        kind = "vocab_sharded" if loss_parallel else "colwise_gather"
    if kind == "vocab_sharded":
        return ColwiseParallel(use_local_output=False)
    if kind == "colwise":
        return ColwiseParallel()
    if kind == "rowwise":
        return RowwiseParallel()
    if kind == "embedding":
        return RowwiseParallel(input_layouts=Replicate())
    if kind == "colwise_gather":
        return ColwiseParallel(output_layouts=Replicate())
    raise ValueError(f"unknown TP style {kind!r}; expected one of {', '.join(STYLES)}")


def tp_divisibility(module: nn.Module):
    """(module path, attribute, value) of every size a TP plan in ``module`` needs divisible by tp.

    Deduplicated by (attribute, value): a size several modules split (the model's ``num_kv_heads``
    and every attention layer's) is reported once, at its outermost holder.
    """
    seen = set()
    for name, sub in module.named_modules():
        for attr in getattr(sub, "tp_split", ()) + getattr(sub, "tp_divides", ()):
            key = (attr, getattr(sub, attr))
            if key not in seen:
                seen.add(key)
                yield name or type(sub).__name__, attr, getattr(sub, attr)


def interleave_index(parts: list[int], tp: int) -> torch.Tensor:
    """Row order that puts chunk r of every part together: rank r's shard is [p0_r; p1_r; ...]."""
    starts = [sum(parts[:i]) for i in range(len(parts))]
    idx = [torch.arange(s + r * (n // tp), s + (r + 1) * (n // tp)) for r in range(tp) for s, n in zip(starts, parts)]
    return torch.cat(idx)


def apply_tp(module: nn.Module, tp_mesh, prefix: str, loss_parallel: bool = True) -> dict[str, torch.Tensor]:
    """Shard every planned child of ``module`` over ``tp_mesh``; returns {param fqn: interleave index}.

    ``loss_parallel``: ``vocab_head`` outputs (and a tied head, see :func:`tied_logits`) stay
    sharded on the vocabulary; false gathers them (the full logits on every TP rank).
    """
    from torch.distributed.tensor.parallel import parallelize_module

    tp = tp_mesh.size()
    fused: dict[str, torch.Tensor] = {}
    for name, sub in list(module.named_modules()):
        plan = getattr(type(sub), "tp_plan", None)
        if not plan:
            continue
        parts = sub.tp_fused_parts() if hasattr(sub, "tp_fused_parts") else {}
        styles = {}
        for child, kind in plan.items():
            lin = getattr(sub, child, None)
            if lin is None:
                continue
            if child in parts:
                index = interleave_index(parts[child], tp)
                for pname, p in lin.named_parameters(recurse=False):
                    with torch.no_grad():
                        p.copy_(p[index])
                    fused[".".join(x for x in (prefix, name, child, pname) if x)] = index
            styles[child] = _style(kind, loss_parallel)
        if "vocab_head" in plan.values():
            sub.tp_gather_logits = not loss_parallel  # read by a tied head, which has no module to style
        parallelize_module(sub, tp_mesh, styles)
        for attr in getattr(sub, "tp_split", ()):
            setattr(sub, attr, getattr(sub, attr) // tp)
    return fused


def canonical(fqn: str, tensor: torch.Tensor, fused: dict[str, torch.Tensor]) -> torch.Tensor:
    """A full, plain tensor in the single-process layout (gathers DTensors, undoes interleaving)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    if fqn in fused:
        tensor = tensor[torch.argsort(fused[fqn])]
    return tensor


# ---------------------------------------------------------------------------- vocab-sharded logits


def _dtensor_type():
    """DTensor, or None where this torch build has no torch.distributed (nothing can be sharded)."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_vocab_sharded(logits: torch.Tensor) -> bool:
    """True for logits a ``vocab_head`` (or tied head) left sharded on their last (vocabulary) dim."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(logits, dtensor):
        return False
    return any(p.is_shard(logits.dim() - 1) for p in logits.placements)


def full_logits(logits: torch.Tensor) -> torch.Tensor:
    """Plain (..., V) logits: vocab-sharded ones are gathered (a collective: every TP rank must call it)."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(logits, dtensor):
        return logits.full_tensor()
    return logits


def tied_logits(hidden: torch.Tensor, weight: torch.Tensor, gather: bool = False) -> torch.Tensor:
    """hidden (..., H) @ weight (V, H).T for a head tied to the token embedding.

    Under TP the embedding weight is sharded on the vocabulary (``embedding`` style), so the
    replicated hidden states times each rank's rows give that rank's vocabulary slice of the
    logits; both uses of the one parameter add their gradients to it. ``gather`` returns the
    full logits instead (the layout's ``loss_parallel: false``).
    """
    import torch.nn.functional as F

    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(weight, dtensor):
        return F.linear(hidden, weight)
    from torch.distributed.tensor import Replicate

    if not isinstance(hidden, dtensor):
        hidden = dtensor.from_local(hidden, weight.device_mesh, [Replicate()] * weight.device_mesh.ndim,
                                    run_check=False)
    out = F.linear(hidden, weight)
    return out.full_tensor() if gather else out


class _LossParallelCE(torch.autograd.Function):
    """Per-token cross entropy of vocab-sharded logits through torch's ``loss_parallel``.

    ``loss_parallel`` also needs the backward pass inside its context, but the training loop calls
    ``backward()`` far from the model; so the forward builds its own small graph from a detached
    copy of the logits and the backward replays it under the context (no logits are gathered
    in either direction: each rank's gradient is its own vocabulary slice).
    """

    @staticmethod
    def forward(ctx, logits, labels, ignore_index):
        import torch.nn.functional as F
        from torch.distributed.tensor.parallel import loss_parallel

        with torch.enable_grad():
            leaf = logits.detach().requires_grad_(logits.requires_grad)
            with loss_parallel():
                per_token = F.cross_entropy(leaf, labels, ignore_index=ignore_index, reduction="none")
        ctx.leaf, ctx.per_token = leaf, per_token
        return per_token.detach().to_local()  # replicated over the TP ranks: every rank has all N

    @staticmethod
    def backward(ctx, grad):
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor.parallel import loss_parallel

        per_token = ctx.per_token
        grad = DTensor.from_local(grad.contiguous(), per_token.device_mesh, per_token.placements, run_check=False)
        with loss_parallel():
            (g,) = torch.autograd.grad(per_token, ctx.leaf, grad)
        ctx.leaf = ctx.per_token = None
        return g, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-token cross entropy (reduction 'none') of logits (..., V) sharded on V and labels (...).

    Returns a plain tensor shaped like ``labels``, the same on every TP rank; only (N,)-sized
    values cross ranks (the max, the sum of exponentials and the target logit).
    """
    from torch.distributed.tensor import DTensor, Shard

    mesh, v = logits.device_mesh, logits.shape[-1]
    local = logits.to_local()
    flat = DTensor.from_local(local.reshape(-1, local.shape[-1]), mesh,
                              [Shard(1) if p.is_shard(logits.dim() - 1) else p for p in logits.placements],
                              run_check=False, shape=torch.Size((local[..., 0].numel(), v)),
                              stride=(v, 1))
    per_token = _LossParallelCE.apply(flat, labels.reshape(-1), ignore_index)
    return per_token.view(labels.shape)
