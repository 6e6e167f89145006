"""Chameleon through import_hf against transformers' ChameleonForConditionalGeneration (a tiny random model with
perturbed weights, fp32, CPU): text logits and logits with an image prompt (pixels -> VQ codes -> LM tokens),
the VQ codes, greedy image-code generation against a greedy loop over transformers' model restricted to the
image tokens (its own forward forbids them), export back to transformers; and the Chameleon-7B preset's
parameter count against the released config."""

import pytest
import torch
import transformers as tf

from conftest import perturb
from mimo_spec.interop import import_hf

TOL = 2e-5
BOS, IMG, BOI, EOI, GEN = 1, 8, 9, 10, 11
CODES = 32  # the VQ's codebook; 16 px images, one 2x downsampling: 8 x 8 = 64 codes per image


def _vocabulary_map():
    """Text ids 13..63 and 96..127; the 32 image codes at ids 64..95 in a shuffled order (img2bpe is a map)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<reserved08706>": 7, "<image>": IMG, "<racm3:break>": BOI,
             "<eoss>": EOI, "<reserved08708>": GEN, "<reserved08709>": 12}  # generation: the first reserved after <image>
    order = torch.randperm(CODES, generator=torch.Generator().manual_seed(5)).tolist()
    for code, slot in enumerate(order):
        vocab["IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"] = 64 + slot
    return vocab


def _tiny_chameleon():
    vq = dict(embed_dim=8, num_embeddings=CODES, latent_channels=32, resolution=16, base_channels=32,
              channel_multiplier=[1, 2], num_res_blocks=1)
    config = tf.ChameleonConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                rms_norm_eps=1e-6, vq_config=vq, vocabulary_map=_vocabulary_map(), bos_token_id=BOS,
                                eos_token_id=2, pad_token_id=3)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = tf.ChameleonForConditionalGeneration(config)
    # the per-head q/k norms' weights and biases away from 1 / 0 (a swapped or shared head would show)
    return perturb(hf, scale=0.05, louder=lambda n: not n.startswith("model.vqmodel"), louder_scale=0.3)


@pytest.fixture(scope="module")
def chameleon():
    hf = _tiny_chameleon()
    cfg, model = import_hf(hf)
    return hf, cfg, model.eval()


def _hf_logits(hf, **kw):
    """transformers' logits before its forward forbids the image tokens: lm_head over the model's states."""
    return hf.lm_head(hf.model(**kw).last_hidden_state)


@torch.no_grad()
def test_chameleon_import_logits_and_vq_codes_equal_transformers(chameleon):
    hf, cfg, model = chameleon
    images = cfg["modalities"]["images"]
    assert images["params"] == {"special_token_id": IMG, "begin_token_id": BOI, "end_token_id": EOI,
                                "generation_token_id": GEN, "code_token_offset": 64, "item_kind": "image"}
    assert images["submodules"]["tokenizer"]["module"] == "chameleon_vq"
    assert cfg["model"]["params"]["qk_norm_kind"] == "layernorm_per_head"
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())
    mod = model.modalities["images"]
    img2bpe = hf.model.vocabulary_mapping.img2bpe
    assert mod.code_token_ids.tolist() == [img2bpe[c] for c in range(CODES)]
    g = torch.Generator().manual_seed(1)
    # text only: every logit (the image-token columns before transformers' forward forbids them)
    ids = torch.randint(13, 64, (1, 12), generator=g)
    ids[0, 0] = BOS
    out = model(ids).logits
    torch.testing.assert_close(out, _hf_logits(hf, input_ids=ids), atol=TOL, rtol=TOL)
    ref = hf(input_ids=ids).logits
    text = torch.ones(128, dtype=torch.bool)
    text[mod.code_token_ids] = False
    torch.testing.assert_close(out[..., text], ref[..., text], atol=TOL, rtol=TOL)
    assert (ref[..., ~text] == torch.finfo(ref.dtype).min).all()
    # an image prompt as ChameleonProcessor lays it out: <racm3:break>, 64 x <image>, <eoss>, in text
    ids = torch.randint(13, 64, (1, 74), generator=g)
    ids[0, 0], ids[0, 4], ids[0, 5:69], ids[0, 69] = BOS, BOI, IMG, EOI
    px = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    out = model(ids, {"images": {"tokenizer": {"pixel_values": px}}}).logits
    torch.testing.assert_close(out, _hf_logits(hf, input_ids=ids, pixel_values=px), atol=TOL, rtol=TOL)
    # the VQ codes, and the LM tokens transformers puts at the placeholders
    images = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    codes = mod.tokenize(images)
    assert torch.equal(codes, hf.model.vqmodel.encode(images).image_tokens.reshape(2, 64))
    assert torch.equal(mod.code_token_ids[codes], hf.get_image_tokens(images))
    assert codes.unique().numel() > 3
    from mimo_spec.interop.hf_tokenizers import tokenizer_from_hf  # the tokenizer alone: the modality's

    name, params, state = tokenizer_from_hf(hf)
    assert (name, params) == ("chameleon_vq", cfg["modalities"]["images"]["submodules"]["tokenizer"]["params"])
    assert state.keys() == mod.tokenizer.state_dict().keys()
    # training on an image target (teacher forcing): its codes' loss is the cross entropy of transformers' head
    # restricted to the image tokens, over the sequence holding the codes' tokens
    ids[0, 5:69] = GEN
    out = model(ids, output_targets={"images": px}, labels=ids)
    codes = mod.tokenize(px)[0]
    tokens = ids.clone()
    tokens[0, 5:69] = mod.code_token_ids[codes]
    ref = _hf_logits(hf, input_ids=tokens)[0, 4:68][:, mod.code_token_ids]
    torch.testing.assert_close(out.modality_losses["images"], torch.nn.functional.cross_entropy(ref, codes),
                               atol=TOL, rtol=TOL)
    # the head restricted to the codes is the LM head's image-token columns in code order
    h = torch.randn(3, 32, generator=g)
    torch.testing.assert_close(mod.code_logits(h), hf.lm_head(h)[:, mod.code_token_ids], atol=TOL, rtol=TOL)


@torch.no_grad()
def test_chameleon_greedy_image_codes_equal_a_transformers_greedy_loop(chameleon):
    """transformers' generate cannot write images (its forward forbids the image tokens): the reference is a
    greedy loop over its model and head restricted to the image tokens, after <racm3:break>."""
    from mimo_spec.generation import generate

    hf, _, model = chameleon
    mod = model.modalities["images"]
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(13, 64, (1, 6), generator=g)
    prompt[0, 0] = BOS
    ids, ref = torch.cat([prompt, torch.tensor([[BOI]])], 1), []
    for _ in range(64):
        logits = _hf_logits(hf, input_ids=ids)[:, -1, mod.code_token_ids]
        code = int(logits.argmax(-1))
        ref.append(code)
        ids = torch.cat([ids, mod.code_token_ids[code].view(1, 1)], 1)
    out = generate(model, prompt, output_modality="images", max_new_tokens=66)
    codes = out.codes["images"][0]
    assert codes.tolist() == ref
    assert len(set(ref)) > 3
    assert out.tokens[0] == BOI and out.tokens[-1] == EOI
    assert "images" not in out.outputs  # chameleon_vq cannot decode (transformers' VQ holds no decoder either)
    # greedy text equals transformers' generate (which forbids the image tokens, as ours does for text)
    ref = hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=7, do_sample=False,
                      eos_token_id=None, min_new_tokens=7)
    out = generate(model, prompt, max_new_tokens=7)
    assert out.tokens == ref[0, prompt.shape[1]:].tolist() and len(set(out.tokens)) > 2


@torch.no_grad()
def test_chameleon_text_that_picks_racm3_break_equals_transformers_greedy():
    """<racm3:break> (the image's begin token) picked in text is text, as transformers' generate treats it:
    Chameleon's VQ cannot turn codes into pixels, so no image is started (it was masked while an image did
    not fit, or started an undecodable one, and the text left transformers')."""
    from mimo_spec.generation import generate

    hf = _tiny_chameleon()
    hf.lm_head.weight[BOI] += 0.5 * hf.lm_head.weight.mean(0)  # the break token comes up in text
    _, model = import_hf(hf)
    model.eval()
    found = 0
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(13, 64, (1, 6), generator=g)
        prompt[0, 0] = BOS
        ref = hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                          do_sample=False, eos_token_id=None, min_new_tokens=10)[0, prompt.shape[1]:].tolist()
        found += BOI in ref
        out = generate(model, prompt, max_new_tokens=10)
        assert out.tokens == ref and not out.codes, seed
    assert found >= 2


@torch.no_grad()
def test_chameleon_export_loads_in_transformers_and_imports_back(chameleon, tmp_path):
    """export_hf writes a ChameleonForConditionalGeneration checkpoint (safetensors) that transformers loads with
    every tensor, computing the same logits and image tokens; import_hf of that folder gives the model again."""
    from mimo_spec.interop import export_hf

    hf, cfg, model = chameleon
    out_dir = export_hf(model, cfg, tmp_path / "out")
    back, info = tf.ChameleonForConditionalGeneration.from_pretrained(out_dir, output_loading_info=True)
    assert not any(info.values()), info
    back.eval()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(13, 64, (1, 70), generator=g)
    ids[0, 0], ids[0, 2], ids[0, 3:67], ids[0, 67] = BOS, BOI, IMG, EOI
    px = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    torch.testing.assert_close(back(input_ids=ids, pixel_values=px).logits, hf(input_ids=ids, pixel_values=px).logits,
                               atol=TOL, rtol=TOL)
    assert torch.equal(back.get_image_tokens(px), hf.get_image_tokens(px))
    cfg2, model2 = import_hf(out_dir)  # and back again, from the folder: the same config and weights
    assert cfg2["modalities"] == cfg["modalities"] and cfg2["model"] == cfg["model"]
    sd, sd2 = model.state_dict(), model2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    # what Chameleon cannot be is refused by name
    import copy

    from mimo_spec import build_model
    from mimo_spec.errors import ConfigError, InputError

    bad = copy.deepcopy(cfg)
    bad["model"]["params"]["qk_norm_kind"] = "rmsnorm"
    with pytest.raises(ConfigError, match="qk_norm_kind"):
        export_hf(build_model(bad), bad, tmp_path / "bad")
    # swin_norm (each sublayer's output normalised before the residual add): the same logits, and it exports back
    torch.manual_seed(1)
    swin = perturb(tf.ChameleonForConditionalGeneration(tf.ChameleonConfig(**{**hf.config.to_dict(),
                                                                                 "swin_norm": True})), scale=0.2)
    cfg3, model3 = import_hf(swin)
    assert cfg3["model"]["params"]["swin_norm"] is True
    torch.testing.assert_close(model3(ids, {"images": {"tokenizer": {"pixel_values": px}}}).logits,
                               _hf_logits(swin, input_ids=ids, pixel_values=px), atol=TOL, rtol=TOL)
    back = tf.ChameleonForConditionalGeneration.from_pretrained(export_hf(model3, cfg3, tmp_path / "swin")).eval()
    assert back.config.swin_norm
    torch.testing.assert_close(back(input_ids=ids, pixel_values=px).logits, swin(input_ids=ids, pixel_values=px).logits,
                               atol=TOL, rtol=TOL)
    with pytest.raises(InputError, match="vocabulary_map has no '<image>'"):
        import_hf(tf.ChameleonForConditionalGeneration(tf.ChameleonConfig(
            **{**hf.config.to_dict(), "vocabulary_map": {"IMGIMGAZ": 5}})))


def test_chameleon_7b_preset_is_the_release():
    """conf/preset/chameleon_7b.yaml: transformers' Chameleon-7B (facebook/chameleon-7b's config values, written out
    here: its LM and VQ values are ChameleonConfig's defaults; of its vocabulary_map, the tokens the model uses)
    has as many parameters, and importing that config gives the preset's values."""
    from conftest import check_preset_is_the_release

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<eoss>": 8196, "<racm3:break>": 8197, "<reserved08706>": 8710,
             "<image>": 8711, "<reserved08708>": 8712, "<reserved08709>": 8713}
    for code in range(8192):  # the image codes' tokens: IMGIMG<code in letters A-J>Z, ids 4 .. 8195
        vocab["IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"] = 4 + code
    vq = dict(embed_dim=256, num_embeddings=8192, double_latent=False, latent_channels=256, resolution=512,
              in_channels=3, base_channels=128, channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=2,
              attn_resolutions=None, attn_type="vanilla")
    config = tf.ChameleonConfig(vocab_size=65536, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, hidden_act="silu",
                                max_position_embeddings=4096, rms_norm_eps=1e-5, rope_parameters={
                                    "rope_type": "default", "rope_theta": 10000.0}, attention_bias=False,
                                swin_norm=False, tie_word_embeddings=False, bos_token_id=0, eos_token_id=2,
                                pad_token_id=1, vq_config=vq, vocabulary_map=vocab)
    ours, resolved, _ = check_preset_is_the_release("chameleon_7b", tf.ChameleonForConditionalGeneration, config,
                                                    7_043_090_432)
    import inspect

    from mimo_spec.registry import resolve

    for kind, node in (("language_model", resolved["model"]),  # the files spell out every parameter
                       ("tokenizer", resolved["modalities"]["images"]["submodules"]["tokenizer"])):
        wanted = set(inspect.signature(resolve(kind, node["module"]).__init__).parameters) - {"self", "backend"}
        assert set(node["params"]) == wanted, (node["module"], wanted ^ set(node["params"]))
    images = ours.modalities["images"]
    assert images.tokenizer.num_tokens == 1024 and images.tokenizer.grid == (32, 32) and images.num_codes == 8192
    assert sum(p.numel() for p in images.tokenizer.parameters()) == 29_423_616
    from mimo_spec.interop.hf_chameleon import vocabulary_ids

    # the map the import writes into code_token_ids is the preset's code_token_offset + code
    assert vocabulary_ids(vocab, 8192, 65536, "config.json")["codes"] == list(range(4, 8196))
