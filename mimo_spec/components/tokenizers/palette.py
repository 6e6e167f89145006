"""``patch_palette``: a fixed-codebook image tokenizer (no weights to learn) for the synthetic task.

Each ``patch_size`` x ``patch_size`` patch of an image becomes one code: the index of the palette colour
nearest to the patch's mean colour; decoding fills each patch with its colour. The synthetic "draw a red
circle" images (a few flat colours on a dark background) survive the round trip at patch resolution, so a
small model can learn to draw them by predicting codes, as Janus / Chameleon predict VQ codes.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mimo_spec.errors import InputError, ParamError
from mimo_spec.registry import register

# the synthetic task's background and colours (mimo_spec.data.synthetic), then black and white
DEFAULT_PALETTE = [[0.1, 0.1, 0.1], [0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.15, 0.25, 0.95], [0.95, 0.9, 0.1],
                   [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]


@register("tokenizer", "patch_palette")
class PatchPalette(nn.Module):
    """Images (N, 3, image_size, image_size) in [0, 1] <-> (N, T) codes, T = (image_size / patch_size)^2,
    row-major over the patch grid; code c is ``palette[c]``.

    Args:
        image_size: the square side of the images (pixels).
        patch_size: the side of the square patch each code stands for (divides image_size).
        palette: the codebook, a list of RGB colours in [0, 1] (default: the synthetic task's background and
            four colours, black and white).
    """

    item_kind = "image"
    num_codebooks = 1
    value_range = (0.0, 1.0)  # the pixel range encode takes and decode gives

    def __init__(self, image_size: int = 32, patch_size: int = 4, palette: list[list[float]] | None = None):
        super().__init__()
        if image_size < 1 or patch_size < 1 or image_size % patch_size:
            raise ParamError("patch_size", f"patch_size ({patch_size}) must divide image_size ({image_size}), "
                             "both >= 1")
        values = DEFAULT_PALETTE if palette is None else palette
        if not isinstance(values, (list, tuple)) or not values or any(
                not isinstance(c, (list, tuple)) or len(c) != 3 or any(
                    isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1 for v in c)
                for c in values):
            raise ParamError("palette", "expected a non-empty list of RGB triples with values in [0, 1]")
        colours = torch.tensor([[float(v) for v in c] for c in values], dtype=torch.float32)
        self.image_size, self.patch_size = image_size, patch_size
        g = image_size // patch_size
        self.grid = (g, g)
        self.num_tokens = g * g
        self.codebook_size = int(colours.shape[0])
        self.num_channels = 3
        self.register_buffer("palette", colours)  # in the state dict: the codebook a checkpoint was trained with

    def _check(self, x: torch.Tensor) -> None:
        want = (3, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise InputError(f"expected images (N, {', '.join(map(str, want))}), got {tuple(x.shape)}",
                             path="patch_palette.encode")

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, T) int64: the nearest palette colour of each patch's mean."""
        self._check(x)
        n, p = x.shape[0], self.patch_size
        g = self.grid[0]
        means = x.float().reshape(n, 3, g, p, g, p).mean(dim=(3, 5))  # (N, 3, g, g)
        means = means.permute(0, 2, 3, 1).reshape(n, g * g, 3)
        dist = ((means.unsqueeze(2) - self.palette.to(means.device)) ** 2).sum(-1)  # (N, T, K)
        return dist.argmin(-1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, T) int64 -> (N, 3, H, W) in [0, 1]: every patch filled with its code's colour."""
        if codes.dim() != 2 or codes.shape[1] != self.num_tokens:
            raise InputError(f"expected codes (N, {self.num_tokens}), got {tuple(codes.shape)}",
                             path="patch_palette.decode")
        n, g, p = codes.shape[0], self.grid[0], self.patch_size
        rgb = self.palette.to(codes.device)[codes.clamp(0, self.codebook_size - 1)]  # (N, T, 3)
        img = rgb.reshape(n, g, g, 3).permute(0, 3, 1, 2)  # (N, 3, g, g)
        return img.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)

    def example_targets(self, num_items: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random images: random codes decoded (every patch one palette colour)."""
        codes = torch.randint(self.codebook_size, (num_items, self.num_tokens), generator=generator)
        return self.decode(codes)
