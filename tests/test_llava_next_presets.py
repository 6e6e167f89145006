"""LLaVA-NeXT / LLaVA-OneVision / LLaVA-NeXT-Video presets: the released models' shapes (parameter counts
equal transformers' models built on the meta device from the released config.json values, and importing
those configs gives the presets' parameters); the summary works; one tower for images and videos."""

import pytest

from conftest import check_preset_is_the_release
from mimo_spec import build_model
from mimo_spec.config import compose_config

transformers = pytest.importorskip("transformers")

NEXT_PINS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
OV_PINS = [[384 * a, 384 * b] for a in range(1, 7) for b in range(1, 7)]
CLIP_L_336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu",
                  projection_dim=768, layer_norm_eps=1e-5)
SIGLIP_384 = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                  num_attention_heads=16, image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh",
                  layer_norm_eps=1e-6, vision_use_head=False)
VICUNA_7B = dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 hidden_act="silu", tie_word_embeddings=False)


def _qwen2(vocab, hidden, ffn, layers, heads, kv, tie):
    return dict(model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=tie,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, use_sliding_window=False)


def _released(preset: str):
    """(transformers model class, its config) with the values of the released checkpoint's config.json."""
    if preset == "llava_next_7b":  # llava-hf/llava-v1.6-vicuna-7b-hf
        return transformers.LlavaNextForConditionalGeneration, transformers.LlavaNextConfig(
            vision_config=CLIP_L_336, text_config=VICUNA_7B, image_token_index=32000, image_grid_pinpoints=NEXT_PINS,
            vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    if preset == "llava_next_video_7b":  # llava-hf/LLaVA-NeXT-Video-7B-hf
        return transformers.LlavaNextVideoForConditionalGeneration, transformers.LlavaNextVideoConfig(
            vision_config=CLIP_L_336, text_config=VICUNA_7B, image_token_index=32001, video_token_index=32000,
            image_grid_pinpoints=NEXT_PINS, vision_feature_layer=-2, vision_feature_select_strategy="default",
            spatial_pool_mode="average", spatial_pool_stride=2)
    text = (_qwen2(152000, 896, 4864, 24, 14, 2, True) if preset == "llava_onevision_0_5b"  # ...-0.5b-ov-hf
            else _qwen2(152128, 3584, 18944, 28, 28, 4, False))  # llava-hf/llava-onevision-qwen2-7b-ov-hf
    return transformers.LlavaOnevisionForConditionalGeneration, transformers.LlavaOnevisionConfig(
        vision_config=SIGLIP_384, text_config=text, image_token_index=151646, video_token_index=151647,
        image_grid_pinpoints=OV_PINS, vision_feature_layer=-1, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9")


@pytest.mark.parametrize("preset,count,tokens", [
    ("llava_next_7b", 7_063_431_168, (32000, None)),
    ("llava_next_video_7b", 7_063_431_168, (32001, 32000)),
    ("llava_onevision_0_5b", 893_675_552, (151646, 151647)),
    ("llava_onevision_7b", 8_030_807_584, (151646, 151647)),
])
def test_preset_matches_the_released_model(preset, count, tokens):
    ours, resolved, imported = check_preset_is_the_release(preset, *_released(preset), count)
    assert set(resolved["modalities"]) == set(imported["modalities"])
    images = ours.modalities["images"]
    assert images.special_token_id == tokens[0]
    if tokens[1] is not None:  # videos read the images' tower: one set of weights
        videos = ours.modalities["videos"]
        assert videos.special_token_id == tokens[1] and videos.src is images and len(videos.encoders) == 0


def test_summary_lists_the_tiled_model():
    from mimo_spec.summary import render_summary

    text = render_summary(build_model(compose_config(["preset=llava_onevision_0_5b"]), device="meta"))
    assert " anyres " in text and "anyres_layout" in text and "893,675,552 parameters" in text, text
    # the example image of 261x576 px: best pinpoint 384x768 (1 x 2 tiles), the 27 x 54 crop grid unpadded to
    # 25 rows, a newline a row, after the 729 tokens of the base tile: 729 + 25*54 + 25
    assert "image_sizes; e.g. (261, 576): 2104)" in text, text
