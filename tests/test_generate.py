"""Generation: the KV cache gives the same tokens as full recomputation; output modalities decode."""

import torch

from mimo_spec import build_model
from mimo_spec.generation import generate, pick_next

from conftest import tiny_config


def _prompt(model):
    batch = model.example_inputs(1)
    return batch["input_ids"], batch["modality_inputs"]


def test_cached_generation_matches_recomputation_greedy_and_sampled():
    model = build_model(tiny_config(), seed=0)
    ids, inputs = _prompt(model)
    for kw in ({"strategy": "greedy"}, {"strategy": "sample", "top_k": 20, "top_p": 0.9, "temperature": 0.8}):
        cached = generate(model, ids, inputs, max_new_tokens=12, use_cache=True, seed=3, **kw)
        full = generate(model, ids, inputs, max_new_tokens=12, use_cache=False, seed=3, **kw)
        assert cached.tokens == full.tokens and len(cached.tokens) == 12


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(pick_next(logits, "sample", top_k=2, generator=g)) for _ in range(200)}
    assert picks == {0, 1}
    picks = {int(pick_next(logits, "sample", top_p=0.5, generator=g)) for _ in range(100)}
    assert picks == {0}


def test_a_prompt_ending_with_a_begin_token_continues_that_item():
    """A prompt that ends with an image's begin token (as Janus's generation prompt does) has begun the item:
    generate continues with its codes, without output_modality too, and never feeds the begin token twice.
    Greedy, the codes equal those of the same prompt without the token and output_modality set (which feeds
    it): the same sequence either way."""
    from mimo_spec.config import compose_config
    from mimo_spec.generation import generate

    model = build_model(compose_config(["modality=[vision_clip,image_gen]"]), seed=0).eval()
    mod = model.modalities["image_out"]
    begin, end = mod.begin_token_id, mod.end_token_id
    prompt = torch.tensor([[5, 17, 42, 9]])
    asked = generate(model, prompt, output_modality="image_out", max_new_tokens=1)
    assert asked.tokens[0] == begin
    codes = asked.codes["image_out"][0]
    begun = generate(model, torch.cat([prompt, torch.tensor([[begin]])], 1), max_new_tokens=1)
    assert torch.equal(begun.codes["image_out"][0], codes) and begun.tokens[0] != begin
    assert begun.tokens[:len(codes) + 1] == asked.tokens[1:len(codes) + 2] and end in begun.tokens
    both = generate(model, torch.cat([prompt, torch.tensor([[begin]])], 1), output_modality="image_out",
                    max_new_tokens=1)
    assert torch.equal(both.codes["image_out"][0], codes) and both.tokens.count(begin) == 0
