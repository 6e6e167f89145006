"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL and SigLIP2 NaFlex through import_hf / export_hf, against transformers
(tiny random models, fp32, CPU): logits and loss on a padded batch mixing image sizes, aspect ratios and a
video; export -> from_pretrained -> the same logits; parameter counts; greedy generation."""

from __future__ import annotations

import functools
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import perturb  # noqa: E402
from mimo_spec.errors import ConfigError, InputError  # noqa: E402
from mimo_spec.generation import generate  # noqa: E402
from mimo_spec.interop import export_hf, import_hf  # noqa: E402

TOL = 1e-5
IMG, VID, VS = 250, 251, 252
KINDS = ("2", "25", "3")
TEXT = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, bos_token_id=None, eos_token_id=None)
MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
VISION = {
    "2": dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=4, temporal_patch_size=2,
              spatial_merge_size=2),
    "25": dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=4, patch_size=4,
               temporal_patch_size=2, spatial_merge_size=2, window_size=16, fullatt_block_indexes=[1],
               tokens_per_second=2),
    "3": dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=4, patch_size=4,
              temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0, 1]),
}
CLASSES = {"2": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
           "25": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
           "3": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration")}
PATCH = 3 * 2 * 4 * 4  # channels x temporal patch x patch x patch


def _hf_model(kind: str, tie: bool = False):
    text = dict(TEXT, rope_parameters=dict(MROPE))
    if kind == "3":
        text.update(head_dim=16, rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2],
                                                  "mrope_interleaved": True, "rope_theta": 10000.0})
    config_cls, model_cls = (getattr(transformers, n) for n in CLASSES[kind])
    torch.manual_seed(0)
    hf = model_cls(config_cls(text_config=text, vision_config=VISION[kind], image_token_id=IMG, video_token_id=VID,
                              vision_start_token_id=VS, vision_end_token_id=VS + 1, tie_word_embeddings=tie))
    return perturb(hf, louder=lambda n: "layers" in n and "proj" in n and "visual" not in n)


@functools.lru_cache(maxsize=None)
def _pair(kind: str):
    hf = _hf_model(kind)
    cfg, model = import_hf(hf)
    return hf, cfg, model.eval()


def _tokens(grid) -> int:
    return int(torch.as_tensor(grid).prod()) // 4  # 2x2 merge


def _sequence(parts, gen: torch.Generator) -> list[int]:
    out: list[int] = []
    for p in parts:
        if isinstance(p, int):
            out += torch.randint(0, 240, (p,), generator=gen).tolist()
        else:  # (placeholder id, count): <|vision_start|> then the placeholders
            out += [VS] + [p[0]] * p[1]
    return out


def _video_parts(kind: str, grid) -> list:
    if kind == "3":  # Qwen3-VL: each frame group its own run, after its timestamp text
        per = _tokens(grid) // grid[0]
        parts: list = []
        for _ in range(grid[0]):
            parts += [2, (VID, per)]
        return parts
    return [(VID, _tokens(grid))]


def _batch(kind: str):
    """Two rows, right-padded: three images of different sizes and aspect ratios (4x6, 6x4, 2x2 patches)
    and a 2-frame video; labels are -100 at placeholders and padding."""
    gen = torch.Generator().manual_seed(2)
    grids = torch.tensor([[1, 4, 6], [1, 6, 4], [1, 2, 2]])
    vgrid = torch.tensor([[2, 4, 4]])
    rows = [_sequence([3, (IMG, _tokens(grids[0])), 4, (IMG, _tokens(grids[1])), 2], gen),
            _sequence([2, (IMG, _tokens(grids[2])), 3, *_video_parts(kind, vgrid[0].tolist()), 5], gen)]
    length = max(map(len, rows))
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    labels = ids.clone()
    labels[(ids == IMG) | (ids == VID) | (mask == 0)] = -100
    pv = torch.randn(int(grids.prod(1).sum()), PATCH, generator=gen)
    pvv = torch.randn(int(vgrid.prod(1).sum()), PATCH, generator=gen)
    extra = {"second_per_grid_ts": torch.tensor([1.0])} if kind == "25" else {}
    hf_kw = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=_token_types(ids), pixel_values=pv,
                 image_grid_thw=grids, pixel_values_videos=pvv, video_grid_thw=vgrid, **extra)
    ours = {"images": {"vit": {"pixel_values": pv, "image_grid_thw": grids}},
            "videos": {"vit": {"pixel_values_videos": pvv, "video_grid_thw": vgrid, **extra}}}
    return hf_kw, ours, labels


def _token_types(ids: torch.Tensor) -> torch.Tensor:
    types = torch.zeros_like(ids)
    types[ids == IMG], types[ids == VID] = 1, 2
    return types


def _err(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a - b)[mask.bool()].abs().max().item()


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_import_logits_loss_and_parameter_count_equal_transformers(kind):
    hf, cfg, model = _pair(kind)
    hf_kw, ours, labels = _batch(kind)
    ref = hf(**hf_kw, labels=labels)
    out = model(hf_kw["input_ids"], ours, attention_mask=hf_kw["attention_mask"], labels=labels)
    assert _err(out.logits, ref.logits, hf_kw["attention_mask"]) <= TOL
    assert abs(out.loss.item() - ref.loss.item()) <= TOL
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())
    assert cfg["hf_config"]["vision_start_token_id"] == VS and cfg["hf_config"]["vision_end_token_id"] == VS + 1


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_export_loads_in_transformers_with_the_same_logits(kind, tmp_path):
    hf, cfg, model = _pair(kind)
    hf_kw, _, labels = _batch(kind)
    ref = hf(**hf_kw, labels=labels)
    out_dir = export_hf(model, cfg, tmp_path / "out")
    back, info = type(hf).from_pretrained(out_dir, output_loading_info=True)
    assert not any(info.values()), info
    again = back.eval()(**hf_kw, labels=labels)
    assert _err(again.logits, ref.logits, hf_kw["attention_mask"]) <= TOL
    assert abs(again.loss.item() - ref.loss.item()) <= TOL
    config = json.loads((out_dir / "config.json").read_text())
    assert config["architectures"] == [CLASSES[kind][1]]
    assert (config["image_token_id"], config["video_token_id"], config["vision_start_token_id"],
            config["vision_end_token_id"]) == (IMG, VID, VS, VS + 1)
    # the exported directory imports back to the same config and weights
    cfg2, model2 = import_hf(out_dir)
    assert cfg2 == cfg
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


@torch.no_grad()
@torch.no_grad()
def test_encoded_items_need_their_positions_and_deepstack_needs_the_items():
    """modality_embeddings= (already-encoded items) on an M-RoPE model: with the positions model.position_ids
    computes from the grids, the logits equal the pixel path's; without them an InputError names the argument
    and what to pass (the positions would silently be a text run's); a text-only batch with no rows needs
    nothing. A DeepStack modality (Qwen3-VL) cannot come in encoded: its inner-layer features would be lost."""
    _, _, model = _pair("2")
    hf_kw, ours, _ = _batch("2")
    ids, mask = hf_kw["input_ids"], hf_kw["attention_mask"]
    ref = model(ids, ours, attention_mask=mask).logits
    emb = {name: model.modalities[name].encode(ours[name]) for name in ("images", "videos")}
    grids = {name: {"vit": {k: v for k, v in ours[name]["vit"].items() if "grid" in k}} for name in ours}
    pos = model.position_ids(ids, grids, attention_mask=mask)
    out = model(ids, modality_embeddings=emb, position_ids=pos, attention_mask=mask).logits
    assert _err(out, ref, mask) <= 1e-5
    with pytest.raises(InputError) as e:
        model(ids, modality_embeddings=emb, attention_mask=mask)
    assert e.value.problems[0].path == "modality_embeddings.images", str(e.value)
    assert "M-RoPE" in str(e.value) and "model.position_ids(input_ids" in str(e.value) and "image_grid_thw" in str(e.value)
    text = torch.tensor([[5, 6, 7, 8]])
    empty = {"images": torch.zeros(0, model.language_model.hidden_size)}
    assert torch.equal(model(text, modality_embeddings=empty).logits, model(text).logits)

    _, _, model3 = _pair("3")
    hf_kw, ours, _ = _batch("3")
    emb = model3.modalities["images"].encode(ours["images"])
    pos = model3.position_ids(hf_kw["input_ids"], ours, attention_mask=hf_kw["attention_mask"])
    with pytest.raises(InputError) as e:
        model3(hf_kw["input_ids"], {"videos": ours["videos"]}, modality_embeddings={"images": emb}, position_ids=pos,
               attention_mask=hf_kw["attention_mask"])
    assert e.value.problems[0].path == "modality_embeddings.images" and "DeepStack" in str(e.value), str(e.value)


def test_export_without_hf_config_uses_qwens_token_layout(tmp_path):
    """Without the run config's hf_config (cfg=None: model.spec), vision start/end are image_token_id - 3 / - 2
    (Qwen's tokenizers); a tied LM exports without lm_head and loads tied."""
    hf = _hf_model("2", tie=True)
    cfg, model = import_hf(hf)
    out_dir = export_hf(model, None, tmp_path / "out")
    config = json.loads((out_dir / "config.json").read_text())
    assert (config["vision_start_token_id"], config["vision_end_token_id"]) == (IMG - 3, IMG - 2)
    assert config["tie_word_embeddings"] is True
    back, info = type(hf).from_pretrained(out_dir, output_loading_info=True)
    assert not any(info.values()), info
    hf_kw, _, _ = _batch("2")
    assert _err(back.eval()(**hf_kw).logits, hf(**hf_kw).logits, hf_kw["attention_mask"]) <= TOL
    # images only (no video modality): video_token_id is the next id, as in Qwen's tokenizers
    from mimo_spec.builders.build import build_model

    images_only = dict(cfg, modalities={"images": cfg["modalities"]["images"]})
    lean = build_model(images_only)
    lean.load_state_dict(model.state_dict())
    config = json.loads((export_hf(lean, images_only, tmp_path / "lean") / "config.json").read_text())
    assert (config["image_token_id"], config["video_token_id"]) == (IMG, IMG + 1)


def _edited(cfg: dict, edit) -> dict:
    import copy

    cfg = copy.deepcopy(cfg)
    edit(cfg)
    return cfg


def _refused(cfg: dict, tmp_path, match: str) -> None:
    from mimo_spec.builders.build import build_model

    with pytest.raises(ConfigError, match=match) as e:
        export_hf(build_model(cfg), cfg, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    return e.value


def test_export_refuses_mrope_models_no_transformers_class_computes(tmp_path):
    _, cfg2, _ = _pair("2")
    _, cfg25, _ = _pair("25")
    _, cfg3, _ = _pair("3")
    lm = lambda c: c["model"]["params"]  # noqa: E731
    images = lambda c: c["modalities"]["images"]  # noqa: E731
    # Qwen2-VL's LM with Qwen3's q/k norms: no class has both
    _refused(_edited(cfg2, lambda c: lm(c).update(qk_norm=True)), tmp_path,
             r"model\.params\.qk_norm: True \(Hugging Face's would be False\)")
    # Qwen3-VL without interleaved M-RoPE
    _refused(_edited(cfg3, lambda c: lm(c).update(mrope_interleaved=False)), tmp_path,
             r"model\.params\.mrope_interleaved: False")
    # Qwen2.5-VL video positions need an integer tokens_per_second
    _refused(_edited(cfg25, lambda c: lm(c).update(mrope_tokens_per_second=1.5)), tmp_path,
             r"model\.params\.mrope_tokens_per_second: cannot export to Hugging Face: 1\.5: Qwen2\.5-VL")
    # a merger norm the tower's family does not use
    _refused(_edited(cfg2, lambda c: images(c)["submodules"]["input_projections"]["vit"]["params"].update(
        norm="rmsnorm")), tmp_path, r"modalities\.images\.submodules\.input_projections\.vit\.params\.norm")
    # DeepStack into other LM layers than the first ones
    _refused(_edited(cfg3, lambda c: images(c)["params"].update(deepstack_lm_layers=[1, 2])), tmp_path,
             r"modalities\.images\.params\.deepstack_lm_layers: cannot export to Hugging Face: \[1, 2\]: Qwen3-VL")
    # the video modality with its own tower
    _refused(_edited(cfg2, lambda c: c["modalities"].update(videos=_edited(images(c), lambda v: v["params"].update(
        special_token_id=VID, item_kind="video")))), tmp_path, r"2 modalities have their own encoders \(images, "
                                                                 r"videos\)")


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_greedy_generation_equals_transformers(kind):
    """A prompt with an image (and, for Qwen2-VL, a video): the KV cache gives what recomputation gives, and
    both give transformers' greedy tokens."""
    hf, _, model = _pair(kind)
    gen = torch.Generator().manual_seed(3)
    grid = torch.tensor([[1, 4, 6]])
    parts = [3, (IMG, _tokens(grid[0])), 2]
    pv = torch.randn(int(grid.prod()), PATCH, generator=gen)
    ours = {"images": {"vit": {"pixel_values": pv, "image_grid_thw": grid}}}
    hf_kw = dict(pixel_values=pv, image_grid_thw=grid)
    if kind == "2":
        vgrid = torch.tensor([[2, 2, 4]])
        pvv = torch.randn(int(vgrid.prod()), PATCH, generator=gen)
        parts += [*_video_parts(kind, vgrid[0].tolist()), 3]
        ours["videos"] = {"vit": {"pixel_values_videos": pvv, "video_grid_thw": vgrid}}
        hf_kw.update(pixel_values_videos=pvv, video_grid_thw=vgrid)
    ids = torch.tensor([_sequence(parts, gen)])
    cached = generate(model, ids, ours, max_new_tokens=6, use_cache=True).tokens
    recomputed = generate(model, ids, ours, max_new_tokens=6, use_cache=False).tokens
    ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=_token_types(ids),
                      max_new_tokens=6, do_sample=False, **hf_kw)
    assert cached == recomputed == ref[0, ids.shape[1]:].tolist()
    assert len(cached) == 6 and len(set(cached)) > 2  # not one token repeated


# ---------------------------------------------------------------------------------------------- SigLIP2


def _siglip2_inputs(gen: torch.Generator, budget: int = 24):
    """Three images at their own patch grids (4x4, 3x8, 8x3), padded to the budget, as the processor gives."""
    shapes = torch.tensor([[4, 4], [3, 8], [8, 3]])
    pv = torch.zeros(len(shapes), budget, 3 * 4 * 4)
    mask = torch.zeros(len(shapes), budget, dtype=torch.long)
    for i, (h, w) in enumerate(shapes.tolist()):
        pv[i, :h * w] = torch.randn(h * w, 3 * 4 * 4, generator=gen)
        mask[i, :h * w] = 1
    return {"pixel_values": pv, "pixel_attention_mask": mask, "spatial_shapes": shapes}


@pytest.mark.parametrize("dual", [False, True])
@torch.no_grad()
def test_siglip2_import_and_export(dual, tmp_path):
    """Siglip2VisionModel (saved to a directory) or the vision half of an in-memory Siglip2Model -> a
    siglip2_naflex encoder equal to last_hidden_state at the real patches, with the same parameter count;
    export -> Siglip2VisionModel.from_pretrained with no missing or unexpected keys, the same outputs."""
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_patches=16,
                  patch_size=4)
    torch.manual_seed(0)
    if dual:
        hf = transformers.Siglip2Model(transformers.Siglip2Config(vision_config=vision, text_config=dict(
            hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, vocab_size=100)))
        tower = hf.vision_model
    else:
        hf = tower = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**vision))
    g = torch.Generator().manual_seed(1)
    for p in hf.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.05)
    hf.eval()
    if not dual:
        hf.save_pretrained(tmp_path / "hf")
    cfg, enc = import_hf(hf if dual else tmp_path / "hf")
    assert cfg["module"] == "siglip2_naflex" and cfg["params"]["keep_unused_layers"] is True
    assert sum(p.numel() for p in enc.parameters()) == sum(p.numel() for p in tower.parameters())
    inputs = _siglip2_inputs(torch.Generator().manual_seed(2))
    ref = tower(**inputs).last_hidden_state[inputs["pixel_attention_mask"].bool()]
    assert (enc.eval()(**inputs) - ref).abs().max().item() <= TOL
    back, info = transformers.Siglip2VisionModel.from_pretrained(export_hf(enc, cfg, tmp_path / "out"),
                                                                  output_loading_info=True)
    assert not any(info.values()), info
    again = back.eval()(**inputs).last_hidden_state[inputs["pixel_attention_mask"].bool()]
    assert (again - ref).abs().max().item() <= TOL
