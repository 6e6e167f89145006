"""M-RoPE positions (Qwen2-VL / Qwen2.5-VL / Qwen3-VL): 3-D (temporal, height, width) position ids
from the token ids and the items' grids, computed as transformers' ``get_rope_index`` does.

A text token's position is the same on all three axes and counts on from the token before it. An
item (an image, a video) whose placeholder run starts at position ``p`` has, over its merged grid
``(t, h / merge, w / merge)`` in row-major order, positions ``p + (t_i * interval, h_i, w_i)``, and
the text after it continues at ``p + max(h, w) / merge``. Padding (``attention_mask`` 0) is left
out and gets position 0. ``rope_deltas`` (B, 1) is ``max position + 1 - real tokens`` per row:
the positions of tokens generated after the prompt are ``real tokens so far + rope_deltas`` on all
three axes (:func:`mrope_next_positions`), i.e. (B, S) text positions ``GPT.forward`` takes as is.

Host-side data preparation: the grids are host data (``.tolist()`` is called on them) and checking the
placeholder counts reads one count back from ``input_ids``' device; the rest is vectorised tensor
code on that device (no Python loop over tokens or rows).

Differences from transformers, both where transformers cannot give an answer: items are told apart by
their grids' token counts, so two items with no text between them are two items (transformers
groups consecutive placeholders into one item and fails), and a count that disagrees with the
grids is an ``InputError`` naming both numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from mimo_spec.errors import InputError

__all__ = ["MropeStream", "mrope_position_ids", "mrope_positions", "mrope_next_positions"]


def mrope_position_ids(
    input_ids: torch.Tensor,
    image_token_id: int | None,
    image_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None,
    spatial_merge_size: int = 2,
    *,
    attention_mask: torch.Tensor | None = None,
    video_token_id: int | None = None,
    video_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None = None,
    video_time_interval: torch.Tensor | Sequence[float] | float | None = None,
    video_frames_as_items: bool = False,
    document_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D M-RoPE positions and generation deltas for a batch.

    Args:
        input_ids: (B, S) token ids; the image (video) items' placeholders are ``image_token_id``
            (``video_token_id``) tokens, one run per item, in the order of the grids (row-major over
            the batch, as transformers consumes them).
        image_grid_thw: (N, 3) patch grids (temporal, height, width) of the images, before merging,
            as Qwen2-VL's image processor returns them. Item k has ``t * h * w / merge**2`` tokens.
        spatial_merge_size: the vision tower's merge (2 for Qwen2/2.5/3-VL).
        attention_mask: (B, S) 1 = real token, 0 = padding (any side).
        video_token_id, video_grid_thw: the same for videos.
        video_time_interval: temporal position step per video frame group: a number or one per video
            (Qwen2.5-VL: ``tokens_per_second * second_per_grid_ts``; default 1: Qwen2-VL). Images
            always step 1 (they have one temporal group).
        video_frames_as_items: Qwen3-VL: each frame group of a video is its own item (its
            placeholder runs are separated by timestamp text), as transformers splits
            ``video_grid_thw`` into ``t`` grids of ``t = 1``.
        document_ids: (B, S) packed rows: positions restart at 0 in every document.

    Returns:
        position_ids (3, B, S) int64 (padding 0) and rope_deltas (B, 1) int64.

    Raises:
        InputError: placeholder counts that disagree with the grids (both numbers named), an item
        whose placeholders are not one run inside one row, a grid not divisible by the merge.
    """
    streams = [MropeStream("image", image_token_id, image_grid_thw, spatial_merge_size),
               MropeStream("video", video_token_id, video_grid_thw, spatial_merge_size, video_time_interval,
                           video_frames_as_items)]
    for st in streams:
        if st.token_id is None and st.grids is not None and len(st.grids):
            raise InputError(f"{st.name}_grid_thw given without {st.name}_token_id", path=f"{st.name}_token_id")
    return mrope_positions(input_ids, [st for st in streams if st.token_id is not None],
                           attention_mask=attention_mask, document_ids=document_ids)


@dataclass
class MropeStream:
    """One kind of item in the sequence: its placeholder token, its (N, 3) patch grids (t, h, w) before
    merging, the tower's spatial merge, the temporal step per frame group (a number or one per item;
    None: 1) and whether each frame group is an item of its own (Qwen3-VL videos)."""

    name: str
    token_id: int | None
    grids: object
    spatial_merge_size: int = 2
    time_interval: object = None
    frames_as_items: bool = False


def mrope_positions(input_ids: torch.Tensor, streams: Sequence[MropeStream], *,
                    attention_mask: torch.Tensor | None = None,
                    document_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mrope_position_ids` for any number of item streams (modalities)."""
    if input_ids.dim() != 2:
        raise InputError(f"expected shape (B, S), got {tuple(input_ids.shape)}", path="input_ids")
    B, S = input_ids.shape
    device = input_ids.device
    real = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
            else attention_mask.to(device=device, dtype=torch.bool))
    if real.shape != input_ids.shape:
        raise InputError(f"expected shape {tuple(input_ids.shape)}, got {tuple(real.shape)}", path="attention_mask")
    step = real.flatten().long()  # how far each token moves the next position: text 1, padding 0
    offsets = torch.zeros(3, B * S, dtype=torch.long, device=device)  # item tokens' (t, h, w) offsets

    for st in streams:
        name, token_id, interval = st.name, st.token_id, st.time_interval
        grid = _grids(st.grids, name, st.spatial_merge_size)  # (N, 3) merged grids, on the host
        times = _intervals(interval, len(grid), name)
        if st.frames_as_items and len(grid):
            times = times.repeat_interleave(grid[:, 0])
            grid = grid.repeat_interleave(grid[:, 0], dim=0)
            grid[:, 0] = 1
        where = ((input_ids == token_id) & real).flatten().nonzero().squeeze(1)  # (M,) flat token indices
        counts = grid.prod(1)
        if where.numel() != int(counts.sum()):
            raise InputError(f"{where.numel()} {name} placeholder tokens (id {token_id}) but the {len(grid)} "
                             f"{name} grid(s) make {int(counts.sum())} (t * h * w / {st.spatial_merge_size}**2 "
                             f"each: {counts.tolist()})", path="input_ids",
                             hint=f"one run of placeholders per {name}, in the order of its grids")
        if not len(grid):
            continue
        grid, counts, times = grid.to(device), counts.to(device), times.to(device)
        ends = counts.cumsum(0)
        starts = ends - counts
        first, last = where[starts], where[ends - 1]
        bad = ((last - first) != counts - 1) | (first // S != last // S)
        if bool(bad.any()):
            k = int(bad.nonzero()[0])
            raise InputError(f"{name} {k}'s {int(counts[k])} placeholder tokens are not one run in one row",
                             path="input_ids", hint=f"check {name} {k}'s grid against the placeholders")
        index = torch.arange(where.numel(), device=device)
        item = torch.searchsorted(ends, index, right=True)  # which item each placeholder belongs to
        o = index - starts[item]  # offset inside the item, row-major over (t, h, w)
        _, h, w = grid[item].unbind(1)
        t_i = o // (h * w)
        t_pos = (t_i.to(torch.float32) * times[item]).long() if interval is not None else t_i
        offsets[:, where] = torch.stack([t_pos, (o // w) % h, o % w])
        step[where] = 0  # an item moves the next position by max(h, w), counted at its last token
        step[last] = torch.maximum(grid[:, 1], grid[:, 2])

    step = step.view(B, S)
    base = step.cumsum(1) - step  # the position before each token (an item's tokens share their start)
    if document_ids is not None:  # every document starts again at 0
        idx = torch.arange(S, device=device).expand(B, S)
        starts = torch.ones_like(document_ids, dtype=torch.bool)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
        base = base - base.gather(1, first)
    positions = torch.where(real, base[None] + offsets.view(3, B, S), 0)
    top = torch.where(real, positions, -1).amax(dim=(0, 2))  # -1 for a row of padding only
    rope_deltas = (top + 1 - real.sum(1))[:, None]
    return positions, rope_deltas


def mrope_next_positions(rope_deltas: torch.Tensor, num_new: int, *, past_length: int | None = None,
                         attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, num_new) positions of tokens generated after a prompt with a KV cache (the same on all three
    axes, so ``GPT.forward`` takes them as plain (B, S) positions): the real tokens before them
    (``attention_mask`` (B, past) of everything cached, or ``past_length`` when nothing is padded)
    plus ``rope_deltas`` from :func:`mrope_position_ids`."""
    if (past_length is None) == (attention_mask is None):
        raise ValueError("pass exactly one of past_length and attention_mask")
    if attention_mask is not None:
        seen = attention_mask.to(torch.long).sum(1, keepdim=True)
    else:
        seen = torch.full_like(rope_deltas, past_length)
    return seen + torch.arange(num_new, device=rope_deltas.device) + rope_deltas


def _grids(grids, name: str, merge: int) -> torch.Tensor:
    """(N, 3) patch grids -> merged (t, h / merge, w / merge) on the host, checked."""
    if grids is None:
        return torch.zeros(0, 3, dtype=torch.long)
    rows = grids.tolist() if isinstance(grids, torch.Tensor) else [list(g) for g in grids]
    for k, row in enumerate(rows):
        if len(row) != 3 or any(int(v) < 1 for v in row):
            raise InputError(f"{name}_grid_thw[{k}] ({row}) must be 3 positive sizes (t, h, w)",
                             path=f"{name}_grid_thw")
        if row[1] % merge or row[2] % merge:
            raise InputError(f"{name}_grid_thw[{k}] ({row}): height and width must be divisible by "
                             f"spatial_merge_size {merge}", path=f"{name}_grid_thw")
    grid = torch.tensor(rows, dtype=torch.long).view(-1, 3)
    return torch.stack([grid[:, 0], grid[:, 1] // merge, grid[:, 2] // merge], dim=1)


def _intervals(interval, n: int, name: str) -> torch.Tensor:
    if interval is None:
        return torch.ones(n, dtype=torch.float32)
    values = torch.as_tensor(interval, dtype=torch.float32).flatten().cpu()
    if values.numel() == 1:
        return values.expand(n).clone()
    if values.numel() != n:
        raise InputError(f"{values.numel()} {name} time intervals for {n} {name}s", path=f"{name}_time_interval")
    return values
