"""Hugging Face VQ-VAEs and audio codecs -> mimo-spec tokenizer components.

``tokenizer_from_hf(source) -> (module_name, params, state_dict)``: ``source`` is a transformers model
(JanusVQVAE, ChameleonVQVAE, Emu3VQVAE, EncodecModel, DacModel, MimiModel, or a whole Janus / Chameleon /
Emu3 model, whose ``model.vqmodel`` is taken) or a local checkpoint folder of one (config.json + safetensors; pickled weights
are never read). ``{"module": module_name, "params": params}`` builds the component (``build_module(...,
kind="tokenizer")`` or a modality's ``tokenizer`` submodule) and ``state_dict`` loads into it as it is: the
components hold transformers' own classes, so the keys are the same (old checkpoints' ``weight_g`` /
``weight_v`` weight-norm names are renamed to transformers 5's parametrizations, and Mimi's flat checkpoint
keys to MimiModel's nested ones, as transformers renames them when loading).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mimo_spec.errors import InputError

# model_type of the tokenizer's own config -> our registered name
TOKENIZER_TYPES = {"janus_vqgan": "janus_vq", "chameleon_vqgan": "chameleon_vq", "emu3_vqgan": "emu3_vq",
                   "encodec": "encodec", "dac": "dac", "mimi": "mimi"}
# whole models holding a VQ-VAE at model.vqmodel (config.vq_config)
_WHOLE = {"janus": "model.vqmodel.", "chameleon": "model.vqmodel.", "emu3": "model.vqmodel."}
_WEIGHT_NORM = ((re.compile(r"\.weight_g$"), ".parametrizations.weight.original0"),
                (re.compile(r"\.weight_v$"), ".parametrizations.weight.original1"))
# Mimi checkpoints are flat; transformers' MimiModel nests the halves (encoder.encoder_seanet, ...)
_MIMI_FLAT = ((re.compile(r"^encoder\.layers\."), "encoder.encoder_seanet.layers."),
              (re.compile(r"^encoder_transformer\."), "encoder.encoder_transformer."),
              (re.compile(r"^downsample\."), "encoder.downsample."),
              (re.compile(r"^decoder\.layers\."), "decoder.decoder_seanet.layers."),
              (re.compile(r"^decoder_transformer\."), "decoder.decoder_transformer."),
              (re.compile(r"^upsample\."), "decoder.upsample."))


def _levels(mult: Any) -> list[int]:
    return [int(m) for m in mult]


def tokenizer_params_from_hf(config: Any, where: str = "config", image_size: int | None = None) -> tuple[str, dict]:
    """(registered name, params) for a tokenizer config (JanusVQVAEConfig, ... EncodecConfig, DacConfig).
    ``image_size``: Emu3's VQ takes images of any size, its config names none (default 512)."""
    mt = getattr(config, "model_type", None)
    if mt not in TOKENIZER_TYPES:
        raise InputError(f"unsupported tokenizer model type {mt!r}", path=where,
                         hint=f"supported: {', '.join(TOKENIZER_TYPES)} (or a whole {', '.join(_WHOLE)} model)")
    c = config
    if mt in ("janus_vqgan", "chameleon_vqgan", "emu3_vqgan") and getattr(c, "double_latent", False):
        raise InputError("double_latent VQ-VAEs are not supported", path=where)
    if mt == "janus_vqgan":
        mult = _levels(c.channel_multiplier)
        return "janus_vq", {
            "image_size": int(c.num_patches) * 2 ** (len(mult) - 1), "codebook_size": c.num_embeddings,
            "embed_dim": c.embed_dim, "latent_channels": c.latent_channels, "in_channels": c.in_channels,
            "out_channels": c.out_channels, "base_channels": c.base_channels, "channel_multiplier": mult,
            "num_res_blocks": c.num_res_blocks}
    if mt == "chameleon_vqgan":
        attn = list(c.attn_resolutions) if c.attn_resolutions and c.attn_type == "vanilla" else None
        return "chameleon_vq", {
            "image_size": c.resolution, "codebook_size": c.num_embeddings, "embed_dim": c.embed_dim,
            "latent_channels": c.latent_channels, "in_channels": c.in_channels, "base_channels": c.base_channels,
            "channel_multiplier": _levels(c.channel_multiplier), "num_res_blocks": c.num_res_blocks,
            "attn_resolutions": attn}
    if mt == "emu3_vqgan":
        mult = _levels(c.channel_multiplier)
        if c.hidden_size != c.base_channels * mult[-1]:
            raise InputError(f"hidden_size {c.hidden_size} != base_channels * channel_multiplier[-1] "
                             f"({c.base_channels * mult[-1]}): not supported", path=where)
        return "emu3_vq", {
            "image_size": int(image_size or 512), "codebook_size": c.codebook_size, "embed_dim": c.embed_dim,
            "latent_channels": c.latent_channels, "in_channels": c.in_channels, "out_channels": c.out_channels,
            "temporal_downsample_factor": c.temporal_downsample_factor, "base_channels": c.base_channels,
            "channel_multiplier": mult, "num_res_blocks": c.num_res_blocks,
            "attn_resolutions": [int(a) for a in c.attn_resolutions], "num_attention_heads": c.num_attention_heads}
    if mt == "encodec":
        if c.audio_channels != 1 or c.normalize or c.chunk_length_s is not None:
            raise InputError("only the mono, unnormalised, whole-clip EnCodec layout (encodec_24khz) is supported; "
                             f"got audio_channels={c.audio_channels}, normalize={c.normalize}, "
                             f"chunk_length_s={c.chunk_length_s}", path=where)
        keys = ("sampling_rate", "hidden_size", "num_filters", "num_residual_layers", "norm_type", "kernel_size",
                "last_kernel_size", "residual_kernel_size", "dilation_growth_rate", "use_causal_conv", "pad_mode",
                "compress", "num_lstm_layers", "trim_right_ratio", "codebook_size", "codebook_dim",
                "use_conv_shortcut")
        params = {k: getattr(c, k) for k in keys}
        bands = [float(b) for b in c.target_bandwidths]
        params.update(target_bandwidths=bands, bandwidth=bands[0], upsampling_ratios=_levels(c.upsampling_ratios))
        return "encodec", params
    if mt == "mimi":
        if getattr(c, "audio_channels", 1) != 1:
            raise InputError(f"audio_channels {c.audio_channels}: only mono Mimi is supported", path=where)
        rope = getattr(c, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise InputError(f"rope_parameters {rope}: only the default rotary embedding is supported", path=where)
        keys = ("sampling_rate", "num_quantizers", "num_semantic_quantizers", "codebook_size", "codebook_dim",
                "vector_quantization_hidden_dimension", "hidden_size", "num_filters", "num_residual_layers",
                "kernel_size", "last_kernel_size", "residual_kernel_size", "dilation_growth_rate", "use_causal_conv",
                "pad_mode", "compress", "trim_right_ratio", "use_conv_shortcut", "upsample_groups",
                "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "hidden_act", "max_position_embeddings", "norm_eps", "sliding_window", "layer_scale_initial_scale",
                "attention_bias")
        params = {k: getattr(c, k) for k in keys}
        params.update(upsampling_ratios=_levels(c.upsampling_ratios), rope_theta=float(rope.get("rope_theta", 10000.0)),
                      num_codebooks=None)
        return "mimi", params
    return "dac", {  # dac
        "sampling_rate": c.sampling_rate, "encoder_hidden_size": c.encoder_hidden_size,
        "downsampling_ratios": _levels(c.downsampling_ratios), "decoder_hidden_size": c.decoder_hidden_size,
        "num_codebooks": c.n_codebooks, "codebook_size": c.codebook_size, "codebook_dim": c.codebook_dim}


def _rename(key: str, name: str) -> str:
    for pattern, new in _WEIGHT_NORM + (_MIMI_FLAT if name == "mimi" else ()):
        key = pattern.sub(new, key)
    return key


def _read_folder(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from mimo_spec.interop.hf_safetensors import HFCheckpoint

    ckpt = HFCheckpoint(path)  # checks config.json, the index and the shard names; refuses pickles
    state: dict[str, torch.Tensor] = {}
    for file in ckpt.files:
        for k, v in load_file(str(file)).items():
            if k.startswith(prefix):
                state[k[len(prefix):]] = v
    return state


def tokenizer_from_hf(source: Any, *, image_size: int | None = None
                      ) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """``(module_name, params, state_dict)`` of a Hugging Face tokenizer (see the module docstring).

    ``image_size``: Emu3's VQ-VAE only (its config names no image size; default 512)."""
    if isinstance(source, (str, Path)):
        from mimo_spec.interop.hf_import import _auto_config

        path = Path(source)
        where = str(path / "config.json")
        from mimo_spec.interop.hf_safetensors import HFCheckpoint

        model_type = HFCheckpoint(path).config.get("model_type")
        if model_type not in TOKENIZER_TYPES and model_type not in _WHOLE:
            raise InputError(f"unsupported tokenizer model type {model_type!r}", path=where,
                             hint=f"supported: {', '.join(TOKENIZER_TYPES)} (or a whole {', '.join(_WHOLE)} model)")
        config = _auto_config(path)
        prefix = ""
        if model_type in _WHOLE:
            config, prefix = config.vq_config, _WHOLE[model_type]
        name, params = tokenizer_params_from_hf(config, where, image_size)
        state = _read_folder(path, prefix)
    elif isinstance(source, nn.Module) and hasattr(getattr(source, "config", None), "model_type"):
        where = type(source).__name__
        model = source
        if source.config.model_type in _WHOLE:
            model = source.get_submodule(_WHOLE[source.config.model_type].rstrip("."))
        name, params = tokenizer_params_from_hf(model.config, where, image_size)
        state = dict(model.state_dict())
    else:
        raise InputError(f"cannot import a {type(source).__name__} as a tokenizer", path="source",
                         hint="pass a transformers VQ-VAE / codec model or a local checkpoint folder of one")
    state = {_rename(k, name): v for k, v in state.items()}
    if not state:
        raise InputError("no tokenizer tensors in the checkpoint", path=where)
    return name, params, state


def build_tokenizer_from_hf(source: Any, *, image_size: int | None = None) -> nn.Module:
    """The tokenizer component itself, with the Hugging Face weights loaded (strict: every key must match)."""
    from mimo_spec.builders.build import build_module

    name, params, state = tokenizer_from_hf(source, image_size=image_size)
    module = build_module({"module": name, "params": params}, kind="tokenizer")
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(f"the checkpoint does not match the {name} tokenizer: missing {sorted(missing)[:8]}, "
                         f"unexpected {sorted(unexpected)[:8]}", path=str(source) if isinstance(source, (str, Path))
                         else type(source).__name__)
    return module


def export_tokenizer_hf(tokenizer: nn.Module, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write a tokenizer component as a Hugging Face checkpoint folder (config.json + model.safetensors) that
    its transformers class (``JanusVQVAE``, ``EncodecModel``, ``MimiModel`` ...) loads with
    ``from_pretrained``; returns the folder. Refuses to overwrite a non-empty folder unless ``overwrite``."""
    hf = getattr(tokenizer, "hf_model", None)
    if hf is None or not hasattr(hf, "save_pretrained"):
        raise InputError(f"a {type(tokenizer).__name__} is not one of mimo-spec's Hugging Face tokenizers",
                         path="tokenizer", hint=f"export a {', '.join(sorted(set(TOKENIZER_TYPES.values())))}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError("the output folder is not empty", path=str(out), hint="choose another or pass overwrite=True")
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out), safe_serialization=True)
    return out
