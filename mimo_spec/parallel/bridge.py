"""Moving modality embeddings between modules with different data-parallel layouts (colocated).

A modality whose data-parallel degree differs from the language model's encodes its own
share of the global batch's items, all-gathers the embeddings over its data-parallel
group (autograd-aware: the backward reduce-scatters the gradients back to the encoding
rank) and hands the language model the items of its local samples, as
``MimoModel.forward(modality_embeddings=)``. Several ranks of
that group can consume the same item (TP peers of the language model): each scales its
gradient by 1/consumers, so summing them gives the single-process gradient.

Items may differ in size (native-resolution encoders): ranks take chunks of items, not of
rows, and the all-gather pads each chunk to the largest with zero rows, trimmed afterwards
by the per-item token counts every rank reads from the grids on the host.
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


def chunk_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Items [lo, hi) of each of ``parts`` ranks sharing ``n`` items: contiguous chunks of ceil(n / parts)
    (the last ones shorter or empty)."""
    size = math.ceil(n / parts) if parts else 0
    return [(min(n, i * size), min(n, (i + 1) * size)) for i in range(parts)]


class ModalityBridge:
    """Encodes a modality whose data-parallel layout differs from the language model's: this rank's chunk
    of the global batch's items, all-gathered over the modality's data-parallel group. The training
    step hands the result to the model as ``modality_embeddings=`` (the modality's own ``encode`` is
    left as it is).

    Items may differ in size (grid inputs: each item has its own token count, read on the host from the
    grids by ``Modality.item_tokens``), so every rank's chunk is padded with zero rows to the largest
    chunk for the all-gather and trimmed back by those known counts. A modality taking another's
    encoders (``inputs_from``) encodes through them here like anywhere else (colocated: every rank
    holds them)."""

    def __init__(self, modality: nn.Module, group, my_index: int, consumers: int):
        self.modality = modality
        self.group, self.my_index, self.consumers = group, my_index, consumers
        self.size = torch.distributed.get_world_size(group)

    def __call__(self, global_inputs: dict, lo: int, hi: int) -> torch.Tensor:
        """Items [lo, hi) of the global batch's ``global_inputs`` {encoder: {kwarg: tensor}} as embeddings
        (their tokens, H): the same as ``encode`` of those items in one process."""
        from torch.distributed.nn.functional import all_gather

        from mimo_spec.models.items import modality_item_count, slice_modality_items

        mod = self.modality
        n = modality_item_count(mod, global_inputs)
        tokens = mod.item_tokens(global_inputs)  # per item, host data
        bounds = chunk_bounds(n, self.size)
        rows = [sum(tokens[a:b]) for a, b in bounds]
        start, stop = bounds[self.my_index]
        mine = mod.encode(slice_modality_items(mod, global_inputs, start, stop))  # (rows[me], H)
        if mine.shape[0] != rows[self.my_index]:
            raise RuntimeError(f"encoding items {start}..{stop} gave {mine.shape[0]} embeddings, their "
                               f"item_tokens say {rows[self.my_index]}")
        most = max(max(rows), 1)  # equal shapes for the all-gather (one row when no rank has any)
        if most > mine.shape[0]:
            mine = torch.cat([mine, mine.new_zeros(most - mine.shape[0], *mine.shape[1:])])
        gathered = all_gather(mine.contiguous(), group=self.group)
        everything = torch.cat([g[:r] for g, r in zip(gathered, rows)])
        first, last = sum(tokens[:lo]), sum(tokens[:hi])
        return _ScaleGrad.apply(everything[first:last], 1.0 / self.consumers)
