"""SigLIP2 NaFlex encoder against transformers' Siglip2VisionModel (tiny, random weights, fp32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from mimo_spec.components.vision.siglip2 import (  # noqa: E402
    Siglip2NaFlex,
    _resize_weights,
    siglip2_import_plan,
    siglip2_params_from_hf,
    siglip2_state_dict_from_hf,
    siglip2_state_dict_to_hf,
)
from mimo_spec.errors import InputError, ParamError  # noqa: E402

TOL = 1e-5
# (height, width) in pixels: square, wide, tall (patch grids (4, 4), (3, 8), (8, 3) with a budget of 24)
SIZES = ((40, 40), (20, 70), (90, 30))


def _config(**kw):
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=4,
                num_patches=16, layer_norm_eps=1e-6)
    return transformers.Siglip2VisionConfig(**{**base, **kw})


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Noise on every parameter, so norms (ones) and biases (zeros) are not trivially right."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _pair(config=None, **params):
    torch.manual_seed(0)
    config = config or _config()
    hf = _perturb(transformers.Siglip2VisionModel(config))
    kwargs = {**siglip2_params_from_hf(config, keep_unused_layers=True), **params}
    ours = Siglip2NaFlex(**kwargs).eval()
    ours.load_state_dict(siglip2_state_dict_from_hf(hf.state_dict(), kwargs), strict=True)
    return hf, ours, kwargs


def _processor(max_num_patches: int = 24, patch_size: int = 4):
    # the PIL backend: the default (torchvision) backend needs torchvision, which is not installed here
    cls = getattr(transformers, "Siglip2ImageProcessorPil", None) or transformers.Siglip2ImageProcessor
    return cls(patch_size=patch_size, max_num_patches=max_num_patches)


def _images(sizes=SIZES):
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _batch(sizes=SIZES, max_num_patches: int = 24) -> dict[str, torch.Tensor]:
    return dict(_processor(max_num_patches)(images=_images(sizes), return_tensors="pt"))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Within TOL, relative to the larger of 1 and the reference's scale (gradients reach ~30 here)."""
    return (a - b).abs().max().item() <= TOL * max(1.0, b.abs().max().item())


def _real(hf_out: torch.Tensor, batch) -> torch.Tensor:
    return hf_out[batch["pixel_attention_mask"].bool()]


def test_matches_hf_last_hidden_state_on_processed_images_of_different_sizes():
    hf, ours, _ = _pair()
    batch = _batch()
    grids = batch["spatial_shapes"].tolist()
    # the three images really differ: up- and down-sized position grids, padded and full
    assert grids == [[4, 4], [3, 8], [8, 3]]
    assert batch["pixel_attention_mask"].sum(1).tolist() == [16, 24, 24]
    ours.validate_inputs(batch, "images")
    with torch.no_grad():
        out = ours(**batch)
        ref = hf(**batch).last_hidden_state
    assert ours.item_tokens(batch) == [16, 24, 24]
    assert out.shape == (16 + 24 + 24, 32)
    assert (out - _real(ref, batch)).abs().max().item() < TOL
    # each image alone gives the same features (padding never leaks into real patches)
    start = 0
    for i, n in enumerate(ours.item_tokens(batch)):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        with torch.no_grad():
            alone = ours(**one)
        assert (alone - out[start : start + n]).abs().max().item() < TOL
        start += n


def test_matches_hf_without_padding_and_at_an_earlier_layer():
    hf, ours, _ = _pair()
    full = _batch(sizes=((32, 32), (50, 45)), max_num_patches=16)  # every image fills the budget: no mask
    assert full["pixel_attention_mask"].all()
    with torch.no_grad():
        assert (ours(**full) - hf(**full).last_hidden_state.flatten(0, 1)).abs().max().item() < TOL

    # hidden_states[-2]: after block 2 of 3, no post-norm (what a VLM reading an inner layer gets)
    hf, ours, params = _pair(feature_layer=-2, post_norm=False, keep_unused_layers=False)
    assert len(ours.layers) == 2 and ours.post_norm is None
    batch = _batch()
    with torch.no_grad():
        ref = hf(**batch, output_hidden_states=True).hidden_states[-2]
        assert (ours(**batch) - _real(ref, batch)).abs().max().item() < TOL


def test_position_resize_is_antialiased_bilinear_interpolation():
    torch.manual_seed(0)
    table = torch.randn(1, 5, 4, 4, dtype=torch.float64)
    grids = ((4, 4), (2, 3), (7, 1), (1, 9), (16, 5), (2, 1))

    def resize(x, size):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)

    for h, w in grids:
        ours = torch.einsum("hi,wj,cij->chw", _resize_weights(h, 4), _resize_weights(w, 4), table[0])
        # one axis at a time (torch 2.13's CPU kernel resizing both at once is off for 1-wide outputs
        # whose height changes, e.g. (7, 1); transformers' explicit weights are not)
        ref = resize(resize(table, (h, 4)), (h, w))
        assert (ours - ref[0]).abs().max().item() < 1e-12, (h, w)
    # transformers' own resize (padded to 64 rows) at the real rows
    shapes = torch.tensor(grids)
    hf = transformers.models.siglip2.modeling_siglip2.Siglip2VisionEmbeddings.resize_positional_embeddings(
        table[0].permute(1, 2, 0).float(), shapes, max_length=80)
    model = Siglip2NaFlex(patch_size=2, num_patches=16, hidden_size=5, num_layers=1, num_heads=1, ffn_hidden_size=4)
    with torch.no_grad():
        model.pos_embed.copy_(table[0].permute(1, 2, 0).reshape(16, 5))
        _, row_w, col_w, _ = model._host_plan([tuple(g) for g in grids], 80)
        ours = model.resized_pos_embed(row_w, col_w)
    real = torch.arange(80)[None, :] < shapes.prod(-1)[:, None]
    assert (ours - hf[real]).abs().max().item() < 1e-6


def test_gradients_match_hf():
    hf, ours, params = _pair()
    batch = _batch()
    ours.train(), hf.train()
    pixels = batch["pixel_values"].clone().requires_grad_(True)
    hf_pixels = batch["pixel_values"].clone().requires_grad_(True)
    weights = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    (ours(pixels, batch["pixel_attention_mask"], batch["spatial_shapes"]) * weights).sum().backward()
    ref = hf(hf_pixels, batch["pixel_attention_mask"], batch["spatial_shapes"]).last_hidden_state
    (_real(ref, batch) * weights).sum().backward()
    mask = batch["pixel_attention_mask"].bool()
    assert _close(pixels.grad[mask], hf_pixels.grad[mask])
    assert pixels.grad[~mask].abs().max().item() == 0  # padding rows never reach the output
    hf_grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in hf.named_parameters()}
    ours_grads = siglip2_state_dict_from_hf(hf_grads, params)
    checked = 0
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert _close(p.grad, ours_grads[name]), name
            checked += 1
    assert checked == len([p for p in ours.parameters() if p.requires_grad]) > 30


def test_gradcheck_in_float64():
    torch.manual_seed(0)
    ours = Siglip2NaFlex(patch_size=2, num_patches=4, hidden_size=8, num_layers=1, num_heads=2, ffn_hidden_size=8,
                         num_channels=1).double()
    inputs = ours.example_inputs(3)
    assert ours.item_tokens(inputs) == [4, 2, 1]  # grids (2, 2), (1, 2), (1, 1) in a budget of 4
    mask, shapes = inputs["pixel_attention_mask"], inputs["spatial_shapes"]
    pixels = inputs["pixel_values"].double().requires_grad_(True)
    torch.autograd.gradcheck(lambda x: ours(x, mask, shapes), (pixels,), fast_mode=True)
    # through the resized position table, with grids larger and smaller than the table's 2x2
    grids = torch.tensor([[3, 1], [1, 1], [2, 2]])
    table = ours.pos_embed.detach().clone().requires_grad_(True)
    run = lambda t: torch.func.functional_call(ours, {"pos_embed": t}, (pixels.detach(), mask, grids))  # noqa: E731
    torch.autograd.gradcheck(run, (table,), fast_mode=True)


def test_example_inputs_have_different_grids_and_validate():
    ours = Siglip2NaFlex(patch_size=4, num_patches=16, hidden_size=16, num_layers=1, num_heads=2, ffn_hidden_size=16)
    inputs = ours.example_inputs(6, generator=torch.Generator().manual_seed(0))
    ours.validate_inputs(inputs, "images")
    tokens = ours.item_tokens(inputs)
    assert len(set(tokens)) >= 4 and max(tokens) <= 16
    assert len({tuple(g) for g in inputs["spatial_shapes"].tolist()}) == 6
    assert ours.rows_per_item("spatial_shapes", inputs["spatial_shapes"]) == tokens
    assert ours(**inputs).shape == (sum(tokens), 16)
    assert ours.example_inputs(0)["pixel_values"].shape == (0, 16, 48)
    assert ours(**ours.example_inputs(0)).shape == (0, 16)
    capped = Siglip2NaFlex(patch_size=4, num_patches=16, hidden_size=16, num_layers=1, num_heads=2,
                           ffn_hidden_size=16, max_num_patches=40)
    big = capped.example_inputs(2)
    assert big["pixel_values"].shape[1] == 40 and max(capped.item_tokens(big)) > 16  # upsampled position grid
    assert Siglip2NaFlex.grid_inputs == {"spatial_shapes": ()}


def test_an_image_without_patches_gives_no_tokens_and_no_nans():
    # the framework may run one blank item (all zeros) on a rank that holds none
    ours = Siglip2NaFlex(patch_size=4, num_patches=16, hidden_size=16, num_layers=2, num_heads=2, ffn_hidden_size=16)
    inputs = ours.example_inputs(2)
    blank = {k: torch.zeros_like(v) for k, v in inputs.items()}
    out = ours(**blank)
    assert out.shape == (0, 16)
    mixed = {k: torch.cat([v[:1], torch.zeros_like(v[:1])]) for k, v in inputs.items()}
    out = ours(**mixed)
    out.sum().backward()
    assert out.shape == (16, 16) and all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)


def _bad(inputs, **change):
    return {**inputs, **change}


@pytest.mark.parametrize("case, match", [
    ("too_many_patches", r"image 1's grid \(5, 8\) makes 40 patches but pixel_values holds 24 rows"),
    ("mask_count", r"image 2's pixel_attention_mask marks 23 real patches but its grid \(8, 3\) makes 24"),
    ("mask_not_prefix", r"image 0's pixel_attention_mask does not mark its first 16 rows"),
    ("patch_dim", r"each patch holds 27 values but .* = 3 x 4\^2 = 48"),
    ("empty_grid", r"image 0's grid \(0, 4\) is empty"),
    ("missing", r"missing input 'spatial_shapes'"),
    ("unexpected", r"unexpected input 'image_grid_thw'"),
    ("float_grid", r"expected an integer tensor of shape \(3, 2\)"),
    ("mask_shape", r"expected an integer or bool tensor of shape \(3, 24\)"),
    ("budget", r"padded to 24 patches, more than max_num_patches \(20\)"),
    ("not_patches", r"expected shape \(N, max_patches, 48\), got \(3, 3, 24, 16\)"),
])
def test_bad_inputs_name_the_image_and_both_numbers(case, match):
    _, ours, params = _pair()
    batch = _batch()
    mask, shapes, pixels = batch["pixel_attention_mask"], batch["spatial_shapes"], batch["pixel_values"]
    if case == "too_many_patches":
        bad = _bad(batch, spatial_shapes=torch.tensor([[4, 4], [5, 8], [8, 3]]))
    elif case == "mask_count":
        m = mask.clone()
        m[2, -1] = 0
        bad = _bad(batch, pixel_attention_mask=m)
    elif case == "mask_not_prefix":
        bad = _bad(batch, pixel_attention_mask=mask.roll(1, dims=1))
    elif case == "patch_dim":
        bad = _bad(batch, pixel_values=pixels[..., :27])
    elif case == "empty_grid":
        bad = _bad(batch, spatial_shapes=torch.tensor([[0, 4], [3, 8], [8, 3]]))
    elif case == "missing":
        bad = {k: v for k, v in batch.items() if k != "spatial_shapes"}
    elif case == "unexpected":
        bad = _bad(batch, image_grid_thw=shapes)
    elif case == "float_grid":
        bad = _bad(batch, spatial_shapes=shapes.float())
    elif case == "mask_shape":
        bad = _bad(batch, pixel_attention_mask=mask[:, :20])
    elif case == "budget":
        ours = Siglip2NaFlex(**{**params, "max_num_patches": 20})
        bad = batch
    else:
        bad = _bad(batch, pixel_values=pixels.reshape(3, 3, 24, 16))
    with pytest.raises(InputError, match=match) as info:
        ours.validate_inputs(bad, "modality_inputs.images.siglip2")
    assert info.value.problems[0].path.startswith("modality_inputs.images.siglip2.")


def test_bad_params_are_refused():
    base = dict(patch_size=4, num_patches=16, hidden_size=16, num_layers=2, num_heads=2, ffn_hidden_size=16)
    with pytest.raises(ParamError, match="num_patches .* square"):
        Siglip2NaFlex(**{**base, "num_patches": 15})
    with pytest.raises(ParamError, match="feature_layer"):
        Siglip2NaFlex(**{**base, "feature_layer": -4})
    with pytest.raises(ParamError, match="divisible"):
        Siglip2NaFlex(**{**base, "num_heads": 3})


def test_state_dict_round_trips_to_hf_key_for_key():
    hf, ours, params = _pair()
    hf_sd = hf.state_dict()
    assert set(ours.state_dict()) >= {"head.probe", "head.attention.in_proj_weight", "post_norm.weight"}
    back = siglip2_state_dict_to_hf(ours.state_dict(), params)
    assert set(back) == set(hf_sd)
    assert all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)
    # without params: everything found, and back again
    assert set(siglip2_state_dict_to_hf(siglip2_state_dict_from_hf(hf_sd))) == set(hf_sd)
    # the model transformers rebuilds from our export is the same model
    again = transformers.Siglip2VisionModel(_config()).eval()
    again.load_state_dict(back, strict=True)
    batch = _batch()
    with torch.no_grad():
        assert torch.equal(again(**batch).last_hidden_state, hf(**batch).last_hidden_state)
    # frozen: the head and the (unused) post-norm of an inner-layer reader
    _, inner, p = _pair(feature_layer=1, post_norm=False)
    assert len(inner.layers) == 3 and not any(q.requires_grad for q in inner.head.parameters())
    assert not any(q.requires_grad for q in inner.layers[1:].parameters())
    assert not inner.post_norm.weight.requires_grad


def test_import_from_a_full_siglip2_model_finds_the_vision_prefix():
    torch.manual_seed(0)
    text = transformers.Siglip2TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, max_position_embeddings=8)
    full = transformers.Siglip2Model(transformers.Siglip2Config(text_config=text.to_dict(),
                                                                vision_config=_config().to_dict()))
    params = siglip2_params_from_hf(full.config, feature_layer=-2, post_norm=False)
    sd = siglip2_state_dict_from_hf(full.state_dict(), params)
    ours = Siglip2NaFlex(**params)
    ours.load_state_dict(sd, strict=True)  # 2 blocks, no post-norm, no head
    assert len(ours.layers) == 2 and ours.head is None and ours.post_norm is None
    assert torch.equal(sd["layers.1.attn.qkv.weight"][:32],
                       full.state_dict()["vision_model.encoder.layers.1.self_attn.q_proj.weight"])
    plan = siglip2_import_plan(full.state_dict().keys(), params)
    assert set(plan) == set(sd) and plan["pos_embed"][0][0] == "vision_model.embeddings.position_embedding.weight"
    with pytest.raises(KeyError, match="vision_model.encoder.layers.0.mlp.fc1.weight"):
        siglip2_state_dict_from_hf({k: v for k, v in full.state_dict().items() if "layers.0.mlp.fc1.weight" not in k},
                                   params)
    with pytest.raises(ValueError, match="Siglip2VisionConfig"):
        siglip2_params_from_hf(transformers.CLIPVisionConfig())


def test_so400m_naflex_parameter_count_equals_hf():
    config = _config(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     patch_size=16, num_patches=256)
    with torch.device("meta"):
        hf = transformers.Siglip2VisionModel(config)
        ours = Siglip2NaFlex(**siglip2_params_from_hf(config, keep_unused_layers=True))
        lm_path = Siglip2NaFlex(**siglip2_params_from_hf(config))
    count = sum(p.numel() for p in hf.parameters())
    assert sum(p.numel() for p in ours.parameters()) == count == 427_888_064
    assert {k: tuple(v.shape) for k, v in siglip2_state_dict_to_hf(ours.state_dict()).items()} == \
        {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    head = sum(p.numel() for p in hf.head.parameters())
    assert sum(p.numel() for p in lm_path.parameters()) == count - head


def test_the_modality_preset_is_so400m_naflex():
    import yaml
    from pathlib import Path

    conf = yaml.safe_load((Path(__file__).parents[1] / "conf/modality/siglip2_naflex.yaml").read_text())
    enc = conf["submodules"]["encoders"]["siglip2"]
    assert enc["module"] == "siglip2_naflex"
    config = _config(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     patch_size=16, num_patches=256)
    expected = siglip2_params_from_hf(config, keep_unused_layers=True)
    assert {k: v for k, v in enc["params"].items() if k != "max_num_patches"} == expected
    with torch.device("meta"):
        assert sum(p.numel() for p in Siglip2NaFlex(**enc["params"]).parameters()) == 427_888_064
