"""Items of any size through MimoModel (a tiny Qwen2-VL imported from transformers, random weights, fp32):
per-item placeholder checks, a video modality sharing the image tower's weights, packed rows with
M-RoPE positions restarting per document, data-parallel slicing of packed items, positions computed
on the host by the training step, and generation with the KV cache."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mimo_spec.data.batch import collate, model_kwargs  # noqa: E402
from mimo_spec.data.packing import collate_rows  # noqa: E402
from mimo_spec.errors import InputError  # noqa: E402
from mimo_spec.generation import generate  # noqa: E402
from mimo_spec.interop import import_hf  # noqa: E402
from mimo_spec.models.items import item_rows, slice_modality_items  # noqa: E402

IMG, VID, VS = 250, 251, 252
PATCH = 3 * 2 * 4 * 4  # channels x temporal patch x patch x patch


@pytest.fixture(scope="module")
def qwen():
    torch.manual_seed(0)
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2)
    hf = transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cfg, model = import_hf(hf.eval())
    return hf, cfg, model.eval()


def _image(h, w, t=1):
    grid = torch.tensor([[t, h, w]])
    return grid, torch.randn(t * h * w, PATCH)


def _sample(parts, g):
    """A sample dict as the data pipeline makes it: text lengths and (kind, grid, pixels) items."""
    ids, items = [], {"images": [], "videos": []}
    for p in parts:
        if isinstance(p, int):
            ids += torch.randint(0, 240, (p,), generator=g).tolist()
        else:
            kind, grid, pixels = p
            ids += [VS] + [IMG if kind == "images" else VID] * (int(grid.prod()) // 4)
            items[kind].append((grid, pixels))
    sample = {"input_ids": torch.tensor(ids), "labels": torch.tensor(ids), "items": {}, "num_items": {}}
    for kind, got in items.items():
        sample["num_items"][kind] = len(got)
        if got:
            names = ("pixel_values", "image_grid_thw") if kind == "images" else ("pixel_values_videos", "video_grid_thw")
            sample["items"][kind] = {"vit": {names[0]: torch.cat([p for _, p in got]),
                                             names[1]: torch.cat([gr for gr, _ in got])}}
    return sample


def _samples():
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(2)
    return [_sample([3, ("images", *_image(4, 6)), 4, ("images", *_image(6, 4)), 2], g),
            _sample([2, ("videos", *_image(4, 4, t=2)), 5], g),
            _sample([6], g),
            _sample([1, ("images", *_image(2, 2)), 3], g)]


def test_video_modality_shares_the_image_towers_weights(qwen):
    hf, cfg, model = qwen
    assert cfg["modalities"]["videos"]["params"]["inputs_from"] == "images"
    assert not any(k.startswith("modalities.videos") for k in model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())
    batch = collate(_samples()[1:2], pad_id=0)
    model.zero_grad()
    out = model(batch["input_ids"], batch["modality_inputs"], labels=batch["labels"])
    out.loss.backward()
    tower = model.modalities["images"].encoders["vit"]
    assert tower.patch_embed.weight.grad is not None and tower.patch_embed.weight.grad.abs().sum() > 0


def test_packed_rows_equal_each_sample_alone(qwen):
    """M-RoPE positions restart in every document of a packed row: each document's logits equal the sample's
    logits on its own (an image, two images, a video, text only, in two rows)."""
    _, _, model = qwen
    samples = _samples()
    packed = collate_rows([[samples[0], samples[1]], [samples[2], samples[3]]], pad_id=0, seq_len=80)
    kw = model_kwargs(packed, "cpu", model)
    assert kw["position_ids"].shape == (3, 2, 80)
    with torch.no_grad():
        logits = model(kw["input_ids"], kw["modality_inputs"], position_ids=kw["position_ids"],
                       document_ids=kw["document_ids"]).logits
        row_at = [(0, 0), (0, len(samples[0]["input_ids"])), (1, 0), (1, len(samples[2]["input_ids"]))]
        for s, (row, at) in zip(samples, row_at):
            alone = collate([s], pad_id=0)
            ref = model(alone["input_ids"], alone["modality_inputs"]).logits[0]
            n = len(s["input_ids"])
            torch.testing.assert_close(logits[row, at:at + n], ref, atol=1e-5, rtol=1e-5)


def test_training_step_positions_are_computed_on_the_host_and_equal_forwards(qwen):
    _, _, model = qwen
    batch = collate(_samples(), pad_id=0)
    kw = model_kwargs(batch, "cpu", model)
    grid = kw["modality_inputs"]["images"]["vit"]["image_grid_thw"]
    assert grid.device.type == "cpu"
    own = model.position_ids(batch["input_ids"], batch["modality_inputs"])
    torch.testing.assert_close(kw["position_ids"], own)
    with torch.no_grad():
        a = model(**{k: v for k, v in kw.items() if k != "labels"}).logits
        b = model(batch["input_ids"], batch["modality_inputs"]).logits
    torch.testing.assert_close(a, b)


def test_data_parallel_shares_slice_packed_items_by_their_rows(qwen):
    """Each share of the batch (as a data-parallel rank takes it) holds exactly its samples' patches; encoding
    the shares one by one equals encoding the batch."""
    _, _, model = qwen
    batch = collate(_samples(), pad_id=0)
    images = batch["modality_inputs"]["images"]
    mod = model.modalities["images"]
    assert item_rows(mod.encoders["vit"], images["vit"]) == [24, 24, 4]
    first, rest = slice_modality_items(mod, images, 0, 2), slice_modality_items(mod, images, 2, 3)
    assert first["vit"]["pixel_values"].shape[0] == 48 and rest["vit"]["pixel_values"].shape[0] == 4
    with torch.no_grad():
        whole = mod.encode(images)
        torch.testing.assert_close(torch.cat([mod.encode(first), mod.encode(rest)]), whole)
        # a share with no video: the video modality encodes one blank item through the image tower, keeps none
        empty = slice_modality_items(model.modalities["videos"], batch["modality_inputs"]["videos"], 0, 0)
        assert model.modalities["videos"].encode(empty).shape == (0, 64)


def test_placeholders_are_checked_per_item(qwen):
    _, _, model = qwen
    batch = collate(_samples(), pad_id=0)
    ids = batch["input_ids"].clone()
    model.prepare_inputs(ids, batch["modality_inputs"], items_per_sample=batch["items_per_sample"])
    model.prepare_inputs(ids, batch["modality_inputs"])  # counts inferred from the placeholders
    cut = ids.clone()
    cut[0, (cut[0] == IMG).nonzero()[-1]] = 5  # sample 0's second image loses a placeholder
    with pytest.raises(InputError, match=r"modality_inputs.images: sample 0 has 11 placeholder tokens .* its items "
                                         r"0..1 produce \[6, 6\] embeddings"):
        model.prepare_inputs(cut, batch["modality_inputs"])
    with pytest.raises(InputError, match=r"sample 0 has 11 placeholder tokens \(id 250\) but its items produce 12"):
        model.prepare_inputs(cut, batch["modality_inputs"], items_per_sample=batch["items_per_sample"])
    with pytest.raises(InputError, match=r"input_ids hold 12 placeholder tokens \(id 250\) but 13 embeddings"):
        model(cut, batch["modality_inputs"])
    bad = {k: dict(v) for k, v in batch["modality_inputs"].items()}
    bad["images"] = {"vit": dict(bad["images"]["vit"], pixel_values=bad["images"]["vit"]["pixel_values"][:-3])}
    with pytest.raises(InputError, match=r"image 2's grid .* makes 4 patches but pixel_values holds 1 rows"):
        model(ids, bad)


def test_generation_with_a_native_size_image_cached_equals_recomputed(qwen):
    _, _, model = qwen
    s = collate([_samples()[0]], pad_id=0)
    a = generate(model, s["input_ids"], s["modality_inputs"], max_new_tokens=5, use_cache=True)
    b = generate(model, s["input_ids"], s["modality_inputs"], max_new_tokens=5, use_cache=False)
    assert a.tokens == b.tokens and len(a.tokens) == 5


def test_a_batch_over_the_patch_budget_names_the_item(qwen):
    _, _, model = qwen
    batch = collate(_samples(), pad_id=0)
    tower = model.modalities["images"].encoders["vit"]
    tower.max_patches = 40
    try:
        with pytest.raises(InputError, match=r"modality_inputs.images.vit.image_grid_thw\[1\]: image 1's 24 patches "
                                             r"bring the batch to 48, over the patch budget max_patches 40"):
            model(batch["input_ids"], batch["modality_inputs"])
    finally:
        tower.max_patches = None
