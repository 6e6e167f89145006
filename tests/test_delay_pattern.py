"""MusicGen's delay pattern for a multi-codebook codec modality (#19, ``codebook_pattern: delay``).

The delayed layout and its inverse against a K=3 example written out here; the teacher-forced code loss
against a computation written here from the LM's hidden states; generation with the KV cache equal to
recomputing, its codes un-delayed into (K, T) that the codec decodes; a few training steps lowering the code
loss; the refusals (one codebook, vocabulary mode, mis-sized embedding or head).
"""

import pytest
import torch
import torch.nn.functional as F

from mimo_spec import build_model
from mimo_spec.errors import ConfigError, ParamError
from mimo_spec.models.modality import delay_codes, delay_mask, undelay_codes

from conftest import perturb, tiny_config

GEN, BEGIN, END = 240, 241, 242
K, SIZE, FRAMES = 3, 16, 3  # 3 codebooks of 16 codes; 3 frames -> 5 positions


def speech_config(pattern="delay", embeddings=K * (SIZE + 1), head=K * SIZE, vocab=False, bandwidth=24.0):
    cfg = tiny_config()
    params = {"generation_token_id": GEN, "begin_token_id": BEGIN, "end_token_id": END, "num_frames": FRAMES,
              "codebook_pattern": pattern}
    subs = {"tokenizer": {"module": "encodec", "params": {
        "sampling_rate": 8000, "bandwidth": bandwidth, "target_bandwidths": [bandwidth], "hidden_size": 8,
        "num_filters": 4, "upsampling_ratios": [2, 2], "codebook_size": SIZE, "num_lstm_layers": 1}}}
    if vocab:
        params["code_token_offset"] = 100
    else:
        subs["code_embedding"] = {"module": "embedding", "params": {"num_embeddings": embeddings, "embedding_dim": 24}}
        subs["code_projection"] = {"module": "mlp", "params": {"in_features": 24, "out_features": 32}}
        subs["output_head"] = {"module": "mlp", "params": {"in_features": 32, "out_features": head}}
    cfg["modalities"]["speech_out"] = {"module": "modality", "params": params, "submodules": subs}
    return cfg


def test_delay_layout_and_its_inverse_match_a_written_out_example():
    codes = torch.tensor([[[0, 1, 2, 3],
                           [4, 5, 6, 7],
                           [8, 9, 10, 11]]])  # (1, K=3, T=4)
    P = 12  # the pad code (codebook_size: codes are 0..11)
    want = torch.tensor([[[0, P, P],
                          [1, 4, P],
                          [2, 5, 8],
                          [3, 6, 9],
                          [P, 7, 10],
                          [P, P, 11]]])  # (1, T + K - 1 = 6, K): codebook k starts k positions later
    assert torch.equal(delay_codes(codes, P), want)
    assert torch.equal(undelay_codes(want), codes)
    assert torch.equal(delay_mask(4, 3), want[0] != P)


def test_delay_pattern_is_refused_where_it_cannot_apply():
    with pytest.raises((ParamError, ConfigError), match="codebook_pattern"):  # one codebook
        build_model(speech_config(embeddings=SIZE + 1, head=SIZE, bandwidth=8.0))
    with pytest.raises((ParamError, ConfigError), match="codebook_pattern"):  # vocabulary mode
        build_model(speech_config(vocab=True))
    with pytest.raises((ParamError, ConfigError), match="code_embedding"):  # K * codebook_size rows: no pads
        build_model(speech_config(embeddings=K * SIZE))
    with pytest.raises((ParamError, ConfigError), match="output_head"):
        build_model(speech_config(head=SIZE))
    with pytest.raises((ParamError, ConfigError), match="codebook_pattern"):
        build_model(speech_config(pattern="interleave"))


@pytest.fixture(scope="module")
def model():
    return perturb(build_model(speech_config(), seed=0), louder=lambda n: "speech_out" in n and "tokenizer" not in n,
                   louder_scale=0.3)


def _reference_loss(model, batch):
    """The code loss written out: each position's input is the sum over codebooks of that codebook's row of the
    embedding (pad row where the frame t - k does not exist); the state before a position predicts its K codes;
    mean cross entropy over the entries that hold a code."""
    mod = model.modalities["speech_out"]
    codes = mod.tokenizer.encode(batch["output_targets"]["speech_out"])  # (N, K, T)
    n, k, t = codes.shape
    positions = t + k - 1
    table = mod.code_embedding.weight
    ids = batch["input_ids"]
    embeds = model.embed_inputs(ids, batch["modality_inputs"]).clone()
    rows, cols = (ids == GEN).nonzero(as_tuple=True)
    targets = torch.full((n, positions, k), -100)
    vectors = torch.zeros(n, positions, table.shape[1])
    for i in range(n):
        for p in range(positions):
            for c in range(k):
                frame = p - c
                code = int(codes[i, c, frame]) if 0 <= frame < t else SIZE
                vectors[i, p] += table[c * (SIZE + 1) + code]
                if 0 <= frame < t:
                    targets[i, p, c] = code
    embeds[rows, cols] = mod.code_projection(vectors.reshape(n * positions, -1))
    hidden = model.language_model(embeds)
    logits = mod.output_head(hidden[rows, cols - 1]).view(n, positions, k, SIZE)
    return F.cross_entropy(logits.reshape(-1, SIZE), targets.reshape(-1), ignore_index=-100), logits, targets


def test_teacher_forced_loss_and_generation_with_the_delay_pattern(model):
    from mimo_spec.generation import generate

    mod = model.modalities["speech_out"]
    assert (mod.num_generation_tokens, mod.num_codes, mod.tokenizer.num_codebooks) == (FRAMES + K - 1, SIZE, K)
    batch = model.example_inputs(2, seed=3)
    clips = batch["output_targets"]["speech_out"]
    hop = mod.tokenizer.hop_length
    assert clips.shape == (2, FRAMES * hop)
    out = model(**batch)
    codes = mod.tokenizer.encode(clips)
    assert torch.equal(out.output_codes["speech_out"], delay_codes(codes, SIZE))
    assert out.modality_outputs["speech_out"].shape == (2, FRAMES + K - 1, K, SIZE)
    want, logits, targets = _reference_loss(model, batch)
    torch.testing.assert_close(out.modality_outputs["speech_out"], logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.modality_losses["speech_out"], want, atol=1e-5, rtol=1e-5)
    valid = targets != -100
    acc = ((logits.argmax(-1) == targets) & valid).sum() / valid.sum()
    torch.testing.assert_close(out.modality_accuracy["speech_out"], acc.float())

    prompt = batch["input_ids"][:1, :4]
    for kw in ({}, {"strategy": "sample", "top_k": 5, "top_p": 0.9, "seed": 7},
               {"guidance_scale": 2.0, "pad_id": 0}):
        cached = generate(model, prompt, output_modality="speech_out", max_new_tokens=1, output_scores=True, **kw)
        again = generate(model, prompt, output_modality="speech_out", max_new_tokens=1, use_cache=False,
                         output_scores=True, **kw)
        got = cached.codes["speech_out"][0]
        assert torch.equal(got, again.codes["speech_out"][0]), kw
        torch.testing.assert_close(cached.scores["speech_out"][0], again.scores["speech_out"][0], atol=1e-4, rtol=1e-4)
        assert cached.tokens == [BEGIN] + [GEN] * (FRAMES + K - 1) + [END]
        assert got.shape == (FRAMES + K - 1, K)
        mask = delay_mask(FRAMES, K)
        assert bool((got[~mask] == SIZE).all()) and bool(((got[mask] >= 0) & (got[mask] < SIZE)).all())
        if not kw:  # greedy: each entry is its codebook's argmax of the logits it was picked from
            scores = cached.scores["speech_out"][0]
            assert torch.equal(got[mask], scores.argmax(-1)[mask])
        frames = undelay_codes(got[None])
        assert frames.shape == (1, K, FRAMES)
        clip = cached.outputs["speech_out"][0]
        assert clip.shape == (FRAMES * hop,)
        torch.testing.assert_close(clip, mod.tokenizer.decode(frames)[0])
    # the sampled run differs from greedy somewhere (the sampler is used), and is its own seed's
    greedy = generate(model, prompt, output_modality="speech_out", max_new_tokens=1).codes["speech_out"][0]
    sampled = [generate(model, prompt, output_modality="speech_out", max_new_tokens=1, strategy="sample",
                        temperature=2.0, seed=s).codes["speech_out"][0] for s in range(2)]
    assert any(not torch.equal(s, greedy) for s in sampled)


def test_a_few_training_steps_lower_the_delayed_code_loss():
    cfg = speech_config()
    del cfg["modalities"]["images"]  # text-to-speech only
    model = build_model(cfg, seed=1).train()
    batch = model.example_inputs(2, seed=5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        out = model(**batch)
        losses.append(float(out.modality_losses["speech_out"]))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert losses[-1] < 0.7 * losses[0], losses
