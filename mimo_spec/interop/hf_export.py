"""Export to the Hugging Face layout: ``config.json`` + ``model.safetensors`` that
``from_pretrained`` loads with no missing or unexpected keys.

What can be exported (anything else is a ConfigError that says why):

- a text-only model whose gpt is Llama-shaped (-> LlamaForCausalLM), Qwen2-shaped
  (bias on q/k/v only -> Qwen2ForCausalLM) or GPT-2-shaped (-> GPT2LMHeadModel);
- a LLaVA-shaped model: that LM plus one ``images`` modality with one clip_vit
  encoder and a 2-layer mlp projector (-> LlavaForConditionalGeneration);
- a lone clip_vit (-> CLIPVisionModel or SiglipVisionModel) or whisper_encoder
  (-> transformers' WhisperEncoder).

The tensor names follow the Hugging Face Hub layout (``vision_model.``,
``language_model.model.``), which every transformers version loads. A vision
tower built without ``keep_unused_layers`` is exported with just the blocks it
has (the feature layer becomes the last one, so the outputs are the same) and an
identity-initialised post-layernorm, which LLaVA never reads.
"""

from __future__ import annotations

import inspect
import json
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
        raise _refuse(path, f"mrope_section={p['mrope_section']}: M-RoPE language models (Qwen2-VL's) are not "
                            "exported yet", "export it without model.params.mrope_section only if it was trained "
                            "on text (B, S) positions")
    if (p["position_embedding"], p["norm"], p["mlp"]) != ("rope", "rmsnorm", "swiglu"):
        raise _refuse(path, f"position_embedding={p['position_embedding']}, norm={p['norm']}, mlp={p['mlp']} "
                            "match no Hugging Face model", "Llama/Qwen2 need rope + rmsnorm + swiglu; "
                            "GPT-2 needs learned + layernorm + gelu")
    common = dict(vocab_size=p["vocab_size"], hidden_size=p["hidden_size"], intermediate_size=ffn,
                  num_hidden_layers=p["num_layers"], num_attention_heads=p["num_heads"], num_key_value_heads=kv,
                  head_dim=head_dim, hidden_act=_HF_ACT[act], max_position_embeddings=p["max_seq_len"],
                  rms_norm_eps=p["norm_eps"], tie_word_embeddings=p["tie_embeddings"])
    import transformers

    rope = ({"rope_parameters": {"rope_type": "default", "rope_theta": p["rope_theta"]}}
            if "rope_parameters" in inspect.signature(transformers.LlamaConfig.__init__).parameters
            else {"rope_theta": p["rope_theta"]})
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


def _lm_tensors(lm: nn.Module, p: dict[str, Any], legacy_prefix: str = "") -> dict[str, torch.Tensor]:
    """GPT -> HF keys; ``legacy_prefix="language_model."`` for LLaVA's Hub layout."""
    out = hw.gpt_state_dict_to_hf(lm.state_dict(), p)
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
    if p["layer_norm_eps"] != 1e-5:
        raise _refuse(path, f"layer_norm_eps {p['layer_norm_eps']}: Hugging Face's Whisper uses 1e-5")
    return _hf_config("WhisperConfig", dtype, "WhisperEncoder", d_model=p["hidden_size"],
                      encoder_layers=p["num_layers"], encoder_attention_heads=p["num_heads"],
                      encoder_ffn_dim=p["ffn_hidden_size"], decoder_layers=p["num_layers"],
                      decoder_attention_heads=p["num_heads"], decoder_ffn_dim=p["ffn_hidden_size"],
                      num_mel_bins=p["num_mel_bins"], max_source_positions=p["max_source_positions"],
                      activation_function=_HF_ACT[p["activation"]])


# --------------------------------------------------------------------------- whole models


def _params_of(node, cls: type) -> dict[str, Any]:
    return _full_params(cls, dict(node.params))


def _mimo(model: nn.Module, spec, dtype: torch.dtype):
    """(HF config, HF tensors) for a MimoModel."""
    from mimo_spec.components.language.gpt import GPT
    from mimo_spec.components.projectors import MLPProjector
    from mimo_spec.components.vision.clip_vit import ClipViT

    if not isinstance(model.language_model, GPT):
        raise _refuse("model.module", f"the language model is a {type(model.language_model).__name__}, not gpt")
    lm_p = _params_of(spec.language_model, GPT)
    text_config = _lm_config(lm_p, dtype, "model.params")
    if not model.modalities:
        return text_config, _lm_tensors(model.language_model, lm_p)
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
              max_shard_size: int | None = None) -> Path:
    """Write ``model`` as a Hugging Face checkpoint directory; returns ``out_dir``.

    Args:
        model: a MimoModel (text-only or LLaVA-shaped), a ClipViT or a WhisperEncoder.
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
    from mimo_spec.models.mimo import MimoModel
    from mimo_spec.spec import ModuleSpec, from_config, load_config

    first = next(iter(model.state_dict().values()), None)
    if first is None or first.is_meta:
        raise ConfigError("the model has no weights (built on the meta device?)", path="model",
                          hint="load or train weights before exporting")
    dtype = hw.main_dtype(model.parameters())
    if isinstance(model, MimoModel):
        spec = model.spec if cfg is None else from_config(cfg)
        _check_matches(model, build_model(spec, device="meta"))
        config, tensors = _mimo(model, spec, dtype)
    elif isinstance(model, (ClipViT, WhisperEncoder)):
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
        else:
            config = _whisper_config(p, dtype, "params")
            tensors = hw.whisper_encoder_state_dict_to_hf(model.state_dict(), p)
    else:
        raise ConfigError(f"cannot export a {type(model).__name__}", path="model",
                          hint="export a MimoModel, a ClipViT or a WhisperEncoder")

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
