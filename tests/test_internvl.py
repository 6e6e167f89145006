"""InternVL (2 / 2.5 / 3) against transformers (tiny random models, fp32, CPU): InternViT as clip_vit options
(LayerScale, RMSNorm, q/k norm over all heads, no q/k/v bias, final layernorm, a middle feature layer);
register tokens against a computation by hand; import_hf / export_hf of InternVLForConditionalGeneration
on a padded batch of images of different sizes and aspect ratios, each tiled by GotOcr2ImageProcessor
(dynamic tiles + thumbnail) and laid out as InternVLProcessor writes them; greedy generation; the
internvl3_1b preset against the released config."""

from __future__ import annotations

import functools
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mimo_spec.errors import ConfigError, InputError  # noqa: E402
from mimo_spec.generation import generate  # noqa: E402
from mimo_spec.interop import export_hf, import_hf  # noqa: E402
from mimo_spec.interop import hf_weights as hw  # noqa: E402
from mimo_spec.interop.hf_safetensors import load_from_state_dict  # noqa: E402

TOL = 1e-5
IMG, START, END = 250, 251, 252  # <IMG_CONTEXT>, <img>, </img>
TILE, PATCH = 28, 7  # 4x4 patches per tile -> 2x2 after pixel shuffle: 4 tokens per tile
TOKENS_PER_TILE = 4
TEXT = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=None,
            eos_token_id=None)
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=TILE,
              patch_size=PATCH, use_mean_pooling=False)


def _perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Unit norms, zero biases and lambdas at their init value would hide swapped or missing tensors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for n, p in model.named_parameters():  # larger LM weights: greedy tokens vary from step to step
            if "language_model.layers" in n and "proj" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@functools.lru_cache(maxsize=None)
def _pair(lm: str = "qwen2"):
    """InternVL with a Qwen2 LM and an untied head (InternVL 2.5 / 3), or a Llama LM with a tied one and the
    features read at layer -2 (before HF's final layernorm: blocks and norm held, unused)."""
    torch.manual_seed(0)
    config = transformers.InternVLConfig(vision_config=VISION, text_config=dict(TEXT, model_type=lm),
                                         image_token_id=IMG, image_seq_length=TOKENS_PER_TILE,
                                         tie_word_embeddings=lm == "llama",
                                         vision_feature_layer=-1 if lm == "qwen2" else -2)
    hf = transformers.InternVLForConditionalGeneration(config)
    _perturb(hf)
    hf.eval()
    cfg, model = import_hf(hf)
    return hf, cfg, model.eval()


def _tiles(sizes, seed: int = 2):
    """Images of these (height, width) through InternVL's tiler: (pixel_values (tiles, 3, 28, 28), tiles per image)."""
    proc = transformers.GotOcr2ImageProcessorPil(crop_to_patches=True, size={"height": TILE, "width": TILE},
                                                 min_patches=1, max_patches=6)
    g = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
    out = proc(images, return_tensors="pt")
    return out["pixel_values"].float(), out["num_patches"].tolist()


def _image(tiles: int) -> list[int]:
    """InternVLProcessor's text for one image: <img>, the placeholders of all its tiles, </img>."""
    return [START] + [IMG] * (TOKENS_PER_TILE * tiles) + [END]


def _batch():
    """Two right-padded rows with four images of different sizes and aspect ratios (wide, tall, small,
    square: 3 + thumbnail, 2 + thumbnail, 1, 4 + thumbnail tiles); labels -100 at placeholders and padding."""
    pv, tiles = _tiles([(30, 90), (80, 40), (20, 24), (56, 56)])
    assert tiles == [4, 3, 1, 5]  # different tile counts, thumbnails included
    g = torch.Generator().manual_seed(3)
    text = lambda n: torch.randint(0, 240, (n,), generator=g).tolist()  # noqa: E731
    rows = [text(3) + _image(tiles[0]) + text(4) + _image(tiles[1]) + text(2),
            text(2) + _image(tiles[2]) + text(3) + _image(tiles[3]) + text(5)]
    length = max(map(len, rows))
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    labels = ids.clone()
    labels[(ids == IMG) | (mask == 0)] = -100
    return ids, mask, labels, pv, tiles


def _err(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a - b)[mask.bool()].abs().max().item()


# ------------------------------------------------------------------------------------------- the tower


@pytest.mark.parametrize("variant", ["300m", "6b"])
@torch.no_grad()
def test_internvit_tower_equals_transformers(variant):
    """InternViT-300M style (LayerNorm, q/k/v bias, final layernorm) and 6B style (RMSNorm, q/k norm over all
    heads, no q/k/v bias, mean pooling: no final norm), read at the last layer and at layer -2."""
    from mimo_spec.components.vision.clip_vit import ClipViT

    extra = (dict(use_mean_pooling=False, attention_bias=True) if variant == "300m" else
             dict(use_mean_pooling=True, norm_type="rms_norm", use_qk_norm=True, attention_bias=False))
    config = transformers.InternVLVisionConfig(**dict(VISION, num_hidden_layers=3, **extra))
    torch.manual_seed(0)
    hf = transformers.InternVLVisionModel(config)
    _perturb(hf, seed=4)
    hf.eval()
    pv = torch.randn(3, 3, TILE, TILE, generator=torch.Generator().manual_seed(5))
    ref = hf(pixel_values=pv, output_hidden_states=True)
    for layer, want in ((-1, ref.last_hidden_state), (-2, ref.hidden_states[-2])):
        params = hw.clip_vit_params_from_hf(config, feature_layer=layer, feature_select="all")
        if layer != -1:
            params["post_norm"] = False  # HF's final layernorm is applied to last_hidden_state only
        assert params["layer_scale"] == 0.1 and params["qk_norm"] is (variant == "6b")
        vit = ClipViT(**params).eval()
        state = hf.state_dict()
        plan = hw.clip_vit_import_plan(list(state), params)
        if layer == -1:
            assert set(plan) == set(vit.state_dict())  # every tensor of ours has its HF source
        load_from_state_dict(vit, plan, state)
        assert (vit(pv) - want).abs().max().item() <= TOL, (variant, layer)
        if layer == -1:
            assert sum(p.numel() for p in vit.parameters()) == sum(p.numel() for p in hf.parameters())
            back = hw.clip_vit_state_dict_to_hf(vit.state_dict(), params, prefix="")
            assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


@torch.no_grad()
def test_register_tokens_equal_a_computation_by_hand():
    """Registers sit after the class token, take no position embedding, are attended to by every patch and
    leave the output (feature_select all keeps only the class token); LayerScale and swiglu run alongside."""
    from mimo_spec.components.vision.clip_vit import ClipViT

    torch.manual_seed(0)
    kw = dict(image_size=TILE, patch_size=PATCH, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=40,
              class_token=True, pre_norm=False, patch_bias=True, layer_scale=0.5, mlp="swiglu", activation="silu",
              norm="rmsnorm", feature_select="all")
    vit = ClipViT(**kw, register_tokens=3).eval()
    _perturb(vit, seed=6)
    x = torch.randn(2, 3, TILE, TILE, generator=torch.Generator().manual_seed(7))
    out = vit(x)
    assert out.shape == (2, 1 + 16, 32) and vit.tokens_per_item(tuple(x.shape)) == 17

    def block(layer, h):  # pre-norm block with LayerScale and a SwiGLU MLP, written out
        a = layer.attn_norm(h)
        q, k, v = (layer.attn.qkv(a).unflatten(-1, (3, 4, 8)).permute(2, 0, 3, 1, 4))
        att = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ v
        h = h + layer.attn_scale * layer.attn.out(att.transpose(1, 2).flatten(2))
        gate, up = layer.mlp.fc1(layer.mlp_norm(h)).chunk(2, dim=-1)
        return h + layer.mlp_scale * layer.mlp.fc2(torch.nn.functional.silu(gate) * up)

    patches = vit.patch_embed(x).flatten(2).transpose(1, 2) + vit.pos_embed[1:]
    cls = (vit.class_embedding + vit.pos_embed[0]).expand(2, 1, 32)
    h = torch.cat([cls, vit.registers.expand(2, 3, 32), patches], dim=1)
    for layer in vit.layers:
        h = block(layer, h)
    want = torch.cat([h[:, :1], h[:, 4:]], dim=1)
    assert (out - want).abs().max().item() <= TOL
    # the registers matter: without them (same weights) the features differ
    plain = ClipViT(**kw).eval()
    plain.load_state_dict({k: v for k, v in vit.state_dict().items() if k != "registers"})
    assert (plain(x) - out).abs().max().item() > 1e-3
    assert ClipViT(**dict(kw, feature_select="patch"), register_tokens=3).eval()(x).shape == (2, 16, 32)


# --------------------------------------------------------------------------------------- the whole VLM


@pytest.mark.parametrize("lm", ["qwen2", "llama"])
@torch.no_grad()
def test_import_and_export_equal_transformers_on_tiled_images(lm, tmp_path):
    """Logits and loss on a batch of differently tiled images equal transformers'; the same parameter count;
    each image's placeholder run is read as its consecutive tiles; export loads in transformers with no
    missing or unexpected key and gives the same logits, and imports back to the same config and weights."""
    hf, cfg, model = _pair(lm)
    ids, mask, labels, pv, tiles = _batch()
    ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pv, labels=labels)
    ours = {"images": {"vit": {"pixel_values": pv}}}
    out = model(ids, ours, attention_mask=mask, labels=labels)
    assert _err(out.logits, ref.logits, mask) <= TOL
    assert abs(out.loss.item() - ref.loss.item()) <= TOL
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())
    vit = cfg["modalities"]["images"]["submodules"]["encoders"]["vit"]["params"]
    assert vit["layer_scale"] == 0.1 and vit["post_norm"] is (lm == "qwen2") and not vit["pre_norm"]
    assert vit["keep_unused_layers"] is (lm == "llama")
    assert cfg["model"]["params"]["tie_embeddings"] is (lm == "llama")
    # placeholders: one run of 4 * k per image = k consecutive items (tiles); the items per sample follow
    model.prepare_inputs(ids, ours)
    model.prepare_inputs(ids, ours, items_per_sample={"images": [tiles[0] + tiles[1], tiles[2] + tiles[3]]})
    with pytest.raises(InputError, match="sample 0 has"):  # a tile too few for the first row
        model.prepare_inputs(ids, ours, items_per_sample={"images": [tiles[0] + tiles[1] - 1,
                                                                     tiles[2] + tiles[3] + 1]})

    out_dir = export_hf(model, cfg, tmp_path / "out")
    back, info = transformers.InternVLForConditionalGeneration.from_pretrained(out_dir, output_loading_info=True)
    assert not any(info.values()), info
    again = back.eval()(input_ids=ids, attention_mask=mask, pixel_values=pv, labels=labels)
    assert _err(again.logits, ref.logits, mask) <= TOL and abs(again.loss.item() - ref.loss.item()) <= TOL
    config = json.loads((out_dir / "config.json").read_text())
    assert config["architectures"] == ["InternVLForConditionalGeneration"]
    assert (config["image_token_id"], config["image_seq_length"], config["downsample_ratio"]) == (IMG, 4, 0.5)
    assert config["text_config"]["model_type"] == lm and config["tie_word_embeddings"] is (lm == "llama")
    cfg2, model2 = import_hf(out_dir)
    assert cfg2 == cfg
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


def test_export_refuses_what_internvl_cannot_express(tmp_path):
    import copy

    from mimo_spec.builders.build import build_model

    _, cfg, _ = _pair()
    for key, value, match in (("register_tokens", 2, r"register_tokens: cannot export.*no register tokens"),
                              ("mlp", "swiglu", r"params\.mlp: cannot export")):
        bad = copy.deepcopy(cfg)
        bad["modalities"]["images"]["submodules"]["encoders"]["vit"]["params"][key] = value
        if key == "mlp":
            bad["modalities"]["images"]["submodules"]["encoders"]["vit"]["params"]["activation"] = "silu"
        with pytest.raises(ConfigError, match=match):
            export_hf(build_model(bad), bad, tmp_path / key)
        assert not (tmp_path / key).exists()
    # a CLIP-style tower with LayerScale: no CLIP / SigLIP checkpoint holds it
    from mimo_spec.builders.build import build_module

    node = {"module": "clip_vit", "params": dict(image_size=TILE, patch_size=PATCH, hidden_size=32, num_layers=1,
                                                 num_heads=4, ffn_hidden_size=48, layer_scale=0.1)}
    with pytest.raises(ConfigError, match=r"params\.layer_scale: cannot export.*CLIP / SigLIP towers"):
        export_hf(build_module(node, kind="encoder"), node, tmp_path / "clip")


@torch.no_grad()
def test_greedy_generation_with_an_image_equals_recomputation_and_transformers():
    hf, _, model = _pair()
    pv, tiles = _tiles([(40, 70)], seed=10)
    assert tiles == [7]  # a 3 x 2 grid of tiles + the thumbnail
    g = torch.Generator().manual_seed(11)
    ids = torch.tensor([torch.randint(0, 240, (3,), generator=g).tolist() + _image(tiles[0])
                        + torch.randint(0, 240, (2,), generator=g).tolist()])
    inputs = {"images": {"vit": {"pixel_values": pv}}}
    cached = generate(model, ids, inputs, max_new_tokens=6, use_cache=True).tokens
    recomputed = generate(model, ids, inputs, max_new_tokens=6, use_cache=False).tokens
    ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, max_new_tokens=6,
                      do_sample=False)
    assert cached == recomputed == ref[0, ids.shape[1]:].tolist()
    assert len(cached) == 6 and len(set(cached)) > 2  # not one token repeated


# ------------------------------------------------------------------------------------------------ preset


def _released_internvl3_1b():
    """OpenGVLab/InternVL3-1B-hf's config.json values: InternViT-300M-448px-V2.5 + Qwen2.5-0.5B (vocabulary
    151674, untied LM head), downsample_ratio 0.5, image token 151667."""
    vision = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  hidden_act="gelu", image_size=[448, 448], patch_size=[14, 14], num_channels=3, attention_bias=True,
                  use_qk_norm=False, norm_type="layer_norm", layer_norm_eps=1e-6, layer_scale_init_value=0.1,
                  use_mean_pooling=True, use_absolute_position_embeddings=True, use_mask_token=False)
    text = dict(model_type="qwen2", vocab_size=151674, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768,
                rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                use_sliding_window=False, bos_token_id=151643, eos_token_id=151645)
    return transformers.InternVLConfig(vision_config=vision, text_config=text, image_token_id=151667,
                                       image_seq_length=256, downsample_ratio=0.5, projector_hidden_act="gelu",
                                       vision_feature_layer=-1, vision_feature_select_strategy="default",
                                       tie_word_embeddings=False)


def test_internvl3_1b_preset_matches_the_released_model():
    import inspect

    from omegaconf import OmegaConf

    from mimo_spec import build_model
    from mimo_spec.config import compose_config
    from mimo_spec.interop.hf_import import _convert
    from mimo_spec.registry import resolve
    from mimo_spec.summary import render_summary

    config = _released_internvl3_1b()
    with torch.device("meta"):
        hf = transformers.InternVLForConditionalGeneration(config)
    theirs = sum(p.numel() for p in hf.parameters())
    cfg = compose_config(["preset=internvl3_1b"])
    ours = build_model(cfg, device="meta")
    assert sum(p.numel() for p in ours.parameters()) == theirs == 938_193_024
    imported = _convert(config, "internvl3_1b").cfg
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert imported["model"]["params"] == {k: resolved["model"]["params"][k] for k in imported["model"]["params"]}
    for part in ("encoders", "input_projections"):
        node = resolved["modalities"]["images"]["submodules"][part]["vit"]
        want = imported["modalities"]["images"]["submodules"][part]["vit"]
        assert node["module"] == want["module"] and {k: node["params"][k] for k in want["params"]} == want["params"]
        # the preset spells out every constructor parameter (the layer backend excepted)
        kind = "encoder" if part == "encoders" else "projector"
        wanted = set(inspect.signature(resolve(kind, node["module"]).__init__).parameters) - {"self", "backend"}
        assert set(node["params"]) == wanted, wanted ^ set(node["params"])
    lm_params = set(inspect.signature(resolve("language_model", "gpt").__init__).parameters) - {"self", "backend"}
    assert set(resolved["model"]["params"]) == lm_params, lm_params ^ set(resolved["model"]["params"])
    assert resolved["modalities"]["images"]["params"]["special_token_id"] == 151667
    text = render_summary(ours)  # what action=summary prints
    assert f"exact: {theirs:,} parameters" in text and "modalities.images: 256 placeholders per item" in text
