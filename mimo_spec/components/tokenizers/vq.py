"""Image VQ-VAE tokenizers: transformers' JanusVQVAE, ChameleonVQVAE and Emu3VQVAE, built from YAML params.

An image ``(N, C, image_size, image_size)`` in the VQ's input range ([-1, 1]: what each model's image
processor produces for it) becomes ``(N, T)`` int64 codes, row-major over the code grid
``(image_size / 2**(len(channel_multiplier) - 1))`` squared; ``decode`` maps codes back to pixels in the same
range. The Hugging Face class is held without being a submodule: its children (``encoder``, ``quantize``,
``quant_conv``, ``post_quant_conv``, ``decoder``) are this module's own, so the state-dict keys are exactly
the Hugging Face class's (``interop/hf_tokenizers.py`` loads a checkpoint's tensors as they are).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from mimo_spec.errors import InputError, ParamError
from mimo_spec.registry import register


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ParamError("module", "this tokenizer is transformers' class: transformers is not installed",
                         "pip install 'mimo-spec[hf]'") from None
    return transformers


class HFTokenizerBase(nn.Module):
    """A frozen wrapper whose children are a transformers model's children (state-dict keys unchanged)."""

    item_kind = "image"
    can_decode = True

    def _adopt(self, hf: nn.Module) -> None:
        object.__setattr__(self, "hf_model", hf)  # not a submodule: its children are registered on self
        if next(iter(hf._parameters), None) is not None or next(iter(hf._buffers), None) is not None:
            raise RuntimeError(f"{type(hf).__name__} holds tensors of its own; they would not be in the state dict")
        for name, child in hf.named_children():
            self.add_module(name, child)
        hf.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "HFTokenizerBase":
        """Always in eval mode: the tokenizer is frozen."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)


class _ImageVQ(HFTokenizerBase):
    """Common image checks and shapes; subclasses build ``hf_model`` and define ``_encode`` / ``_decode``."""

    def _image_shapes(self, image_size: int, channel_multiplier: list[int], in_channels: int,
                      base_channels: int, multiple: int = 32) -> None:
        if not channel_multiplier:
            raise ParamError("channel_multiplier", "channel_multiplier must list at least one level")
        factor = 2 ** (len(channel_multiplier) - 1)
        if image_size <= 0 or image_size % factor:
            raise ParamError("image_size", f"image_size ({image_size}) must be a positive multiple of "
                             f"2**(levels - 1) = {factor} (levels: len(channel_multiplier) = "
                             f"{len(channel_multiplier)})")
        bad = [base_channels * m for m in channel_multiplier if (base_channels * m) % multiple]
        if base_channels <= 0 or bad:
            raise ParamError("base_channels", f"base_channels * each channel_multiplier must be a multiple of "
                             f"{multiple} (GroupNorm groups); got {bad or base_channels}")
        self.image_size, self.in_channels = image_size, in_channels
        side = image_size // factor
        self.grid = (side, side)
        self.num_tokens = side * side
        self.num_codebooks = 1

    def _check_images(self, x: Any, name: str = "images") -> torch.Tensor:
        want = (self.in_channels, self.image_size, self.image_size)
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != want:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"expected (N, {want[0]}, {want[1]}, {want[2]}) images, got {got}", path=name,
                             hint=f"resize items to {self.image_size}x{self.image_size} for this tokenizer")
        if not x.is_floating_point():
            raise InputError(f"expected floating-point pixels, got {x.dtype}", path=name)
        return x

    def _check_codes(self, codes: Any, name: str = "codes") -> torch.Tensor:
        if not isinstance(codes, torch.Tensor) or codes.ndim != 2 or codes.shape[1] != self.num_tokens:
            got = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise InputError(f"expected (N, {self.num_tokens}) codes, got {got}", path=name)
        if codes.is_floating_point():
            raise InputError(f"expected integer codes, got {codes.dtype}", path=name)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise InputError(f"codes must lie in [0, {self.codebook_size}); got [{int(codes.min())}, "
                             f"{int(codes.max())}]", path=name)
        return codes.long()

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, image_size, image_size) pixels in [-1, 1] -> (N, num_tokens) int64 codes (on the tokenizer's
        device; the pixels are cast to its dtype)."""
        x = self._check_images(x)
        p = next(self.parameters())
        return self._encode(x.to(device=p.device, dtype=p.dtype)).reshape(x.shape[0], self.num_tokens).long()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, num_tokens) codes -> (N, C, image_size, image_size) pixels in [-1, 1] (not clamped), in the
        tokenizer's dtype."""
        return self._decode(self._check_codes(codes).to(next(self.parameters()).device))

    def example_targets(self, num_items: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random images in the input range [-1, 1]."""
        return torch.rand(num_items, self.in_channels, self.image_size, self.image_size, generator=generator) * 2 - 1


@register("tokenizer", "janus_vq")
class JanusVQ(_ImageVQ):
    """Janus's image-generation VQ-VAE (transformers' JanusVQVAE; LlamaGen's VQ-16): 384 px -> 24x24 codes.

    Input range [-1, 1] (JanusImageProcessor: mean 0.5, std 0.5). Encoding picks the nearest codebook
    vector of the (unnormalised) latent; decoding L2-normalises the chosen codebook vectors first, exactly as
    transformers' JanusVQVAE does.

    Args:
        image_size: side of the square input image in pixels (384 in Janus).
        codebook_size: number of codes (num_embeddings; 16384 in Janus).
        embed_dim: width of a codebook vector (8 in Janus).
        latent_channels: channels of the encoder's output / the decoder's input (256).
        in_channels: image channels in (3).
        out_channels: image channels out of the decoder (3).
        base_channels: channels of the first level (128); times each channel_multiplier per level.
        channel_multiplier: per-level channel factors; the image shrinks 2x between levels ([1, 1, 2, 2, 4]).
        num_res_blocks: residual blocks per level (2).
    """

    def __init__(self, image_size: int = 384, codebook_size: int = 16384, embed_dim: int = 8,
                 latent_channels: int = 256, in_channels: int = 3, out_channels: int = 3, base_channels: int = 128,
                 channel_multiplier: list[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2):
        super().__init__()
        channel_multiplier = [int(m) for m in channel_multiplier]
        self._image_shapes(image_size, channel_multiplier, in_channels, base_channels)
        self.codebook_size = codebook_size
        tf = _transformers()
        config = tf.JanusVQVAEConfig(
            embed_dim=embed_dim, num_embeddings=codebook_size, latent_channels=latent_channels,
            in_channels=in_channels, out_channels=out_channels, base_channels=base_channels,
            channel_multiplier=channel_multiplier, num_res_blocks=num_res_blocks, num_patches=self.grid[0])
        self._adopt(tf.JanusVQVAE(config))

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf_model.encode(x).image_tokens

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.hf_model.decode(codes)


@register("tokenizer", "chameleon_vq")
class ChameleonVQ(_ImageVQ):
    """Chameleon's image VQ-VAE encoder (transformers' ChameleonVQVAE): 512 px -> 32x32 codes of 8192.

    Input range [-1, 1] (ChameleonImageProcessor). transformers' class (and the weights it converts) hold
    only the encoder side, so ``decode`` is not available (``can_decode`` is False): Chameleon's released
    Hugging Face checkpoints cannot turn codes back into pixels.

    Args:
        image_size: side of the square input image in pixels (512 in Chameleon; the config's ``resolution``).
        codebook_size: number of codes (num_embeddings; 8192).
        embed_dim: width of a codebook vector (256).
        latent_channels: channels of the encoder's output (256).
        in_channels: image channels in (3).
        base_channels: channels of the first level (128); times each channel_multiplier per level.
        channel_multiplier: per-level channel factors; the image shrinks 2x between levels ([1, 1, 2, 2, 4]).
        num_res_blocks: residual blocks per level (2).
        attn_resolutions: feature-map sides (in pixels of the level) at which attention blocks sit (none).
    """

    can_decode = False

    def __init__(self, image_size: int = 512, codebook_size: int = 8192, embed_dim: int = 256,
                 latent_channels: int = 256, in_channels: int = 3, base_channels: int = 128,
                 channel_multiplier: list[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 attn_resolutions: list[int] | None = None):
        super().__init__()
        channel_multiplier = [int(m) for m in channel_multiplier]
        self._image_shapes(image_size, channel_multiplier, in_channels, base_channels)
        self.codebook_size = codebook_size
        tf = _transformers()
        config = tf.ChameleonVQVAEConfig(
            embed_dim=embed_dim, num_embeddings=codebook_size, latent_channels=latent_channels,
            resolution=image_size, in_channels=in_channels, base_channels=base_channels,
            channel_multiplier=channel_multiplier, num_res_blocks=num_res_blocks,
            attn_resolutions=list(attn_resolutions) if attn_resolutions else None)
        self._adopt(tf.ChameleonVQVAE(config))

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf_model.encode(x).image_tokens

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        raise InputError("chameleon_vq cannot decode: transformers' ChameleonVQVAE (and Chameleon's Hugging Face "
                         "weights) hold only the encoder", path="codes",
                         hint="use janus_vq or emu3_vq for a modality whose images are generated")


@register("tokenizer", "emu3_vq")
class Emu3VQ(_ImageVQ):
    """Emu3's image VQ-VAE (transformers' Emu3VQVAE, a video VQ applied to one image): 8x downsampling.

    An image is repeated ``temporal_downsample_factor`` times in time, as transformers' Emu3VQVAE.encode
    does, and decoding returns the first frame. Input range [-1, 1] (Emu3ImageProcessor). Square images only
    here (Emu3 itself takes any size that is a multiple of the spatial factor).

    Args:
        image_size: side of the square input image in pixels.
        codebook_size: number of codes (32768).
        embed_dim: width of a codebook vector (4).
        latent_channels: channels of the encoder's output (4).
        in_channels: image channels in (3).
        out_channels: image channels out of the decoder (3).
        temporal_downsample_factor: frames folded into one latent frame (4).
        base_channels: channels of the first level (256); times each channel_multiplier per level.
        channel_multiplier: per-level channel factors; the image shrinks 2x between levels ([1, 2, 2, 4]).
        num_res_blocks: residual blocks per level (2).
        attn_resolutions: level indices with attention blocks ([3]); the attention width (transformers'
            ``hidden_size``) is the last level's channels, base_channels * channel_multiplier[-1], so each
            listed level must have that many channels.
        num_attention_heads: heads of the attention blocks (1).
    """

    def __init__(self, image_size: int = 512, codebook_size: int = 32768, embed_dim: int = 4,
                 latent_channels: int = 4, in_channels: int = 3, out_channels: int = 3,
                 temporal_downsample_factor: int = 4, base_channels: int = 256,
                 channel_multiplier: list[int] = (1, 2, 2, 4), num_res_blocks: int = 2,
                 attn_resolutions: list[int] = (3,), num_attention_heads: int = 1):
        super().__init__()
        channel_multiplier = [int(m) for m in channel_multiplier]
        self._image_shapes(image_size, channel_multiplier, in_channels, base_channels)
        if temporal_downsample_factor < 1 or temporal_downsample_factor & (temporal_downsample_factor - 1):
            raise ParamError("temporal_downsample_factor",
                             f"temporal_downsample_factor must be a power of 2, got {temporal_downsample_factor}")
        hidden_size = base_channels * channel_multiplier[-1]
        for level in attn_resolutions:
            if not 0 <= level < len(channel_multiplier) or base_channels * channel_multiplier[level] != hidden_size:
                raise ParamError("attn_resolutions", f"level {level}: attention sits at levels of "
                                 f"base_channels * channel_multiplier[-1] = {hidden_size} channels")
        self.codebook_size = codebook_size
        tf = _transformers()
        config = tf.Emu3VQVAEConfig(
            codebook_size=codebook_size, embed_dim=embed_dim, latent_channels=latent_channels,
            in_channels=in_channels, out_channels=out_channels, temporal_downsample_factor=temporal_downsample_factor,
            base_channels=base_channels, channel_multiplier=channel_multiplier, num_res_blocks=num_res_blocks,
            attn_resolutions=list(attn_resolutions), hidden_size=hidden_size, num_attention_heads=num_attention_heads)
        config._attn_implementation = "eager"
        self._adopt(tf.Emu3VQVAE(config))

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        sizes = torch.tensor([[self.image_size, self.image_size]] * x.shape[0])
        return torch.stack(list(self.hf_model.encode(x, image_sizes=sizes).image_tokens))

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.hf_model.decode(codes.reshape(codes.shape[0], *self.grid))
