"""AnyRes tiling (LLaVA-NeXT, LLaVA-OneVision, LLaVA-NeXT-Video): a fixed-size tower over image tiles,
and the layout that stitches the tiles' tokens back into one grid per image.

An image of ``(height, width)`` pixels is resized to the best of ``grid_pinpoints`` (Hugging Face's
``select_best_resolution``: the most of the image kept, then the least padding), cut into ``rows x cols``
tiles of the tower's ``image_size``, and preceded by a base tile (the whole image resized to one tile).
Each tile goes through the tower (``T = g x g`` tokens, ``g = image_size // patch_size``).

- :class:`AnyRes` (encoder ``anyres``): ``{"pixel_values": (tiles, C, S, S), "image_sizes": (N, 2)}``
  with each image's tiles back to back in Hugging Face's order (base tile, then the crops row by row:
  ``pixel_values[i, :num_patches_i]`` of the image processor's padded 5-D tensor); ``image_sizes`` rows
  are ``[height, width]`` of the original images (host data), or ``[height, width, tiled]`` where
  ``tiled`` 0 marks an image that is only its base tile (OneVision's images in a sample with several:
  ``batch_num_images`` > 1; its tokens are the base tile's and one newline). Videos: ``{"pixel_values_videos":
  (N, F, C, S, S)}``, every frame through the tower, optionally pooled (LLaVA-NeXT-Video's 2x2 average
  before the projector). Returns flat features ``(sum of tokens, C)``.
- :class:`AnyResLayout` (layout ``anyres_layout``), after the projector: per image the base tile's
  tokens, then the crops as one ``(rows*g, cols*g)`` grid, unpadded to the image's aspect ratio,
  bilinearly shrunk when larger than ``max_tiles`` tiles (OneVision's ``anyres_max_9``), with a learned
  ``image_newline`` after each row. Videos: optionally each frame's grid bilinearly shrunk (OneVision's
  2x2) and one newline after the whole video.

The token counts are plain arithmetic on plain data (:func:`anyres_geometry`, :func:`anyres_image_tokens`,
:func:`anyres_tiles`, :func:`video_tokens`), usable without a model (the data path), and the same
numbers the layout produces.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimo_spec.errors import InputError, ParamError, join_path
from mimo_spec.registry import register

# ------------------------------------------------------------------------------------ geometry (host)


def best_resolution(height: int, width: int, pinpoints: list) -> tuple[int, int]:
    """The pinpoint (h, w) an image is resized to: the most of its pixels kept, then the least padding
    (Hugging Face's ``select_best_resolution``, same tie-breaking)."""
    best, kept_best, waste_best = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = pw * ph - kept
        if kept > kept_best or (kept == kept_best and waste < waste_best):
            best, kept_best, waste_best = (int(ph), int(pw)), kept, waste
    return best


def tile_grid(height: int, width: int, geometry: dict) -> tuple[int, int]:
    """(rows, cols) of crop tiles for an image of ``height`` x ``width`` pixels."""
    ph, pw = best_resolution(height, width, geometry["grid_pinpoints"])
    return ph // geometry["tile_size"], pw // geometry["tile_size"]


def anyres_tiles(height: int, width: int, geometry: dict, tiled: bool = True) -> int:
    """Tiles of one image (the base tile and the crops): its rows in ``pixel_values``. ``tiled=False``: the
    base tile alone (OneVision's images in a sample with several)."""
    if not tiled:
        return 1
    rows, cols = tile_grid(height, width, geometry)
    return rows * cols + 1


def _unpadded(height: int, width: int, grid_h: int, grid_w: int) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1) of the crop grid that holds the image (the rest is the resize padding),
    with Hugging Face's rounding (``unpad_image``)."""
    if width / height > grid_w / grid_h:
        new_h = int(round(height * (grid_w / width), 7))
        pad = (grid_h - new_h) // 2
        return pad, grid_h - pad, 0, grid_w
    new_w = int(round(width * (grid_h / height), 7))
    pad = (grid_w - new_w) // 2
    return 0, grid_h, pad, grid_w - pad


def _crop_shape(height: int, width: int, geometry: dict) -> tuple[tuple[int, int, int, int], tuple[int, int] | None]:
    """(the kept part of the crop grid, the size it is shrunk to or None) for one image."""
    rows, cols = tile_grid(height, width, geometry)
    g = geometry["patch_grid"]
    gh, gw = rows * g, cols * g
    box = _unpadded(height, width, gh, gw) if geometry["unpad"] else (0, gh, 0, gw)
    h, w = box[1] - box[0], box[3] - box[2]
    max_tiles = geometry["max_tiles"]
    if max_tiles is not None:
        ratio = math.sqrt(h * w / (max_tiles * g**2))
        if ratio > 1.1:
            return box, (int(h // ratio), int(w // ratio))
    return box, None


def anyres_image_tokens(height: int, width: int, geometry: dict, tiled: bool = True) -> int:
    """Placeholder tokens of one image of ``height`` x ``width`` pixels: the base tile's, the (unpadded,
    possibly shrunk) crop grid's, and a newline per grid row. Equals the processors'
    ``_get_number_of_features`` (LlavaNextProcessor, LlavaOnevisionProcessor). ``tiled=False``: the base
    tile's tokens and one newline (OneVision's images in a sample with several)."""
    if not tiled:
        return geometry["tile_tokens"] + (1 if geometry["newline"] else 0)
    box, shrunk = _crop_shape(height, width, geometry)
    h, w = shrunk if shrunk is not None else (box[1] - box[0], box[3] - box[2])
    return geometry["tile_tokens"] + h * w + (h if geometry["newline"] else 0)


def video_tokens(frames: int, geometry: dict) -> int:
    """Placeholder tokens of one video of ``frames`` frames."""
    side = geometry["video_grid"]
    if geometry["video_downscale"] is not None:
        side = math.ceil(side / geometry["video_downscale"])
    return frames * side * side + int(bool(geometry["newline"] and geometry["video_newline"]))


def anyres_geometry(modality) -> dict:
    """Plain (picklable) data from a modality built on an ``anyres`` encoder and an ``anyres_layout``
    (or one reading them through ``inputs_from``): what the counting functions need."""
    src = getattr(modality, "src", modality)
    encoder = next(iter(src.encoders.values()), None)
    if not isinstance(encoder, AnyRes):
        raise InputError(f"the modality's encoder is a {type(encoder).__name__}, not anyres", path="encoders",
                         hint="anyres_geometry reads an anyres encoder and its anyres_layout")
    return encoder.geometry(src.item_layout)


# -------------------------------------------------------------------------------------------- encoder


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ParamError(name, f"{name} ({value!r}) must be an integer >= {minimum}")


@register("encoder", "anyres")
class AnyRes(nn.Module):
    """AnyRes tiling around a fixed-size tower: images as tiles (base + crops), videos as frames.

    forward(pixel_values, image_sizes) -> (sum of tiles * T, C); forward(pixel_values_videos) ->
    (N * F * T', C), T' the per-frame tokens after ``video_pool``. Item after item, flat.

    Args:
        tower: the encoder of one tile (a ``clip_vit``: CLIP-L/14-336 for LLaVA-NeXT, SigLIP-so400m-384
            for OneVision), read as LLaVA does (feature_layer, no class token in the output).
        grid_pinpoints: the resolutions ``[height, width]`` an image may be resized to before it is cut
            into tiles (multiples of the tower's image_size), as Hugging Face's image_grid_pinpoints.
        video_pool: pool each video frame's token grid before the projector (LLaVA-NeXT-Video's
            vision_resampler): "average" or "max"; null = none.
        video_pool_stride: kernel and stride of that pooling (2: a 24x24 grid becomes 12x12).
    """

    submodule_kinds = {"tower": "encoder"}
    grid_inputs = {"image_sizes": ("pixel_values",)}

    def __init__(self, tower: nn.Module, grid_pinpoints: list[list[int]],
                 video_pool: Literal["average", "max"] | None = None, video_pool_stride: int = 2):
        super().__init__()
        size = getattr(tower, "image_size", None)
        patch = getattr(tower, "patch_size", None)
        if not isinstance(size, int) or not isinstance(patch, int) or not hasattr(tower, "tokens_per_item"):
            raise ParamError("tower", f"the tower ({type(tower).__name__}) must be a fixed-size image encoder with "
                             "image_size and patch_size (a clip_vit)")
        if getattr(tower, "dynamic_image_size", False):
            raise ParamError("tower", "the tower must take tiles of one size (dynamic_image_size: false)")
        grid = size // patch
        tokens = tower.tokens_per_item((1, getattr(tower, "num_channels", 3), size, size))
        if tokens != grid * grid:
            raise ParamError("tower", f"each tile must give a square grid of {grid}x{grid} = {grid * grid} tokens, "
                             f"the tower gives {tokens} (a class token in the output?)",
                             "set the tower's feature_select: patch")
        if not isinstance(grid_pinpoints, (list, tuple)) or not grid_pinpoints:
            raise ParamError("grid_pinpoints", f"grid_pinpoints ({grid_pinpoints!r}) must be a non-empty list of "
                             "[height, width]")
        pins = []
        for p in grid_pinpoints:
            ok = (isinstance(p, (list, tuple)) and len(p) == 2
                  and all(isinstance(v, int) and not isinstance(v, bool) and v >= size and v % size == 0 for v in p))
            if not ok:
                raise ParamError("grid_pinpoints", f"grid_pinpoints entry {p!r} must be [height, width], both "
                                 f"multiples of the tower's image_size ({size})")
            pins.append([int(p[0]), int(p[1])])
        if video_pool not in (None, "average", "max"):
            raise ParamError("video_pool", f"video_pool ({video_pool!r}) must be 'average', 'max' or null")
        _positive_int("video_pool_stride", video_pool_stride)
        if video_pool is not None and video_pool_stride > grid:
            raise ParamError("video_pool_stride", f"video_pool_stride ({video_pool_stride}) is larger than a "
                             f"frame's token grid ({grid})")
        self.tower = tower
        self.grid_pinpoints = pins
        self.tile_size, self.patch_grid, self.tile_tokens = size, grid, grid * grid
        self.num_channels = getattr(tower, "num_channels", 3)
        self.video_pool, self.video_pool_stride = video_pool, video_pool_stride
        self.video_grid = grid // video_pool_stride if video_pool is not None else grid
        self.out_features = getattr(tower, "out_features", getattr(tower, "hidden_size", None))
        self.hidden_size = self.out_features

    # -------------------------------------------------------------------- geometry

    def geometry(self, layout: nn.Module | None = None) -> dict:
        """Plain data: the tile geometry, and (given the modality's ``anyres_layout``) how tokens are laid out."""
        lay = layout if isinstance(layout, AnyResLayout) else None
        return {"tile_size": self.tile_size, "patch_grid": self.patch_grid, "tile_tokens": self.tile_tokens,
                "grid_pinpoints": [list(p) for p in self.grid_pinpoints], "video_grid": self.video_grid,
                "num_channels": self.num_channels,
                "unpad": lay.unpad if lay else False, "newline": lay.newline if lay else False,
                "max_tiles": lay.max_tiles if lay else None,
                "video_downscale": lay.video_downscale if lay else None,
                "video_newline": lay.video_newline if lay else False,
                "layout": lay is not None}

    def _sizes(self, image_sizes: torch.Tensor) -> list[tuple[int, int, bool]]:
        """(height, width, tiled) of each image, from the host grid (N, 2) or (N, 3)."""
        return [(int(r[0]), int(r[1]), len(r) < 3 or bool(r[2])) for r in image_sizes.tolist()]

    # -------------------------------------------------------------- framework hooks

    def rows_per_item(self, grid_name: str, grid: torch.Tensor) -> list[int]:
        """Tiles of each image (its rows of pixel_values): crops of the best pinpoint + the base tile."""
        geo = self.geometry()
        return [anyres_tiles(h, w, geo, t) for h, w, t in self._sizes(grid)]

    def item_tokens(self, inputs: dict) -> list[int]:
        """Tower tokens of each item: tiles x T for images, frames x T' for videos."""
        if "pixel_values_videos" in inputs:
            n = inputs["pixel_values_videos"].shape[0]
            return [self.tokens_per_item(tuple(inputs["pixel_values_videos"].shape))] * n
        return [r * self.tile_tokens for r in self.rows_per_item("image_sizes", inputs["image_sizes"])]

    def tokens_per_item(self, shape: tuple) -> int:
        """Tokens of one video (N, F, C, S, S) (F frames x T'), or of one tile (4-D)."""
        if len(shape) == 5:
            return int(shape[1]) * self.video_grid * self.video_grid
        return self.tile_tokens

    def example_inputs(self, num_items: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Images of different sizes and aspect ratios (wide, tall, square, ...) as tiles + image_sizes."""
        s = self.tile_size
        shapes = [(s * 2 // 3 + 5, s * 3 // 2), (s * 2, s - 3), (s + 1, s + 1), (s // 2, s * 3)]
        sizes = [shapes[i % len(shapes)] for i in range(num_items)]
        grid = torch.tensor(sizes, dtype=torch.long, device="cpu").reshape(num_items, 2)  # host data, always
        tiles = sum(self.rows_per_item("image_sizes", grid))
        return {"pixel_values": torch.randn(tiles, self.num_channels, s, s, generator=generator),
                "image_sizes": grid}

    def example_videos(self, num_items: int, frames: int = 2,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Random videos: {"pixel_values_videos": (N, frames, C, S, S)}."""
        s = self.tile_size
        return {"pixel_values_videos": torch.randn(num_items, frames, self.num_channels, s, s, generator=generator)}

    def validate_inputs(self, inputs: dict, path: str) -> None:
        """InputError (naming the input, the item and both numbers) unless ``inputs`` is
        {"pixel_values": (tiles, C, S, S), "image_sizes": (N, 2) or (N, 3)} whose images make exactly those tiles,
        or {"pixel_values_videos": (N, F, C, S, S)}."""
        c, s = self.num_channels, self.tile_size
        images = f"{{'pixel_values': (tiles, {c}, {s}, {s}), 'image_sizes': (N, 2)}}"
        videos = f"{{'pixel_values_videos': (N, frames, {c}, {s}, {s})}}"
        if "pixel_values_videos" in inputs:
            for key in inputs:
                if key != "pixel_values_videos":
                    raise InputError(f"unexpected input {key!r} next to 'pixel_values_videos'",
                                     path=join_path(path, key), hint=f"videos are {videos}")
            x, where = inputs["pixel_values_videos"], join_path(path, "pixel_values_videos")
            self._check_pixels(x, where, 5, videos)
            if x.shape[1] < 1:
                raise InputError(f"expected at least one frame per video, got {tuple(x.shape)}", path=where)
            return
        for key in inputs:
            if key not in ("pixel_values", "image_sizes"):
                raise InputError(f"unexpected input {key!r}", path=join_path(path, key),
                                 hint=f"pass images as {images} or videos as {videos}")
        for key in ("image_sizes", "pixel_values"):
            if key not in inputs:
                raise InputError(f"missing input {key!r}", path=join_path(path, key), hint=f"pass {images}")
        grid, gwhere = inputs["image_sizes"], join_path(path, "image_sizes")
        if (not isinstance(grid, torch.Tensor) or grid.is_floating_point() or grid.is_complex()
                or grid.dtype == torch.bool or grid.dim() != 2 or grid.shape[1] not in (2, 3)):
            got = f"{grid.dtype} {tuple(grid.shape)}" if isinstance(grid, torch.Tensor) else type(grid).__name__
            raise InputError(f"expected an integer tensor (N, 2) of [height, width] per image (or (N, 3) with "
                             f"a tiled flag), got {got}", path=gwhere,
                             hint="the original image sizes, as the image processor returns them")
        x, where = inputs["pixel_values"], join_path(path, "pixel_values")
        self._check_pixels(x, where, 4, images)
        if grid.device.type == "meta":
            return
        geo, start, total = self.geometry(), 0, x.shape[0]
        if grid.shape[1] == 3 and not bool(((grid[:, 2] == 0) | (grid[:, 2] == 1)).all()):
            raise InputError(f"the third column of image_sizes (tiled) must be 0 or 1, got {grid[:, 2].tolist()}",
                             path=gwhere, hint="1: the image is tiled; 0: only its base tile")
        for i, (h, w, tiled) in enumerate(self._sizes(grid)):
            if h < 1 or w < 1:
                raise InputError(f"image {i}'s size ({h}, {w}) must be positive", path=f"{gwhere}[{i}]",
                                 hint="rows are [height, width] in pixels")
            n = anyres_tiles(h, w, geo, tiled)
            if start + n > total:
                raise InputError(f"image {i} ({h}x{w} px) makes {n} tiles but pixel_values holds "
                                 f"{max(total - start, 0)} rows for it (rows {start}.. of {total})",
                                 path=f"{gwhere}[{i}]", hint="each image's tiles back to back: the base tile, "
                                 "then the crops of its best grid_pinpoint, row by row")
            start += n
        if start != total:
            raise InputError(f"pixel_values holds {total} tiles but image_sizes makes {start} "
                             f"({total - start} rows after the last image)", path=where,
                             hint="image_sizes must describe the tiles of pixel_values")

    def _check_pixels(self, x, where: str, dims: int, expected: str) -> None:
        c, s = self.num_channels, self.tile_size
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise InputError(f"expected a floating-point tensor, got {type(x).__name__}"
                             f"{' of ' + str(x.dtype) if isinstance(x, torch.Tensor) else ''}", path=where,
                             hint="pass pixel values as float, e.g. pixel_values.float()")
        if x.dim() != dims or tuple(x.shape[-3:]) != (c, s, s):
            raise InputError(f"expected {expected}, got {tuple(x.shape)}", path=where,
                             hint=f"tiles of the tower's {s}x{s} pixels")

    # ----------------------------------------------------------------------- model

    def forward(self, pixel_values: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | None = None) -> torch.Tensor:
        """Tiles (with their image_sizes) or videos -> flat tower features (tokens, C), item after item."""
        if pixel_values_videos is not None:
            frames = pixel_values_videos.flatten(0, 1)
            x = self.tower(frames)  # (N*F, T, C)
            if self.video_pool is not None:
                g, k = self.patch_grid, self.video_pool_stride
                grid = x.reshape(x.shape[0], g, g, -1).permute(0, 3, 1, 2)
                pooled = F.avg_pool2d(grid, k, k) if self.video_pool == "average" else F.max_pool2d(grid, k, k)
                x = pooled.flatten(2).transpose(1, 2)
            return x.reshape(-1, x.shape[-1])
        if pixel_values is None:
            raise InputError("expected pixel_values (with image_sizes) or pixel_values_videos", path="")
        x = self.tower(pixel_values)  # (tiles, T, C)
        return x.reshape(-1, x.shape[-1])


# --------------------------------------------------------------------------------------------- layout


@register("layout", "anyres_layout")
class AnyResLayout(nn.Module):
    """Arranges an ``anyres`` encoder's projected tile tokens as LLaVA-NeXT / OneVision feed them to the LM.

    Per image: the base tile's tokens, then the crops stitched into one grid (rows of tiles, each
    ``g x g`` tokens), cut back to the image's aspect ratio (``unpad``), bilinearly shrunk to at most
    about ``max_tiles`` tiles' worth (OneVision), a learned ``image_newline`` after each grid row. Per
    video: its frames' tokens, each frame's grid bilinearly shrunk by ``video_downscale`` (OneVision),
    then one ``image_newline`` (``video_newline``).

    Args:
        hidden_size: the language model's hidden size (the newline vector's width).
        newline: learn an ``image_newline`` vector and put it after each row of the crop grid.
        unpad: drop the crop grid's rows (or columns) that only hold the resize padding.
        max_tiles: OneVision's ``anyres_max_N``: when the unpadded grid holds more than 1.1**2 x N tiles'
            tokens, shrink it bilinearly to about N tiles; null = never.
        video_downscale: shrink each video frame's token grid bilinearly to ceil(g / this) a side after
            the projector (OneVision: 2); null = keep.
        video_newline: one ``image_newline`` after each video (OneVision).
    """

    def __init__(self, hidden_size: int, newline: bool = True, unpad: bool = True, max_tiles: int | None = None,
                 video_downscale: int | None = None, video_newline: bool = False):
        super().__init__()
        _positive_int("hidden_size", hidden_size)
        if max_tiles is not None:
            _positive_int("max_tiles", max_tiles)
        if video_downscale is not None:
            _positive_int("video_downscale", video_downscale)
        if video_newline and not newline:
            raise ParamError("video_newline", "video_newline needs newline: true (it is the same learned vector)")
        self.hidden_size = hidden_size
        self.newline, self.unpad, self.max_tiles = bool(newline), bool(unpad), max_tiles
        self.video_downscale, self.video_newline = video_downscale, bool(video_newline)
        self.image_newline = nn.Parameter(torch.zeros(hidden_size)) if newline else None
        self.init_weights()

    def init_weights(self) -> None:
        if self.image_newline is not None:
            nn.init.normal_(self.image_newline, std=1 / math.sqrt(self.hidden_size))

    def _geometry(self, encoder) -> dict:
        if not isinstance(encoder, AnyRes):
            raise InputError(f"anyres_layout needs an anyres encoder, got {type(encoder).__name__}",
                             hint="put the tower under an anyres encoder")
        return encoder.geometry(self)

    def item_tokens(self, tokens_in: list[int], encoder, inputs: dict) -> list[int]:
        """Tokens of each item after the layout (host data: from image_sizes or the video shape)."""
        geo = self._geometry(encoder)
        if "pixel_values_videos" in inputs:
            return [video_tokens(int(inputs["pixel_values_videos"].shape[1]), geo)] * len(tokens_in)
        return [anyres_image_tokens(h, w, geo, t) for h, w, t in encoder._sizes(inputs["image_sizes"])]

    def forward(self, x: torch.Tensor, tokens_in: list[int], encoder, inputs: dict) -> torch.Tensor:
        """Flat projected tokens (sum(tokens_in), H) -> flat laid-out tokens (sum(item_tokens), H)."""
        geo = self._geometry(encoder)
        if "pixel_values_videos" in inputs:
            return self._videos(x, int(inputs["pixel_values_videos"].shape[1]), len(tokens_in), geo)
        g, t, hidden = geo["patch_grid"], geo["tile_tokens"], x.shape[-1]
        out, start = [], 0
        for (h, w, tiled), n in zip(encoder._sizes(inputs["image_sizes"]), tokens_in):
            item = x[start:start + n]
            start += n
            if not tiled:  # the base tile alone, then one newline (HF's single-patch branch)
                out.append(item)
                if self.image_newline is not None:
                    out.append(self.image_newline.to(item.dtype)[None])
                continue
            rows, cols = tile_grid(h, w, geo)
            crops = item[t:].reshape(rows, cols, g, g, hidden).permute(0, 2, 1, 3, 4)
            crops = crops.reshape(rows * g, cols * g, hidden)
            (r0, r1, c0, c1), shrunk = _crop_shape(h, w, geo)
            crops = crops[r0:r1, c0:c1]
            if shrunk is not None:
                crops = F.interpolate(crops.permute(2, 0, 1)[None], size=list(shrunk), mode="bilinear")[0]
                crops = crops.permute(1, 2, 0)
            if self.image_newline is not None:
                nl = self.image_newline.to(crops.dtype).expand(crops.shape[0], 1, hidden)
                crops = torch.cat((crops, nl), dim=1)
            out += [item[:t], crops.reshape(-1, hidden)]
        return torch.cat(out) if out else x[:0]

    def _videos(self, x: torch.Tensor, frames: int, n: int, geo: dict) -> torch.Tensor:
        side, hidden = geo["video_grid"], x.shape[-1]
        if self.video_downscale is not None:
            grid = x.reshape(n * frames, side, side, hidden).permute(0, 3, 1, 2)
            new = math.ceil(side / self.video_downscale)
            x = F.interpolate(grid, size=[new, new], mode="bilinear").permute(0, 2, 3, 1)
        x = x.reshape(n, -1, hidden)
        if self.video_newline and self.image_newline is not None:
            x = torch.cat((x, self.image_newline.to(x.dtype).expand(n, 1, hidden)), dim=1)
        return x.reshape(-1, hidden)
