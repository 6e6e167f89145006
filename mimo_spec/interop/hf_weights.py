"""Hugging Face <-> mimo_spec weight conversion, and constructor kwargs from HF configs.

Every conversion is one table: ``our key -> [(HF key, rows), ...]``. A single
entry is a rename; several are concatenated along dim 0 on import (fused QKV,
fused gate/up) and split by ``rows`` on export. An HF key of ``None`` is a part
HF does not store (Whisper's key bias, with ``key_bias: true``): zeros on import, dropped on export.

``*_from_hf(hf_state_dict, params)`` take our constructor kwargs ``params`` (as
returned by ``*_params_from_hf`` and possibly edited), find the component's
prefix in the HF state dict on their own (LLaVA-style checkpoints hold several
components; pass ``prefix=`` when that is ambiguous), ignore HF keys they do not
need, and raise KeyError naming any HF key that is missing. ``*_to_hf`` go back.

``*_import_plan(hf_keys, params)`` give the same conversion as data, from key
names alone (``Plan``: our key -> HF parts), so a checkpoint can be checked
against the model and streamed shard by shard (``mimo_spec.interop.hf_safetensors``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch

from mimo_spec.components.vision.clip_vit import resolve_feature_layer

Table = dict[str, list[tuple[str | None, int | None]]]

# HF activation names -> ours.
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu", "relu": "relu"}


def main_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    """The floating dtype holding most of the numbers (float32 if none): a checkpoint's or a model's."""
    totals: dict[torch.dtype, int] = {}
    for t in tensors:
        if t.is_floating_point():
            totals[t.dtype] = totals.get(t.dtype, 0) + t.numel()
    return max(totals, key=totals.get) if totals else torch.float32


def _activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"Hugging Face activation {name!r} is not supported: use one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# ------------------------------------------------------------------- engine


def _find_prefix(sd: Mapping[str, Any] | Iterable[str], anchor: str, prefix: str | None) -> str:
    if prefix is not None:
        return prefix
    found = sorted({k[: -len(anchor)] for k in sd if k == anchor or k.endswith("." + anchor)})
    if len(found) != 1:
        raise KeyError(f"cannot locate the component: keys ending in {anchor!r} have prefixes {found}; pass prefix=")
    return found[0]


# One part of one of our tensors: (full HF key, or None for a zero part HF does not store; rows; transposed).
Part = tuple[str | None, int | None, bool]
# our key -> its parts, in order (several are concatenated along dim 0)
Plan = dict[str, list[Part]]


def _plan(table: Table, prefix: str, transposed: tuple[str, ...] | frozenset[str] = ()) -> Plan:
    """``transposed``: HF key endings stored transposed, or (a frozenset) the full HF keys that are."""
    def flip(h: str) -> bool:
        return (prefix + h) in transposed if isinstance(transposed, frozenset) else h.endswith(transposed)

    return {ours: [(None if h is None else prefix + h, rows, h is not None and flip(h))
                   for h, rows in parts] for ours, parts in table.items()}


def materialize(parts: list[Part], get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """One of our tensors from its HF parts; ``get(hf_key)`` returns an HF tensor (meta tensors work too,
    which is how shapes are checked before any data is read)."""
    loaded = [None if key is None else (get(key).transpose(-2, -1) if transpose else get(key))
              for key, _, transpose in parts]
    ref = next(t for t in loaded if t is not None)
    tensors = [ref.new_zeros((rows, *ref.shape[1:])) if t is None else t
               for t, (_, rows, _) in zip(loaded, parts)]
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)


def _import(sd: Mapping[str, torch.Tensor], plan: Plan) -> dict[str, torch.Tensor]:
    for ours, parts in plan.items():
        for key, _, _ in parts:
            if key is not None and key not in sd:
                raise KeyError(f"Hugging Face state dict has no {key!r} (needed for {ours!r})")
    return {ours: materialize(parts, sd.__getitem__) for ours, parts in plan.items()}


def _export(sd: Mapping[str, torch.Tensor], table: Table, prefix: str, transposed: tuple[str, ...] = ()):
    out: dict[str, torch.Tensor] = {}
    for ours, parts in table.items():
        t = sd[ours]
        if len(parts) > 1 and t.dim() == 3:  # stacked experts written one by one: (E, R, C) -> (E * R, C)
            t = t.reshape(-1, t.shape[-1])
        pieces = [t] if len(parts) == 1 else t.split([rows for _, rows in parts], dim=0)
        for (hf_key, _), piece in zip(parts, pieces):
            if hf_key is not None:
                out[prefix + hf_key] = (piece.transpose(-2, -1) if hf_key.endswith(transposed) else piece).contiguous()
    return out


def _one(key: str) -> list[tuple[str | None, int | None]]:
    return [(key, None)]


def _add_layer_tables(table: Table, layer_table: Table, num_layers: int, ours: str, hf: str) -> None:
    for i in range(num_layers):
        for k, parts in layer_table.items():
            table[f"{ours}{i}.{k}"] = [(None if h is None else f"{hf}{i}.{h}", r) for h, r in parts]


# ---------------------------------------------------------------------- GPT


# Qwen2-VL / Qwen2.5-VL: a Qwen2 text model with M-RoPE (``rope_parameters["mrope_section"]``).
_QWEN2_VL = {"qwen2_vl": "qwen2_vl_text", "qwen2_5_vl": "qwen2_5_vl_text", "qwen3_vl": "qwen3_vl_text",
             "qwen3_vl_moe": "qwen3_vl_moe_text"}
_QWEN3 = ("qwen3", "qwen3_vl_text", "qwen3_moe", "qwen3_vl_moe_text")  # q_norm / k_norm on each head, no q/k/v bias
# Mixture-of-experts language models (the keys of their routed layers: see ``_moe_layer_table``)
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "qwen3_vl_moe_text", "olmoe")


def _moe_params_from_hf(config: Any) -> dict[str, Any]:
    """The MoE kwargs of GPT for a Mixtral / Qwen2-MoE / Qwen3-MoE / Qwen3-VL-MoE text config; ValueError
    naming what we do not model."""
    mt = config.model_type
    jitter = float(getattr(config, "router_jitter_noise", 0.0) or 0.0)
    if jitter:
        raise ValueError(f"router_jitter_noise {jitter}: multiplicative noise on the router input in training "
                         "is not modelled (set it to 0)")
    if mt == "olmoe" and getattr(config, "clip_qkv", None) is not None:
        raise ValueError(f"clip_qkv {config.clip_qkv}: clamping the queries, keys and values is not modelled "
                         "(OLMoE-1B-7B's releases have none)")
    experts = int(config.num_local_experts if mt == "mixtral" else config.num_experts)
    if experts <= 0:  # Qwen2-MoE with num_experts 0: every layer dense
        return {}
    aux = float(config.router_aux_loss_coef) if getattr(config, "output_router_logits", False) else 0.0
    out: dict[str, Any] = dict(num_experts=experts, num_experts_per_tok=int(config.num_experts_per_tok),
                               router_scoring="softmax", router_aux_loss_weight=aux)
    if mt == "mixtral":
        return {**out, "moe_ffn_hidden_size": int(config.intermediate_size), "norm_topk_prob": True}
    if mt == "olmoe":  # every layer routed; its experts' width is intermediate_size
        return {**out, "moe_ffn_hidden_size": int(config.intermediate_size),
                "norm_topk_prob": bool(config.norm_topk_prob)}
    only = sorted(int(i) for i in (getattr(config, "mlp_only_layers", None) or []))
    out.update(moe_ffn_hidden_size=int(config.moe_intermediate_size),
               decoder_sparse_step=int(getattr(config, "decoder_sparse_step", 1) or 1),
               mlp_only_layers=only or None,
               # Qwen3-VL-MoE's router always renormalises its top-k (no norm_topk_prob in its config)
               norm_topk_prob=True if mt == "qwen3_vl_moe_text" else bool(config.norm_topk_prob))
    if mt == "qwen2_moe":  # a shared expert beside the routed ones, scaled by sigmoid(shared_expert_gate(x))
        out.update(shared_expert_ffn_hidden_size=int(config.shared_expert_intermediate_size), shared_expert_gate=True)
    return out


def gpt_params_from_hf(config: Any) -> dict[str, Any]:
    """GPT kwargs from a LlamaConfig / MistralConfig / Qwen2Config / Qwen3Config / GPT2Config, a Mixtral /
    Qwen2-MoE / Qwen3-MoE / OLMoE config (the MoE kwargs included), or the text model of a Qwen2-VL / Qwen2.5-VL /
    Qwen3-VL / Qwen3-VL-MoE config (its text config, or the whole VLM config: then its text_config with the
    VLM's tie_word_embeddings), M-RoPE's ``mrope_section`` included."""
    tie = getattr(config, "tie_word_embeddings", None)
    if config.model_type in _QWEN2_VL:
        config = config.text_config
    mt = config.model_type
    if tie is None:
        tie = getattr(config, "tie_word_embeddings", False)  # v5 text configs leave it to the VLM
    if mt == "gpt2":
        return dict(vocab_size=config.vocab_size, hidden_size=config.n_embd, num_layers=config.n_layer,
                    num_heads=config.n_head, ffn_hidden_size=config.n_inner or 4 * config.n_embd,
                    norm="layernorm", norm_eps=config.layer_norm_epsilon, position_embedding="learned",
                    max_seq_len=config.n_positions, mlp="gelu", activation=_activation(config.activation_function),
                    attention_bias=True, mlp_bias=True, tie_embeddings=True)
    qwen3 = mt in _QWEN3
    qwen2 = mt in ("qwen2", "qwen2_moe", *_QWEN2_VL.values()) and not qwen3
    if mt not in ("llama", "mistral", "mixtral", "olmoe") and not qwen2 and not qwen3:
        raise ValueError(f"model_type {mt!r} is not supported: use llama, mistral, mixtral, olmoe, qwen2, qwen2_moe, "
                         "qwen3, qwen3_moe, qwen2_vl(_text), qwen2_5_vl(_text), qwen3_vl(_text), qwen3_vl_moe(_text) "
                         "or gpt2")
    moe = _moe_params_from_hf(config) if mt in MOE_TYPES else {}
    if mt == "qwen2_moe" and not getattr(config, "qkv_bias", True):
        qwen2 = False  # Qwen2-MoE's q/k/v bias is a config option
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    section = rope.get("mrope_section")
    if rope_type == "mrope" and section is not None:  # Qwen2-VL's config before transformers 5
        rope_type = "default"
    scaling = None
    if rope_type in ("llama3", "linear"):
        keys = ("factor",) if rope_type == "linear" else ("factor", "low_freq_factor", "high_freq_factor",
                                                          "original_max_position_embeddings")
        scaling = {"rope_type": rope_type, **{k: int(rope[k]) if k.startswith("original") else float(rope[k])
                                              for k in keys}}
    elif rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported (plain RoPE, M-RoPE, llama3 and linear scaling)")
    mrope = {} if section is None else {"mrope_section": [int(v) for v in section],
                                        "mrope_interleaved": bool(rope.get("mrope_interleaved", False))}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    bias = bool(getattr(config, "attention_bias", False))
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        ffn_hidden_size=config.intermediate_size, norm="rmsnorm", norm_eps=config.rms_norm_eps,
        position_embedding="rope", rope_theta=float(theta), max_seq_len=config.max_position_embeddings,
        mlp="swiglu", activation=_activation(config.hidden_act),
        # Qwen2: bias on q/k/v only.
        attention_bias=True if qwen2 else bias, attention_out_bias=False if qwen2 else bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)), tie_embeddings=bool(tie),
        head_dim=None if head_dim * config.num_attention_heads == config.hidden_size else head_dim,
        **mrope, **({"qk_norm": True} if qwen3 else {}), **({"rope_scaling": scaling} if scaling else {}), **moe,
        # OLMoE: one RMSNorm over all heads' queries and one over all keys
        **({"qk_norm": True, "qk_norm_kind": "rmsnorm_all_heads"} if mt == "olmoe" else {}),
    )


def _gpt_sizes(p: Mapping[str, Any]) -> tuple[int, int, int, bool, bool, bool]:
    heads = p["num_heads"]
    kv = p.get("num_kv_heads") or heads
    hd = p.get("head_dim") or p["hidden_size"] // heads
    ffn = p.get("ffn_hidden_size") or 4 * p["hidden_size"]
    qkv_bias = p.get("attention_bias", False)
    out_bias = qkv_bias if p.get("attention_out_bias") is None else p["attention_out_bias"]
    return heads * hd, kv * hd, ffn, qkv_bias, out_bias, p.get("mlp_bias", False)


def is_moe_layer(p: Mapping[str, Any], i: int) -> bool:
    """Whether GPT layer ``i`` of params ``p`` is a mixture of experts (Qwen's decoder_sparse_step /
    mlp_only_layers rule)."""
    return bool(p.get("num_experts")) and i not in (p.get("mlp_only_layers") or []) \
        and (i + 1) % (p.get("decoder_sparse_step") or 1) == 0


# How a checkpoint stores the routed experts of one layer (HF key prefixes are relative to the layer):
#   "fused":     mlp.gate.weight, mlp.experts.gate_up_proj (E, 2F, H), mlp.experts.down_proj (E, H, F)
#                (transformers 5's modules, as an in-memory model holds them)
#   "fused_t":   the same keys, the experts stored transposed: (E, H, 2F) and (E, F, H) (Qwen3-VL-MoE releases)
#   "qwen":      mlp.gate.weight, mlp.experts.{j}.{gate,up,down}_proj.weight (Qwen2-MoE / Qwen3-MoE releases)
#   "mixtral":   block_sparse_moe.gate.weight, block_sparse_moe.experts.{j}.{w1,w3,w2}.weight (Mixtral releases)
MOE_LAYOUTS = ("fused", "fused_t", "qwen", "mixtral")
# the HF key endings stored transposed in the fused_t layout
FUSED_T = ("experts.gate_up_proj", "experts.down_proj")


def moe_layout_of(hf_keys: Iterable[str], transposed: bool = False) -> str:
    """The MoE layout of a checkpoint, from its key names (``transposed``: fused experts are stored
    (E, H, 2F), as Qwen3-VL-MoE releases are)."""
    for k in hf_keys:
        if ".block_sparse_moe." in k:
            return "mixtral"
        if k.endswith("mlp.experts.gate_up_proj"):
            return "fused_t" if transposed else "fused"
        if ".mlp.experts.0.gate_proj." in k:
            return "qwen"
    return "fused_t" if transposed else "fused"


def fused_expert_shapes(p: Mapping[str, Any]) -> dict[str, tuple[int, int, int]]:
    """The fused expert tensors' shapes as transformers 5 holds them: {key ending: (E, 2F, H) / (E, H, F)}."""
    h, e = p["hidden_size"], p["num_experts"]
    f = p.get("moe_ffn_hidden_size") or p.get("ffn_hidden_size") or 4 * h
    return {"experts.gate_up_proj": (e, 2 * f, h), "experts.down_proj": (e, h, f)}


def transposed_experts(shapes: Mapping[str, tuple[int, ...]], p: Mapping[str, Any]) -> tuple[frozenset[str], list[str]]:
    """Which fused expert tensors of a checkpoint (``shapes``: HF key -> shape) are stored transposed, read as
    transformers 5 reads them (Qwen3-VL-MoE's ``Transpose(check_dims=True)``): a tensor whose shape is not the
    in-memory one is transposed. Qwen's releases store (E, H, 2F) / (E, F, H); transformers' own
    ``save_pretrained`` writes the in-memory shapes. Returns (those keys, the keys whose shape cannot tell:
    square, so read as stored, as transformers does)."""
    want = fused_expert_shapes(p)
    flipped, square = set(), []
    for key, shape in shapes.items():
        for end, w in want.items():
            if key.endswith(end):
                if tuple(shape) != w:
                    flipped.add(key)
                elif w[1] == w[2]:
                    square.append(key)
    return frozenset(flipped), square


def _moe_layer_table(p: Mapping[str, Any], layout: str) -> Table:
    """Our keys under ``layers.{i}.`` -> HF's for a routed layer."""
    h, e = p["hidden_size"], p["num_experts"]
    f = p.get("moe_ffn_hidden_size") or p.get("ffn_hidden_size") or 4 * h
    if layout not in MOE_LAYOUTS:
        raise ValueError(f"unknown MoE layout {layout!r}: use one of {', '.join(MOE_LAYOUTS)}")
    if layout == "mixtral":
        pre = "block_sparse_moe."
        layer: Table = {"mlp.router.weight": _one(pre + "gate.weight"),
                        "mlp.experts.gate_up": [(f"{pre}experts.{j}.{w}.weight", f) for j in range(e)
                                                for w in ("w1", "w3")],
                        "mlp.experts.down": [(f"{pre}experts.{j}.w2.weight", h) for j in range(e)]}
    elif layout == "qwen":
        layer = {"mlp.router.weight": _one("mlp.gate.weight"),
                 "mlp.experts.gate_up": [(f"mlp.experts.{j}.{w}_proj.weight", f) for j in range(e)
                                         for w in ("gate", "up")],
                 "mlp.experts.down": [(f"mlp.experts.{j}.down_proj.weight", h) for j in range(e)]}
    else:
        layer = {"mlp.router.weight": _one("mlp.gate.weight"), "mlp.experts.gate_up": _one("mlp.experts.gate_up_proj"),
                 "mlp.experts.down": _one("mlp.experts.down_proj")}
    fs = p.get("shared_expert_ffn_hidden_size")
    if fs:
        layer["mlp.shared.fc1.weight"] = [("mlp.shared_expert.gate_proj.weight", fs),
                                          ("mlp.shared_expert.up_proj.weight", fs)]
        layer["mlp.shared.fc2.weight"] = _one("mlp.shared_expert.down_proj.weight")
    if p.get("shared_expert_gate"):
        layer["mlp.shared_gate.weight"] = _one("mlp.shared_expert_gate.weight")
    return layer


def _llama_table(p: Mapping[str, Any], moe_layout: str = "fused") -> Table:
    q, kv, ffn, qkv_bias, out_bias, mlp_bias = _gpt_sizes(p)
    layer: Table = {
        "attn_norm.weight": _one("input_layernorm.weight"),
        "attn.qkv.weight": [("self_attn.q_proj.weight", q), ("self_attn.k_proj.weight", kv),
                            ("self_attn.v_proj.weight", kv)],
        "attn.out.weight": _one("self_attn.o_proj.weight"),
        "mlp_norm.weight": _one("post_attention_layernorm.weight"),
    }
    dense: Table = {"mlp.fc1.weight": [("mlp.gate_proj.weight", ffn), ("mlp.up_proj.weight", ffn)],
                    "mlp.fc2.weight": _one("mlp.down_proj.weight")}
    if qkv_bias:
        layer["attn.qkv.bias"] = [("self_attn.q_proj.bias", q), ("self_attn.k_proj.bias", kv),
                                  ("self_attn.v_proj.bias", kv)]
    if out_bias:
        layer["attn.out.bias"] = _one("self_attn.o_proj.bias")
    if mlp_bias:
        dense["mlp.fc1.bias"] = [("mlp.gate_proj.bias", ffn), ("mlp.up_proj.bias", ffn)]
        dense["mlp.fc2.bias"] = _one("mlp.down_proj.bias")
    if p.get("qk_norm") and p.get("qk_norm_kind", "rmsnorm") == "layernorm_per_head":  # Chameleon: (heads, D)
        for t in ("q", "k"):
            layer[f"attn.{t}_norm_weight"] = _one(f"self_attn.{t}_norm.weight")
            layer[f"attn.{t}_norm_bias"] = _one(f"self_attn.{t}_norm.bias")
    elif p.get("qk_norm"):
        layer["attn.q_norm.weight"] = _one("self_attn.q_norm.weight")
        layer["attn.k_norm.weight"] = _one("self_attn.k_norm.weight")
    table: Table = {"token_embedding.weight": _one("embed_tokens.weight"), "norm.weight": _one("norm.weight")}
    routed = _moe_layer_table(p, moe_layout) if p.get("num_experts") else {}
    for i in range(p["num_layers"]):
        for k, parts in {**layer, **(routed if is_moe_layer(p, i) else dense)}.items():
            table[f"layers.{i}.{k}"] = [(None if h is None else f"layers.{i}.{h}", r) for h, r in parts]
    return table


# GPT-2 stores its linears as Conv1D, i.e. transposed (in, out).
_GPT2_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _gpt2_table(p: Mapping[str, Any]) -> Table:
    layer: Table = {}
    for ours, hf in (("attn_norm", "ln_1"), ("attn.qkv", "attn.c_attn"), ("attn.out", "attn.c_proj"),
                     ("mlp_norm", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
        for leaf in ("weight", "bias"):
            layer[f"{ours}.{leaf}"] = _one(f"{hf}.{leaf}")
    table: Table = {"token_embedding.weight": _one("wte.weight"), "position_embedding.weight": _one("wpe.weight"),
                    "norm.weight": _one("ln_f.weight"), "norm.bias": _one("ln_f.bias")}
    _add_layer_tables(table, layer, p["num_layers"], "layers.", "h.")
    return table


def gpt_import_plan(hf_keys: Iterable[str], params: Mapping[str, Any], prefix: str | None = None,
                    moe_layout: str | None = None, transposed: frozenset[str] | None = None) -> Plan:
    """Which HF tensors make each GPT tensor (see ``gpt_state_dict_from_hf``). ``moe_layout`` (see
    ``MOE_LAYOUTS``): how the experts are stored; None: found from the key names (fused experts taken as
    transformers 5 holds them, (E, 2F, H)). ``transposed``: the full HF keys of fused expert tensors stored
    transposed, tensor by tensor (see ``transposed_experts``); it overrides what the layout says."""
    keys = list(hf_keys)
    if params.get("position_embedding") == "learned":
        plan = _plan(_gpt2_table(params), _find_prefix(keys, "wte.weight", prefix), _GPT2_TRANSPOSED)
    else:
        layout = moe_layout or moe_layout_of(keys)
        plan = _plan(_llama_table(params, layout), _find_prefix(keys, "embed_tokens.weight", prefix),
                     transposed if transposed is not None else FUSED_T if layout == "fused_t" else ())
    if not params.get("tie_embeddings", False):
        heads = [k for k in keys if k == "lm_head.weight" or k.endswith(".lm_head.weight")]
        if len(heads) > 1:
            raise KeyError(f"expected one lm_head.weight for untied embeddings, found {heads}")
        plan["lm_head.weight"] = [(heads[0] if heads else "lm_head.weight", None, False)]
    return plan


def gpt_state_dict_from_hf(hf_sd: Mapping[str, torch.Tensor], params: Mapping[str, Any],
                           prefix: str | None = None) -> dict[str, torch.Tensor]:
    """A Llama/Mistral/Qwen2/Qwen3/Mixtral/Qwen-MoE (or, for learned positions, GPT-2) causal-LM state dict
    -> GPT's."""
    return _import(hf_sd, gpt_import_plan(hf_sd.keys(), params, prefix))


def gpt_state_dict_to_hf(sd: Mapping[str, torch.Tensor], params: Mapping[str, Any],
                         moe_layout: str = "fused") -> dict[str, torch.Tensor]:
    """GPT's state dict -> a LlamaForCausalLM-style one (GPT2LMHeadModel for learned positions); routed
    experts in ``moe_layout`` (see ``MOE_LAYOUTS``).

    ``lm_head.weight`` is always written (the tied embedding when tied), as HF's
    ``state_dict()`` lists it either way.
    """
    if params.get("position_embedding") == "learned":
        out = _export(sd, _gpt2_table(params), "transformer.", _GPT2_TRANSPOSED)
    else:
        out = _export(sd, _llama_table(params, moe_layout), "model.", FUSED_T if moe_layout == "fused_t" else ())
    out["lm_head.weight"] = sd["token_embedding.weight" if params.get("tie_embeddings", False) else "lm_head.weight"]
    return out


# ------------------------------------------------------------------ ClipViT


def clip_vit_params_from_hf(config: Any, feature_layer: int = -1, feature_select: str = "patch",
                            keep_unused_layers: bool = False) -> dict[str, Any]:
    """ClipViT kwargs from a CLIPVisionConfig / SiglipVisionConfig (or their CLIPConfig / SiglipConfig).

    SigLIP gets ``post_norm=True`` (its ``last_hidden_state``); a VLM reading
    ``hidden_states[k]`` (LLaVA) must set it False, as HF applies no post-norm there.
    """
    config = getattr(config, "vision_config", None) or config
    if config.model_type == "internvl_vision":
        return internvit_params_from_hf(config, feature_layer, feature_select, keep_unused_layers)
    siglip = config.model_type.startswith("siglip")
    if not siglip and not config.model_type.startswith("clip"):
        raise ValueError(f"model_type {config.model_type!r} is not supported: use a CLIP or SigLIP vision config")
    return dict(
        image_size=config.image_size, patch_size=config.patch_size, hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
        ffn_hidden_size=config.intermediate_size, num_channels=config.num_channels,
        activation=_activation(config.hidden_act), layer_norm_eps=config.layer_norm_eps,
        class_token=not siglip, pre_norm=not siglip, post_norm=siglip, patch_bias=siglip,
        feature_layer=feature_layer, feature_select=feature_select, keep_unused_layers=keep_unused_layers,
    )


def _vit_table(p: Mapping[str, Any]) -> Table:
    h = p["hidden_size"]
    layer: Table = {}
    for leaf in ("weight", "bias"):
        layer[f"attn_norm.{leaf}"] = _one(f"layer_norm1.{leaf}")
        if leaf == "weight" or p.get("qkv_bias", True):  # Janus's attention_bias: false has no q/k/v biases
            layer[f"attn.qkv.{leaf}"] = [(f"self_attn.{x}_proj.{leaf}", h) for x in "qkv"]
        layer[f"attn.out.{leaf}"] = _one(f"self_attn.out_proj.{leaf}")
        layer[f"mlp_norm.{leaf}"] = _one(f"layer_norm2.{leaf}")
        layer[f"mlp.fc1.{leaf}"] = _one(f"mlp.fc1.{leaf}")
        layer[f"mlp.fc2.{leaf}"] = _one(f"mlp.fc2.{leaf}")
    table: Table = {"patch_embed.weight": _one("embeddings.patch_embedding.weight"),
                    "pos_embed": _one("embeddings.position_embedding.weight")}
    if p.get("patch_bias", False):
        table["patch_embed.bias"] = _one("embeddings.patch_embedding.bias")
    if p.get("class_token", True):
        table["class_embedding"] = _one("embeddings.class_embedding")
    keep = p.get("keep_unused_layers", False)
    for leaf in ("weight", "bias"):
        if p.get("pre_norm", True):
            table[f"pre_norm.{leaf}"] = _one(f"pre_layrnorm.{leaf}")
        if p.get("post_norm", False) or keep:
            table[f"post_norm.{leaf}"] = _one(f"post_layernorm.{leaf}")
    # Unless kept, only the blocks up to the feature layer exist in ours; later HF blocks are skipped.
    blocks = p["num_layers"] if keep else resolve_feature_layer(p.get("feature_layer", -1), p["num_layers"])
    _add_layer_tables(table, layer, blocks, "layers.", "encoder.layers.")
    return table


def internvit_params_from_hf(config: Any, feature_layer: int = -1, feature_select: str = "patch",
                             keep_unused_layers: bool = False) -> dict[str, Any]:
    """ClipViT kwargs from an InternVLVisionConfig (InternViT-300M / 6B as transformers' InternVL holds it):
    class token, no pre-norm, a biased patch conv, LayerScale, ``norm_type``, ``use_qk_norm``,
    ``attention_bias``. ``post_norm`` is HF's final ``layernorm`` (present when ``use_mean_pooling`` is
    false), which HF applies to ``last_hidden_state`` only: set it False when reading another layer."""
    if getattr(config, "use_mask_token", False):
        raise ValueError("use_mask_token (masked image modelling) is not supported")
    if not getattr(config, "use_absolute_position_embeddings", True):
        raise ValueError("use_absolute_position_embeddings false (no position table) is not supported")
    norms = {"layer_norm": "layernorm", "rms_norm": "rmsnorm"}
    if config.norm_type not in norms:
        raise ValueError(f"norm_type {config.norm_type!r} is not supported: use layer_norm or rms_norm")
    if config.use_qk_norm and config.layer_norm_eps != 1e-6:  # HF's q/k norm eps is always 1e-6
        raise ValueError(f"use_qk_norm with layer_norm_eps {config.layer_norm_eps}: the q/k norms' epsilon "
                         "(1e-6 in transformers) would differ from ours (layer_norm_eps)")
    size, patch = (v if isinstance(v, int) else v[0] for v in (config.image_size, config.patch_size))
    if any(not isinstance(v, int) and v[0] != v[1] for v in (config.image_size, config.patch_size)):
        raise ValueError(f"image_size {config.image_size} / patch_size {config.patch_size}: only square ones "
                         "are supported")
    return dict(
        image_size=size, patch_size=patch, hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads, ffn_hidden_size=config.intermediate_size,
        num_channels=config.num_channels, activation=_activation(config.hidden_act),
        layer_norm_eps=config.layer_norm_eps, class_token=True, pre_norm=False,
        post_norm=not config.use_mean_pooling, patch_bias=True, feature_layer=feature_layer,
        feature_select=feature_select, keep_unused_layers=keep_unused_layers,
        layer_scale=float(config.layer_scale_init_value), norm=norms[config.norm_type], mlp="gelu",
        qk_norm=bool(config.use_qk_norm), qkv_bias=bool(config.attention_bias), register_tokens=0,
    )


def _internvit_table(p: Mapping[str, Any]) -> Table:
    """InternVLVisionModel's keys (transformers' InternVL). HF stores the class token as (1, 1, H) and the
    positions as (1, P, H): same numbers, ours without the leading 1s (see hf_safetensors' loading)."""
    h = p["hidden_size"]
    layer: Table = {"attn_scale": _one("lambda_1"), "mlp_scale": _one("lambda_2"),
                    "attn.qkv.weight": [(f"attention.{x}_proj.weight", h) for x in "qkv"]}
    for leaf in ("weight", "bias") if p.get("norm", "layernorm") == "layernorm" else ("weight",):
        layer[f"attn_norm.{leaf}"] = _one(f"layernorm_before.{leaf}")
        layer[f"mlp_norm.{leaf}"] = _one(f"layernorm_after.{leaf}")
    if p.get("qkv_bias", True):
        layer["attn.qkv.bias"] = [(f"attention.{x}_proj.bias", h) for x in "qkv"]
    for leaf in ("weight", "bias"):
        layer[f"attn.out.{leaf}"] = _one(f"attention.projection_layer.{leaf}")
        layer[f"mlp.fc1.{leaf}"] = _one(f"mlp.fc1.{leaf}")
        layer[f"mlp.fc2.{leaf}"] = _one(f"mlp.fc2.{leaf}")
    if p.get("qk_norm", False):
        layer["attn.q_norm.weight"] = _one("attention.q_norm.weight")
        layer["attn.k_norm.weight"] = _one("attention.k_norm.weight")
    table: Table = {"patch_embed.weight": _one("embeddings.patch_embeddings.projection.weight"),
                    "patch_embed.bias": _one("embeddings.patch_embeddings.projection.bias"),
                    "class_embedding": _one("embeddings.cls_token"),
                    "pos_embed": _one("embeddings.position_embeddings")}
    keep = p.get("keep_unused_layers", False)
    if p.get("post_norm", False) or keep:
        for leaf in ("weight", "bias"):
            table[f"post_norm.{leaf}"] = _one(f"layernorm.{leaf}")
    blocks = p["num_layers"] if keep else resolve_feature_layer(p.get("feature_layer", -1), p["num_layers"])
    _add_layer_tables(table, layer, blocks, "layers.", "encoder.layer.")
    return table


def _is_internvit(p: Mapping[str, Any]) -> bool:
    """ClipViT params in InternViT's Hugging Face layout (LayerScale exists only there)."""
    return p.get("layer_scale") is not None


def clip_vit_import_plan(hf_keys: Iterable[str], params: Mapping[str, Any], prefix: str | None = None) -> Plan:
    """Which HF tensors make each ClipViT tensor (see ``clip_vit_state_dict_from_hf``)."""
    if _is_internvit(params):
        return _plan(_internvit_table(params),
                     _find_prefix(hf_keys, "embeddings.patch_embeddings.projection.weight", prefix))
    return _plan(_vit_table(params), _find_prefix(hf_keys, "embeddings.patch_embedding.weight", prefix))


def clip_vit_state_dict_from_hf(hf_sd: Mapping[str, torch.Tensor], params: Mapping[str, Any],
                                prefix: str | None = None) -> dict[str, torch.Tensor]:
    """CLIPVisionModel / SiglipVisionModel (or a VLM holding one) -> ClipViT's state dict.

    Unless ``keep_unused_layers``, blocks past the feature layer and CLIP's unused
    post_layernorm are ignored; SigLIP's pooling head always is.
    """
    return _import(hf_sd, clip_vit_import_plan(hf_sd.keys(), params, prefix))


def clip_vit_state_dict_to_hf(sd: Mapping[str, torch.Tensor], params: Mapping[str, Any],
                              prefix: str = "vision_model.") -> dict[str, torch.Tensor]:
    """ClipViT's state dict -> HF vision-model keys (only the blocks and norms ours has:
    all of them with ``keep_unused_layers``). InternViT's (``layer_scale`` set) come in its own layout,
    the class token and positions with HF's leading 1s."""
    if _is_internvit(params):
        out = _export(sd, _internvit_table(params), prefix)
        for key in ("embeddings.cls_token", "embeddings.position_embeddings"):  # (H,) / (P, H) -> (1, ., H)
            out[prefix + key] = out[prefix + key].reshape(1, -1, params["hidden_size"])
        return out
    return _export(sd, _vit_table(params), prefix)


# ----------------------------------------------------------------- Whisper


def whisper_encoder_params_from_hf(config: Any) -> dict[str, Any]:
    """WhisperEncoder kwargs from a WhisperConfig."""
    if config.model_type != "whisper":
        raise ValueError(f"model_type {config.model_type!r} is not supported: use a WhisperConfig")
    return dict(num_mel_bins=config.num_mel_bins, hidden_size=config.d_model, num_layers=config.encoder_layers,
                num_heads=config.encoder_attention_heads, ffn_hidden_size=config.encoder_ffn_dim,
                max_source_positions=config.max_source_positions,
                activation=_activation(config.activation_function), layer_norm_eps=1e-5)


def _whisper_table(p: Mapping[str, Any]) -> Table:
    h = p["hidden_size"]
    layer: Table = {"attn.qkv.weight": [(f"self_attn.{x}_proj.weight", h) for x in "qkv"]}
    if p.get("key_bias", True):
        # Whisper's k_proj has no bias: a zero part, exact (see whisper.py); dropped on export.
        layer["attn.qkv.bias"] = [("self_attn.q_proj.bias", h), (None, h), ("self_attn.v_proj.bias", h)]
    else:  # key_bias false: Hugging Face's own parameters, q and v biases apart
        layer["attn.q_bias"] = _one("self_attn.q_proj.bias")
        layer["attn.v_bias"] = _one("self_attn.v_proj.bias")
    for leaf in ("weight", "bias"):
        layer[f"attn_norm.{leaf}"] = _one(f"self_attn_layer_norm.{leaf}")
        layer[f"attn.out.{leaf}"] = _one(f"self_attn.out_proj.{leaf}")
        layer[f"mlp_norm.{leaf}"] = _one(f"final_layer_norm.{leaf}")
        layer[f"mlp.fc1.{leaf}"] = _one(f"fc1.{leaf}")
        layer[f"mlp.fc2.{leaf}"] = _one(f"fc2.{leaf}")
    table: Table = {"pos_embed": _one("embed_positions.weight")}
    for leaf in ("weight", "bias"):
        table[f"conv1.{leaf}"] = _one(f"conv1.{leaf}")
        table[f"conv2.{leaf}"] = _one(f"conv2.{leaf}")
        table[f"norm.{leaf}"] = _one(f"layer_norm.{leaf}")
    _add_layer_tables(table, layer, p["num_layers"], "layers.", "layers.")
    return table


def whisper_encoder_import_plan(hf_keys: Iterable[str], params: Mapping[str, Any],
                                prefix: str | None = None) -> Plan:
    """Which HF tensors make each WhisperEncoder tensor (see ``whisper_encoder_state_dict_from_hf``)."""
    return _plan(_whisper_table(params), _find_prefix(hf_keys, "conv1.weight", prefix))


def whisper_encoder_state_dict_from_hf(hf_sd: Mapping[str, torch.Tensor], params: Mapping[str, Any],
                                       prefix: str | None = None) -> dict[str, torch.Tensor]:
    """HF WhisperEncoder / WhisperModel / WhisperForConditionalGeneration -> WhisperEncoder's state dict."""
    return _import(hf_sd, whisper_encoder_import_plan(hf_sd.keys(), params, prefix))


def whisper_encoder_state_dict_to_hf(sd: Mapping[str, torch.Tensor], params: Mapping[str, Any],
                                     prefix: str = "") -> dict[str, torch.Tensor]:
    """WhisperEncoder's state dict -> HF WhisperEncoder keys (``prefix="model.encoder."`` for the full model)."""
    return _export(sd, _whisper_table(params), prefix)


# ------------------------------------------------------- LLaVA projector

# LLaVA's multi_modal_projector (linear_1, GELU, linear_2) is MLPProjector(num_layers=2): layers.0 / layers.2.
_LLAVA_PROJECTOR = {"layers.0": "linear_1", "layers.2": "linear_2"}


def llava_projector_import_plan(hf_keys: Iterable[str], bias: bool = True, prefix: str | None = None) -> Plan:
    """Which HF tensors make each MLPProjector tensor of a LLaVA checkpoint."""
    pre = _find_prefix(hf_keys, "multi_modal_projector.linear_1.weight", prefix) + "multi_modal_projector."
    leaves = ("weight", "bias") if bias else ("weight",)
    return {f"{ours}.{leaf}": [(f"{pre}{hf}.{leaf}", None, False)] for ours, hf in _LLAVA_PROJECTOR.items()
            for leaf in leaves}


def llava_projector_state_dict_to_hf(sd: Mapping[str, torch.Tensor],
                                     prefix: str = "multi_modal_projector.") -> dict[str, torch.Tensor]:
    """MLPProjector(num_layers=2) state dict -> LLaVA's multi_modal_projector keys."""
    out = {}
    for key, t in sd.items():
        layer, leaf = key.rsplit(".", 1)
        out[f"{prefix}{_LLAVA_PROJECTOR[layer]}.{leaf}"] = t
    return out


# ---------------------------------------------------------------- dispatch

# registry name -> (params from config, HF -> ours, ours -> HF)
CONVERTERS = {
    "gpt": (gpt_params_from_hf, gpt_state_dict_from_hf, gpt_state_dict_to_hf),
    "clip_vit": (clip_vit_params_from_hf, clip_vit_state_dict_from_hf, clip_vit_state_dict_to_hf),
    "whisper_encoder": (whisper_encoder_params_from_hf, whisper_encoder_state_dict_from_hf,
                        whisper_encoder_state_dict_to_hf),
}

# registry name -> import plan (key names only; for streaming checkpoints)
PLANS = {"gpt": gpt_import_plan, "clip_vit": clip_vit_import_plan, "whisper_encoder": whisper_encoder_import_plan}

_MODEL_TYPES = {"llama": "gpt", "mistral": "gpt", "mixtral": "gpt", "qwen2_moe": "gpt", "qwen3_moe": "gpt",
                "qwen3_vl_moe_text": "gpt", "qwen2": "gpt", "gpt2": "gpt", "qwen2_vl_text": "gpt",
                "qwen2_5_vl_text": "gpt", "qwen3": "gpt", "qwen3_vl_text": "gpt", "clip": "clip_vit",
                "clip_vision_model": "clip_vit", "siglip": "clip_vit", "siglip_vision_model": "clip_vit",
                "internvl_vision": "clip_vit", "whisper": "whisper_encoder"}


def params_from_hf(config: Any) -> tuple[str, dict[str, Any]]:
    """(registry name, constructor kwargs) for an HF config, e.g. ("gpt", {...}) for a LlamaConfig."""
    name = _MODEL_TYPES.get(config.model_type)
    if name is None:
        raise ValueError(f"model_type {config.model_type!r} is not supported: use one of {', '.join(_MODEL_TYPES)}")
    return name, CONVERTERS[name][0](config)
