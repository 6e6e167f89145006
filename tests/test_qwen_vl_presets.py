"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL presets: the released models' shapes (parameter counts equal
transformers' models built from the released config.json values, and importing those configs gives the
presets' parameters), and the tiny preset trains on synthetic items of mixed sizes."""

import json

import pytest
import torch

from conftest import check_preset_is_the_release
from mimo_spec import build_model
from mimo_spec.config import compose_config
from mimo_spec.train.loop import train
from mimo_spec.train.metrics import read_metrics

transformers = pytest.importorskip("transformers")

TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
              vision_end_token_id=151653)


def _released(preset: str):
    """(transformers model class, its config) with the values of the released checkpoint's config.json."""
    if preset == "qwen2_vl_2b":  # Qwen/Qwen2-VL-2B-Instruct
        text = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                    num_attention_heads=12, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768,
                    rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                                        "rope_theta": 1000000.0})
        vision = dict(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16, in_channels=3,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu")
        return transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=True, **TOKENS)
    if preset == "qwen2_5_vl_7b":  # Qwen/Qwen2.5-VL-7B-Instruct
        text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=128000,
                    rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                                        "rope_theta": 1000000.0})
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3,
                      out_hidden_size=3584, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu")
        return transformers.Qwen2_5_VLForConditionalGeneration, transformers.Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=False, **TOKENS)
    assert preset == "qwen3_vl_8b"  # Qwen/Qwen3-VL-8B-Instruct
    text = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, head_dim=128,
                num_attention_heads=32, num_key_value_heads=8, hidden_act="silu", max_position_embeddings=262144,
                rms_norm_eps=1e-6, attention_bias=False,
                rope_parameters={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True,
                                 "rope_theta": 5000000.0})
    vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, in_channels=3, out_hidden_size=4096,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                  deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh")
    return transformers.Qwen3VLForConditionalGeneration, transformers.Qwen3VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=False, **TOKENS)


@pytest.mark.parametrize("preset,count", [("qwen2_vl_2b", 2_208_985_600), ("qwen2_5_vl_7b", 8_292_166_656),
                                          ("qwen3_vl_8b", 8_767_123_696)])
def test_preset_matches_the_released_model(preset, count):
    ours, _, _ = check_preset_is_the_release(preset, *_released(preset), count)
    assert ours.modalities["images"].special_token_id == 151655
    assert ours.modalities["videos"].special_token_id == 151656 and ours.modalities["videos"].src is ours.modalities["images"]


def test_synthetic_items_of_mixed_sizes():
    from mimo_spec.data import build_dataset, collate
    from mimo_spec.data.tokenizer import build_tokenizer

    model = build_model(compose_config(["preset=qwen2_vl_tiny"]), seed=0)
    cfg = {"source": "synthetic", "num_samples": 64, "eval_samples": 8, "text_only_fraction": 0.0}
    data = build_dataset(cfg, model, build_tokenizer(cfg, model))
    samples = [data[i] for i in range(16)]
    assert torch.equal(data[3]["input_ids"], samples[3]["input_ids"])  # sample i depends on i only
    grids = {"images": set(), "videos": set()}
    for s in samples:  # each item's placeholder run has that item's own token count
        for name, grid_name in (("images", "image_grid_thw"), ("videos", "video_grid_thw")):
            mod = model.modalities[name]
            if s["num_items"][name]:
                inputs = s["items"][name]
                assert mod.validate_inputs(inputs, name) == s["num_items"][name]
                assert int((s["input_ids"] == mod.special_token_id).sum()) == sum(mod.item_tokens(inputs))
                grids[name] |= {tuple(r) for r in inputs["vit"][grid_name].tolist()}
            else:
                assert not (s["input_ids"] == mod.special_token_id).any()
    assert len(grids["images"]) >= 3 and {t for t, _, _ in grids["videos"]} == {1, 2}, grids
    batch = collate(samples[:8], 0)
    out = model(batch["input_ids"], batch["modality_inputs"], attention_mask=batch["attention_mask"],
                labels=batch["labels"], position_ids=model.position_ids(batch["input_ids"], batch["modality_inputs"],
                                                                        attention_mask=batch["attention_mask"]))
    assert torch.isfinite(out.loss)


def test_tiny_preset_trains(tmp_path):
    cfg = compose_config(["preset=qwen2_vl_tiny", "train.steps=3", "data.num_samples=32", "data.eval_samples=4",
                          "train.eval_batches=1", "train.eval_every=3", "train.log_every=1000"])
    result = train(cfg, tmp_path)
    assert result["status"] == "completed" and result["steps"] == 3
    rows = read_metrics(tmp_path / "metrics.csv")
    assert len(rows) == 3 and all(float(r["loss"]) == float(r["loss"]) > 0 for r in rows)
    assert rows[2]["eval_loss"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["parameters"] == 705_792


@pytest.mark.parametrize("preset", ["qwen2_vl_2b", "qwen2_5_vl_7b", "qwen3_vl_8b", "qwen2_vl_tiny"])
def test_preset_files_list_every_parameter(preset):
    """The project's convention: the LM, vision tower and merger nodes spell out every constructor parameter
    (the layer backend excepted: the config's top-level ``backend`` applies)."""
    import inspect

    from omegaconf import OmegaConf

    from mimo_spec.registry import resolve

    cfg = OmegaConf.to_container(compose_config([f"preset={preset}"]), resolve=True)
    images = cfg["modalities"]["images"]["submodules"]
    nodes = [("language_model", cfg["model"]), ("encoder", images["encoders"]["vit"]),
             ("projector", images["input_projections"]["vit"]), *[("projector", d) for d in images.get(
                 "deepstack_projections") or []]]
    for kind, node in nodes:
        wanted = set(inspect.signature(resolve(kind, node["module"]).__init__).parameters) - {"self", "backend"}
        assert set(node["params"]) == wanted, (node["module"], wanted ^ set(node["params"]))


def test_summary_names_each_modalitys_placeholders_per_item():
    from mimo_spec import build_model
    from mimo_spec.config import compose_config
    from mimo_spec.summary import render_summary

    model = build_model(compose_config(["preset=qwen2_vl_2b"]), device="meta")
    text = render_summary(model)  # what action=summary prints
    assert "exact: 2,208,985,600 parameters (2,208,985,600 trainable, 0 frozen)" in text
    example = model.modalities["images"].example_inputs(1, generator=torch.Generator())["vit"]["image_grid_thw"][0]
    t, h, w = example.tolist()
    assert (f"modalities.images: placeholders per item from its grid (image_grid_thw or video_grid_thw; e.g. "
            f"({t}, {h}, {w}): {t * h * w // 4})") in text
    assert "modalities.videos" in text and "modality -> images" in text
    llava = render_summary(build_model(compose_config(["preset=llava_1_5_7b"]), device="meta"))
    assert "modalities.images: 576 placeholders per item" in llava


def test_build_time_example_item_is_drawn_on_the_host(monkeypatch):
    """The projector check draws one example item of a native-resolution encoder with a CPU generator. The
    model is built under its device's context (on a GPU, CUDA's), where such a draw fails ("Expected a
    'cuda' device type for generator"): the example must be drawn under the host's, whatever the model's
    device. A build on meta records the default device the example was drawn under."""
    from mimo_spec.components.vision.qwen_vit import QwenViT

    seen = []
    original = QwenViT.example_inputs

    def recording(self, *args, **kwargs):
        seen.append(torch.get_default_device())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(QwenViT, "example_inputs", recording)
    build_model(compose_config(["preset=qwen2_vl_tiny"]), device="meta")
    assert seen and all(d == torch.device("cpu") for d in seen), seen
