"""Projectors: encoder features -> the language model's hidden size."""

from __future__ import annotations

import math
import torch
import torch.nn as nn

from mimo_spec.components.layers import ActivationName, get_activation
from mimo_spec.errors import ParamError
from mimo_spec.registry import register

class Activation(nn.Module):
    """An activation from components.layers by name, as a module (so nn.Sequential can hold it)."""

    def __init__(self, name: ActivationName):
        super().__init__()
        self.name = name
        self.fn = get_activation(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


def mlp_layers(in_features: int, out_features: int, hidden_features: int | None = None, num_layers: int = 2,
               activation: ActivationName = "gelu", bias: bool = True) -> nn.Sequential:
    """``num_layers`` Linear layers with the activation between them, (..., in) -> (..., out); the inner width
    is ``hidden_features`` (default out_features). Indices in the Sequential: Linear at even positions."""
    if num_layers < 1:
        raise ParamError("num_layers", f"num_layers must be >= 1, got {num_layers}")
    hidden = hidden_features or out_features
    widths = [in_features] + [hidden] * (num_layers - 1) + [out_features]
    layers: list[nn.Module] = []
    for i in range(num_layers):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=bias))
        if i < num_layers - 1:
            layers.append(Activation(activation))
    return nn.Sequential(*layers)


@register("projector", "identity")
class IdentityProjector(nn.Module):
    """Passes encoder features through unchanged (encoder width must equal the LM's)."""

    def __init__(self, in_features: int | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = in_features

    def tokens_out(self, tokens_in: int) -> int:
        return tokens_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@register("projector", "linear")
class LinearProjector(nn.Module):
    """One affine map: (N, T, in_features) -> (N, T, out_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.proj = nn.Linear(in_features, out_features, bias=bias)

    def tokens_out(self, tokens_in: int) -> int:
        return tokens_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@register("projector", "mlp")
class MLPProjector(nn.Module):
    """LLaVA-1.5 style MLP: Linear, activation, Linear (depth configurable).

    (N, T, in_features) -> (N, T, out_features); hidden width defaults to out_features.
    """

    def __init__(self, in_features: int, out_features: int, hidden_features: int | None = None,
                 num_layers: int = 2, activation: ActivationName = "gelu", bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.layers = mlp_layers(in_features, out_features, hidden_features, num_layers, activation, bias)

    def tokens_out(self, tokens_in: int) -> int:
        return tokens_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@register("projector", "pixel_shuffle_mlp")
class PixelShuffleMLPProjector(nn.Module):
    """Token-reducing connector: merge each s x s patch neighbourhood into one token (pixel unshuffle:
    the block's tokens row by row become the channels), optionally LayerNorm, then an MLP.

    (N, T, C) with T = g*g  ->  (N, T / s^2, out_features). InternVL's ``mlp1``: LayerNorm, Linear,
    GELU, Linear (``norm: true, num_layers: 2``); Idefics3 / SmolVLM's connector: one Linear without
    bias (``norm: false, num_layers: 1, bias: false``). Both merge neighbours in the same order.

    Args:
        in_features: the encoder's width C (the merged token has C * s^2 channels).
        out_features: the language model's hidden size.
        scale_factor: s, the side of the merged neighbourhood (InternVL 2: downsample_ratio 0.5;
            Idefics3: 2 or 3; SmolVLM: 3 or 4).
        hidden_features: the MLP's inner width (default out_features).
        activation: between the MLP's layers.
        norm: LayerNorm over the merged channels first.
        num_layers: Linear layers in the MLP (1: one Linear from C * s^2 straight to out_features).
        bias: biases on the Linear layers.
    """

    def __init__(self, in_features: int, out_features: int, scale_factor: int = 2,
                 hidden_features: int | None = None, activation: ActivationName = "gelu", norm: bool = True,
                 num_layers: int = 2, bias: bool = True):
        super().__init__()
        if scale_factor < 1:
            raise ParamError("scale_factor", f"scale_factor must be >= 1, got {scale_factor}")
        self.in_features, self.out_features, self.scale_factor = in_features, out_features, scale_factor
        merged = in_features * scale_factor * scale_factor
        self.norm = nn.LayerNorm(merged) if norm else nn.Identity()
        self.mlp = mlp_layers(merged, out_features, hidden_features, num_layers, activation, bias)

    def tokens_out(self, tokens_in: int) -> int:
        grid = math.isqrt(tokens_in)
        s = self.scale_factor
        if grid * grid != tokens_in or grid % s:
            raise ParamError("scale_factor",
                             f"pixel_shuffle_mlp needs a square token grid divisible by scale_factor {s}, "
                             f"got {tokens_in} tokens")
        return tokens_in // (s * s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        g, s = math.isqrt(t), self.scale_factor
        # (N, g, g, C) -> (N, g/s, s, g/s, s, C) -> (N, g/s, g/s, s, s, C): neighbours become channels
        x = x.reshape(n, g // s, s, g // s, s, c).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(n, (g // s) * (g // s), s * s * c)
        return self.mlp(self.norm(x))
