"""Tensor parallelism from the plans in :mod:`mimo_spec.parallel.plans` (keyed by component class).

A LoRA / DoRA adapter on a sharded Linear (``<linear>.adapter``, :mod:`mimo_spec.peft`) follows its
base: column-parallel base, ``B`` and the DoRA magnitude sharded on rows (one tensor per fused part,
so no interleaving) and ``A`` replicated; row-parallel base, ``A`` sharded on columns, the rest
replicated (:func:`mimo_spec.peft.shard_adapter`).

A fused projection (rows ``[q; k; v]``) is sharded part by part: its rows are
interleaved before sharding so rank r holds ``[q_r; k_r; v_r]``, and
:func:`canonical` undoes it wherever weights leave the model (checkpoints,
comparisons), so saved tensors always have the single-process layout.

The LM head's style ``vocab_head`` keeps the logits sharded on the vocabulary (a DTensor,
``Shard(-1)``): the training step runs forward and backward under torch's ``loss_parallel()``
(``ParallelContext.train_context``), so the loss never gathers (B, S, V) logits on one rank;
:func:`full_logits` gathers them where a caller really needs all of them (generation). With the
layout's ``loss_parallel: false`` the head gathers its output instead (``colwise_gather``). A tied
head (``tie_embeddings``) multiplies by the vocabulary-sharded embedding weight itself.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mimo_spec.parallel.plans import STYLES


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


def interleave_index(parts: list[int], tp: int) -> torch.Tensor:
    """Row order that puts chunk r of every part together: rank r's shard is [p0_r; p1_r; ...]."""
    starts = [sum(parts[:i]) for i in range(len(parts))]
    idx = [torch.arange(s + r * (n // tp), s + (r + 1) * (n // tp)) for r in range(tp) for s, n in zip(starts, parts)]
    return torch.cat(idx)


def apply_tp(module: nn.Module, tp_mesh, prefix: str, loss_parallel: bool = True) -> dict[str, torch.Tensor]:
    """Shard every child a registered plan names (:func:`mimo_spec.parallel.plans.tp_plan_for`) of every
    module inside ``module`` over ``tp_mesh``; returns {param fqn: interleave index} of the fused ones.

    ``loss_parallel``: ``vocab_head`` outputs stay sharded on the vocabulary; false gathers them (the
    full logits on every TP rank). Nothing but the parameters changes: the modules read their per-rank
    head counts from the sharded projections' shapes.
    """
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import parallelize_module

    from mimo_spec.parallel.plans import tp_plan_for

    tp = tp_mesh.size()
    fused: dict[str, torch.Tensor] = {}
    for name, sub in list(module.named_modules()):
        plan = tp_plan_for(sub)
        if plan is None or not plan.styles:
            continue
        parts = plan.fused(sub) if plan.fused is not None else {}
        styles, adapted = {}, {}
        for child, kind in plan.styles.items():
            lin = getattr(sub, child, None)
            if lin is None:
                continue
            if "adapter" in lin._modules:  # a LoRA / DoRA adapter (mimo_spec.peft): sharded after its base
                adapted[child] = (lin, lin._modules.pop("adapter"), kind)
            if child in parts:
                index = interleave_index(parts[child], tp)
                for pname, p in lin.named_parameters(recurse=False):
                    with torch.no_grad():
                        p.copy_(p[index])
                    fused[".".join(x for x in (prefix, name, child, pname) if x)] = index
            styles[child] = _style(kind, loss_parallel)
        if styles:
            parallelize_module(sub, tp_mesh, styles)
        for child, (lin, adapter, kind) in adapted.items():
            from mimo_spec.peft import shard_adapter

            lin.add_module("adapter", adapter)
            shard_adapter(lin, kind, tp_mesh, ".".join(x for x in (prefix, name, child) if x))
        for pname in plan.sharded:  # the module's own row-sharded parameters (Attention's q_bias / v_bias)
            p = getattr(sub, pname, None)
            if isinstance(p, nn.Parameter):
                sub.register_parameter(pname, nn.Parameter(distribute_tensor(p.data, tp_mesh, [Shard(0)]),
                                                           requires_grad=p.requires_grad))
    return fused


def tp_partial_params(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module`` whose gradients each TP rank holds only in part (its heads' share): the
    children a plan names ``partial`` (per-head q/k norms, shared by all heads), summed over the TP ranks."""
    from mimo_spec.parallel.plans import tp_plan_for

    out = []
    for sub in module.modules():
        plan = tp_plan_for(sub)
        for child in plan.partial if plan is not None else ():
            part = getattr(sub, child, None)
            if isinstance(part, nn.Module):
                out += [p for p in part.parameters() if p.requires_grad]
    return out


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
