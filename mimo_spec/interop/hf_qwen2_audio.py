"""Hugging Face interop for Qwen2-Audio (``Qwen2AudioForConditionalGeneration``, model_type ``qwen2_audio``).

Qwen2-Audio is a Whisper encoder whose output is average-pooled over time by 2 before its final
LayerNorm (``whisper_encoder`` with ``pool_stride: 2``; each item keeps its real length from
``feature_attention_mask``: ``variable_length: true``; no key bias, Hugging Face's exact parameters:
``key_bias: false``), one Linear into a Qwen2 language model (``linear`` with bias), and one ``audio``
modality whose placeholder is ``audio_token_index`` (``<|AUDIO|>``). Export takes either key_bias (the zero
key bias of ``key_bias: true`` is exact and not written).

Import reads the tensors by their names alone, in either layout: the Hub's (``audio_tower.*``,
``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head.weight``) or
transformers 5's (``model.audio_tower.*``, ``model.multi_modal_projector.*``, ``model.language_model.*``,
``lm_head.weight``). transformers never ties Qwen2-Audio's LM head to its embedding (whatever
``text_config.tie_word_embeddings`` says), so the imported LM has its own ``lm_head``. Export writes the
Hub layout (which transformers 5 renames on load) and a config that, read back by the importer, gives this
very model (anything else is refused by name).
"""

from __future__ import annotations

from typing import Any

from mimo_spec.errors import InputError
from mimo_spec.interop import hf_weights as hw

ENCODER, MODALITY = "whisper", "audio"


def audio_params_from_hf(audio_config: Any) -> dict[str, Any]:
    """whisper_encoder kwargs from a Qwen2AudioEncoderConfig (ValueError for what ours does not model)."""
    if getattr(audio_config, "model_type", None) != "qwen2_audio_encoder":
        raise ValueError(f"audio_config model_type {getattr(audio_config, 'model_type', None)!r} is not supported: "
                         "use a Qwen2AudioEncoderConfig")
    if getattr(audio_config, "scale_embedding", False):
        raise ValueError("scale_embedding: true is not supported (Qwen2-Audio's encoder does not scale)")
    return dict(num_mel_bins=audio_config.num_mel_bins, hidden_size=audio_config.d_model,
                num_layers=audio_config.encoder_layers, num_heads=audio_config.encoder_attention_heads,
                ffn_hidden_size=audio_config.encoder_ffn_dim, max_source_positions=audio_config.max_source_positions,
                activation=hw._activation(audio_config.activation_function), layer_norm_eps=1e-5,
                pool_stride=2, variable_length=True, key_bias=False)


def _projector_plan(keys: list[str]) -> hw.Plan:
    pre = hw._find_prefix(keys, "multi_modal_projector.linear.weight", None) + "multi_modal_projector.linear."
    return {f"proj.{leaf}": [(pre + leaf, None, False)] for leaf in ("weight", "bias")}


def import_conversion(config: Any, where: str):
    """The conversion of a Qwen2AudioConfig: a gpt (Qwen2, untied head), an ``audio`` modality with a
    pooling whisper_encoder and a linear projector."""
    from mimo_spec.interop.hf_import import _Conversion, _feature, _lm

    if config.model_type == "qwen2_audio_encoder":  # the tower alone: a Whisper encoder pooling by 2
        params = _feature(audio_params_from_hf, config, where=where)
        return _Conversion({"module": "whisper_encoder", "params": params}, False, [("", "whisper_encoder", params)])
    text = config.text_config
    if text.model_type != "qwen2":
        raise InputError(f"text_config model_type {text.model_type!r}: Qwen2-Audio's language model is qwen2",
                         path=where)
    lm, _ = _lm(text, where)
    lm["tie_embeddings"] = False  # transformers keeps lm_head separate for Qwen2-Audio
    enc = _feature(audio_params_from_hf, config.audio_config, where=where)
    proj = {"in_features": enc["hidden_size"], "out_features": lm["hidden_size"], "bias": True}
    audio = {"module": "modality",
             "params": {"special_token_id": int(config.audio_token_index), "item_kind": "audio"},
             "submodules": {"encoders": {ENCODER: {"module": "whisper_encoder", "params": enc}},
                            "input_projections": {ENCODER: {"module": "linear", "params": proj}}}}
    cfg: dict[str, Any] = {"model": {"module": "gpt", "params": lm}, "modalities": {MODALITY: audio}}
    text_ids = {k: getattr(text, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    cfg["hf_config"] = {"text_config": {k: v for k, v in text_ids.items() if v is None or isinstance(v, (int, list))}}
    base = f"modalities.{MODALITY}."
    parts = [("language_model.", "gpt", lm), (f"{base}encoders.{ENCODER}.", "whisper_encoder", enc)]
    return _Conversion(cfg, True, parts, extra=[(f"{base}input_projections.{ENCODER}.", _projector_plan)])


def export(model, spec, lm_params: dict, dtype, extras: dict):
    """(Qwen2AudioConfig, HF tensors) for a Qwen2-Audio-shaped MimoModel: a Qwen2-shaped gpt and one input
    modality of one whisper_encoder (pool_stride 2) and a linear projector with bias; None for another shape."""
    from mimo_spec.components.audio.whisper import WhisperEncoder
    from mimo_spec.components.projectors import LinearProjector
    from mimo_spec.interop.hf_export import (_HF_ACT, _differences, _full_params, _gpt_canonical, _hf_config,
                                             _lm_config, _refuse)

    from mimo_spec.interop.hf_shapes import single_tower

    shape = single_tower(model, WhisperEncoder, LinearProjector)
    if shape is None or shape[3].pool_stride != 2:
        return None
    name, mod, enc_name, enc, proj = shape
    path = f"modalities.{name}"
    hint = ("Qwen2-Audio: one audio modality (a whisper_encoder with pool_stride 2, a linear projector with bias) "
            "into a Qwen2-shaped gpt")
    if mod.decoder is not None or mod.output_projection is not None or mod.special_token_id is None \
            or mod.item_layout is not None or mod.deepstack_projections is not None:
        raise _refuse(path, "a Qwen2-Audio modality is an input with a special_token_id and nothing else", hint)
    node = spec.modalities[name].submodules
    enc_p = _full_params(WhisperEncoder, dict(node["encoders"][enc_name].params))
    proj_p = _full_params(LinearProjector, dict(node["input_projections"][enc_name].params))
    if not proj_p["bias"]:
        raise _refuse(f"{path}.submodules.input_projections.{enc_name}.params.bias", "Qwen2-Audio's projector has a "
                      "bias", hint)
    if enc_p["layer_norm_eps"] != 1e-5:
        raise _refuse(f"{path}.submodules.encoders.{enc_name}.params.layer_norm_eps",
                      f"{enc_p['layer_norm_eps']}: Qwen2-Audio's LayerNorms use 1e-5", hint)
    lm_config = _lm_config(lm_params, dtype, "model.params")
    if lm_config.model_type != "qwen2":
        raise _refuse("model.params", f"the language model is {lm_config.model_type}-shaped; Qwen2-Audio's is "
                      "Qwen2 (bias on q/k/v only, rope, rmsnorm, swiglu)", hint)
    text = lm_config.to_dict()
    text["tie_word_embeddings"] = False  # never tied by transformers: a tied model writes its head out
    for key, value in (extras.get("text_config") or {}).items():
        text[key] = value
    for key in ("architectures", "dtype", "torch_dtype", "transformers_version"):
        text.pop(key, None)
    audio = dict(model_type="qwen2_audio_encoder", num_mel_bins=enc_p["num_mel_bins"], d_model=enc_p["hidden_size"],
                 encoder_layers=enc_p["num_layers"], encoder_attention_heads=enc_p["num_heads"],
                 encoder_ffn_dim=enc_p["ffn_hidden_size"], max_source_positions=enc_p["max_source_positions"],
                 activation_function=_HF_ACT.get(enc_p["activation"], enc_p["activation"]), scale_embedding=False)
    config = _hf_config("Qwen2AudioConfig", dtype, "Qwen2AudioForConditionalGeneration", audio_config=audio,
                        text_config=text, audio_token_index=int(mod.special_token_id))

    # read back as import_hf reads it, the config must give this very model
    try:
        back_enc = audio_params_from_hf(config.audio_config)
        back_lm = hw.gpt_params_from_hf(config.text_config)
    except ValueError as e:
        raise _refuse("model", str(e), hint) from None
    ours_lm = _gpt_canonical(lm_params)
    ours_lm["tie_embeddings"] = False  # written untied either way (the head is the embedding's copy)
    bad = _differences(ours_lm, _gpt_canonical({**back_lm, "tie_embeddings": False}), "model.params")
    # how it runs; how the data path feeds it; a zero key bias (key_bias true) is exact and not written out
    ignore = ("backend", "variable_length", "key_bias")
    bad += _differences({k: v for k, v in enc_p.items() if k not in ignore},
                        {k: v for k, v in _full_params(WhisperEncoder, back_enc).items() if k not in ignore},
                        f"{path}.submodules.encoders.{enc_name}.params")
    if proj_p["in_features"] != enc_p["hidden_size"] or proj_p["out_features"] != lm_params["hidden_size"]:
        bad.append(f"{path}.submodules.input_projections.{enc_name}.params: {proj_p['in_features']} -> "
                   f"{proj_p['out_features']}")
    if bad:
        raise _refuse(bad[0].split(":")[0], "; ".join(bad[:6]), f"no Qwen2AudioForConditionalGeneration computes "
                      f"this model: {hint}")

    sd = model.language_model.state_dict()
    tensors = {("language_model." + k): v for k, v in hw.gpt_state_dict_to_hf(sd, lm_params).items()}
    if lm_params["tie_embeddings"]:
        tensors["language_model.lm_head.weight"] = sd["token_embedding.weight"].clone()
    tensors.update(hw.whisper_encoder_state_dict_to_hf(enc.state_dict(), enc_p, prefix="audio_tower."))
    linear = proj.proj.state_dict()
    tensors.update({f"multi_modal_projector.linear.{leaf}": linear[leaf] for leaf in ("weight", "bias")})
    return config, tensors
