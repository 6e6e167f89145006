"""``grid_position_embedding``: a 2-D (row, column) position within an image's code grid, as a projector.

A discrete image modality's ``code_position_embedding`` receives each code's flat, row-major position in its
item (0 .. rows * cols - 1); this projector turns it into ``row_embedding[p // cols] + col_embedding[p % cols]``.
Codes in one row or one column share a vector, so what the model learns about a row of the grid holds for
every column of it (a flat table must learn each of the rows * cols positions on its own).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mimo_spec.errors import ParamError
from mimo_spec.registry import register


@register("projector", "grid_position_embedding")
class GridPositionEmbedding(nn.Module):
    """Flat row-major positions (...,) on a ``grid`` -> vectors (..., embedding_dim): a row plus a column
    embedding.

    Args:
        grid: (rows, cols) of the code grid (the tokenizer's ``grid``, e.g. [8, 8] for 32 px / 4 px patches).
        embedding_dim: the width of each vector (the LM hidden size).
        init_std: the standard deviation the row and column tables start from.
    """

    def __init__(self, grid: list[int] | tuple[int, int] = (8, 8), embedding_dim: int = 64, init_std: float = 0.02):
        super().__init__()
        if (not isinstance(grid, (list, tuple)) or len(grid) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in grid)):
            raise ParamError("grid", f"expected [rows, cols] of positive integers, got {grid!r}")
        if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise ParamError("embedding_dim", f"expected a positive integer, got {embedding_dim!r}")
        if not init_std >= 0:
            raise ParamError("init_std", f"expected a non-negative number, got {init_std!r}")
        self.grid = (int(grid[0]), int(grid[1]))
        self.in_features, self.out_features = self.grid[0] * self.grid[1], embedding_dim
        self.row = nn.Parameter(torch.randn(self.grid[0], embedding_dim) * init_std)
        self.col = nn.Parameter(torch.randn(self.grid[1], embedding_dim) * init_std)

    def tokens_out(self, tokens_in: int) -> int:
        return tokens_in

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        cols = self.grid[1]
        return nn.functional.embedding(positions // cols, self.row) + nn.functional.embedding(positions % cols, self.col)
