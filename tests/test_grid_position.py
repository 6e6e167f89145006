"""The 2-D (row, column) code position embedding of the default discrete image-out modality."""

import pytest
import torch

from mimo_spec.components.grid_position import GridPositionEmbedding
from mimo_spec.errors import ParamError


def test_grid_position_is_row_plus_column_and_is_the_default_image_gen_position():
    from mimo_spec import build_model
    from mimo_spec.config import compose_config

    emb = GridPositionEmbedding(grid=[2, 3], embedding_dim=4, init_std=1.0)
    out = emb(torch.arange(6))
    for p in range(6):
        torch.testing.assert_close(out[p], emb.row[p // 3] + emb.col[p % 3])
    assert emb(torch.tensor([[4, 0]])).shape == (1, 2, 4)
    for bad in ([0, 3], [2], "8x8", [2.0, 3]):
        with pytest.raises(ParamError):
            GridPositionEmbedding(grid=bad, embedding_dim=4)
    model = build_model(compose_config(["modality=[vision_clip,image_gen]"]), seed=0)
    mod = model.modalities["image_out"]
    assert isinstance(mod.code_position_embedding, GridPositionEmbedding)
    assert mod.code_position_embedding.grid == tuple(mod.tokenizer.grid)
    codes = torch.zeros(1, mod.tokenizer.num_tokens, dtype=torch.long)
    with torch.no_grad():  # same code, different positions: the embeddings differ by row + column terms
        x = mod.embed_codes(codes)
        pe = mod.code_position_embedding
        torch.testing.assert_close(x[0, 9] - x[0, 0], pe.row[1] - pe.row[0] + pe.col[1] - pe.col[0])
