"""Whisper audio encoder: log-mel frames -> audio tokens (two frames per token).

Unlike Hugging Face's encoder, any frame count up to 2 * max_source_positions is
accepted (HF insists on exactly 3000): positions are sliced to the output length.

Whisper's attention has no key bias. The fused QKV keeps a bias for all three
parts with the key part zero after conversion; that is exact, because a key
bias adds the same q.b_k to every score of a query's row, which softmax ignores
(its gradient is identically zero, so it stays zero while training too).

State-dict keys::

    conv1.{weight,bias}     (H, num_mel_bins, 3)
    conv2.{weight,bias}     (H, H, 3), stride 2
    pos_embed               (max_source_positions, H)  sinusoids, a non-trainable buffer
    layers.{i}.attn_norm / attn.qkv / attn.out / mlp_norm / mlp.fc1 / mlp.fc2
    norm.{weight,bias}
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimo_spec.components.encoder_inputs import the_only_input
from mimo_spec.components.layers import (
    ActivationName,
    Backend,
    TransformerBlock,
    check_backend,
    get_activation,
    init_transformer_weights,
)
from mimo_spec.errors import InputError, ParamError
from mimo_spec.registry import register


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed position table (length, channels): [sin | cos] halves."""
    half = channels // 2
    log_increment = math.log(max_timescale) / (half - 1)
    # computed on the CPU whatever the default device: on meta there is nothing to compute,
    # and meta arange goes through torch's slow reference kernels
    target = torch.empty(0).device
    cpu = torch.device("cpu")
    if target.type == "meta":
        return torch.empty(length, channels, dtype=torch.float32, device=target)
    inv_timescales = torch.exp(-log_increment * torch.arange(half, dtype=torch.float32, device=cpu))
    scaled_time = torch.arange(length, dtype=torch.float32, device=cpu)[:, None] * inv_timescales[None, :]
    return torch.cat((scaled_time.sin(), scaled_time.cos()), dim=1).to(target)


@register("encoder", "whisper_encoder")
class WhisperEncoder(nn.Module):
    """Audio encoder: input_features (N, num_mel_bins, frames) -> (N, ceil(frames / 2), hidden_size).

    Args:
        num_mel_bins: mel channels of the input.
        hidden_size, num_layers, num_heads, ffn_hidden_size: transformer sizes.
        max_source_positions: output positions (1500 = 30 s at 3000 frames).
        activation: of the MLP ("gelu" in Whisper; the conv front end always uses GELU).
        layer_norm_eps: epsilon of every LayerNorm.
        backend: "local", "te" or "auto".
    """

    input_name = "input_features"

    def __init__(
        self,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        ffn_hidden_size: int,
        num_mel_bins: int = 80,
        max_source_positions: int = 1500,
        activation: ActivationName = "gelu",
        layer_norm_eps: float = 1e-5,
        backend: Backend = "local",
    ):
        super().__init__()
        for name, value in (("num_mel_bins", num_mel_bins), ("hidden_size", hidden_size),
                            ("num_layers", num_layers), ("num_heads", num_heads),
                            ("ffn_hidden_size", ffn_hidden_size), ("max_source_positions", max_source_positions)):
            if value < 1:
                raise ParamError(name, f"{name} ({value}) must be >= 1")
        if hidden_size % num_heads:
            raise ParamError("hidden_size", f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if hidden_size % 2 or hidden_size < 4:
            raise ParamError("hidden_size",
                             f"hidden_size ({hidden_size}) must be even and >= 4 for sinusoidal positions")
        get_activation(activation)
        self.backend = check_backend(backend, activation=activation)
        self.num_mel_bins, self.max_source_positions = num_mel_bins, max_source_positions
        self.hidden_size = self.out_features = hidden_size
        self.num_layers = num_layers
        self.max_frames = 2 * max_source_positions

        self.conv1 = nn.Conv1d(num_mel_bins, hidden_size, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(hidden_size, hidden_size, kernel_size=3, stride=2, padding=1)
        # A persistent buffer: checkpoints carry it (HF: embed_positions.weight) and
        # the optimizer never sees it.
        self.register_buffer("pos_embed", sinusoids(max_source_positions, hidden_size), persistent=True)
        self.layers = nn.ModuleList(
            TransformerBlock(hidden_size, num_heads, ffn_hidden_size, norm="layernorm", norm_eps=layer_norm_eps,
                             mlp="gelu", activation=activation, qkv_bias=True, out_bias=True, mlp_bias=True,
                             layer_idx=i, backend=self.backend)
            for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.init_weights()

    def init_weights(self) -> None:
        init_transformer_weights(self, num_layers=self.num_layers)
        with torch.no_grad():
            self.pos_embed.copy_(sinusoids(self.max_source_positions, self.hidden_size))

    # -------------------------------------------------------- framework hooks

    def tokens_per_item(self, input_features_shape: tuple) -> int:
        """Output tokens for an input of this shape: ceil(frames / 2)."""
        return (int(input_features_shape[-1]) + 1) // 2

    def example_inputs(self, num_items: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Random 30-second inputs: {"input_features": (N, num_mel_bins, 2 * max_source_positions)}."""
        shape = (num_items, self.num_mel_bins, self.max_frames)
        return {"input_features": torch.randn(shape, generator=generator)}

    def validate_inputs(self, inputs: dict, path: str) -> None:
        """Raise InputError (naming ``path``) unless inputs is {"input_features": (N, mel, frames)}."""
        expected = f"expected shape (N, {self.num_mel_bins}, frames) with 1 <= frames <= {self.max_frames}"
        x, where = the_only_input(inputs, "input_features", path, expected,
                                  hint="pass log-mel features as a float tensor")
        shape = tuple(x.shape)
        if x.dim() != 3 or shape[1] != self.num_mel_bins or not 1 <= shape[2] <= self.max_frames:
            raise InputError(f"{expected}, got {shape}", path=where,
                             hint="log-mel features batched as (N, mel_bins, frames); split longer audio")

    # ----------------------------------------------------------------- model

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        """input_features (N, num_mel_bins, frames) -> (N, ceil(frames / 2), hidden_size)."""
        if input_features.shape[-1] > self.max_frames:
            raise InputError(f"{input_features.shape[-1]} frames exceed the maximum {self.max_frames}",
                             path="input_features", hint="split longer audio into 30 s windows")
        x = input_features.to(self.conv1.weight.dtype)
        x = F.gelu(self.conv1(x))  # the front end is always exact GELU, whatever the MLP uses
        x = F.gelu(self.conv2(x))  # (N, H, T)
        x = x.transpose(1, 2)  # (N, T, H)
        x = x + self.pos_embed[: x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

