"""A modality's item_layout stage (after the projectors): counts, embeddings at the placeholders, checks
and generation, with a layout written here (a learned separator after every item, the shape of
LLaVA-NeXT's image_newline) against the same arithmetic done by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import tiny_config
from mimo_spec import build_model
from mimo_spec.errors import InputError, ParamError
from mimo_spec.generation import generate
from mimo_spec.models.modality import Modality


class SeparatorAfterItems(nn.Module):
    """Each item's projected tokens, then one learned vector; the count read from the encoder inputs."""

    def __init__(self, hidden: int):
        super().__init__()
        self.separator = nn.Parameter(torch.randn(hidden))
        self.seen = []

    def item_tokens(self, tokens_in, encoder, inputs):
        assert "pixel_values" in inputs and len(tokens_in) == inputs["pixel_values"].shape[0]
        return [t + 1 for t in tokens_in]

    def forward(self, x, tokens_in, encoder, inputs):
        self.seen.append(list(tokens_in))
        parts = []
        for item in x.split(tokens_in):
            parts += [item, self.separator[None].to(item.dtype)]
        return torch.cat(parts)


@pytest.fixture()
def model():
    torch.manual_seed(0)
    m = build_model(tiny_config()).eval()
    m.modalities["images"].item_layout = SeparatorAfterItems(32)
    return m


def test_the_layout_gives_each_items_count_and_its_embeddings_land_at_the_placeholders(model):
    mod = model.modalities["images"]
    images = {"clip": {"pixel_values": torch.randn(2, 3, 16, 16)}}
    assert mod.item_tokens(images) == [5, 5]  # 2x2 patches, then the separator
    batch = model.example_inputs(2, text_tokens=6)
    ids, inputs = batch["input_ids"], batch["modality_inputs"]
    assert int((ids == 250).sum()) == 10
    embeds = model.embed_inputs(ids, inputs)
    # by hand: the tower and projector per image, then the separator, at the placeholders in order
    feats = mod.input_projections["clip"](mod.encoders["clip"](**inputs["images"]["clip"]))
    expected = torch.cat([torch.cat([f, mod.item_layout.separator[None]]) for f in feats])
    torch.testing.assert_close(embeds[ids == 250], expected)
    torch.testing.assert_close(embeds[ids != 250], model.language_model.embed_tokens(ids)[ids != 250])
    assert mod.item_layout.seen[-1] == [4, 4]  # the layout got the projected counts per item


def test_placeholders_must_follow_the_layouts_counts(model):
    batch = model.example_inputs(2, text_tokens=6)
    ids = batch["input_ids"].clone()
    row = (ids[0] == 250).nonzero()[-1]
    ids[0, row] = 3  # the separator's placeholder is missing from sample 0
    with pytest.raises(InputError, match=r"input_ids hold 9 placeholder tokens \(id 250\) but 10 embeddings"):
        model(ids, batch["modality_inputs"])


def test_generation_with_a_layout_cached_equals_recomputed(model):
    batch = model.example_inputs(1, text_tokens=6)
    ids = batch["input_ids"]
    cached = generate(model, ids, batch["modality_inputs"], max_new_tokens=5, use_cache=True)
    fresh = generate(model, ids, batch["modality_inputs"], max_new_tokens=5, use_cache=False)
    assert cached.tokens == fresh.tokens and len(cached.tokens) == 5


def test_a_modality_taking_another_ones_inputs_declares_no_layout_of_its_own():
    with pytest.raises(ParamError, match="inputs_from.*declare none of its own"):
        Modality(special_token_id=5, inputs_from="images", item_layout=nn.Identity())
    with pytest.raises(ParamError, match="item_layout and deepstack_projections cannot be combined"):
        Modality(special_token_id=5, item_layout=nn.Identity(), deepstack_projections=[nn.Identity()])


TILED_PRESET = """# @package _global_
defaults:
  - override /model: qwen2_tiny
  - override /modality: [llava_onevision_siglip, llava_video]
model:
  params: {vocab_size: 1024, hidden_size: 128, num_layers: 2, num_heads: 4, num_kv_heads: 2}
modalities:
  images:
    params: {special_token_id: 1000}
    submodules:
      encoders:
        vit:
          params: {grid_pinpoints: [[32, 32], [32, 64], [64, 32], [64, 64]]}   # up to 2x2 tiles of 32 px
          submodules:
            tower: {params: {image_size: 32, patch_size: 8, hidden_size: 64, num_layers: 2, num_heads: 4,
                             ffn_hidden_size: 128}}
      item_layout: {params: {max_tiles: 3}}      # anyres_max_3: shrink grids over 3 tiles' worth
  videos:
    params: {special_token_id: 1001}
"""


def test_the_readmes_tiled_model_composes_from_yaml_and_trains(tmp_path):
    """README's tiled model (LLaVA-OneVision's modality files at toy sizes): one tower for images and
    videos, each synthetic sample's placeholders follow its items' counts, and it trains."""
    from mimo_spec.config import compose_config
    from mimo_spec.train.loop import train

    (tmp_path / "conf" / "preset").mkdir(parents=True)
    (tmp_path / "conf" / "preset" / "my_tiled_vlm.yaml").write_text(TILED_PRESET)
    cfg = compose_config([f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "preset=my_tiled_vlm", "train.steps=3",
                          "data.num_samples=16", "data.eval_samples=4", "train.eval_batches=1", "train.eval_every=3",
                          "train.log_every=1000"])
    model = build_model(cfg)
    assert model.modalities["videos"].src is model.modalities["images"]  # one set of weights
    sizes = torch.tensor([[26, 48], [64, 20], [30, 30]])
    tiles = [3, 3, 2]  # base + 1x2, base + 2x1, base + 1x1
    inputs = {"vit": {"pixel_values": torch.randn(sum(tiles), 3, 32, 32), "image_sizes": sizes}}
    assert model.modalities["images"].validate_inputs(inputs, "images") == 3
    counts = model.modalities["images"].item_tokens(inputs)
    assert len(set(counts)) == 3, counts  # each image its own count (unpadded, newline per row)
    assert model.modalities["images"].encode(inputs).shape == (sum(counts), 128)
    result = train(cfg, tmp_path / "run")
    assert result["status"] == "completed" and result["steps"] == 3
