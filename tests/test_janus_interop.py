"""Janus through import_hf against transformers' JanusForConditionalGeneration (a tiny random model with
perturbed weights, fp32, CPU): understanding logits, VQ codes and decoded pixels, greedy guided image
generation codes; and the Janus-1.3B preset's parameter count against the released config."""

import pytest
import torch
import transformers as tf

from conftest import perturb
from mimo_spec.interop import import_hf

TOL = 2e-5
IMG, BOS, BOI, EOI, PAD = 100, 1, 101, 102, 0


def _tiny_janus(**vision_kw):
    text = dict(model_type="llama", vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256, rms_norm_eps=1e-6,
                bos_token_id=BOS, eos_token_id=2, pad_token_id=PAD)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                  mlp_ratio=2.0, projection_dim=32, depth=2, num_image_tokens=16, hidden_act="gelu", **vision_kw)
    vq = dict(embed_dim=8, num_embeddings=48, latent_channels=32, base_channels=32, channel_multiplier=[1, 2],
              num_res_blocks=1, num_patches=4, projection_dim=32, image_token_embed_dim=32, num_hidden_layers=2,
              hidden_act="gelu")
    config = tf.JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=IMG,
                            tie_word_embeddings=False)
    config.boi_token_id, config.eoi_token_id = BOI, EOI  # generation_config's in the releases
    torch.manual_seed(0)
    hf = tf.JanusForConditionalGeneration(config)
    hf.config._attn_implementation = "eager"
    for sub in (hf.config.text_config, hf.config.vision_config, hf.config.vq_config):
        sub._attn_implementation = "eager"
    # larger generation-head weights make the greedy codes vary from position to position
    return perturb(hf, scale=0.05, louder=lambda n: "language_model" in n or "generation_" in n, louder_scale=0.5)


def _understanding_prompt():
    """(ids (1, 24), pixels, the generator drawn from): text, 16 image placeholders, text; one image of 32 px."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 90, (1, 24), generator=g)
    ids[0, 0], ids[0, 4:20] = BOS, IMG
    return ids, torch.rand(1, 3, 32, 32, generator=g) * 2 - 1, g


@pytest.fixture(scope="module")
def janus():
    hf = _tiny_janus()
    cfg, model = import_hf(hf)
    return hf, cfg, model.eval()


def test_janus_import_understanding_logits_and_vq_codes_equal_transformers(janus):
    hf, cfg, model = janus
    gen = cfg["modalities"]["image_gen"]
    assert gen["params"] == {"generation_token_id": 127, "begin_token_id": BOI, "end_token_id": EOI,
                             "item_kind": "image"}
    assert gen["submodules"]["tokenizer"]["module"] == "janus_vq"
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())
    ids, px, g = _understanding_prompt()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px).logits
        out = model(ids, {"images": {"siglip": {"pixel_values": px}}}).logits
    torch.testing.assert_close(out, ref, atol=TOL, rtol=TOL)
    # the VQ: codes and decoded pixels
    tok = model.modalities["image_gen"].tokenizer
    images = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    codes = tok.encode(images)
    with torch.no_grad():
        assert torch.equal(codes, hf.model.vqmodel.encode(images).image_tokens.reshape(2, 16))
        torch.testing.assert_close(tok.decode(codes), hf.model.vqmodel.decode(codes), atol=TOL, rtol=TOL)
    # the tokenizer alone from the whole Janus model (its model.vqmodel): the imported modality's
    from mimo_spec.interop.hf_tokenizers import tokenizer_from_hf

    name, params, state = tokenizer_from_hf(hf)
    assert (name, params) == ("janus_vq", gen["submodules"]["tokenizer"]["params"])
    assert state.keys() == tok.state_dict().keys()
    # the generation path's pieces: code embedding + aligner, and the head
    mod = model.modalities["image_gen"]
    h = torch.randn(3, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(mod.embed_codes(codes), hf.prepare_embeddings_for_image_generation(codes),
                                   atol=TOL, rtol=TOL)
        torch.testing.assert_close(mod.code_logits(h), hf.model.generation_head(h), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("scale", [1.5, 5.0])
def test_janus_guided_image_generation_codes_equal_transformers(janus, scale):
    from mimo_spec.generation import generate

    hf, _, model = janus
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, 90, (1, 7), generator=g)
    prompt[0, 0] = BOS
    hf.generation_config.bos_token_id, hf.generation_config.pad_token_id = BOS, PAD
    hf.generation_config.generation_kwargs = {"boi_token_id": BOI}
    with torch.no_grad():
        ref = hf.generate(torch.cat([prompt, torch.tensor([[BOI]])], 1), generation_mode="image",
                          guidance_scale=scale, do_sample=False, max_new_tokens=16,
                          attention_mask=torch.ones(1, 8, dtype=torch.long))
    out = generate(model, prompt, output_modality="image_gen", guidance_scale=scale, pad_id=PAD, max_new_tokens=18)
    codes = out.codes["image_gen"][0]
    assert torch.equal(codes, ref[0])
    assert codes.unique().numel() > 3
    assert out.tokens[0] == BOI and out.tokens[-1] == EOI
    with torch.no_grad():
        torch.testing.assert_close(out.outputs["image_gen"][0], hf.decode_image_tokens(ref)[0].permute(2, 0, 1),
                                   atol=TOL, rtol=TOL)


def test_janus_greedy_text_generation_about_an_image_equals_transformers(janus):
    from mimo_spec.generation import generate

    hf, _, model = janus
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(3, 90, (1, 22), generator=g)
    ids[0, 0], ids[0, 3:19] = BOS, IMG
    px = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                          do_sample=False, eos_token_id=None, min_new_tokens=8)
    out = generate(model, ids, {"images": {"siglip": {"pixel_values": px}}}, max_new_tokens=8)
    assert out.tokens == ref[0, ids.shape[1]:].tolist() and len(set(out.tokens)) > 2

@torch.no_grad()
def test_janus_export_loads_in_transformers_and_imports_back(janus, tmp_path):
    """export_hf writes a JanusForConditionalGeneration checkpoint (safetensors) that transformers loads with
    every tensor, computing the same logits and VQ codes; import_hf of that folder gives the model again."""
    from mimo_spec.interop import export_hf

    hf, cfg, model = janus
    out_dir = export_hf(model, cfg, tmp_path / "out")
    assert not list(out_dir.glob("*.bin"))
    back, info = tf.JanusForConditionalGeneration.from_pretrained(out_dir, output_loading_info=True)
    assert not any(info.values()), info
    back.eval()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 90, (1, 20), generator=g)
    ids[0, 0], ids[0, 2:18] = BOS, IMG
    px = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    torch.testing.assert_close(back(input_ids=ids, pixel_values=px).logits, hf(input_ids=ids, pixel_values=px).logits,
                               atol=TOL, rtol=TOL)
    images = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    assert torch.equal(back.model.vqmodel.encode(images).image_tokens, hf.model.vqmodel.encode(images).image_tokens)
    codes = torch.randint(0, 48, (1, 16), generator=g)
    torch.testing.assert_close(back.prepare_embeddings_for_image_generation(codes),
                               hf.prepare_embeddings_for_image_generation(codes), atol=TOL, rtol=TOL)
    cfg2, model2 = import_hf(out_dir)  # and back again, from the folder: the same config and weights
    assert cfg2["modalities"] == cfg["modalities"] and cfg2["model"] == cfg["model"]
    sd, sd2 = model.state_dict(), model2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    # a release's config.json holds no <begin_of_image>: its generation_config.json's generation_kwargs does
    import json

    config = json.loads((out_dir / "config.json").read_text())
    del config["boi_token_id"]
    (out_dir / "config.json").write_text(json.dumps(config))
    (out_dir / "generation_config.json").write_text(json.dumps({"generation_kwargs": {"boi_token_id": 99}}))
    assert import_hf(out_dir)[0]["modalities"]["image_gen"]["params"]["begin_token_id"] == 99
    # what JanusForConditionalGeneration cannot compute is refused by name: its code grid is the tower's patch grid
    import copy

    from mimo_spec import build_model
    from mimo_spec.errors import ConfigError

    bad = copy.deepcopy(cfg)
    bad["modalities"]["images"]["submodules"]["encoders"]["siglip"]["params"]["patch_size"] = 16
    with pytest.raises(ConfigError, match="code grid"):
        export_hf(build_model(bad), bad, tmp_path / "bad")


def test_janus_1_3b_preset_is_the_release():
    """conf/preset/janus_1_3b.yaml: transformers' Janus-1.3B (deepseek-ai/Janus-1.3B's config values, written
    out here) has as many parameters, and importing that config gives the preset's values."""
    from conftest import check_preset_is_the_release

    text = dict(model_type="llama", vocab_size=102400, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=16384, rms_norm_eps=1e-6,
                rope_theta=10000.0, bos_token_id=100000, eos_token_id=100001)
    vision = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=384, patch_size=16,
                  mlp_ratio=4.0, projection_dim=2048, depth=2, num_image_tokens=576, hidden_act="gelu",
                  layer_norm_eps=1e-6)
    vq = dict(embed_dim=8, num_embeddings=16384, latent_channels=256, base_channels=128,
              channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=2, projection_dim=2048, image_token_embed_dim=2048,
              num_hidden_layers=2, hidden_act="gelu")
    config = tf.JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=100581,
                            tie_word_embeddings=False)
    ours, resolved, _ = check_preset_is_the_release("janus_1_3b", tf.JanusForConditionalGeneration, config,
                                                    2_076_636_811)
    gen = ours.modalities["image_gen"]
    assert gen.tokenizer.num_tokens == 576 and gen.tokenizer.grid == (24, 24) and gen.num_codes == 16384
    assert sum(p.numel() for p in gen.tokenizer.parameters()) == 71_883_403
    assert ours.modalities["images"].special_token_id == 100581


def test_janus_vision_tower_without_attention_bias_imports_and_exports(tmp_path):
    """vision_config.attention_bias: false (q/k/v without biases) imports with the tower's qkv_bias off and
    exports back to a checkpoint from_pretrained loads whole, with the same understanding logits."""
    from mimo_spec.interop import export_hf

    hf = _tiny_janus(attention_bias=False).eval()
    assert hf.model.vision_model.encoder.layers[0].self_attn.q_proj.bias is None
    ids, px, _ = _understanding_prompt()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px).logits
    hf.save_pretrained(tmp_path / "hf")
    for source in (hf, tmp_path / "hf"):
        cfg, model = import_hf(source)
        assert cfg["modalities"]["images"]["submodules"]["encoders"]["siglip"]["params"]["qkv_bias"] is False
        assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(ids, {"images": {"siglip": {"pixel_values": px}}}).logits, ref,
                                       atol=TOL, rtol=TOL)
    back, info = tf.JanusForConditionalGeneration.from_pretrained(export_hf(model, cfg, tmp_path / "out"),
                                                                  output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(input_ids=ids, pixel_values=px).logits, ref, atol=TOL, rtol=TOL)


def test_an_in_memory_janus_reads_its_begin_of_image_token_from_generation_config():
    """The releases keep <begin_of_image> in generation_config's generation_kwargs, not config.json: import_hf
    of the model object reads it there as it does beside a folder's config.json (it fell back to the default
    id, absent in a small vocabulary, so generation started with a code instead of the begin token)."""
    from mimo_spec.generation import generate

    hf = _tiny_janus().eval()
    del hf.config.boi_token_id
    hf.generation_config.generation_kwargs = {"boi_token_id": BOI}
    cfg, model = import_hf(hf)
    assert cfg["modalities"]["image_gen"]["params"]["begin_token_id"] == BOI
    out = generate(model.eval(), torch.tensor([[BOS, 5, 6, 7]]), output_modality="image_gen", max_new_tokens=18)
    assert out.tokens[0] == BOI and len(out.codes["image_gen"][0]) == 16
    assert not hasattr(hf.config, "mimo_generation_kwargs")  # the caller's config is left as it was


@pytest.mark.parametrize("layout", ["no_bos_first", "bos_twice"])
def test_guided_codes_equal_transformers_when_bos_is_not_only_first(janus, layout):
    """The unconditional row keeps every BOS token (and the begin token), as transformers' Janus builds it, when
    generate is given bos_id: a prompt whose first token is not BOS, or that holds BOS twice (two turns)."""
    from mimo_spec.generation import generate

    hf, _, model = janus
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(3, 90, (1, 9), generator=g)
    if layout == "bos_twice":
        prompt[0, 0] = prompt[0, 5] = BOS
    hf.generation_config.bos_token_id, hf.generation_config.pad_token_id = BOS, PAD
    hf.generation_config.generation_kwargs = {"boi_token_id": BOI}
    with torch.no_grad():
        ref = hf.generate(torch.cat([prompt, torch.tensor([[BOI]])], 1), generation_mode="image", guidance_scale=3.0,
                          do_sample=False, max_new_tokens=16, attention_mask=torch.ones(1, 10, dtype=torch.long))
    out = generate(model, prompt, output_modality="image_gen", guidance_scale=3.0, pad_id=PAD, max_new_tokens=18,
                   bos_id=BOS)
    assert torch.equal(out.codes["image_gen"][0], ref[0])
    plain = generate(model, prompt, output_modality="image_gen", guidance_scale=3.0, pad_id=PAD, max_new_tokens=18)
    assert not torch.equal(plain.codes["image_gen"][0], ref[0])  # without bos_id: the first token is kept
