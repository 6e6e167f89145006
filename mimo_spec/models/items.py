"""A modality's items inside its encoder inputs: how many, how many rows each, and slices of them.

Two layouts of an encoder's keyword tensors (``modality_inputs[modality][encoder]``):

- items first (every fixed-size encoder: CLIP, Whisper): each tensor is ``(N, ...)``, item ``i`` is row ``i``.
- grid-packed (native-resolution encoders: Qwen2-VL's ``{"pixel_values", "image_grid_thw"}``): the
  encoder's ``grid_inputs`` maps a grid input (an ``(N, k)`` integer tensor, one row per item) to the
  inputs packed by it, whose rows are the items' rows back to back (item ``i`` holds
  ``encoder.rows_per_item(grid_name, grid)[i]`` of them). Inputs not packed by the grid stay items first
  (SigLIP2 NaFlex pads its patches per item: ``{"spatial_shapes": ()}``).

Grids are host data: :func:`host_inputs` names them so the data path keeps them on the CPU, and every
count here is read from them without touching a device.
"""

from __future__ import annotations

import torch

from mimo_spec.errors import InputError


def grid_of(encoder, kwargs: dict) -> tuple[str, tuple[str, ...]] | None:
    """(grid input name, names of the inputs it packs) when ``encoder`` takes a grid and ``kwargs`` has
    it, else None (items first)."""
    for grid, packed in (getattr(encoder, "grid_inputs", None) or {}).items():
        if grid in kwargs:
            return grid, tuple(packed)
    return None


def host_inputs(encoder) -> set[str]:
    """The encoder inputs kept on the host (its grids)."""
    return set(getattr(encoder, "grid_inputs", None) or {})


def count_items(encoder, kwargs: dict) -> int:
    """Items in one encoder's keyword tensors (shapes only)."""
    g = grid_of(encoder, kwargs)
    first = kwargs[g[0]] if g else next(iter(kwargs.values()))
    return int(first.shape[0])


def item_rows(encoder, kwargs: dict) -> list[int] | None:
    """Rows of each item in the packed inputs (host), or None for items-first inputs."""
    g = grid_of(encoder, kwargs)
    if g is None or not g[1]:
        return None
    return [int(r) for r in encoder.rows_per_item(g[0], kwargs[g[0]])]


def slice_items(encoder, kwargs: dict, lo: int, hi: int, rows: list[int] | None = None) -> dict:
    """Items ``[lo, hi)`` of one encoder's keyword tensors (views; packed inputs by their rows)."""
    g = grid_of(encoder, kwargs)
    packed = set(g[1]) if g else set()
    if packed and rows is None:
        rows = item_rows(encoder, kwargs)
    start, stop = (sum(rows[:lo]), sum(rows[:hi])) if packed else (lo, hi)
    return {kw: (t[start:stop] if kw in packed else t[lo:hi]) for kw, t in kwargs.items()}


def modality_item_count(modality, inputs: dict) -> int:
    """Items of a modality's inputs ``{encoder: {kw: tensor}}`` (every encoder sees the same items)."""
    name = next(iter(inputs))
    return count_items(_encoders(modality)[name], inputs[name])


def slice_modality_items(modality, inputs: dict, lo: int, hi: int) -> dict:
    """Items ``[lo, hi)`` of a modality's inputs ``{encoder: {kw: tensor}}``."""
    encoders = _encoders(modality)
    return {enc: slice_items(encoders[enc], kws, lo, hi) for enc, kws in inputs.items()}


def _encoders(modality):
    """The encoders a modality's items go through (its own, or those of the modality it takes them from); a
    discrete modality's raw items go to its tokenizer (``{"tokenizer": {"pixel_values": ...}}``)."""
    src = getattr(modality, "src", modality)
    if getattr(src, "tokenizer", None) is not None and not len(src.encoders):
        return {"tokenizer": src.tokenizer}
    return src.encoders


def check_grid_rows(encoder, kwargs: dict, path: str, what: str = "item") -> None:
    """Every packed input holds exactly the rows its grid gives (an InputError naming both numbers)."""
    g = grid_of(encoder, kwargs)
    if g is None:
        return
    grid = kwargs[g[0]]
    if grid.dim() != 2 or grid.is_floating_point() or grid.is_complex() or grid.dtype == torch.bool:
        raise InputError(f"expected an integer grid (N, k), one row per {what}, got {grid.dtype} "
                         f"{tuple(grid.shape)}", path=f"{path}.{g[0]}")
    if grid.device.type == "meta" or not g[1]:
        return
    rows = item_rows(encoder, kwargs)
    for kw in g[1]:
        if kw not in kwargs:
            raise InputError(f"missing input {kw!r} (packed by {g[0]})", path=f"{path}.{kw}",
                             hint=f"got {sorted(kwargs)}")
        have = int(kwargs[kw].shape[0])
        if have != sum(rows):
            raise InputError(f"{g[0]} gives {len(rows)} {what}(s) of {rows} rows ({sum(rows)} in all) but "
                             f"{kw} holds {have} rows", path=f"{path}.{kw}",
                             hint=f"pack the {what}s' rows back to back, in the order of {g[0]}")
