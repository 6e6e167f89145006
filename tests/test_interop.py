"""Hugging Face import / export against transformers models built locally (tiny, random, fp32, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from conftest import tiny_config  # noqa: E402

from mimo_spec.builders import build_model, build_module  # noqa: E402
from mimo_spec.errors import ConfigError, InputError  # noqa: E402
from mimo_spec.interop import export_hf, import_hf, import_hf_to_dir, load_imported  # noqa: E402

TOL = 1e-5
IMAGE_TOKEN = 127


def _perturb(model):
    """Noise on every parameter, so norms (ones) and biases (zeros) are not trivially right."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _maxerr(a, b) -> float:
    return (a - b).abs().max().item()


def _llama_config(**kw):
    return transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=False, **kw)


def _clip_config():
    return transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                         num_attention_heads=4, image_size=32, patch_size=8)


def _llava():
    torch.manual_seed(0)
    config = transformers.LlavaConfig(vision_config=_clip_config(), text_config=_llama_config(),
                                      vision_feature_layer=-2, image_token_index=IMAGE_TOKEN)
    return _perturb(transformers.LlavaForConditionalGeneration(config))


def _llava_batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 120, (2, 24), generator=g)
    ids[0, 2:18] = IMAGE_TOKEN  # 16 patches per image, pre-expanded
    ids[1, 6:22] = IMAGE_TOKEN
    labels = ids.masked_fill(ids == IMAGE_TOKEN, -100)
    return ids, torch.randn(2, 3, 32, 32, generator=g), labels


def _save(hf, path, **kw):
    hf.save_pretrained(path, **kw)
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(0)
    hf = _perturb(transformers.LlamaForCausalLM(_llama_config()))
    return hf, _save(hf, tmp_path_factory.mktemp("llama"))


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("source", ["dir", "sharded", "memory"])
@torch.no_grad()
def test_llama_gqa(llama, tmp_path, source):
    hf, path = llama
    if source == "sharded":
        path = _save(hf, tmp_path, max_shard_size="20KB")
        where = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
        # some fused tensor (q|k|v or gate|up) has its parts in two shards
        assert any(len({where[f"model.layers.{i}.{a}"], where[f"model.layers.{i}.{b}"]}) == 2 for i in range(2)
                   for a, b in (("self_attn.q_proj.weight", "self_attn.v_proj.weight"),
                                ("mlp.gate_proj.weight", "mlp.up_proj.weight")))
    cfg, model = import_hf(hf if source == "memory" else path)
    assert cfg["model"]["params"]["num_kv_heads"] == 2 and cfg["modalities"] == {}
    ids = torch.randint(0, 128, (2, 11))
    assert _maxerr(model.eval()(ids).logits, hf(ids).logits) <= TOL
    if source == "memory":  # copied, not shared: training ours leaves the HF model alone
        model.language_model.token_embedding.weight.data.zero_()
        assert hf.model.embed_tokens.weight.abs().sum() > 0


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
@torch.no_grad()
def test_mistral_qwen2_import_export(tmp_path, kind):
    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if kind == "mistral":
        hf = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=None, **common))
    else:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(tie_word_embeddings=True, **common))
    hf = _perturb(hf)
    cfg, model = import_hf(hf)
    ids = torch.randint(0, 128, (2, 10))
    assert _maxerr(model.eval()(ids).logits, hf(ids).logits) <= TOL
    back = type(hf).from_pretrained(export_hf(model, cfg, tmp_path / "out")).eval()
    assert _maxerr(back(ids).logits, hf(ids).logits) <= TOL


@torch.no_grad()
def test_clip_tower_at_layer_minus_2(tmp_path):
    torch.manual_seed(0)
    hf = _perturb(transformers.CLIPVisionModel(_clip_config()))
    cfg, vit = import_hf(_save(hf, tmp_path / "clip"))
    x = torch.randn(2, 3, 32, 32)
    ref = hf(x, output_hidden_states=True)
    assert _maxerr(vit(x), ref.last_hidden_state) <= TOL  # the import reads the tower's last_hidden_state
    # Every block is kept, so the same weights serve an edited config read LLaVA-style at layer -2.
    cfg["params"].update(feature_layer=-2, feature_select="patch")
    llava_style = build_module(cfg, kind="encoder").eval()
    llava_style.load_state_dict(vit.state_dict(), strict=True)
    assert _maxerr(llava_style(x), ref.hidden_states[-2][:, 1:]) <= TOL
    back = transformers.CLIPVisionModel.from_pretrained(export_hf(vit, cfg, tmp_path / "out")).eval()
    assert _maxerr(back(x).last_hidden_state, ref.last_hidden_state) <= TOL
    assert _maxerr(back(x).pooler_output, ref.pooler_output) <= TOL  # post_layernorm round-trips too


@torch.no_grad()
def test_clip_dual_model_takes_the_vision_half():
    torch.manual_seed(0)
    text = transformers.CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                       num_attention_heads=4)
    hf = _perturb(transformers.CLIPModel(transformers.CLIPConfig(text_config=text.to_dict(),
                                                                 vision_config=_clip_config().to_dict())))
    _, vit = import_hf(hf)
    x = torch.randn(1, 3, 32, 32)
    assert _maxerr(vit(x), hf.vision_model(x).last_hidden_state) <= TOL


@torch.no_grad()
def test_siglip(tmp_path):
    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=32, patch_size=8)
    hf = _perturb(transformers.SiglipVisionModel(config))  # with its pooling head, which is skipped
    cfg, vit = import_hf(_save(hf, tmp_path / "siglip"))
    x = torch.randn(2, 3, 32, 32)
    assert _maxerr(vit(x), hf(x).last_hidden_state) <= TOL
    back = transformers.SiglipVisionModel.from_pretrained(export_hf(vit, cfg, tmp_path / "out")).eval()
    assert back.config.vision_use_head is False
    assert _maxerr(back(x).last_hidden_state, hf(x).last_hidden_state) <= TOL


@torch.no_grad()
def test_whisper_encoder(tmp_path):
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

    torch.manual_seed(0)
    config = transformers.WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=96,
                                        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=96,
                                        num_mel_bins=16, max_source_positions=24, vocab_size=100,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    hf = _perturb(transformers.WhisperForConditionalGeneration(config))  # the decoder is skipped
    cfg, enc = import_hf(_save(hf, tmp_path / "whisper"))
    assert cfg["module"] == "whisper_encoder"
    x = torch.randn(2, 16, 48)
    ref = hf.model.encoder(x).last_hidden_state
    assert _maxerr(enc(x), ref) <= TOL
    back = HFWhisperEncoder.from_pretrained(export_hf(enc, cfg, tmp_path / "out")).eval()
    assert _maxerr(back(x).last_hidden_state, ref) <= TOL


@torch.no_grad()
def test_llava_end_to_end_with_loss(tmp_path):
    hf = _llava()
    cfg, model = import_hf(_save(hf, tmp_path / "llava"))
    images = cfg["modalities"]["images"]
    assert images["params"]["special_token_id"] == IMAGE_TOKEN
    assert images["submodules"]["encoders"]["clip"]["params"]["feature_layer"] == -2
    ids, px, labels = _llava_batch()
    ref = hf(input_ids=ids, pixel_values=px, labels=labels)
    model.eval()
    out = model(ids, {"images": {"clip": {"pixel_values": px}}}, labels=labels)
    assert _maxerr(out.logits, ref.logits) <= TOL
    assert abs(out.loss.item() - ref.loss.item()) <= TOL
    _, in_memory = import_hf(hf)  # transformers 5's in-memory key layout differs from the Hub's
    assert _maxerr(in_memory.eval()(ids, {"images": {"clip": {"pixel_values": px}}}).logits, ref.logits) <= TOL
    # export -> transformers -> the same numbers, with no missing or unexpected keys
    back, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        export_hf(model, cfg, tmp_path / "out", max_shard_size=50_000), output_loading_info=True)
    assert not any(info.values()), info
    again = back.eval()(input_ids=ids, pixel_values=px, labels=labels)
    assert _maxerr(again.logits, ref.logits) <= TOL and abs(again.loss.item() - ref.loss.item()) <= TOL
    # import to a directory (our YAML + safetensors), then rebuild from it
    yaml_path, weights = import_hf_to_dir(tmp_path / "llava", tmp_path / "imported")
    assert yaml_path.read_text().startswith("# Imported from") and weights.is_file()
    _, rebuilt = load_imported(tmp_path / "imported")
    assert _maxerr(rebuilt.eval()(ids, {"images": {"clip": {"pixel_values": px}}}).logits, ref.logits) <= TOL
    assert build_model(yaml_path, device="meta") is not None


@torch.no_grad()
def test_export_lean_vision_tower(tmp_path):
    """A tower built without keep_unused_layers exports just its blocks, read at the last one."""

    model = _perturb(build_model(tiny_config(), seed=0))
    enc = model.spec.modalities["images"].submodules["encoders"]["clip"]
    enc.params["feature_layer"] = -2  # 1 of 2 blocks built
    model = _perturb(build_model(model.spec, seed=0))
    assert len(model.modalities["images"].encoders["clip"].layers) == 1
    batch = model.example_inputs(2)
    ours = model(batch["input_ids"], batch["modality_inputs"])
    back = transformers.LlavaForConditionalGeneration.from_pretrained(export_hf(model, None, tmp_path)).eval()
    assert back.config.vision_config.num_hidden_layers == 1 and back.config.vision_feature_layer == -1
    ref = back(input_ids=batch["input_ids"], pixel_values=batch["modality_inputs"]["images"]["clip"]["pixel_values"])
    assert _maxerr(ref.logits, ours.logits) <= TOL


def test_llava_1_5_7b_preset_parameter_count():
    from mimo_spec.config import compose_config

    model = build_model(compose_config(["preset=llava_1_5_7b"]), device="meta")
    assert sum(p.numel() for p in model.parameters()) == 7_063_427_072  # HF LlavaForConditionalGeneration
    assert model.language_model.vocab_size == 32064 and model.modalities["images"].special_token_id == 32000


# --------------------------------------------------------------------------- bad input


def _tamper(path, edit):
    """Rewrite a single-file checkpoint's tensors with ``edit(state_dict)``."""
    state = edit(load_file(str(path / "model.safetensors")))
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_directory_without_config(tmp_path):
    with pytest.raises(InputError, match="no config.json in the checkpoint directory") as e:
        import_hf(tmp_path)
    assert e.value.problems[0].path == str(tmp_path) and "config.json plus" in e.value.problems[0].hint
    with pytest.raises(InputError, match="checkpoint directory does not exist"):
        import_hf(tmp_path / "nope")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(InputError, match=r"unsupported architecture 'bert' \(BertForMaskedLM\)") as e:
        import_hf(tmp_path)
    assert "llama, mistral, qwen2" in e.value.problems[0].hint and "llava" in e.value.problems[0].hint
    with pytest.raises(InputError, match="cannot import a int"):
        import_hf(3)


@pytest.fixture
def llama_copy(llama, tmp_path):
    hf, _ = llama
    return _save(hf, tmp_path / "ckpt")


def test_missing_and_unexpected_tensors(llama_copy, tmp_path):
    def edit(sd):
        del sd["model.layers.1.mlp.up_proj.weight"], sd["model.norm.weight"]
        sd["model.layers.1.extra.weight"] = torch.zeros(2)
        return sd

    _tamper(llama_copy, edit)
    with pytest.raises(InputError) as e:
        import_hf_to_dir(llama_copy, tmp_path / "out")
    text = str(e.value)
    assert "missing tensors: model.layers.1.mlp.up_proj.weight, model.norm.weight" in text
    assert "unexpected tensors: model.layers.1.extra.weight" in text
    assert not (tmp_path / "out").exists()  # nothing written on failure


def test_shape_mismatch(llama_copy):
    config = json.loads((llama_copy / "config.json").read_text())
    (llama_copy / "config.json").write_text(json.dumps({**config, "vocab_size": 256}))
    with pytest.raises(InputError, match=r"shape mismatch: model\.embed_tokens\.weight: checkpoint \(128, 64\), "
                                         r"config expects \(256, 64\); lm_head\.weight: checkpoint \(128, 64\)"):
        import_hf(llama_copy)


def test_fused_shape_mismatch_names_the_part(llama_copy):
    _tamper(llama_copy, lambda sd: {**sd, "model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)})
    with pytest.raises(InputError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight: checkpoint \(16, 64\), "
                                         r"config expects \(32, 64\)"):
        import_hf(llama_copy)


def test_truncated_safetensors(llama_copy, tmp_path):
    weights = llama_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(InputError, match="truncated safetensors file") as e:
        import_hf_to_dir(llama_copy, tmp_path / "out")
    assert e.value.problems[0].path == str(weights) and "download or save it again" in e.value.problems[0].hint
    weights.write_bytes(b"\x05")
    with pytest.raises(InputError, match="not a safetensors file"):
        import_hf(llama_copy)
    assert not (tmp_path / "out").exists()


def test_import_dir_refuses_to_clobber(llama, tmp_path):
    _, path = llama
    import_hf_to_dir(path, tmp_path)
    with pytest.raises(InputError, match="already holds config.yaml, model.safetensors"):
        import_hf_to_dir(path, tmp_path)
    import_hf_to_dir(path, tmp_path, overwrite=True)
    with pytest.raises(InputError, match="the output directory is the checkpoint directory"):
        import_hf_to_dir(path, path, overwrite=True)


def test_export_refuses_what_hf_cannot_express(tmp_path):

    cfg = tiny_config()
    cfg["model"]["params"]["norm"] = "layernorm"
    with pytest.raises(ConfigError, match="cannot export to Hugging Face: position_embedding=rope, norm=layernorm"):
        export_hf(build_model(cfg), cfg, tmp_path / "a")
    audio = {"module": "modality", "params": {"special_token_id": 251}, "submodules": {
        "encoders": {"w": {"module": "whisper_encoder", "params": {"hidden_size": 16, "num_layers": 1, "num_heads": 2,
                                                                  "ffn_hidden_size": 32, "max_source_positions": 8}}},
        "input_projections": {"w": {"module": "linear", "params": {"in_features": 16, "out_features": 32}}}}}
    cfg = tiny_config(modalities={**tiny_config()["modalities"], "audio": audio})
    with pytest.raises(ConfigError, match=r"2 modalities \(images, audio\)"):
        export_hf(build_model(cfg), cfg, tmp_path / "b")
    with pytest.raises(ConfigError, match="the config does not describe this model"):
        export_hf(build_model(tiny_config()), tiny_config(model={"module": "gpt", "params": {
            "vocab_size": 300, "hidden_size": 32, "num_layers": 2, "num_heads": 4}}), tmp_path / "c")
    assert not any((tmp_path / n).exists() for n in "abc")


def test_core_does_not_import_transformers():
    code = ("import sys, mimo_spec, mimo_spec.interop; from mimo_spec.builders import build_model; "
            "assert 'transformers' not in sys.modules and 'safetensors' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_import_then_summary_and_training_from_the_imported_weights(tmp_path):
    """action=import writes config.yaml + model.safetensors; init_from builds and trains from them."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import run_cli
    from mimo_spec.train.checkpoint import list_checkpoints

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=1100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "imported"
    r = run_cli(["action=import", f"import_hf.source={tmp_path / 'hf'}", f"import_hf.output={out}"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert (out / "config.yaml").exists() and (out / "model.safetensors").exists()
    r = run_cli(["action=summary", f"init_from={out}"], tmp_path)
    assert r.returncode == 0, r.stderr
    exact = sum(p.numel() for p in hf.parameters())
    assert f"exact: {exact:,} parameters" in r.stdout
    r = run_cli([f"init_from={out}", "modality=[]", "train.steps=2", "train.eval_every=0", "data.num_samples=16",
                 "data.eval_samples=4", "hydra.run.dir=run"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "completed"
    assert list_checkpoints(tmp_path / "run" / "checkpoints")
    r = run_cli(["action=import", f"import_hf.source={tmp_path / 'nothing'}"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "config.json" in r.stderr


def test_llama3_rope_scaling_imports_and_exports_exactly(tmp_path):
    """Llama 3.1's rope scaling (Idefics3-8B's LM): logits equal transformers' at positions past the original
    context, the scaling survives export, and leaving it out would change the logits."""
    torch.manual_seed(0)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_parameters={"rope_theta": 500000.0, **scaling})).eval()
    cfg, ours = import_hf(hf)
    assert cfg["model"]["params"]["rope_scaling"] == scaling
    ids = torch.randint(0, 100, (2, 160))
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(ours.eval()(ids).logits, ref, atol=1e-5, rtol=1e-5)
        plain = json.loads(json.dumps(cfg))
        del plain["model"]["params"]["rope_scaling"]
        unscaled = build_model(plain).eval()
        unscaled.load_state_dict(ours.state_dict())
        assert (unscaled(ids).logits - ref).abs().max() > 1e-3
        export_hf(ours, cfg, tmp_path / "out")
        back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
        assert back.config.rope_parameters["rope_type"] == "llama3"
        torch.testing.assert_close(back(ids).logits, ref, atol=1e-5, rtol=1e-5)
    bad = json.loads(json.dumps(cfg))
    bad["model"]["params"]["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
    with pytest.raises(ConfigError, match=r"model\.params\.rope_scaling.*missing low_freq_factor"):
        build_model(bad, device="meta")


@pytest.mark.parametrize("preset, text, count", [
    ("llava_1_5_7b", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
     7_063_427_072),
    ("llava_1_5_13b", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
     13_351_494_656)])
def test_llava_1_5_presets_are_the_releases(preset, text, count):
    """llava-hf/llava-1.5-{7b,13b}-hf's configs (Vicuna v1.5, CLIP ViT-L/14-336 at layer -2, vocabulary 32064,
    image token 32000): transformers' model on meta has the preset's parameter count (the preset leaves the
    LM's and tower's defaults unwritten, so its values are not compared key by key here; LLaVA's import is
    checked against transformers' logits and loss in test_llava_end_to_end_with_loss)."""
    from conftest import check_preset_is_the_release

    vision = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=dict(model_type="llama", vocab_size=32064, max_position_embeddings=4096,
                                               rms_norm_eps=1e-5, **text),
        image_token_index=32000, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", tie_word_embeddings=False)
    check_preset_is_the_release(preset, transformers.LlavaForConditionalGeneration, config, count, keys=())
