"""Turning media into encoder inputs: images through a Hugging Face image processor, videos through
PyAV and Qwen2-VL's processing, audio through libsndfile, a proper resampler and Whisper's log-mel
features.

``MediaProcessor`` (:mod:`mimo_spec.data.media`, built on the pieces here) knows, for one model, which modality takes images, videos and audio, how
many placeholder tokens one item needs, and how to load a :class:`~mimo_spec.data.records.Media`
(a file, or bytes from a tar shard or a Parquet cell) into ``{encoder_name: {kwarg: tensor (n, ...)}}``.

Native-resolution encoders (``grid_inputs`` with ``image_grid_thw`` / ``video_grid_thw``, e.g.
``qwen_vit``): each image keeps its aspect ratio and gets its own token count (:class:`QwenVision`:
transformers' Qwen2-VL image processor with ``data.min_pixels`` / ``data.max_pixels``); a video
(a file PyAV decodes, or a folder of frame images) is sampled at ``data.video_fps`` with at most
``data.video_max_frames`` frames. Counts are known before decoding: from the image header, the
video container's frame count / rate / size, or the folder listing and its first frame's header.
Qwen3-VL (``data.qwen_vl``; auto: a language model with ``mrope_frames_as_items``): its processors' pixel
bounds and 0.5 / 0.5 normalisation as defaults, frames sampled and the whole clip resized by
``Qwen3VLVideoProcessor``'s rules (:func:`qwen3_frame_indices`, :func:`qwen3_video_size`), and each video
planned with its frame groups' timestamps (:func:`frame_group_timestamps`), which the sample builder writes
as ``<1.5 seconds>`` text before each group.
Tiled images (``data.image_tiling``, :mod:`mimo_spec.data.tiling`): a fixed-size encoder's image cut into tiles by
the model's own Hugging Face processor (InternVL's dynamic tiles, Idefics3 / SmolVLM's split with row/column
text), each tile an item, or an anyres encoder's tiles as one item per image (LLaVA-NeXT / OneVision; OneVision
tiles only a sample's single image, the images of a sample holding several are one base tile each); counts
from the header as above.
SigLIP2 NaFlex (an encoder taking ``spatial_shapes``, ``siglip2_naflex``): each image at its own patch grid
of at most ``max_num_patches`` patches, padded to that budget (:class:`NaFlexVision`: transformers'
SigLIP2 image processor), h*w tokens counted from the header.
The sources, the sample builder and prompt-time generation all use it, so training and inference
see the same pixels and features.

Images: Pillow decodes (a fixed list of raster formats); the EXIF orientation is applied, alpha is
composited on white, 16-bit and float images are scaled to 8 bits; then ``data.image_resize``
(``pad``: expand to a square with the mean colour, as LLaVA-1.5; ``crop``: the processor's
shortest-edge resize and centre crop, as CLIP; ``squash``: resize to the square; ``fit``: the longest side
to the size, then padded to the square with the mean colour, as Janus), with ``data.image_resample``'s
filter (bicubic; Chameleon's processor: lanczos), and the image
processor (``data.image_processor``, a local folder, or a ``CLIPImageProcessor`` built from the
encoder's size and ``data.image_mean`` / ``data.image_std``; Pillow backend either way, so the
pixels do not depend on whether torchvision is installed).

Audio: libsndfile (through ``soundfile``) reads WAV (8/16/24/32-bit integer, 32/64-bit float),
FLAC, OGG Vorbis/Opus, MP3, AIFF... from a path or bytes; channels are averaged; ``soxr``
resamples to 16 kHz (band-limited: no aliasing). Audio longer than the encoder's window
(``max_frames * 160`` samples) is split into one item per window (``audio_overflow: split``; at
most ``MAX_AUDIO_ITEMS`` items, the rest is cut) or cut to one window (``truncate``). Files are read
block by block and only as far as the items use, so neither a long file nor a damaged header
makes a worker decode more than the items need.
A variable-length audio encoder (``whisper_encoder`` with ``variable_length``, Qwen2-Audio) also gets each
item's ``feature_attention_mask`` (its real frames, as WhisperFeatureExtractor's attention mask counts them),
and each item's placeholder count follows its length, from the header, as Qwen2AudioProcessor counts it
(``audio_overflow: truncate`` is that processor's own handling of audio longer than 30 s).

Every unreadable file raises :class:`~mimo_spec.errors.DataError` naming it (the sample builder
skips such samples); a processor or setting that does not fit the model is a ``ConfigError``.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mimo_spec.data.records import Media
from mimo_spec.errors import ConfigError, DataError, InputError

# CLIP's normalisation (also LLaVA's)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Whisper's front end
SAMPLING_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160

IMAGE_RESIZES = ("pad", "crop", "squash", "fit")
IMAGE_RESAMPLES = ("bicubic", "bilinear", "lanczos", "nearest")  # Pillow's filters of those names
AUDIO_OVERFLOWS = ("split", "truncate")
# audio_overflow "split": at most this many items from one file (64 windows: 32 minutes at Whisper's 30 s,
# 41 s at 0.64 s); the rest of a longer file is cut, as with "truncate", and reported by audio_items()
MAX_AUDIO_ITEMS = 64


def as_media(item, kind: str = "") -> Media:
    """A :class:`Media`, or a path (``Path`` / ``str``) as a file-backed one named by its path."""
    if isinstance(item, Media):
        return item
    if isinstance(item, (str, Path)):
        return Media(name=str(item), path=Path(item))
    raise TypeError(f"expected a Media or a path for the {kind} item, got {type(item).__name__}")


# ------------------------------------------------------------------------------------ images

# Raster formats Pillow decodes by itself. Others are refused: EPS/PS hand the file to Ghostscript (an
# external program), and a data set should not reach a format's plugin because of its file's first bytes.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "TGA", "ICO")

_IMAGE_HINT = "the file is not an image Pillow can decode; re-export it or remove the sample"


def load_image(item, where: str = ""):
    """An image (``Media`` or path) -> a fully decoded RGB ``PIL.Image``, ready for the encoder.

    The EXIF orientation is applied; alpha (RGBA, LA, PA, palette or grey with a transparent
    colour) is composited on white; 16-bit grey ("I;16", "I;16B", "I") is scaled to 8 bits by
    ``v / 257`` (the full 0..65535 range to 0..255) and float ("F") from 0..1; CMYK, grey and
    palette images become RGB. A truncated, empty or unknown file raises ``DataError`` naming it.
    """
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise InputError("reading images needs Pillow", path=where, hint="pip install pillow") from None
    media = as_media(item, "image")
    if not media.exists():
        raise DataError(f"image file not found: {media.name}", path=where, hint="check data.image_folder")
    try:
        with media.open() as f:
            img = Image.open(f, formats=IMAGE_FORMATS)
            w, h = img.size  # from the header: refuse what cannot be decoded in memory before decoding it
            _require_image_fits(w * h * max(1, len(img.getbands())) * 2, media.name, where,
                                f"decoding it ({w}x{h})")
            img.load()  # the first frame, in memory: the image outlives the file
        try:
            ImageOps.exif_transpose(img, in_place=True)  # turned upright
        except Exception:  # an unreadable EXIF block: the pixels are fine, keep them as stored
            pass
        return _to_rgb(img)
    except DataError:
        raise
    except Exception as e:
        reason = "the file is empty" if media.size() == 0 else (str(e) or f"{type(e).__name__} while decoding")
        reason = re.sub(r" ?<_io\.\w+ object at 0x[0-9a-f]+>", "", reason)  # Pillow names its in-memory file object
        raise DataError(f"cannot read image {media.name}: {reason}", path=where, hint=_IMAGE_HINT) from None


def _to_rgb(img):
    """A decoded PIL image of any mode -> RGB (see :func:`load_image`)."""
    from PIL import Image

    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.rint(np.clip(a, 0, 65535) / 257.0).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.rint(np.clip(np.asarray(img), 0.0, 1.0) * 255.0).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _require_image_fits(need: int, name, where: str, doing: str) -> None:
    from mimo_spec.train.limits import machine_memory, require_fits

    require_fits(need, machine_memory(), f"image {name}: {doing}", where or str(name),
                 "shrink the image (or give it a less extreme aspect ratio), or remove the sample", cls=DataError)


def resize_pixels(width: int, height: int, size: int, resize: str = "pad") -> int:
    """Pixels of the largest intermediate image the resize makes from a width x height image."""
    if resize == "pad" and width != height:
        return max(width, height) ** 2
    if resize == "crop" and width != height:
        scale = size / min(width, height)
        return max(size, round(width * scale)) * max(size, round(height * scale))
    return max(width * height, size * size)


def expand_to_square(img, fill):
    """LLaVA-1.5's padding: the image centred on a square of colour ``fill`` (a tuple of 0..255 ints)."""
    from PIL import Image

    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), fill if img.mode != "L" else fill[0])
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def pil_filter(resample: str):
    """Pillow's resampling filter named ``resample`` (one of :data:`IMAGE_RESAMPLES`)."""
    from PIL import Image

    if resample not in IMAGE_RESAMPLES:
        raise ConfigError(f"unknown image_resample {resample!r}", path="data.image_resample",
                          hint=f"one of {', '.join(IMAGE_RESAMPLES)}")
    return getattr(Image.Resampling, resample.upper())


def square_image(img, size: int, resize: str = "squash", resample: str = "bicubic", fill=(0, 0, 0)):
    """``img`` (Pillow) as a ``size`` x ``size`` image by ``data.image_resize``'s geometry, each resize with
    ``resample``'s filter: "pad" (centred on a square of colour ``fill``, then resized), "fit" (the longest
    side to ``size``, then centred on the square), "crop" (transformers' shortest-edge resize, the long side
    truncated, then its centre crop) or "squash". The pixels :class:`ImageTransform` hands its processor,
    without the processor's rescale and normalisation (images to generate: :mod:`mimo_spec.data.targets`)."""
    if resize not in IMAGE_RESIZES:
        raise ConfigError(f"unknown image_resize {resize!r}", path="data.image_resize",
                          hint=f"one of {', '.join(IMAGE_RESIZES)}")
    filt = pil_filter(resample)
    w, h = img.size
    if resize == "pad":
        img = expand_to_square(img, fill)
    elif resize == "fit":
        scale = size / max(w, h)
        fitted = (max(round(w * scale), 1), max(round(h * scale), 1))
        img = expand_to_square(img if img.size == fitted else img.resize(fitted, filt), fill)
    elif resize == "crop" and w != h:
        short, long = sorted(img.size)
        scaled = int(size * long / short)
        target = (size, scaled) if w <= h else (scaled, size)
        if img.size != target:
            img = img.resize(target, filt)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        return img.crop((left, top, left + size, top + size))
    return img if img.size == (size, size) else img.resize((size, size), filt)


def clip_image_processor(size: int, mean=CLIP_MEAN, std=CLIP_STD, resize: str = "crop", num_channels: int = 3,
                         resample: str = "bicubic"):
    """A ``CLIPImageProcessor`` (Pillow backend) making ``size`` x ``size`` inputs: shortest-edge
    resize and centre crop, or (``resize="squash"``) a resize to the square; with the ``resample`` filter
    (bicubic as CLIP's), then rescale to 0..1 and normalise with ``mean`` / ``std``."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("preprocessing images needs the transformers package", path="data.image_processor",
                          hint="pip install 'mimo-spec[hf]'") from None
    # transformers 5 names the Pillow backend CLIPImageProcessorPil; in 4.x CLIPImageProcessor is that one
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    squash = resize == "squash"
    mean, std = per_channel(mean, std, num_channels)
    return cls(
        size={"height": size, "width": size} if squash else {"shortest_edge": size},
        crop_size={"height": size, "width": size}, do_center_crop=not squash, resample=int(pil_filter(resample)),
        image_mean=list(mean), image_std=list(std), do_convert_rgb=num_channels == 3)


def load_image_processor(directory: str | Path, key: str = "data.image_processor"):
    """The image processor saved in a LOCAL folder (``preprocessor_config.json``), Pillow backend.
    A folder asking transformers to run its own code is refused: nothing is imported from it."""
    from mimo_spec.data.local import remote_code_request, resolve_path

    folder = resolve_path(directory)
    if not folder.is_dir():
        raise ConfigError(f"no such image processor folder: {folder}", path=key,
                          hint="give a local folder saved with image_processor.save_pretrained(); nothing is "
                               "downloaded; or null to build a CLIP processor from the encoder's size")
    if not (folder / "preprocessor_config.json").is_file():
        raise ConfigError(f"{folder} holds no preprocessor_config.json", path=key,
                          hint="save one with image_processor.save_pretrained(folder)")
    remote = remote_code_request(folder)
    if remote:
        raise ConfigError(f"the image processor in {folder} asks to run code from its folder ({remote}); "
                          "mimo-spec never runs code that comes with a processor", path=key,
                          hint="use a processor class transformers ships, or null to build a CLIP processor")
    try:
        import transformers
        from transformers import AutoImageProcessor
    except ImportError:
        raise ConfigError("an image processor folder needs the transformers package", path=key,
                          hint="pip install 'mimo-spec[hf]'") from None
    # the Pillow backend, as the built processor: the same pixels whether torchvision is installed or not
    pil = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}
    try:
        return AutoImageProcessor.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False, **pil)
    except Exception as e:  # corrupt or incomplete files: say which folder
        raise ConfigError(f"cannot load the image processor in {folder}: {e}", path=key,
                          hint="check the folder was written by save_pretrained()") from None


class ImageTransform:
    """One image encoder's preprocessing: a decoded RGB image -> pixel values (1, C, size, size).

    ``resize`` is applied first ("pad": expand to a square with the processor's mean colour;
    "squash": resize to the square when the processor would crop; "fit": the longest side to ``size``,
    then centred on a ``size`` square of the mean colour, as Janus's processor), then the processor.
    ``presize``: the processor's own resize is a shortest-edge one to ``size`` with the ``resample``
    filter (as :func:`clip_image_processor`'s), so it is done here, in Pillow, to the size the processor
    would compute (its resize then has nothing to do): the same pixels, without the processor's array
    round trip of a large image. Resizes made here use ``resample``.
    """

    def __init__(self, processor, size: int, num_channels: int, resize: str, key: str = "data.image_processor",
                 presize: bool = False, resample: str = "bicubic"):
        self.processor, self.size, self.num_channels, self.resize = processor, int(size), int(num_channels), resize
        self.presize = presize
        self.filter = pil_filter(resample)  # checked now; Pillow's enum for every resize made here
        mean = getattr(processor, "image_mean", None) or CLIP_MEAN
        mean = [float(m) for m in (mean if isinstance(mean, (list, tuple)) else [mean])]
        self.fill = tuple(int(m * 255) for m in mean)  # LLaVA's background: int(), not round()
        self.pre_squash = resize == "squash" and bool(getattr(processor, "do_center_crop", False))
        # one probe through the processor, on a non-square image: its output must be what the encoder takes
        from PIL import Image

        probe = Image.new("RGB" if num_channels == 3 else "L", (48, 32))
        got = tuple(self._run(probe).shape)
        want = (1, self.num_channels, self.size, self.size)
        if got != want:
            raise ConfigError(f"the image processor makes pixel values of shape {got}, but the encoder takes "
                              f"{want}", path=key,
                              hint=f"use a processor whose output size is {size}x{size} with {num_channels} "
                                   "channel(s), or null to build one from the encoder's size")

    def _run(self, img) -> torch.Tensor:
        from PIL import Image

        if self.resize == "pad":
            img = expand_to_square(img, self.fill)
        elif self.resize == "fit":  # Janus: the longest side to size (the other rounded), then padded
            w, h = img.size
            scale = self.size / max(w, h)
            fitted = (max(round(w * scale), 1), max(round(h * scale), 1))
            img = expand_to_square(img if img.size == fitted else img.resize(fitted, self.filter),
                                   self.fill)
        if self.pre_squash or (self.presize and (img.width == img.height or self.resize == "squash")):
            target = (self.size, self.size)
        elif self.presize and self.resize == "crop":
            # transformers' shortest-edge size: the short side to size, the long one scaled and truncated
            short, long = sorted(img.size)
            scaled = int(self.size * long / short)
            target = (self.size, scaled) if img.width <= img.height else (scaled, self.size)
        else:
            target = img.size
        if img.size != target:
            img = img.resize(target, self.filter)
        skip = {}
        if self.presize:  # its resize (and, on the square, its crop) would change nothing: skip the round trips
            skip = {"do_resize": False, "do_center_crop": img.size != (self.size, self.size)}
        out = self.processor(images=img, return_tensors="pt", **skip)["pixel_values"]
        return out if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out))

    def __call__(self, img, name: str = "", where: str = "") -> torch.Tensor:
        w, h = img.size
        _require_image_fits(resize_pixels(w, h, self.size, self.resize) * 4 * 3, name, where,
                            f"resizing it ({w}x{h}, image_resize {self.resize}) to {self.size}x{self.size}")
        img = img if self.num_channels == 3 else img.convert("L")
        x = self._run(img).float()
        if x.shape != (1, self.num_channels, self.size, self.size):
            raise ConfigError(f"the image processor made pixel values of shape {tuple(x.shape)} for image {name}, "
                              f"expected {(1, self.num_channels, self.size, self.size)}", path="data.image_processor")
        return x


def per_channel(mean, std, channels: int) -> tuple[list[float], list[float]]:
    """``data.image_mean`` / ``image_std`` as one value per channel: a single value serves every channel."""
    out = []
    for name, values in (("image_mean", mean), ("image_std", std)):
        values = [float(v) for v in values]
        if len(values) not in (1, channels):
            raise ConfigError(f"{name} needs 1 or {channels} values (one per channel of the encoder's images), "
                              f"got {len(values)}", path=f"data.{name}")
        out.append(values * channels if len(values) == 1 else values)
    return out[0], out[1]


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(C, H, W) values in [0, 1] -> (x - mean) / std per channel (mean/std of length C or 1)."""
    mean, std = per_channel(mean, std, x.shape[0])
    m = torch.tensor(mean, dtype=x.dtype)
    s = torch.tensor(std, dtype=x.dtype)
    return (x - m.view(-1, 1, 1)) / s.view(-1, 1, 1)


# ------------------------------------------------------------ native-resolution images and videos (Qwen2-VL)

# a frame folder's images (sorted by name, numbers in names compared as numbers)
FRAME_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")

_VIDEO_HINT = ("a video is a file PyAV decodes (mp4, webm, mkv, avi, mov...) or a folder of frame images; "
               "re-encode it (ffmpeg -i in out.mp4) or remove the sample")


def natural_key(name: str) -> list:
    """Sort key comparing the numbers in a name as numbers: frame_2.jpg before frame_10.jpg."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", name) if t]


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int,
                 name: str = "", where: str = "") -> tuple[int, int]:
    """transformers' Qwen2-VL rule: (height, width) -> the nearest sides divisible by ``factor`` with
    ``min_pixels <= h * w <= max_pixels``, the aspect ratio kept as far as it can be. An aspect ratio over
    200 raises DataError naming the item."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as rule
    except ImportError:  # transformers 4.x
        try:
            from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as rule
        except ImportError:
            raise ConfigError("native-resolution images need transformers with Qwen2-VL", path="data.image_processor",
                              hint="pip install 'mimo-spec[data]'") from None
    try:
        return rule(int(height), int(width), factor=int(factor), min_pixels=int(min_pixels), max_pixels=int(max_pixels))
    except (ValueError, ZeroDivisionError) as e:
        raise DataError(f"{name}: {width}x{height} cannot be resized for the encoder: {e}", path=where,
                        hint="crop the item to an aspect ratio under 200:1, or remove the sample") from None


def image_size(item, where: str = "") -> tuple[int, int]:
    """(width, height) of an image as :func:`load_image` turns it upright (EXIF orientation), from its
    header only (a file or a shard member is read only as far as its header goes). DataError naming the
    item as :func:`load_image`."""
    try:
        from PIL import Image
    except ImportError:
        raise InputError("reading images needs Pillow", path=where, hint="pip install pillow") from None
    media = as_media(item, "image")
    if not media.exists():
        raise DataError(f"image file not found: {media.name}", path=where, hint="check data.image_folder")

    def probe(f) -> tuple[int, int]:
        img = Image.open(f, formats=IMAGE_FORMATS)
        w, h = img.size
        if img.format == "PNG" and "exif" not in img.info:
            return w, h  # Pillow's PNG getexif() decodes the image to look past it: an eXIf chunk goes before the pixels
        try:
            orientation = img.getexif().get(0x0112, 1)
        except Exception:  # an unreadable EXIF block: load_image keeps the pixels as stored
            orientation = 1
        return (h, w) if orientation in (5, 6, 7, 8) else (w, h)

    try:
        with media.stream() as f:  # a shard member is read only as far as its header goes
            return probe(f)
    except Exception as e:
        reason = "the file is empty" if media.size() == 0 else (str(e) or f"{type(e).__name__} while decoding")
        reason = re.sub(r" ?<_io\.\w+ object at 0x[0-9a-f]+>", "", reason)
        raise DataError(f"cannot read image {media.name}: {reason}", path=where, hint=_IMAGE_HINT) from None


def qwen2vl_image_processor(min_pixels: int, max_pixels: int, patch_size: int, temporal_patch_size: int,
                            merge_size: int, mean=CLIP_MEAN, std=CLIP_STD):
    """transformers' Qwen2-VL image processor (Pillow backend) for an encoder's geometry: bicubic resize by
    :func:`smart_resize`, rescale to 0..1, normalise, and patches flattened to ``(t*h*w, C*T*p*p)``."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("native-resolution images need the transformers package", path="data.image_processor",
                          hint="pip install 'mimo-spec[data]'") from None
    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    pil = {} if hasattr(transformers, "Qwen2VLImageProcessorPil") else {"use_fast": False}
    return cls(min_pixels=int(min_pixels), max_pixels=int(max_pixels), patch_size=int(patch_size),
               temporal_patch_size=int(temporal_patch_size), merge_size=int(merge_size),
               image_mean=list(mean), image_std=list(std), **pil)


def _pixel_bounds(processor) -> tuple[int, int]:
    size = getattr(processor, "size", None) or {}
    size = dict(size) if not isinstance(size, dict) else size
    low = size.get("shortest_edge", getattr(processor, "min_pixels", None))
    high = size.get("longest_edge", getattr(processor, "max_pixels", None))
    return int(low), int(high)


def sample_frame_indices(total: int, video_fps: float | None, fps: float, min_frames: int, max_frames: int,
                         temporal_patch_size: int) -> list[int]:
    """The frames of a ``total``-frame video to use, as transformers' ``Qwen2VLVideoProcessor.sample_frames``
    picks them: ``total / video_fps * fps`` frames, at least ``min_frames``, at most ``max_frames`` and
    ``total``, rounded down to a multiple of ``temporal_patch_size``, spread evenly
    (``arange(0, total, total / n)``). ``video_fps`` None (a frame folder, already sampled): all its frames
    up to ``max_frames``, else ``max_frames`` of them spread evenly. A video shorter than one temporal patch
    keeps all its frames (the processor repeats the last one)."""
    t = int(temporal_patch_size)
    if video_fps is None and total <= max_frames:
        return list(range(total))
    cap = math.floor(min(max_frames, total) / t) * t
    n = cap if video_fps is None else min(max(total / video_fps * fps, min_frames), cap, total)
    n = math.floor(n / t) * t
    if n <= 0:
        n = min(total, max_frames)
    if n <= 0:
        return []
    return torch.arange(0, total, total / n).int().tolist()[:n]


# the processors' defaults when data.min_pixels ... are null: transformers' Qwen2-VL image / video processors
# (per image, per frame), and Qwen3-VL's (Qwen/Qwen3-VL-*'s preprocessor_config.json / video_preprocessor_config.json:
# per image, and for a video over the whole clip: frames x height x width)
QWEN2_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280, "video_min_pixels": 128 * 28 * 28,
                "video_max_pixels": 28 * 28 * 768}
QWEN3_PIXELS = {"min_pixels": 65536, "max_pixels": 16777216, "video_min_pixels": 4096, "video_max_pixels": 25165824}
# Qwen3-VL's normalisation (its processors' image_mean / image_std)
QWEN3_MEAN = (0.5, 0.5, 0.5)
QWEN3_STD = (0.5, 0.5, 0.5)
QWEN_VL = ("auto", "qwen2_vl", "qwen3_vl")


def qwen3_frame_indices(total: int, video_fps: float | None, fps: float, min_frames: int,
                        max_frames: int) -> list[int]:
    """The frames of a ``total``-frame video to use, as transformers' ``Qwen3VLVideoProcessor.sample_frames``
    picks them: ``int(total / video_fps * fps)`` frames, at least ``min_frames``, at most ``max_frames`` and
    ``total`` (no rounding to the temporal patch: the last frame is repeated to fill it), at
    ``linspace(0, total - 1, n)`` rounded half to even. ``video_fps`` None (a frame folder, already sampled):
    all its frames up to ``max_frames``, else ``max_frames`` of them spread the same way."""
    if video_fps is None:
        n = min(total, max_frames)
    else:
        n = min(max(int(total / video_fps * fps), min_frames), max_frames, total)
    if n <= 0:
        return []
    return [int(i) for i in np.linspace(0, total - 1, n).round().astype(int)]


def qwen3_video_size(frames: int, height: int, width: int, temporal: int, factor: int, min_pixels: int,
                     max_pixels: int, name: str = "", where: str = "") -> tuple[int, int]:
    """Qwen3-VL's video resize rule: (height, width) -> sides divisible by ``factor``, the bounds applying to the
    whole clip: ``frames`` (rounded to the temporal patch) x height x width between ``min_pixels`` and
    ``max_pixels``, the aspect ratio kept as far as it can be. Sides under ``factor`` are first scaled up to it.
    Fewer frames than one temporal patch, or an aspect ratio over 200, raise DataError naming the item."""
    if frames < temporal:
        raise DataError(f"{name}: {frames} frame(s) sampled, but Qwen3-VL's video processing needs at least "
                        f"{temporal} (one temporal patch)", path=where,
                        hint="give the video more frames, or pass a single frame as an image")
    h, w = float(height), float(width)
    if h < factor or w < factor:
        scale = max(factor / h, factor / w)
        h, w = float(int(h * scale)), float(int(w * scale))
    if min(h, w) <= 0 or max(h, w) / min(h, w) > 200:
        raise DataError(f"{name}: {width}x{height} cannot be resized for the encoder: its aspect ratio is over 200",
                        path=where, hint="crop the video to an aspect ratio under 200:1, or remove the sample")
    new_h, new_w = round(h / factor) * factor, round(w / factor) * factor
    volume = round(frames / temporal) * temporal * new_h * new_w
    if volume > max_pixels:
        beta = math.sqrt(frames * h * w / max_pixels)
        new_h = max(factor, math.floor(h / beta / factor) * factor)
        new_w = max(factor, math.floor(w / beta / factor) * factor)
    elif volume < min_pixels:
        beta = math.sqrt(min_pixels / (frames * h * w))
        new_h, new_w = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return int(new_h), int(new_w)


def frame_group_timestamps(indices: list[int], fps: float, temporal: int) -> list[float]:
    """Seconds of each temporal patch (frame group) of a Qwen3-VL video: the sampled frame indices, the last
    repeated to fill the last group, divided by the frame rate; each group's time is the mean of its first and
    last frame's (transformers' ``Qwen3VLProcessor``)."""
    idx = list(indices) + [indices[-1]] * (-len(indices) % temporal) if indices else []
    return [(idx[i] / fps + idx[i + temporal - 1] / fps) / 2 for i in range(0, len(idx), temporal)]


def timestamp_text(seconds: float) -> str:
    """The text before a Qwen3-VL frame group: ``<0.5 seconds>`` (one decimal)."""
    return f"<{seconds:.1f} seconds>"


class VideoPlan:
    """What one video becomes, known before decoding: its frame count and rate (from the container or
    the folder listing), the frames used, the frame size and the grid ``(t, h, w)``.
    ``seconds_per_grid``: seconds per temporal patch as transformers' Qwen2.5-VL processor states it
    (``temporal_patch_size / data.video_fps``; its ``second_per_grid_ts``). ``timestamps`` (Qwen3-VL's layout,
    else None): the seconds of each of the ``t`` frame groups (:func:`frame_group_timestamps`)."""

    def __init__(self, frames: int, fps: float | None, width: int, height: int, indices: list[int],
                 grid: tuple[int, int, int], files: list[Path] | None = None, seconds_per_grid: float = 1.0,
                 timestamps: list[float] | None = None):
        self.frames, self.fps, self.width, self.height = frames, fps, width, height
        self.indices, self.grid, self.files = indices, grid, files
        self.seconds_per_grid = seconds_per_grid
        self.timestamps = timestamps


def _av():
    try:
        import av
    except ImportError:
        raise ConfigError("videos need PyAV", path="data.video_token", hint="pip install 'mimo-spec[data]' (av)") \
            from None
    return av


def _open_container(media: Media):
    av = _av()
    return av.open(str(media.path) if media.whole_file else media.stream(), mode="r")


def _video_error(media: Media, where: str, reason) -> DataError:
    reason = str(reason) or type(reason).__name__
    reason = re.sub(r" ?<_io\.\w+ object at 0x[0-9a-f]+>", "", reason)
    if not media.exists():
        reason = "the file does not exist"
    elif media.size() == 0 and not media.is_dir():
        reason = "the file is empty"
    return DataError(f"cannot read video {media.name}: {reason}", path=where, hint=_VIDEO_HINT)


def video_info(item, where: str = "") -> tuple[int, float, int, int]:
    """(frames, frames per second, width, height) of a video file from its container: the stream's frame
    count, or (containers that do not store it: webm, mkv) its packets counted without decoding. DataError
    naming the item for a missing, unreadable or empty video."""
    media = as_media(item, "video")
    if not media.exists():
        raise DataError(f"video not found: {media.name}", path=where, hint="check data.video_folder")
    try:
        with _open_container(media) as container:
            if not container.streams.video:
                raise ValueError("it holds no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            width, height = int(stream.codec_context.width), int(stream.codec_context.height)
            frames = int(stream.frames or 0)
            if frames <= 0:
                frames = sum(1 for packet in container.demux(stream) if packet.size)
    except DataError:
        raise
    except Exception as e:
        raise _video_error(media, where, e) from None
    if frames <= 0:
        raise _video_error(media, where, "it holds no frames")
    if not rate or float(rate) <= 0:
        raise _video_error(media, where, "its container declares no frame rate")
    if width <= 0 or height <= 0:
        raise _video_error(media, where, f"it declares a frame size of {width}x{height}")
    return frames, float(rate), width, height


def probe_video(media: Media, where: str = "") -> tuple[list[Path] | None, int, float | None, int, int]:
    """(frame files or None, frames, fps or None, width, height) of a video file (its container's header) or
    a folder of frame images (its listing and first frame's header); nothing is decoded."""
    if media.is_dir():
        files = frame_files(media, where)
        width, height = image_size(files[0], where)
        return files, len(files), None, width, height
    frames, fps, width, height = video_info(media, where)
    return None, frames, fps, width, height


def frame_files(media: Media, where: str = "") -> list[Path]:
    """The frame images of a video folder, sorted by name (numbers compared as numbers)."""
    files = sorted((p for p in media.path.iterdir() if p.is_file() and not p.name.startswith(".")
                    and p.suffix.lower().lstrip(".") in FRAME_SUFFIXES), key=lambda p: natural_key(p.name))
    if not files:
        raise DataError(f"the video folder {media.name} holds no frame images", path=where,
                        hint=f"a frame folder holds images ({', '.join(FRAME_SUFFIXES)}), one per frame, in name order")
    return files


class QwenVision:
    """Qwen2-VL's preprocessing for one grid encoder: images and video frames at their own size.

    Images go through transformers' Qwen2-VL image processor (``data.image_processor``, a local folder, or
    one built from ``min_pixels`` / ``max_pixels`` and the encoder's ``patch_size``, ``temporal_patch_size``
    and ``spatial_merge_size``): ``pixel_values (t*h*w, C*T*p*p)`` and ``image_grid_thw (1, 3)``.
    Video frames go through the same processor with ``video_min_pixels`` / ``video_max_pixels`` (each frame
    resized as transformers' video processor resizes it), then ``temporal_patch_size`` consecutive frames
    make one temporal patch (the last frame repeated to fill the last one), laid out as transformers'
    ``Qwen2VLVideoProcessor`` lays them out: ``pixel_values_videos (t*h*w, C*T*p*p)``, ``video_grid_thw``.
    Token counts (``t*h*w / merge**2``) come from headers alone (:meth:`image_grid`, :meth:`video_plan`).

    ``qwen3``: Qwen3-VL's video processing (transformers' ``Qwen3VLVideoProcessor``, which needs torchvision, so
    its rules are followed here with the image processor on the frames): frames sampled by
    :func:`qwen3_frame_indices`, every frame resized (bicubic, Pillow) to the size :func:`qwen3_video_size` gives
    the whole clip (``video_min_pixels`` / ``video_max_pixels`` bound frames x height x width), and each plan
    carries its frame groups' timestamps.
    """

    def __init__(self, encoder, *, min_pixels: int, max_pixels: int, video_min_pixels: int, video_max_pixels: int,
                 mean=CLIP_MEAN, std=CLIP_STD, processor: str | None = None, fps: float = 2.0, min_frames: int = 4,
                 max_frames: int = 768, where: str = "data", qwen3: bool = False):
        missing = [a for a in ("patch_size", "temporal_patch_size", "spatial_merge_size") if not hasattr(encoder, a)]
        if missing:
            raise ConfigError(f"the encoder {type(encoder).__name__} takes grid inputs but has no {missing[0]}",
                              path=where, hint="a Qwen2-VL-style encoder states patch_size, temporal_patch_size "
                                               "and spatial_merge_size")
        self.patch = int(encoder.patch_size)
        self.temporal = int(encoder.temporal_patch_size)
        self.merge = int(encoder.spatial_merge_size)
        self.channels = int(getattr(encoder, "num_channels", 3))
        if self.channels != 3:
            raise ConfigError(f"the Qwen2-VL processor makes RGB pixels, but the encoder takes {self.channels} "
                              "channel(s)", path=where, hint="num_channels: 3")
        for low, high, a, b in (("data.min_pixels", "data.max_pixels", min_pixels, max_pixels),
                                ("data.video_min_pixels", "data.video_max_pixels", video_min_pixels, video_max_pixels)):
            if a > b:
                raise ConfigError(f"{low} ({a}) exceeds {high} ({b})", path=low, hint=f"lower {low} or raise {high}")
        if processor is not None:
            self.processor = load_image_processor(processor)
            have = {a: getattr(self.processor, a, None) for a in ("patch_size", "temporal_patch_size", "merge_size")}
            want = {"patch_size": self.patch, "temporal_patch_size": self.temporal, "merge_size": self.merge}
            bad = [a for a in want if have[a] != want[a]]
            if bad or not hasattr(self.processor, "size"):
                raise ConfigError(f"the image processor in {processor} is not a Qwen2-VL one for this encoder"
                                  + (f": its {bad[0]} is {have[bad[0]]}, the encoder's {want[bad[0]]}" if bad else ""),
                                  path="data.image_processor",
                                  hint="save the processor of the same model, or null to build one from data.min_pixels"
                                       " / data.max_pixels and the encoder")
            mean, std = self.processor.image_mean, self.processor.image_std
        else:
            self.processor = qwen2vl_image_processor(min_pixels, max_pixels, self.patch, self.temporal, self.merge,
                                                     mean, std)
        self.min_pixels, self.max_pixels = _pixel_bounds(self.processor)
        self.frame_processor = qwen2vl_image_processor(video_min_pixels, video_max_pixels, self.patch, self.temporal,
                                                       self.merge, mean, std)
        self.video_min_pixels, self.video_max_pixels = int(video_min_pixels), int(video_max_pixels)
        self.fps, self.min_frames, self.max_frames = float(fps), int(min_frames), int(max_frames)
        self.qwen3 = bool(qwen3)

    @property
    def factor(self) -> int:
        return self.patch * self.merge

    @property
    def row_width(self) -> int:
        """Values per patch row: C * T * p * p."""
        return self.channels * self.temporal * self.patch * self.patch

    def tokens(self, grid) -> int:
        """Placeholder tokens of an item with grid (t, h, w): t*h*w / merge**2."""
        t, h, w = (int(x) for x in grid)
        return t * h * w // (self.merge * self.merge)

    # ------------------------------------------------------------------------------ images
    def image_grid(self, width: int, height: int, name: str = "", where: str = "") -> tuple[int, int, int]:
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels, name, where)
        return 1, h // self.patch, w // self.patch

    def image(self, img, name: str = "", where: str = "") -> dict[str, torch.Tensor]:
        """A decoded RGB image -> ``{"pixel_values": (h*w, C*T*p*p), "image_grid_thw": (1, 3)}``."""
        _, gh, gw = self.image_grid(*img.size, name, where)
        _require_image_fits(max(img.width * img.height, gh * gw * self.patch ** 2) * 4 * 3 * (1 + self.temporal), name,
                            where, f"resizing it ({img.width}x{img.height}) to {gw * self.patch}x{gh * self.patch}")
        out = self.processor(images=img, return_tensors="pt")
        return {"pixel_values": torch.as_tensor(out["pixel_values"], dtype=torch.float32),
                "image_grid_thw": torch.as_tensor(out["image_grid_thw"], dtype=torch.long).reshape(-1, 3)}

    # ------------------------------------------------------------------------------ videos
    def video_plan(self, item, where: str = "") -> VideoPlan:
        """The frames a video (a file, or a folder of frame images) gives and its grid, before decoding."""
        media = as_media(item, "video")
        files, frames, fps, width, height = probe_video(media, where)
        if self.qwen3:
            indices = qwen3_frame_indices(frames, fps, self.fps, self.min_frames, self.max_frames)
            h, w = qwen3_video_size(len(indices), height, width, self.temporal, self.factor, self.video_min_pixels,
                                    self.video_max_pixels, media.name, where)
            # a frame folder's frames are taken as sampled at data.video_fps
            stamps = frame_group_timestamps(indices, fps if fps is not None else self.fps, self.temporal)
        else:
            indices = sample_frame_indices(frames, fps, self.fps, self.min_frames, self.max_frames, self.temporal)
            h, w = smart_resize(height, width, self.factor, self.video_min_pixels, self.video_max_pixels, media.name,
                                where)
            stamps = None
        t = -(-len(indices) // self.temporal)
        return VideoPlan(frames, fps, width, height, indices, (t, h // self.patch, w // self.patch), files,
                         self.temporal / self.fps, stamps)

    def read_frames(self, item, plan: VideoPlan, where: str = "") -> list:
        """The plan's frames as RGB images (a file decoded up to the last frame used; a folder's chosen
        images loaded). Every frame must have the first frame's size."""
        media = as_media(item, "video")
        _require_image_fits(len(plan.indices) * plan.width * plan.height * 3 * 2, media.name, where,
                            f"decoding {len(plan.indices)} frames ({plan.width}x{plan.height}) of")
        if plan.files is not None:
            frames = [load_image(plan.files[i], where) for i in plan.indices]
        else:
            frames = self._decode(media, plan, where)
        for k, f in zip(plan.indices, frames):
            if f.size != (plan.width, plan.height):
                raise DataError(f"frame {k} of video {media.name} is {f.width}x{f.height}, but its first frame "
                                f"(or container) says {plan.width}x{plan.height}", path=where,
                                hint="every frame of a video has one size: resize the frames or remove the sample")
        return frames

    def _decode(self, media: Media, plan: VideoPlan, where: str) -> list:
        want = {i: None for i in plan.indices}
        last, decoded = max(plan.indices), 0
        try:
            with _open_container(media) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for frame in container.decode(stream):
                    if decoded in want:
                        want[decoded] = frame.to_image()  # RGB
                    decoded += 1
                    if decoded > last:
                        break
        except Exception as e:
            raise _video_error(media, where, e) from None
        if decoded <= last:
            raise _video_error(media, where, f"the file ends early: its container declares {plan.frames} frames "
                                             f"but only {decoded} decode")
        return [want[i] for i in plan.indices]

    def video(self, item, where: str = "", plan: VideoPlan | None = None) -> dict[str, torch.Tensor]:
        """A video -> ``{"pixel_values_videos": (t*h*w, C*T*p*p), "video_grid_thw": (1, 3),
        "second_per_grid_ts": (1,)}``."""
        media = as_media(item, "video")
        plan = plan or self.video_plan(media, where)
        frames = self.read_frames(media, plan, where)
        t, gh, gw = plan.grid
        if self.qwen3:  # one size for the whole clip: resized here as the processor's resize would, then kept
            from PIL import Image

            size = (gw * self.patch, gh * self.patch)
            resample = Image.Resampling(int(getattr(self.frame_processor, "resample", Image.BICUBIC)))
            frames = [f if f.size == size else f.resize(size, resample) for f in frames]
            out = self.frame_processor(images=frames, return_tensors="pt", do_resize=False)
        else:
            out = self.frame_processor(images=frames, return_tensors="pt")
        n, c, tp, p = len(frames), self.channels, self.temporal, self.patch
        got = tuple(int(x) for x in out["image_grid_thw"][0])
        if got != (1, gh, gw):
            raise DataError(f"video {media.name}: the processor made a {got[1]}x{got[2]} patch grid, the plan "
                            f"{gh}x{gw}", path=where, hint="the frames' size differs from the container's")
        # each frame's own pixels (the image processor repeats a frame over the temporal patch)
        x = torch.as_tensor(out["pixel_values"], dtype=torch.float32).reshape(n, gh * gw, c, tp, p, p)[:, :, :, 0]
        if n % tp:
            x = torch.cat([x, x[-1:].expand(tp - n % tp, *x.shape[1:])])
        x = x.reshape(t, tp, gh * gw, c, p, p).permute(0, 2, 3, 1, 4, 5).reshape(t * gh * gw, c * tp * p * p)
        return {"pixel_values_videos": x.contiguous(),
                "video_grid_thw": torch.tensor([[t, gh, gw]], dtype=torch.long),
                "second_per_grid_ts": torch.tensor([float(plan.seconds_per_grid)])}


# ------------------------------------------------------------------------------------- audio

# sample rates an audio file may declare (a header claiming 1 Hz or 2**31 Hz is damaged, not audio)
MIN_RATE, MAX_RATE = 1000, 1_000_000
# frames read at once: about 4 MB of float32 whatever the channel count
_BLOCK_VALUES = 1 << 20

_LABELS = {"wav": "WAV file", "wave": "WAV file", "flac": "FLAC file", "mp3": "MP3 file", "ogg": "OGG file",
           "oga": "OGG file", "opus": "OGG file", "aif": "AIFF file", "aiff": "AIFF file"}
_AUDIO_HINT = ("audio is read by libsndfile (WAV, FLAC, OGG Vorbis/Opus, MP3, AIFF...); re-export it, e.g. "
               "ffmpeg -i in -ar 16000 out.flac, or remove the sample")


def _label(media: Media) -> str:
    return _LABELS.get(media.suffix, "audio file")


def _open_sound(media: Media):
    import soundfile

    return soundfile.SoundFile(str(media.path) if media.whole_file else media.open())


def _cannot_read(media: Media, where: str, error: Exception | None, reason: str = "") -> DataError:
    return DataError(f"cannot read {_label(media)} {media.name}: {reason or _audio_problem(media, error)}",
                     path=where, hint=_AUDIO_HINT)


def _head(media: Media, n: int = 1 << 16) -> bytes:
    try:
        with media.open() as f:
            return f.read(n)
    except OSError:
        return b""


def _riff_state(head: bytes, size: int) -> tuple[bool, int | None]:
    """For a RIFF WAVE file: (whether it ends inside its header, before a data chunk; the bytes its data
    chunk declares, or None)."""
    if len(head) < 12:
        return True, None
    pos, end = 12, min(size, len(head))
    while pos + 8 <= end:
        chunk, length = head[pos:pos + 4], int.from_bytes(head[pos + 4:pos + 8], "little")
        if chunk == b"data":
            return False, length
        if pos + 8 + length > size:  # a chunk before the data runs past the end of the file
            return True, None
        pos += 8 + length + (length & 1)
    return pos + 8 > size, None  # no room left for a data chunk (or beyond the bytes read: cannot tell)


def _audio_problem(media: Media, error: Exception | None) -> str:
    """What is wrong with an audio file libsndfile refused, in words (its messages name no file)."""
    if isinstance(error, OSError) and not media.exists():
        return "the file does not exist"
    size = media.size()
    if size == 0:
        return "the file is empty"
    head = _head(media)
    riff = head[:4] in (b"RIFF", b"RIFX", b"RF64", b"BW64")
    if _label(media) == "WAV file" or riff:
        if not riff or (len(head) >= 12 and head[8:12] != b"WAVE"):
            return f"not a RIFF WAVE file (it starts with {head[:12]!r})"
        if _riff_state(head, size)[0]:
            return f"the file ends early ({size} bytes): its header or chunks are cut short"
    message = getattr(error, "error_string", None) or str(error or "") or type(error).__name__
    message = message.split(": ", 1)[-1] if message.startswith("Error opening") else message
    if "not recognised" in message or "not recognized" in message:
        return f"not an audio format libsndfile reads (it starts with {head[:12]!r})"
    if "malformed" in message.lower() or "lost sync" in message or "fseek" in message:
        return f"the file is damaged or truncated ({size} bytes): {message}"
    return message


def _no_frames(media: Media) -> str:
    head = _head(media)
    declared = head[:4] in (b"RIFF", b"RF64") and bool(_riff_state(head, media.size())[1])
    return "it holds no audio frames" + (" (the header declares some, but the file ends before them)"
                                         if declared else "")


def audio_info(item, where: str = "") -> tuple[int, int, int]:
    """(frames, sample rate, channels) of an audio item from its header (nothing decoded).

    Raises DataError naming the item when it is missing, not audio, damaged, empty of frames, or
    declares a sample rate outside ``MIN_RATE..MAX_RATE``.
    """
    media = as_media(item, "audio")
    if not media.exists():
        raise DataError(f"audio file not found: {media.name}", path=where, hint="check data.audio_folder")
    try:
        with _open_sound(media) as f:
            frames, rate, channels = int(f.frames), int(f.samplerate), int(f.channels)
    except Exception as e:
        raise _cannot_read(media, where, e) from None
    _check_header(media, where, frames, rate, channels)
    return frames, rate, channels


def _check_header(media: Media, where: str, frames: int, rate: int, channels: int) -> None:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise DataError(f"{media.name} declares a sample rate of {rate} Hz (expected {MIN_RATE}..{MAX_RATE} Hz): "
                        "the header is damaged or the file is not audio", path=where or media.name,
                        hint="re-export it, e.g. ffmpeg -i in.wav -ar 16000 out.flac")
    if channels < 1:
        raise _cannot_read(media, where, None, f"it declares {channels} channels")
    if frames <= 0:
        raise _cannot_read(media, where, None, _no_frames(media))


def _require_audio_fits(need: float, media: Media, where: str, doing: str) -> None:
    from mimo_spec.train.limits import machine_memory, require_fits

    require_fits(need, machine_memory(), f"{doing} {_label(media)} {media.name}", where or media.name,
                 "cut the file to the part the model uses, or remove the sample", cls=DataError)


def _mono_blocks(f, media: Media, where: str, frames: int, channels: int):
    """Up to ``frames`` frames of an open SoundFile as float32 mono blocks; stops early at the file's end."""
    block = max(1024, _BLOCK_VALUES // channels)
    read = 0
    while read < frames:
        want = min(block, frames - read)
        try:
            data = f.read(want, dtype="float32", always_2d=True)
        except Exception as e:
            raise _cannot_read(media, where, e) from None
        read += len(data)
        yield data[:, 0] if channels == 1 else data.mean(axis=1, dtype=np.float32), len(data) < want
        if len(data) < want:
            return


def read_audio(item, where: str = "", max_seconds: float | None = None) -> tuple[torch.Tensor, int]:
    """An audio item -> (mono waveform float32 in [-1, 1] of shape (T,), its sample rate).

    ``max_seconds``: read only the start (what the features use), so a long file, or one whose
    header declares a tiny sample rate, never decodes more than that.
    """
    media = as_media(item, "audio")
    frames, rate, channels = audio_info(media, where)
    if max_seconds is not None:
        frames = min(frames, math.ceil(max_seconds * rate) + 2)
    _require_audio_fits(frames * 4 + _BLOCK_VALUES * 8, media, where, "decoding")
    try:
        with _open_sound(media) as f:
            parts = [block for block, _ in _mono_blocks(f, media, where, frames, channels)]
    except DataError:
        raise
    except Exception as e:
        raise _cannot_read(media, where, e) from None
    x = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if x.size == 0:
        raise _cannot_read(media, where, None, _no_frames(media))
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), rate


def read_wav(path, where: str = "", max_seconds: float | None = None) -> tuple[torch.Tensor, int]:
    """:func:`read_audio` under its former name (any format libsndfile reads, not only WAV)."""
    return read_audio(path, where, max_seconds)


def resample(x: torch.Tensor, rate: int, target: int) -> torch.Tensor:
    """(T,) at ``rate`` -> (about T * target / rate,) at ``target``, band-limited (soxr, high quality)."""
    if rate == target or x.numel() == 0:
        return x
    import soxr

    y = soxr.resample(x.detach().cpu().numpy().astype(np.float32, copy=False), rate, target, quality="HQ")
    return torch.from_numpy(np.ascontiguousarray(y))


def _hz_to_mel(f: torch.Tensor) -> torch.Tensor:  # Slaney: linear below 1 kHz, log above
    mel = f / (200.0 / 3)
    log_part = 15.0 + torch.log(f.clamp(min=1e-10) / 1000.0) / (math.log(6.4) / 27.0)
    return torch.where(f >= 1000.0, log_part, mel)


def _mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    hz = m * (200.0 / 3)
    return torch.where(m >= 15.0, 1000.0 * torch.exp((math.log(6.4) / 27.0) * (m - 15.0)), hz)


@functools.lru_cache(maxsize=8)
def mel_filter_bank(num_mel_bins: int, n_fft: int = N_FFT, sampling_rate: int = SAMPLING_RATE,
                    f_max: float = 8000.0) -> torch.Tensor:
    """Slaney-normalised triangular filters (n_fft // 2 + 1, num_mel_bins), as Whisper's feature extractor."""
    fft_freqs = torch.linspace(0, sampling_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    mels = torch.linspace(float(_hz_to_mel(torch.tensor(0.0, dtype=torch.float64))),
                          float(_hz_to_mel(torch.tensor(f_max, dtype=torch.float64))), num_mel_bins + 2,
                          dtype=torch.float64)
    edges = _mel_to_hz(mels)
    diff = edges[1:] - edges[:-1]
    slopes = edges[None, :] - fft_freqs[:, None]  # (F, M + 2)
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    filters = torch.clamp(torch.minimum(down, up), min=0.0)
    filters = filters * (2.0 / (edges[2:] - edges[:-2]))[None, :]
    return filters.float()


@functools.lru_cache(maxsize=1)
def _hann() -> torch.Tensor:
    return torch.hann_window(N_FFT)


def log_mel(waveform: torch.Tensor, num_mel_bins: int, num_frames: int) -> torch.Tensor:
    """16 kHz mono waveform (T,) -> Whisper log-mel features (num_mel_bins, num_frames), equal to
    ``WhisperFeatureExtractor(feature_size=num_mel_bins)`` on a ``num_frames * 160``-sample chunk.

    The waveform is zero-padded or truncated to ``num_frames * 160`` samples (Whisper
    pads every clip to its window), then: STFT (400-point Hann, hop 160), power,
    mel filters, log10, floor at max - 8, scale (x + 4) / 4.
    """
    n = num_frames * HOP_LENGTH
    x = F.pad(waveform.float()[:n], (0, max(0, n - waveform.numel())))
    stft = torch.stft(x, N_FFT, HOP_LENGTH, window=_hann(), return_complex=True)
    power = stft[:, :-1].abs() ** 2  # (F, num_frames): the last frame is dropped, as Whisper does
    mel = mel_filter_bank(num_mel_bins).T @ power
    logs = torch.clamp(mel, min=1e-10).log10()
    logs = torch.maximum(logs, logs.max() - 8.0)
    return (logs + 4.0) / 4.0


def _audio_lengths(model, name: str | None, frames: int) -> tuple[bool, list[int] | None]:
    """(whether modality ``name``'s audio encoders are variable-length, and then the placeholders of an item of
    f real frames for f in 0..frames). Encoders of one modality must agree (one mask per item)."""
    if name is None:
        return False, None
    mod = model.modalities[name]
    encoders = modality_encoders(mod)
    variable = {n for n, e in encoders.items() if getattr(e, "variable_length", False)}
    if not variable:
        return False, None
    if len(variable) != len(encoders):
        raise ConfigError(f"modality {name}: encoders {sorted(variable)} take items of their own length "
                          f"(variable_length) but {sorted(set(encoders) - variable)} do not",
                          path=f"modalities.{name}", hint="set variable_length alike on every audio encoder")
    projections = mod.src.input_projections

    def tokens(f: int) -> int:
        try:
            per = {n: e.tokens_for_frames(f) for n, e in encoders.items()}
            if mod.src.combine == "concat":
                return int(next(iter(projections.values())).tokens_out(next(iter(per.values()))))
            return sum(int(projections[n].tokens_out(t)) for n, t in per.items())
        except Exception:  # a projector refusing so few tokens: the item makes none
            return 0

    return True, [tokens(f) if f else 0 for f in range(frames + 1)]


# ---------------------------------------------------------------------------- per-model view

def input_kind(encoder) -> str:
    """What an encoder eats: "image" (pixel_values, or a grid encoder taking ``image_grid_thw``),
    "video" (a grid encoder taking only ``video_grid_thw``), "audio" (input_features) or "other"."""
    grids = getattr(encoder, "grid_inputs", None) or {}
    if "image_grid_thw" in grids or "image_sizes" in grids:  # Qwen2-VL's grid, or anyres tiles (LLaVA-NeXT)
        return "image"
    if "video_grid_thw" in grids:
        return "video"
    name = getattr(encoder, "input_name", None)
    return {"pixel_values": "image", "input_features": "audio"}.get(name, "other")


def modality_encoders(mod) -> dict:
    """The encoders a modality's items go through (another modality's for one sharing its tower)."""
    return dict(getattr(mod, "src", mod).encoders)


def modality_kind(mod) -> str:
    """A modality's item kind: its ``item_kind`` when set, else its encoders' input kind when they all
    agree, else "other"."""
    kind = getattr(mod, "item_kind", None)
    if kind:
        return kind
    kinds = {input_kind(e) for e in modality_encoders(mod).values()}
    return kinds.pop() if len(kinds) == 1 else "other"


def find_modality(model, kind: str, chosen: str | None, key: str) -> str | None:
    """The input modality that takes ``kind`` items: ``chosen`` (checked) or the only such one."""
    found = [n for n, m in model.modalities.items() if m.has_input and modality_kind(m) == kind]
    if chosen is not None:
        if chosen not in found:
            raise ConfigError(f"{chosen!r} is not an input modality taking {kind}s", path=f"data.{key}",
                              hint=f"{kind} modalities of this model: {', '.join(found) or 'none'}"
                                   + ("; a modality says what it takes with item_kind" if kind == "video" else ""))
        return chosen
    if len(found) > 1:
        raise ConfigError(f"several modalities take {kind}s: {', '.join(found)}", path=f"data.{key}",
                          hint=f"set data.{key} to the one the data's files go to")
    return found[0] if found else None


def _grid_encoder(mod, name: str, grid: str, kind: str):
    """(encoder name, encoder) of a native-resolution modality: exactly one encoder, taking ``grid``."""
    encoders = modality_encoders(mod)
    if len(encoders) != 1:
        raise ConfigError(f"the {kind} modality {name!r} has {len(encoders)} encoders; native-resolution {kind}s "
                          "go to one grid encoder", path=f"data.{kind}_modality",
                          hint="give the modality one encoder (e.g. qwen_vit)")
    (enc_name, enc), = encoders.items()
    grids = getattr(enc, "grid_inputs", None) or {}
    if grid not in grids or len(grids[grid]) != 1:
        raise ConfigError(f"the encoder {enc_name!r} of modality {name!r} takes {', '.join(grids) or 'no grid'}: the "
                          f"data path prepares {kind}s for a Qwen2-VL-style encoder taking {grid}",
                          path=f"data.{kind}_modality",
                          hint="use an encoder with grid_inputs {'image_grid_thw': ('pixel_values',), "
                               "'video_grid_thw': ('pixel_values_videos',)} (qwen_vit)")
    return enc_name, enc


def _check_item_tokens(mod, name: str, enc_name: str, grid_name: str, packed: str, vision: "QwenVision",
                       t: int) -> None:
    """The modality's own count (``item_tokens``) for two probe grids equals the processor's ``t*h*w / merge**2``."""
    item_tokens = getattr(mod, "item_tokens", None)
    if item_tokens is None:
        return
    m = vision.merge
    grids = torch.tensor([[t, 2 * m, 3 * m], [t, m, m]], dtype=torch.long)
    rows = int(grids.prod(-1).sum())
    probe = {enc_name: {packed: torch.zeros(1, vision.row_width).expand(rows, vision.row_width), grid_name: grids}}
    got = [int(x) for x in item_tokens(probe)]
    want = [vision.tokens(g) for g in grids.tolist()]
    if got != want:
        raise ConfigError(f"modality {name!r} makes {got} tokens for items of grids {grids.tolist()}, but the "
                          f"Qwen2-VL processor's spatial merge ({m}x{m}) makes {want}", path=f"modalities.{name}",
                          hint="the encoder's spatial_merge_size must be the merge its projector does")


# ------------------------------------------------------------ native-resolution images (SigLIP2 NaFlex)

# SigLIP2's own normalisation (Siglip2ImageProcessor's defaults)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def _siglip2_size_rule():
    """transformers' ``get_image_size_for_max_num_patches``: (height, width, patch_size, max_num_patches) ->
    the resized (height, width) in pixels, both multiples of the patch, at most max_num_patches patches."""
    try:
        from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches
    except ImportError:  # transformers 4.x: one module
        try:
            from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches
        except ImportError:
            raise ConfigError("SigLIP2 NaFlex images need transformers with SigLIP2", path="data.image_processor",
                              hint="pip install 'mimo-spec[data]'") from None
    return get_image_size_for_max_num_patches


def siglip2_image_processor(patch_size: int, max_num_patches: int, mean=SIGLIP_MEAN, std=SIGLIP_STD):
    """transformers' SigLIP2 image processor (Pillow backend) for an encoder's patch size and patch budget:
    bilinear resize to the largest patch grid of at most ``max_num_patches`` patches keeping the aspect
    ratio, rescale to 0..1, normalise, patches flattened to ``(max_num_patches, C*p*p)`` (zero rows after
    the image's own) with ``pixel_attention_mask`` and ``spatial_shapes``."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("SigLIP2 NaFlex images need the transformers package", path="data.image_processor",
                          hint="pip install 'mimo-spec[data]'") from None
    cls = getattr(transformers, "Siglip2ImageProcessorPil", None)
    pil = {}
    if cls is None:  # transformers 4.x: Siglip2ImageProcessor is the Pillow/numpy one
        cls, pil = transformers.Siglip2ImageProcessor, {"use_fast": False}
    return cls(patch_size=int(patch_size), max_num_patches=int(max_num_patches), image_mean=list(mean),
               image_std=list(std), **pil)


class NaFlexVision:
    """SigLIP2 NaFlex's preprocessing for one encoder (``siglip2_naflex``): each image at its own patch grid.

    Images go through transformers' SigLIP2 image processor (``data.image_processor``, a local folder whose
    ``patch_size`` and ``max_num_patches`` must be the encoder's, or one built from the encoder's
    ``patch_size`` and ``max_num_patches``, else ``num_patches``): ``pixel_values (1, max_num_patches, C*p*p)``,
    ``pixel_attention_mask (1, max_num_patches)``, ``spatial_shapes (1, 2)``. Every image is padded to the
    same budget, so the items of a batch stack. An image of grid (h, w) makes h*w tokens, known from its
    header alone (:meth:`image_grid`, transformers' ``get_image_size_for_max_num_patches``).
    Normalisation: ``mean`` / ``std``; at CLIP's values (``data.image_mean`` / ``image_std`` left at their
    defaults) SigLIP's own 0.5 / 0.5 is used instead.
    """

    def __init__(self, encoder, *, mean=CLIP_MEAN, std=CLIP_STD, processor: str | None = None, where: str = "data"):
        missing = [a for a in ("patch_size", "num_channels") if not hasattr(encoder, a)]
        if missing:
            raise ConfigError(f"the encoder {type(encoder).__name__} takes spatial_shapes but has no {missing[0]}",
                              path=where, hint="a SigLIP2 NaFlex-style encoder states patch_size, num_channels and "
                                               "max_num_patches (or num_patches)")
        self.patch = int(encoder.patch_size)
        self.channels = int(encoder.num_channels)
        if self.channels != 3:
            raise ConfigError(f"the SigLIP2 processor makes RGB pixels, but the encoder takes {self.channels} "
                              "channel(s)", path=where, hint="num_channels: 3")
        budget = getattr(encoder, "max_num_patches", None)
        encoder_budget = int(budget) if budget is not None else None
        if processor is not None:
            self.processor = load_image_processor(processor)
            have = {a: getattr(self.processor, a, None) for a in ("patch_size", "max_num_patches")}
            if have["patch_size"] is None or have["max_num_patches"] is None:
                raise ConfigError(f"the image processor in {processor} ({type(self.processor).__name__}) is not a "
                                  "SigLIP2 NaFlex one: it has no patch_size / max_num_patches",
                                  path="data.image_processor",
                                  hint="save a Siglip2ImageProcessor, or null to build one from the encoder")
            if int(have["patch_size"]) != self.patch:
                raise ConfigError(f"the image processor in {processor} cuts {have['patch_size']}-pixel patches, the "
                                  f"encoder takes {self.patch}-pixel ones (its patch_size is {have['patch_size']}, "
                                  f"the encoder's {self.patch})", path="data.image_processor",
                                  hint="save the processor of the same model, or null to build one from the encoder")
            if encoder_budget is not None and int(have["max_num_patches"]) != encoder_budget:
                raise ConfigError(f"the image processor in {processor} pads images to max_num_patches "
                                  f"{have['max_num_patches']}, the encoder's max_num_patches is {encoder_budget}",
                                  path="data.image_processor",
                                  hint="use the same patch budget in both (the encoder's max_num_patches param, or "
                                       "the processor's), or null to build the processor from the encoder")
            self.budget = int(have["max_num_patches"])
        else:
            self.budget = encoder_budget if encoder_budget is not None else int(encoder.num_patches)
            if getattr(encoder, "siglip_normalisation", False) and tuple(mean) == tuple(CLIP_MEAN) \
                    and tuple(std) == tuple(CLIP_STD):
                mean, std = SIGLIP_MEAN, SIGLIP_STD  # the data config's defaults: SigLIP's own normalisation
            normalize(torch.zeros(self.channels, 1, 1), mean, std)  # mean/std lengths fit
            self.processor = siglip2_image_processor(self.patch, self.budget, mean, std)
        self._size_rule = _siglip2_size_rule()
        self.prefix = int(getattr(encoder, "prefix_tokens", 0) or 0)  # RADIO's class tokens (feature_select all)

    @property
    def row_width(self) -> int:
        """Values per patch row: C * p * p."""
        return self.channels * self.patch * self.patch

    def tokens(self, grid) -> int:
        """Tokens of an image with patch grid (h, w): h*w (and the encoder's prefix tokens, if it keeps them)."""
        h, w = (int(x) for x in grid)
        return h * w + self.prefix

    def image_grid(self, width: int, height: int, name: str = "", where: str = "") -> tuple[int, int]:
        """The (h, w) patch grid a width x height image gets (the processor's rule, from the size alone)."""
        if width < 1 or height < 1:
            raise DataError(f"{name}: an image of {width}x{height} pixels holds nothing", path=where,
                            hint="remove the sample")
        h, w = self._size_rule(int(height), int(width), self.patch, self.budget)
        return int(h) // self.patch, int(w) // self.patch

    def image(self, img, name: str = "", where: str = "") -> dict[str, torch.Tensor]:
        """A decoded RGB image -> ``{"pixel_values": (1, max_num_patches, C*p*p), "pixel_attention_mask":
        (1, max_num_patches), "spatial_shapes": (1, 2)}``."""
        gh, gw = self.image_grid(*img.size, name, where)
        _require_image_fits(max(img.width * img.height, gh * gw * self.patch ** 2) * 4 * 3 * 3, name, where,
                            f"resizing it ({img.width}x{img.height}) to {gw * self.patch}x{gh * self.patch}")
        out = self.processor(images=img, return_tensors="pt")
        return {"pixel_values": torch.as_tensor(out["pixel_values"], dtype=torch.float32),
                "pixel_attention_mask": torch.as_tensor(out["pixel_attention_mask"]),
                "spatial_shapes": torch.as_tensor(out["spatial_shapes"], dtype=torch.long).reshape(-1, 2)}


def _naflex_encoder(mod, name: str):
    """(encoder name, encoder) of a SigLIP2 NaFlex image modality: exactly one encoder, taking spatial_shapes."""
    encoders = modality_encoders(mod)
    if len(encoders) != 1:
        raise ConfigError(f"the image modality {name!r} has {len(encoders)} encoders, one of them a SigLIP2 NaFlex "
                          "one; native-resolution images go to one encoder", path="data.image_modality",
                          hint="give the modality one encoder (siglip2_naflex)")
    return next(iter(encoders.items()))


def _takes_spatial_shapes(mod) -> bool:
    return any("spatial_shapes" in (getattr(e, "grid_inputs", None) or {}) for e in modality_encoders(mod).values())


def _check_naflex_tokens(mod, name: str, enc_name: str, vision: NaFlexVision) -> None:
    """The modality's own count (``item_tokens``) for two probe grids equals h*w (no projector that changes it)."""
    item_tokens = getattr(mod, "item_tokens", None)
    if item_tokens is None:
        return
    k = max(1, math.isqrt(vision.budget))
    grids = [(1, 1), (k, vision.budget // k)]
    shapes = torch.tensor(grids, dtype=torch.long)
    mask = (torch.arange(vision.budget)[None, :] < shapes.prod(-1)[:, None]).to(torch.int32)
    probe = {enc_name: {"pixel_values": torch.zeros(1, 1, vision.row_width).expand(2, vision.budget, -1),
                        "pixel_attention_mask": mask, "spatial_shapes": shapes}}
    got = [int(x) for x in item_tokens(probe)]
    want = [vision.tokens(g) for g in grids]
    if got != want:
        raise ConfigError(f"modality {name!r} makes {got} tokens for images of patch grids {grids}, but the data path "
                          f"gives a SigLIP2 NaFlex image h*w placeholders ({want})", path=f"modalities.{name}",
                          hint="use a projector that keeps the token count (mlp, linear)")
