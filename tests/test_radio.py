"""The RADIO encoder (mimo_spec/components/vision/radio.py): numbers against transformers' RadioModel with
the same weights, the parameter count of Megatron-Core's RADIO-H, the training-mode CPE crops, bad inputs,
and the radio_h modality preset."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from mimo_spec.components.vision.radio import RadioViT, radio_params_from_hf, radio_state_dict_from_hf
from mimo_spec.errors import CheckpointError, InputError, ParamError

transformers = pytest.importorskip("transformers")
from transformers import RadioConfig, RadioModel  # noqa: E402

ATOL = 1e-5


def hf_radio(seed=0, **overrides) -> RadioModel:
    """A tiny transformers RADIO (patch 4, an 8 x 8 position table, 2 class + 3 register tokens) with random
    weights, LayerScale away from 1.0 so the fold on import is exercised, and the input conditioner
    detached (both sides take normalised pixels)."""
    torch.manual_seed(seed)
    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=4, image_size=16,
              max_img_size=32, num_cls_tokens=2, num_registers=3)
    hf = RadioModel(RadioConfig(**{**kw, **overrides})).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lambda1" in name:
                p.copy_(torch.rand_like(p) + 0.5)
            elif "bias" in name or "norm" in name:  # non-trivial biases and norm affines
                p.add_(torch.randn_like(p) * 0.1)
    hf.make_preprocessor_external()
    return hf


def ours_from(hf: RadioModel, *, layer_scale: bool = False, **params) -> RadioViT:
    kw = radio_params_from_hf(hf.config)
    if layer_scale:
        kw["layer_scale"] = 1.0
    model = RadioViT(**{**kw, **params}).eval()
    model.load_state_dict(radio_state_dict_from_hf(hf.state_dict(), layer_scale=layer_scale), strict=True)
    return model


def pixels(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (2, 3, 12, 20), (1, 3, 32, 32), (1, 3, 44, 36)],
                         ids=["square", "non_square", "max_grid", "beyond_max_grid"])
def test_matches_transformers_radio(shape):
    hf = hf_radio()
    ours = ours_from(hf)
    ours_all = ours_from(hf, feature_select="all")
    x = pixels(shape)
    with torch.no_grad():
        ref = hf(x)
        patch, full = ours(x), ours_all(x)
    rows, cols = shape[2] // 4, shape[3] // 4
    assert full.shape == ref.last_hidden_state.shape == (shape[0], 5 + rows * cols, 32)
    torch.testing.assert_close(full, ref.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(patch, ref.features, atol=ATOL, rtol=0)
    assert ours.tokens_per_item(shape) == rows * cols == patch.shape[1]
    assert ours_all.tokens_per_item(shape) == rows * cols + 5


def test_matches_transformers_radio_video_temporal_patch():
    hf = hf_radio(video_temporal_patch_size=2)
    ours = ours_from(hf, feature_select="all")
    assert ours.video_patch_embed.weight.shape == (32, 2 * 3 * 4 * 4)
    frames = pixels((2, 2, 3, 8, 12))  # (N, T, C, H, W)
    image = pixels((2, 3, 8, 12), seed=2)
    with torch.no_grad():
        ref_video = hf(frames.flatten(1, 2)).last_hidden_state  # transformers stacks the frames on the channels
        ref_image = hf(image).last_hidden_state
        torch.testing.assert_close(ours(frames.flatten(1, 2)), ref_video, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours(frames), ref_video, atol=ATOL, rtol=0)  # the 5-D form is the same items
        torch.testing.assert_close(ours(image), ref_image, atol=ATOL, rtol=0)
    assert not torch.allclose(ref_video, ref_image[:, :, :], atol=1e-3)


def test_matches_transformers_swiglu_with_layer_scale_kept():
    hf = hf_radio(use_swiglu_ffn=True, mlp_ratio=4.0)
    ours = ours_from(hf, layer_scale=True)
    assert ours.layers[0].mlp.ffn_hidden_size == hf.encoder.layer[0].mlp.gate_proj.out_features == 88
    # LayerScale kept as parameters: exactly HF's parameter count (HF's buffers are not weights)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    torch.testing.assert_close(ours.layers[1].mlp_scale, hf.encoder.layer[1].layer_scale2.lambda1)
    x = pixels((2, 3, 12, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).features, atol=ATOL, rtol=0)


def megatron_radio_h_parameters() -> int:
    """Megatron-Core's RADIO-H (examples/multimodal/config.py "radio", llava_model.py): hidden 1280, 32
    layers, 16 heads, ffn 5120, biased linears, LayerNorm, patch 16, max 2048 px, 8 class tokens, no
    embedder bias, no ln_pre / ln_post / final norm, counted from RADIOViTModel's own tensors."""
    h, layers, ffn, patch, max_img, cls = 1280, 32, 5120, 16, 2048, 8
    embedder = 3 * patch * patch * h
    class_token = cls * h
    position_embeddings = (max_img // patch) ** 2 * h
    per_layer = (2 * h            # input_layernorm
                 + 3 * h * h + 3 * h  # linear_qkv
                 + h * h + h      # linear_proj
                 + 2 * h          # pre_mlp_layernorm
                 + h * ffn + ffn  # linear_fc1
                 + ffn * h + h)   # linear_fc2
    return embedder + class_token + position_embeddings + layers * per_layer


def test_parameter_count_equals_megatron_radio_h_and_hf_differs_by_layerscale_and_registers():
    from mimo_spec.builders.build import build_model
    from mimo_spec.config import compose_config

    model = build_model(compose_config(["modality=[radio_h]"]), device="meta")
    enc = model.modalities["images"].encoders["radio"]
    assert isinstance(enc, RadioViT)
    assert sum(p.numel() for p in enc.parameters()) == megatron_radio_h_parameters() == 651_642_880
    assert enc.tokens_per_item((1, 3, 512, 512)) == 1024

    # transformers' C-RADIOv4-H (its RadioConfig defaults): 3 + 7 prefix tokens and a LayerScale pair per block
    with torch.device("meta"):
        hf = RadioModel(RadioConfig())
        ours = RadioViT(**radio_params_from_hf(hf.config))
    hf_count = sum(p.numel() for p in hf.parameters())
    ours_count = sum(p.numel() for p in ours.parameters())
    assert hf_count - ours_count == 32 * 2 * 1280
    assert ours_count - megatron_radio_h_parameters() == (10 - 8) * 1280


def ramp_encoder(**kw) -> RadioViT:
    """A tiny encoder whose position table is channel 0 = row, channel 1 = column (a linear ramp, so any
    bilinear resampling of it reads back the exact sampled coordinates)."""
    enc = RadioViT(hidden_size=8, num_layers=1, num_heads=2, ffn_hidden_size=16, patch_size=4, image_size=16,
                   max_img_size=64, class_token_len=2, **kw)
    g = enc.max_grid
    rows, cols = torch.meshgrid(torch.arange(g, dtype=torch.float32), torch.arange(g, dtype=torch.float32),
                                indexing="ij")
    with torch.no_grad():
        enc.pos_embed.zero_()
        enc.pos_embed[:, 0] = rows.flatten()
        enc.pos_embed[:, 1] = cols.flatten()
    return enc


def test_training_mode_takes_a_random_crop_of_the_position_table():
    enc = ramp_encoder().train()
    g, rows, cols, batch = enc.max_grid, 6, 10, 16
    torch.manual_seed(0)
    pos = enc.position_embeddings(rows, cols, batch).detach()
    assert pos.shape == (batch, rows * cols, 8)
    r = pos[..., 0].reshape(batch, rows, cols)
    c = pos[..., 1].reshape(batch, rows, cols)
    # each item reads an axis-aligned window: row coordinate constant along a row, evenly spaced down
    torch.testing.assert_close(r, r[:, :, :1].expand_as(r), atol=1e-4, rtol=0)
    torch.testing.assert_close(c, c[:, :1, :].expand_as(c), atol=1e-4, rtol=0)
    spans = []
    for coord in (r[:, :, 0], c[:, 0, :]):
        steps = coord.diff(dim=1)
        torch.testing.assert_close(steps, steps[:, :1].expand_as(steps), atol=1e-4, rtol=0)
        assert (coord >= -1e-4).all() and (coord <= g - 1 + 1e-4).all()  # inside the table, no zero padding
        span = (coord[:, -1] - coord[:, 0]) / (g - 1)  # fraction of the table the crop covers
        assert (span >= math.sqrt(0.1) * 3 / 4 - 1e-4).all() and (span <= 1 + 1e-4).all()
        spans.append(span)
    aspect = spans[1] / spans[0]  # width / height of the crop: within [3/4, 4/3]^2 and not always square
    assert (aspect >= 9 / 16 - 1e-3).all() and (aspect <= 16 / 9 + 1e-3).all() and aspect.std() > 0.05
    # items get different crops, and a new draw differs
    assert len({round(v, 3) for v in r[:, 0, 0].tolist()}) > batch // 2
    assert not torch.allclose(enc.position_embeddings(rows, cols, batch), pos)
    # eval: deterministic, one shared table, the top-left window of the table resized to max(rows, cols)^2
    enc.eval()
    ev = enc.position_embeddings(rows, cols, batch)
    assert ev.shape == (1, rows * cols, 8)
    torch.testing.assert_close(ev, enc.position_embeddings(rows, cols, batch))
    side = max(rows, cols)
    expect_cols = (torch.arange(cols) + 0.5) * g / side - 0.5  # bilinear, align_corners=False, to side x side
    torch.testing.assert_close(ev[0, :cols, 1], expect_cols.clamp(0, g - 1), atol=1e-4, rtol=0)
    torch.testing.assert_close(ev[0, ::cols, 0], expect_cols[:rows].clamp(0, g - 1), atol=1e-4, rtol=0)


def test_training_crop_changes_features_but_not_shapes():
    enc = ramp_encoder()
    x = pixels((3, 3, 8, 12))
    enc.eval()
    with torch.no_grad():
        ev = enc(x)
    enc.train()
    torch.manual_seed(0)
    tr = enc(x)
    assert tr.shape == ev.shape == (3, 6, 8)
    assert not torch.allclose(tr, ev, atol=1e-3)
    tr.square().mean().backward()  # the crop is differentiable: the table learns
    assert enc.pos_embed.grad is not None and enc.pos_embed.grad.abs().sum() > 0
    # at the full table size there is nothing to crop (as Megatron), and cpe_random_crop: false is eval's crop
    full = pixels((2, 3, 64, 64))
    with torch.no_grad():
        torch.testing.assert_close(enc(full), enc.eval()(full))
        fixed = ramp_encoder(cpe_random_crop=False)
        fixed.load_state_dict(enc.state_dict())
        fixed.train()
        torch.testing.assert_close(fixed(x), ev)


def test_shared_video_embedder_sees_an_image_as_equal_frames():
    """Megatron's default video layout: one projection over T frames; an image is its patch repeated T times."""
    torch.manual_seed(0)
    enc = RadioViT(hidden_size=16, num_layers=1, num_heads=2, ffn_hidden_size=32, patch_size=4, image_size=8,
                   max_img_size=32, class_token_len=3, video_temporal_patch_size=3,
                   separate_video_embedder=False).eval()
    assert enc.video_patch_embed is None and enc.patch_embed.in_features == 3 * 3 * 4 * 4
    image = pixels((2, 3, 8, 16))
    with torch.no_grad():
        as_image = enc(image)
        as_video = enc(image[:, None].expand(-1, 3, -1, -1, -1))
        other = enc(pixels((2, 3, 3, 8, 16), seed=5))
    torch.testing.assert_close(as_image, as_video, atol=1e-6, rtol=0)
    assert as_image.shape == other.shape == (2, 8, 16) and not torch.allclose(as_image, other, atol=1e-3)


def test_bad_inputs_name_the_numbers():
    enc = RadioViT(hidden_size=16, num_layers=1, num_heads=2, ffn_hidden_size=32, patch_size=8, image_size=16,
                   max_img_size=64, class_token_len=2, video_temporal_patch_size=2)
    enc.validate_inputs({"pixel_values": pixels((2, 3, 16, 24))}, "modality_inputs.images.radio")
    enc.validate_inputs({"pixel_values": pixels((2, 6, 16, 24))}, "m")
    enc.validate_inputs({"pixel_values": pixels((2, 2, 3, 16, 24))}, "m")
    with pytest.raises(InputError, match=r"width 20 is not a multiple of patch_size 8") as e:
        enc.validate_inputs({"pixel_values": pixels((2, 3, 16, 20))}, "modality_inputs.images.radio")
    assert "modality_inputs.images.radio.pixel_values" in str(e.value)
    with pytest.raises(InputError, match=r"height 4 is not a multiple of patch_size 8"):
        enc.validate_inputs({"pixel_values": pixels((1, 3, 4, 16))}, "m")
    with pytest.raises(InputError, match=r"height 20 is not a multiple of patch_size 8"):
        enc(pixels((1, 3, 20, 16)))  # forward refuses too
    with pytest.raises(InputError, match=r"got 4 channels, expected 3 \(an image\) or 6"):
        enc.validate_inputs({"pixel_values": pixels((1, 4, 16, 16))}, "m")
    with pytest.raises(InputError, match=r"must be \(N, 2, 3, H, W\)"):
        enc.validate_inputs({"pixel_values": pixels((1, 3, 3, 16, 16))}, "m")
    with pytest.raises(InputError, match="floating-point"):
        enc.validate_inputs({"pixel_values": torch.zeros(1, 3, 16, 16, dtype=torch.uint8)}, "m")
    images_only = RadioViT(hidden_size=16, num_layers=1, num_heads=2, ffn_hidden_size=32, patch_size=8)
    with pytest.raises(InputError, match="no video_temporal_patch_size"):
        images_only.validate_inputs({"pixel_values": pixels((1, 2, 3, 16, 16))}, "m")
    with pytest.raises(InputError, match=r"got 6 channels, expected 3 \(images"):
        images_only(pixels((1, 6, 16, 16)))


def test_bad_params():
    base = dict(hidden_size=16, num_layers=1, num_heads=2, ffn_hidden_size=32)
    with pytest.raises(ParamError, match=r"image_size \(20\) must be a multiple of patch_size \(16\)"):
        RadioViT(**base, image_size=20)
    with pytest.raises(ParamError, match="video_temporal_patch_size"):
        RadioViT(**base, video_temporal_patch_size=1)
    with pytest.raises(ParamError, match="class_token_len"):
        RadioViT(**base, class_token_len=-1)
    with pytest.raises(ParamError, match="divisible by num_heads"):
        RadioViT(**{**base, "num_heads": 3})


def test_hf_state_dict_mapping_refuses_foreign_tensors():
    hf = hf_radio()
    sd = dict(hf.state_dict())
    sd["encoder.layer.0.attention.rotary.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="rotary"):
        radio_state_dict_from_hf(sd)
    prefixed = {"vision_model." + k: v for k, v in hf.state_dict().items()}
    prefixed["language_model.embed.weight"] = torch.zeros(1)  # outside the prefix: skipped
    assert radio_state_dict_from_hf(prefixed, prefix="vision_model.").keys() == \
        radio_state_dict_from_hf(hf.state_dict()).keys()
    del sd["encoder.layer.0.attention.rotary.weight"], sd["embeddings.cls_register_token"]
    with pytest.raises(CheckpointError, match="cls_register_token"):
        radio_state_dict_from_hf(sd)


def test_radio_h_preset_lists_every_parameter_and_runs_small():
    from omegaconf import OmegaConf

    from mimo_spec.builders.build import build_model
    from mimo_spec.config import compose_config
    from mimo_spec.components.projectors import MLPProjector

    cfg = compose_config(["modality=[radio_h]"])
    node = OmegaConf.to_container(cfg.modalities.images, resolve=True)
    listed = set(node["submodules"]["encoders"]["radio"]["params"])
    accepted = set(inspect.signature(RadioViT.__init__).parameters) - {"self", "backend"}
    assert listed == accepted  # backend stays with the config's top-level switch
    proj = node["submodules"]["input_projections"]["radio"]["params"]
    assert set(proj) == set(inspect.signature(MLPProjector.__init__).parameters) - {"self"}
    assert proj["out_features"] == cfg.model.params.hidden_size and proj["in_features"] == 1280

    p = "modalities.images.submodules.encoders.radio.params"
    small = compose_config(["modality=[radio_h]", f"{p}.hidden_size=32", f"{p}.num_layers=1", f"{p}.num_heads=2",
                            f"{p}.ffn_hidden_size=64", f"{p}.image_size=32", f"{p}.max_img_size=64"])
    model = build_model(small, seed=0)
    images = model.modalities["images"]
    inputs = images.example_inputs(2)
    assert images.tokens_per_item(inputs) == 4
    batch = model.example_inputs(2)
    out = model(**batch)
    assert torch.isfinite(out.loss if hasattr(out, "loss") else out["loss"])


def test_without_cpe_the_table_is_windowed_not_resized():
    """has_cpe: false (Megatron's has_cpe=False): the top-left rows x cols of the table, resized only when
    the grid is larger than the table; the same in training."""
    enc = ramp_encoder(has_cpe=False).train()
    pos = enc.position_embeddings(3, 5, batch=4)
    assert pos.shape == (1, 15, 8)
    torch.testing.assert_close(pos[0, :, 0], torch.arange(3.0).repeat_interleave(5))
    torch.testing.assert_close(pos[0, :, 1], torch.arange(5.0).repeat(3))
    big = enc.position_embeddings(20, 16)  # the table is 16 x 16: its 16 rows stretched to 20
    assert big.shape == (1, 320, 8)
    assert big[0, ::16, 0].max() <= 15 + 1e-5 and big[0, -1, 0] > 14


def test_a_frozen_encoder_runs_as_at_inference_in_training_mode():
    """A frozen RADIO tower (freeze: [modalities.*.encoders.*], as train=llava_stage1 / stage2) in a model put in
    training mode gives the features inference gives, every step: no random CPE crop (Megatron's force_eval_mode
    for a frozen ViT). Unfrozen, the same model still crops (so the check can fail), and its mode is kept."""
    from mimo_spec.builders.build import build_model
    from mimo_spec.config import compose_config

    p = "modalities.images.submodules.encoders.radio.params"
    small = ["modality=[radio_h]", f"{p}.hidden_size=32", f"{p}.num_layers=1", f"{p}.num_heads=2",
             f"{p}.ffn_hidden_size=64", f"{p}.image_size=32", f"{p}.max_img_size=64"]
    x = {"radio": {"pixel_values": pixels((2, 3, 32, 32))}}
    for frozen in (True, False):
        model = build_model(compose_config(small + (["freeze=[modalities.*.encoders.*]"] if frozen else [])), seed=0)
        images = model.modalities["images"]
        with torch.no_grad():
            at_inference = images.eval().encode(x)
            model.train()
            torch.manual_seed(0)
            first, second = images.encode(x), images.encode(x)
        assert images.encoders["radio"].training  # the encoder's own mode is left as the model set it
        if frozen:
            assert torch.equal(first, at_inference) and torch.equal(second, at_inference)
        else:
            assert (first - at_inference).abs().max() > 1e-3 and (first - second).abs().max() > 1e-3


def _naflex(images, patch, rows):
    """Images (C, H, W) -> NaFlex inputs as SigLIP2's processor lays them out: each patch (p, p, C), row-major,
    padded to ``rows``."""
    xs, masks, shapes = [], [], []
    for img in images:
        c, h, w = img.shape
        gh, gw = h // patch, w // patch
        x = img.reshape(c, gh, patch, gw, patch).permute(1, 3, 2, 4, 0).reshape(gh * gw, patch * patch * c)
        xs.append(torch.cat([x, x.new_zeros(rows - gh * gw, x.shape[1])]))
        masks.append(torch.arange(rows) < gh * gw)
        shapes.append((gh, gw))
    return {"pixel_values": torch.stack(xs), "pixel_attention_mask": torch.stack(masks).int(),
            "spatial_shapes": torch.tensor(shapes)}


@pytest.mark.parametrize("feature_select", ["patch", "all"])
def test_images_at_their_own_sizes_equal_each_image_alone(feature_select):
    """With max_num_patches, images of different sizes in one call (NaFlex inputs, padded) give, per image,
    exactly what that image alone gives as an (1, C, H, W) batch: its own CPE crop, class tokens and attention
    kept inside it; the output is flat, image after image (class tokens first under "all")."""
    torch.manual_seed(0)
    enc = RadioViT(hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=48, patch_size=4, image_size=16,
                   max_img_size=32, class_token_len=3, feature_select=feature_select, max_num_patches=40,
                   pre_norm=True, patch_bias=True).eval()
    with torch.no_grad():
        for p_ in enc.parameters():
            p_.add_(torch.randn_like(p_) * 0.05)
    images = [pixels((3, 12, 20), seed=1), pixels((3, 28, 4), seed=2), pixels((3, 16, 16), seed=3),
              pixels((3, 40, 16), seed=4)]  # 40 patches: the budget, a grid past the 8 x 8 table
    inputs = _naflex(images, 4, 40)
    enc.validate_inputs(inputs, "images.radio")
    prefix = 3 if feature_select == "all" else 0
    assert enc.item_tokens(inputs) == [15 + prefix, 7 + prefix, 16 + prefix, 40 + prefix]
    with torch.no_grad():
        out = enc(**inputs)
        want = torch.cat([enc(img[None])[0] for img in images])
    assert out.shape == (78 + 4 * prefix, 32)
    torch.testing.assert_close(out, want, atol=ATOL, rtol=ATOL)
    # training: one random crop per image, differentiable
    enc.train()
    torch.manual_seed(0)
    trained = enc(**inputs)
    assert not torch.allclose(trained, want, atol=1e-3)
    trained.square().mean().backward()
    assert enc.pos_embed.grad.abs().sum() > 0
    # bad inputs name the image and both numbers; spatial_shapes on an encoder of one size is refused
    bad = dict(inputs, spatial_shapes=torch.tensor([[3, 5], [7, 1], [4, 4], [9, 5]]))
    with pytest.raises(InputError, match=r"image 3's grid \(9, 5\) makes 45 patches but pixel_values holds 40"):
        enc.validate_inputs(bad, "images.radio")
    with pytest.raises(InputError, match="max_num_patches"):
        RadioViT(hidden_size=32, num_layers=1, num_heads=4, ffn_hidden_size=48, patch_size=4, image_size=16,
                 max_img_size=32)(**inputs)
    with pytest.raises(ParamError, match="max_num_patches"):
        RadioViT(hidden_size=32, num_layers=1, num_heads=4, ffn_hidden_size=48, max_num_patches=0)


def test_radio_images_keep_their_sizes_through_the_data_path(tmp_path):
    """modality=[radio_h] with max_num_patches: llava_json images of different sizes and aspect ratios come out
    as transformers' SigLIP2 processor makes them (with CLIP's mean / std, RADIO's conditioner, not SigLIP's
    0.5), one placeholder run of h*w per image, and a tiny model trains on them."""
    import json

    import numpy as np
    from PIL import Image
    from transformers import Siglip2ImageProcessorPil

    from mimo_spec.config import compose_config
    from mimo_spec.data import build_dataset
    from mimo_spec.data.batch import collate
    from mimo_spec.data.preprocess import CLIP_MEAN, CLIP_STD
    from mimo_spec.data.tokenizer import build_tokenizer
    from mimo_spec.builders.build import build_model
    from mimo_spec.train.loop import train

    rng = np.random.default_rng(0)
    sizes = [(64, 32), (48, 96), (20, 20)]  # (w, h): wide, tall, small (grown to the budget)
    for k, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{k}.png")
    records = [{"id": "a", "images": ["0.png", "1.png"], "conversations": [
        {"from": "human", "value": "<image> and <image>?"}, {"from": "gpt", "value": "Two."}]},
        {"id": "b", "image": "2.png", "conversations": [{"from": "human", "value": "<image> what?"},
                                                        {"from": "gpt", "value": "Noise."}]}] * 2
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    e = "modalities.images.submodules.encoders.radio.params."
    overrides = ["modality=[radio_h]", "modalities.images.params.special_token_id=1000", f"{e}hidden_size=32",
                 f"{e}num_layers=1", f"{e}num_heads=2", f"{e}ffn_hidden_size=64", f"{e}patch_size=8",
                 f"{e}image_size=32", f"{e}max_img_size=64", f"{e}max_num_patches=24",
                 "data=llava_json", f"data.path={tmp_path / 'data.jsonl'}", "data.eval_fraction=0",
                 "data.max_seq_len=256", "data.packing=false", "train.batch_size=2", "train.steps=2",
                 "train.log_every=1", "train.eval_every=0", "train.checkpoint.every=0"]
    cfg = compose_config(overrides)
    model = build_model(cfg, seed=0)
    ds = build_dataset(cfg.data, model, build_tokenizer(cfg.data, model), "train")
    proc = Siglip2ImageProcessorPil(patch_size=8, max_num_patches=24, image_mean=list(CLIP_MEAN),
                                    image_std=list(CLIP_STD))
    sample = ds[0]
    got = sample["items"]["images"]["radio"]
    want = [proc(images=Image.open(tmp_path / f"{k}.png").convert("RGB"), return_tensors="pt") for k in (0, 1)]
    for key in ("pixel_values", "spatial_shapes"):
        assert torch.equal(got[key], torch.cat([w[key] for w in want]).to(got[key].dtype)), key
    grids = [tuple(w["spatial_shapes"][0].tolist()) for w in want]
    assert grids[0] != grids[1] and grids[0][1] > grids[0][0] and grids[1][0] > grids[1][1]  # aspect kept
    ids = sample["input_ids"].tolist()
    runs = [len(list(g)) for k, g in __import__("itertools").groupby(ids) if k == 1000]
    assert runs == [h * w for h, w in grids]
    batch = collate([ds[0], ds[1]], 0)
    out = model(**{k: v for k, v in batch.items() if k in ("input_ids", "labels", "modality_inputs")})
    assert torch.isfinite(out.loss)
    result = train(cfg, tmp_path / "run")
    assert result["status"] == "completed" and result["steps"] == 2
