"""Tiled images: one image -> several encoder items (tiles) and the text the original model writes around them,
by the model's own Hugging Face image processor.

``data.image_tiling`` picks the scheme (:data:`TILINGS`):

- ``internvl`` (InternVL 2/2.5/3): transformers' ``GotOcr2ImageProcessor`` with ``crop_to_patches`` (as
  ``InternVLProcessor`` calls it): the tile grid (columns x rows, between ``data.image_min_tiles`` and
  ``data.image_max_tiles`` tiles) whose aspect ratio is closest to the image's, the image resized to it and cut
  into tile-size crops, then (``data.image_thumbnail``, when there are several) the whole image resized to one
  tile. Each tile is one item of the modality (its fixed token count); the image's placeholders are one run of
  ``tiles x tokens per tile`` inside ``data.image_wrap`` (null: InternVL's ``<img>`` ... ``</img>``).
- ``idefics3`` (Idefics3, SmolVLM): transformers' ``Idefics3ImageProcessor`` / ``SmolVLMImageProcessor``: the
  image resized so its longest side is ``data.image_longest_edge`` (null: 4 tiles), then to multiples of the
  tile, cut row by row into tiles, then the whole image resized to one tile (the global image); unsplit images
  (``data.image_split: false``, or an image that fits one tile) are that global image alone. The text is
  ``Idefics3Processor``'s: per tile ``<fake_token_around_image><row_r_col_c>`` and its placeholders, a newline
  after each row, then ``\\n<fake_token_around_image><global-img>``, its placeholders and
  ``<fake_token_around_image>``.
- ``llava_next`` (LLaVA-NeXT, LLaVA-OneVision): the image processor's anyres tiling (base image then the crops of
  the best grid pinpoint) as ONE item of the modality with its own count (``image_sizes`` carries its size):
  the encoder's geometry (``mimo_spec.components.vision.anyres``) gives the count. OneVision (its processor, or
  a layout with ``max_tiles``) tiles only the image of a single-image sample: each image of a sample holding
  several is padded to a square and resized to one tile (``image_sizes`` row ``[h, w, 0]``; ``[h, w, 1]`` for a
  tiled one), as ``LlavaOnevisionImageProcessor`` does with ``batch_num_images``.
- ``none``: one fixed-size item per image (``ImageTransform``); ``auto``: ``llava_next`` for an encoder taking
  ``image_sizes`` (anyres), the scheme of ``data.image_processor``'s class when it is one of these, else none.

Every count is known from the image's size (its header), before decoding (:meth:`Tiling.plan`); decoding runs
the processor and checks it made what was planned. ``data.image_processor`` (a local folder) may hold the
model's own processor: its class picks the scheme, its values (tile size, tile bounds, longest edge,
normalisation) are used, and ``data.image_min_tiles`` ... when set override them.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch

from mimo_spec.errors import ConfigError, DataError

TILINGS = ("auto", "none", "llava_next", "internvl", "idefics3")
# a processor class (its name, without "ImageProcessor...") -> the scheme it tiles by
PROCESSOR_SCHEMES = {"GotOcr2": "internvl", "Idefics3": "idefics3", "SmolVLM": "idefics3",
                     "LlavaNext": "llava_next", "LlavaOnevision": "llava_next"}
# the schemes' normalisation when data.image_mean / image_std are left at CLIP's defaults (the released processors')
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
# InternVL's markers around an image's placeholders (InternVLProcessor's start / end image tokens)
INTERNVL_WRAP = ("<img>", "</img>")
FAKE, GLOBAL = "<fake_token_around_image>", "<global-img>"
MAX_IDEFICS3_SIDE = 4096  # transformers' MAX_IMAGE_SIZE: no side beyond it after the first resize


@dataclass(frozen=True)
class TiledImage:
    """What one image becomes, planned from its size: ``items`` encoder items (tiles; 1 under llava_next),
    ``parts``: the image's text in order, ``(text before, placeholders)`` (the last may be trailing text with 0
    placeholders), ``grid``: (rows, columns) of its tiles (0, 0 when not split), ``tiled``: False for an image
    left whole because its sample holds several (OneVision)."""

    items: int
    parts: tuple[tuple[str, int], ...]
    grid: tuple[int, int] = (0, 0)
    tiled: bool = True

    @property
    def tokens(self) -> int:
        """Placeholder tokens of the image (all its parts)."""
        return sum(n for _, n in self.parts)

    @property
    def has_text(self) -> bool:
        return any(text for text, _ in self.parts)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("tiled images need the transformers package", path="data.image_tiling",
                          hint="pip install 'mimo-spec[hf]'") from None
    return transformers


def scheme_of(processor) -> str | None:
    """The tiling scheme of an image processor's class (None: not a tiling one)."""
    name = type(processor).__name__
    return next((s for prefix, s in PROCESSOR_SCHEMES.items() if name.startswith(prefix + "ImageProcessor")), None)


def _size_of(value) -> int | None:
    """A processor size ({"longest_edge": n} or a square {"height": n, "width": n}, a dict or SizeDict) -> n."""
    if value is None:
        return None
    get = value.get if isinstance(value, dict) else (lambda k: getattr(value, k, None))
    if get("longest_edge"):
        return int(get("longest_edge"))
    h, w = get("height"), get("width")
    return int(h) if h is not None and h == w else None


def _mean_std(mean, std, own) -> tuple[list[float], list[float]]:
    from mimo_spec.data.preprocess import CLIP_MEAN, CLIP_STD, per_channel

    if tuple(mean) == tuple(CLIP_MEAN) and tuple(std) == tuple(CLIP_STD):
        mean, std = own  # the data config's defaults: the scheme's own normalisation
    return per_channel(mean, std, 3)


class Tiling(abc.ABC):
    """One scheme for one encoder: ``plan(width, height)`` -> :class:`TiledImage` from the size alone;
    ``pixels(img, plan)`` -> the encoder's keyword inputs of the image's items. ``alone``: the image is its
    sample's only one (OneVision tiles only such an image; the other schemes tile every image)."""

    name = "none"
    wrap: tuple[str, str] | None = None  # the markers around each image's run (data.image_wrap null)

    @abc.abstractmethod
    def plan(self, width: int, height: int, name: str = "", where: str = "", alone: bool = True) -> TiledImage:
        """The image's tiles and placeholder text, from its size alone."""

    @abc.abstractmethod
    def pixels(self, img, plan: TiledImage, name: str = "", where: str = "") -> dict[str, torch.Tensor]:
        """The encoder's keyword inputs of the image's items, as ``plan`` laid them out."""


def _check_made(made: int, plan: TiledImage, name: str, where: str) -> None:
    if made != plan.items:
        raise DataError(f"image {name}: the image processor made {made} tiles, but its header planned {plan.items}",
                        path=where, hint="the file changed while in use, or its header disagrees with its pixels "
                                         "(e.g. EXIF orientation): re-export it")


class InternVLTiling(Tiling):
    """InternVL's dynamic tiles (transformers' ``GotOcr2ImageProcessor`` with ``crop_to_patches``), each tile one
    item of ``tokens_per_tile`` tokens; one run per image inside ``<img>`` ... ``</img>``."""

    name = "internvl"
    wrap = INTERNVL_WRAP

    def __init__(self, processor, tile: int, tokens_per_tile: int, min_tiles: int, max_tiles: int,
                 thumbnail: bool = True):
        self.processor, self.tile, self.tokens_per_tile = processor, int(tile), int(tokens_per_tile)
        self.min_tiles, self.max_tiles, self.thumbnail = int(min_tiles), int(max_tiles), bool(thumbnail)
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        self._canvas = get_optimal_tiled_canvas

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(rows, columns) of the tile grid of a width x height image; (1, 1) when it is not split."""
        if self.max_tiles <= 1:
            return 1, 1
        columns, rows = self._canvas((int(height), int(width)), (self.tile, self.tile), self.min_tiles,
                                     self.max_tiles)
        return int(rows), int(columns)

    def plan(self, width: int, height: int, name: str = "", where: str = "", alone: bool = True) -> TiledImage:
        if width < 1 or height < 1:
            raise DataError(f"{name}: an image of {width}x{height} pixels holds nothing", path=where,
                            hint="remove the sample")
        rows, columns = self.grid(width, height)
        n = rows * columns
        items = n + (1 if n > 1 and self.thumbnail else 0)
        return TiledImage(items, (("", items * self.tokens_per_tile),), (rows, columns) if n > 1 else (0, 0))

    def pixels(self, img, plan: TiledImage, name: str = "", where: str = "") -> dict[str, torch.Tensor]:
        out = self.processor(images=img, crop_to_patches=self.max_tiles > 1, min_patches=self.min_tiles,
                             max_patches=self.max_tiles, return_tensors="pt")
        x = torch.as_tensor(out["pixel_values"], dtype=torch.float32)
        if not self.thumbnail and x.shape[0] > 1:
            x = x[:-1]  # the processor always appends the thumbnail to a split image
        _check_made(x.shape[0], plan, name, where)
        return {"pixel_values": x}


class Idefics3Tiling(Tiling):
    """Idefics3 / SmolVLM image splitting (transformers' ``Idefics3ImageProcessor`` / ``SmolVLMImageProcessor``):
    the tiles row by row then the global image, each one item; the text of ``Idefics3Processor``."""

    name = "idefics3"

    def __init__(self, processor, tile: int, tokens_per_tile: int, longest_edge: int, split: bool = True):
        self.processor, self.tile, self.tokens_per_tile = processor, int(tile), int(tokens_per_tile)
        self.longest_edge, self.split = int(longest_edge), bool(split)

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(rows, columns) of the split tiles of a width x height image ((0, 0): the global image alone), by the
        processor's resizes: the longest side to ``longest_edge`` (the other by the aspect ratio, made even), no
        side over 4096, then both sides up to multiples of the tile."""
        if not self.split:
            return 0, 0
        h, w = int(height), int(width)
        ratio = w / h
        # the first resize: the longest side to longest_edge (transformers' _resize_output_size_rescale_to_max_len)
        if w >= h:
            w = self.longest_edge
            h = int(w / ratio)
            h += h % 2
        else:
            h = self.longest_edge
            w = int(h * ratio)
            w += w % 2
        h, w = max(h, 1), max(w, 1)
        ratio = w / h  # ... and below the 4096 bound (_resize_output_size_scale_below_upper_bound)
        if w >= h and w > MAX_IDEFICS3_SIDE:
            w, h = MAX_IDEFICS3_SIDE, max(int(MAX_IDEFICS3_SIDE / ratio), 1)
        elif h > w and h > MAX_IDEFICS3_SIDE:
            h, w = MAX_IDEFICS3_SIDE, max(int(MAX_IDEFICS3_SIDE * ratio), 1)
        # resize_for_vision_encoder: multiples of the tile, the short side from the long one's new length
        t, ratio = self.tile, w / h
        if w >= h:
            w = math.ceil(w / t) * t
            h = math.ceil(int(w / ratio) / t) * t
        else:
            h = math.ceil(h / t) * t
            w = math.ceil(int(h * ratio) / t) * t
        if h > t or w > t:
            return (h - t) // t + 1, (w - t) // t + 1
        return 0, 0

    def layout(self, rows: int, columns: int) -> tuple[tuple[str, int], ...]:
        """The text around an image's tiles, as Idefics3Processor / SmolVLMProcessor write it."""
        n = self.tokens_per_tile
        parts = []
        for r in range(rows):
            for c in range(columns):
                parts.append((("\n" if r and not c else "") + f"{FAKE}<row_{r + 1}_col_{c + 1}>", n))
        parts.append((("\n\n" if rows else "") + FAKE + GLOBAL, n))
        parts.append((FAKE, 0))
        return tuple(parts)

    def plan(self, width: int, height: int, name: str = "", where: str = "", alone: bool = True) -> TiledImage:
        if width < 1 or height < 1:
            raise DataError(f"{name}: an image of {width}x{height} pixels holds nothing", path=where,
                            hint="remove the sample")
        rows, columns = self.grid(width, height)
        return TiledImage(rows * columns + 1, self.layout(rows, columns), (rows, columns))

    def pixels(self, img, plan: TiledImage, name: str = "", where: str = "") -> dict[str, torch.Tensor]:
        out = self.processor(images=[[img]], do_image_splitting=self.split, size={"longest_edge": self.longest_edge},
                             max_image_size={"longest_edge": self.tile}, return_row_col_info=True, return_tensors="pt")
        x = torch.as_tensor(out["pixel_values"], dtype=torch.float32)[0]
        rows, columns = int(out["rows"][0][0]), int(out["cols"][0][0])
        if (rows, columns) != plan.grid:
            raise DataError(f"image {name}: the image processor split it into {rows}x{columns} tiles, but its header "
                            f"planned {plan.grid[0]}x{plan.grid[1]}", path=where,
                            hint="the file changed while in use, or its header disagrees with its pixels")
        _check_made(x.shape[0], plan, name, where)
        return {"pixel_values": x}


# ----------------------------------------------------------------------------------------- building


def internvl_processor(tile: int, mean, std):
    """transformers' ``GotOcr2ImageProcessor`` (Pillow backend) making ``tile`` x ``tile`` tiles."""
    t = _transformers()
    return t.GotOcr2ImageProcessorPil(size={"height": int(tile), "width": int(tile)}, crop_to_patches=True,
                                      image_mean=list(mean), image_std=list(std))


def idefics3_processor(tile: int, longest_edge: int, mean, std, split: bool = True):
    """transformers' ``Idefics3ImageProcessor`` (Pillow backend) for ``tile``-pixel tiles."""
    t = _transformers()
    return t.Idefics3ImageProcessorPil(size={"longest_edge": int(longest_edge)},
                                       max_image_size={"longest_edge": int(tile)}, do_image_splitting=bool(split),
                                       image_mean=list(mean), image_std=list(std))


def build_tiling(scheme: str, *, tile: int, channels: int, tokens_per_tile: int, processor=None,
                 folder: str | None = None, mean=None, std=None, min_tiles: int | None = None,
                 max_tiles: int | None = None, thumbnail: bool = True, longest_edge: int | None = None,
                 split: bool | None = None) -> Tiling:
    """The tiling ``scheme`` ("internvl" | "idefics3") for an encoder of ``tile``-pixel images making
    ``tokens_per_tile`` tokens each; ``processor``: one loaded from ``folder`` (its values used), else one is built
    from the data options. Bad values are ConfigErrors naming the ``data.*`` key."""
    if channels != 3:
        raise ConfigError(f"tiled images are RGB, but the encoder takes {channels} channel(s)",
                          path="data.image_tiling",
                          hint="num_channels: 3, or image_tiling: none")
    for key, value in (("image_min_tiles", min_tiles), ("image_max_tiles", max_tiles),
                       ("image_longest_edge", longest_edge)):
        if value is not None and int(value) < 1:
            raise ConfigError(f"must be at least 1, got {value}", path=f"data.{key}")
    given = processor is not None
    if scheme == "internvl":
        if longest_edge is not None or split is not None:
            key = "image_longest_edge" if longest_edge is not None else "image_split"
            raise ConfigError(f"data.{key} is an idefics3 tiling option; internvl tiling takes image_min_tiles, "
                              "image_max_tiles and image_thumbnail", path=f"data.{key}", hint="leave it null")
        if given:
            size = _size_of(getattr(processor, "size", None))
            if size != tile:
                raise ConfigError(f"the image processor in {folder} makes {size}-pixel tiles, the encoder takes "
                                  f"{tile}x{tile} images", path="data.image_processor",
                                  hint="save the processor of the same model, or null to build one from the encoder")
            low = int(min_tiles if min_tiles is not None else getattr(processor, "min_patches", 1))
            high = int(max_tiles if max_tiles is not None else getattr(processor, "max_patches", 12))
        else:
            low, high = int(min_tiles or 1), int(max_tiles or 12)
            processor = internvl_processor(tile, *_mean_std(mean, std, (IMAGENET_MEAN, IMAGENET_STD)))
        if low > high:
            raise ConfigError(f"data.image_min_tiles ({low}) exceeds data.image_max_tiles ({high})",
                              path="data.image_min_tiles", hint="lower image_min_tiles or raise image_max_tiles")
        return InternVLTiling(processor, tile, tokens_per_tile, low, high, thumbnail)
    if scheme == "idefics3":
        if min_tiles is not None or max_tiles is not None or not thumbnail:
            key = ("image_min_tiles" if min_tiles is not None else "image_max_tiles" if max_tiles is not None
                   else "image_thumbnail")
            raise ConfigError(f"data.{key} is an internvl tiling option; idefics3 tiling takes image_longest_edge "
                              "and image_split", path=f"data.{key}", hint="leave it at its default")
        if given:
            size = _size_of(getattr(processor, "max_image_size", None))
            if size != tile:
                raise ConfigError(f"the image processor in {folder} makes {size}-pixel tiles (max_image_size), the "
                                  f"encoder takes {tile}x{tile} images", path="data.image_processor",
                                  hint="save the processor of the same model, or null to build one from the encoder")
            edge = int(longest_edge if longest_edge is not None else _size_of(processor.size))
            do_split = bool(split if split is not None else getattr(processor, "do_image_splitting", True))
        else:
            edge = int(longest_edge if longest_edge is not None else 4 * tile)
            do_split = True if split is None else bool(split)
            processor = idefics3_processor(tile, edge, *_mean_std(mean, std, (HALF, HALF)), do_split)
        return Idefics3Tiling(processor, tile, tokens_per_tile, edge, do_split)
    raise ConfigError(f"unknown image_tiling {scheme!r}", path="data.image_tiling", hint=f"one of {', '.join(TILINGS)}")


def takes_image_sizes(mod) -> bool:
    """True when the modality's encoder takes ``image_sizes`` (an anyres encoder: LLaVA-NeXT / OneVision)."""
    from mimo_spec.data.preprocess import modality_encoders

    return any("image_sizes" in (getattr(e, "grid_inputs", None) or {}) for e in modality_encoders(mod).values())


def choose_tiling(model, modality: str | None, requested: str = "auto", folder: str | None = None):
    """(scheme, the processor loaded from ``folder`` or None) for the image modality: ``requested``
    (``data.image_tiling``), where ``auto`` is llava_next for an anyres encoder, else the scheme of the folder's
    processor class, else none. A requested scheme the folder's processor does not tile by is a ConfigError."""
    if requested not in TILINGS:
        raise ConfigError(f"unknown image_tiling {requested!r}", path="data.image_tiling",
                          hint=f"one of {', '.join(TILINGS)}")
    if modality is None:
        return "none", None
    mod = model.modalities[modality]
    anyres = takes_image_sizes(mod)
    if requested == "none" and not anyres:
        return "none", None
    from mimo_spec.data.preprocess import load_image_processor

    processor = load_image_processor(folder) if folder is not None else None
    own = scheme_of(processor) if processor is not None else None
    scheme = requested if requested != "auto" else ("llava_next" if anyres else own or "none")
    if processor is not None and scheme != "none" and own != scheme:
        raise ConfigError(f"data.image_tiling is {scheme}, but the image processor in {folder} is a "
                          f"{type(processor).__name__}" + (f" ({own} tiling)" if own else " (no tiling)"),
                          path="data.image_tiling", hint=f"image_tiling: {own or 'none'}, or the model's own processor")
    if anyres and scheme != "llava_next":
        raise ConfigError(f"the encoder of modality {modality!r} takes image_sizes (anyres tiling), but "
                          f"data.image_tiling is {scheme}", path="data.image_tiling", hint="auto or llava_next")
    from mimo_spec.data.preprocess import modality_encoders

    if scheme in ("internvl", "idefics3") and any(getattr(e, "grid_inputs", None)
                                                  for e in modality_encoders(mod).values()):
        raise ConfigError(f"data.image_tiling is {scheme}, but the encoder of modality {modality!r} takes images of "
                          "any size (a grid encoder): tiles are for a fixed-size encoder (clip_vit)",
                          path="data.image_tiling", hint="auto or none")
    if scheme == "llava_next" and not anyres:
        raise ConfigError(f"data.image_tiling is llava_next, but the encoder of modality {modality!r} takes no "
                          "image_sizes (an anyres encoder does)", path="data.image_tiling",
                          hint="use an anyres encoder, or another tiling")
    return scheme, processor


def make_tiling(scheme: str, mod, encoders: dict, tokens_per_tile: int | None, *, processor=None,
                folder: str | None = None, mean=None, std=None, options: dict | None = None) -> Tiling:
    """The :class:`Tiling` of ``scheme`` for an image modality with ``encoders`` {name: (image_size, channels)}
    (one encoder) and fixed items of ``tokens_per_tile`` tokens; ``options``: the data.image_* tiling values."""
    options = dict(options or {})
    if len(encoders) != 1:
        raise ConfigError(f"tiled images ({scheme}) go to one encoder, the image modality has {len(encoders)}",
                          path="data.image_tiling", hint="give the modality one encoder, or image_tiling: none")
    (tile, channels), = encoders.values()
    if scheme == "llava_next":
        return LlavaNextTiling(mod, tile, channels, processor=processor, folder=folder, mean=mean, std=std, **options)
    return build_tiling(scheme, tile=int(tile), channels=int(channels), tokens_per_tile=int(tokens_per_tile),
                        processor=processor, folder=folder, mean=mean, std=std, **options)


class LlavaNextTiling(Tiling):
    """LLaVA-NeXT / OneVision anyres tiling: ONE item per image, ``{"pixel_values": (tiles, C, S, S),
    "image_sizes": (1, 2) or (1, 3)}`` (its base image then the crops of the best grid pinpoint, as transformers'
    LLaVA-NeXT / OneVision image processor makes them for the image alone), its count from the encoder's
    geometry (:func:`~mimo_spec.components.vision.anyres.anyres_image_tokens`, the processors'
    ``_get_number_of_features``). The processor: ``data.image_processor``'s (a LlavaNext / LlavaOnevision one with
    the encoder's tile size and grid pinpoints), else OneVision's for a layout with ``max_tiles`` (anyres_max_N),
    else LLaVA-NeXT's, built from the encoder's tile size and pinpoints.

    OneVision (a ``LlavaOnevisionImageProcessor``: the folder's, or the one built for a layout with ``max_tiles``)
    tiles only a sample's single image, as transformers does with ``batch_num_images``: each image of a sample
    holding several is planned untiled (``plan(..., alone=False)``), padded to a square and resized to one tile,
    its count the base tile's and a newline (``anyres_image_tokens(..., tiled=False)``). OneVision's
    ``image_sizes`` rows are ``[height, width, tiled]`` (1 or 0) so samples of both kinds collate together;
    LLaVA-NeXT's are ``[height, width]`` (it tiles every image)."""

    name = "llava_next"

    def __init__(self, mod, tile: int, channels: int, *, processor=None, folder=None, mean=None, std=None, **options):
        from mimo_spec.components.vision.anyres import anyres_geometry, anyres_image_tokens, anyres_tiles, tile_grid

        given = sorted(k for k, v in options.items() if v is not None and not (k == "thumbnail" and v is True))
        if given:
            raise ConfigError(f"data.image_{given[0]} is not a llava_next tiling option: the encoder's grid_pinpoints "
                              "decide the tiles", path=f"data.image_{given[0]}", hint="leave it unset")
        if channels != 3:
            raise ConfigError(f"tiled images are RGB, but the encoder takes {channels} channel(s)",
                              path="data.image_tiling", hint="num_channels: 3")
        self.geometry = anyres_geometry(mod)
        self._tokens, self._tiles, self._grid = anyres_image_tokens, anyres_tiles, tile_grid
        self.tile = int(self.geometry["tile_size"])
        pins = [list(p) for p in self.geometry["grid_pinpoints"]]
        t = _transformers()
        if processor is not None:
            size = _size_of(getattr(processor, "crop_size", None)) or _size_of(processor.size) \
                or int(processor.size["shortest_edge"])
            have = [list(p) for p in (getattr(processor, "image_grid_pinpoints", None) or [])]
            if size != self.tile or have != pins:
                what = (f"makes {size}-pixel tiles, the encoder takes {self.tile}" if size != self.tile
                        else f"has grid pinpoints {have}, the encoder {pins}")
                raise ConfigError(f"the image processor in {folder} {what}", path="data.image_processor",
                                  hint="save the processor of the same model, or null to build one from the encoder")
            self.processor = processor
        elif self.geometry.get("max_tiles") is not None:  # anyres_max_N: OneVision (SigLIP's 0.5 / 0.5)
            m, s = _mean_std(mean, std, (HALF, HALF))
            self.processor = t.LlavaOnevisionImageProcessorPil(size={"height": self.tile, "width": self.tile},
                                                               image_grid_pinpoints=pins, image_mean=m, image_std=s)
        else:
            from mimo_spec.data.preprocess import CLIP_MEAN, CLIP_STD

            m, s = _mean_std(mean, std, (CLIP_MEAN, CLIP_STD))
            self.processor = t.LlavaNextImageProcessorPil(size={"shortest_edge": self.tile},
                                                          crop_size={"height": self.tile, "width": self.tile},
                                                          image_grid_pinpoints=pins, image_mean=m, image_std=s)
        # OneVision's processor tiles only a sample's single image (batch_num_images); LLaVA-NeXT's every image
        self.onevision = type(self.processor).__name__.startswith("LlavaOnevision")

    def plan(self, width: int, height: int, name: str = "", where: str = "", alone: bool = True) -> TiledImage:
        if width < 1 or height < 1:
            raise DataError(f"{name}: an image of {width}x{height} pixels holds nothing", path=where,
                            hint="remove the sample")
        h, w = int(height), int(width)
        if self.onevision and not alone:  # one of several images: its base tile alone (and a newline)
            return TiledImage(1, (("", self._tokens(h, w, self.geometry, tiled=False)),), (0, 0), tiled=False)
        return TiledImage(1, (("", self._tokens(h, w, self.geometry)),), self._grid(h, w, self.geometry))

    def pixels(self, img, plan: TiledImage, name: str = "", where: str = "") -> dict[str, torch.Tensor]:
        tiled = plan.tiled or not self.onevision
        if tiled:
            out = self.processor(images=[img], return_tensors="pt")
        else:  # as one of a sample's several images (batch_num_images 2, the other a 1-pixel stand-in)
            from PIL import Image

            out = self.processor(images=[[img, Image.new("RGB", (1, 1))]], return_tensors="pt")
        x = torch.as_tensor(out["pixel_values"], dtype=torch.float32)[0]
        sizes = torch.as_tensor(out["image_sizes"], dtype=torch.long).reshape(-1, 2)[:1]
        want = self._tiles(img.height, img.width, self.geometry, tiled)
        if x.shape[0] != want or sizes.tolist() != [[img.height, img.width]]:
            raise DataError(f"image {name}: the image processor made {x.shape[0]} tiles for {sizes.tolist()}, the "
                            f"encoder's geometry {want} for {img.width}x{img.height}", path=where,
                            hint="the processor does not tile as the encoder does: use the model's own processor")
        made = self._tokens(img.height, img.width, self.geometry, tiled)
        if made != plan.tokens:
            raise DataError(f"image {name}: {img.width}x{img.height} once decoded makes {made} tokens, its header "
                            f"said {plan.tokens}",
                            path=where, hint="the file changed while in use, or its header disagrees with its pixels")
        if self.onevision:  # [h, w, tiled]: single- and multi-image samples collate together
            sizes = torch.cat([sizes, torch.tensor([[int(tiled)]], dtype=torch.long)], dim=1)
        return {"pixel_values": x, "image_sizes": sizes}


# ------------------------------------------------------------------------------------------ anyres videos


def uniform_frames(total: int, n: int) -> list[int]:
    """``n`` frame indices spread evenly over ``total`` frames, as transformers' ``default_sample_indices_fn``
    (``arange(n) * total // n``); a video of fewer than ``n`` frames repeats some."""
    return [k * int(total) // int(n) for k in range(int(n))]


class AnyResVideo:
    """LLaVA-NeXT-Video / OneVision videos through an anyres encoder: ``data.video_num_frames`` frames spread
    evenly (transformers' uniform sampling), each through the image tower's preprocessing (LLaVA-NeXT-Video:
    shortest-edge resize to the tile and centre crop, CLIP's normalisation; OneVision, a layout with
    ``max_tiles`` or ``video_downscale``: resized to the tile's square, SigLIP's 0.5 / 0.5, both when
    data.image_mean / image_std are left at CLIP's), as ``{"pixel_values_videos": (1, F, C, S, S)}``; its count is
    :func:`~mimo_spec.components.vision.anyres.video_tokens` of F frames. transformers' video processors need
    torchvision: the frames go through the Pillow image processor here (the same resize rule)."""

    def __init__(self, mod, num_frames: int, mean, std):
        from mimo_spec.components.vision.anyres import anyres_geometry, video_tokens
        from mimo_spec.data.preprocess import CLIP_MEAN, CLIP_STD, clip_image_processor

        if int(num_frames) < 1:
            raise ConfigError(f"must be at least 1, got {num_frames}", path="data.video_num_frames")
        from mimo_spec.data.preprocess import modality_encoders

        self.geometry = anyres_geometry(mod)
        self.encoders = list(modality_encoders(mod))  # the names the inputs go under
        self.frames = int(num_frames)
        self.tile = int(self.geometry["tile_size"])
        self.onevision = self.geometry.get("max_tiles") is not None or self.geometry.get("video_downscale") is not None
        m, s = _mean_std(mean, std, (HALF, HALF) if self.onevision else (CLIP_MEAN, CLIP_STD))
        self.processor = clip_image_processor(self.tile, m, s, "squash" if self.onevision else "crop")
        self.tokens = video_tokens(self.frames, self.geometry)

    # frame reading as Qwen's videos: a file decoded up to the last frame used, a frame folder's chosen images
    def read_frames(self, item, plan, where: str = "") -> list:
        from mimo_spec.data.preprocess import QwenVision

        return QwenVision.read_frames(self, item, plan, where)

    def _decode(self, media, plan, where: str) -> list:
        from mimo_spec.data.preprocess import QwenVision

        return QwenVision._decode(self, media, plan, where)

    def plan(self, item, where: str = ""):
        """The video's frames (container or folder listing only) as a ``VideoPlan`` carrying ``tokens`` / ``items``."""
        from mimo_spec.data.preprocess import VideoPlan, as_media, probe_video

        files, total, fps, width, height = probe_video(as_media(item, "video"), where)
        plan = VideoPlan(total, fps, width, height, uniform_frames(total, self.frames), (self.frames, 1, 1), files)
        plan.tokens, plan.items = self.tokens, 1
        return plan

    def video(self, item, where: str = "", plan=None) -> dict[str, torch.Tensor]:
        """-> ``{"pixel_values_videos": (1, F, C, S, S)}``."""
        plan = plan or self.plan(item, where)
        frames = self.read_frames(item, plan, where)
        out = self.processor(images=frames, return_tensors="pt")["pixel_values"]
        return {"pixel_values_videos": torch.as_tensor(out, dtype=torch.float32)[None]}
