"""Discrete tokenizers (janus_vq, chameleon_vq, emu3_vq, encodec, dac) against transformers' own models with the
same (perturbed) weights: codes equal exactly, decoded pixels / samples within 1e-5; imports from a model and
from a saved folder; frozen; inside a modality built from YAML."""

import pytest
import torch
import transformers as tf

from conftest import perturb
from mimo_spec import build_model
from mimo_spec.builders import build_module
from mimo_spec.errors import ConfigError, InputError
from mimo_spec.interop.hf_tokenizers import build_tokenizer_from_hf, export_tokenizer_hf, tokenizer_from_hf

IMAGE_CASES = {
    "janus_vq": lambda: tf.JanusVQVAE(tf.JanusVQVAEConfig(
        embed_dim=8, num_embeddings=48, latent_channels=32, base_channels=32, channel_multiplier=[1, 2],
        num_res_blocks=1, num_patches=8)),
    "chameleon_vq": lambda: tf.ChameleonVQVAE(tf.ChameleonVQVAEConfig(
        embed_dim=8, num_embeddings=48, latent_channels=32, resolution=16, base_channels=32,
        channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[8])),
    "emu3_vq": lambda: tf.Emu3VQVAE(tf.Emu3VQVAEConfig(
        codebook_size=48, embed_dim=4, latent_channels=4, temporal_downsample_factor=2, base_channels=32,
        channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[1], hidden_size=64, num_attention_heads=2)),
}
AUDIO_CASES = {
    "encodec": lambda: tf.EncodecModel(tf.EncodecConfig(
        sampling_rate=800, target_bandwidths=[2.4, 4.8], hidden_size=16, num_filters=8, upsampling_ratios=[2, 2],
        num_lstm_layers=1, codebook_size=64)),
    "dac": lambda: tf.DacModel(tf.DacConfig(
        sampling_rate=800, encoder_hidden_size=8, downsampling_ratios=[2, 2], decoder_hidden_size=16,
        n_codebooks=3, codebook_size=64, codebook_dim=4)),
    "mimi": lambda: tf.MimiModel(tf.MimiConfig(
        sampling_rate=800, num_quantizers=3, codebook_size=16, codebook_dim=8, vector_quantization_hidden_dimension=8,
        hidden_size=16, num_filters=8, upsampling_ratios=[2, 2], upsample_groups=16, num_hidden_layers=1,
        intermediate_size=32, num_attention_heads=2, num_key_value_heads=2, sliding_window=16,
        max_position_embeddings=64)),
}


def _hf(make):
    torch.manual_seed(0)
    model = make()
    model.config._attn_implementation = "eager"
    with torch.no_grad():  # EnCodec's and Mimi's codebooks are buffers, zero at init
        g = torch.Generator().manual_seed(2)
        for n, b in model.named_buffers():
            if n.endswith((".embed", ".embed_sum")):
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)
    return perturb(model, scale=0.05)


def _check_frozen(tok):
    assert all(not p.requires_grad for p in tok.parameters())
    tok.train()
    assert not tok.training and not any(m.training for m in tok.modules())


def _imported(hf, tmp_path, name, **kw):
    """Our tokenizer from the model and from its saved folder: the same params and tensors."""
    got_name, params, state = tokenizer_from_hf(hf, **kw)
    assert got_name == name
    hf.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin"))
    name2, params2, state2 = tokenizer_from_hf(tmp_path, **kw)
    assert (name2, params2) == (name, params) and state2.keys() == state.keys()
    assert all(torch.equal(state[k], state2[k]) for k in state)
    ours = build_tokenizer_from_hf(tmp_path, **kw)
    assert ours.state_dict().keys() == hf.state_dict().keys()
    return ours


@pytest.mark.parametrize("name", list(IMAGE_CASES))
def test_image_vq_matches_transformers(name, tmp_path):
    hf = _hf(IMAGE_CASES[name])
    ours = _imported(hf, tmp_path, name, **({"image_size": 16} if name == "emu3_vq" else {}))
    _check_frozen(ours)
    assert ours.item_kind == "image" and ours.num_codebooks == 1 and ours.grid == (8, 8) and ours.num_tokens == 64
    assert ours.codebook_size == 48
    x = ours.example_targets(2, generator=torch.Generator().manual_seed(3))
    assert x.shape == (2, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    codes = ours.encode(x)
    assert codes.shape == (2, 64) and codes.dtype == torch.int64 and codes.unique().numel() > 4
    with torch.no_grad():
        if name == "emu3_vq":
            ref = torch.stack(list(hf.encode(x, image_sizes=torch.tensor([[16, 16]] * 2)).image_tokens))
        else:
            ref = hf.encode(x).image_tokens
    assert torch.equal(codes, ref.reshape(2, 64))
    if name == "chameleon_vq":  # transformers' class (and Chameleon's HF weights) hold no decoder
        assert not ours.can_decode
        with pytest.raises(InputError, match="cannot decode"):
            ours.decode(codes)
        return
    pixels = ours.decode(codes)
    with torch.no_grad():
        want = hf.decode(codes.reshape(2, 8, 8) if name == "emu3_vq" else codes)
    assert pixels.shape == x.shape
    torch.testing.assert_close(pixels, want, atol=1e-5, rtol=1e-5)
    # inputs checked, naming the sizes
    with pytest.raises(InputError, match=r"\(N, 3, 16, 16\)"):
        ours.encode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(InputError, match=r"\[0, 48\)"):
        ours.decode(torch.full((1, 64), 48))


@pytest.mark.parametrize("name", list(AUDIO_CASES))
def test_audio_codec_matches_transformers(name, tmp_path):
    hf = _hf(AUDIO_CASES[name])
    ours = _imported(hf, tmp_path, name)
    _check_frozen(ours)
    k = {"encodec": 2, "dac": 3, "mimi": 3}[name]  # encodec: 2.4 kbps / (6 bits * 200 frames/s) = 2 codebooks
    assert ours.item_kind == "audio" and ours.num_codebooks == k and ours.sampling_rate == 800
    g = torch.Generator().manual_seed(5)
    for n in (64, 100):
        x = ours.example_targets(2, generator=g, num_samples=n)
        codes = ours.encode(x)
        assert codes.shape == (2, k, ours.num_frames(n)) and codes.dtype == torch.int64
        with torch.no_grad():
            if name == "encodec":
                ref = hf.encode(x[:, None], bandwidth=2.4).audio_codes[0]
                want = hf.decode(ref[None], [None]).audio_values[:, 0]
            elif name == "mimi":
                ref = hf.encode(x[:, None]).audio_codes
                want = hf.decode(ref).audio_values[:, 0]
            else:
                ref = hf.encode(x[:, None]).audio_codes
                want = hf.decode(audio_codes=ref).audio_values
        assert torch.equal(codes, ref) and codes.unique().numel() > 2
        audio = ours.decode(codes)
        assert audio.shape == (2, ours.num_frames(n) * ours.hop_length)
        torch.testing.assert_close(audio, want, atol=1e-5, rtol=1e-5)
    # exported back: transformers' class loads it and computes the same codes
    back = type(hf).from_pretrained(export_tokenizer_hf(ours, tmp_path / "export")).eval()
    with torch.no_grad():
        again = back.encode(x[:, None], **({"bandwidth": 2.4} if name == "encodec" else {})).audio_codes
    assert torch.equal(again[0] if name == "encodec" else again, codes)
    with pytest.raises(InputError, match=r"\(N, samples\)"):
        ours.encode(torch.zeros(2, 1, 64))
    with pytest.raises(InputError, match=rf"\(N, {k}, frames\)"):
        ours.decode(torch.zeros(1, k + 1, 4, dtype=torch.long))


def test_tokenizers_in_modalities_built_from_yaml():
    """A Janus-style image modality (head mode) and a DAC speech modality (vocabulary mode) built by
    build_model: the tokenizer is the modality's submodule, frozen, and tokenize/detokenize go through it."""
    janus = {"module": "janus_vq", "params": {"image_size": 16, "codebook_size": 48, "latent_channels": 32,
                                              "base_channels": 32, "channel_multiplier": [1, 2],
                                              "num_res_blocks": 1}}
    dac = {"module": "dac", "params": {"sampling_rate": 800, "encoder_hidden_size": 8, "downsampling_ratios": [2, 2],
                                       "decoder_hidden_size": 16, "num_codebooks": 3, "codebook_size": 16,
                                       "codebook_dim": 4}}
    cfg = {
        "model": {"module": "gpt", "params": {"vocab_size": 128, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                              "ffn_hidden_size": 64, "max_seq_len": 128}},
        "modalities": {
            "image_gen": {"module": "modality", "params": {
                "special_token_id": 60, "generation_token_id": 61, "begin_token_id": 62, "end_token_id": 63},
                "submodules": {
                    "tokenizer": janus,
                    "code_embedding": {"module": "embedding", "params": {"num_embeddings": 48, "embedding_dim": 8}},
                    "code_projection": {"module": "mlp", "params": {"in_features": 8, "out_features": 32}},
                    "output_head": {"module": "mlp", "params": {"in_features": 32, "out_features": 48}}}},
            "speech": {"module": "modality", "params": {"special_token_id": 65, "generation_token_id": 64,
                                                        "num_frames": 8, "code_token_offset": 70},
                       "submodules": {"tokenizer": dac}},
        },
    }
    model = build_model(cfg, seed=0)
    img, speech = model.modalities["image_gen"], model.modalities["speech"]
    assert type(img.tokenizer).__name__ == "JanusVQ" and type(speech.tokenizer).__name__ == "Dac"
    frozen = [n for n, p in model.named_parameters() if ".tokenizer." in n]
    assert frozen and all(not p.requires_grad for n, p in model.named_parameters() if ".tokenizer." in n)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".tokenizer." not in n)
    model.train()
    assert not img.tokenizer.training and not speech.tokenizer.training
    x = img.tokenizer.example_targets(2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(img.tokenize(x), img.tokenizer.encode(x))
    torch.testing.assert_close(img.detokenize(img.tokenize(x)), img.tokenizer.decode(img.tokenizer.encode(x)))
    a = speech.tokenizer.example_targets(2, num_samples=32, generator=torch.Generator().manual_seed(1))
    codes = speech.tokenizer.encode(a)  # (2, 3, 8)
    flat = speech.tokenize(a)  # frame after frame, codebook k offset by k * 16
    assert flat.shape == (2, 24) and torch.equal(flat.reshape(2, 8, 3)[:, :, 2], codes[:, 2] + 32)
    assert speech.num_codes == 48 and int(speech.code_token_ids[-1]) == 70 + 47
    torch.testing.assert_close(speech.detokenize(flat), speech.tokenizer.decode(codes))


def test_bad_tokenizer_params_are_refused():
    with pytest.raises(ConfigError, match="image_size"):
        build_module({"module": "janus_vq", "params": {"image_size": 30, "channel_multiplier": [1, 2, 2]}},
                     kind="tokenizer", device="meta")
    with pytest.raises(ConfigError, match="bandwidth"):
        build_module({"module": "encodec", "params": {"bandwidth": 5.0}}, kind="tokenizer", device="meta")
    with pytest.raises(InputError, match="cannot import a Linear"):
        tokenizer_from_hf(torch.nn.Linear(2, 2))
    whisper = torch.nn.Linear(2, 2)
    whisper.config = tf.WhisperConfig()
    with pytest.raises(InputError, match="unsupported tokenizer model type 'whisper'"):
        tokenizer_from_hf(whisper)
