"""Idefics3 / SmolVLM through import_hf / export_hf against transformers (tiny random models, fp32, CPU):
images of different sizes and aspect ratios split into tiles by the real image processors, input_ids laid
out as their processors lay them out (row/column tokens, the global image), padding tiles dropped; export
-> from_pretrained -> the same logits; cached generation; the presets' parameter counts against the
released configs."""

from __future__ import annotations

import functools
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("PIL")

from conftest import check_preset_is_the_release, perturb  # noqa: E402
from mimo_spec.errors import ConfigError, InputError  # noqa: E402
from mimo_spec.generation import generate  # noqa: E402
from mimo_spec.interop import export_hf, import_hf  # noqa: E402
from mimo_spec.interop.hf_idefics3 import bucketed_positions, tiles_from_hf  # noqa: E402

TOL = 1e-5
SPECIALS = ["<unk>", "<pad>", "<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "\n"] + \
    [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
WORDS = ["hello", "look", "at", "this", "and", "what", "is", "it", "?", "a", "cat", "dog", "red", "sky"]
VOCAB = {t: i for i, t in enumerate(SPECIALS + WORDS)}
IMG = VOCAB["<image>"]
TEXT = dict(vocab_size=72, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=None,
            eos_token_id=None, pad_token_id=VOCAB["<pad>"])
# idefics3: 32-px tiles of 4-px patches (8x8), shuffled by 2: 16 tokens a tile; untied embeddings.
# smolvlm: 26-px tiles of 4-px patches (the grid floors to 6x6, as 384 / 14 does), shuffled by 3: 4 tokens; tied.
KINDS = {"idefics3": dict(tile=32, patch=4, scale=2, tie=False), "smolvlm": dict(tile=26, patch=4, scale=3, tie=True)}
CLASSES = {"idefics3": ("Idefics3Config", "Idefics3ForConditionalGeneration", "Idefics3ImageProcessor"),
           "smolvlm": ("SmolVLMConfig", "SmolVLMForConditionalGeneration", "SmolVLMImageProcessor")}


def _seq_len(kind: str) -> int:
    k = KINDS[kind]
    return (k["tile"] // k["patch"]) ** 2 // k["scale"] ** 2


def _hf_model(kind: str):
    k = KINDS[kind]
    config_cls, model_cls, _ = (getattr(transformers, n) for n in CLASSES[kind])
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  image_size=k["tile"], patch_size=k["patch"])
    torch.manual_seed(0)
    hf = model_cls(config_cls(text_config=dict(TEXT, model_type="llama"), vision_config=vision,
                              scale_factor=k["scale"], image_token_id=IMG, tie_word_embeddings=k["tie"]))
    return perturb(hf, louder=lambda n: "embed_tokens" in n or ("text_model.layers" in n and "proj" in n),
                   louder_scale=0.3)


@functools.lru_cache(maxsize=None)
def _pair(kind: str):
    hf = _hf_model(kind)
    cfg, model = import_hf(hf)
    return hf, cfg, model.eval()


@functools.lru_cache(maxsize=None)
def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                                additional_special_tokens=SPECIALS[2:])


def _image_processor(kind: str, **kw):
    tile = KINDS[kind]["tile"]
    # do_resize off: images keep their own sizes, so one is small enough not to be split (one global tile)
    return getattr(transformers, CLASSES[kind][2])(max_image_size={"longest_edge": tile},
                                                   size={"longest_edge": 3 * tile}, do_resize=False, **kw)


def _images(kind: str):
    """Three images: wide (2 x 3 tiles + global), small (the global image alone), tall (2 x 2 + global)."""
    t = KINDS[kind]["tile"]
    g = torch.Generator().manual_seed(5)

    def img(h, w):
        return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    return [[img(t + 8, 3 * t - 6), img(t - 12, t - 4)], [img(2 * t - 14, t + 8)]]


def _processed(kind: str, texts: list[str]):
    """input_ids / attention_mask / pixel_values / pixel_attention_mask as the model's processor makes them."""
    images = _images(kind)
    tok = _tokenizer()
    if kind == "idefics3":  # the processor itself
        proc = transformers.Idefics3Processor(_image_processor(kind), tok, image_seq_len=_seq_len(kind))
        out = proc(text=texts, images=images, return_tensors="pt", padding=True)
        return {k: out[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")}
    # SmolVLMProcessor needs num2words (for videos): its image processor, and its own prompt function
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    pix = _image_processor(kind, return_row_col_info=True)(images, return_tensors="pt")
    expanded = []
    for i, text in enumerate(texts):
        pieces = text.split("<image>")
        out = pieces[0]
        for j, piece in enumerate(pieces[1:]):
            out += get_image_prompt_string(pix["rows"][i][j], pix["cols"][i][j], _seq_len(kind),
                                           "<fake_token_around_image>", "<image>", "<global-img>") + piece
        expanded.append(out)
    enc = tok(expanded, return_tensors="pt", padding=True)
    return dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pix["pixel_values"],
                pixel_attention_mask=pix["pixel_attention_mask"])


@functools.lru_cache(maxsize=None)
def _batch(kind: str):
    hf_kw = _processed(kind, ["look <image> and <image> what", "hello <image> is it a cat ?"])
    tiles, counts = tiles_from_hf(hf_kw["pixel_values"], hf_kw["pixel_attention_mask"])
    ours = {"images": {"siglip": {"pixel_values": tiles}}}
    ids, mask = hf_kw["input_ids"], hf_kw["attention_mask"]
    labels = ids.clone()
    labels[(ids == IMG) | (mask == 0)] = -100
    return hf_kw, ours, labels, counts


def _err(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a - b)[mask.bool()].abs().max().item()


@pytest.mark.parametrize("kind", list(KINDS))
@torch.no_grad()
def test_import_logits_loss_and_parameter_count_equal_transformers(kind):
    hf, cfg, model = _pair(kind)
    hf_kw, ours, labels, counts = _batch(kind)
    # the processor split the images into different tile counts, and padded sample 1 with all-zero tiles
    assert counts == [7 + 1, 5] and hf_kw["pixel_values"].shape[1] == 8
    per_tile = _seq_len(kind)
    assert (hf_kw["input_ids"] == IMG).sum(1).tolist() == [c * per_tile for c in counts]
    assert model.modalities["images"].item_tokens(ours["images"]) == [per_tile] * sum(counts)
    ref = hf(**hf_kw, labels=labels)
    out = model(hf_kw["input_ids"], ours, attention_mask=hf_kw["attention_mask"], labels=labels)
    assert _err(out.logits, ref.logits, hf_kw["attention_mask"]) <= TOL
    assert abs(out.loss.item() - ref.loss.item()) <= TOL
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())
    images = cfg["modalities"]["images"]["submodules"]
    assert images["input_projections"]["siglip"] == {"module": "pixel_shuffle_mlp", "params": dict(
        in_features=32, out_features=64, scale_factor=KINDS[kind]["scale"], hidden_features=None, activation="gelu",
        norm=False, num_layers=1, bias=False)}
    vit = images["encoders"]["siglip"]["params"]
    assert (vit["class_token"], vit["pre_norm"], vit["post_norm"], vit["patch_bias"]) == (False, False, True, True)
    assert cfg["model"]["params"]["tie_embeddings"] is KINDS[kind]["tie"]
    assert cfg["hf_config"]["model_type"] == kind


@pytest.mark.parametrize("kind", list(KINDS))
@torch.no_grad()
def test_export_loads_in_transformers_with_the_same_logits(kind, tmp_path):
    hf, cfg, model = _pair(kind)
    hf_kw, _, labels, _ = _batch(kind)
    ref = hf(**hf_kw, labels=labels)
    out_dir = export_hf(model, cfg, tmp_path / "out")
    back, info = type(hf).from_pretrained(out_dir, output_loading_info=True)
    assert not any(info.values()), info
    again = back.eval()(**hf_kw, labels=labels)
    assert _err(again.logits, ref.logits, hf_kw["attention_mask"]) <= TOL
    assert abs(again.loss.item() - ref.loss.item()) <= TOL
    config = json.loads((out_dir / "config.json").read_text())
    assert config["architectures"] == [CLASSES[kind][1]] and config["model_type"] == kind
    assert (config["image_token_id"], config["scale_factor"], config["tie_word_embeddings"]) == \
        (IMG, KINDS[kind]["scale"], KINDS[kind]["tie"])
    assert config["text_config"]["pad_token_id"] == VOCAB["<pad>"]
    cfg2, model2 = import_hf(out_dir)  # and back again: the same config and weights
    assert cfg2 == cfg
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


@torch.no_grad()
def test_export_refuses_what_idefics3_cannot_compute(tmp_path):
    from mimo_spec import build_model

    _, cfg, _ = _pair("idefics3")
    bad = json.loads(json.dumps(cfg))
    bad["modalities"]["images"]["submodules"]["encoders"]["siglip"]["params"]["post_norm"] = False
    with pytest.raises(ConfigError, match=r"encoders\.siglip\.params\.post_norm: False"):
        export_hf(build_model(bad), bad, tmp_path / "a")
    bad = json.loads(json.dumps(cfg))
    bad["modalities"]["images"]["submodules"]["input_projections"]["siglip"]["params"]["bias"] = True
    with pytest.raises(ConfigError, match=r"input_projections\.siglip\.params\.bias: True"):
        export_hf(build_model(bad), bad, tmp_path / "b")
    bad["modalities"]["images"]["submodules"]["input_projections"]["siglip"]["params"].update(num_layers=2, norm=True)
    with pytest.raises(ConfigError, match=r"params\.norm: True .*params\.num_layers: 2 \(Hugging Face's would be 1"):
        export_hf(build_model(bad), bad, tmp_path / "c")
    assert not any(p.exists() for p in (tmp_path / "a", tmp_path / "b", tmp_path / "c"))


def test_tiles_and_positions():
    """Padding tiles are dropped, a padded tile is refused by name; full tiles get plain positions in
    transformers for the releases' grids, and where its float buckets repeat a row the import refuses."""
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionEmbeddings

    pv = torch.randn(2, 3, 3, 8, 8)
    pv[1, 2] = 0  # sample 1 holds 2 tiles
    mask = torch.ones(2, 3, 8, 8, dtype=torch.long)
    mask[1, 2] = 0
    tiles, counts = tiles_from_hf(pv, mask)
    assert counts == [3, 2] and torch.equal(tiles, torch.cat([pv[0], pv[1, :2]]))
    mask[1, 1, :, 5:] = 0
    with pytest.raises(InputError, match=r"pixel_attention_mask\[1\]\[1\]: sample 1, tile 1: 40 of 64 pixels"):
        tiles_from_hf(pv, mask)

    for grid in (26, 27, 32, 8, 6):  # Idefics3-8B, SmolVLM-2B (384/14), SmolVLM-256M, the tests' grids
        assert bucketed_positions(grid) == list(range(grid * grid))
    # bucketed_positions is transformers' own computation: a position table of row indices reads them back
    for grid in (8, 25):
        cfg = transformers.Idefics3VisionConfig(hidden_size=1, image_size=grid, patch_size=1, num_channels=1)
        emb = Idefics3VisionEmbeddings(cfg)
        with torch.no_grad():
            emb.patch_embedding.weight.zero_(), emb.patch_embedding.bias.zero_()
            emb.position_embedding.weight.copy_(torch.arange(grid * grid, dtype=torch.float32)[:, None])
            got = emb(torch.zeros(1, 1, grid, grid), torch.ones(1, grid, grid, dtype=torch.bool))
        assert got[0, :, 0].long().tolist() == bucketed_positions(grid)
    assert bucketed_positions(25) != list(range(625))
    hf_cfg = transformers.Idefics3Config(text_config=dict(TEXT, model_type="llama"), image_token_id=IMG,
                                         vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                            num_attention_heads=4, image_size=100, patch_size=4),
                                         scale_factor=5)
    from mimo_spec.interop.hf_import import _convert

    with pytest.raises(InputError, match="a 25x25-patch tile gets bucketed position ids"):
        _convert(hf_cfg, "config.json")


@torch.no_grad()
def test_greedy_generation_with_tiles_equals_transformers():
    """A SmolVLM-shaped prompt with a split image and an unsplit one: the KV cache gives what recomputation
    gives, and both give transformers' greedy tokens."""
    hf, _, model = _pair("smolvlm")
    hf_kw = _processed("smolvlm", ["look <image> and <image> what"])
    tiles, _ = tiles_from_hf(hf_kw["pixel_values"][:1], hf_kw["pixel_attention_mask"][:1])
    ids = hf_kw["input_ids"][:1]
    ours = {"images": {"siglip": {"pixel_values": tiles}}}
    cached = generate(model, ids, ours, max_new_tokens=6, use_cache=True).tokens
    recomputed = generate(model, ids, ours, max_new_tokens=6, use_cache=False).tokens
    ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=hf_kw["pixel_values"][:1],
                      pixel_attention_mask=hf_kw["pixel_attention_mask"][:1], max_new_tokens=6, do_sample=False)
    assert cached == recomputed == ref[0, ids.shape[1]:].tolist()
    assert len(cached) == 6 and len(set(cached)) > 2  # not one token repeated


# ---------------------------------------------------------------------------------------------- presets


def _released(preset: str):
    """(transformers model class, its config) with the values of the released checkpoint's config.json."""
    if preset == "smolvlm_256m":  # HuggingFaceTB/SmolVLM-256M-Instruct (published as Idefics3)
        text = dict(model_type="llama", vocab_size=49280, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000, pad_token_id=2,
                    hidden_act="silu", attention_bias=False, mlp_bias=False)
        vision = dict(hidden_size=768, image_size=512, num_attention_heads=12, patch_size=16)  # 12 layers, 3072
        return transformers.Idefics3ForConditionalGeneration, transformers.Idefics3Config(
            text_config=text, vision_config=vision, scale_factor=4, image_token_id=49190, tie_word_embeddings=False)
    assert preset == "idefics3_8b"  # HuggingFaceM4/Idefics3-8B-Llama3 (Llama 3.1 8B Instruct)
    text = dict(model_type="llama", vocab_size=128259, hidden_size=4096, intermediate_size=14336,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
                rope_scaling={"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                              "original_max_position_embeddings": 8192, "rope_type": "llama3"})
    vision = dict(hidden_size=1152, image_size=364, intermediate_size=4304, num_attention_heads=16,
                  num_hidden_layers=27, patch_size=14)
    return transformers.Idefics3ForConditionalGeneration, transformers.Idefics3Config(
        text_config=text, vision_config=vision, scale_factor=2, image_token_id=128257, tie_word_embeddings=False)


@pytest.mark.parametrize("preset,count,tokens", [("smolvlm_256m", 256_484_928, 64),
                                                 ("idefics3_8b", 8_462_086_384, 169)])
def test_preset_matches_the_released_model(preset, count, tokens):
    from mimo_spec.summary import render_summary

    cls, hf_config = _released(preset)
    ours, _, _ = check_preset_is_the_release(preset, cls, hf_config, count)  # the imported config is the preset
    assert ours.modalities["images"].special_token_id == hf_config.image_token_id
    assert ours.modalities["images"].tokens_per_item(ours.modalities["images"].example_inputs(1)) == tokens
    text = render_summary(ours)  # what action=summary prints
    assert f"exact: {count:,} parameters" in text and f"modalities.images: {tokens} placeholders per item" in text
