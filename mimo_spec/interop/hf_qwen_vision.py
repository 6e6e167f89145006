"""Hugging Face Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision towers <-> ``qwen_vit`` + ``patch_merger``.

``vision_params_from_hf(vision_config)`` gives the constructor kwargs of our encoder and merger (the
DeepStack mergers of Qwen3-VL are the merger's kwargs with ``norm_after_merge: true``,
:func:`deepstack_merger_params`). ``vision_state_dict_from_hf`` / ``vision_state_dict_to_hf`` map the
weights both ways, with the tables of :mod:`mimo_spec.interop.hf_weights` (fused QKV is the same
layout in both; Qwen2.5-VL's gate/up projections are our fused ``fc1``); ``vision_import_plan`` gives
the import as data (key names only), ``vision_config_to_hf`` the HF vision config for an export.

HF keys under the vision prefix (``model.visual.`` in a VLM checkpoint, empty for the vision model)::

    patch_embed.proj.weight (+ .bias in Qwen3-VL)        -> encoder patch_embed.*   (same Conv3d shape)
    pos_embed.weight                                     -> encoder pos_embed       (Qwen3-VL)
    blocks.{i}.norm1 / norm2 / attn.qkv / attn.proj      -> encoder layers.{i}.attn_norm / mlp_norm / attn.qkv / attn.out
    blocks.{i}.mlp.fc1 / fc2                   (2-VL)    -> layers.{i}.mlp.fc1 / fc2
    blocks.{i}.mlp.gate_proj + up_proj, down_proj (2.5)  -> layers.{i}.mlp.fc1 (concatenated), fc2
    blocks.{i}.mlp.linear_fc1 / linear_fc2      (3-VL)   -> layers.{i}.mlp.fc1 / fc2
    merger.ln_q / mlp.0 / mlp.2                 (2, 2.5) -> merger norm / fc1 / fc2
    merger.norm / linear_fc1 / linear_fc2       (3-VL)   -> merger norm / fc1 / fc2
    deepstack_merger_list.{j}.*                 (3-VL)   -> DeepStack merger j (same names)
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch

from mimo_spec.interop.hf_weights import (Plan, Table, _activation, _add_layer_tables, _export, _find_prefix, _import,
                                          _one, _plan)

_KINDS = {"qwen2_vl": "qwen2_vl", "qwen2_vl_vision": "qwen2_vl",
          "qwen2_5_vl": "qwen2_5_vl", "qwen2_5_vl_vision": "qwen2_5_vl",
          "qwen3_vl": "qwen3_vl", "qwen3_vl_vision": "qwen3_vl",
          # Qwen3-VL-MoE: the same vision tower (an MoE language model)
          "qwen3_vl_moe": "qwen3_vl", "qwen3_vl_moe_vision": "qwen3_vl"}


def _get(config: Any, name: str, default: Any = None) -> Any:
    return config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)


def vision_kind(config: Any) -> str:
    """"qwen2_vl", "qwen2_5_vl" or "qwen3_vl" for a vision config (or a whole VLM config), by model_type."""
    model_type = _get(config, "model_type")
    if model_type not in _KINDS:
        raise ValueError(f"model_type {model_type!r} is not supported: use a Qwen2-VL, Qwen2.5-VL or Qwen3-VL "
                         "(vision) config")
    return _KINDS[model_type]


def vision_params_from_hf(vision_config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``qwen_vit`` kwargs, ``patch_merger`` kwargs) from a Qwen2VLVisionConfig, Qwen2_5_VLVisionConfig
    or Qwen3VLVisionConfig (an object or its dict; a whole VLM config uses its ``vision_config``)."""
    inner = _get(vision_config, "vision_config")
    config = inner if inner is not None else vision_config
    kind = vision_kind(config)
    rope = _get(config, "rope_parameters") or {}
    theta = float(rope.get("rope_theta", 10000.0))
    merge = _get(config, "spatial_merge_size", 2)
    common = dict(num_layers=_get(config, "depth"), num_heads=_get(config, "num_heads"),
                  patch_size=_get(config, "patch_size"), temporal_patch_size=_get(config, "temporal_patch_size"),
                  num_channels=_get(config, "in_channels", 3), spatial_merge_size=merge, norm_eps=1e-6,
                  rope_theta=theta)
    if kind == "qwen2_vl":
        width = _get(config, "embed_dim")
        encoder = dict(common, hidden_size=width, ffn_hidden_size=int(width * _get(config, "mlp_ratio")),
                       norm="layernorm", mlp="gelu", activation=_activation(_get(config, "hidden_act")))
        out, norm = _get(config, "hidden_size"), "layernorm"
    elif kind == "qwen2_5_vl":
        width = _get(config, "hidden_size")
        encoder = dict(common, hidden_size=width, ffn_hidden_size=_get(config, "intermediate_size"),
                       norm="rmsnorm", mlp="swiglu", activation=_activation(_get(config, "hidden_act")),
                       window_size=_get(config, "window_size"),
                       fullatt_layers=list(_get(config, "fullatt_block_indexes")))
        out, norm = _get(config, "out_hidden_size"), "rmsnorm"
    else:
        width = _get(config, "hidden_size")
        encoder = dict(common, hidden_size=width, ffn_hidden_size=_get(config, "intermediate_size"),
                       norm="layernorm", mlp="gelu", activation=_activation(_get(config, "hidden_act")),
                       patch_bias=True, num_position_embeddings=_get(config, "num_position_embeddings"),
                       deepstack_layers=list(_get(config, "deepstack_visual_indexes")))
        out, norm = _get(config, "out_hidden_size"), "layernorm"
    merger = dict(in_features=width, out_features=out, spatial_merge_size=merge, norm=norm, norm_eps=1e-6,
                  activation="gelu")
    return encoder, merger


def deepstack_merger_params(merger_params: Mapping[str, Any]) -> dict[str, Any]:
    """The kwargs of Qwen3-VL's DeepStack mergers: the merger's, normalising after the merge."""
    return dict(merger_params, norm_after_merge=True)


# ------------------------------------------------------------------------------------ tables


def _kind_of_keys(keys: set[str], prefix: str) -> str:
    """Which tower a state dict holds, from its MLP names."""
    for kind, leaf in (("qwen2_5_vl", "mlp.gate_proj.weight"), ("qwen3_vl", "mlp.linear_fc1.weight"),
                       ("qwen2_vl", "mlp.fc1.weight")):
        if f"{prefix}blocks.0.{leaf}" in keys:
            return kind
    raise KeyError(f"no Qwen vision tower under prefix {prefix!r}: expected {prefix}blocks.0.mlp.* "
                   f"(some keys: {sorted(keys)[:5]})")


def _encoder_table(kind: str, num_layers: int, ffn: int, *, patch_bias: bool, norm_bias: bool) -> Table:
    layer: Table = {}
    for leaf in ("weight", "bias"):
        if leaf == "weight" or norm_bias:
            layer[f"attn_norm.{leaf}"] = _one(f"norm1.{leaf}")
            layer[f"mlp_norm.{leaf}"] = _one(f"norm2.{leaf}")
        layer[f"attn.qkv.{leaf}"] = _one(f"attn.qkv.{leaf}")
        layer[f"attn.out.{leaf}"] = _one(f"attn.proj.{leaf}")
        if kind == "qwen2_5_vl":
            layer[f"mlp.fc1.{leaf}"] = [(f"mlp.gate_proj.{leaf}", ffn), (f"mlp.up_proj.{leaf}", ffn)]
            layer[f"mlp.fc2.{leaf}"] = _one(f"mlp.down_proj.{leaf}")
        else:
            fc = "linear_fc" if kind == "qwen3_vl" else "fc"
            layer[f"mlp.fc1.{leaf}"] = _one(f"mlp.{fc}1.{leaf}")
            layer[f"mlp.fc2.{leaf}"] = _one(f"mlp.{fc}2.{leaf}")
    table: Table = {"patch_embed.weight": _one("patch_embed.proj.weight")}
    if patch_bias:
        table["patch_embed.bias"] = _one("patch_embed.proj.bias")
    if kind == "qwen3_vl":
        table["pos_embed"] = _one("pos_embed.weight")
    _add_layer_tables(table, layer, num_layers, "layers.", "blocks.")
    return table


def _merger_table(kind: str, hf: str) -> Table:
    if kind == "qwen3_vl":
        names = {"norm": "norm", "fc1": "linear_fc1", "fc2": "linear_fc2"}
    else:
        names = {"norm": "ln_q", "fc1": "mlp.0", "fc2": "mlp.2"}
    table = {f"{ours}.{leaf}": _one(f"{hf}{theirs}.{leaf}") for ours, theirs in names.items()
             for leaf in ("weight", "bias")}
    if kind == "qwen2_5_vl":
        del table["norm.bias"]  # RMSNorm
    return table


def _num_layers(keys: set[str], prefix: str) -> int:
    n = 0
    while f"{prefix}blocks.{n}.attn.qkv.weight" in keys:
        n += 1
    return n


def _num_deepstack(keys: set[str], prefix: str) -> int:
    n = 0
    while f"{prefix}deepstack_merger_list.{n}.linear_fc1.weight" in keys:
        n += 1
    return n


def vision_import_plan(hf_keys: Iterable[str], prefix: str | None = None) -> tuple[Plan, Plan, list[Plan]]:
    """Which HF tensors make each of our tensors, from the key names alone (encoder, merger, one plan per
    DeepStack merger): see :func:`vision_state_dict_from_hf`; for streaming and shape checks
    (:mod:`mimo_spec.interop.hf_safetensors`)."""
    keys = set(hf_keys)
    prefix = _find_prefix(keys, "patch_embed.proj.weight", prefix)
    kind = _kind_of_keys(keys, prefix)
    # rows only split tensors on export: unused here
    table = _encoder_table(kind, _num_layers(keys, prefix), 0, patch_bias=f"{prefix}patch_embed.proj.bias" in keys,
                           norm_bias=kind != "qwen2_5_vl")
    return (_plan(table, prefix), _plan(_merger_table(kind, "merger."), prefix),
            [_plan(_merger_table(kind, f"deepstack_merger_list.{j}."), prefix)
             for j in range(_num_deepstack(keys, prefix))])


def vision_state_dict_from_hf(hf_state_dict: Mapping[str, torch.Tensor], prefix: str | None = None
                              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """An HF Qwen vision tower's tensors (under ``prefix``, e.g. ``"model.visual."``; found from the keys
    when None) -> (``qwen_vit`` state dict, ``patch_merger`` state dict, one state dict per DeepStack
    merger). Keys outside the prefix are ignored; a missing tensor is a KeyError naming it."""
    encoder, merger, deepstack = vision_import_plan(hf_state_dict.keys(), prefix)
    return (_import(hf_state_dict, encoder), _import(hf_state_dict, merger),
            [_import(hf_state_dict, plan) for plan in deepstack])


def vision_state_dict_to_hf(encoder_state: Mapping[str, torch.Tensor], merger_state: Mapping[str, torch.Tensor],
                            deepstack_states: Sequence[Mapping[str, torch.Tensor]] = (), *,
                            encoder_params: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """Our ``qwen_vit`` (+ ``patch_merger``, + DeepStack mergers) state dicts -> HF keys under ``prefix``.
    ``encoder_params`` (the encoder's kwargs) say which tower: swiglu is Qwen2.5-VL, a position table
    Qwen3-VL, else Qwen2-VL."""
    if encoder_params.get("mlp") == "swiglu":
        kind = "qwen2_5_vl"
    elif encoder_params.get("num_position_embeddings") is not None:
        kind = "qwen3_vl"
    else:
        kind = "qwen2_vl"
    if deepstack_states and kind != "qwen3_vl":
        raise ValueError(f"DeepStack mergers exist only in Qwen3-VL; these encoder params are {kind}")
    table = _encoder_table(kind, encoder_params["num_layers"], encoder_params["ffn_hidden_size"],
                           patch_bias="patch_embed.bias" in encoder_state, norm_bias=kind != "qwen2_5_vl")
    out = _export(encoder_state, table, prefix)
    out.update(_export(merger_state, _merger_table(kind, "merger."), prefix))
    for j, state in enumerate(deepstack_states):
        out.update(_export(state, _merger_table(kind, f"deepstack_merger_list.{j}."), prefix))
    return out


def vision_config_to_hf(encoder_params: Mapping[str, Any], merger_params: Mapping[str, Any]) -> dict[str, Any]:
    """The HF vision config (as kwargs of Qwen2VLVisionConfig, Qwen2_5_VLVisionConfig or Qwen3VLVisionConfig,
    with its ``model_type``) of our encoder and merger kwargs: the inverse of :func:`vision_params_from_hf`.
    A ValueError names what HF cannot express (e.g. a Qwen2-VL MLP width that is no multiple of the width)."""
    p, m = encoder_params, merger_params
    act = {"quick_gelu": "quick_gelu", "silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu",
           "relu": "relu"}  # ours -> HF
    if p.get("activation") not in act:
        raise ValueError(f"activation {p.get('activation')!r} has no Hugging Face name")
    common = dict(depth=p["num_layers"], num_heads=p["num_heads"], patch_size=p.get("patch_size", 14),
                  temporal_patch_size=p.get("temporal_patch_size", 2), in_channels=p.get("num_channels", 3),
                  spatial_merge_size=p.get("spatial_merge_size", 2), hidden_act=act[p["activation"]],
                  rope_parameters={"rope_type": "axial", "rope_theta": float(p.get("rope_theta", 10000.0))})
    if p.get("mlp") == "swiglu":
        return dict(common, model_type="qwen2_5_vl_vision", hidden_size=p["hidden_size"],
                    intermediate_size=p["ffn_hidden_size"], out_hidden_size=m["out_features"],
                    window_size=p.get("window_size"), fullatt_block_indexes=list(p.get("fullatt_layers") or []))
    if p.get("num_position_embeddings") is not None:
        return dict(common, model_type="qwen3_vl_vision", hidden_size=p["hidden_size"],
                    intermediate_size=p["ffn_hidden_size"], out_hidden_size=m["out_features"],
                    num_position_embeddings=p["num_position_embeddings"],
                    deepstack_visual_indexes=list(p.get("deepstack_layers") or []))
    if p["ffn_hidden_size"] % p["hidden_size"]:
        raise ValueError(f"Qwen2-VL's MLP width is hidden_size x mlp_ratio: ffn_hidden_size {p['ffn_hidden_size']} "
                         f"is no multiple of hidden_size {p['hidden_size']}")
    return dict(common, model_type="qwen2_vl_vision", embed_dim=p["hidden_size"], hidden_size=m["out_features"],
                mlp_ratio=p["ffn_hidden_size"] // p["hidden_size"])
