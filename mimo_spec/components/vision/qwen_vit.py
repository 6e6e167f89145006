"""Native-resolution vision tower of Qwen2-VL, Qwen2.5-VL and Qwen3-VL, and their 2x2 patch merger.

One encoder class covers the three towers by parameters (all: 2-D rotary positions, qkv with bias):

- Qwen2-VL: layernorm, gelu MLP with quick_gelu, attention per item (per frame of a video).
- Qwen2.5-VL: rmsnorm, swiglu MLP (silu) with bias, attention in windows of ``window_size`` pixels,
  over whole frames in ``fullatt_layers``.
- Qwen3-VL: layernorm, gelu_tanh MLP, patch bias, a learned ``num_position_embeddings`` table
  resized bilinearly to each item's grid, and DeepStack: the hidden states after ``deepstack_layers``
  returned next to the features.

Inputs use Hugging Face's names: ``{"pixel_values": (P, C*T*p*p), "image_grid_thw": (N, 3)}`` or
``{"pixel_values_videos", "video_grid_thw"}``. Each pixel row is one patch (``temporal_patch_size``
frames of ``patch_size`` x ``patch_size`` pixels), items one after the other, each item's patches in
HF's order: frame by frame, and inside a frame ``spatial_merge_size`` x ``spatial_merge_size`` blocks
in raster order, the patches of a block in raster order (so the merger sees a block as consecutive
rows). All items go through the blocks as ONE packed sequence; a block-diagonal boolean mask keeps
attention inside each frame of each item (what HF's ``cu_seqlens`` do), or inside each window.

Everything that depends on the grid (rotary positions, segment ids, window order, interpolation
taps) is built on the host from the grid, which stays a CPU tensor, and copied to the device: the
forward never reads a device tensor back.

State-dict keys::

    patch_embed.weight, .bias        (H, C, T, p, p): HF's Conv3d shape, applied as one matmul; bias with patch_bias
    pos_embed                        (num_position_embeddings, H)   learned table (Qwen3-VL only)
    layers.{i}.attn_norm / attn.qkv / attn.out / mlp_norm / mlp.fc1 / mlp.fc2   (fc1 = [gate; up] for swiglu)

``patch_merger`` keys: ``norm.{weight,bias}``, ``fc1.*``, ``fc2.*``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimo_spec.components.layers import (
    ActivationName,
    Backend,
    NormKind,
    TransformerBlock,
    build_norm,
    check_backend,
    get_activation,
    init_transformer_weights,
)
from mimo_spec.errors import InputError, ParamError, join_path
from mimo_spec.registry import register

# grid input -> (pixel input it packs, what one item is called in messages)
_GRIDS = {"image_grid_thw": ("pixel_values", "image"), "video_grid_thw": ("pixel_values_videos", "video")}


class PatchEmbed3d(nn.Module):
    """Conv3d with stride = kernel on pre-cut patch rows: (P, C*T*p*p) -> (P, H), as one matmul.

    The weight keeps Conv3d's shape (H, C, T, p, p), so checkpoints map to HF's one to one; flattened it
    is the linear map of a patch row laid out (C, T, p, p), which is how the Qwen processors cut them.
    """

    def __init__(self, num_channels: int, temporal_patch_size: int, patch_size: int, hidden_size: int,
                 bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size, num_channels, temporal_patch_size, patch_size,
                                               patch_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight.flatten(1), self.bias)


# ------------------------------------------------------------------ host-side layout from the grid


def grid_rows(grid: torch.Tensor) -> list[tuple[int, int, int]]:
    """The (t, h, w) of every item of an (N, 3) grid, as Python ints (a CPU grid: no device sync)."""
    if (not isinstance(grid, torch.Tensor) or grid.dim() != 2 or grid.shape[1] != 3 or grid.is_floating_point()
            or grid.is_complex() or grid.dtype == torch.bool):
        got = f"{grid.dtype} {tuple(grid.shape)}" if isinstance(grid, torch.Tensor) else type(grid).__name__
        raise InputError(f"expected an integer grid (N, 3) of (t, h, w) per item, got {got}",
                         hint="one row per item: temporal patches, height and width in patches")
    return [(int(t), int(h), int(w)) for t, h, w in grid.tolist()]


def merge_block_positions(h: int, w: int, merge: int) -> torch.Tensor:
    """(h*w, 2) (row, col) of a frame's patches in the merge-block order of the pixel rows."""
    rows = torch.arange(h // merge)[:, None, None, None] * merge + torch.arange(merge)[None, None, :, None]
    cols = torch.arange(w // merge)[None, :, None, None] * merge + torch.arange(merge)[None, None, None, :]
    shape = (h // merge, w // merge, merge, merge)  # (block row, block col, row in block, col in block)
    return torch.stack((rows.expand(shape), cols.expand(shape)), dim=-1).reshape(-1, 2)


def window_order(h: int, w: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A frame's merge units (an (h, w) grid, raster order) regrouped into ``window`` x ``window`` tiles:
    (unit order, tile id of each reordered unit). Tiles in raster order, units raster order inside a
    tile; edge tiles are smaller (HF pads, then drops the padding)."""
    r, c = torch.arange(h)[:, None], torch.arange(w)[None, :]
    tile = ((r // window) * math.ceil(w / window) + c // window).flatten()
    order = torch.argsort(tile, stable=True)
    return order, tile[order]


def bilinear_taps(pos: torch.Tensor, sizes: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and weights (S, 4) resampling a ``side`` x ``side`` table to each patch's grid
    (bilinear, align_corners=True): ``pos`` (S, 2) (row, col), ``sizes`` (S, 2) its item's (h, w)."""
    src = pos.to(torch.float32) * (side - 1) / (sizes - 1).clamp(min=1)  # (S, 2) source coordinates
    lo = src.floor()
    frac = src - lo
    lo = lo.long()
    hi = (lo + 1).clamp(max=side - 1)
    (r0, c0), (r1, c1) = lo.unbind(-1), hi.unbind(-1)
    fr, fc = frac.unbind(-1)
    index = torch.stack((r0 * side + c0, r0 * side + c1, r1 * side + c0, r1 * side + c1), dim=-1)
    weight = torch.stack(((1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc), dim=-1)
    return index, weight


# -------------------------------------------------------------------------------------- encoder


@register("encoder", "qwen_vit")
class QwenViT(nn.Module):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision tower (without its merger): packed patches -> (T, H).

    forward(pixel_values, image_grid_thw) or forward(pixel_values_videos, video_grid_thw) -> features
    (sum of t*h*w over items, hidden_size), item after item, in the pixel rows' order; with
    ``deepstack_layers`` it returns ``(features, [hidden state after each of those layers])``.

    Args:
        hidden_size: width of the tower (HF embed_dim in Qwen2-VL, hidden_size in 2.5 / 3).
        num_layers: blocks (HF depth).
        num_heads: attention heads.
        ffn_hidden_size: MLP width (Qwen2-VL: embed_dim * mlp_ratio; else intermediate_size).
        patch_size: pixels per patch side.
        temporal_patch_size: frames per patch (an image is its frame repeated).
        num_channels: image channels.
        spatial_merge_size: side of the patch blocks the merger turns into one token (sets the patch order).
        norm: "layernorm" (Qwen2-VL, Qwen3-VL) or "rmsnorm" (Qwen2.5-VL).
        norm_eps: epsilon of every norm.
        mlp: "gelu" (fc1, activation, fc2) or "swiglu" (Qwen2.5-VL: gated, fc1 = [gate; up]).
        activation: "quick_gelu" (Qwen2-VL), "silu" (Qwen2.5-VL), "gelu_tanh" (Qwen3-VL).
        patch_bias: bias on the patch embedding (Qwen3-VL).
        rope_theta: base of the 2-D rotary positions.
        window_size: window attention (Qwen2.5-VL): windows of this many pixels a side (a multiple of
            patch_size * spatial_merge_size); null = full attention in every layer.
        fullatt_layers: with window_size, the layers (0-based) that attend over the whole item
            (HF fullatt_block_indexes).
        num_position_embeddings: size of a learned square position table added to the patches, resized
            bilinearly to each item's grid (Qwen3-VL: 2304 = 48 x 48); null = none.
        deepstack_layers: layers (0-based, ascending) whose output is also returned (Qwen3-VL DeepStack,
            HF deepstack_visual_indexes).
        max_patches: the patch budget of one call (all items of a batch together); more is an InputError
            naming the item that crosses it and both numbers. null = no budget.
        backend: "local", "te" or "auto".
    """

    grid_inputs = {"image_grid_thw": ("pixel_values",), "video_grid_thw": ("pixel_values_videos",)}

    def __init__(
        self,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        ffn_hidden_size: int,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        num_channels: int = 3,
        spatial_merge_size: int = 2,
        norm: NormKind = "layernorm",
        norm_eps: float = 1e-6,
        mlp: Literal["gelu", "swiglu"] = "gelu",
        activation: ActivationName = "quick_gelu",
        patch_bias: bool = False,
        rope_theta: float = 10000.0,
        window_size: int | None = None,
        fullatt_layers: list[int] | None = None,
        num_position_embeddings: int | None = None,
        deepstack_layers: list[int] | None = None,
        max_patches: int | None = None,
        backend: Backend = "local",
    ):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_layers", num_layers), ("num_heads", num_heads),
                            ("ffn_hidden_size", ffn_hidden_size), ("patch_size", patch_size),
                            ("temporal_patch_size", temporal_patch_size), ("num_channels", num_channels),
                            ("spatial_merge_size", spatial_merge_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParamError(name, f"{name} ({value!r}) must be an integer >= 1")
        if hidden_size % num_heads or (hidden_size // num_heads) % 4:
            raise ParamError("hidden_size", f"hidden_size ({hidden_size}) / num_heads ({num_heads}) must be a "
                             "whole head size divisible by 4 (2-D rotary positions use a quarter of it per axis)")
        build_norm(norm, 4)
        get_activation(activation)
        fullatt_layers = list(fullatt_layers or [])
        deepstack_layers = list(deepstack_layers or [])
        self.window = None  # window side in merge units
        if window_size is not None:
            unit = patch_size * spatial_merge_size
            if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < unit:
                raise ParamError("window_size", f"window_size ({window_size!r}) must be null or an integer >= "
                                 f"patch_size * spatial_merge_size = {unit} (pixels)")
            self.window = window_size // unit
        elif fullatt_layers:
            raise ParamError("fullatt_layers", f"fullatt_layers ({fullatt_layers}) need window_size: without "
                             "windows every layer attends over the whole item")
        for name, layers in (("fullatt_layers", fullatt_layers), ("deepstack_layers", deepstack_layers)):
            if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers for i in layers):
                raise ParamError(name, f"{name} ({layers}) must be layer indexes in 0..{num_layers - 1}")
        if deepstack_layers != sorted(set(deepstack_layers)):
            raise ParamError("deepstack_layers", f"deepstack_layers ({deepstack_layers}) must be ascending, "
                             "without repeats (output i comes from the i-th of them)")
        self.pos_side = None
        if num_position_embeddings is not None:
            side = math.isqrt(num_position_embeddings) if isinstance(num_position_embeddings, int) else 0
            if side < 1 or side * side != num_position_embeddings or isinstance(num_position_embeddings, bool):
                raise ParamError("num_position_embeddings", f"num_position_embeddings ({num_position_embeddings!r}) "
                                 "must be null or a square number (a side x side table), e.g. 2304 = 48 x 48")
            self.pos_side = side
        self.backend = check_backend(backend, activation=activation, gated=mlp == "swiglu")

        self.hidden_size = self.out_features = hidden_size
        self.num_layers, self.num_heads = num_layers, num_heads
        self.head_dim = hidden_size // num_heads
        self.patch_size, self.temporal_patch_size, self.num_channels = patch_size, temporal_patch_size, num_channels
        self.patch_dim = num_channels * temporal_patch_size * patch_size * patch_size
        self.spatial_merge_size = spatial_merge_size
        self.rope_theta = rope_theta
        self.fullatt_layers = frozenset(fullatt_layers)
        self.deepstack_layers = deepstack_layers
        if max_patches is not None and (isinstance(max_patches, bool) or not isinstance(max_patches, int)
                                        or max_patches < 1):
            raise ParamError("max_patches", f"max_patches ({max_patches!r}) must be null or an integer >= 1")
        self.max_patches = max_patches

        self.patch_embed = PatchEmbed3d(num_channels, temporal_patch_size, patch_size, hidden_size, patch_bias)
        self.pos_embed = (nn.Parameter(torch.zeros(num_position_embeddings, hidden_size))
                          if num_position_embeddings is not None else None)
        self.layers = nn.ModuleList(
            TransformerBlock(hidden_size, num_heads, ffn_hidden_size, norm=norm, norm_eps=norm_eps, mlp=mlp,
                             activation=activation, qkv_bias=True, out_bias=True, mlp_bias=True, layer_idx=i,
                             backend=self.backend)
            for i in range(num_layers)
        )
        self.init_weights()

    def init_weights(self) -> None:
        init_transformer_weights(self, num_layers=self.num_layers)
        nn.init.normal_(self.patch_embed.weight, std=0.02)
        if self.patch_embed.bias is not None:
            nn.init.zeros_(self.patch_embed.bias)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed, std=0.02)

    # -------------------------------------------------------- framework hooks

    def rows_per_item(self, grid_name: str, grid: torch.Tensor) -> list[int]:
        """Pixel rows (patches) each item occupies: t*h*w."""
        return [t * h * w for t, h, w in grid_rows(grid)]

    def item_tokens(self, inputs: dict) -> list[int]:
        """Output rows per item (the tower does not merge): t*h*w, from whichever grid is present."""
        grid_name = next(name for name in _GRIDS if name in inputs)
        return self.rows_per_item(grid_name, inputs[grid_name])

    def example_inputs(self, num_items: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Images of different sizes and aspect ratios: {"pixel_values", "image_grid_thw"}."""
        m = self.spatial_merge_size
        sizes = [(1, m * (1 + i % 2), m * (1 + (i + 1) % 3)) for i in range(num_items)]
        rows = sum(t * h * w for t, h, w in sizes)
        grid = torch.tensor(sizes, dtype=torch.long, device="cpu").reshape(num_items, 3)  # host data, always
        return {"pixel_values": torch.randn(rows, self.patch_dim, generator=generator), "image_grid_thw": grid}

    def validate_inputs(self, inputs: dict, path: str) -> None:
        """InputError (naming the input, the item and both numbers) unless ``inputs`` is one pixel/grid pair
        whose grid rows (t, h, w) are positive, h and w multiples of spatial_merge_size, and make exactly
        the pixel rows given."""
        present = [name for name in _GRIDS if name in inputs]
        pairs = " or ".join(f"{{{p!r}, {g!r}}}" for g, (p, _) in _GRIDS.items())
        if len(present) != 1:
            raise InputError(f"expected one grid input, got {sorted(inputs)}", path=path,
                             hint=f"pass {pairs}")
        grid_name = present[0]
        pixel_name, item = _GRIDS[grid_name]
        for key in inputs:
            if key == "second_per_grid_ts" and grid_name == "video_grid_thw":  # M-RoPE's time step, per video
                spg = inputs[key]
                n = inputs[grid_name].shape[0] if isinstance(inputs[grid_name], torch.Tensor) else None
                if not isinstance(spg, torch.Tensor) or spg.dim() != 1 or spg.shape[0] != n:
                    got = tuple(spg.shape) if isinstance(spg, torch.Tensor) else type(spg).__name__
                    raise InputError(f"expected one number per video ({n},), got {got}", path=join_path(path, key),
                                     hint="seconds per temporal patch group of each video, as the processor gives")
                continue
            if key not in (grid_name, pixel_name):
                raise InputError(f"unexpected input {key!r} next to {grid_name!r}", path=join_path(path, key),
                                 hint=f"pass {pairs}")
        where = join_path(path, grid_name)
        grid = inputs[grid_name]
        if (not isinstance(grid, torch.Tensor) or grid.is_floating_point() or grid.is_complex()
                or grid.dtype == torch.bool or grid.dim() != 2 or grid.shape[1] != 3):
            got = f"{tuple(grid.shape)} {grid.dtype}" if isinstance(grid, torch.Tensor) else type(grid).__name__
            raise InputError(f"expected an integer tensor (N, 3) of (t, h, w) per {item}, got {got}", path=where,
                             hint="one row per item: temporal patches, height and width in patches")
        if pixel_name not in inputs:
            raise InputError(f"missing input {pixel_name!r} (the patches {grid_name!r} describes)",
                             path=join_path(path, pixel_name), hint=f"pass {pairs}")
        x = inputs[pixel_name]
        pwhere = join_path(path, pixel_name)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise InputError(f"expected a floating-point tensor (patches, {self.patch_dim}), got "
                             f"{type(x).__name__}{' of ' + str(x.dtype) if isinstance(x, torch.Tensor) else ''}",
                             path=pwhere, hint="pass pixel values as float, e.g. pixel_values.float()")
        if x.dim() != 2 or x.shape[1] != self.patch_dim:
            raise InputError(f"expected shape (patches, {self.patch_dim}) = (patches, channels {self.num_channels} "
                             f"x frames {self.temporal_patch_size} x {self.patch_size} x {self.patch_size}), got "
                             f"{tuple(x.shape)}", path=pwhere,
                             hint="cut images into patch rows as the Qwen-VL image processor does")
        m, start, total = self.spatial_merge_size, 0, x.shape[0]
        for i, (t, h, w) in enumerate(grid_rows(grid)):
            if min(t, h, w) < 1:
                raise InputError(f"{item} {i}'s grid ({t}, {h}, {w}) must be positive", path=f"{where}[{i}]",
                                 hint="rows are (temporal patches, height patches, width patches)")
            if h % m or w % m:
                raise InputError(f"{item} {i}'s grid ({t}, {h}, {w}): height {h} and width {w} must be multiples "
                                 f"of spatial_merge_size {m}", path=f"{where}[{i}]",
                                 hint=f"resize the {item} to a multiple of {m * self.patch_size} pixels a side")
            n = t * h * w
            if self.max_patches is not None and start + n > self.max_patches:
                raise InputError(f"{item} {i}'s {n} patches bring the batch to {start + n}, over the patch budget "
                                 f"max_patches {self.max_patches}", path=f"{where}[{i}]",
                                 hint=f"fewer or smaller {item}s per batch (the data's max_pixels), or raise "
                                      "the encoder's max_patches")
            if start + n > total:
                raise InputError(f"{item} {i}'s grid ({t}, {h}, {w}) makes {n} patches but {pixel_name} holds "
                                 f"{max(total - start, 0)} rows for it (rows {start}.. of {total})",
                                 path=f"{where}[{i}]", hint=f"the grid must describe the rows of {pixel_name}")
            start += n
        if start != total:
            last = f"the last {item}, {len(grid) - 1}" if len(grid) else f"no {item}"
            raise InputError(f"{pixel_name} holds {total} rows but {grid_name} makes {start} patches "
                             f"({total - start} rows after {last})", path=pwhere,
                             hint=f"the grid must describe the rows of {pixel_name}")

    # ----------------------------------------------------------------- model

    def _layout(self, grid: torch.Tensor) -> dict[str, torch.Tensor]:
        """CPU tensors for one grid: rotary positions, attention segments, window order, table taps."""
        m = self.spatial_merge_size
        positions, sizes, frames, windows, unit_order = [], [], [], [], []
        frame, window, units = 0, 0, 0
        for t, h, w in grid_rows(grid):
            pos = merge_block_positions(h, w, m)
            positions.append(pos.repeat(t, 1))
            sizes.append(torch.tensor([h, w]).expand(t * h * w, 2))
            frames.append(torch.arange(frame, frame + t).repeat_interleave(h * w))
            frame += t
            if self.window is not None:
                order, tile = window_order(h // m, w // m, self.window)
                per_frame = (h // m) * (w // m)
                tiles = int(tile[-1]) + 1
                for f in range(t):
                    unit_order.append(order + units + f * per_frame)
                    windows.append((tile + window + f * tiles).repeat_interleave(m * m))
                window += t * tiles
                units += t * per_frame
        out = {"positions": torch.cat(positions), "frames": torch.cat(frames)}
        if self.pos_side is not None:
            out["taps"], out["tap_weights"] = bilinear_taps(out["positions"], torch.cat(sizes), self.pos_side)
        if self.window is not None:
            unit_order = torch.cat(unit_order)
            perm = (unit_order[:, None] * (m * m) + torch.arange(m * m)).flatten()
            out["perm"], out["unperm"] = perm, torch.argsort(perm)
            out["positions"], out["frames"] = out["positions"][perm], out["frames"][perm]
            out["windows"] = torch.cat(windows)
        return out

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) (1, S, 1, head_dim): the first head_dim/4 frequencies rotate by the row, the next
        by the column, repeated for the two rotate-half halves (as HF's vision rotary embedding)."""
        quarter = self.head_dim // 4
        exponent = torch.arange(quarter, device=positions.device, dtype=torch.float32) * 2 / (self.head_dim // 2)
        inv_freq = 1.0 / (self.rope_theta ** exponent)
        freqs = (positions.to(torch.float32)[..., None] * inv_freq).flatten(-2)  # (S, D/2): rows, then cols
        emb = torch.cat((freqs, freqs), dim=-1)[None, :, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Patches (P, C*T*p*p) with their grid (N, 3) -> features (P, hidden_size), item after item
        (and the DeepStack hidden states, each (P, hidden_size), with deepstack_layers).
        ``second_per_grid_ts`` (videos) is for the language model's M-RoPE positions, unused here."""
        if (image_grid_thw is None) == (video_grid_thw is None):
            raise InputError("expected exactly one of image_grid_thw, video_grid_thw", path="",
                             hint="pass {pixel_values, image_grid_thw} or {pixel_values_videos, video_grid_thw}")
        pixels, grid = ((pixel_values, image_grid_thw) if image_grid_thw is not None
                        else (pixel_values_videos, video_grid_thw))
        if pixels is not None and grid_rows(grid) == [] and pixels.shape[0] == 0:  # no item: nothing to attend
            x = self.patch_embed(pixels)
            return (x, [x] * len(self.deepstack_layers)) if self.deepstack_layers else x
        layout = self._layout(grid)  # host-side, from the CPU grid
        if pixels is None or pixels.shape[0] != layout["frames"].numel():
            raise InputError(f"the grid makes {layout['frames'].numel()} patches but the pixel input holds "
                             f"{None if pixels is None else pixels.shape[0]} rows", path="",
                             hint="check the inputs with validate_inputs for the item at fault")
        dev = pixels.device
        lay = {k: v.to(dev, non_blocking=True) for k, v in layout.items()}
        # attention stays inside each frame (full layers) or window: runs of consecutive patches
        frames = tuple(torch.unique_consecutive(layout["frames"], return_counts=True)[1].tolist())
        windows = (tuple(torch.unique_consecutive(layout["windows"], return_counts=True)[1].tolist())
                   if "windows" in layout else None)

        x = self.patch_embed(pixels)  # (S, H)
        if self.pos_embed is not None:
            pos = (self.pos_embed[lay["taps"]].float() * lay["tap_weights"][..., None]).sum(1)
            x = x + pos.to(x.dtype)
        if "perm" in lay:  # windows become contiguous runs (restored below)
            x = x.index_select(0, lay["perm"])
        rope = self._rope(lay["positions"], x.dtype)
        x = x[None]  # (1, S, H): one packed sequence
        deepstack = []
        for i, layer in enumerate(self.layers):
            windowed = "windows" in lay and i not in self.fullatt_layers
            x = layer(x, rope=rope, segments=windows if windowed else frames)
            if i in self.deepstack_layers:
                deepstack.append(x[0])
        x = x[0]
        if "perm" in lay:
            x = x.index_select(0, lay["unperm"])
            deepstack = [f.index_select(0, lay["unperm"]) for f in deepstack]
        return (x, deepstack) if self.deepstack_layers else x


# ------------------------------------------------------------------------------------ projector


@register("projector", "patch_merger")
class PatchMerger(nn.Module):
    """Qwen-VL patch merger: (T, in_features) -> (T / spatial_merge_size**2, out_features).

    Norm, then every ``spatial_merge_size**2`` consecutive tokens (one block of the tower's output) as one
    vector, Linear, GELU, Linear.

    Args:
        in_features: width of the tower's tokens.
        out_features: width of the merged tokens (the language model's hidden size).
        spatial_merge_size: side of the token blocks merged into one (their tokens are consecutive).
        hidden_features: width of the hidden layer (default: in_features * spatial_merge_size**2).
        norm: "layernorm" (Qwen2-VL, Qwen3-VL) or "rmsnorm" (Qwen2.5-VL).
        norm_eps: epsilon of the norm.
        norm_after_merge: normalise the merged vectors instead of the tokens (Qwen3-VL's DeepStack
            mergers, HF use_postshuffle_norm).
        activation: between the two linears.
    """

    def __init__(self, in_features: int, out_features: int, spatial_merge_size: int = 2,
                 hidden_features: int | None = None, norm: NormKind = "layernorm", norm_eps: float = 1e-6,
                 norm_after_merge: bool = False, activation: ActivationName = "gelu"):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("spatial_merge_size", spatial_merge_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParamError(name, f"{name} ({value!r}) must be an integer >= 1")
        self.in_features, self.out_features = in_features, out_features
        self.spatial_merge_size, self.group = spatial_merge_size, spatial_merge_size**2
        self.norm_after_merge = norm_after_merge
        merged = in_features * self.group
        hidden = hidden_features or merged
        self.norm = build_norm(norm, merged if norm_after_merge else in_features, norm_eps)
        self.fc1 = nn.Linear(merged, hidden)
        self.act = get_activation(activation)
        self.fc2 = nn.Linear(hidden, out_features)

    def tokens_out(self, tokens_in: int) -> int:
        if tokens_in % self.group:
            raise ParamError("spatial_merge_size", f"patch_merger merges blocks of {self.group} tokens "
                             f"(spatial_merge_size {self.spatial_merge_size}) but got {tokens_in} tokens",
                             hint="use the encoder's spatial_merge_size")
        return tokens_in // self.group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., T, in_features) -> (..., T / merge**2, out_features)."""
        self.tokens_out(x.shape[-2])
        if not self.norm_after_merge:
            x = self.norm(x)
        x = x.reshape(*x.shape[:-2], x.shape[-2] // self.group, self.group * x.shape[-1])
        if self.norm_after_merge:
            x = self.norm(x)
        return self.fc2(self.act(self.fc1(x)))
