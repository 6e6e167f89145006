"""``embedding``: a lookup table as a projector, for a discrete modality's codes (Janus's ``gen_embed``)."""

from __future__ import annotations

import torch
import torch.nn as nn

from mimo_spec.registry import register


@register("projector", "embedding")
class EmbeddingProjector(nn.Module):
    """Integer codes (...,) -> vectors (..., embedding_dim).

    Args:
        num_embeddings: the number of codes (the tokenizer's codebook size).
        embedding_dim: the width of each code's vector.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.in_features, self.out_features = num_embeddings, embedding_dim
        self.weight = nn.Parameter(torch.randn(num_embeddings, embedding_dim) * 0.02)

    def tokens_out(self, tokens_in: int) -> int:
        return tokens_in

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(codes, self.weight)
