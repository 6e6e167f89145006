"""Pooling projectors: fewer tokens per item, then a Linear / MLP into the language model.

- ``avg_pool``: 1-D average pooling over an item's token sequence (audio: an encoder's frames), by a stride,
  optionally a LayerNorm, then the MLP. (N, T, C) -> (N, T // stride, out_features).
- ``pool2d``: s x s pooling over an item's square token grid (video frames through an image tower:
  LLaVA-NeXT-Video's 2x2 average or max pooling, LLaVA-OneVision's bilinear halving), before or after the
  MLP. (N, g*g, C) -> (N, g'*g', out_features).

Both take items first (N, T, C): an encoder that returns its items' tokens flat (items of their own
sizes) has no per-item sequence for them to pool.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimo_spec.components.layers import ActivationName
from mimo_spec.components.projectors import mlp_layers
from mimo_spec.errors import InputError, ParamError
from mimo_spec.registry import register


def _items_first(x: torch.Tensor, name: str) -> None:
    if x.dim() != 3:
        raise InputError(f"{name} pools each item's tokens: expected features (N, T, C), items first, got "
                         f"{tuple(x.shape)}", path="input_projections",
                         hint="an encoder returning items of their own sizes flat cannot be pooled here; pool "
                              "inside the encoder (e.g. whisper_encoder's pool_stride)")


@register("projector", "avg_pool")
class AvgPoolProjector(nn.Module):
    """Average pooling over the token sequence, then a Linear / MLP: (N, T, in_features) ->
    (N, T // stride, out_features). Token j of the output averages input tokens [j*stride, (j+1)*stride);
    a tail shorter than the stride is dropped (as ``nn.AvgPool1d``). Audio: e.g. 1500 Whisper frames
    -> 750 tokens with stride 2.

    Args:
        in_features: the encoder's width.
        out_features: the language model's hidden size.
        stride: tokens averaged into one (the window equals the stride).
        norm: a LayerNorm over the pooled tokens before the MLP.
        norm_eps: its epsilon.
        hidden_features: the MLP's inner width (default out_features).
        num_layers: Linear layers in the MLP (1: a single Linear).
        activation: between the MLP's layers.
        bias: biases on the Linear layers.
    """

    def __init__(self, in_features: int, out_features: int, stride: int = 2, norm: bool = False,
                 norm_eps: float = 1e-5, hidden_features: int | None = None, num_layers: int = 1,
                 activation: ActivationName = "gelu", bias: bool = True):
        super().__init__()
        if stride < 1:
            raise ParamError("stride", f"stride must be >= 1, got {stride}")
        self.in_features, self.out_features, self.stride = in_features, out_features, int(stride)
        self.norm = nn.LayerNorm(in_features, eps=norm_eps) if norm else nn.Identity()
        self.mlp = mlp_layers(in_features, out_features, hidden_features, num_layers, activation, bias)

    def tokens_out(self, tokens_in: int) -> int:
        """tokens_in // stride (a shorter tail is dropped)."""
        if tokens_in < self.stride:
            raise ParamError("stride", f"avg_pool with stride {self.stride} needs at least {self.stride} tokens per "
                             f"item, got {tokens_in}")
        return tokens_in // self.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _items_first(x, "avg_pool")
        n, t, c = x.shape
        s = self.stride
        x = x[:, : (t // s) * s].reshape(n, t // s, s, c).mean(2)
        return self.mlp(self.norm(x))


@register("projector", "pool2d")
class Pool2dProjector(nn.Module):
    """s x s pooling over a square token grid and a Linear / MLP: (N, g*g, in_features) -> (N, g'*g',
    out_features), tokens row by row.

    ``mode``: "average" / "max" over each s x s block (g' = g // s, a shorter edge dropped: LLaVA-NeXT-Video's
    ``AvgPool2d`` / ``MaxPool2d``), or "bilinear" resizing to g' = ceil(g / s) (``F.interpolate(mode="bilinear",
    align_corners=False)``: LLaVA-OneVision's video frames). ``order``: "pool_first" (pool the encoder's
    features, then project: LLaVA-NeXT-Video) or "project_first" (project, then pool: LLaVA-OneVision).

    Args:
        in_features: the encoder's width.
        out_features: the language model's hidden size.
        stride: s, the side of a pooled block (2: 2x2).
        mode: "average", "max" or "bilinear".
        order: "pool_first" or "project_first".
        norm: a LayerNorm over the encoder's features before pooling and projecting.
        norm_eps: its epsilon.
        hidden_features: the MLP's inner width (default out_features).
        num_layers: Linear layers in the MLP (LLaVA's projector: 2).
        activation: between the MLP's layers.
        bias: biases on the Linear layers.
    """

    def __init__(self, in_features: int, out_features: int, stride: int = 2,
                 mode: Literal["average", "max", "bilinear"] = "average",
                 order: Literal["pool_first", "project_first"] = "pool_first", norm: bool = False,
                 norm_eps: float = 1e-5, hidden_features: int | None = None, num_layers: int = 2,
                 activation: ActivationName = "gelu", bias: bool = True):
        super().__init__()
        if stride < 1:
            raise ParamError("stride", f"stride must be >= 1, got {stride}")
        if mode not in ("average", "max", "bilinear"):
            raise ParamError("mode", f"mode must be average, max or bilinear, got {mode!r}")
        if order not in ("pool_first", "project_first"):
            raise ParamError("order", f"order must be pool_first or project_first, got {order!r}")
        self.in_features, self.out_features = in_features, out_features
        self.stride, self.mode, self.order = int(stride), mode, order
        self.norm = nn.LayerNorm(in_features, eps=norm_eps) if norm else nn.Identity()
        self.mlp = mlp_layers(in_features, out_features, hidden_features, num_layers, activation, bias)

    def _side(self, tokens_in: int) -> int:
        g = math.isqrt(tokens_in)
        if g * g != tokens_in:
            raise ParamError("stride", f"pool2d needs a square token grid, got {tokens_in} tokens per item")
        return g

    def tokens_out(self, tokens_in: int) -> int:
        """(g // stride)^2 for average / max, ceil(g / stride)^2 for bilinear, g = sqrt(tokens_in)."""
        g, s = self._side(tokens_in), self.stride
        side = -(-g // s) if self.mode == "bilinear" else g // s
        if side < 1:
            raise ParamError("stride", f"pool2d with stride {s} needs a grid of at least {s}x{s}, got {g}x{g}")
        return side * side

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        g, s = self._side(t), self.stride
        if self.mode == "bilinear":
            side = -(-g // s)
            grid = x.transpose(1, 2).reshape(n, c, g, g)
            out = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)
            return out.flatten(2).transpose(1, 2)
        side = g // s
        blocks = x.reshape(n, g, g, c)[:, : side * s, : side * s].reshape(n, side, s, side, s, c)
        pooled = blocks.mean((2, 4)) if self.mode == "average" else blocks.amax((2, 4))
        return pooled.reshape(n, side * side, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _items_first(x, "pool2d")
        x = self.norm(x)
        if self.order == "pool_first":
            return self.mlp(self._pool(x))
        return self._pool(self.mlp(x))
