"""LoRA / DoRA adapters (mimo_spec.peft): one adapter per part of our fused q/k/v and gate/up projections equals
PEFT's adapters on Hugging Face's separate projections (PeftModel.from_pretrained on the transformers model
gives our logits), merged export, adapter-only checkpoints with an exact resume and a base check, summary
and the config errors."""

import fnmatch
import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from mimo_spec import build_model, peft  # noqa: E402
from mimo_spec.errors import CheckpointError, ConfigError  # noqa: E402
from mimo_spec.interop import export_hf, import_hf  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_config  # noqa: E402

TOL = 1e-5
IMAGE_TOKEN = 127
LM = ["language_model.layers.*.attn.*", "language_model.layers.*.mlp.*"]


def _perturb(model, seed=1, scale=0.05, only=None):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if only is None or only(n):
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def _text(kind):
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return transformers.LlamaConfig(**kw) if kind == "llama" else transformers.Qwen2Config(**kw)


def _llava_config():
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8)
    return transformers.LlavaConfig(vision_config=vision, text_config=_text("llama"), vision_feature_layer=-1,
                                    image_token_index=IMAGE_TOKEN)


def _fresh(cls, config, state):
    hf = cls(config)
    hf.load_state_dict(state)
    return hf.eval()


def _check_peft_export(hf, entries, inputs, ours_inputs, tmp_path, name, trainable=()):
    """Our model with ``entries`` (perturbed, non-zero B; ``trainable`` modules perturbed too) against PeftModel
    on ``hf``; the merged export too."""
    from peft import PeftModel

    cfg, model = import_hf(hf)
    peft.add_adapters(model, entries, trainable)
    _perturb(model, seed=3, scale=0.1, only=peft.is_adapter_key)
    with peft.adapters_disabled(model):  # the base alone is Hugging Face's model
        assert (model(*ours_inputs).logits - hf(**inputs).logits).abs().max() <= TOL
    _perturb(model, seed=4, scale=0.1, only=lambda n: not peft.is_adapter_key(n) and any(
        fnmatch.fnmatchcase(n, g + ".*") for g in trainable))
    ours = model(*ours_inputs).logits
    assert (ours - hf(**inputs).logits).abs().max() > 0.05  # the adapters matter
    out = export_hf(model, cfg, tmp_path / f"{name}_peft", adapters="peft")
    config = json.loads((out / "adapter_config.json").read_text())
    with_peft = PeftModel.from_pretrained(_fresh(type(hf), hf.config, hf.state_dict()), str(out)).eval()
    assert (with_peft(**inputs).logits - ours).abs().max() <= TOL, name
    merged = type(hf).from_pretrained(export_hf(model, cfg, tmp_path / f"{name}_merged")).eval()
    assert (merged(**inputs).logits - ours).abs().max() <= TOL, name
    return config, model


@torch.no_grad()
def test_fused_adapters_equal_peft_on_separate_projections(tmp_path):
    """LoRA on a Llama, DoRA on a Qwen2 (biases on q/k/v: DoRA's base path without them), and a LLaVA with
    adapters on the LM, the vision tower and the projector: PeftModel on the transformers model gives our
    logits, and so does the merged checkpoint."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 120, (2, 12), generator=g)
    for kind, adapter in (("llama", "lora"), ("qwen2", "dora")):
        cls = transformers.LlamaForCausalLM if kind == "llama" else transformers.Qwen2ForCausalLM
        hf = _perturb(cls(_text(kind)))
        config, model = _check_peft_export(hf, [{"modules": LM, "type": adapter, "rank": 4, "alpha": 8}],
                                           {"input_ids": ids}, (ids,), tmp_path, kind)
        assert config["use_dora"] is (adapter == "dora") and config["r"] == 4 and config["lora_alpha"] == 8
        assert {t.rsplit(".", 1)[1] for t in config["target_modules"]} == {
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        # one A/B per part of the fused projections, each the separate projection's shape
        qkv = model.language_model.layers[0].attn.qkv.adapter
        assert qkv.parts == ("q", "k", "v") and qkv.lora_B_q.shape == (64, 4) and qkv.lora_B_k.shape == (32, 4)
        assert model.language_model.layers[0].mlp.fc1.adapter.parts == ("gate", "up")
    # LLaVA: the vision tower's fused qkv (with biases), its MLP, the projector's Linears and the LM
    hf = _perturb(transformers.LlavaForConditionalGeneration(_llava_config()))
    ids = torch.randint(0, 120, (2, 24), generator=g)
    ids[0, 2:18] = IMAGE_TOKEN
    ids[1, 6:22] = IMAGE_TOKEN
    px = torch.randn(2, 3, 32, 32, generator=g)
    bad = [{"modules": "modalities.images.input_projections.clip.layers.*", "rank": 2}]
    with pytest.raises(ConfigError, match="not a Linear"):  # layers.1 is the activation
        peft.add_adapters(import_hf(hf)[1], bad)
    tower = ["modalities.images.encoders.clip.layers.*.attn.qkv", "modalities.images.encoders.clip.layers.*.mlp.fc*"]
    # LoRA with adapters on the projector too; DoRA with the projector trained in full (PEFT's modules_to_save)
    for adapter, projector, trainable in (("lora", ["modalities.images.input_projections.clip.layers.[02]"], []),
                                          ("dora", [], ["modalities.images.input_projections.*"])):
        entries = [{"modules": [*LM, *tower, *projector], "type": adapter, "rank": 2}]
        config, _ = _check_peft_export(hf, entries, {"input_ids": ids, "pixel_values": px},
                                       (ids, {"images": {"clip": {"pixel_values": px}}}), tmp_path, f"llava_{adapter}",
                                       trainable)
        targets = config["target_modules"]
        assert any("vision_tower" in t and t.endswith("k_proj") for t in targets)
        projectors = {"model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"}
        assert projectors <= set(targets if projector else config["modules_to_save"]), config


@torch.no_grad()
def test_adapters_on_a_projection_hugging_face_fuses_too_export_as_one_peft_adapter(tmp_path):
    """Qwen2-VL's vision blocks hold one fused qkv Linear in transformers as in ours: our per-part adapters (q, k,
    v, each rank r) export as one PEFT adapter of rank 3r whose B is block-diagonal (each row sees only its part's
    A), alpha scaled with the rank, exactly ours, for LoRA and DoRA; the LM's qkv still splits into q/k/v_proj."""
    config = transformers.Qwen2VLConfig(
        text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, patch_size=4),
        image_token_id=250, video_token_id=251)
    torch.manual_seed(0)
    hf = _perturb(transformers.Qwen2VLForConditionalGeneration(config))
    g = torch.Generator().manual_seed(2)
    grid = torch.tensor([[1, 4, 6], [1, 6, 4]])
    ids = torch.tensor([[1, 2] + [250] * 6 + [3] + [250] * 6 + [4]])
    px = torch.randn(48, 3 * 2 * 4 * 4, generator=g)
    inputs = {"input_ids": ids, "pixel_values": px, "image_grid_thw": grid, "mm_token_type_ids": (ids == 250).long()}
    ours = (ids, {"images": {"vit": {"pixel_values": px, "image_grid_thw": grid}}})
    for adapter in ("lora", "dora"):
        entries = [{"modules": ["modalities.images.encoders.vit.layers.*.attn.qkv", "language_model.layers.*.attn.qkv"],
                    "type": adapter, "rank": 2, "alpha": 6}]
        cfg, model = _check_peft_export(hf, entries, inputs, ours, tmp_path, f"qwen2vl_{adapter}")
        vision = [t for t in cfg["target_modules"] if "visual" in t]
        assert vision and all(t.endswith("attn.qkv") for t in vision)
        assert {cfg["rank_pattern"][t] for t in vision} == {6} and {cfg["alpha_pattern"][t] for t in vision} == {18}
        assert any(t.endswith("k_proj") for t in cfg["target_modules"])  # the LM's are separate in transformers


def test_adapter_only_checkpoints_resume_exactly_and_check_their_base(tmp_path):
    """Training with adapters on an init_from base: checkpoints hold the adapters (+ the projector) and their
    optimizer state only; 4 steps straight equal 2 steps, a resume and 2 more; a changed base is refused."""
    from safetensors.torch import load_file, save_file

    from mimo_spec.config import compose_config
    from mimo_spec.train.loop import train
    from mimo_spec.train.metrics import read_metrics
    from mimo_spec.weights import save_weights

    small = ["data.num_samples=32", "data.eval_samples=4", "train.eval_batches=1", "train.log_every=1000",
             "train.eval_every=0", "train.num_threads=1", "model.params.num_layers=1", "train.batch_size=4"]
    base = _perturb(build_model(compose_config(small), seed=3), seed=4)
    (tmp_path / "base").mkdir()
    save_weights(base, tmp_path / "base" / "model.safetensors")
    (tmp_path / "base" / "config.yaml").write_text(base.spec.to_yaml())
    adapters = ("adapters=[{modules: ['language_model.layers.*.attn.*'], type: lora, rank: 4, alpha: 8},"
                "{modules: 'language_model.layers.*.mlp.*', type: dora, rank: 4}]")

    def cfg(*extra):
        return compose_config([*small, adapters, "trainable=['modalities.*.input_projections.*']",
                               f"init_from={tmp_path / 'base'}", "train.lr=0.01", "train.steps=4",
                               "train.checkpoint.every=2", *extra])

    train(cfg(), tmp_path / "whole")
    train(cfg("train.stop_after_steps=2"), tmp_path / "split")
    train(cfg(), tmp_path / "split")

    def losses(run):
        return [float(r["loss"]) for r in read_metrics(run / "metrics.csv")]

    assert losses(tmp_path / "split") == losses(tmp_path / "whole") and len(losses(tmp_path / "whole")) == 4
    ckpt = tmp_path / "whole" / "checkpoints" / "step_000004"
    weights = load_file(str(ckpt / "model.safetensors"))
    again = load_file(str(tmp_path / "split" / "checkpoints" / "step_000004" / "model.safetensors"))
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)
    assert weights and all(".adapter." in k or ".input_projections." in k for k in weights)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in weights.items())
    optim = load_file(str(ckpt / "optimizer.safetensors"))
    moments = sum(v.numel() for v in optim.values() if v.dim() > 0)  # Adam's 2 moments (beside its step counters)
    assert moments == 2 * sum(v.numel() for v in weights.values())
    assert len(json.loads((ckpt / "state.json").read_text())["adapters"]["base_hash"]) == 64
    # another base under the same init_from path: the resume refuses it, naming the reason
    state = load_file(str(tmp_path / "base" / "model.safetensors"))
    state["language_model.norm.weight"] = state["language_model.norm.weight"] + 1
    save_file(state, str(tmp_path / "base" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="another base model"):
        train(cfg("train.steps=6"), tmp_path / "split")


def test_bad_adapter_configs_summary_and_disabling():
    def problems(**overrides):
        with pytest.raises(ConfigError) as e:
            build_model(tiny_config(**overrides), device="meta")
        return {p.path: str(p) for p in e.value.problems}

    p = problems(adapters=[{"modules": "language_model.layers.*.attn.qkvv", "rank": 4}])
    assert "matches no module" in p["adapters.0.modules"] and "attn.qkv" in p["adapters.0.modules"]
    p = problems(adapters=[{"modules": "language_model.layers.*.attn", "rank": 4}])
    assert "is a Attention, not a Linear" in p["adapters.0.modules"] and "qkv, out" in p["adapters.0.modules"]
    # k and v of the fused qkv have 2 kv heads x 8 = 16 rows: a rank of 20 fits q (32) but not them
    p = problems(adapters=[{"modules": "language_model.layers.*.attn.qkv", "rank": 20}])
    assert "rank 20 is larger" in p["adapters.0.rank"] and "32/16/16" in p["adapters.0.rank"]
    p = problems(adapters=[{"modules": "*.fc1", "type": "qlora", "rank": 0, "alpha": -1, "dropout": 1.5, "bias": 1}])
    assert {"adapters.0.type", "adapters.0.rank", "adapters.0.alpha", "adapters.0.dropout", "adapters.0.bias"} <= set(p)
    p = problems(trainable=["modalities.*.input_projections.*"])
    assert "there are none" in p["trainable"]
    p = problems(adapters=[{"modules": "*.attn.qkv", "rank": 2}], trainable=["modalities.*.projections"])
    assert "matches no module" in p["trainable.0"]

    from mimo_spec.summary import render_summary

    model = build_model(tiny_config(adapters=[{"modules": "language_model.layers.*.attn.qkv", "rank": 2}],
                                    trainable=["modalities.*.input_projections.*"]), seed=0)
    counted = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapter = sum(p.numel() for n, p in model.named_parameters() if peft.is_adapter_key(n))
    assert adapter == 2 * (3 * 2 * 32 + 2 * (32 + 16 + 16))  # 2 layers x (A_q, A_k, A_v: 2 x 32; B: 32/16/16 x 2)
    text = render_summary(model)
    assert f"adapters: {adapter:,} parameters (lora rank 2 on 2 layers); trainable with them: {counted:,}" in text
    _perturb(model, only=peft.is_adapter_key)
    ids = torch.randint(0, 200, (1, 8))
    with peft.adapters_disabled(model):
        plain = model(ids).logits
    with peft.base_view(model, merge=True):
        assert "adapter" not in dict(model.named_modules())["language_model.layers.0.attn.qkv"]._modules
        merged = model(ids).logits
    assert (model(ids).logits - merged).abs().max() < 1e-5 and (plain - merged).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="mixes them"):  # PEFT's config is all LoRA or all DoRA
        mixed = build_model(tiny_config(adapters=[{"modules": "*.attn.qkv", "rank": 2},
                                                  {"modules": "*.attn.out", "type": "dora", "rank": 2}]), seed=0)
        export_hf(mixed, None, "/nonexistent/never", adapters="peft")


def test_adding_adapters_again_keeps_what_earlier_calls_left_training():
    """A second add_adapters call (more modules) freezes the base again but keeps the first call's adapters and
    its trainable modules training; only the new adapters are added."""
    from mimo_spec.config import compose_config

    model = build_model(compose_config(["model.params.num_layers=1"]), seed=0)
    peft.add_adapters(model, [{"modules": "language_model.layers.*.attn.*", "rank": 2}],
                      trainable=["modalities.*.input_projections.*"])
    first = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("input_projections" in n for n in first) and any(peft.is_adapter_key(n) for n in first)
    peft.add_adapters(model, [{"modules": "modalities.images.encoders.clip.layers.*.attn.qkv", "rank": 2}])
    second = {n for n, p in model.named_parameters() if p.requires_grad}
    added = second - first
    assert first <= second and added and all(peft.is_adapter_key(n) and ".encoders.clip." in n for n in added)


def test_peft_export_of_gpt2_conv1d_layers_is_refused_by_name(tmp_path):
    """GPT-2's Conv1D layers hold their weights transposed: PEFT's adapter files for them are refused naming
    that (it said 'mixes rows'); the merged export still equals ours."""
    config = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=4, n_positions=32)
    torch.manual_seed(0)
    hf = _perturb(transformers.GPT2LMHeadModel(config))
    cfg, model = import_hf(hf)
    peft.add_adapters(model, [{"modules": "language_model.layers.*.mlp.*", "rank": 2}])
    _perturb(model, seed=3, scale=0.1, only=peft.is_adapter_key)
    with pytest.raises(ConfigError, match=r"mlp.c_fc.weight stores its weight transposed .*GPT-2's Conv1D"):
        export_hf(model, cfg, tmp_path / "peft", adapters="peft")
    ids = torch.randint(0, 120, (1, 10), generator=torch.Generator().manual_seed(1))
    merged = transformers.GPT2LMHeadModel.from_pretrained(export_hf(model, cfg, tmp_path / "merged")).eval()
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - model(ids).logits).abs().max() <= TOL
