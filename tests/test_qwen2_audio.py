"""Qwen2-Audio against transformers (tiny random models with perturbed weights, fp32, CPU): the pooling Whisper
encoder with items of different lengths, import / export with logits and loss on a batch of audios of different
lengths laid out as Qwen2AudioProcessor lays them out, the 7B preset's shape, the data path (placeholders per
audio as the processor counts them), cached generation; and the pooling projectors against torch's own pooling."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from conftest import check_preset_is_the_release  # noqa: E402
from mimo_spec import build_model  # noqa: E402
from mimo_spec.config import compose_config  # noqa: E402
from mimo_spec.errors import InputError, ParamError  # noqa: E402
from mimo_spec.generation import generate  # noqa: E402
from mimo_spec.interop import export_hf, import_hf  # noqa: E402

TOL = 1e-5
AUD, BOS, EOS = 250, 251, 252
MEL, POSITIONS = 16, 50  # 100 frames per window: 1 s at 16 kHz
AUDIO = dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, num_mel_bins=MEL,
             max_source_positions=POSITIONS)
TEXT = dict(model_type="qwen2", vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def processor_tokens(frames: int) -> int:
    """Qwen2AudioProcessor's placeholder count for an audio of ``frames`` real feature frames."""
    return (((frames - 1) // 2 + 1) - 2) // 2 + 1


@functools.lru_cache(maxsize=None)
def _pair():
    config = transformers.Qwen2AudioConfig(audio_config=AUDIO, text_config=TEXT, audio_token_index=AUD)
    torch.manual_seed(0)
    hf = transformers.Qwen2AudioForConditionalGeneration(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # unit norms, zero biases and default inits would hide swapped tensors
        for name, p in hf.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.15 if "language_model.layers" in name else 0.05))
    hf.eval()
    cfg, model = import_hf(hf)
    return hf, cfg, model.eval()


@functools.lru_cache(maxsize=None)
def _features():
    """WhisperFeatureExtractor's features and mask for three audios of different lengths (one full window)."""
    fe = transformers.WhisperFeatureExtractor(feature_size=MEL, chunk_length=1)
    rng = np.random.default_rng(0)
    audios = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in (5600, 16000, 9930)]
    out = fe(audios, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt")
    return out["input_features"], out["attention_mask"]


def _batch():
    """Two right-padded rows laid out as the processor does (<|audio_bos|>, n x <|AUDIO|>, <|audio_eos|>),
    three audios; labels -100 at placeholders and padding."""
    feats, fmask = _features()
    n = [processor_tokens(int(f)) for f in fmask.sum(-1)]
    gen = torch.Generator().manual_seed(2)

    def text(k):
        return torch.randint(0, 240, (k,), generator=gen).tolist()

    rows = [text(3) + [BOS] + [AUD] * n[0] + [EOS] + text(4) + [BOS] + [AUD] * n[1] + [EOS] + text(2),
            text(5) + [BOS] + [AUD] * n[2] + [EOS] + text(6)]
    length = max(map(len, rows))
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    labels = ids.clone()
    labels[(ids == AUD) | (mask == 0)] = -100
    hf_kw = dict(input_ids=ids, attention_mask=mask, input_features=feats, feature_attention_mask=fmask)
    ours = {"audio": {"whisper": {"input_features": feats, "feature_attention_mask": fmask}}}
    return hf_kw, ours, labels, n


def _err(a, b, mask):
    return (a - b)[mask.bool()].abs().max().item()


@torch.no_grad()
def test_pooling_encoder_matches_qwen2_audio_encoder_on_items_of_different_lengths():
    from transformers.masking_utils import create_bidirectional_mask

    hf, _, model = _pair()
    enc = model.modalities["audio"].encoders["whisper"]
    tower = hf.model.audio_tower
    feats, fmask = _features()
    # transformers' own path: key mask over each item's conv frames, the tower, the first n tokens kept
    conv_len, tokens = tower._get_feat_extract_output_lengths(fmask.sum(-1))
    keys = (torch.arange(POSITIONS)[None, :] < conv_len[:, None]).long()
    attn = create_bidirectional_mask(config=tower.config, inputs_embeds=torch.zeros(3, POSITIONS, 1),
                                     attention_mask=keys)
    ref = tower(feats, attention_mask=attn).last_hidden_state
    want = torch.cat([ref[i, : int(t)] for i, t in enumerate(tokens)])
    got = enc(feats, fmask)
    assert got.shape == want.shape and (got - want).abs().max().item() <= TOL
    inputs = {"input_features": feats, "feature_attention_mask": fmask}
    assert enc.item_tokens(inputs) == tokens.tolist() == [processor_tokens(int(f)) for f in fmask.sum(-1)] \
        == [9, 25, 16]
    # full windows without a mask: HF's output as is, (N, 25, C)
    full = enc(feats)
    assert full.shape == (3, POSITIONS // 2, 32) and (full - tower(feats).last_hidden_state).abs().max() <= TOL
    # the mask is checked: real frames first; only a variable_length encoder takes one
    holes = fmask.clone()
    holes[0, 2] = 0
    with pytest.raises(InputError, match=r"audio item 0's mask"):
        enc.validate_inputs({"input_features": feats, "feature_attention_mask": holes}, "x")
    plain = build_model(compose_config(["modality=[audio_whisper]"]), seed=0).modalities["audio"].encoders["whisper"]
    with pytest.raises(InputError, match="variable_length"):
        plain.validate_inputs({"input_features": torch.zeros(1, 80, 64),
                               "feature_attention_mask": torch.ones(1, 64, dtype=torch.int32)}, "x")


@torch.no_grad()
def test_import_export_logits_loss_and_generation_equal_transformers(tmp_path):
    hf, cfg, model = _pair()
    hf_kw, ours, labels, _ = _batch()
    ref = hf(**hf_kw, labels=labels)
    out = model(hf_kw["input_ids"], ours, attention_mask=hf_kw["attention_mask"], labels=labels)
    assert _err(out.logits, ref.logits, hf_kw["attention_mask"]) <= TOL
    assert abs(out.loss.item() - ref.loss.item()) <= TOL
    # Hugging Face's parameters one for one (q and v biases, no key bias: key_bias false)
    ours_n, theirs_n = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in hf.parameters())
    assert ours_n == theirs_n
    enc_params = cfg["modalities"]["audio"]["submodules"]["encoders"]["whisper"]["params"]
    assert enc_params["pool_stride"] == 2 and enc_params["key_bias"] is False
    # export: the Hub layout, loaded by from_pretrained with nothing missing, the same logits
    out_dir = export_hf(model, cfg, tmp_path / "out")
    back, info = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(out_dir, output_loading_info=True)
    assert not any(info.values()), info
    again = back.eval()(**hf_kw, labels=labels)
    assert _err(again.logits, ref.logits, hf_kw["attention_mask"]) <= TOL
    assert abs(again.loss.item() - ref.loss.item()) <= TOL
    assert json.loads((out_dir / "config.json").read_text())["architectures"] == ["Qwen2AudioForConditionalGeneration"]
    # the Hub layout imports again (from the directory) to the same model
    cfg2, model2 = import_hf(out_dir)
    assert cfg2["modalities"] == cfg["modalities"]
    out2 = model2.eval()(hf_kw["input_ids"], ours, attention_mask=hf_kw["attention_mask"])
    assert _err(out2.logits, ref.logits, hf_kw["attention_mask"]) <= TOL
    # generation on one audio: the KV cache gives the tokens full recomputation gives, the first one HF's
    ids = hf_kw["input_ids"][1:, : int(hf_kw["attention_mask"][1].sum())]
    feats, fmask = _features()
    item = {"audio": {"whisper": {"input_features": feats[2:], "feature_attention_mask": fmask[2:]}}}
    cached = generate(model, ids, item, max_new_tokens=8, use_cache=True)
    full = generate(model, ids, item, max_new_tokens=8, use_cache=False)
    assert cached.tokens == full.tokens and len(cached.tokens) == 8 and len(set(cached.tokens)) > 1
    first = hf(input_ids=ids, input_features=feats[2:], feature_attention_mask=fmask[2:]).logits[0, -1].argmax()
    assert cached.tokens[0] == int(first)


def _released():
    """Qwen/Qwen2-Audio-7B-Instruct's config.json values."""
    text = dict(model_type="qwen2", vocab_size=156032, hidden_size=4096, intermediate_size=11008,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, hidden_act="silu",
                max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=151643,
                eos_token_id=151645, tie_word_embeddings=False)
    audio = dict(model_type="qwen2_audio_encoder", num_mel_bins=128, encoder_layers=32, encoder_attention_heads=20,
                 encoder_ffn_dim=5120, d_model=1280, max_source_positions=1500, activation_function="gelu",
                 scale_embedding=False)
    return transformers.Qwen2AudioConfig(audio_config=audio, text_config=text, audio_token_index=151646)


def test_preset_matches_the_released_model():
    from mimo_spec.summary import render_summary

    config = _released()
    # exactly transformers' count (no key bias: key_bias false), and the imported config is the preset
    ours, resolved, _ = check_preset_is_the_release("qwen2_audio_7b", transformers.Qwen2AudioForConditionalGeneration,
                                                    config, 8_397_094_912)
    # the project's convention: the nodes spell out every constructor parameter (the layer backend excepted)
    import inspect

    from mimo_spec.registry import resolve

    audio = resolved["modalities"]["audio"]["submodules"]
    for kind, node in (("language_model", resolved["model"]), ("encoder", audio["encoders"]["whisper"]),
                       ("projector", audio["input_projections"]["whisper"])):
        wanted = set(inspect.signature(resolve(kind, node["module"]).__init__).parameters) - {"self", "backend"}
        assert set(node["params"]) == wanted, (node["module"], wanted ^ set(node["params"]))
    text = render_summary(ours)
    assert "modalities.audio: placeholders per item from its grid (feature_attention_mask; e.g. 3000 of 3000 " \
           "set: 750)" in text


def test_llava_json_audio_gets_the_processors_placeholders_and_trains(tmp_path):
    sf = pytest.importorskip("soundfile")
    from mimo_spec.data import build_dataset, collate
    from mimo_spec.data.tokenizer import build_tokenizer
    from mimo_spec.train.loop import train

    rng = np.random.default_rng(3)
    lengths = {"short.wav": 5000, "long.wav": 15000}  # 0.31 s; 0.94 s = a full 0.64 s window and 0.3 s more
    waves = {}
    for name, n in lengths.items():
        waves[name] = (np.sin(np.arange(n) / 9.0) * 0.3 + rng.standard_normal(n) * 0.05).astype(np.float32)
        sf.write(str(tmp_path / name), waves[name], 16000, subtype="FLOAT")
    records = [{"id": "a", "audios": ["short.wav", "long.wav"],
                "conversations": [{"from": "human", "value": "<audio> then <audio>: what?"},
                                  {"from": "gpt", "value": "Two tones."}]},
               {"id": "b", "audio": "short.wav",
                "conversations": [{"from": "human", "value": "Hear it?"}, {"from": "gpt", "value": "Yes."}]}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    overrides = ["preset=qwen2_audio_tiny", "data=llava_json", f"data.path={tmp_path / 'data.json'}",
                 "data.eval_fraction=0", 'data.audio_wrap=["<|audio_bos|>","<|audio_eos|>"]']
    cfg = compose_config(overrides)
    model = build_model(cfg, seed=0)
    data_cfg = OmegaConf_to_dict(cfg.data)
    tok = build_tokenizer(data_cfg, model)
    ds = build_dataset(data_cfg, model, tok, "train")
    samples = [ds[i] for i in range(len(ds))]
    sample = next(s for s in samples if s["num_items"]["audio"] == 3)
    # what transformers' processor makes of each window: a 0.64 s chunk, 64 frames
    fe = transformers.WhisperFeatureExtractor(feature_size=64)
    fe.n_samples, fe.nb_max_frames = 10240, 64
    chunks = [waves["short.wav"], waves["long.wav"][:10240], waves["long.wav"][10240:]]
    ref = fe(chunks, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt")
    want = [processor_tokens(int(f)) for f in ref["attention_mask"].sum(-1)]
    assert want == [8, 16, 7]
    inputs = sample["items"]["audio"]["whisper"]
    assert torch.equal(inputs["feature_attention_mask"], ref["attention_mask"].to(torch.int32))
    assert torch.allclose(inputs["input_features"], ref["input_features"], atol=1e-4)
    assert model.modalities["audio"].item_tokens(sample["items"]["audio"]) == want
    # each item's run: <|audio_bos|>, its placeholders, <|audio_eos|>
    ids = sample["input_ids"].tolist()
    bos, eos = (tok.encode(t) if hasattr(tok, "encode") else None for t in ("<|audio_bos|>", "<|audio_eos|>"))
    runs, k = [], 0
    while k < len(ids):
        if ids[k] == 1001:
            j = k
            while j < len(ids) and ids[j] == 1001:
                j += 1
            runs.append((k, j))
            k = j
        else:
            k += 1
    assert [j - i for i, j in runs] == want
    if bos is not None:
        for i, j in runs:
            assert ids[i - len(bos):i] == list(bos) and ids[j:j + len(eos)] == list(eos)
    batch = collate(samples, 0)
    out = model(batch["input_ids"], batch["modality_inputs"], attention_mask=batch["attention_mask"],
                labels=batch["labels"])
    assert torch.isfinite(out.loss)
    result = train(compose_config(overrides + ["train.steps=2", "train.batch_size=2", "train.log_every=1000",
                                               "train.eval_every=0", "train.checkpoint.every=0"]), tmp_path / "run")
    assert result["status"] == "completed" and result["steps"] == 2


def OmegaConf_to_dict(node):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


def test_avg_pool_and_pool2d_projectors_equal_torch_pooling():
    from mimo_spec.components.pooling import AvgPoolProjector, Pool2dProjector

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 11, 8, generator=g)
    avg = AvgPoolProjector(8, 16, stride=2, norm=True)
    with torch.no_grad():
        for p in avg.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pooled = nn.AvgPool1d(2, 2)(x.transpose(1, 2)).transpose(1, 2)  # (3, 5, 8): the odd tail dropped
    want = avg.mlp[0](F.layer_norm(pooled, (8,), avg.norm.weight, avg.norm.bias, 1e-5))
    assert avg.tokens_out(11) == 5 and torch.allclose(avg(x), want, atol=1e-6)
    with pytest.raises(InputError, match="items first"):
        avg(x.flatten(0, 1))
    with pytest.raises(ParamError):
        AvgPoolProjector(8, 16, stride=0)

    grid = torch.randn(2, 25, 8, generator=g)  # a 5x5 grid of tokens per item
    spatial = grid.reshape(2, 5, 5, 8).permute(0, 3, 1, 2)
    for mode, torch_pool, side in (("average", nn.AvgPool2d(2, 2), 2), ("max", nn.MaxPool2d(2, 2), 2)):
        proj = Pool2dProjector(8, 16, stride=2, mode=mode, num_layers=2)
        ref = torch_pool(spatial).flatten(2).transpose(1, 2)
        assert proj.tokens_out(25) == side * side
        assert torch.allclose(proj(grid), proj.mlp(ref), atol=1e-6)
    # bilinear (LLaVA-OneVision: ceil(g / 2)), after the projection, against the interpolation written out
    proj = Pool2dProjector(8, 16, stride=2, mode="bilinear", order="project_first", num_layers=2)
    projected = proj.mlp(grid).reshape(2, 5, 5, 16)
    w = _bilinear_weights(3, 5)  # (3, 5): align_corners=False, scale 5/3
    ref = torch.einsum("ai,bj,nijc->nabc", w, w, projected).reshape(2, 9, 16)
    assert proj.tokens_out(25) == 9 and torch.allclose(proj(grid), ref, atol=1e-5)
    with pytest.raises(ParamError, match="square"):
        proj.tokens_out(24)
    # in a model: a Whisper encoder's 32 tokens averaged by 4 into the LM
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose_config(["modality=[audio_whisper]"]), resolve=True)
    node = cfg["modalities"]["audio"]["submodules"]["input_projections"]["whisper"]
    node["module"], node["params"]["stride"] = "avg_pool", 4
    model = build_model(cfg, seed=0)
    example = model.modalities["audio"].example_inputs(2, generator=g)
    assert model.modalities["audio"].item_tokens(example) == [8, 8]
    assert model.modalities["audio"].encode(example).shape == (16, model.language_model.hidden_size)


def _bilinear_weights(out_size: int, in_size: int) -> torch.Tensor:
    """(out, in) weights of 1-D linear interpolation with align_corners=False (half-pixel centres, clamped)."""
    scale = in_size / out_size
    w = torch.zeros(out_size, in_size)
    for i in range(out_size):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        lo = min(int(math.floor(src)), in_size - 1)
        hi = min(lo + 1, in_size - 1)
        frac = src - lo
        w[i, lo] += 1 - frac
        w[i, hi] += frac
    return w


@torch.no_grad()
def test_whisper_without_key_bias_is_transformers_whisper_encoder(tmp_path):
    """``key_bias: false`` holds Hugging Face's WhisperEncoder parameters one for one (q and v biases, no key
    bias) and computes what it computes with the same weights; the default keeps its zero key bias (exact, one
    hidden_size per layer more); both export to a WhisperEncoder that from_pretrained loads whole."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

    from mimo_spec.components.audio.whisper import WhisperEncoder
    from mimo_spec.components.layers import Attention
    from mimo_spec.interop import hf_weights as hw

    config = transformers.WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=48,
                                        num_mel_bins=MEL, max_source_positions=12)
    torch.manual_seed(0)
    hf = HFWhisperEncoder(config)
    g = torch.Generator().manual_seed(3)
    for p in hf.parameters():  # zero biases and unit norms would hide a swapped or dropped tensor
        p.add_(torch.randn(p.shape, generator=g) * 0.1)
    hf.eval()
    theirs = sum(p.numel() for p in hf.parameters())
    x = torch.randn(2, MEL, 24, generator=g)
    ref = hf(x).last_hidden_state
    for key_bias in (False, True):
        params = {**hw.whisper_encoder_params_from_hf(config), "key_bias": key_bias}
        ours = WhisperEncoder(**params).eval()
        ours.load_state_dict(hw.whisper_encoder_state_dict_from_hf(hf.state_dict(), params), strict=True)
        assert (ours(x) - ref).abs().max().item() <= TOL, key_bias
        layer = dict(ours.layers[0].attn.named_parameters())
        if key_bias:
            assert sum(p.numel() for p in ours.parameters()) == theirs + 2 * 32
            assert layer["qkv.bias"][32:64].abs().max() == 0  # the absent key bias, a zero part
        else:
            assert sum(p.numel() for p in ours.parameters()) == theirs
            assert sorted(layer) == ["out.bias", "out.weight", "q_bias", "qkv.weight", "v_bias"]
            assert torch.equal(layer["q_bias"], hf.layers[0].self_attn.q_proj.bias)
            assert torch.equal(layer["v_bias"], hf.layers[0].self_attn.v_proj.bias)
        back_sd = hw.whisper_encoder_state_dict_to_hf(ours.state_dict(), params)
        assert set(back_sd) == set(hf.state_dict()) and all(torch.equal(t, hf.state_dict()[k])
                                                               for k, t in back_sd.items())
        out = export_hf(ours, {"module": "whisper_encoder", "params": params}, tmp_path / f"kb{key_bias}")
        back, info = HFWhisperEncoder.from_pretrained(out, output_loading_info=True)
        assert not any(info.values()), info
        assert (back.eval()(x).last_hidden_state - ref).abs().max().item() <= TOL
    # the option in the layer: q and v biases go to their parts, whatever the kv head count
    attn = Attention(32, 4, 2, qkv_bias="qv")
    attn.q_bias.normal_(generator=g)
    attn.v_bias.normal_(generator=g)
    fused = Attention(32, 4, 2, qkv_bias=True)
    fused.qkv.weight.copy_(attn.qkv.weight)
    fused.out.load_state_dict(attn.out.state_dict())
    fused.qkv.bias.copy_(torch.cat([attn.q_bias, torch.zeros(16), attn.v_bias]))
    h = torch.randn(2, 5, 32, generator=g)
    assert torch.allclose(attn(h), fused(h), atol=1e-6)
    assert sum(p.numel() for p in attn.parameters()) == sum(p.numel() for p in fused.parameters()) - 16
    with pytest.raises(ParamError, match="qkv_bias"):
        Attention(32, 4, qkv_bias="k")
    with pytest.raises(ParamError, match="transformer-engine"):
        WhisperEncoder(hidden_size=32, num_layers=1, num_heads=4, ffn_hidden_size=48, key_bias=False, backend="te")


def test_a_pooling_whisper_tower_exports_alone_as_qwen2_audio_encoder(tmp_path):
    """Qwen2-Audio's tower alone (whisper_encoder, pool_stride 2) exports as transformers' Qwen2AudioEncoder,
    which from_pretrained loads whole and which computes what ours computes (a plain WhisperConfig would drop
    the pooling: twice the frames); import_hf reads it back with the pooling; another stride is refused by name."""
    from transformers import Qwen2AudioEncoder

    from mimo_spec.builders.build import build_module
    from mimo_spec.errors import ConfigError

    node = {"module": "whisper_encoder", "params": dict(num_mel_bins=MEL, hidden_size=36, num_layers=2, num_heads=3,
                                                        ffn_hidden_size=50, max_source_positions=12, pool_stride=2,
                                                        key_bias=False)}
    ours = build_module(node, kind="encoder").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    x = torch.randn(3, MEL, 24, generator=g)
    want = ours(x)
    assert want.shape == (3, 6, 36)
    out = export_hf(ours, node, tmp_path / "tower")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2AudioEncoder"]
    back, info = Qwen2AudioEncoder.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        assert (back.eval()(x).last_hidden_state - want).abs().max().item() <= TOL
    cfg, again = import_hf(out)
    assert cfg["module"] == "whisper_encoder" and cfg["params"]["pool_stride"] == 2
    assert (again.eval()(x) - want).abs().max().item() <= TOL
    node3 = {"module": "whisper_encoder", "params": {**node["params"], "pool_stride": 3}}
    with pytest.raises(ConfigError, match=r"params.pool_stride.*3"):
        export_hf(build_module(node3, kind="encoder"), node3, tmp_path / "three")


def test_whisper_towers_run_in_bfloat16_weights():
    """dtype=bfloat16 builds every weight in bf16, the Whisper tower's sinusoidal position table included (it
    stayed fp32, promoted the activations and crashed the first bf16 LayerNorm): the Qwen2-Audio preset and the
    plain audio_whisper modality run forward and backward."""
    for overrides in (["preset=qwen2_audio_tiny"], ["modality=[audio_whisper]"]):
        model = build_model(compose_config(overrides), seed=0, dtype="bfloat16")
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}, overrides
        batch = model.example_inputs(batch_size=2, seed=0)
        out = model(**batch)
        loss = out.loss if getattr(out, "loss", None) is not None else out.logits.float().square().mean()
        assert torch.isfinite(loss), overrides
        loss.backward()
