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
"""

from __future__ import annotations

import torch
import torch.nn as nn

STYLES = ("colwise", "rowwise", "embedding", "colwise_gather")


def _style(kind: str):
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

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
    """(module path, attribute, value) of every size a TP plan in ``module`` needs divisible by tp (deduplicated)."""
    seen = set()
    for name, sub in module.named_modules():
        for attr in getattr(sub, "tp_split", ()) + getattr(sub, "tp_divides", ()):
            key = (type(sub), attr, getattr(sub, attr))
            if key not in seen:
                seen.add(key)
                yield name or type(sub).__name__, attr, getattr(sub, attr)


def interleave_index(parts: list[int], tp: int) -> torch.Tensor:
    """Row order that puts chunk r of every part together: rank r's shard is [p0_r; p1_r; ...]."""
    starts = [sum(parts[:i]) for i in range(len(parts))]
    idx = [torch.arange(s + r * (n // tp), s + (r + 1) * (n // tp)) for r in range(tp) for s, n in zip(starts, parts)]
    return torch.cat(idx)


def apply_tp(module: nn.Module, tp_mesh, prefix: str) -> dict[str, torch.Tensor]:
    """Shard every planned child of ``module`` over ``tp_mesh``; returns {param fqn: interleave index}."""
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
            styles[child] = _style(kind)
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
