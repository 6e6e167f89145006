"""MediaProcessor: one model's image, video and audio items -> its encoder inputs, with each item's
placeholder count known before decoding. The loading, resizing, frame sampling and log-mel pieces it
uses are in :mod:`mimo_spec.data.preprocess`; tiled images in :mod:`mimo_spec.data.tiling`."""

from __future__ import annotations

import numpy as np
import torch

from mimo_spec.data.preprocess import (AUDIO_OVERFLOWS, CLIP_MEAN, CLIP_STD, HOP_LENGTH, IMAGE_RESIZES,
                                        ImageTransform, MAX_AUDIO_ITEMS, NaFlexVision, QWEN2_PIXELS, QWEN3_MEAN,
                                        QWEN3_PIXELS, QWEN3_STD, QWEN_VL, QwenVision, SAMPLING_RATE, VideoPlan,
                                        _BLOCK_VALUES, _audio_lengths, _cannot_read, _check_item_tokens,
                                        _check_naflex_tokens, _grid_encoder, _mono_blocks, _naflex_encoder,
                                        _no_frames, _open_sound, _require_audio_fits, _takes_spatial_shapes, as_media,
                                        audio_info, clip_image_processor, find_modality, image_size, load_image,
                                        load_image_processor, log_mel, modality_encoders, normalize, per_channel,
                                        timestamp_text)
from mimo_spec.data.tiling import AnyResVideo, TiledImage, choose_tiling, make_tiling, takes_image_sizes
from mimo_spec.errors import ConfigError, DataError


class MediaProcessor:
    """Loads image, video and audio items into one model's encoder inputs.

    ``image(media)`` -> ``{encoder_name: {"pixel_values": (1, C, H, W)}}``, or for a native-resolution
    encoder ``{encoder_name: {"pixel_values": (t*h*w, C*T*p*p), "image_grid_thw": (1, 3)}}`` (its
    placeholder count: ``image_tokens(media)``, from the header);
    ``video(media)`` -> ``{encoder_name: {"pixel_values_videos": ..., "video_grid_thw": (1, 3)}}``
    (``video_tokens(media)``; the video modality is the one with ``item_kind: video``);
    ``audio(media)`` -> ``{encoder_name: {"input_features": (n, mel_bins, frames)}}`` with
    ``n = audio_items(media)[0]`` (several windows under ``audio_overflow="split"``);
    ``tokens_per_item[modality]`` is the placeholder run length of one item. ``media`` is a
    :class:`~mimo_spec.data.records.Media` or a path. Only the encoders' geometry and the image
    processors are kept (not the model), so datasets holding one pickle cheaply into DataLoader workers.

    ``image_processor``: a local Hugging Face image processor folder, else a ``CLIPImageProcessor``
    built from each encoder's size and ``image_mean`` / ``image_std`` (native-resolution encoders: a
    Qwen2-VL processor from ``min_pixels`` / ``max_pixels`` and the encoder's patch, temporal patch and
    merge sizes, or a SigLIP2 one from a NaFlex encoder's patch size and ``max_num_patches``; video frames
    use ``video_min_pixels`` / ``video_max_pixels``, sampled per ``video_fps`` / ``video_min_frames`` /
    ``video_max_frames``). ``qwen_vl``: which Qwen processing a grid encoder gets: "qwen2_vl" (Qwen2-VL,
    Qwen2.5-VL), "qwen3_vl" (Qwen3-VL: its pixel bounds and 0.5 / 0.5 normalisation as defaults, its frame
    sampling and whole-clip resize, videos laid out as timestamped frame groups: ``video_timestamps``) or
    "auto" (qwen3_vl for a language model with ``mrope_frames_as_items``, Qwen3-VL's marker). Pixel bounds left
    None take that processor's defaults (:data:`QWEN2_PIXELS` / :data:`QWEN3_PIXELS`); image_mean / image_std
    left at CLIP's take Qwen3-VL's 0.5 / 0.5 under qwen3_vl. ``audio_overflow``: "split"
    (one item per encoder window, at most ``max_audio_items``) or "truncate" (the first window).
    """

    def __init__(self, model, *, image_modality: str | None = None, audio_modality: str | None = None,
                 image_mean=CLIP_MEAN, image_std=CLIP_STD, image_resize: str = "pad", image_resample: str = "bicubic",
                 image_processor: str | None = None, audio_overflow: str = "split",
                 max_audio_items: int = MAX_AUDIO_ITEMS, video_modality: str | None = None,
                 min_pixels: int | None = None, max_pixels: int | None = None, video_min_pixels: int | None = None,
                 video_max_pixels: int | None = None, video_fps: float = 2.0, video_min_frames: int = 4,
                 video_max_frames: int = 768, qwen_vl: str = "auto", image_tiling: str = "auto",
                 tiling_options: dict | None = None, video_num_frames: int = 8):
        if image_resize not in IMAGE_RESIZES:
            raise ConfigError(f"unknown image_resize {image_resize!r}", path="data.image_resize",
                              hint=f"one of {', '.join(IMAGE_RESIZES)}")
        if audio_overflow not in AUDIO_OVERFLOWS:
            raise ConfigError(f"unknown audio_overflow {audio_overflow!r}", path="data.audio_overflow",
                              hint=f"one of {', '.join(AUDIO_OVERFLOWS)}")
        if max_audio_items < 1:
            raise ConfigError(f"max_audio_items must be at least 1, got {max_audio_items}", path="data.audio_overflow")
        self.image_modality = find_modality(model, "image", image_modality, "image_modality")
        self.video_modality = find_modality(model, "video", video_modality, "video_modality")
        self.audio_modality = find_modality(model, "audio", audio_modality, "audio_modality")
        self.image_mean, self.image_std, self.image_resize = tuple(image_mean), tuple(image_std), image_resize
        self.image_processor, self.audio_overflow = image_processor, audio_overflow
        self.max_audio_items = int(max_audio_items)
        if qwen_vl not in QWEN_VL:
            raise ConfigError(f"unknown qwen_vl {qwen_vl!r}", path="data.qwen_vl", hint=f"one of {', '.join(QWEN_VL)}")
        lm = getattr(model, "language_model", None)
        frames_as_items = bool(getattr(lm, "mrope_frames_as_items", False))
        # Qwen3-VL's processing and video layout (timestamped frame groups), else Qwen2-VL's
        self.qwen3 = frames_as_items if qwen_vl == "auto" else qwen_vl == "qwen3_vl"
        # native-resolution modalities: name -> (encoder name, grid input, packed input, processing)
        self.native: dict[str, tuple[str, str, str, QwenVision | NaFlexVision]] = {}
        given = dict(min_pixels=min_pixels, max_pixels=max_pixels, video_min_pixels=video_min_pixels,
                     video_max_pixels=video_max_pixels)
        pixels = {k: int(v) if v is not None else (QWEN3_PIXELS if self.qwen3 else QWEN2_PIXELS)[k]
                  for k, v in given.items()}
        mean, std = self.image_mean, self.image_std
        if self.qwen3 and mean == tuple(CLIP_MEAN) and std == tuple(CLIP_STD):
            mean, std = QWEN3_MEAN, QWEN3_STD  # the data config's defaults: Qwen3-VL's own normalisation
        options = dict(**pixels, processor=image_processor, fps=video_fps,
                       min_frames=video_min_frames, max_frames=video_max_frames, qwen3=self.qwen3)
        # tiled images (data.image_tiling, mimo_spec.data.tiling): the scheme, and the processor folder's processor
        self.image_tiling, tile_processor = choose_tiling(model, self.image_modality, image_tiling, image_processor)
        anyres = self.image_tiling == "llava_next"
        # LLaVA-NeXT-Video / OneVision videos: through an anyres encoder (mimo_spec.data.tiling.AnyResVideo)
        self.video_tiling = AnyResVideo(model.modalities[self.video_modality], video_num_frames, self.image_mean,
                                        self.image_std) \
            if self.video_modality and takes_image_sizes(model.modalities[self.video_modality]) else None
        for kind, name, grid in (("image", self.image_modality, "image_grid_thw"),
                                 ("video", self.video_modality, "video_grid_thw")):
            if name is None or (kind == "image" and anyres) or (kind == "video" and self.video_tiling):
                continue
            mod = model.modalities[name]
            if kind == "image" and not any(getattr(e, "grid_inputs", None) for e in modality_encoders(mod).values()):
                continue  # a fixed-size image encoder: below
            if kind == "image" and _takes_spatial_shapes(mod):  # SigLIP2 NaFlex: padded items, (h, w) grids
                enc_name, enc = _naflex_encoder(mod, name)
                rgb_mean, rgb_std = per_channel(self.image_mean, self.image_std, 3)
                naflex = NaFlexVision(enc, mean=rgb_mean, std=rgb_std, processor=image_processor,
                                      where="data.image_modality")
                _check_naflex_tokens(mod, name, enc_name, naflex)
                self.native[name] = (enc_name, "spatial_shapes", "pixel_values", naflex)
                continue
            enc_name, enc = _grid_encoder(mod, name, grid, kind)
            packed = tuple(enc.grid_inputs[grid])[0]
            rgb_mean, rgb_std = per_channel(mean, std, 3)
            vision = QwenVision(enc, where=f"data.{kind}_modality", mean=rgb_mean, std=rgb_std, **options)
            _check_item_tokens(mod, name, enc_name, grid, packed, vision, 1 if kind == "image" else 2)
            self.native[name] = (enc_name, grid, packed, vision)
        if (self.video_modality in self.native and getattr(lm, "mrope_section", None) is not None
                and self.qwen3 != frames_as_items):
            raise ConfigError(f"data.qwen_vl is {qwen_vl}, but the language model's M-RoPE "
                              + ("takes each frame group of a video as its own item (Qwen3-VL)" if frames_as_items
                                 else "takes each video as one item (Qwen2-VL)"), path="data.qwen_vl",
                              hint="auto (follows model.params.mrope_frames_as_items), or "
                                   + ("qwen3_vl" if frames_as_items else "qwen2_vl"))
        self.tokens_per_item: dict[str, int] = {}
        for name in (self.image_modality, self.audio_modality):
            if name is not None and name not in self.native and not (anyres and name == self.image_modality):
                mod = model.modalities[name]
                self.tokens_per_item[name] = mod.tokens_per_item(mod.example_inputs(1))
        # encoder name -> (image_size, num_channels) / (num_mel_bins, max_frames)
        self.image_encoders = {n: (getattr(e, "image_size", None) or e.tile_size, e.num_channels)
                               for n, e in modality_encoders(model.modalities[self.image_modality]).items()} \
            if self.image_modality and self.image_modality not in self.native else {}
        self.audio_encoders = {n: (e.num_mel_bins, e.max_frames)
                               for n, e in model.modalities[self.audio_modality].encoders.items()} \
            if self.audio_modality else {}
        # the audio window in 16 kHz samples: every encoder sees the same items (padded to its own frames)
        self.audio_window = min((frames for _, frames in self.audio_encoders.values()), default=0) * HOP_LENGTH
        # variable-length audio encoders (Qwen2-Audio): each item's real frames go with it as
        # feature_attention_mask, and its placeholders follow its length (audio_token_table[frames])
        self.audio_variable, self.audio_token_table = _audio_lengths(model, self.audio_modality,
                                                                     self.audio_window // HOP_LENGTH)
        self.image_transforms: dict[str, ImageTransform] = {}
        self.tiling = None if self.image_tiling == "none" else make_tiling(
            self.image_tiling, model.modalities[self.image_modality], self.image_encoders,
            self.tokens_per_item.get(self.image_modality), processor=tile_processor, folder=image_processor,
            mean=self.image_mean, std=self.image_std, options=tiling_options)
        if self.image_encoders and self.tiling is None:
            folder = load_image_processor(image_processor) if image_processor is not None else None
            for name, (size, channels) in self.image_encoders.items():
                if folder is None:
                    normalize(torch.zeros(channels, 1, 1), self.image_mean, self.image_std)  # mean/std lengths fit
                    proc = clip_image_processor(size, self.image_mean, self.image_std, image_resize, channels,
                                                image_resample)
                    self.image_transforms[name] = ImageTransform(proc, size, channels, image_resize, "data.image_mean",
                                                                 presize=True, resample=image_resample)
                else:
                    self.image_transforms[name] = ImageTransform(folder, size, channels, image_resize,
                                                                 resample=image_resample)

    # ---------------------------------------------------------------------------- images
    def is_native(self, modality: str | None) -> bool:
        """True when ``modality``'s items each have their own size (a grid encoder, or a variable-length
        audio encoder)."""
        return modality in self.native or (self.audio_variable and modality == self.audio_modality)

    def is_tiled(self, modality: str | None) -> bool:
        """True when ``modality``'s images are tiled (``data.image_tiling``): planned per image from its header."""
        return ((self.tiling is not None and modality == self.image_modality)
                or (self.video_tiling is not None and modality == self.video_modality))

    def image_plan(self, item, where: str = "", alone: bool = True) -> TiledImage:
        """What one tiled image becomes (items, text and placeholders), from its header alone; ``alone``: the
        image is its sample's only one (OneVision tiles only such an image)."""
        media = as_media(item, "image")
        return self.tiling.plan(*image_size(media, where), media.name, where, alone=alone)

    def image_tokens(self, item, where: str = "") -> int:
        """Placeholder tokens of one image, known before decoding it (a native-resolution encoder's from
        the image's header)."""
        if self.tiling is not None:
            return self.image_plan(item, where).tokens
        if self.image_modality not in self.native:
            return self.tokens_per_item[self.image_modality]
        media = as_media(item, "image")
        vision = self.native[self.image_modality][3]
        return vision.tokens(vision.image_grid(*image_size(media, where), media.name, where))

    def image(self, item, where: str = "", plan: TiledImage | None = None) -> dict:
        """-> ``{encoder: {"pixel_values": (1, C, H, W)}}``; for a native-resolution encoder
        ``{encoder: {"pixel_values": (t*h*w, C*T*p*p), "image_grid_thw": (1, 3)}}`` (Qwen2-VL) or
        ``{encoder: {"pixel_values": (1, P, C*p*p), "pixel_attention_mask": (1, P), "spatial_shapes": (1, 2)}}``
        (SigLIP2 NaFlex, P = max_num_patches); tiled (``data.image_tiling``, :mod:`mimo_spec.data.tiling`)
        ``{encoder: {"pixel_values": (tiles, C, S, S)}}`` (``plan``: :meth:`image_plan`'s, else planned here)."""
        media = as_media(item, "image")
        img = load_image(media, where)
        if self.tiling is not None:  # tiles: (tiles, C, S, S); one item (llava_next) or one item per tile
            plan = plan or self.tiling.plan(*img.size, media.name, where)
            return {name: self.tiling.pixels(img, plan, media.name, where) for name in self.image_encoders}
        if self.image_modality in self.native:
            enc_name, grid, packed, vision = self.native[self.image_modality]
            out = vision.image(img, media.name, where)
            if isinstance(vision, NaFlexVision):  # the processor's names are the encoder's
                return {enc_name: out}
            return {enc_name: {packed: out["pixel_values"], grid: out["image_grid_thw"]}}
        return {name: {"pixel_values": transform(img, media.name, where)}
                for name, transform in self.image_transforms.items()}

    # ---------------------------------------------------------------------------- videos
    def _video_vision(self) -> tuple[str, str, str, QwenVision]:
        if self.video_modality is None:
            raise ConfigError("the model has no video modality", path="data.video_modality",
                              hint="add a modality with item_kind: video (e.g. sharing the image tower)")
        return self.native[self.video_modality]

    def video_plan(self, item, where: str = "") -> VideoPlan:
        """The frames one video gives and its grid, from its container or folder listing (nothing decoded)."""
        if self.video_tiling is not None:  # anyres (LLaVA-NeXT-Video): its plan carries tokens / items
            return self.video_tiling.plan(item, where)
        return self._video_vision()[3].video_plan(item, where)

    @property
    def video_timestamps(self) -> bool:
        """True when videos are laid out as Qwen3-VL lays them out: per frame group, its timestamp text
        (:func:`timestamp_text`), the wrap markers and that group's placeholders."""
        return self.qwen3 and self.video_modality in self.native

    def video_groups(self, plan: VideoPlan) -> list[tuple[str, int]]:
        """(timestamp text, placeholder tokens) of each frame group of a planned video (Qwen3-VL's layout)."""
        vision = self._video_vision()[3]
        _, h, w = plan.grid
        per_group = vision.tokens((1, h, w))
        return [(timestamp_text(t), per_group) for t in plan.timestamps]

    def video_tokens(self, item, where: str = "") -> int:
        """Placeholder tokens of one video, known before decoding it."""
        if self.video_tiling is not None:
            return self.video_tiling.tokens
        vision = self._video_vision()[3]
        return vision.tokens(vision.video_plan(item, where).grid)

    def video(self, item, where: str = "", plan: VideoPlan | None = None) -> dict:
        """-> ``{encoder: {"pixel_values_videos": (t*h*w, C*T*p*p), "video_grid_thw": (1, 3)}}``, frames
        sampled at ``video_fps`` (a file) or all of a frame folder, at most ``video_max_frames``; through an anyres
        encoder ``{encoder: {"pixel_values_videos": (1, F, C, S, S)}}``, ``video_num_frames`` frames."""
        if self.video_tiling is not None:
            return {name: self.video_tiling.video(item, where, plan) for name in self.video_tiling.encoders}
        enc_name, grid, packed, vision = self._video_vision()
        out = vision.video(item, where, plan)
        # seconds per temporal patch group: Qwen2.5-VL's M-RoPE time step (mrope_tokens_per_second)
        return {enc_name: {packed: out["pixel_values_videos"], grid: out["video_grid_thw"],
                           "second_per_grid_ts": out["second_per_grid_ts"]}}

    def item_tokens(self, modality: str, inputs: dict) -> list[int]:
        """Tokens of each item in one decoded item's (or several items') inputs of a native modality."""
        enc_name, grid, _, vision = self.native[modality]
        return [vision.tokens(g) for g in inputs[enc_name][grid].tolist()]

    # ----------------------------------------------------------------------------- audio
    def _items(self, frames: int, rate: int) -> tuple[int, bool]:
        window = self.audio_window
        if window <= 0:
            return 1, False
        # items = ceil(duration / window), in integers: frames / rate seconds, window / 16000 seconds
        n = max(1, -(-frames * SAMPLING_RATE // (rate * window)))
        limit = 1 if self.audio_overflow == "truncate" else self.max_audio_items
        return min(n, limit), n > limit

    def _audio_plan(self, frames: int, rate: int, name: str, where: str) -> tuple[int, bool, list[int] | None]:
        """(items, cut, each item's real feature frames or None) of an audio of ``frames`` at ``rate``.

        Variable-length encoders: the audio is ``ceil(frames * 16000 / rate)`` samples at 16 kHz (the length
        librosa's resampling gives, as the Hugging Face processors load audio), item k holds
        ``min(window, samples - k * window)`` of them and ``ceil(samples_k / 160)`` real frames, as
        WhisperFeatureExtractor's attention mask counts them. A last window too short for one token is
        dropped; an audio too short for one token is a DataError."""
        items, cut = self._items(frames, rate)
        if not self.audio_variable:
            return items, cut, None
        total = -(-frames * SAMPLING_RATE // rate)
        window = self.audio_window
        feats = [-(-min(window, total - k * window) // HOP_LENGTH) for k in range(items)]
        while len(feats) > 1 and self.audio_token_table[feats[-1]] == 0:
            feats.pop()
        if self.audio_token_table[feats[0]] == 0:
            raise DataError(f"{name} is too short: {total} samples at 16 kHz ({feats[0]} frames) make no audio token",
                            path=where, hint="remove the clip or pad it with silence")
        return len(feats), cut, feats

    def audio_items(self, item, where: str = "") -> tuple[int, bool]:
        """(number of items the audio makes, whether some of it is cut), from the header alone.

        "split": ``ceil(duration / window)`` items, at most ``max_audio_items`` (a variable-length encoder
        drops a last window too short for one token); "truncate": 1.
        Raises DataError like :meth:`audio` for a file that cannot be read.
        """
        media = as_media(item, "audio")
        frames, rate, _ = audio_info(media, where)
        items, cut, _ = self._audio_plan(frames, rate, media.name, where)
        return items, cut

    def audio_tokens(self, item, where: str = "") -> list[int]:
        """Placeholder tokens of each item the audio makes, from the header alone: each item's own count for a
        variable-length encoder (as Qwen2AudioProcessor counts them), else the fixed count per item."""
        media = as_media(item, "audio")
        frames, rate, _ = audio_info(media, where)
        items, _, feats = self._audio_plan(frames, rate, media.name, where)
        if feats is None:
            return [self.tokens_per_item[self.audio_modality]] * items
        return [self.audio_token_table[f] for f in feats]

    def audio(self, item, where: str = "") -> dict:
        """-> ``{encoder: {"input_features": (n, mel_bins, frames)}}``, item k holding the 16 kHz samples
        ``[k * window, (k + 1) * window)`` (the last zero-padded); a variable-length encoder also gets
        ``"feature_attention_mask"`` (n, frames) int32, 1 for each item's real frames (see :meth:`_audio_plan`).
        Only the frames the items use are read, block by block, and resampled as a stream."""
        media = as_media(item, "audio")
        frames, rate, channels = audio_info(media, where)
        items, _, feats = self._audio_plan(frames, rate, media.name, where)
        window = self.audio_window
        _require_audio_fits(items * sum(m * f * 4 for m, f in self.audio_encoders.values()) + window * 8
                            + _BLOCK_VALUES * 8, media, where, f"the features of {items} item(s) of")
        out = {name: torch.empty(items, mel_bins, max_frames)
               for name, (mel_bins, max_frames) in self.audio_encoders.items()}

        def emit(k: int, chunk: np.ndarray) -> None:
            x = torch.from_numpy(chunk)
            for name, (mel_bins, max_frames) in self.audio_encoders.items():
                out[name][k] = log_mel(x, mel_bins, max_frames)

        # input frames the items use, plus 10 ms for the resampler's look-ahead
        need = min(frames, -(-items * window * rate // SAMPLING_RATE) + rate // 100)
        buf, filled, done, decoded = np.zeros(window, np.float32), 0, 0, 0
        try:
            with _open_sound(media) as f:
                stream = None
                if rate != SAMPLING_RATE:
                    import soxr

                    stream = soxr.ResampleStream(rate, SAMPLING_RATE, 1, dtype="float32", quality="HQ")
                for block, short in _mono_blocks(f, media, where, need, channels):
                    decoded += len(block)
                    last = short or decoded >= need
                    y = stream.resample_chunk(block, last=last) if stream is not None else block
                    pos = 0
                    while pos < len(y) and done < items:
                        take = min(window - filled, len(y) - pos)
                        buf[filled:filled + take] = y[pos:pos + take]
                        filled, pos = filled + take, pos + take
                        if filled == window:
                            emit(done, buf)
                            done, filled = done + 1, 0
                    if done == items:
                        break
        except DataError:
            raise
        except Exception as e:
            raise _cannot_read(media, where, e) from None
        if decoded == 0:
            raise _cannot_read(media, where, None, _no_frames(media))
        if done < items and decoded < need and decoded * SAMPLING_RATE <= (items - 1) * window * rate:
            raise _cannot_read(media, where, None,
                               f"the file ends early: its header declares {frames} frames ({frames / rate:.2f} s) "
                               f"but only {decoded} ({decoded / rate:.2f} s) decode")
        if done < items:  # the last item: what is left, zero-padded (and silence after a short decode)
            buf[filled:] = 0.0
            emit(done, buf)
            buf[:] = 0.0
            for k in range(done + 1, items):
                emit(k, buf)
        if feats is None:
            return {name: {"input_features": x} for name, x in out.items()}
        real = torch.tensor(feats, dtype=torch.long)[:, None]
        return {name: {"input_features": x,
                       "feature_attention_mask": (torch.arange(x.shape[-1])[None, :] < real).to(torch.int32)}
                for name, x in out.items()}
