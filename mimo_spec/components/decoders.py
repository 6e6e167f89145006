"""Decoders for output modalities: LM hidden states -> the modality's data."""

from __future__ import annotations

import torch
import torch.nn as nn

from mimo_spec.errors import ParamError
from mimo_spec.registry import register


@register("decoder", "patch_image_decoder")
class PatchImageDecoder(nn.Module):
    """Hidden states at an image's generation tokens -> image pixels.

    Each of the (image_size / patch_size)^2 tokens predicts one patch:
    (N, T, in_features) -> (N, num_channels, image_size, image_size).
    """

    target_name = "pixel_values"

    def __init__(self, in_features: int, image_size: int, patch_size: int, num_channels: int = 3,
                 hidden_features: int | None = None):
        super().__init__()
        if image_size % patch_size:
            raise ParamError("image_size", f"image_size ({image_size}) must be divisible by patch_size ({patch_size})")
        self.in_features, self.image_size, self.patch_size, self.num_channels = (
            in_features, image_size, patch_size, num_channels)
        self.grid = image_size // patch_size
        self.num_tokens = self.grid * self.grid
        hidden = hidden_features or in_features
        self.mlp = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(),
                                 nn.Linear(hidden, num_channels * patch_size * patch_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        n = hidden.shape[0]
        g, p, c = self.grid, self.patch_size, self.num_channels
        patches = self.mlp(hidden)  # (N, g*g, C*p*p)
        # (N, g, g, C, p, p) -> (N, C, g, p, g, p) -> (N, C, H, W)
        return patches.reshape(n, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, c, g * p, g * p)

    def example_targets(self, num_items: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.rand(num_items, self.num_channels, self.image_size, self.image_size, generator=generator)
