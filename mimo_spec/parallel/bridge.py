"""Moving modality embeddings between modules with different data-parallel layouts (colocated).

A modality whose data-parallel degree differs from the language model's encodes its own
share of the global batch's items, all-gathers the embeddings over its data-parallel
group (autograd-aware: the backward reduce-scatters the gradients back to the encoding
rank) and hands the language model the items of its local samples, as
``MimoModel.forward(modality_embeddings=)``. Several ranks of
that group can consume the same item (TP peers of the language model): each scales its
gradient by 1/consumers, so summing them gives the single-process gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def take_items(inputs: dict, lo: int, hi: int, pad_to: int) -> dict:
    """Items [lo, hi) of {encoder: {kwarg: (N, ...)}}, padded with copies of item 0 to ``pad_to`` items."""
    out = {}
    for enc, kws in inputs.items():
        out[enc] = {}
        for kw, t in kws.items():
            part = t[lo:hi]
            if part.shape[0] < pad_to:
                part = torch.cat([part, t[:1].expand(pad_to - part.shape[0], *t.shape[1:])])
            out[enc][kw] = part
    return out


class ModalityBridge:
    """Encodes a modality whose data-parallel layout differs from the language model's: this rank's chunk
    of the global batch's items, all-gathered over the modality's data-parallel group. The training
    step hands the result to the model as ``modality_embeddings=`` (the modality's own ``encode`` is
    left as it is)."""

    def __init__(self, modality: nn.Module, group, my_index: int, consumers: int):
        self.modality = modality
        self.group, self.my_index, self.consumers = group, my_index, consumers
        self.size = torch.distributed.get_world_size(group)

    def __call__(self, global_inputs: dict, lo: int, hi: int) -> torch.Tensor:
        """Items [lo, hi) of the global batch's ``global_inputs`` {encoder: {kwarg: (N, ...)}} as embeddings
        (items * tokens_per_item, H): the same as ``encode`` of those items in one process."""
        from torch.distributed.nn.functional import all_gather

        n = next(iter(next(iter(global_inputs.values())).values())).shape[0]
        chunk = math.ceil(n / self.size)
        start = min(n, self.my_index * chunk)
        mine = self.modality.encode(take_items(global_inputs, start, min(n, start + chunk), chunk))  # (chunk*T, H)
        tokens = mine.shape[0] // chunk
        everything = torch.cat(all_gather(mine.contiguous(), group=self.group))[: n * tokens]
        return _ScaleGrad.apply(everything[lo * tokens: hi * tokens], 1.0 / self.consumers)
