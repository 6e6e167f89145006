"""Mixture-of-experts presets: Mixtral-8x7B, Qwen3-30B-A3B, Qwen3-VL-30B-A3B and OLMoE-1B-7B have the released models'
shapes (parameter counts equal transformers' models built on the meta device from the released config.json
values, written out below), importing those configs gives the presets' parameters value for value, the
preset files spell out every gpt parameter, and the summary shows total and active parameters per token."""

from __future__ import annotations

import inspect

import pytest
import torch

from conftest import check_preset_is_the_release

transformers = pytest.importorskip("transformers")

# (total, active per token) as transformers' models count them: active = all but the routed experts, plus
# top-k / num_experts of them
COUNTS = {"mixtral_8x7b": (46_702_792_704, 12_879_925_248), "qwen3_30b_a3b": (30_532_122_624, 3_353_032_704),
          "qwen3_vl_30b_a3b": (31_070_754_032, 3_891_664_112), "olmoe_1b_7b": (6_919_161_856, 1_282_017_280)}


def _released(preset: str):
    """(transformers model class, its config) with the values of the released checkpoint's config.json."""
    if preset == "mixtral_8x7b":  # mistralai/Mixtral-8x7B-v0.1
        return transformers.MixtralForCausalLM, transformers.MixtralConfig(
            vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6}, num_local_experts=8, num_experts_per_tok=2,
            router_aux_loss_coef=0.02, output_router_logits=False, sliding_window=None, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2)
    if preset == "qwen3_30b_a3b":  # Qwen/Qwen3-30B-A3B
        return transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig(
            vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
            num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, hidden_act="silu",
            max_position_embeddings=40960, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default",
                                                                               "rope_theta": 1e6},
            num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
            attention_bias=False, use_sliding_window=False, sliding_window=None, max_window_layers=48,
            router_aux_loss_coef=0.001, output_router_logits=False, tie_word_embeddings=False,
            bos_token_id=151643, eos_token_id=151645)
    if preset == "olmoe_1b_7b":  # allenai/OLMoE-1B-7B-0924
        return transformers.OlmoeForCausalLM, transformers.OlmoeConfig(
            vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
            num_key_value_heads=16, hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, num_experts=64, num_experts_per_tok=8,
            norm_topk_prob=False, router_aux_loss_coef=0.01, output_router_logits=False, clip_qkv=None,
            attention_bias=False, tie_word_embeddings=False, pad_token_id=1, eos_token_id=50279)
    assert preset == "qwen3_vl_30b_a3b"  # Qwen/Qwen3-VL-30B-A3B-Instruct
    text = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, hidden_act="silu",
                max_position_embeddings=262144, rms_norm_eps=1e-6, attention_bias=False, num_experts=128,
                num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.001,
                rope_parameters={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True,
                                 "rope_theta": 5000000.0})
    vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, in_channels=3, out_hidden_size=2048,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                  deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh")
    return transformers.Qwen3VLMoeForConditionalGeneration, transformers.Qwen3VLMoeConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=False, image_token_id=151655,
        video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


@pytest.mark.parametrize("preset", list(COUNTS))
def test_preset_matches_the_released_model(preset):
    from mimo_spec.components.moe import active_parameters
    from mimo_spec.registry import resolve
    from mimo_spec.summary import render_summary

    cls, hf_config = _released(preset)
    total, active = COUNTS[preset]
    ours, resolved, _ = check_preset_is_the_release(preset, cls, hf_config, total)  # imported config == preset
    with torch.device("meta"):
        hf = cls(hf_config)
    routed = sum(p.numel() for n, p in hf.named_parameters() if ".experts." in n)
    text = getattr(hf_config, "text_config", hf_config)
    experts = getattr(text, "num_local_experts", None) or text.num_experts
    assert total - routed + routed * text.num_experts_per_tok // experts == active
    assert active_parameters(ours) == (total, active)
    assert f"active per token: {active:,} of {total:,} parameters" in render_summary(ours)  # action=summary
    # the model file spells out every gpt parameter (the layer backend excepted: the top-level one applies)
    wanted = set(inspect.signature(resolve("language_model", "gpt").__init__).parameters) - {"self", "backend"}
    assert set(resolved["model"]["params"]) == wanted, wanted ^ set(resolved["model"]["params"])
    if preset == "qwen3_vl_30b_a3b":
        assert ours.modalities["images"].special_token_id == 151655
        assert ours.modalities["videos"].src is ours.modalities["images"]
    else:
        assert resolved["modalities"] == {}
