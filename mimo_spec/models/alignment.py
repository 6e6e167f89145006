"""Placing modality embeddings at their placeholder tokens, per sample, in order.

The hot path (``align_modality_embeddings``) is vectorised with static shapes and
never syncs the host: the k-th placeholder of a modality (counting row by row)
takes the k-th embedding. Count checks live in ``check_placeholder_counts``,
which runs on the host where counting is cheap (input preparation).
"""

from __future__ import annotations

from typing import Sequence

import torch

from mimo_spec.errors import InputError


def align_modality_embeddings(text_embeds: torch.Tensor, input_ids: torch.Tensor,
                              modality_embeds: Sequence[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """Replace placeholder positions with modality embeddings.

    text_embeds: (B, S, H); input_ids: (B, S);
    modality_embeds: (placeholder token id, (N, H) embeddings in sample-then-item order).
    Returns (B, S, H).
    """
    b, s, h = text_embeds.shape
    out = text_embeds
    for token_id, embeds in modality_embeds:
        mask = input_ids == token_id  # (B, S)
        flat = mask.reshape(-1)
        if embeds.shape[0] == 0:  # no item in the batch: there must be no placeholder either
            torch._assert_async(~flat.any(), "placeholder count != modality embeddings (no items given)")
            if embeds.requires_grad:
                # an encoder that ran on an empty share of a batch (a data-parallel rank without items)
                # stays in the graph with zero weight: its backward runs, with zero gradients, in step
                # with the ranks that had items (FSDP's reduce-scatters, DDP's gradient sum)
                out = out + embeds.to(out.dtype).sum() * 0.0
            continue
        # index of each placeholder among all placeholders of this modality, row-major
        index = (torch.cumsum(flat, 0) - 1).clamp_(0, embeds.shape[0] - 1)
        # async: raises on the device if counts differ, without making the host wait
        torch._assert_async(flat.sum() == embeds.shape[0], "placeholder count != modality embeddings")
        gathered = embeds.to(out.dtype).index_select(0, index).view(b, s, h)
        out = torch.where(mask.unsqueeze(-1), gathered, out)
    return out


def gather_positions(hidden: torch.Tensor, input_ids: torch.Tensor, token_id: int, count: int) -> torch.Tensor:
    """Hidden states at the first ``count`` positions holding ``token_id`` (row-major), no host sync.

    hidden: (B, S, H) -> (count, H)
    """
    flat = (input_ids == token_id).reshape(-1)
    # stable sort puts the matching positions first, in order, with a static output shape
    order = torch.argsort((~flat).to(torch.int8), stable=True)[:count]
    torch._assert_async(flat.sum() == count, "generation token count != output targets")
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, order)


def gather_before(hidden: torch.Tensor, input_ids: torch.Tensor, token_id: int, count: int) -> torch.Tensor:
    """Hidden states at the positions just before each of the first ``count`` positions holding ``token_id``
    (row-major): the states that predict those positions (a discrete item's codes). No host sync.

    hidden: (B, S, H) -> (count, H). A row's first position is never such a token (the item's begin token,
    or text, comes before its codes); where it is, the state of the previous row's last position would be taken,
    so the count check below and the data path's layout keep it out.
    """
    flat = (input_ids == token_id).reshape(-1)
    order = torch.argsort((~flat).to(torch.int8), stable=True)[:count]
    torch._assert_async(flat.sum() == count, "generation token count != output target codes")
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, (order - 1).clamp(min=0))


def check_placeholder_counts(input_ids: torch.Tensor, expected: dict[str, tuple[int, list[int]]]) -> None:
    """Host-side check that each sample has exactly the placeholders its items produce.

    expected: modality -> (placeholder token id, per-sample embedding counts).
    Raises InputError naming the modality, the sample and both counts.
    """
    ids = input_ids.detach().cpu()
    for name, (token_id, per_sample) in expected.items():
        found = (ids == token_id).sum(dim=1).tolist()
        if len(per_sample) != len(found):
            raise InputError(f"items are given for {len(per_sample)} samples but the batch has {len(found)}",
                             path=f"modality_inputs.{name}")
        for i, (have, want) in enumerate(zip(found, per_sample)):
            if have != want:
                raise InputError(
                    f"sample {i} has {have} placeholder tokens (id {token_id}) but its items produce "
                    f"{want} embeddings", path=f"modality_inputs.{name}",
                    hint="expand each item to exactly one placeholder per embedding")


def split_items_by_placeholders(input_ids: torch.Tensor, token_id: int, item_tokens: list[int] | int,
                                num_items: int, name: str) -> list[int]:
    """Per-sample item counts implied by the placeholders, checked against the items' token counts.

    ``item_tokens``: each item's placeholder count (or one count for all ``num_items`` items). Items are
    consumed in order, sample by sample; a sample must end exactly at an item boundary.
    """
    if isinstance(item_tokens, int):
        item_tokens = [item_tokens] * num_items
    found = (input_ids.detach().cpu() == token_id).sum(dim=1).tolist()
    path = f"modality_inputs.{name}"
    uniform = len(set(item_tokens)) == 1 and item_tokens[0] > 0
    for i, have in enumerate(found):
        if uniform and have % item_tokens[0]:
            raise InputError(f"sample {i} has {have} placeholder tokens (id {token_id}), not a multiple of "
                             f"the {item_tokens[0]} embeddings each item produces", path=path,
                             hint="expand each item to exactly one placeholder per embedding")
    per_sample, k = [], 0
    for i, have in enumerate(found):
        start, used = k, 0
        while used < have and k < len(item_tokens):
            used += item_tokens[k]
            k += 1
        if used != have:
            given = item_tokens[start:k]
            if used < have:
                msg = (f"sample {i} has {have} placeholder tokens (id {token_id}) but its items produce {used} "
                       f"embeddings ({len(item_tokens)} items for the batch, {start} used by earlier samples)")
            else:
                msg = (f"sample {i} has {have} placeholder tokens (id {token_id}), which do not end at an item: "
                       f"its items {start}..{k - 1} produce {given} embeddings ({used} in all)")
            raise InputError(msg, path=path, hint="one placeholder per embedding, item after item; per sample: "
                             + ", ".join(map(str, found)))
        per_sample.append(k - start)
    if k < len(item_tokens):
        raise InputError(f"{len(item_tokens) - k} of the {len(item_tokens)} items have no placeholders (the batch "
                         f"has {sum(found)} placeholder tokens, id {token_id}; the items produce {sum(item_tokens)})",
                         path=path, hint="one placeholder per embedding; per sample: " + ", ".join(map(str, found)))
    return per_sample
