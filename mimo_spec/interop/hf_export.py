"""Export to the Hugging Face layout: ``config.json`` + ``model.safetensors`` that
``from_pretrained`` loads with no missing or unexpected keys.

What can be exported (anything else is a ConfigError that says why):

- a text-only model whose gpt is Llama-shaped (-> LlamaForCausalLM), Qwen2-shaped
  (bias on q/k/v only -> Qwen2ForCausalLM), Qwen3-shaped (qk_norm -> Qwen3ForCausalLM) or GPT-2-shaped
  (-> GPT2LMHeadModel); a mixture-of-experts gpt (``num_experts``) -> MixtralForCausalLM (every layer
  routed, softmax top-k renormalised, no biases), Qwen2MoeForCausalLM (a gated shared expert) or
  Qwen3MoeForCausalLM (qk_norm), the experts one tensor each as the releases are; the HF config is read
  back with the importer's functions and must give every parameter again (router_z_loss_weight, a
  training loss with no Hugging Face field, excepted), else the parameter that differs is named;
- a LLaVA-shaped model: that LM plus one ``images`` modality with one clip_vit
  encoder and a 2-layer mlp projector (-> LlavaForConditionalGeneration);
- a Qwen-VL-shaped model: an M-RoPE gpt, one modality with a qwen_vit encoder and a
  patch_merger projector (+ DeepStack patch_mergers feeding LM layers 0, 1, ...), and
  at most one video modality reading it (``inputs_from``) -> Qwen2VLForConditionalGeneration
  (Qwen2-VL tower), Qwen2_5_VLForConditionalGeneration (SwiGLU/RMSNorm tower with
  windows), Qwen3VLForConditionalGeneration (position table, DeepStack) or, with an MoE gpt,
  Qwen3VLMoeForConditionalGeneration (fused experts stored transposed, as released, except
  square ones, which transformers could not tell apart: those as it holds them). The HF
  config is read back with the importer's own functions and must give every parameter
  again, else the parameter that differs is named. config.json ids our model does not
  use come from the run config's ``hf_config`` (``import_hf`` fills it):
  ``vision_start_token_id``, ``vision_end_token_id`` and ``text_config.{bos,eos,pad}_token_id``;
  without it, Qwen's tokenizer layout: vision start/end = image_token_id - 3 / - 2,
  bos/eos = 151643/151645 when inside the vocabulary (else none), no video modality:
  video_token_id = image_token_id + 1. Qwen2(.5)-VL tensors are written in their Hub
  layout (``model.layers.*``, ``visual.*``), Qwen3-VL's as published
  (``model.language_model.*``, ``model.visual.*``). A text-only M-RoPE LM matches no
  Hugging Face class and is refused;
- a lone clip_vit (-> CLIPVisionModel or SiglipVisionModel), siglip2_naflex
  (-> Siglip2VisionModel) or whisper_encoder (-> transformers' WhisperEncoder).

The tensor names follow the Hugging Face Hub layout (``vision_model.``,
``language_model.model.``), which every transformers version loads. A vision
tower built without ``keep_unused_layers`` is exported with just the blocks it
has (the feature layer becomes the last one, so the outputs are the same) and an
identity-initialised post-layernorm, which LLaVA never reads.
"""

from __future__ import annotations

import importlib

import inspect
import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mimo_spec.errors import ConfigError, Problem
from mimo_spec.interop import hf_weights as hw
from mimo_spec.interop.hf_safetensors import publish, write_safetensors

# our activation names -> Hugging Face's
_HF_ACT = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu",
           "relu": "relu"}


def _full_params(cls: type, params: dict[str, Any]) -> dict[str, Any]:
    """Constructor kwargs with every default filled in."""
    bound = inspect.signature(cls).bind_partial(**params)
    bound.apply_defaults()
    return dict(bound.arguments)


def _refuse(path: str, message: str, hint: str = "") -> ConfigError:
    return ConfigError(Problem(path, f"cannot export to Hugging Face: {message}", hint))


def _hf_config(cls_name: str, dtype: torch.dtype, architecture: str | bool | None, **kwargs):
    import transformers

    # transformers 5 calls it dtype; 4.x torch_dtype
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    config = getattr(transformers, cls_name)(**kwargs, **{key: dtype})
    if architecture:
        config.architectures = [architecture]
    return config


# --------------------------------------------------------------------------- language model


def _lm_config(p: dict[str, Any], dtype: torch.dtype, path: str):
    """(HF config, architecture) for full GPT params."""
    head_dim = p["head_dim"] or p["hidden_size"] // p["num_heads"]
    kv = p["num_kv_heads"] or p["num_heads"]
    ffn = p["ffn_hidden_size"] or 4 * p["hidden_size"]
    out_bias = p["attention_bias"] if p["attention_out_bias"] is None else p["attention_out_bias"]
    act = p["activation"] or ("silu" if p["mlp"] == "swiglu" else "gelu")
    if (p["position_embedding"], p["norm"], p["mlp"]) == ("learned", "layernorm", "gelu"):
        ok = p["attention_bias"] and out_bias and p["mlp_bias"] and p["tie_embeddings"] and kv == p["num_heads"] \
            and head_dim * p["num_heads"] == p["hidden_size"] and act in ("gelu", "gelu_tanh")
        if not ok:
            raise _refuse(path, "a GPT-2-style gpt needs biases everywhere, tied embeddings, no GQA and a gelu MLP")
        return _hf_config("GPT2Config", dtype, "GPT2LMHeadModel", vocab_size=p["vocab_size"], n_embd=p["hidden_size"],
                          n_layer=p["num_layers"], n_head=p["num_heads"], n_inner=ffn, n_positions=p["max_seq_len"],
                          layer_norm_epsilon=p["norm_eps"], tie_word_embeddings=True,
                          activation_function="gelu_new" if act == "gelu_tanh" else "gelu")
    if p.get("mrope_section") is not None:  # a plain Llama / Qwen2 would load it and compute other logits
        raise _refuse(path, f"mrope_section={p['mrope_section']}: M-RoPE language models match no Hugging Face "
                            "class on their own (a plain Qwen2 would compute other positions)",
                      "M-RoPE exports as Qwen2-VL / Qwen2.5-VL / Qwen3-VL, with an images modality (qwen_vit + "
                      "patch_merger); export a text model without model.params.mrope_section only if it was "
                      "trained on text (B, S) positions")
    if (p["position_embedding"], p["norm"], p["mlp"]) != ("rope", "rmsnorm", "swiglu"):
        raise _refuse(path, f"position_embedding={p['position_embedding']}, norm={p['norm']}, mlp={p['mlp']} "
                            "match no Hugging Face model", "Llama/Qwen2 need rope + rmsnorm + swiglu; "
                            "GPT-2 needs learned + layernorm + gelu")
    common = dict(vocab_size=p["vocab_size"], hidden_size=p["hidden_size"], intermediate_size=ffn,
                  num_hidden_layers=p["num_layers"], num_attention_heads=p["num_heads"], num_key_value_heads=kv,
                  head_dim=head_dim, hidden_act=_HF_ACT[act], max_position_embeddings=p["max_seq_len"],
                  rms_norm_eps=p["norm_eps"], tie_word_embeddings=p["tie_embeddings"])
    import transformers

    scaling = p.get("rope_scaling")
    if "rope_parameters" in inspect.signature(transformers.LlamaConfig.__init__).parameters:
        rope = {"rope_parameters": {"rope_type": "default", "rope_theta": p["rope_theta"], **(scaling or {})}}
    else:
        rope = {"rope_theta": p["rope_theta"], **({"rope_scaling": dict(scaling)} if scaling else {})}
    qk_kind = p.get("qk_norm_kind", "rmsnorm") if p.get("qk_norm") else "rmsnorm"
    qk_exportable = qk_kind == "rmsnorm" or (qk_kind == "rmsnorm_all_heads" and p.get("num_experts"))  # OLMoE
    if not qk_exportable or p.get("qk_norm_eps") is not None or p.get("swin_norm"):
        raise _refuse(path, f"qk_norm_kind {p.get('qk_norm_kind')!r} / qk_norm_eps {p.get('qk_norm_eps')} / swin_norm "
                            f"{p.get('swin_norm')} match no Hugging Face causal LM (Chameleon's per-head LayerNorms and "
                            "swin_norm export with its images only; q/k norms over all heads as OLMoE, with "
                            "experts)")
    if p.get("num_experts"):
        return _moe_lm_config(p, dtype, path, common, rope)
    if p.get("qk_norm"):
        if out_bias != p["attention_bias"] or p["mlp_bias"]:
            raise _refuse(path, "qk_norm with these biases matches no Hugging Face model (Qwen3 has q/k/v and "
                                "output bias alike and none in the MLP)")
        return _hf_config("Qwen3Config", dtype, "Qwen3ForCausalLM", attention_bias=p["attention_bias"],
                          use_sliding_window=False, **common, **rope)
    if p["attention_bias"] and not out_bias and not p["mlp_bias"]:
        return _hf_config("Qwen2Config", dtype, "Qwen2ForCausalLM", use_sliding_window=False, **common, **rope)
    if p["attention_bias"] != out_bias:
        raise _refuse(path, "bias on the attention output but not on q/k/v matches no Hugging Face model")
    return _hf_config("LlamaConfig", dtype, "LlamaForCausalLM", attention_bias=p["attention_bias"],
                      mlp_bias=p["mlp_bias"], **common, **rope)


def _moe_family(p: dict[str, Any]) -> str:
    """The Hugging Face family an MoE gpt exports as: olmoe (q/k norms over all heads), qwen3_moe (per-head
    q/k norms), qwen2_moe (a shared expert or Qwen2's q/k/v-only bias) or mixtral (the rest; what it cannot
    express is then refused by name)."""
    if p.get("qk_norm") and p.get("qk_norm_kind") == "rmsnorm_all_heads":
        return "olmoe"
    if p.get("qk_norm"):
        return "qwen3_moe"
    out_bias = p["attention_bias"] if p.get("attention_out_bias") is None else p["attention_out_bias"]
    if p.get("shared_expert_ffn_hidden_size") or (p["attention_bias"] and not out_bias):
        return "qwen2_moe"
    return "mixtral"


def _moe_lm_config(p: dict[str, Any], dtype: torch.dtype, path: str, common: dict[str, Any], rope: dict[str, Any]):
    """(HF config) of a mixture-of-experts gpt: MixtralForCausalLM, Qwen2MoeForCausalLM or
    Qwen3MoeForCausalLM. The config read back as import_hf reads it must give every parameter again, else the
    parameter that differs is named."""
    family = _moe_family(p)
    aux = float(p.get("router_aux_loss_weight") or 0.0)
    router = dict(num_experts_per_tok=p["num_experts_per_tok"], output_router_logits=aux > 0,
                  router_aux_loss_coef=aux if aux > 0 else 0.001)
    moe_ffn = p.get("moe_ffn_hidden_size") or common["intermediate_size"]
    if family == "mixtral":
        config = _hf_config("MixtralConfig", dtype, "MixtralForCausalLM", num_local_experts=p["num_experts"],
                            sliding_window=None, **{**common, "intermediate_size": moe_ffn}, **router, **rope)
    elif family == "olmoe":
        if common["head_dim"] * common["num_attention_heads"] != common["hidden_size"]:  # OLMoE's q_norm is
            # hidden_size wide: its heads x head_dim must be that
            raise _refuse(path, f"head_dim {common['head_dim']} with q/k norms over all heads: OLMoE's head_dim is "
                                "hidden_size / num_heads")
        olmoe = {k: v for k, v in common.items() if k != "head_dim"}
        config = _hf_config("OlmoeConfig", dtype, "OlmoeForCausalLM", num_experts=p["num_experts"],
                            norm_topk_prob=bool(p["norm_topk_prob"]), attention_bias=p["attention_bias"],
                            clip_qkv=None, **{**olmoe, "intermediate_size": moe_ffn}, **router, **rope)
    else:
        qwen = dict(num_experts=p["num_experts"], moe_intermediate_size=moe_ffn,
                    decoder_sparse_step=p.get("decoder_sparse_step") or 1,
                    mlp_only_layers=sorted(p.get("mlp_only_layers") or []), norm_topk_prob=bool(p["norm_topk_prob"]),
                    use_sliding_window=False, **router, **common, **rope)
        if family == "qwen3_moe":
            config = _hf_config("Qwen3MoeConfig", dtype, "Qwen3MoeForCausalLM", attention_bias=p["attention_bias"],
                                **qwen)
        else:
            config = _hf_config("Qwen2MoeConfig", dtype, "Qwen2MoeForCausalLM", qkv_bias=bool(p["attention_bias"]),
                                shared_expert_intermediate_size=p.get("shared_expert_ffn_hidden_size") or 0, **qwen)
    try:
        back = hw.gpt_params_from_hf(config)
    except ValueError as e:
        raise _refuse(path, str(e)) from None
    bad = _differences(_gpt_canonical(p), _gpt_canonical({k: v for k, v in back.items() if v is not None}), path)
    if bad:
        raise _refuse(bad[0].split(":")[0], f"{'; '.join(bad[:6])}" + (f" ... ({len(bad)} in all)" if len(bad) > 6
                                                                       else ""),
                      f"no {config.architectures[0]} computes this model (Mixtral: softmax top-k renormalised, every "
                      "layer routed, no biases; Qwen2-MoE: a gated shared expert; Qwen3-MoE: qk_norm; OLMoE: q/k "
                      "norms over all heads, every layer routed)")
    return config


def _moe_layout(p: dict[str, Any]) -> str:
    """How the routed experts of an exported text model are stored: as the family's releases are."""
    return "mixtral" if _moe_family(p) == "mixtral" else "qwen"


def _lm_tensors(lm: nn.Module, p: dict[str, Any], legacy_prefix: str = "",
                moe_layout: str | None = None) -> dict[str, torch.Tensor]:
    """GPT -> HF keys; ``legacy_prefix="language_model."`` for LLaVA's Hub layout; routed experts in
    ``moe_layout`` (None: the text family's release layout)."""
    if p.get("num_experts") and moe_layout is None:
        moe_layout = _moe_layout(p)
    out = hw.gpt_state_dict_to_hf(lm.state_dict(), p, moe_layout or "fused")
    if p["tie_embeddings"]:
        out.pop("lm_head.weight")  # HF ties it on load; safetensors cannot hold it twice
    return {legacy_prefix + k: v for k, v in out.items()}


# --------------------------------------------------------------------------- vision / audio


def _vit_config(p: dict[str, Any], dtype: torch.dtype, path: str, standalone: bool):
    """(HF vision config, HF feature layer) for full ClipViT params (``standalone``: not inside a VLM)."""
    clip_style = (p["class_token"], p["pre_norm"], p["patch_bias"]) == (True, True, False)
    siglip_style = (p["class_token"], p["pre_norm"], p["patch_bias"]) == (False, False, True)
    if not (clip_style or siglip_style):
        raise _refuse(path, "a clip_vit is CLIP-style (class_token, pre_norm, no patch_bias) or SigLIP-style "
                            f"(none of them, patch_bias); got class_token={p['class_token']}, "
                            f"pre_norm={p['pre_norm']}, patch_bias={p['patch_bias']}")
    plain = dict(layer_scale=None, norm="layernorm", mlp="gelu", qk_norm=False, qkv_bias=True, register_tokens=0)
    for key, value in plain.items():  # InternViT's options (hf_internvl exports those): CLIP / SigLIP have none
        if p.get(key, value) != value:
            where = path if path.endswith("params") else f"{path}.params"
            raise _refuse(f"{where}.{key}", f"{p[key]!r}: CLIP / SigLIP towers have {key} {value!r}")
    blocks = hw.resolve_feature_layer(p["feature_layer"], p["num_layers"])
    layers = p["num_layers"] if p["keep_unused_layers"] else blocks
    if layers == 0:
        raise _refuse(path, "the tower has no blocks", "set keep_unused_layers: true")
    kwargs = dict(hidden_size=p["hidden_size"], intermediate_size=p["ffn_hidden_size"], num_hidden_layers=layers,
                  num_attention_heads=p["num_heads"], num_channels=p["num_channels"], image_size=p["image_size"],
                  patch_size=p["patch_size"], hidden_act=_HF_ACT[p["activation"]], layer_norm_eps=p["layer_norm_eps"])
    feature_layer = p["feature_layer"] if p["keep_unused_layers"] else -1
    if clip_style:
        return _hf_config("CLIPVisionConfig", dtype, standalone and "CLIPVisionModel", **kwargs), feature_layer
    return _hf_config("SiglipVisionConfig", dtype, standalone and "SiglipVisionModel", vision_use_head=False,
                      **kwargs), feature_layer


def _vit_tensors(vit: nn.Module, p: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    out = hw.clip_vit_state_dict_to_hf(vit.state_dict(), p, prefix=prefix)
    if prefix + "post_layernorm.weight" not in out:  # HF always has one; ours only when used or kept
        ref = vit.pos_embed
        out[prefix + "post_layernorm.weight"] = torch.ones(p["hidden_size"], dtype=ref.dtype, device=ref.device)
        out[prefix + "post_layernorm.bias"] = torch.zeros(p["hidden_size"], dtype=ref.dtype, device=ref.device)
    return out


def _whisper_config(p: dict[str, Any], dtype: torch.dtype, path: str):
    """WhisperConfig (a WhisperEncoder), or for ``pool_stride`` 2 Qwen2AudioEncoderConfig: Qwen2-Audio's tower,
    a Whisper encoder with a stride-2 average pool before its last LayerNorm, holds the same tensors."""
    if p["layer_norm_eps"] != 1e-5:
        raise _refuse(path, f"layer_norm_eps {p['layer_norm_eps']}: Hugging Face's Whisper uses 1e-5")
    if p["pool_stride"] == 2:
        return _hf_config("Qwen2AudioEncoderConfig", dtype, "Qwen2AudioEncoder", d_model=p["hidden_size"],
                          encoder_layers=p["num_layers"], encoder_attention_heads=p["num_heads"],
                          encoder_ffn_dim=p["ffn_hidden_size"], num_mel_bins=p["num_mel_bins"],
                          max_source_positions=p["max_source_positions"], activation_function=_HF_ACT[p["activation"]])
    if p["pool_stride"] != 1:
        raise _refuse(f"{path}.pool_stride", f"{p['pool_stride']}: Hugging Face's Whisper encoder does not pool, "
                                             "and Qwen2-Audio's pools by 2", "pool_stride 1 or 2")
    return _hf_config("WhisperConfig", dtype, "WhisperEncoder", d_model=p["hidden_size"],
                      encoder_layers=p["num_layers"], encoder_attention_heads=p["num_heads"],
                      encoder_ffn_dim=p["ffn_hidden_size"], decoder_layers=p["num_layers"],
                      decoder_attention_heads=p["num_heads"], decoder_ffn_dim=p["ffn_hidden_size"],
                      num_mel_bins=p["num_mel_bins"], max_source_positions=p["max_source_positions"],
                      activation_function=_HF_ACT[p["activation"]])


def _siglip2_config(p: dict[str, Any], dtype: torch.dtype, path: str):
    """Siglip2VisionConfig for full Siglip2NaFlex params: the blocks ours holds (all of them with
    keep_unused_layers, else up to the feature layer, which becomes the last), the pooling head if held."""
    from mimo_spec.components.vision.clip_vit import resolve_feature_layer

    layers = p["num_layers"] if p["keep_unused_layers"] else resolve_feature_layer(p["feature_layer"], p["num_layers"])
    if layers == 0:
        raise _refuse(path, "the tower has no blocks", "set keep_unused_layers: true")
    if p["activation"] not in _HF_ACT:
        raise _refuse(f"{path}.activation", f"{p['activation']!r} has no Hugging Face name")
    return _hf_config("Siglip2VisionConfig", dtype, "Siglip2VisionModel", hidden_size=p["hidden_size"],
                      intermediate_size=p["ffn_hidden_size"], num_hidden_layers=layers,
                      num_attention_heads=p["num_heads"], num_channels=p["num_channels"],
                      num_patches=p["num_patches"], patch_size=p["patch_size"], hidden_act=_HF_ACT[p["activation"]],
                      layer_norm_eps=p["layer_norm_eps"],
                      vision_use_head=bool(p["keep_unused_layers"] and p["pooling_head"]))


def _siglip2_tensors(enc: nn.Module, p: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    from mimo_spec.components.vision.siglip2 import siglip2_state_dict_to_hf

    out = siglip2_state_dict_to_hf(enc.state_dict(), p, prefix=prefix)
    if prefix + "post_layernorm.weight" not in out:  # HF always has one; ours only when used or kept
        ref = enc.pos_embed
        out[prefix + "post_layernorm.weight"] = torch.ones(p["hidden_size"], dtype=ref.dtype, device=ref.device)
        out[prefix + "post_layernorm.bias"] = torch.zeros(p["hidden_size"], dtype=ref.dtype, device=ref.device)
    return out


# --------------------------------------------------------------------------- whole models


def _params_of(node, cls: type) -> dict[str, Any]:
    return _full_params(cls, dict(node.params))


# modules of mimo_spec.interop whose export(model, spec, lm_params, dtype, extras) writes one family back
# ((HF config, HF tensors), or None when the model does not have that family's shape); tried in order
_FAMILY_EXPORTERS = ("hf_llava_next", "hf_internvl", "hf_idefics3", "hf_qwen2_audio", "hf_janus", "hf_chameleon")


def _mimo(model: nn.Module, spec, dtype: torch.dtype, extras: dict[str, Any] | None = None):
    """(HF config, HF tensors) for a MimoModel."""
    from mimo_spec.components.language.gpt import GPT
    from mimo_spec.components.projectors import MLPProjector
    from mimo_spec.components.vision.clip_vit import ClipViT

    if not isinstance(model.language_model, GPT):
        raise _refuse("model.module", f"the language model is a {type(model.language_model).__name__}, not gpt")
    lm_p = _params_of(spec.language_model, GPT)
    if lm_p.get("mrope_section") is not None and model.modalities:
        return _qwen_vl(model, spec, lm_p, dtype, extras or {})
    if not model.modalities:
        return _lm_config(lm_p, dtype, "model.params"), _lm_tensors(model.language_model, lm_p)
    for family in _FAMILY_EXPORTERS:  # each says whether the model has its shape (None: not its shape)
        made = importlib.import_module(f"mimo_spec.interop.{family}").export(model, spec, lm_p, dtype, extras or {})
        if made is not None:
            return made
    text_config = _lm_config(lm_p, dtype, "model.params")  # (Chameleon's LM is no plain causal LM: it exports above)
    shape_hint = "LLaVA is one modality with one clip_vit encoder and a 2-layer mlp projector, no decoder"
    if len(model.modalities) != 1:
        raise _refuse("modalities", f"{len(model.modalities)} modalities ({', '.join(model.modalities)})", shape_hint)
    name, mod = next(iter(model.modalities.items()))
    path = f"modalities.{name}"
    if len(mod.encoders) != 1 or mod.decoder is not None or mod.combine != "per_item":
        raise _refuse(path, f"{len(mod.encoders)} encoders, decoder: {mod.decoder is not None}", shape_hint)
    enc_name, vit = next(iter(mod.encoders.items()))
    proj = mod.input_projections[enc_name]
    node = spec.modalities[name].submodules
    if not isinstance(vit, ClipViT) or not isinstance(proj, MLPProjector):
        raise _refuse(path, f"encoder {type(vit).__name__}, projector {type(proj).__name__}", shape_hint)
    vit_p, proj_p = _params_of(node["encoders"][enc_name], ClipViT), _params_of(node["input_projections"][enc_name],
                                                                                MLPProjector)
    if proj_p["num_layers"] != 2 or proj_p["hidden_features"] not in (None, proj_p["out_features"]):
        raise _refuse(f"{path}.submodules.input_projections.{enc_name}", "the mlp projector must have "
                      "num_layers 2 and hidden_features = out_features", shape_hint)
    if vit_p["post_norm"]:
        raise _refuse(f"{path}.submodules.encoders.{enc_name}.params.post_norm", "LLaVA applies no post-norm to "
                      "the features", "set post_norm: false (Hugging Face reads hidden_states[feature_layer])")
    vision_config, feature_layer = _vit_config(vit_p, dtype, f"{path}.submodules.encoders.{enc_name}", False)
    # SigLIP has no class token to drop, so its features are always "full"
    strategy = "default" if vit_p["class_token"] and vit_p["feature_select"] == "patch" else "full"
    config = _hf_config("LlavaConfig", dtype, "LlavaForConditionalGeneration", vision_config=vision_config,
                        text_config=text_config, image_token_index=mod.special_token_id,
                        vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                        projector_hidden_act=_HF_ACT[proj_p["activation"]], multimodal_projector_bias=proj_p["bias"],
                        image_seq_length=vit.tokens_per_item((1, 3, vit.image_size, vit.image_size)),
                        tie_word_embeddings=lm_p["tie_embeddings"])
    tensors = _lm_tensors(model.language_model, lm_p, "language_model.")
    tensors.update(_vit_tensors(vit, vit_p, "vision_tower.vision_model."))
    tensors.update(hw.llava_projector_state_dict_to_hf(proj.state_dict()))
    return config, tensors


# --------------------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL / Qwen3-VL

# Our kind (the vision tower's, see hf_qwen_vision) -> (HF config class, architecture)
_QWEN_VL = {"qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
            "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
            "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
            "qwen3_vl_moe": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration")}
# config.json values our model does not use, kept by import_hf under the run config's ``hf_config`` key
HF_CONFIG_KEYS = ("vision_start_token_id", "vision_end_token_id")
HF_TEXT_CONFIG_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Qwen's tokenizers put <|vision_start|> and <|vision_end|> 3 and 2 ids below <|image_pad|> (151652, 151653,
# 151655 in every Qwen2-VL / Qwen2.5-VL / Qwen3-VL release): the default when the config does not say
_QWEN_VISION_START_OFFSET, _QWEN_VISION_END_OFFSET = -3, -2
# <|endoftext|> and <|im_end|>: the text config's defaults, written when they fall inside the vocabulary
_QWEN_BOS, _QWEN_EOS = 151643, 151645


def _gpt_canonical(p: dict[str, Any]) -> dict[str, Any]:
    """Full GPT params with every derived default resolved, minus what Hugging Face does not describe."""
    from mimo_spec.components.language.gpt import GPT

    p = _full_params(GPT, p)
    heads = p["num_heads"]
    p["num_kv_heads"] = p["num_kv_heads"] or heads
    p["head_dim"] = p["head_dim"] or p["hidden_size"] // heads
    p["ffn_hidden_size"] = p["ffn_hidden_size"] or 4 * p["hidden_size"]
    p["activation"] = p["activation"] or ("silu" if p["mlp"] == "swiglu" else "gelu")
    if p["attention_out_bias"] is None:
        p["attention_out_bias"] = p["attention_bias"]
    if p["mrope_section"] is not None:
        p["mrope_section"] = [int(v) for v in p["mrope_section"]]
    from mimo_spec.components.layers import check_rope_scaling

    p["rope_scaling"] = check_rope_scaling(p.get("rope_scaling"))
    for k in ("backend", "dropout"):  # how it runs or trains, not what it computes
        p.pop(k)
    _moe_canonical(p)
    return p


# GPT's mixture-of-experts parameters (their defaults apply when num_experts is None: a dense model)
_MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_ffn_hidden_size", "decoder_sparse_step", "mlp_only_layers",
             "router_scoring", "norm_topk_prob", "shared_expert_ffn_hidden_size", "shared_expert_gate",
             "router_aux_loss_weight", "router_z_loss_weight", "router_bias_update_rate")


def _moe_canonical(p: dict[str, Any]) -> None:
    """Resolve the MoE defaults in full GPT params ``p`` (in place)."""
    if not p.get("num_experts"):
        for k in _MOE_KEYS:
            p.pop(k, None)
        return
    p["moe_ffn_hidden_size"] = p.get("moe_ffn_hidden_size") or p["ffn_hidden_size"]
    p["mlp_only_layers"] = sorted(int(i) for i in p.get("mlp_only_layers") or [])
    p["decoder_sparse_step"] = p.get("decoder_sparse_step") or 1
    p["router_aux_loss_weight"] = float(p.get("router_aux_loss_weight") or 0.0)
    p.pop("router_z_loss_weight", None)  # a training loss Hugging Face has no field for: not what it computes
    if all(hw.is_moe_layer(p, i) for i in range(p["num_layers"])):
        p["ffn_hidden_size"] = p["moe_ffn_hidden_size"]  # no dense layer reads it


def _differences(ours: dict[str, Any], back: dict[str, Any], path: str) -> list[str]:
    return [f"{path}.{k}: {ours.get(k)!r} (Hugging Face's would be {back.get(k)!r})"
            for k in sorted(set(ours) | set(back)) if ours.get(k) != back.get(k)]


def _qwen_vl(model: nn.Module, spec, lm_p: dict[str, Any], dtype: torch.dtype, extras: dict[str, Any]):
    """(HF config, HF tensors) for a Qwen2-VL / Qwen2.5-VL / Qwen3-VL-shaped MimoModel: an M-RoPE gpt, one
    modality with a qwen_vit encoder and a patch_merger projector (Qwen3-VL: DeepStack patch_mergers into
    LM layers 0, 1, ...), and at most one video modality reading it (``inputs_from``).

    What Hugging Face cannot express is refused by name: the config is mapped back with the importer's
    functions and must give every parameter of ours again."""
    from mimo_spec.components.vision.qwen_vit import PatchMerger, QwenViT
    from mimo_spec.interop import hf_qwen_vision as hq

    hint = ("Qwen2-VL / Qwen2.5-VL / Qwen3-VL: an images modality (one qwen_vit encoder, its patch_merger "
            "projector; Qwen3-VL also deepstack_projections) and optionally a videos modality with "
            "inputs_from: images")
    own = [n for n, m in model.modalities.items() if m.inputs_from is None]
    if len(own) != 1:
        raise _refuse("modalities", f"an M-RoPE model exports as a Qwen-VL, whose items all go through one "
                      f"vision tower; {len(own)} modalities have their own encoders ({', '.join(own) or 'none'})",
                      hint)
    name = own[0]
    mod, node = model.modalities[name], spec.modalities[name].submodules
    path = f"modalities.{name}"
    videos = [n for n, m in model.modalities.items() if m.inputs_from is not None]
    if len(videos) > 1 or any(model.modalities[v].inputs_from != name or model.modalities[v].item_kind != "video"
                              for v in videos):
        raise _refuse("modalities", f"modalities {', '.join(videos)} read {name}'s encoders: a Qwen-VL has one "
                      "such modality, of item_kind video", hint)
    for n, m in model.modalities.items():
        if m.decoder is not None or m.output_projection is not None or m.combine != "per_item" \
                or m.special_token_id is None:
            raise _refuse(f"modalities.{n}", "a Qwen-VL modality is an input with a special_token_id, per_item, "
                          "no decoder or output projection", hint)
    if mod.item_kind not in (None, "image"):
        raise _refuse(f"{path}.params.item_kind", f"{mod.item_kind!r}: the tower's own modality holds images",
                      hint)
    if len(mod.encoders) != 1:
        raise _refuse(f"{path}.submodules.encoders", f"{len(mod.encoders)} encoders", hint)
    enc_name, vit = next(iter(mod.encoders.items()))
    proj = mod.input_projections[enc_name] if enc_name in mod.input_projections else None
    if not isinstance(vit, QwenViT) or not isinstance(proj, PatchMerger):
        raise _refuse(path, f"encoder {type(vit).__name__}, projector {type(proj).__name__}", hint)
    enc_p = _full_params(QwenViT, dict(node["encoders"][enc_name].params))
    merger_p = _full_params(PatchMerger, dict(node["input_projections"][enc_name].params))
    deep = list(mod.deepstack_projections or [])
    deep_nodes = node.get("deepstack_projections") or []
    if any(not isinstance(d, PatchMerger) for d in deep):
        raise _refuse(f"{path}.submodules.deepstack_projections", "DeepStack projections must be patch_mergers",
                      hint)
    if mod.deepstack_lm_layers != list(range(len(deep))):
        raise _refuse(f"{path}.params.deepstack_lm_layers", f"{mod.deepstack_lm_layers}: Qwen3-VL adds the "
                      f"DeepStack features to the first LM layers, {list(range(len(deep)))}", hint)

    try:
        vision = hq.vision_config_to_hf(enc_p, merger_p)
    except ValueError as e:
        raise _refuse(f"{path}.submodules.encoders.{enc_name}", str(e), hint) from None
    kind = hq.vision_kind(vision)
    moe = bool(lm_p.get("num_experts"))
    if moe and kind != "qwen3_vl":
        raise _refuse("model.params.num_experts", f"{lm_p['num_experts']}: of the Qwen-VLs only Qwen3-VL has a "
                      "mixture-of-experts release (Qwen3-VL-MoE)", hint)
    cls_name, arch = _QWEN_VL["qwen3_vl_moe" if moe else kind]
    vision.pop("model_type")
    if kind == "qwen2_5_vl":  # HF: an integer, read by the video positions
        tps = lm_p.get("mrope_tokens_per_second")
        if tps is None or float(tps) != int(tps):
            raise _refuse("model.params.mrope_tokens_per_second", f"{tps!r}: Qwen2.5-VL steps a video's temporal "
                          "positions by vision_config.tokens_per_second, an integer", "set it (2 in the releases)")
        vision["tokens_per_second"] = int(tps)

    head_dim = lm_p["head_dim"] or lm_p["hidden_size"] // lm_p["num_heads"]
    text: dict[str, Any] = dict(
        vocab_size=lm_p["vocab_size"], hidden_size=lm_p["hidden_size"],
        intermediate_size=lm_p["ffn_hidden_size"] or 4 * lm_p["hidden_size"], num_hidden_layers=lm_p["num_layers"],
        num_attention_heads=lm_p["num_heads"], num_key_value_heads=lm_p["num_kv_heads"] or lm_p["num_heads"],
        hidden_act=_HF_ACT.get(lm_p["activation"] or "silu", lm_p["activation"]),
        max_position_embeddings=lm_p["max_seq_len"], rms_norm_eps=lm_p["norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": float(lm_p["rope_theta"]),
                         "mrope_section": [int(v) for v in lm_p["mrope_section"]],
                         **({"mrope_interleaved": True} if kind == "qwen3_vl" else {})})
    if kind == "qwen3_vl":
        text.update(head_dim=head_dim, attention_bias=bool(lm_p["attention_bias"]))
    if moe:  # Qwen3-VL-MoE's router always renormalises its top-k: norm_topk_prob false is refused below
        aux = float(lm_p.get("router_aux_loss_weight") or 0.0)
        text.update(num_experts=lm_p["num_experts"], num_experts_per_tok=lm_p["num_experts_per_tok"],
                    moe_intermediate_size=lm_p.get("moe_ffn_hidden_size") or text["intermediate_size"],
                    decoder_sparse_step=lm_p.get("decoder_sparse_step") or 1,
                    mlp_only_layers=sorted(lm_p.get("mlp_only_layers") or []), output_router_logits=aux > 0,
                    router_aux_loss_coef=aux if aux > 0 else 0.001)
    else:
        text.update(use_sliding_window=False)
    vocab = lm_p["vocab_size"]
    text_extra = dict(extras.get("text_config") or {})
    for key, default in (("bos_token_id", _QWEN_BOS), ("eos_token_id", _QWEN_EOS), ("pad_token_id", None)):
        text[key] = text_extra[key] if key in text_extra else (default if default is not None and default < vocab
                                                                else None)
    image_id = mod.special_token_id
    video_id = model.modalities[videos[0]].special_token_id if videos else image_id + 1
    top = {"vision_start_token_id": image_id + _QWEN_VISION_START_OFFSET,
           "vision_end_token_id": image_id + _QWEN_VISION_END_OFFSET}
    top.update({k: extras[k] for k in HF_CONFIG_KEYS if extras.get(k) is not None})
    config = _hf_config(cls_name, dtype, arch, text_config=text, vision_config=vision, image_token_id=image_id,
                        video_token_id=video_id, tie_word_embeddings=lm_p["tie_embeddings"], **top)

    # The config, read back as import_hf reads it, must give this very model.
    try:
        back_lm = hw.gpt_params_from_hf(config)
        back_enc, back_merger = hq.vision_params_from_hf(config.vision_config)
    except ValueError as e:  # e.g. an activation Hugging Face has no name for
        raise _refuse("model", str(e), hint) from None
    if kind == "qwen2_5_vl":
        back_lm["mrope_tokens_per_second"] = float(config.vision_config.tokens_per_second)
    if kind == "qwen3_vl":
        back_lm["mrope_frames_as_items"] = True
    bad = _differences(_gpt_canonical(lm_p), _gpt_canonical({k: v for k, v in back_lm.items() if v is not None}),
                       "model.params")
    ignore = ("backend", "max_patches")  # how it runs; a budget of ours
    enc_path = f"{path}.submodules.encoders.{enc_name}.params"
    ours_enc = {k: v for k, v in enc_p.items() if k not in ignore}
    back_full = {k: v for k, v in _full_params(QwenViT, back_enc).items() if k not in ignore}
    bad += _differences(ours_enc, back_full, enc_path)
    bad += _differences(merger_p, _full_params(PatchMerger, back_merger),
                        f"{path}.submodules.input_projections.{enc_name}.params")
    if len(deep) != len(enc_p.get("deepstack_layers") or []):
        bad.append(f"{path}.submodules.deepstack_projections: {len(deep)} for "
                   f"{len(enc_p.get('deepstack_layers') or [])} deepstack_layers")
    want = _full_params(PatchMerger, hq.deepstack_merger_params(back_merger))
    for j, d in enumerate(deep_nodes):
        bad += _differences(_full_params(PatchMerger, dict(d.params)), want,
                            f"{path}.submodules.deepstack_projections.{j}.params")
    if bad:
        raise _refuse(bad[0].split(":")[0], f"{'; '.join(bad[:6])}" + (f" ... ({len(bad)} in all)" if len(bad) > 6
                                                                       else ""),
                      f"no {arch} computes this model: {hint}")

    # model.* + lm_head: the Hub layout of Qwen2(.5)-VL; Qwen3-VL-MoE's experts fused and transposed, as released,
    # unless they are square (hidden = 2 x expert width): transformers tells a transposed tensor by its shape, so
    # those are written as it holds them, the orientation it loads as stored
    layout = None
    if moe:
        _, two_f, h = hw.fused_expert_shapes(lm_p)["experts.gate_up_proj"]
        layout = "fused" if two_f == h else "fused_t"
        if layout == "fused":
            warnings.warn(f"export_hf: the fused expert tensors are square (hidden size {h} = 2 x expert width), "
                          "so they are written as transformers holds them, (E, 2F, H) and (E, H, F), which it "
                          "loads unambiguously; Qwen's releases store them transposed", stacklevel=2)
    tensors = _lm_tensors(model.language_model, lm_p, moe_layout=layout)
    visual = "visual."
    if kind == "qwen3_vl":  # Qwen3-VL checkpoints are published in transformers 5's layout
        tensors = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
                   for k, v in tensors.items()}
        visual = "model.visual."
    tensors.update(hq.vision_state_dict_to_hf(vit.state_dict(), proj.state_dict(), [d.state_dict() for d in deep],
                                              encoder_params=enc_p, prefix=visual))
    return config, tensors


def _check_matches(model: nn.Module, reference: nn.Module) -> None:
    """The config must describe this very model: same tensor names and shapes."""
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    bad = [f"{k}: model {ours.get(k)}, config {ref.get(k)}" for k in sorted(set(ours) | set(ref))
           if ours.get(k) != ref.get(k)]
    if bad:
        raise ConfigError(Problem("cfg", f"the config does not describe this model: {'; '.join(bad[:8])}"
                                  + (f" ... ({len(bad)} in all)" if len(bad) > 8 else ""),
                                  "pass the config the model was built from (or None to use model.spec)"))


def export_hf(model: nn.Module, cfg: Any, out_dir: str | Path, *, overwrite: bool = False,
              max_shard_size: int | None = None, adapters: str = "merge") -> Path:
    """Write ``model`` as a Hugging Face checkpoint directory; returns ``out_dir``.

    A model with LoRA / DoRA adapters (:mod:`mimo_spec.peft`): ``adapters="merge"`` folds them into
    the weights (a plain checkpoint of the fine-tuned model); ``adapters="peft"`` writes only the
    adapters in PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``, Hugging Face
    module names, one adapter per q/k/v and gate/up part), which
    ``peft.PeftModel.from_pretrained(<the transformers model>, out_dir)`` loads; the ``trainable``
    modules (whole Hugging Face modules) go in as PEFT's ``modules_to_save``.

    Args:
        model: a MimoModel (text-only, LLaVA- or Qwen-VL-shaped), a ClipViT, a Siglip2NaFlex or a
            WhisperEncoder.
        cfg: the config it was built from (run config, dict, YAML path; for a lone
            encoder its node ``{module, params}``). None uses ``model.spec``.
        out_dir: created if missing; existing files are replaced only with ``overwrite``.
        max_shard_size: bytes per safetensors shard (None: one model.safetensors).

    Tensors are written one at a time (no second copy of the model); nothing lands
    in ``out_dir`` unless everything was written.
    """
    from mimo_spec.builders.build import _skip_init, build_model, build_module
    from mimo_spec.components.audio.whisper import WhisperEncoder
    from mimo_spec.components.vision.clip_vit import ClipViT
    from mimo_spec.components.vision.siglip2 import Siglip2NaFlex
    from mimo_spec.models.mimo import MimoModel
    from mimo_spec.spec import MimoSpec, ModuleSpec, from_config, load_config

    first = next(iter(model.state_dict().values()), None)
    if first is None or first.is_meta:
        raise ConfigError("the model has no weights (built on the meta device?)", path="model",
                          hint="load or train weights before exporting")
    from mimo_spec import peft

    if adapters not in ("merge", "peft"):
        raise ConfigError(f"adapters={adapters!r}: expected 'merge' or 'peft'", path="adapters")
    if peft.has_adapters(model) or adapters == "peft":
        return _export_adapted(model, cfg, out_dir, overwrite, max_shard_size, adapters)
    dtype = hw.main_dtype(model.parameters())
    if isinstance(model, MimoModel):
        spec = model.spec if cfg is None else from_config(cfg)
        if spec.adapters or spec.trainable:  # here the adapters are merged or detached (_export_adapted)
            spec = _without_adapters(spec)
        _check_matches(model, build_model(spec, device="meta"))
        extras = {} if cfg is None or isinstance(cfg, MimoSpec) else (load_config(cfg).get("hf_config") or {})
        config, tensors = _mimo(model, spec, dtype, extras if isinstance(extras, dict) else {})
    elif isinstance(model, (ClipViT, WhisperEncoder, Siglip2NaFlex)):
        node = getattr(model, "spec", None) if cfg is None else cfg
        if node is None:
            raise ConfigError("a lone encoder needs its config node", path="cfg",
                              hint="pass {module: ..., params: {...}}, as import_hf returned it")
        node = node if isinstance(node, ModuleSpec) else ModuleSpec(**{k: v for k, v in load_config(node).items()
                                                                       if k in ("module", "params")})
        with _skip_init(True):
            _check_matches(model, build_module(node, kind="encoder", device="meta"))
        p = _full_params(type(model), dict(node.params))
        if isinstance(model, ClipViT):
            config, _ = _vit_config(p, dtype, "params", True)
            tensors = _vit_tensors(model, p, "vision_model.")
        elif isinstance(model, Siglip2NaFlex):
            config = _siglip2_config(p, dtype, "params")
            tensors = _siglip2_tensors(model, p, "vision_model.")
        else:
            config = _whisper_config(p, dtype, "params")
            tensors = hw.whisper_encoder_state_dict_to_hf(model.state_dict(), p)
    else:
        raise ConfigError(f"cannot export a {type(model).__name__}", path="model",
                          hint="export a MimoModel, a ClipViT, a Siglip2NaFlex or a WhisperEncoder")

    def write(tmp: Path) -> None:
        config.to_json_file(str(tmp / "config.json"), use_diff=False)  # every value: no default drift
        _write_weights(tmp, tensors, max_shard_size)

    return publish(out_dir, write, overwrite=overwrite, stale=("model*.safetensors", "model.safetensors.index.json"),
                   expect=("config.json", "model.safetensors", "model.safetensors.index.json"))


def _write_weights(directory: Path, tensors: dict[str, torch.Tensor], max_shard_size: int | None) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_size and shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    if len(shards) == 1:
        write_safetensors(directory / "model.safetensors", shards[0])
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(directory / name, shard)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# --------------------------------------------------------------------------- adapters (mimo_spec.peft)


def _without_adapters(spec):
    from dataclasses import replace

    return replace(spec, adapters=[], trainable=[])


def _export_adapted(model: nn.Module, cfg: Any, out_dir: str | Path, overwrite: bool, max_shard_size: int | None,
                    mode: str) -> Path:
    """export_hf of a model with adapters: merged into the weights, or PEFT's adapter files."""
    from mimo_spec import peft
    from mimo_spec.models.mimo import MimoModel
    from mimo_spec.spec import MimoSpec, from_config, load_config

    if not isinstance(model, MimoModel):
        raise ConfigError(f"adapters export a MimoModel, not a {type(model).__name__}", path="model")
    if not peft.has_adapters(model):
        raise ConfigError("adapters='peft': the model has no adapters", path="adapters",
                          hint="add them with mimo_spec.peft.add_adapters (or adapters: in the config)")
    spec = _without_adapters(model.spec if cfg is None else from_config(cfg))
    extras = {} if cfg is None or isinstance(cfg, MimoSpec) else (load_config(cfg).get("hf_config") or {})
    extras = extras if isinstance(extras, dict) else {}
    if mode == "merge":
        with peft.base_view(model, merge=True):
            return export_hf(model, cfg, out_dir, overwrite=overwrite, max_shard_size=max_shard_size)
    dtype = hw.main_dtype(model.parameters())
    with peft.base_view(model, merge=False):
        config, names = _probe_hf_rows(model, spec, dtype, extras)
        saved_modules = _trained_hf_tensors(model, spec, dtype, extras)  # `trainable` modules, whole
    module_names, key_names = _hf_module_names(config)
    kinds = {ad.kind for _, _, ad in peft.adapters_of(model)}
    if len(kinds) > 1:
        raise ConfigError("adapters='peft': PEFT's LoRA config is all LoRA or all DoRA, this model mixes them",
                          path="adapters", hint="export adapters='merge'")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    dropouts = set()
    by_hub: dict[str, list] = {}  # Hugging Face Linear -> the adapter parts whose rows it holds
    for name, lin, ad in peft.adapters_of(model):
        dropouts.add(ad.dropout.p if isinstance(ad.dropout, nn.Dropout) else 0.0)
        for part in ad.parts:
            hub, index, positions = names[(name, part)]
            by_hub.setdefault(hub, []).append((name, part, ad, index, positions))
    for hub, parts in by_hub.items():
        name, part, ad = parts[0][:3]
        target = module_names(hub)
        if target is None:
            raise ConfigError(f"{name}{'.' + part if part else ''}: Hugging Face's {hub} is no Linear module of "
                              f"{type(config).__name__}'s model", path="adapters")
        prefix = f"base_model.model.{target}"
        # one adapter per Hugging Face Linear: the parts it fuses (each rank r, its own A and B) side by side, a
        # rank sum(r) adapter with a block-diagonal B, exactly ours (each row sees only its part's A); DoRA's
        # magnitudes are per row either way. The scaling alpha / r stays: alpha grows with the rank.
        rows = sum(len(x[4]) for x in parts)
        a_all, b_all, m_all = [], torch.zeros(0), None
        rank = sum(x[2].rank for x in parts)
        for name_, part_, ad_, index, positions in parts:
            a = peft._full(ad_.tensor("lora_A", part_)).detach()
            b = peft._full(ad_.tensor("lora_B", part_)).detach()
            if not a_all:
                b_all = b.new_zeros(rows, rank)
                if ad.dora:
                    m_all = b.new_zeros(rows)
            offset = sum(x.shape[0] for x in a_all)
            a_all.append(a)
            b_all[positions, offset:offset + a.shape[0]] = b[index]
            if ad.dora:
                m_all[positions] = peft._full(ad_.tensor("magnitude", part_)).detach()[index]
        tensors[f"{prefix}.lora_A.weight"] = torch.cat(a_all).contiguous().cpu()
        tensors[f"{prefix}.lora_B.weight"] = b_all.contiguous().cpu()
        if ad.dora:
            tensors[f"{prefix}.lora_magnitude_vector"] = m_all.contiguous().cpu()
        ranks[target], alphas[target] = rank, float(ad.alpha) * rank / ad.rank
    if len(dropouts) > 1:
        raise ConfigError("adapters='peft': PEFT's LoRA config has one dropout, the entries differ", path="adapters")
    modules_to_save = set()
    for hub_key, tensor in saved_modules.items():  # PEFT's modules_to_save: base_model.model.<module>.<param>
        key = key_names(hub_key)
        if key is None:
            raise ConfigError(f"adapters='peft': the trained tensor {hub_key} has no place in "
                              f"{type(config).__name__}'s model", path="trainable", hint="export adapters='merge'")
        module = key.rpartition(".")[0]
        if module in ranks:
            raise ConfigError(f"adapters='peft': {module} both has an adapter and trains in full (trainable); PEFT "
                              "keeps one of them per module", path="trainable", hint="export adapters='merge'")
        modules_to_save.add(module)
        tensors[f"base_model.model.{key}"] = tensor.detach().contiguous().cpu()
    from peft import LoraConfig

    first = next(iter(ranks))
    same = len(set(ranks.values())) == 1 and len(set(alphas.values())) == 1
    lora = LoraConfig(r=ranks[first], lora_alpha=alphas[first], lora_dropout=dropouts.pop(), bias="none",
                      use_dora=kinds == {"dora"}, target_modules=sorted(ranks),
                      rank_pattern={} if same else dict(ranks), alpha_pattern={} if same else dict(alphas),
                      modules_to_save=sorted(modules_to_save) or None)

    def write(tmp: Path) -> None:
        lora.save_pretrained(str(tmp))
        write_safetensors(tmp / "adapter_model.safetensors", tensors)

    return publish(out_dir, write, overwrite=overwrite, expect=("adapter_config.json", "adapter_model.safetensors"))


def _trained_hf_tensors(model: nn.Module, spec, dtype: torch.dtype, extras: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The Hub-layout tensors of every Hugging Face module that holds a ``trainable`` (non-adapter) parameter, all
    of that module's tensors: found by exporting twice, the trainable parameters shifted the second time."""
    trained = [p for p in model.parameters() if p.requires_grad]
    if not trained:
        return {}
    def sums(tensors):  # the export's tensors may be views of the parameters: compared by their sums
        return {k: (float(v.double().sum()), float(v.double().abs().sum())) for k, v in tensors.items()}

    _, plain = _mimo(model, spec, dtype, extras)
    before = sums(plain)
    with torch.no_grad():
        kept = [p.detach().clone() for p in trained]
        try:
            for p in trained:
                p.add_(1.0)
            after = sums(_mimo(model, spec, dtype, extras)[1])
        finally:
            for p, k in zip(trained, kept):
                p.copy_(k)
    changed = {k for k in before if after.get(k, before[k]) != before[k]}
    modules = {k.rpartition(".")[0] for k in changed}
    return {k: v for k, v in plain.items() if k.rpartition(".")[0] in modules}


def _probe_hf_rows(model: nn.Module, spec, dtype: torch.dtype, extras: dict[str, Any]):
    """Where each adapted Linear's parts land in the Hugging Face export: {(our Linear, part): (HF module name
    (Hub layout), index: HF row j holds our part's row index[j])}, found by exporting probe weights through the
    family's own tables (every code path that renames, splits or reorders rows is the real one). Returns
    (HF config, that map). The weights are restored afterwards."""
    from mimo_spec import peft

    adapted = []
    for name, mod in model.named_modules():
        ad = getattr(mod, "_peft_detached", None)
        if ad is not None:
            adapted.append((name, mod, ad))
    code, where, saved = 1, {}, []
    try:
        for name, lin, ad in adapted:
            out, inp = lin.weight.shape
            probe = torch.zeros(out, inp, dtype=torch.float32, device=lin.weight.device)
            start = 0
            for part, rows in zip(ad.parts, [peft._full(ad.tensor("lora_B", p)).shape[0] for p in ad.parts]):
                probe[start:start + rows, 0] = torch.arange(code, code + rows, dtype=torch.float32)
                probe[start, 1:] = -torch.arange(1, inp, dtype=torch.float32)
                for r in range(rows):
                    where[code + r] = (name, part, r)
                code += rows
                start += rows
            if code >= 2**24:
                raise ConfigError("adapters='peft': too many adapted rows to locate in the export", path="adapters")
            saved.append((lin, lin.weight))
            lin.weight = nn.Parameter(probe, requires_grad=False)
        config, tensors = _mimo(model, spec, dtype, extras)
    finally:
        for lin, w in saved:
            lin.weight = w
    found: dict[tuple[str, str], tuple[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if t.dim() != 2 or not key.endswith(".weight") or t.shape[1] < 1:
            continue
        col = t[:, 0].detach().float().cpu()
        hits = [where.get(int(c)) if c > 0 and float(c).is_integer() else None for c in col.tolist()]
        if not any(hits):
            continue
        row = t[0].detach().float().cpu().tolist()
        if t.shape[0] > 1 and hits[0] is not None and all(h is None for h in hits[1:]) and all(
                c > 0 and float(c).is_integer() and where.get(int(c)) for c in row):
            raise ConfigError(f"adapters='peft': Hugging Face's {key} stores its weight transposed (in x out, as "
                              "GPT-2's Conv1D does), which this export does not write PEFT adapters for",
                              path="adapters", hint="export adapters='merge'")
        owners = {(h[0], h[1]) for h in hits if h is not None}
        if len({o[0] for o in owners}) != 1 or any(h is None for h in hits):
            raise ConfigError(f"adapters='peft': Hugging Face's {key} mixes rows of {sorted(owners)} and others: no "
                              "separate adapter can equal ours", path="adapters", hint="export adapters='merge'")
        # one Linear's rows; several of its parts when Hugging Face fuses them too (Qwen2-VL's vision qkv)
        cols = t.shape[1]
        for owner in owners:
            positions = [j for j, h in enumerate(hits) if (h[0], h[1]) == owner]
            index = torch.tensor([hits[j][2] for j in positions])
            first = t[positions[int((index == 0).nonzero()[0])]] if (index == 0).any() else None
            if first is None or cols > 1 and not torch.equal(first[1:].float().cpu(), -torch.arange(1, cols).float()):
                raise ConfigError(f"adapters='peft': Hugging Face's {key} reorders the inputs of {owner[0]}",
                                  path="adapters", hint="export adapters='merge'")
            found[owner] = (key[: -len(".weight")], index, torch.tensor(positions))
    for name, _, ad in adapted:
        for part in ad.parts:
            if (name, part) not in found:
                raise ConfigError(f"adapters='peft': {name}{' part ' + part if part else ''} has no Linear of its own "
                                  "in the Hugging Face export", path="adapters", hint="export adapters='merge'")
            rows = peft._full(ad.tensor("lora_B", part)).shape[0]
            if sorted(found[(name, part)][1].tolist()) != list(range(rows)):
                raise ConfigError(f"adapters='peft': {name} {part}: its rows are spread over several Hugging Face "
                                  "tensors", path="adapters", hint="export adapters='merge'")
    return config, found


def _hf_key_renamer(hf: nn.Module):
    """The renaming transformers applies to a Hub-layout key when ``from_pretrained`` loads it into ``hf``
    (transformers 5's conversion mapping); None where this transformers has none."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        conversions = get_model_conversion_mapping(hf)
    except (ImportError, AttributeError, TypeError):
        return lambda key: None
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    meta = hf.state_dict()

    def rename(key: str) -> str | None:
        try:
            return rename_source_key(key, renamings, converters, getattr(hf, "base_model_prefix", None), meta)[0]
        except Exception:  # noqa: BLE001 - an internal API: the name heuristics then decide
            return None

    return rename


def _hf_module_names(config):
    """(Linear resolver, key resolver) for the transformers model ``config`` builds (on the meta device): a
    Hub-layout module name -> that Linear's module name, a Hub-layout tensor key -> its state-dict key
    (transformers 5 renames some prefixes on load: ``language_model.model.layers`` -> ``model.language_model.layers``),
    None when there is none."""
    import transformers

    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ConfigError(f"adapters='peft': no transformers class {arch!r}", path="adapters")
    with torch.device("meta"):
        hf = cls(config)
    skip = {"model", "language_model"}
    linears = {name for name, mod in hf.named_modules() if isinstance(mod, nn.Linear)}
    keys = set(hf.state_dict())
    by_norm: dict[tuple[str, ...], list[str]] = {}
    for key in keys:
        by_norm.setdefault(tuple(t for t in key.split(".") if t not in skip), []).append(key)
    rename = _hf_key_renamer(hf)

    def resolve_key(hub_key: str) -> str | None:
        if hub_key in keys:
            return hub_key
        renamed = rename(hub_key)
        if renamed in keys:
            return renamed
        hits = by_norm.get(tuple(t for t in hub_key.split(".") if t not in skip), [])
        return hits[0] if len(hits) == 1 else None

    def resolve(hub: str) -> str | None:
        key = resolve_key(hub + ".weight")
        module = key[: -len(".weight")] if key is not None and key.endswith(".weight") else None
        return module if module in linears else None

    return resolve, resolve_key
