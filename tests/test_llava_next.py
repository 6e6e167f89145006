"""LLaVA-NeXT, LLaVA-OneVision and LLaVA-NeXT-Video (anyres tiles, unpadding, image_newline, anyres_max_N,
video pooling) through import_hf / export_hf, against transformers (tiny random models, fp32, CPU): logits
and loss on a padded batch of images of different sizes and aspect ratios (tiled by transformers' own
image processors) and videos; export -> from_pretrained -> the same logits; the token counts equal the
processors'; input checks; greedy generation."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from conftest import perturb  # noqa: E402
from mimo_spec.components.vision.anyres import (anyres_geometry, anyres_image_tokens, anyres_tiles,  # noqa: E402
                                                 video_tokens)
from mimo_spec.errors import ConfigError, InputError  # noqa: E402
from mimo_spec.generation import generate  # noqa: E402
from mimo_spec.interop import export_hf, import_hf  # noqa: E402

TOL = 1e-5
IMG, VID = 250, 251
TEXT = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048)
# CLIP tiles of 28 px (4x4 patches of 7); SigLIP tiles of 30 px with 7-px patches: a 4x4 grid, 2 px unused
CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, image_size=28, patch_size=7)
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, image_size=30, patch_size=7, vision_use_head=False)
NEXT_PINS = [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]
OV_PINS = [[30 * a, 30 * b] for a in (1, 2, 3) for b in (1, 2, 3)]
# (height, width): wide, tall, square, very wide; OneVision's 95x88 takes 3x3 tiles, shrunk by anyres_max_2
SIZES = {"next": [(30, 70), (64, 40), (50, 50), (20, 90)], "onevision": [(30, 70), (95, 88), (50, 50), (20, 90)],
         "video": [(64, 40), (30, 70), (50, 50), (20, 90)]}
CLASSES = {"next": ("LlavaNextConfig", "LlavaNextForConditionalGeneration"),
           "onevision": ("LlavaOnevisionConfig", "LlavaOnevisionForConditionalGeneration"),
           "video": ("LlavaNextVideoConfig", "LlavaNextVideoForConditionalGeneration")}


def _hf_model(kind: str):
    config_cls, model_cls = (getattr(transformers, n) for n in CLASSES[kind])
    if kind == "onevision":
        config = config_cls(vision_config=SIGLIP, text_config=dict(TEXT, model_type="qwen2"), image_token_index=IMG,
                            video_token_index=VID, image_grid_pinpoints=OV_PINS, vision_aspect_ratio="anyres_max_2")
    else:
        extra = {"video_token_index": VID} if kind == "video" else {}
        config = config_cls(vision_config=CLIP, text_config=dict(TEXT, model_type="llama"), image_token_index=IMG,
                            image_grid_pinpoints=NEXT_PINS, vision_feature_layer=-2,
                            vision_feature_select_strategy="default", **extra)
    torch.manual_seed(0)
    hf = model_cls(config)
    # a default newline (and unit norms, zero biases) would hide swapped tensors
    return perturb(hf, louder=lambda n: "language_model" in n and "proj" in n)


@functools.lru_cache(maxsize=None)
def _pair(kind: str):
    hf = _hf_model(kind)
    cfg, model = import_hf(hf)
    return hf, cfg, model.eval()


def _processor(kind: str):
    if kind == "onevision":
        return transformers.LlavaOnevisionImageProcessorPil(size={"height": 30, "width": 30},
                                                            image_grid_pinpoints=OV_PINS)
    return transformers.LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                                   image_grid_pinpoints=NEXT_PINS)


def _images(kind: str, sizes):
    """transformers' (padded 5-D pixel_values, image_sizes), and ours: each image's tiles back to back."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    out = _processor(kind)(images, return_tensors="pt")
    pv, image_sizes = out["pixel_values"], out["image_sizes"]
    geo = anyres_geometry(_pair(kind)[2].modalities["images"])
    tiles = [anyres_tiles(h, w, geo) for h, w in sizes]
    assert pv.shape[1] == max(tiles) and image_sizes.tolist() == [list(s) for s in sizes]
    return pv, image_sizes, torch.cat([pv[i, :n] for i, n in enumerate(tiles)])


def _batch(kind: str):
    """Two right-padded rows: images of four sizes (row 0: two, row 1: two) and, for OneVision and
    NeXT-Video, a 3-frame video in row 1; labels -100 at placeholders and padding."""
    hf, _, model = _pair(kind)
    pv, image_sizes, tiles = _images(kind, SIZES[kind])
    ours = {"images": {"vit": {"pixel_values": tiles, "image_sizes": image_sizes}}}
    hf_kw = {"pixel_values": pv, "image_sizes": image_sizes}
    counts = model.modalities["images"].item_tokens(ours["images"])
    geo = anyres_geometry(model.modalities["images"])
    assert counts == [anyres_image_tokens(h, w, geo) for h, w in SIZES[kind]]
    video_run = []
    if kind != "next":
        size = (SIGLIP if kind == "onevision" else CLIP)["image_size"]
        pvv = torch.randn(1, 3, 3, size, size, generator=torch.Generator().manual_seed(3))
        ours["videos"] = {"vit": {"pixel_values_videos": pvv}}
        hf_kw["pixel_values_videos"] = pvv
        n = model.modalities["videos"].item_tokens(ours["videos"])[0]
        assert n == video_tokens(3, anyres_geometry(model.modalities["videos"]))
        video_run = [VID] * n
    rows = [[1, 2] + [IMG] * counts[0] + [3] * 4 + [IMG] * counts[1] + [4],
            [5] + [IMG] * counts[2] + [6, 7] + [IMG] * counts[3] + [8] + video_run + [9, 10]]
    length = max(map(len, rows))
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    labels = ids.clone()
    labels[(ids == IMG) | (ids == VID) | (mask == 0)] = -100
    return dict(input_ids=ids, attention_mask=mask, **hf_kw), ours, labels


def _err(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a - b)[mask.bool()].abs().max().item()


@pytest.mark.parametrize("kind", ["next", "onevision", "video"])
@torch.no_grad()
def test_logits_loss_export_and_reimport_equal_transformers(kind, tmp_path):
    hf, cfg, model = _pair(kind)
    hf_kw, ours, labels = _batch(kind)
    ref = hf(**hf_kw, labels=labels)
    out = model(hf_kw["input_ids"], ours, attention_mask=hf_kw["attention_mask"], labels=labels)
    assert _err(out.logits, ref.logits, hf_kw["attention_mask"]) <= TOL
    assert abs(out.loss.item() - ref.loss.item()) <= TOL
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())
    # the learned newline is HF's image_newline
    torch.testing.assert_close(model.modalities["images"].item_layout.image_newline, hf.model.image_newline,
                               rtol=0, atol=0)

    out_dir = export_hf(model, cfg, tmp_path / "out")
    back, info = type(hf).from_pretrained(out_dir, output_loading_info=True)
    assert not any(info.values()), info
    again = back.eval()(**hf_kw, labels=labels)
    assert _err(again.logits, ref.logits, hf_kw["attention_mask"]) <= TOL
    assert abs(again.loss.item() - ref.loss.item()) <= TOL
    config = json.loads((out_dir / "config.json").read_text())
    assert config["architectures"] == [CLASSES[kind][1]]
    assert config["image_grid_pinpoints"] == (OV_PINS if kind == "onevision" else NEXT_PINS)
    if kind == "onevision":
        assert config["vision_aspect_ratio"] == "anyres_max_2" and config["video_token_index"] == VID
    if kind == "video":
        assert (config["spatial_pool_mode"], config["spatial_pool_stride"]) == ("average", 2)
    cfg2, model2 = import_hf(out_dir)
    assert cfg2 == cfg
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


@torch.no_grad()
def test_onevision_multi_image_samples_take_only_base_tiles():
    """A OneVision sample with several images (transformers' batch_num_images > 1) takes each image's base
    tile and a newline; ours: image_sizes rows [h, w, 0]. Row 0 holds two such images, row 1 one tiled."""
    hf, _, model = _pair("onevision")
    sizes = [(30, 70), (95, 88), (50, 50)]
    pv, image_sizes, _ = _images("onevision", sizes)
    grid = torch.cat([image_sizes, torch.tensor([[0], [0], [1]])], dim=1)
    geo = anyres_geometry(model.modalities["images"])
    tiles = torch.cat([pv[0, :1], pv[1, :1], pv[2, :anyres_tiles(50, 50, geo)]])
    ours = {"images": {"vit": {"pixel_values": tiles, "image_sizes": grid}}}
    counts = model.modalities["images"].item_tokens(ours["images"])
    assert counts == [16 + 1, 16 + 1, anyres_image_tokens(50, 50, geo)]
    assert counts[:2] == [anyres_image_tokens(h, w, geo, tiled=False) for h, w in sizes[:2]]
    rows = [[1] + [IMG] * counts[0] + [2, 3] + [IMG] * counts[1] + [4], [5] + [IMG] * counts[2] + [6]]
    length = max(map(len, rows))
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=image_sizes,
             batch_num_images=torch.tensor([2, 1]))
    out = model(ids, ours, attention_mask=mask)
    assert _err(out.logits, ref.logits, mask) <= TOL
    bad = {"vit": {"pixel_values": tiles, "image_sizes": grid * torch.tensor([1, 1, 2])}}
    with pytest.raises(InputError, match="must be 0 or 1"):
        model.modalities["images"].validate_inputs(bad, "images")


def _number_of_features(kind: str, pins, tile: int, patch: int, max_tiles: int | None = None):
    """The processor's own _get_number_of_features, on a processor built without a tokenizer (it reads only
    the image processor's pinpoints and these sizes)."""
    if kind == "onevision":
        proc = transformers.LlavaOnevisionProcessor.__new__(transformers.LlavaOnevisionProcessor)
        proc.num_image_tokens = (tile // patch) ** 2
        proc.vision_aspect_ratio = f"anyres_max_{max_tiles}"
        proc.vision_feature_select_strategy = "full"
    else:
        proc = transformers.LlavaNextProcessor.__new__(transformers.LlavaNextProcessor)
        proc.patch_size, proc.num_additional_image_tokens = patch, 1
    proc.image_processor = type("P", (), {"image_grid_pinpoints": pins})()
    minus = 0 if kind == "onevision" else 1  # the "default" strategy drops the class token
    return lambda h, w: proc._get_number_of_features(h, w, tile, tile) - minus


def test_token_and_tile_counts_equal_the_processors_and_the_released_geometry():
    """anyres_image_tokens / anyres_tiles / video_tokens, from plain geometry data, equal transformers'
    processors and image_size_to_num_patches for many sizes and aspect ratios, at the released geometries
    (LLaVA-NeXT 336/14, OneVision 384/14 anyres_max_9) and the tiny ones of the tests above."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    from mimo_spec.builders.build import build_model

    sizes = [(h, w) for h in (7, 100, 336, 500, 719, 1008, 1500, 3000) for w in (9, 200, 336, 640, 1024, 2400)]
    big_ov = [[384 * a, 384 * b] for a in range(1, 7) for b in range(1, 7)]
    next_pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    cases = [("next", next_pins, 336, 14, None), ("onevision", big_ov, 384, 14, 9),
             ("next", NEXT_PINS, 28, 7, None), ("onevision", OV_PINS, 30, 7, 2)]
    for kind, pins, tile, patch, max_tiles in cases:
        g = tile // patch
        geo = {"tile_size": tile, "patch_grid": g, "tile_tokens": g * g, "grid_pinpoints": pins, "unpad": True,
               "newline": True, "max_tiles": max_tiles, "video_grid": g, "video_downscale": None,
               "video_newline": False}
        theirs = _number_of_features(kind, pins, tile, patch, max_tiles)
        for h, w in sizes:
            assert anyres_image_tokens(h, w, geo) == theirs(h, w), (kind, tile, h, w)
            assert anyres_tiles(h, w, geo) == image_size_to_num_patches((h, w), pins, tile), (kind, tile, h, w)
    # videos: OneVision (2x2 bilinear after the projector + a newline), NeXT-Video (2x2 pooled before it)
    ov = {"video_grid": 27, "video_downscale": 2, "video_newline": True, "newline": True}
    assert video_tokens(8, ov) == 8 * 14 * 14 + 1  # LlavaOnevisionProcessor: frames * ceil(27/2)**2 + 1
    nv = {"video_grid": 24 // 2, "video_downscale": None, "video_newline": False, "newline": True}
    assert video_tokens(8, nv) == 576 // 4 * 8  # LlavaNextVideoProcessor: num_image_tokens // 4 * frames
    # the geometry read from the built models (the tiny imports) is plain, picklable data
    import pickle

    for kind in ("onevision", "video"):
        model = _pair(kind)[2]
        geo = anyres_geometry(model.modalities["videos"])
        assert pickle.loads(pickle.dumps(geo)) == geo == anyres_geometry(model.modalities["images"])
    assert anyres_geometry(_pair("onevision")[2].modalities["images"])["max_tiles"] == 2
    assert anyres_geometry(_pair("video")[2].modalities["images"])["video_grid"] == 2
    # a model with a different encoder is refused by name
    from conftest import tiny_config

    with pytest.raises(InputError, match="not anyres"):
        anyres_geometry(build_model(tiny_config(), device="meta").modalities["images"])


def test_inputs_are_checked_per_image_with_both_numbers():
    _, _, model = _pair("next")
    mod = model.modalities["images"]
    _, image_sizes, tiles = _images("next", SIZES["next"][:3])  # 4 + 5 + 5 tiles
    ok = {"vit": {"pixel_values": tiles, "image_sizes": image_sizes}}
    assert mod.validate_inputs(ok, "images") == 3
    short = {"vit": {"pixel_values": tiles[:-2], "image_sizes": image_sizes}}
    with pytest.raises(InputError, match=r"image 2 \(50x50 px\) makes 5 tiles but pixel_values holds 3 rows") as e:
        mod.validate_inputs(short, "images")
    assert "images.vit.image_sizes[2]" in str(e.value)
    extra = {"vit": {"pixel_values": torch.cat([tiles, tiles[:1]]), "image_sizes": image_sizes}}
    with pytest.raises(InputError, match="pixel_values holds 15 tiles but image_sizes makes 14"):
        mod.validate_inputs(extra, "images")
    with pytest.raises(InputError, match=r"expected .*\(tiles, 3, 28, 28\).*got \(14, 3, 32, 32\)"):
        mod.validate_inputs({"vit": {"pixel_values": torch.zeros(14, 3, 32, 32), "image_sizes": image_sizes}}, "images")
    with pytest.raises(InputError, match="integer tensor \\(N, 2\\)"):
        mod.validate_inputs({"vit": {"pixel_values": tiles, "image_sizes": image_sizes.float()}}, "images")
    with pytest.raises(InputError, match="frames"):
        mod.validate_inputs({"vit": {"pixel_values_videos": torch.zeros(2, 3, 28, 28)}}, "videos")
    videos = {"vit": mod.encoders["vit"].example_videos(2, frames=3)}
    assert mod.validate_inputs(videos, "videos") == 2 and mod.item_tokens(videos) == [3 * 16] * 2
    # example items have different sizes, and what the model counts is what it lays out
    example = mod.example_inputs(4, generator=torch.Generator().manual_seed(0))
    counts = mod.item_tokens(example)
    assert len(set(counts)) >= 3
    with torch.no_grad():
        assert mod.encode(example).shape == (sum(counts), TEXT["hidden_size"])
        # no item (a data-parallel rank's empty share): nothing comes out, and it still runs
        empty = {"vit": {"pixel_values": torch.zeros(0, 3, 28, 28), "image_sizes": torch.zeros(0, 2, dtype=torch.long)}}
        assert mod.item_tokens(empty) == [] and mod.encode(empty).shape == (0, TEXT["hidden_size"])


def test_export_refuses_layouts_transformers_cannot_compute(tmp_path):
    import copy

    from mimo_spec.builders.build import build_model

    _, cfg, _ = _pair("next")
    bad = copy.deepcopy(cfg)
    bad["modalities"]["images"]["submodules"]["item_layout"]["params"]["unpad"] = False
    with pytest.raises(ConfigError, match="always unpads"):
        export_hf(build_model(bad), bad, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@torch.no_grad()
def test_greedy_generation_cached_equals_recomputed_and_transformers():
    hf, _, model = _pair("next")
    _, image_sizes, tiles = _images("next", SIZES["next"][1:2])
    pv = _images("next", SIZES["next"][1:2])[0]
    n = model.modalities["images"].item_tokens({"vit": {"pixel_values": tiles, "image_sizes": image_sizes}})[0]
    ids = torch.tensor([[1, 2] + [IMG] * n + [3, 4, 5]])
    inputs = {"images": {"vit": {"pixel_values": tiles, "image_sizes": image_sizes}}}
    cached = generate(model, ids, inputs, max_new_tokens=8, use_cache=True)
    fresh = generate(model, ids, inputs, max_new_tokens=8, use_cache=False)
    assert cached.tokens == fresh.tokens and len(cached.tokens) == 8
    assert len(set(cached.tokens)) > 1  # not one token repeated
    theirs = hf.generate(input_ids=ids, pixel_values=pv, image_sizes=image_sizes, max_new_tokens=8, do_sample=False,
                         min_new_tokens=8, pad_token_id=0)
    assert theirs[0, ids.shape[1]:].tolist() == cached.tokens


@pytest.mark.parametrize("kind", ["onevision", "video"])
@torch.no_grad()
def test_greedy_generation_with_a_video_and_an_image_cached_equals_recomputed_and_transformers(kind):
    """OneVision and NeXT-Video: a prompt holding an image and a video (through the same tower)."""
    hf, _, model = _pair(kind)
    pv, image_sizes, tiles = _images(kind, SIZES[kind][:1])
    size = (SIGLIP if kind == "onevision" else CLIP)["image_size"]
    pvv = torch.randn(1, 2, 3, size, size, generator=torch.Generator().manual_seed(5))
    inputs = {"images": {"vit": {"pixel_values": tiles, "image_sizes": image_sizes}},
              "videos": {"vit": {"pixel_values_videos": pvv}}}
    n_img = model.modalities["images"].item_tokens(inputs["images"])[0]
    n_vid = model.modalities["videos"].item_tokens(inputs["videos"])[0]
    ids = torch.tensor([[1, 2] + [IMG] * n_img + [3] + [VID] * n_vid + [4, 5]])
    cached = generate(model, ids, inputs, max_new_tokens=6, use_cache=True)
    fresh = generate(model, ids, inputs, max_new_tokens=6, use_cache=False)
    assert cached.tokens == fresh.tokens and len(cached.tokens) == 6
    theirs = hf.generate(input_ids=ids, pixel_values=pv, image_sizes=image_sizes, pixel_values_videos=pvv,
                         max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert theirs[0, ids.shape[1]:].tolist() == cached.tokens


@pytest.mark.parametrize("family", ["llava", "next", "video"])
def test_the_head_is_tied_by_the_vlm_config_as_transformers_ties_it(family, tmp_path):
    """transformers 5 ties a LLaVA-family head by the top-level tie_word_embeddings, whatever the text config
    says (LlavaNextConfig never copies the text value up). Import follows it, in memory and from the folder
    save_pretrained writes: the same parameter count, tying and text logits; export writes it back."""
    classes = {"llava": ("LlavaConfig", "LlavaForConditionalGeneration"), **CLASSES}
    config_cls, model_cls = (getattr(transformers, n) for n in classes[family])
    extra = {} if family == "llava" else {"image_grid_pinpoints": NEXT_PINS}
    if family == "video":
        extra["video_token_index"] = VID
    ids = torch.randint(0, 240, (2, 12), generator=torch.Generator().manual_seed(0))
    for text_tie, top in ((True, None), (False, True), (True, False)):
        kw = {} if top is None else {"tie_word_embeddings": top}
        config = config_cls(vision_config=CLIP, text_config=dict(TEXT, model_type="llama", tie_word_embeddings=text_tie),
                            image_token_index=IMG, vision_feature_layer=-2, **extra, **kw)
        torch.manual_seed(0)
        hf = perturb(model_cls(config)).eval()
        tied = hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
        hf.save_pretrained(tmp_path / "hf")
        with torch.no_grad():
            want = hf(input_ids=ids).logits
        for source in (hf, tmp_path / "hf"):
            cfg, model = import_hf(source)
            assert cfg["model"]["params"]["tie_embeddings"] is tied, (text_tie, top, source)
            assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())
            with torch.no_grad():
                assert (model.eval()(ids).logits - want).abs().max().item() <= TOL
        out = export_hf(model, cfg, tmp_path / "back", overwrite=True)
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tied
