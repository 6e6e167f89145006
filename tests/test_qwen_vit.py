"""The Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision towers (``qwen_vit`` + ``patch_merger``) against transformers.

Tiny towers with random, perturbed weights (norms and biases away from 1 and 0), fp32, CPU; the weights
go through ``interop.hf_qwen_vision`` and the outputs must agree within 1e-5 on items of different
sizes and aspect ratios packed in one call, and on a video.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mimo_spec.components.vision.qwen_vit import PatchMerger, QwenViT  # noqa: E402
from mimo_spec.errors import InputError, ParamError  # noqa: E402
from mimo_spec.interop.hf_qwen_vision import (  # noqa: E402
    deepstack_merger_params,
    vision_config_to_hf,
    vision_params_from_hf,
    vision_state_dict_from_hf,
    vision_state_dict_to_hf,
)

TOL = 1e-5
M = transformers.models
HF_CLASSES = {
    "qwen2_vl": M.qwen2_vl.modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel,
    "qwen2_5_vl": M.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel,
    "qwen3_vl": M.qwen3_vl.modeling_qwen3_vl.Qwen3VLVisionModel,
}
KINDS = list(HF_CLASSES)

# Three images of different sizes and aspect ratios (in patches), and a video of 2 temporal patches.
IMAGES = torch.tensor([[1, 6, 10], [1, 4, 4], [1, 8, 2]])
VIDEO = torch.tensor([[2, 4, 6]])


def tiny_config(kind: str):
    """patch_size 2, merge 2, head_dim 16. Qwen2.5: windows of 8 px = 2x2 merge units, so a 6x10 image
    has 6 windows (some cut at the edge) and layer 1 attends over whole frames. Qwen3: a 4x4 position
    table resized to every grid, DeepStack after layers 0 and 2."""
    if kind == "qwen2_vl":
        return transformers.Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=48, mlp_ratio=2, num_heads=2,
                                                patch_size=2)
    if kind == "qwen2_5_vl":
        return transformers.Qwen2_5_VLVisionConfig(depth=3, hidden_size=32, intermediate_size=40, num_heads=2,
                                                   patch_size=2, window_size=8, fullatt_block_indexes=[1],
                                                   out_hidden_size=48)
    return transformers.Qwen3VLVisionConfig(depth=3, hidden_size=32, intermediate_size=40, num_heads=2, patch_size=2,
                                            num_position_embeddings=16, deepstack_visual_indexes=[0, 2],
                                            out_hidden_size=48)


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _pair(kind: str):
    """(HF vision model, our encoder, our merger, our DeepStack mergers), the same weights."""
    torch.manual_seed(0)
    config = tiny_config(kind)
    hf = _perturb(HF_CLASSES[kind](config))
    enc_params, merger_params = vision_params_from_hf(config)
    encoder, merger = QwenViT(**enc_params).eval(), PatchMerger(**merger_params).eval()
    enc_sd, merger_sd, deep_sds = vision_state_dict_from_hf(hf.state_dict())
    encoder.load_state_dict(enc_sd, strict=True)
    merger.load_state_dict(merger_sd, strict=True)
    deep = [PatchMerger(**deepstack_merger_params(merger_params)).eval() for _ in deep_sds]
    for m, sd in zip(deep, deep_sds):
        m.load_state_dict(sd, strict=True)
    return hf, encoder, merger, deep


def _pixels(encoder: QwenViT, grid: torch.Tensor, seed: int = 0) -> torch.Tensor:
    rows = int(grid.prod(-1).sum())
    return torch.randn(rows, encoder.patch_dim, generator=torch.Generator().manual_seed(seed))


def _ours(encoder, merger, deep, inputs):
    out = encoder(**inputs)
    features, stack = out if isinstance(out, tuple) else (out, [])
    return merger(features), [m(f) for m, f in zip(deep, stack)], features


@pytest.mark.parametrize("kind", KINDS)
def test_matches_transformers_on_mixed_images_and_a_video(kind):
    hf, encoder, merger, deep = _pair(kind)
    for grid_name, pixel_name, grid in (("image_grid_thw", "pixel_values", IMAGES),
                                        ("video_grid_thw", "pixel_values_videos", VIDEO)):
        x = _pixels(encoder, grid)
        inputs = {pixel_name: x, grid_name: grid}
        encoder.validate_inputs(inputs, "images")
        with torch.no_grad():
            ref = hf(hidden_states=x, grid_thw=grid)
            merged, stack, features = _ours(encoder, merger, deep, inputs)
        assert features.shape == (sum(encoder.item_tokens(inputs)), encoder.hidden_size)
        assert encoder.item_tokens(inputs) == [int(t * h * w) for t, h, w in grid]
        assert merged.shape == ref.pooler_output.shape
        assert (merged - ref.pooler_output).abs().max().item() < TOL
        if kind == "qwen3_vl":
            assert len(stack) == len(ref.deepstack_features) == 2
            for ours, theirs in zip(stack, ref.deepstack_features):
                assert (ours - theirs).abs().max().item() < TOL
        else:
            assert not isinstance(encoder(**inputs), tuple)


def test_window_attention_is_active_and_full_attention_layers_are_not_windowed():
    hf, encoder, merger, _ = _pair("qwen2_5_vl")
    x = _pixels(encoder, IMAGES)
    with torch.no_grad():
        ref = hf(hidden_states=x, grid_thw=IMAGES).pooler_output
        for changed in ({"window_size": None, "fullatt_layers": None}, {"fullatt_layers": [0, 1, 2]},
                        {"fullatt_layers": []}):
            params = dict(vision_params_from_hf(tiny_config("qwen2_5_vl"))[0], **changed)
            other = QwenViT(**params).eval()
            other.load_state_dict(encoder.state_dict())
            # Without windows, or windows everywhere, or nowhere: clearly different numbers.
            assert (merger(other(pixel_values=x, image_grid_thw=IMAGES)) - ref).abs().max().item() > 1e-3


def test_frames_of_a_video_attend_within_the_frame_as_transformers_does():
    _, encoder, _, _ = _pair("qwen2_vl")
    video = _pixels(encoder, VIDEO)
    with torch.no_grad():
        both = encoder(pixel_values_videos=video, video_grid_thw=VIDEO)
        first = encoder(pixel_values=video[:24], image_grid_thw=torch.tensor([[1, 4, 6]]))
    assert (both[:24] - first).abs().max().item() < TOL


def test_items_do_not_see_each_other():
    _, encoder, merger, _ = _pair("qwen3_vl")
    x = _pixels(encoder, IMAGES)
    with torch.no_grad():
        packed = merger(encoder(pixel_values=x, image_grid_thw=IMAGES)[0])
        alone = merger(encoder(pixel_values=x[60:76], image_grid_thw=IMAGES[1:2])[0])
    assert (packed[15:19] - alone).abs().max().item() < TOL


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_weight(kind):
    _, encoder, merger, deep = _pair(kind)
    encoder.train()
    x = _pixels(encoder, IMAGES)
    merged, stack, _ = _ours(encoder, merger, deep, {"pixel_values": x, "image_grid_thw": IMAGES})
    loss = merged.square().mean() + sum(f.square().mean() for f in stack)
    loss.backward()
    for module in (encoder, merger, *deep):
        for name, p in module.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", KINDS)
def test_key_mapping_round_trips(kind):
    hf, encoder, _, _ = _pair(kind)
    hf_sd = {f"model.visual.{k}": v for k, v in hf.state_dict().items()}
    hf_sd["model.language_model.embed_tokens.weight"] = torch.zeros(2, 2)  # outside the prefix: ignored
    enc_sd, merger_sd, deep_sds = vision_state_dict_from_hf(hf_sd, prefix="model.visual.")
    found = vision_state_dict_from_hf(hf_sd)  # the prefix found from the keys
    assert all(torch.equal(found[0][k], v) for k, v in enc_sd.items()) and len(found[2]) == len(deep_sds)
    assert set(enc_sd) == set(encoder.state_dict())
    assert len(deep_sds) == (2 if kind == "qwen3_vl" else 0)
    params = vision_params_from_hf(tiny_config(kind))[0]
    back = vision_state_dict_to_hf(enc_sd, merger_sd, deep_sds, encoder_params=params, prefix="model.visual.")
    want = {k: v for k, v in hf_sd.items() if k.startswith("model.visual.")}
    assert set(back) == set(want)
    for k, v in want.items():
        assert back[k].shape == v.shape and torch.equal(back[k], v), k


@pytest.mark.parametrize("kind", KINDS)
def test_config_round_trips(kind):
    config = tiny_config(kind)
    enc_params, merger_params = vision_params_from_hf(config)
    kwargs = vision_config_to_hf(enc_params, merger_params)
    assert kwargs.pop("model_type") == config.model_type
    rebuilt = type(config)(**kwargs)
    assert vision_params_from_hf(rebuilt) == (enc_params, merger_params)


def test_a_missing_tensor_is_named():
    hf, _, _, _ = _pair("qwen2_5_vl")
    sd = dict(hf.state_dict())
    del sd["blocks.1.mlp.up_proj.bias"]
    with pytest.raises(KeyError, match="blocks.1.mlp.up_proj.bias"):
        vision_state_dict_from_hf(sd)


@pytest.mark.parametrize("kind", KINDS)
def test_example_inputs_have_items_of_different_sizes_and_run(kind):
    _, encoder, merger, _ = _pair(kind)
    inputs = encoder.example_inputs(3, torch.Generator().manual_seed(0))
    encoder.validate_inputs(inputs, "m")
    sizes = encoder.item_tokens(inputs)
    assert len(set(sizes)) > 1
    assert encoder.rows_per_item("image_grid_thw", inputs["image_grid_thw"]) == sizes
    out = encoder(**inputs)
    features = out[0] if isinstance(out, tuple) else out
    assert features.shape[0] == sum(sizes)
    assert merger(features).shape[0] == sum(merger.tokens_out(n) for n in sizes)


def _bad(encoder: QwenViT, inputs: dict, *needles: str):
    with pytest.raises(InputError) as err:
        encoder.validate_inputs(inputs, "modality_inputs.images")
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    return str(err.value)


def test_bad_inputs_name_the_item_and_both_numbers():
    _, encoder, _, _ = _pair("qwen2_vl")
    x = _pixels(encoder, IMAGES)
    # a grid whose height is not a multiple of spatial_merge_size
    _bad(encoder, {"pixel_values": x[:60 + 12], "image_grid_thw": torch.tensor([[1, 6, 10], [1, 3, 4]])},
         "image 1's grid (1, 3, 4)", "height 3", "spatial_merge_size 2", "image_grid_thw[1]")
    # too few rows: the item left short is named, with its patch count and the rows it got
    _bad(encoder, {"pixel_values": x[:90], "image_grid_thw": IMAGES},
         "image 2's grid (1, 8, 2) makes 16 patches but pixel_values holds 14 rows for it")
    # too many rows
    _bad(encoder, {"pixel_values": torch.cat((x, x[:5])), "image_grid_thw": IMAGES},
         "pixel_values holds 97 rows but image_grid_thw makes 92 patches")
    video = _pixels(encoder, VIDEO)
    _bad(encoder, {"pixel_values_videos": video[:40], "video_grid_thw": VIDEO},
         "video 0's grid (2, 4, 6) makes 48 patches but pixel_values_videos holds 40 rows")
    # wrong patch width, a float grid, a grid of the wrong shape, both grids, a missing pixel input
    _bad(encoder, {"pixel_values": x[:, :10], "image_grid_thw": IMAGES}, "(patches, 24)", "(92, 10)")
    _bad(encoder, {"pixel_values": x, "image_grid_thw": IMAGES.float()}, "integer tensor (N, 3)")
    _bad(encoder, {"pixel_values": x, "image_grid_thw": IMAGES[:, :2]}, "integer tensor (N, 3)")
    _bad(encoder, {"pixel_values": x, "image_grid_thw": IMAGES, "video_grid_thw": VIDEO}, "one grid input")
    _bad(encoder, {"image_grid_thw": IMAGES}, "missing input 'pixel_values'")
    _bad(encoder, {"pixel_values": x, "image_grid_thw": IMAGES, "pixel_values_videos": x}, "unexpected input")
    _bad(encoder, {"pixel_values": x, "image_grid_thw": torch.tensor([[0, 2, 2]])}, "image 0's grid (0, 2, 2)")
    # no item at all is valid (a batch without images), and runs
    empty = {"pixel_values": x[:0], "image_grid_thw": IMAGES[:0]}
    encoder.validate_inputs(empty, "m")
    assert encoder(**empty).shape == (0, encoder.hidden_size) and encoder.item_tokens(empty) == []
    _bad(encoder, {"pixel_values": x[:3], "image_grid_thw": IMAGES[:0]}, "holds 3 rows", "after no image")
    # the forward itself refuses a grid that disagrees with the rows (no cryptic shape error)
    with pytest.raises(InputError, match="92 patches"):
        encoder(pixel_values=x[:90], image_grid_thw=IMAGES)


def test_bad_parameters_are_refused_by_name():
    base = dict(hidden_size=32, num_layers=2, num_heads=2, ffn_hidden_size=40, patch_size=2)
    cases = [
        (dict(window_size=3), "window_size"),  # smaller than one merge block (4 px)
        (dict(fullatt_layers=[0]), "fullatt_layers"),  # without windows
        (dict(window_size=8, fullatt_layers=[2]), "fullatt_layers"),  # no layer 2
        (dict(deepstack_layers=[1, 0]), "deepstack_layers"),
        (dict(num_position_embeddings=15), "num_position_embeddings"),
        (dict(num_heads=16), "hidden_size"),  # head_dim 2: no rotary frequency per axis
        (dict(norm="batchnorm"), "norm"),
        (dict(spatial_merge_size=0), "spatial_merge_size"),
    ]
    for override, param in cases:
        with pytest.raises(ParamError) as err:
            QwenViT(**dict(base, **override))
        assert err.value.param == param, override


def test_patch_merger_merges_consecutive_blocks():
    torch.manual_seed(0)
    merger = PatchMerger(8, 6, spatial_merge_size=2).eval()
    post = PatchMerger(8, 6, spatial_merge_size=2, norm_after_merge=True, norm="rmsnorm").eval()
    assert tuple(post.norm.weight.shape) == (32,) and tuple(merger.norm.weight.shape) == (8,)
    x = torch.randn(12, 8)
    with torch.no_grad():
        out = merger(x)
        # token block k = rows 4k..4k+3, one after the other in the merged vector
        block = merger.norm(x).reshape(3, 32)
        assert (out - merger.fc2(torch.nn.functional.gelu(merger.fc1(block)))).abs().max().item() < 1e-6
        assert (merger(x[None].expand(2, 12, 8)) - out).abs().max().item() < 1e-6  # (N, T, C) too
        assert post(x).shape == (3, 6)
    assert merger.tokens_out(12) == 3
    with pytest.raises(ParamError, match="blocks of 4 tokens .* got 10 tokens"):
        merger.tokens_out(10)


def test_parameter_counts_equal_transformers_for_the_released_towers():
    """Qwen2-VL-2B, Qwen2.5-VL-7B and Qwen3-VL-8B vision towers with their mergers, built on meta."""
    towers = {
        "qwen2_vl": transformers.Qwen2VLVisionConfig(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4,
                                                     num_heads=16, patch_size=14),
        "qwen2_5_vl": transformers.Qwen2_5_VLVisionConfig(depth=32, hidden_size=1280, intermediate_size=3420,
                                                          num_heads=16, out_hidden_size=3584, window_size=112,
                                                          fullatt_block_indexes=[7, 15, 23, 31]),
        "qwen3_vl": transformers.Qwen3VLVisionConfig(out_hidden_size=4096),
    }
    expected = {"qwen2_vl": 665_271_296, "qwen2_5_vl": 676_550_144, "qwen3_vl": 576_388_336}
    for kind, config in towers.items():
        with torch.device("meta"):
            hf = HF_CLASSES[kind](config)
            enc_params, merger_params = vision_params_from_hf(config)
            ours = [QwenViT(**enc_params), PatchMerger(**merger_params)]
            ours += [PatchMerger(**deepstack_merger_params(merger_params))
                     for _ in enc_params.get("deepstack_layers", [])]
        n_hf = sum(p.numel() for p in hf.parameters())
        assert sum(p.numel() for m in ours for p in m.parameters()) == n_hf == expected[kind], kind
