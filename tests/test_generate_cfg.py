"""Generating a discrete modality's items (#19): codes one by one with the KV cache, restricted to the
modality's codes, with classifier-free guidance as Janus builds it, interleaved with text."""

import torch

from mimo_spec import build_model
from mimo_spec.generation import generate, unconditional_ids

from conftest import perturb
from test_discrete import BEGIN, END, GEN, discrete_config

PAD = 3


def _model(mode):
    model = perturb(build_model(discrete_config(mode, positions=mode == "vocab"), seed=0),
                    louder=lambda n: "language_model" in n or "output_head" in n, louder_scale=0.3)
    batch = model.example_inputs(1)
    ids = batch["input_ids"][:, :12]  # text, the image placeholders (encoder input) and text: no output item
    return model, ids, batch["modality_inputs"]


def _reference_logits(model, ids, inputs, codes, scale):
    """Guided logits of every code position from two separate full forward passes (cond / uncond)."""
    mod, lm = model.modalities["image_out"], model.language_model
    prompt = torch.cat([ids, torch.tensor([[BEGIN]])], 1)
    uncond = unconditional_ids(prompt, BEGIN, PAD)
    assert uncond[0, 0] == prompt[0, 0] and uncond[0, -1] == BEGIN and set(uncond[0, 1:-1].tolist()) == {PAD}
    out = []
    for t in range(codes.numel()):
        code_embeds = mod.embed_codes(codes[None, :t])
        cond = lm(torch.cat([model.embed_inputs(prompt, inputs), code_embeds], 1))[:, -1]
        free = lm(torch.cat([lm.embed_tokens(uncond), code_embeds], 1))[:, -1]
        c, u = mod.code_logits(cond)[0], mod.code_logits(free)[0]
        out.append(u + scale * (c - u))
    return torch.stack(out)


def test_guided_codes_equal_two_forward_passes_and_the_cache_equals_recomputation():
    for mode in ("vocab", "head"):
        model, ids, inputs = _model(mode)
        for scale in (1.0, 3.0):
            kw = dict(output_modality="image_out", max_new_tokens=6, guidance_scale=scale, pad_id=PAD,
                      output_scores=True)
            cached = generate(model, ids, inputs, **kw)
            full = generate(model, ids, inputs, use_cache=False, **kw)
            codes = cached.codes["image_out"][0]
            assert cached.tokens[:6] == [BEGIN, GEN, GEN, GEN, GEN, END]
            assert torch.equal(codes, full.codes["image_out"][0]) and cached.tokens == full.tokens
            with torch.no_grad():
                want = _reference_logits(model, ids, inputs, codes, scale)
            torch.testing.assert_close(cached.scores["image_out"][0], want, atol=1e-5, rtol=1e-5)
            assert torch.equal(codes, want.argmax(-1))  # greedy: the argmax of the guided logits
            torch.testing.assert_close(cached.outputs["image_out"][0],
                                       model.modalities["image_out"].tokenizer.decode(codes[None])[0])
        sampled = [generate(model, ids, inputs, strategy="sample", top_k=4, top_p=0.95, seed=1, use_cache=c,
                            **{**kw, "output_scores": False}).codes["image_out"][0] for c in (True, False)]
        assert torch.equal(sampled[0], sampled[1])


def test_codes_are_restricted_and_text_continues_after_the_item(monkeypatch):
    import mimo_spec.generation as generation

    model, ids, inputs = _model("vocab")
    lm = model.language_model
    plain = lm.logits
    # LM id 203 (code 3) beats every other id, at text and code steps alike
    monkeypatch.setattr(lm, "logits", lambda h: plain(h).index_fill(-1, torch.tensor([203]), 1e4))
    real_next, steps = generation.next_token_logits, []

    def text_logits(lm_, hidden):  # the first text step opens an image; later ones never do
        steps.append(1)
        return real_next(lm_, hidden).index_fill(-1, torch.tensor([BEGIN]), 2e4 if len(steps) == 1 else -1e4)

    monkeypatch.setattr(generation, "next_token_logits", text_logits)
    cached = generate(model, ids, inputs, max_new_tokens=10)
    steps.clear()
    full = generate(model, ids, inputs, max_new_tokens=10, use_cache=False)
    toks = cached.tokens
    assert toks[:6] == [BEGIN, GEN, GEN, GEN, GEN, END] and toks == full.tokens
    assert cached.codes["image_out"][0].tolist() == [3, 3, 3, 3]  # restricted to the codes: 203 is code 3
    # text after the item: never a code id (those are the items' own) though 203 scores highest
    assert len(toks) == 10 and all(not 200 <= t <= 206 for t in toks[6:])
    assert len(cached.outputs["image_out"]) == 1 and cached.outputs["image_out"][0].shape == (3, 8, 8)
    # what guidance and output_modality refuse, by argument
    import pytest

    from mimo_spec.errors import InputError

    for kw, path in ((dict(guidance_scale=2.0), "pad_id"), (dict(output_modality="images"), "output_modality"),
                     (dict(guidance_scale=float("nan"), pad_id=PAD), "guidance_scale")):
        with pytest.raises(InputError, match=path):
            generate(model, ids, inputs, max_new_tokens=2, **kw)
