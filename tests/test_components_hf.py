"""Components against Hugging Face reference models (tiny, random weights, fp32, CPU)."""

from __future__ import annotations

import inspect
import typing

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mimo_spec.components.audio.whisper import WhisperEncoder  # noqa: E402
from mimo_spec.components.language.gpt import GPT  # noqa: E402
from mimo_spec.components.vision.clip_vit import ClipViT  # noqa: E402
from mimo_spec.errors import InputError  # noqa: E402
from mimo_spec.interop import hf_weights as hw  # noqa: E402

TOL = 1e-5


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Noise on every parameter, so norms (ones) and biases (zeros) are not trivially right."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _maxerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _lm_configs():
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    return {
        "llama": transformers.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common),
        "qwen2": transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **common),
        "mistral": transformers.MistralConfig(num_key_value_heads=1, tie_word_embeddings=False, **common),
        "gpt2": transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64),
    }


_HF_LM = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
          "gpt2": "GPT2LMHeadModel"}


def _lm_pair(kind: str):
    torch.manual_seed(0)
    config = _lm_configs()[kind]
    hf = _perturb(getattr(transformers, _HF_LM[kind])(config))
    params = hw.gpt_params_from_hf(config)
    ours = GPT(**params).eval()
    ours.load_state_dict(hw.gpt_state_dict_from_hf(hf.state_dict(), params), strict=True)
    return hf, ours, params


def _ours_logits(model: GPT, ids: torch.Tensor, **kw) -> torch.Tensor:
    return model.logits(model(model.embed_tokens(ids), **kw))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gpt2"])
@torch.no_grad()
def test_causal_lm_matches_hf(kind):
    hf, ours, params = _lm_pair(kind)
    ids = torch.randint(0, 128, (2, 12))
    assert _maxerr(hf(ids).logits, _ours_logits(ours, ids)) <= TOL
    # Left padding on row 1: compare only real tokens (padded queries are don't-care).
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    ref, got = hf(ids, attention_mask=mask).logits, _ours_logits(ours, ids, attention_mask=mask)
    keep = mask.bool()
    assert _maxerr(ref[keep], got[keep]) <= TOL
    if kind == "qwen2":
        assert ours.lm_head is None and "layers.0.attn.qkv.bias" in ours.state_dict()
        assert "layers.0.attn.out.bias" not in ours.state_dict()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@torch.no_grad()
def test_export_round_trip(kind):
    hf, ours, params = _lm_pair(kind)
    fresh = getattr(transformers, _HF_LM[kind])(hf.config).eval()
    fresh.load_state_dict(hw.gpt_state_dict_to_hf(ours.state_dict(), params), strict=True)
    ids = torch.randint(0, 128, (2, 9))
    assert _maxerr(fresh(ids).logits, hf(ids).logits) <= TOL


@pytest.mark.parametrize("padded", [False, True])
@torch.no_grad()
def test_kv_cache_greedy_matches_full_recompute(padded):
    _, ours, _ = _lm_pair("llama")
    ids = torch.randint(0, 128, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    if padded:
        mask[0, :2] = 0
    cache = ours.new_kv_cache(2, 16)
    step_ids, step_mask = ids, mask if padded else None
    for _ in range(6):
        cached = _ours_logits(ours, step_ids, attention_mask=step_mask, kv_cache=cache)[:, -1]
        full_mask = torch.cat([mask, torch.ones(2, ids.shape[1] - 5, dtype=torch.long)], 1) if padded else None
        full = _ours_logits(ours, ids, attention_mask=full_mask)[:, -1]
        assert _maxerr(cached, full) <= TOL
        step_ids = cached.argmax(-1, keepdim=True)
        step_mask = torch.ones(2, 1, dtype=torch.long) if padded else None
        ids = torch.cat([ids, step_ids], dim=1)
    assert cache.length == 10


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@torch.no_grad()
def test_packing_equals_separate_documents(kind):
    _, ours, _ = _lm_pair(kind)
    lengths = [3, 5, 4]
    docs = [torch.randint(0, 128, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    got = _ours_logits(ours, packed, position_ids=pos, document_ids=doc_ids)
    ref = torch.cat([_ours_logits(ours, d) for d in docs], dim=1)
    assert _maxerr(got, ref) <= TOL


def _clip_config():
    return transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                         num_attention_heads=4, image_size=32, patch_size=8)


@pytest.mark.parametrize("feature_layer,select", [(-2, "patch"), (-1, "all")])
@torch.no_grad()
def test_clip_vision_matches_hf(feature_layer, select):
    torch.manual_seed(0)
    config = _clip_config()
    hf = _perturb(transformers.CLIPVisionModel(config))
    params = hw.clip_vit_params_from_hf(config, feature_layer=feature_layer, feature_select=select)
    ours = ClipViT(**params).eval()
    assert len(ours.layers) == 3 + 1 + feature_layer  # blocks past the feature layer are not built
    ours.load_state_dict(hw.clip_vit_state_dict_from_hf(hf.state_dict(), params), strict=True)
    x = torch.randn(2, 3, 32, 32)
    ref = hf(x, output_hidden_states=True).hidden_states[feature_layer]
    ref = ref[:, 1:] if select == "patch" else ref
    got = ours(x)
    assert got.shape == (2, ours.tokens_per_item(x.shape), 64)
    assert _maxerr(ref, got) <= TOL


@torch.no_grad()
def test_siglip_vision_matches_hf():
    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=32, patch_size=8)
    hf = _perturb(transformers.SiglipVisionModel(config))
    params = hw.clip_vit_params_from_hf(config)
    ours = ClipViT(**params).eval()
    ours.load_state_dict(hw.clip_vit_state_dict_from_hf(hf.state_dict(), params), strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert _maxerr(hf(x).last_hidden_state, ours(x)) <= TOL
    assert ours.tokens_per_item(x.shape) == 16


@torch.no_grad()
def test_whisper_encoder_matches_hf():
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

    torch.manual_seed(0)
    config = transformers.WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4,
                                        encoder_ffn_dim=96, num_mel_bins=16, max_source_positions=24)
    hf = _perturb(HFWhisperEncoder(config))
    params = hw.whisper_encoder_params_from_hf(config)
    ours = WhisperEncoder(**params).eval()
    ours.load_state_dict(hw.whisper_encoder_state_dict_from_hf(hf.state_dict(), params), strict=True)
    x = torch.randn(2, 16, 48)  # HF needs exactly 2 * max_source_positions frames
    assert _maxerr(hf(x).last_hidden_state, ours(x)) <= TOL
    # Shorter inputs are fine for ours: ceil(frames / 2) tokens.
    assert ours(x[..., :37]).shape == (2, 19, 64) == (2, ours.tokens_per_item((2, 16, 37)), 64)
    # Export round trip (the key bias is dropped again).
    fresh = HFWhisperEncoder(config).eval()
    fresh.load_state_dict(hw.whisper_encoder_state_dict_to_hf(ours.state_dict(), params), strict=True)
    assert _maxerr(fresh(x).last_hidden_state, hf(x).last_hidden_state) <= TOL


@torch.no_grad()
def test_dynamic_image_size():
    torch.manual_seed(0)
    kw = dict(image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=96,
              feature_select="all")
    static, dynamic = ClipViT(**kw).eval(), ClipViT(**kw, dynamic_image_size=True).eval()
    dynamic.load_state_dict(static.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert _maxerr(static(x), dynamic(x)) == 0.0
    big = torch.randn(1, 3, 48, 64)
    dynamic.validate_inputs({"pixel_values": big}, "encoders.image")
    assert dynamic(big).shape == (1, 6 * 8 + 1, 64) == (1, dynamic.tokens_per_item(big.shape), 64)
    with pytest.raises(InputError, match="multiples of patch_size 8"):
        dynamic.validate_inputs({"pixel_values": torch.randn(1, 3, 30, 32)}, "encoders.image")


def test_compile_fullgraph():
    torch._dynamo.reset()
    _, ours, _ = _lm_pair("llama")
    x = ours.embed_tokens(torch.randint(0, 128, (2, 8))).detach()
    with torch.no_grad():  # real inductor codegen once
        assert _maxerr(torch.compile(ours, fullgraph=True)(x), ours(x)) <= TOL
    # Every attention pattern without graph breaks (aot_eager: same graph capture, no codegen wait).
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]] * 2)
    with torch.no_grad():
        for kw in ({"attention_mask": mask}, {"document_ids": doc}):
            assert _maxerr(compiled(x, **kw), ours(x, **kw)) <= TOL
    compiled(x).sum().backward()
    assert ours.layers[0].attn.qkv.weight.grad is not None
    for enc in (ClipViT(image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=96),
                WhisperEncoder(hidden_size=64, num_layers=1, num_heads=4, ffn_hidden_size=96, num_mel_bins=16,
                               max_source_positions=8)):
        inputs = enc.example_inputs(2)
        with torch.no_grad():
            got = torch.compile(enc, fullgraph=True, backend="aot_eager")(**inputs)
            assert _maxerr(got, enc(**inputs)) <= TOL


@pytest.mark.parametrize("ctor,kwargs,message", [
    (GPT, dict(vocab_size=10, hidden_size=100, num_layers=1, num_heads=3),
     r"hidden_size \(100\) must be divisible by num_heads \(3\)"),
    (GPT, dict(vocab_size=10, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=3),
     r"num_heads \(4\) must be divisible by num_kv_heads \(3\)"),
    (GPT, dict(vocab_size=10, hidden_size=12, num_layers=1, num_heads=4),
     r"head_dim \(3\) must be even"),
    (GPT, dict(vocab_size=10, hidden_size=64, num_layers=1, num_heads=4, backend="te"),
     r"backend 'te' cannot run here: (transformer-engine|CUDA)"),
    (ClipViT, dict(image_size=6, patch_size=8, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=8),
     r"image_size \(6\) must be at least patch_size \(8\)"),
    (ClipViT, dict(image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=8,
                   feature_layer=-4), r"feature_layer \(-4\) is out of range for num_layers \(2\)"),
    (WhisperEncoder, dict(hidden_size=66, num_layers=1, num_heads=4, ffn_hidden_size=8),
     r"hidden_size \(66\) must be divisible by num_heads \(4\)"),
])
def test_constructor_errors(ctor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ctor(**kwargs)


def test_input_errors():
    vit = ClipViT(image_size=32, patch_size=8, hidden_size=64, num_layers=1, num_heads=4, ffn_hidden_size=8)
    path = "modalities.images.encoder"
    good = vit.example_inputs(2, torch.Generator().manual_seed(0))
    assert good["pixel_values"].shape == (2, 3, 32, 32)
    vit.validate_inputs(good, path)
    cases = [
        ({"pixel_values": torch.randn(3, 32, 32)},
         r"images\.encoder\.pixel_values: expected shape \(N, 3, 32, 32\), got \(3, 32, 32\)"),
        ({"pixel_values": torch.randn(2, 1, 32, 32)},
         r"images\.encoder\.pixel_values: expected shape \(N, 3, 32, 32\), got \(2, 1, 32, 32\)"),
        ({"pixel_values": torch.randn(2, 3, 64, 64)}, r"got \(2, 3, 64, 64\).*dynamic_image_size"),
        ({"pixel_values": torch.zeros(2, 3, 32, 32, dtype=torch.uint8)}, r"floating-point tensor"),
        ({**good, "pixel_mask": good["pixel_values"]}, r"images\.encoder\.pixel_mask: unexpected input"),
        ({}, r"images\.encoder\.pixel_values: missing input 'pixel_values'"),
    ]
    for inputs, message in cases:
        with pytest.raises(InputError, match=message):
            vit.validate_inputs(inputs, path)
    audio = WhisperEncoder(hidden_size=64, num_layers=1, num_heads=4, ffn_hidden_size=8, num_mel_bins=16,
                           max_source_positions=8)
    audio.validate_inputs(audio.example_inputs(1), "audio")
    with pytest.raises(InputError, match=r"audio\.input_features: .*got \(1, 16, 17\)"):
        audio.validate_inputs({"input_features": torch.randn(1, 16, 17)}, "audio")
    with pytest.raises(InputError, match=r"audio\.input_features: .*got \(16, 10\)"):
        audio.validate_inputs({"input_features": torch.randn(16, 10)}, "audio")
    gpt2 = GPT(vocab_size=10, hidden_size=16, num_layers=1, num_heads=2, position_embedding="learned", max_seq_len=8)
    with pytest.raises(InputError, match=r"sequence length 9 exceeds max_seq_len 8"):
        gpt2(torch.randn(1, 9, 16))


def test_registered_and_typed():
    from mimo_spec.registry import registry

    for kind, name, cls in (("language_model", "gpt", GPT), ("encoder", "clip_vit", ClipViT),
                            ("encoder", "whisper_encoder", WhisperEncoder)):
        assert registry(kind).get(name) is cls
        hints = typing.get_type_hints(cls.__init__)  # resolvable, for pydantic binding
        names = [n for n in inspect.signature(cls).parameters]
        assert names and all(n in hints for n in names), set(names) - set(hints)
        assert "backend" in names
    assert hw.params_from_hf(_lm_configs()["mistral"])[0] == "gpt"


@torch.no_grad()
def test_llava_checkpoint_layout():
    """Both towers convert straight from a LlavaForConditionalGeneration state dict (prefixes found)."""
    torch.manual_seed(0)
    text = _lm_configs()["llama"]
    config = transformers.LlavaConfig(vision_config=_clip_config(), text_config=text, vision_feature_layer=-2,
                                      image_token_index=127)
    hf = _perturb(transformers.LlavaForConditionalGeneration(config))
    sd = hf.state_dict()
    vit_params = hw.clip_vit_params_from_hf(config.vision_config, feature_layer=-2)
    vit = ClipViT(**vit_params).eval()
    vit.load_state_dict(hw.clip_vit_state_dict_from_hf(sd, vit_params), strict=True)
    lm_params = hw.gpt_params_from_hf(config.text_config)
    lm = GPT(**lm_params).eval()
    lm.load_state_dict(hw.gpt_state_dict_from_hf(sd, lm_params), strict=True)
    x = torch.randn(1, 3, 32, 32)
    ref = hf.model.vision_tower(x, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert _maxerr(ref, vit(x)) <= TOL
    ids = torch.randint(0, 120, (2, 7))
    ref = hf.lm_head(hf.model.language_model(input_ids=ids).last_hidden_state)
    assert _maxerr(ref, _ours_logits(lm, ids)) <= TOL
