"""M-RoPE (Qwen2-VL / Qwen2.5-VL / Qwen3-VL) in the gpt LM and the 3-D positions, against transformers
(tiny models, random weights, fp32, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import tiny_config  # noqa: E402
from mimo_spec import build_model  # noqa: E402
from mimo_spec.components.language.gpt import GPT  # noqa: E402
from mimo_spec.errors import ConfigError, InputError, ParamError  # noqa: E402
from test_components_hf import _perturb  # noqa: E402  (noise on every parameter of a transformers model)
from mimo_spec.interop import hf_weights as hw  # noqa: E402
from mimo_spec.models.mrope import mrope_next_positions, mrope_position_ids  # noqa: E402

TOL = 1e-5
IMG, VID, PAD = 120, 121, 0
MERGE = 2
SECTION = [2, 3, 3]  # head_dim 16


def _text_config(section=SECTION):
    return dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(section)})


def _gpt_params(cfg, **extra):
    return dict(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
                num_heads=cfg["num_attention_heads"], num_kv_heads=cfg["num_key_value_heads"],
                ffn_hidden_size=cfg["intermediate_size"], norm_eps=cfg["rms_norm_eps"], rope_theta=10000.0,
                max_seq_len=cfg["max_position_embeddings"], attention_bias=True, attention_out_bias=False,
                tie_embeddings=True, **extra)


def _qwen2_vl_pair():
    torch.manual_seed(0)
    cfg = _text_config()
    hf = _perturb(transformers.Qwen2VLTextModel(transformers.Qwen2VLTextConfig(**cfg)))
    params = _gpt_params(cfg, mrope_section=SECTION)
    ours = GPT(**params).eval()
    ours.load_state_dict(hw.gpt_state_dict_from_hf(hf.state_dict(), params), strict=True)
    return hf, ours


def _hf_vl_model(kind: str = "qwen2_vl"):
    """A tiny transformers VL model, for its get_rope_index."""
    text = _text_config()
    vision = dict(depth=1, hidden_size=64, num_heads=2, spatial_merge_size=MERGE, patch_size=2,
                  temporal_patch_size=2, in_channels=3)
    if kind == "qwen2_vl":
        config = transformers.Qwen2VLConfig(text_config=text, vision_config=dict(vision, embed_dim=32),
                                            image_token_id=IMG, video_token_id=VID)
        return transformers.Qwen2VLModel(config).eval()
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=dict(vision, out_hidden_size=64,
                                                                              intermediate_size=64,
                                                                              tokens_per_second=4),
                                           image_token_id=IMG, video_token_id=VID)
    return transformers.Qwen2_5_VLModel(config).eval()


def _row(*parts) -> list[int]:
    """parts: an int n = n text tokens; ("img"|"vid", grid) = that item's placeholders."""
    out, g = [], torch.Generator().manual_seed(len(parts))
    for p in parts:
        if isinstance(p, int):
            out += torch.randint(1, 100, (p,), generator=g).tolist()
        else:
            t, h, w = p[1]
            out += [IMG if p[0] == "img" else VID] * (t * h * w // MERGE**2)
    return out


def _batch(rows, left_pad=(), pad_to=None):
    """Rows padded to one length (left for the indices in left_pad, else right)."""
    S = pad_to or max(len(r) for r in rows)
    ids = torch.full((len(rows), S), PAD)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(S - len(r), S) if i in left_pad else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


def _images_batch():
    g1, g2, g3, g4 = [1, 4, 6], [1, 6, 4], [1, 2, 2], [1, 8, 4]
    rows = [_row(3, ("img", g1), 2, ("img", g2), 4),             # text before, between, after
            _row(("img", g3), 5),                               # an image first
            _row(6, ("img", g4), 1, ("img", g3), 2, ("img", g1)),  # an image last
            _row(7)]                                            # text only
    grids = torch.tensor([g1, g2, g3, g4, g3, g1])
    return rows, grids


def _type_ids(ids):
    return (ids == IMG).long() + 2 * (ids == VID).long()


# ------------------------------------------------------------------ positions


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_positions_equal_get_rope_index(padding):
    hf = _hf_vl_model()
    rows, grids = _images_batch()
    if padding == "none":
        rows = rows[:1]
        grids = grids[:2]
    ids, mask = _batch(rows, left_pad=(1, 3) if padding == "left" else ())
    kw = {} if padding == "none" else {"attention_mask": mask}
    ref, ref_d = hf.get_rope_index(ids, mm_token_type_ids=_type_ids(ids), image_grid_thw=grids, **kw)
    got, got_d = mrope_position_ids(ids, IMG, grids, MERGE, **kw)
    assert got.dtype == ref.dtype == torch.long
    assert torch.equal(got, ref) and torch.equal(got_d, ref_d)
    # The text after the last item continues at max + 1 on all axes.
    assert torch.equal(got[:, 0, -4:], got[0, 0, -4:].expand(3, 4))


def test_positions_with_videos_equal_get_rope_index():
    """Qwen2-VL videos (interval 1) and Qwen2.5-VL's tokens_per_second * second_per_grid_ts."""
    gi, gv1, gv2 = [1, 4, 4], [3, 4, 6], [2, 2, 4]
    rows = [_row(2, ("vid", gv1), 3, ("img", gi), 1), _row(("img", gi), 2, ("vid", gv2), 3)]
    ids, mask = _batch(rows, left_pad=(1,))
    images, videos = torch.tensor([gi, gi]), torch.tensor([gv1, gv2])
    q2 = _hf_vl_model("qwen2_vl")
    ref, ref_d = q2.get_rope_index(ids, mm_token_type_ids=_type_ids(ids), image_grid_thw=images,
                                   video_grid_thw=videos, attention_mask=mask)
    got, got_d = mrope_position_ids(ids, IMG, images, MERGE, attention_mask=mask, video_token_id=VID,
                                    video_grid_thw=videos)
    assert torch.equal(got, ref) and torch.equal(got_d, ref_d)
    q25 = _hf_vl_model("qwen2_5_vl")
    seconds = torch.tensor([0.5, 1.25])
    ref, ref_d = q25.get_rope_index(ids, mm_token_type_ids=_type_ids(ids), image_grid_thw=images,
                                    video_grid_thw=videos, second_per_grid_ts=seconds, attention_mask=mask)
    got, got_d = mrope_position_ids(ids, IMG, images, MERGE, attention_mask=mask, video_token_id=VID,
                                    video_grid_thw=videos, video_time_interval=4 * seconds)
    assert torch.equal(got, ref) and torch.equal(got_d, ref_d)
    assert got[0, 0, 8].item() - got[0, 0, 2].item() == 2  # frame groups spaced by 4 * 0.5


def test_qwen3_vl_video_frames_equal_get_rope_index():
    """Qwen3-VL: a video's frame groups are separate items (timestamp text between them)."""
    text = _text_config([4, 2, 2])
    text.update(head_dim=16)
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64,
                  spatial_merge_size=MERGE, patch_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0],
                  num_position_embeddings=16)
    hf = transformers.Qwen3VLModel(transformers.Qwen3VLConfig(text_config=text, vision_config=vision,
                                                              image_token_id=IMG, video_token_id=VID)).eval()
    gi, gv = [1, 4, 6], [3, 4, 4]
    frame = ("vid", [1, 4, 4])
    rows = [_row(2, ("img", gi), 1, frame, 2, frame, 2, frame, 3), _row(4, ("img", gi), 2)]
    ids, mask = _batch(rows, left_pad=(1,))
    images, videos = torch.tensor([gi, gi]), torch.tensor([gv])
    ref, ref_d = hf.get_rope_index(ids, mm_token_type_ids=_type_ids(ids), image_grid_thw=images,
                                   video_grid_thw=videos.clone(), attention_mask=mask)
    got, got_d = mrope_position_ids(ids, IMG, images, MERGE, attention_mask=mask, video_token_id=VID,
                                    video_grid_thw=videos, video_frames_as_items=True)
    assert torch.equal(got, ref) and torch.equal(got_d, ref_d)


def test_adjacent_items_and_frames_as_items():
    """Two images with no text between them are two items; Qwen3-VL's frames as items equal frames
    given as separate t = 1 videos."""
    g = [1, 4, 4]
    ids = torch.tensor([_row(2, ("img", g), ("img", g), 1)])
    pos, _ = mrope_position_ids(ids, IMG, [g, g], MERGE)
    assert pos[:, 0, 2:6].tolist() == [[2] * 4, [2, 2, 3, 3], [2, 3, 2, 3]]
    assert pos[:, 0, 6:10].tolist() == [[4] * 4, [4, 4, 5, 5], [4, 5, 4, 5]]
    assert pos[:, 0, 10].tolist() == [6, 6, 6]
    ids = torch.tensor([_row(1, ("vid", [1, 4, 4]), 2, ("vid", [1, 4, 4]), 1)])
    split, d1 = mrope_position_ids(ids, None, None, MERGE, video_token_id=VID, video_grid_thw=[[2, 4, 4]],
                                   video_frames_as_items=True)
    plain, d2 = mrope_position_ids(ids, None, None, MERGE, video_token_id=VID, video_grid_thw=[[1, 4, 4]] * 2)
    assert torch.equal(split, plain) and torch.equal(d1, d2)


def test_position_input_errors():
    g = [1, 4, 4]
    ids = torch.tensor([_row(2, ("img", g), 1)])
    with pytest.raises(InputError, match=r"4 image placeholder tokens \(id 120\) but the 2 image grid\(s\) make 8"):
        mrope_position_ids(ids, IMG, [g, g], MERGE)
    with pytest.raises(InputError, match="divisible by spatial_merge_size 2"):
        mrope_position_ids(ids, IMG, [[1, 4, 3]], MERGE)
    split = torch.tensor([_row(2, ("img", [1, 2, 4]), 1, ("img", [1, 2, 4]), 1)])
    with pytest.raises(InputError, match="image 0's 4 placeholder tokens are not one run in one row"):
        mrope_position_ids(split, IMG, [g], MERGE)


# ------------------------------------------------------------------ the LM


@torch.no_grad()
def test_gpt_mrope_matches_qwen2_vl_text_model():
    hf, ours = _qwen2_vl_pair()
    vl = _hf_vl_model()
    rows, grids = _images_batch()
    ids, mask = _batch(rows, left_pad=(1,))
    pos, _ = mrope_position_ids(ids, IMG, grids, MERGE, attention_mask=mask)
    ref_pos, _ = vl.get_rope_index(ids, mm_token_type_ids=_type_ids(ids), image_grid_thw=grids, attention_mask=mask)
    assert torch.equal(pos, ref_pos)
    embeds = torch.randn(*ids.shape, 64)
    keep = mask.bool()
    ref = hf(inputs_embeds=embeds, position_ids=pos, attention_mask=mask).last_hidden_state
    got = ours(embeds, position_ids=pos, attention_mask=mask)
    assert (ref[keep] - got[keep]).abs().max() <= TOL
    # No padding, and the logits (the head tied to the embedding here).
    pos1, e1 = pos[:, :1, :20], embeds[:1, :20]
    ref = hf(inputs_embeds=e1, position_ids=pos1).last_hidden_state
    got = ours(e1, position_ids=pos1)
    assert (ref - got).abs().max() <= TOL
    assert (ref @ hf.embed_tokens.weight.T - ours.logits(got)).abs().max() <= TOL


@torch.no_grad()
def test_kv_cache_with_rope_deltas_equals_recompute():
    """Prompt with images through the cache, then generated text at (B, S) positions from rope_deltas."""
    _, ours = _qwen2_vl_pair()
    rows, grids = _images_batch()
    ids, mask = _batch(rows[:2], left_pad=(1,))
    grids = grids[:3]
    pos, deltas = mrope_position_ids(ids, IMG, grids, MERGE, attention_mask=mask)
    embeds = torch.randn(*ids.shape, 64)
    new = torch.randn(2, 3, 64)
    cache = ours.new_kv_cache(2, ids.shape[1] + 3)
    ours(embeds, position_ids=pos, attention_mask=mask, kv_cache=cache)
    new_pos = mrope_next_positions(deltas, 3, attention_mask=mask)
    cached = ours(new, position_ids=new_pos, kv_cache=cache)
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], 1)
    full_ids = torch.cat([ids, torch.full((2, 3), 7)], 1)
    full_pos, _ = mrope_position_ids(full_ids, IMG, grids, MERGE, attention_mask=full_mask)
    assert torch.equal(full_pos[:, :, -3:], new_pos[None].expand(3, -1, -1))
    full = ours(torch.cat([embeds, new], 1), position_ids=full_pos, attention_mask=full_mask)
    assert (cached - full[:, -3:]).abs().max() <= TOL
    no_pad = mrope_next_positions(deltas[:1], 2, past_length=5)
    assert no_pad.tolist() == [[5 + deltas[0, 0].item(), 6 + deltas[0, 0].item()]]


@torch.no_grad()
def test_text_positions_are_plain_rope():
    """(B, S) positions: without mrope_section bit for bit today's RoPE; with it the same as 3-D
    positions that agree on every axis."""
    _, ours = _qwen2_vl_pair()
    plain = GPT(**{k: v for k, v in _gpt_params(_text_config()).items()}).eval()
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(2, 9, 64)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8], [3, 4, 5, 9, 10, 11, 12, 13, 14]])
    assert torch.equal(ours(x, position_ids=pos), plain(x, position_ids=pos))
    assert torch.equal(ours(x), plain(x))
    three = ours(x, position_ids=pos[None].expand(3, -1, -1))
    assert torch.equal(three, ours(x, position_ids=pos))
    # Different axes really change the result (a shift of one axis for all tokens would not: RoPE is relative).
    other = pos[None].repeat(3, 1, 1)
    other[1, :, 4:] += 3
    assert (ours(x, position_ids=other) - three).abs().max() > 1e-3


@pytest.mark.parametrize("section,interleaved", [([2, 3, 3], False), ([4, 2, 2], True), ([3, 3, 2], True)])
@torch.no_grad()
def test_rotary_matches_hf(section, interleaved):
    """cos/sin equal transformers' Qwen2-VL (contiguous) and Qwen3-VL (interleaved) text rotary."""
    cfg = _text_config(section)
    if interleaved:
        hf_rope = transformers.models.qwen3_vl.modeling_qwen3_vl.Qwen3VLTextRotaryEmbedding(
            transformers.Qwen3VLTextConfig(**cfg, head_dim=16))
    else:
        hf_rope = transformers.models.qwen2_vl.modeling_qwen2_vl.Qwen2VLRotaryEmbedding(
            transformers.Qwen2VLTextConfig(**cfg))
    ours = GPT(**_gpt_params(cfg, mrope_section=section, mrope_interleaved=interleaved))
    pos = torch.randint(0, 200, (3, 2, 11))
    x = torch.zeros(2, 11, 64)
    cos, sin = hf_rope(x, pos)
    got_cos, got_sin = ours.rope(pos, torch.float32)
    assert (cos - got_cos[:, :, 0]).abs().max() <= 1e-6 and (sin - got_sin[:, :, 0]).abs().max() <= 1e-6


# ------------------------------------------------------------------ config and input errors


@pytest.mark.parametrize("params,message", [
    ({"mrope_section": [2, 3, 2]}, r"mrope_section \(\[2, 3, 2\]\) must sum to head_dim // 2 = 8 \(head_dim 16\)"),
    ({"mrope_section": [4, 4]}, "must be 3 non-negative integers"),
    ({"mrope_section": [2, 3, 3], "position_embedding": "learned"}, "needs position_embedding 'rope'"),
    ({"mrope_interleaved": True}, "mrope_interleaved needs mrope_section"),
    ({"mrope_section": [0, 4, 4], "mrope_interleaved": True}, "interleaving gives"),
])
def test_constructor_errors(params, message):
    base = _gpt_params(_text_config())
    with pytest.raises(ParamError, match=message):
        GPT(**{**base, **params})


def test_config_error_names_the_path():
    cfg = tiny_config()  # hidden 32, 4 heads: head_dim 8
    cfg["model"]["params"]["mrope_section"] = [1, 1, 1]
    with pytest.raises(ConfigError) as e:
        build_model(cfg)
    assert "model.params.mrope_section" in str(e.value) and "must sum to head_dim // 2 = 4" in str(e.value)
    ok = copy.deepcopy(cfg)
    ok["model"]["params"]["mrope_section"] = [2, 1, 1]
    ok["model"]["params"]["mrope_interleaved"] = False
    assert build_model(ok).language_model.rope.mrope_axes == (0, 0, 1, 2)


def test_position_shape_errors():
    _, ours = _qwen2_vl_pair()
    x = torch.randn(2, 5, 64)
    with pytest.raises(InputError, match=r"expected shape \(2, 5\) or \(3, 2, 5\), got \(4, 2, 5\)"):
        ours(x, position_ids=torch.zeros(4, 2, 5, dtype=torch.long))
    plain = GPT(**_gpt_params(_text_config()))
    with pytest.raises(InputError, match="need the LM's mrope_section"):
        plain(x, position_ids=torch.zeros(3, 2, 5, dtype=torch.long))


def test_listed_parameters():
    from mimo_spec.summary import render_registry

    text = render_registry()
    assert "mrope_section: list[int] | None  [default None]" in text
    assert "mrope_interleaved: bool  [default False]" in text


def test_compile_fullgraph_3d_positions():
    torch._dynamo.reset()
    _, ours = _qwen2_vl_pair()
    rows, grids = _images_batch()
    ids, mask = _batch(rows[:2])
    pos, _ = mrope_position_ids(ids, IMG, grids[:3], MERGE, attention_mask=mask)
    x = torch.randn(*ids.shape, 64)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for kw in ({"position_ids": pos}, {"position_ids": pos, "attention_mask": mask}):
            assert (compiled(x, **kw) - ours(x, **kw)).abs().max() <= TOL


# ------------------------------------------------------------------ MimoModel and HF import


def _qwen2_vl_lm(tie=False):
    """A tiny transformers Qwen2VLForConditionalGeneration and our MimoModel (no modalities, the gpt LM)
    made from it by gpt_params_from_hf / gpt_state_dict_from_hf."""
    from mimo_spec.models.mimo import MimoModel

    torch.manual_seed(0)
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, spatial_merge_size=MERGE, patch_size=2,
                  temporal_patch_size=2, in_channels=3)
    config = transformers.Qwen2VLConfig(text_config=_text_config(), vision_config=vision, image_token_id=IMG,
                                        video_token_id=VID, tie_word_embeddings=tie)
    hf = _perturb(transformers.Qwen2VLForConditionalGeneration(config))
    params = hw.gpt_params_from_hf(config)
    ours = MimoModel(GPT(**params)).eval()
    ours.language_model.load_state_dict(hw.gpt_state_dict_from_hf(hf.state_dict(), params), strict=True)
    return hf, ours, params


def test_params_from_qwen2_vl_configs():
    """mrope_section from Qwen2-VL / Qwen2.5-VL text configs (rope_parameters, or a pre-v5 rope_scaling
    of type 'mrope'), and the VLM's tie_word_embeddings."""
    text = transformers.Qwen2VLTextConfig(**_text_config())
    p = hw.gpt_params_from_hf(text)
    assert p["mrope_section"] == SECTION and p["mrope_interleaved"] is False
    assert p["attention_bias"] is True and p["attention_out_bias"] is False and p["tie_embeddings"] is False
    assert hw.params_from_hf(text) == ("gpt", p)
    cfg = {k: v for k, v in _text_config().items() if k != "rope_parameters"}
    old = transformers.Qwen2_5_VLTextConfig(**cfg, rope_scaling={"type": "mrope", "mrope_section": [4, 2, 2]},
                                            rope_theta=1e6)
    p = hw.gpt_params_from_hf(old)
    assert p["mrope_section"] == [4, 2, 2] and p["rope_theta"] == 1e6
    assert hw.params_from_hf(old)[0] == "gpt"
    vlm = transformers.Qwen2_5_VLConfig(text_config=_text_config(), tie_word_embeddings=True)
    p = hw.gpt_params_from_hf(vlm)
    assert p["mrope_section"] == SECTION and p["tie_embeddings"] is True
    GPT(**p)  # the kwargs build
    # A raw dict without rope_type (as read from an old config.json) and a plain Qwen2 config.
    raw = transformers.Qwen2Config(**cfg)
    raw.rope_parameters = {"type": "mrope", "mrope_section": [2, 3, 3], "rope_theta": 5.0}
    assert hw.gpt_params_from_hf(raw)["mrope_section"] == [2, 3, 3]
    assert "mrope_section" not in hw.gpt_params_from_hf(transformers.Qwen2Config(**cfg))


@pytest.mark.parametrize("tie", [False, True])
@torch.no_grad()
def test_mimo_model_matches_qwen2_vl_language_model(tie):
    """Logits through MimoModel (3-D positions from mrope_position_ids) equal Qwen2VLForConditionalGeneration's
    on the same ids and positions (no pixels: placeholders embedded as text), padded and not."""
    hf, ours, params = _qwen2_vl_lm(tie)
    assert params["mrope_section"] == SECTION and params["tie_embeddings"] is tie
    rows, grids = _images_batch()
    ids, mask = _batch(rows, left_pad=(1,))
    pos, _ = mrope_position_ids(ids, IMG, grids, MERGE, attention_mask=mask)
    keep = mask.bool()
    ref = hf(input_ids=ids, position_ids=pos, attention_mask=mask).logits
    got = ours(ids, position_ids=pos, attention_mask=mask).logits
    assert (ref[keep] - got[keep]).abs().max() <= TOL
    one, p1 = ids[:1, :20], pos[:, :1, :20]
    ref = hf(input_ids=one, position_ids=p1).logits
    assert (ref - ours(one, position_ids=p1).logits).abs().max() <= TOL
    # (3, 1, S) broadcasts over the batch, as (1, S) does.
    two = ids[:2, :20]
    assert torch.equal(ours(two, position_ids=p1).logits, ours(two, position_ids=p1.expand(3, 2, 20)).logits)
    # The loss path takes 3-D positions too.
    out = ours(one, position_ids=p1, labels=one)
    assert torch.isfinite(out.loss)


@torch.no_grad()
def test_mimo_model_text_positions_unchanged():
    """(B, S) positions through MimoModel: bit for bit the same as (3, B, S) positions equal on every axis,
    and as no positions at all when they count from 0; document_ids still make their own positions."""
    _, ours, _ = _qwen2_vl_lm()
    ids = torch.randint(1, 100, (2, 9))
    pos = torch.arange(9).expand(2, 9)
    plain = ours(ids, position_ids=pos).logits
    assert torch.equal(plain, ours(ids).logits)
    assert torch.equal(plain, ours(ids, position_ids=pos[None].expand(3, 2, 9)).logits)
    docs = torch.tensor([[0] * 4 + [1] * 5] * 2)
    from mimo_spec.models.mimo import positions_from_document_ids

    restart = positions_from_document_ids(docs)
    assert torch.equal(ours(ids, document_ids=docs).logits,
                       ours(ids, document_ids=docs, position_ids=restart[None].expand(3, 2, 9)).logits)


def test_mimo_model_position_errors():
    """3-D positions: an InputError naming position_ids for a wrong shape, a float dtype, a negative value,
    or an LM without mrope_section."""
    from mimo_spec.models.mimo import MimoModel

    _, ours, params = _qwen2_vl_lm()
    ids = torch.randint(1, 100, (2, 5))
    cases = [
        (torch.zeros(4, 2, 5, dtype=torch.long),
         r"position_ids: expected shape \(2, 5\) \(same as input_ids\) or \(1, seq\), or \(3, 2, 5\) for M-RoPE"),
        (torch.zeros(3, 2, 4, dtype=torch.long), r"position_ids: .*got \(3, 2, 4\)"),
        (torch.zeros(3, 5, dtype=torch.long), r"position_ids: .*got \(3, 5\)"),
        (torch.zeros(3, 2, 5), "position_ids: expected an integer tensor, got torch.float32"),
        (torch.zeros(3, 2, 5, dtype=torch.long) - 1, r"position_ids: position -1 is outside \[0, \.\.\.\)"),
    ]
    for pos, message in cases:
        with pytest.raises(InputError, match=message):
            ours(ids, position_ids=pos)
    plain = MimoModel(GPT(**{k: v for k, v in params.items() if not k.startswith("mrope")})).eval()
    with pytest.raises(InputError, match=r"position_ids: expected shape \(2, 5\) \(same as input_ids\) or "
                                         r"\(1, seq\), got \(3, 2, 5\) \(3-D .* need the language model's "
                                         r"mrope_section \(model.params.mrope_section\)\)"):
        plain(ids, position_ids=torch.zeros(3, 2, 5, dtype=torch.long))
    with pytest.raises(InputError, match=r"position_ids: expected shape \(2, 5\) \(same as input_ids\) or "
                                         r"\(1, seq\), got \(2, 4\)$"):
        plain(ids, position_ids=torch.zeros(2, 4, dtype=torch.long))


def test_mimo_model_compile_fullgraph_3d_positions():
    """The 3-D position checks are shapes only: the forward pass compiles with fullgraph (no host sync)."""
    torch._dynamo.reset()
    _, ours, _ = _qwen2_vl_lm()
    rows, grids = _images_batch()
    ids, mask = _batch(rows[:2])
    pos, _ = mrope_position_ids(ids, IMG, grids[:3], MERGE, attention_mask=mask)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert (compiled(ids, position_ids=pos, labels=ids).loss - ours(ids, position_ids=pos, labels=ids).loss
                ).abs() <= TOL


def test_an_mrope_language_model_is_not_exported_as_a_plain_qwen2(tmp_path):
    """transformers' Qwen2 would load an M-RoPE LM and compute other logits for image positions: refused."""
    import transformers

    from mimo_spec.interop import export_hf, import_hf

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    cfg, model = import_hf(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(tie_word_embeddings=True, **common)))
    assert export_hf(model, cfg, tmp_path / "plain").is_dir()  # the same LM without M-RoPE exports
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(OmegaConf.to_container(cfg) if not isinstance(cfg, dict) else cfg)
    cfg.model.params.mrope_section = [2, 3, 3]
    with pytest.raises(ConfigError, match=r"cannot export to Hugging Face: mrope_section=\[2, 3, 3\]: M-RoPE"):
        export_hf(model, cfg, tmp_path / "mrope")
    assert not (tmp_path / "mrope").exists()
