"""Turning files into encoder inputs: images (Pillow) and WAV audio (log-mel features).

``MediaProcessor`` knows, for one model, which modality takes images and which
takes audio, how many placeholder tokens one item needs, and how to load a file
into ``{encoder_name: {kwarg: tensor (1, ...)}}``. The LLaVA-JSON dataset and
prompt-time generation both use it, so training and inference see the same pixels.
"""

from __future__ import annotations

import math
import wave
from pathlib import Path

import torch
import torch.nn.functional as F

from mimo_spec.errors import ConfigError, DataError, InputError

# CLIP's normalisation (also LLaVA's)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Whisper's front end
SAMPLING_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160


# ------------------------------------------------------------------------------------ images

# Raster formats Pillow decodes by itself. Others are refused: EPS/PS hand the file to Ghostscript (an
# external program), and a data set should not reach a format's plugin because of its file's first bytes.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "TGA", "ICO")

def load_image(path: Path, where: str = ""):
    """Open an image file with Pillow (fully decoded). Raises DataError naming ``where`` and ``path``."""
    try:
        from PIL import Image
    except ImportError:
        raise InputError("reading images needs Pillow", path=where, hint="pip install pillow") from None
    if not Path(path).is_file():
        raise DataError(f"image file not found: {path}", path=where, hint="check data.image_folder")
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as img:
            w, h = img.size  # from the header: refuse what cannot be decoded in memory before decoding it
            _require_image_fits(w * h * max(1, len(img.getbands())) * 2, path, where, f"decoding it ({w}x{h})")
            img.load()
            return img.copy()
    except DataError:
        raise
    except Exception as e:
        empty = Path(path).stat().st_size == 0
        reason = "the file is empty" if empty else (str(e) or f"{type(e).__name__} while decoding")
        raise DataError(f"cannot read image {path}: {reason}", path=where,
                         hint="the file is not an image Pillow can decode; re-export it or remove the sample") from None


def _require_image_fits(need: int, path, where: str, doing: str) -> None:
    from mimo_spec.train.limits import machine_memory, require_fits

    require_fits(need, machine_memory(), f"image {path}: {doing}", where or str(path),
                 "shrink the image (or give it a less extreme aspect ratio), or remove the sample", cls=DataError)


def resize_pixels(width: int, height: int, size: int, resize: str = "pad") -> int:
    """Pixels of the largest intermediate image :func:`image_to_tensor` makes from a width x height image."""
    if resize == "pad" and width != height:
        return max(width, height) ** 2
    if resize == "crop" and width != height:
        scale = size / min(width, height)
        return max(size, round(width * scale)) * max(size, round(height * scale))
    return size * size


def image_to_tensor(img, size: int, num_channels: int, mean, std, resize: str = "pad") -> torch.Tensor:
    """A PIL image -> normalised pixel values (num_channels, size, size).

    resize: "pad" (pad to a square with the mean colour, then resize: LLaVA-1.5),
    "crop" (resize the short side, centre crop: CLIP), "squash" (resize, ignoring aspect).
    """
    from PIL import Image

    img = img.convert("RGB" if num_channels == 3 else "L")
    w, h = img.size
    if resize == "pad" and w != h:
        side = max(w, h)
        fill = tuple(int(round(m * 255)) for m in mean) if num_channels == 3 else int(round(mean[0] * 255))
        canvas = Image.new(img.mode, (side, side), fill)
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        img = canvas
    elif resize == "crop" and w != h:
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).float().div_(255)
    x = x.view(size, size, -1).permute(2, 0, 1)  # (C, H, W)
    return normalize(x, mean, std)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(C, H, W) values in [0, 1] -> (x - mean) / std per channel (mean/std of length C or 1)."""
    c = x.shape[0]
    m = torch.tensor(list(mean), dtype=x.dtype)
    s = torch.tensor(list(std), dtype=x.dtype)
    if m.numel() not in (1, c) or s.numel() not in (1, c):
        raise ConfigError(f"image_mean/image_std need 1 or {c} values, got {m.numel()} and {s.numel()}",
                          path="data.image_mean")
    return (x - m.view(-1, 1, 1)) / s.view(-1, 1, 1)


# ------------------------------------------------------------------------------------- audio

# sample rates a WAV file may declare (a header claiming 1 Hz or 2**31 Hz is damaged, not audio)
MIN_RATE, MAX_RATE = 1000, 1_000_000


def read_wav(path: Path, where: str = "", max_seconds: float | None = None) -> tuple[torch.Tensor, int]:
    """A PCM WAV file -> (mono waveform float32 in [-1, 1] of shape (T,), sample rate).

    ``max_seconds``: read only the start of the file (what the features use), so a long file, or
    one whose header declares a tiny sample rate, never decodes more than that.
    """
    if not Path(path).is_file():
        raise DataError(f"audio file not found: {path}", path=where, hint="check data.audio_folder")
    try:
        with wave.open(str(path), "rb") as f:
            channels, width, rate, n = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
            if not MIN_RATE <= rate <= MAX_RATE:
                raise DataError(f"{path} declares a sample rate of {rate} Hz (expected {MIN_RATE}..{MAX_RATE} Hz): "
                                "the header is damaged or the file is not audio", path=where or str(path),
                                hint="re-export it, e.g. ffmpeg -i in.wav -ar 16000 -acodec pcm_s16le out.wav")
            if max_seconds is not None:
                n = min(n, math.ceil(max_seconds * rate) + 2)
            # bounded by the file's size whatever the header says: raw bytes, then float32 per channel
            on_disk = max(0, Path(path).stat().st_size - 44) // max(1, channels * width)
            from mimo_spec.train.limits import machine_memory, require_fits

            require_fits(min(n, on_disk) * channels * (width + 8), machine_memory(), f"decoding WAV file {path}",
                         where or str(path), "cut the file to the part the model uses, or remove the sample",
                         cls=DataError)
            raw = f.readframes(n)
    except (wave.Error, EOFError, OSError) as e:
        raise DataError(f"cannot read WAV file {path}: {_wav_problem(path, e)}", path=where,
                         hint="only uncompressed PCM WAV is read (8/16/24/32-bit); "
                              "convert with e.g. ffmpeg -i in -acodec pcm_s16le out.wav") from None
    frame = channels * width
    raw = raw[: len(raw) // frame * frame] if frame else b""  # a file cut inside a frame: whole frames only
    if not raw:
        raise DataError(f"cannot read WAV file {path}: it holds no audio frames"
                        + (" (the header declares some, but the file ends before them)" if n else ""),
                        path=where, hint="re-export the audio, or remove the sample")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if width == 1:  # 8-bit WAV is unsigned
        x = (data.float() - 128.0) / 128.0
    elif width in (2, 4):
        x = data.view(torch.int16 if width == 2 else torch.int32).float() / float(2 ** (8 * width - 1))
    elif width == 3:  # little-endian 24-bit: assemble, then sign-extend
        b = data.view(-1, 3).int()
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = torch.where(v >= 2**23, v - 2**24, v).float() / float(2**23)
    else:
        raise DataError(f"unsupported sample width {width} bytes in {path}", path=where)
    x = x[: (x.numel() // channels) * channels].view(-1, channels).mean(dim=1)
    return x, rate


def _wav_problem(path: Path, error: Exception) -> str:
    """What is wrong with a WAV file the wave module refused, in words (its errors are often empty)."""
    if isinstance(error, OSError):
        return error.strerror or str(error) or type(error).__name__
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError as e:
        return e.strerror or str(e)
    if not head:
        return "the file is empty"
    if head[:4] != b"RIFF"[: len(head[:4])] or (len(head) >= 12 and head[8:12] != b"WAVE"):
        return f"not a RIFF WAVE file (it starts with {head!r})"
    if len(head) < 12 or isinstance(error, EOFError) or not str(error):
        return f"the file ends early ({Path(path).stat().st_size} bytes): its header or chunks are cut short"
    return str(error)


def resample(x: torch.Tensor, rate: int, target: int) -> torch.Tensor:
    """(T,) -> (T * target / rate,) by linear interpolation (adequate for speech features, not hi-fi)."""
    if rate == target or x.numel() == 0:
        return x
    n = max(1, round(x.numel() * target / rate))
    return F.interpolate(x.view(1, 1, -1), size=n, mode="linear", align_corners=False).view(-1)


def _hz_to_mel(f: torch.Tensor) -> torch.Tensor:  # Slaney: linear below 1 kHz, log above
    mel = f / (200.0 / 3)
    log_part = 15.0 + torch.log(f.clamp(min=1e-10) / 1000.0) / (math.log(6.4) / 27.0)
    return torch.where(f >= 1000.0, log_part, mel)


def _mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    hz = m * (200.0 / 3)
    return torch.where(m >= 15.0, 1000.0 * torch.exp((math.log(6.4) / 27.0) * (m - 15.0)), hz)


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


def log_mel(waveform: torch.Tensor, num_mel_bins: int, num_frames: int) -> torch.Tensor:
    """16 kHz mono waveform (T,) -> Whisper log-mel features (num_mel_bins, num_frames).

    The waveform is zero-padded or truncated to ``num_frames * 160`` samples (Whisper
    pads every clip to its window), then: STFT (400-point Hann, hop 160), power,
    mel filters, log10, floor at max - 8, scale (x + 4) / 4.
    """
    n = num_frames * HOP_LENGTH
    x = F.pad(waveform.float()[:n], (0, max(0, n - waveform.numel())))
    stft = torch.stft(x, N_FFT, HOP_LENGTH, window=torch.hann_window(N_FFT), return_complex=True)
    power = stft[:, :-1].abs() ** 2  # (F, num_frames): the last frame is dropped, as Whisper does
    mel = mel_filter_bank(num_mel_bins).T @ power
    logs = torch.clamp(mel, min=1e-10).log10()
    logs = torch.maximum(logs, logs.max() - 8.0)
    return (logs + 4.0) / 4.0


# ---------------------------------------------------------------------------- per-model view

def input_kind(encoder) -> str:
    """What an encoder eats: "image" (pixel_values), "audio" (input_features) or "other"."""
    name = getattr(encoder, "input_name", None)
    return {"pixel_values": "image", "input_features": "audio"}.get(name, "other")


def modality_kind(mod) -> str:
    """A modality's input kind when all its encoders agree, else "other"."""
    kinds = {input_kind(e) for e in mod.encoders.values()}
    return kinds.pop() if len(kinds) == 1 else "other"


def find_modality(model, kind: str, chosen: str | None, key: str) -> str | None:
    """The input modality that takes ``kind`` items: ``chosen`` (checked) or the only such one."""
    found = [n for n, m in model.modalities.items() if m.has_input and modality_kind(m) == kind]
    if chosen is not None:
        if chosen not in found:
            raise ConfigError(f"{chosen!r} is not an input modality taking {kind}s", path=f"data.{key}",
                              hint=f"{kind} modalities of this model: {', '.join(found) or 'none'}")
        return chosen
    if len(found) > 1:
        raise ConfigError(f"several modalities take {kind}s: {', '.join(found)}", path=f"data.{key}",
                          hint=f"set data.{key} to the one the data's files go to")
    return found[0] if found else None


class MediaProcessor:
    """Loads image and audio files into one model's encoder inputs.

    ``image(path)`` / ``audio(path)`` -> ``{encoder_name: {kwarg: tensor (1, ...)}}``;
    ``tokens_per_item[modality]`` is the placeholder run length of one item. Only
    the encoders' geometry is kept (not the model), so datasets holding one pickle
    cheaply into DataLoader workers.
    """

    def __init__(self, model, *, image_modality: str | None = None, audio_modality: str | None = None,
                 image_mean=CLIP_MEAN, image_std=CLIP_STD, image_resize: str = "pad"):
        self.image_modality = find_modality(model, "image", image_modality, "image_modality")
        self.audio_modality = find_modality(model, "audio", audio_modality, "audio_modality")
        self.image_mean, self.image_std, self.image_resize = tuple(image_mean), tuple(image_std), image_resize
        self.tokens_per_item: dict[str, int] = {}
        for name in (self.image_modality, self.audio_modality):
            if name is not None:
                mod = model.modalities[name]
                self.tokens_per_item[name] = mod.tokens_per_item(mod.example_inputs(1))
        # encoder name -> (image_size, num_channels) / (num_mel_bins, max_frames)
        self.image_encoders = {n: (e.image_size, e.num_channels)
                               for n, e in model.modalities[self.image_modality].encoders.items()} \
            if self.image_modality else {}
        self.audio_encoders = {n: (e.num_mel_bins, e.max_frames)
                               for n, e in model.modalities[self.audio_modality].encoders.items()} \
            if self.audio_modality else {}
        for _, channels in self.image_encoders.values():
            normalize(torch.zeros(channels, 1, 1), self.image_mean, self.image_std)  # mean/std lengths fit

    def image(self, path: Path, where: str = "") -> dict:
        img = load_image(path, where)
        w, h = img.size
        for size, _ in self.image_encoders.values():  # the padded / cropped canvas, before it is made
            _require_image_fits(resize_pixels(w, h, size, self.image_resize) * 4, path, where,
                                f"resizing it ({w}x{h}, image_resize {self.image_resize}) to {size}x{size}")
        return {name: {"pixel_values": image_to_tensor(img, size, channels, self.image_mean, self.image_std,
                                                       self.image_resize).unsqueeze(0)}
                for name, (size, channels) in self.image_encoders.items()}

    def audio(self, path: Path, where: str = "") -> dict:
        # only the first max_frames * hop samples (at 16 kHz) reach the features: decode and resample no more
        seconds = max((frames for _, frames in self.audio_encoders.values()), default=0) * HOP_LENGTH / SAMPLING_RATE
        x, rate = read_wav(path, where, max_seconds=seconds)
        x = resample(x, rate, SAMPLING_RATE)
        return {name: {"input_features": log_mel(x, mel_bins, frames).unsqueeze(0)}
                for name, (mel_bins, frames) in self.audio_encoders.items()}
