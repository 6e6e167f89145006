"""Tensor-parallel plans, kept here (not on the components) and looked up by component class.

A plan says how :func:`mimo_spec.parallel.tp.apply_tp` shards one module's children over the TP ranks::

    register_tp_plan(Attention, TPPlan(
        styles={"qkv": "colwise", "out": "rowwise"},     # child -> style (tp.STYLES)
        divides=("num_heads", "num_kv_heads"),            # sizes that must divide by tp (layout checks)
        fused=lambda m: {"qkv": [q_rows, k_rows, v_rows]},  # fused projections, sharded part by part
        sharded=("q_bias", "v_bias")))                     # own parameters sharded by rows (with the heads)

The ``fused`` parts also tell LoRA / DoRA adapters (:mod:`mimo_spec.peft`) where a fused projection's
parts are: each part gets its own adapter, as on a model with separate projections.

A plugin registers plans for its own classes the same way (:func:`register_tp_plan`); a class without
a plan of its own takes its nearest registered base class's (:func:`tp_plan_for`). The components do
not know about tensor parallelism: each rank's modules read their head counts from the shapes of
the sharded projections, so nothing is changed on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch.nn as nn


@dataclass(frozen=True)
class TPPlan:
    """``styles``: child name -> TP style; ``divides``: the module's attributes that must divide by tp;
    ``fused``: module -> {child: [rows of each part]} for projections that concatenate several outputs;
    ``sharded``: the module's own parameters (not a child's) split by rows, rank r holding chunk r (None
    ones are skipped); the module reads its share with ``to_local()``. ``partial``: children whose parameters
    stay whole on every TP rank but see only that rank's heads (Qwen3's per-head q/k RMSNorms): their gradients
    are summed over the TP ranks (``ParallelContext.sync_grads``)."""

    styles: Mapping[str, str]
    divides: tuple[str, ...] = ()
    fused: Callable[[nn.Module], dict[str, list[int]]] | None = field(default=None, compare=False)
    sharded: tuple[str, ...] = ()
    partial: tuple[str, ...] = ()


# how a child is sharded: colwise / rowwise linear, vocabulary-sharded embedding, a column-sharded linear
# whose output is gathered, and the LM head (vocabulary-sharded logits, or gathered without loss_parallel)
STYLES = ("colwise", "rowwise", "embedding", "colwise_gather", "vocab_head")
_PLANS: dict[type, TPPlan] = {}
_BUILTINS_LOADED = False


def register_tp_plan(cls: type, plan: TPPlan | Mapping[str, str]) -> None:
    """Give ``cls`` (and its subclasses without a plan of their own) a TP plan; a mapping is the styles alone."""
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"a TP plan is registered for an nn.Module class, got {cls!r}")
    if not isinstance(plan, TPPlan):
        plan = TPPlan(dict(plan))
    bad = [s for s in plan.styles.values() if s not in STYLES]
    if bad:
        raise ValueError(f"unknown TP style {bad[0]!r} in the plan of {cls.__name__}; expected one of {', '.join(STYLES)}")
    _PLANS[cls] = plan


def tp_plan_for(module: nn.Module) -> TPPlan | None:
    """The plan of ``module``'s class, or of its nearest base class that has one; None without."""
    _load_builtins()
    for klass in type(module).__mro__:
        plan = _PLANS.get(klass)
        if plan is not None:
            return plan
    return None


def tp_divisibility(module: nn.Module):
    """(module path, attribute, value) of every size a TP plan in ``module`` needs divisible by tp.

    Deduplicated by (attribute, value): a size several modules split (the model's ``num_kv_heads``
    and every attention layer's) is reported once, at its outermost holder.
    """
    seen = set()
    for name, sub in module.named_modules():
        plan = tp_plan_for(sub)
        for attr in plan.divides if plan is not None else ():
            key = (attr, getattr(sub, attr))
            if key not in seen:
                seen.add(key)
                yield name or type(sub).__name__, attr, getattr(sub, attr)


def _attention_parts(m) -> dict[str, list[int]]:
    d = m.head_dim
    return {"qkv": [m.num_heads * d, m.num_kv_heads * d, m.num_kv_heads * d]}


def _mlp_parts(m) -> dict[str, list[int]]:
    return {"fc1": [m.ffn_hidden_size] * 2} if m.gated else {}


def _load_builtins() -> None:
    """The shipped components' plans (registered on first use, so importing this module stays cheap)."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    from mimo_spec.components.language.gpt import GPT
    from mimo_spec.components.layers import MLP, Attention

    # heads split over the TP ranks; the fused projection shards q, k and v each, not their concatenation;
    # q and v biases apart from it (qkv_bias "qv") and per-head q/k norm weights (Chameleon) go with their heads
    _PLANS.setdefault(Attention, TPPlan({"qkv": "colwise", "out": "rowwise"}, ("num_heads", "num_kv_heads"),
                                        _attention_parts, sharded=("q_bias", "v_bias", "q_norm_weight", "q_norm_bias",
                                                                   "k_norm_weight", "k_norm_bias"),
                                        partial=("q_norm", "k_norm")))
    _PLANS.setdefault(MLP, TPPlan({"fc1": "colwise", "fc2": "rowwise"}, ("ffn_hidden_size",), _mlp_parts))
    # vocabulary-sharded embedding and head (the logits stay sharded for the loss; a tied head multiplies
    # by the sharded embedding weight); the KV cache holds this rank's kv heads only
    _PLANS.setdefault(GPT, TPPlan({"token_embedding": "embedding", "lm_head": "vocab_head"},
                                  ("num_kv_heads", "vocab_size")))
