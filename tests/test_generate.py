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
