"""Hugging Face interop for Chameleon (``ChameleonForConditionalGeneration``: Chameleon-7B / 30B).

Chameleon is early fusion: an image is 1024 VQ codes that are tokens of the language model's own vocabulary.
What it is, in our components:

- the language model -> ``gpt`` (Llama layout) with ``qk_norm: true, qk_norm_kind: layernorm_per_head,
  qk_norm_eps: 1e-5``: Chameleon normalises each head's queries and keys with a LayerNorm (epsilon fixed at
  1e-5) whose weight and bias are that head's own, ``(num_heads, head_dim)`` / ``(num_kv_heads, head_dim)``;
  ``swin_norm`` (each sublayer's output normalised before the residual add) is gpt's ``swin_norm``;
- ``images``: a discrete modality in vocabulary mode: the VQ-VAE encoder (``model.vqmodel``) -> the
  ``chameleon_vq`` tokenizer (tensors are transformers' own), and the buffer ``code_token_ids`` (code ->
  LM token id) filled from ``config.vocabulary_map``'s ``IMGIMG…`` tokens (transformers' ``img2bpe``), so the
  LM's embedding embeds the codes and its head (restricted to those ids) predicts them.

Token ids, from ``vocabulary_map``: ``special_token_id`` is ``<image>`` (ChameleonProcessor writes
``<racm3:break>`` + 1024 x ``<image>`` + ``<eoss>`` per image, and the model replaces each ``<image>`` with the
embedding of the image's code token there); ``begin_token_id`` / ``end_token_id`` are ``<racm3:break>`` /
``<eoss>`` (when the map holds them); ``generation_token_id`` (our placeholder at generated code positions,
replaced by the codes' embeddings) is the first ``<reserved…>`` token after ``<image>`` (Chameleon-7B:
``<image>`` 8711 took ``<reserved08707>``'s id, so ``<reserved08708>``, 8712; None, an input-only modality,
when there is none). transformers' forward sets the logits of the image tokens to the dtype's minimum (its
generate writes text only); ours are the head's own: text generation never picks a code id (generation.py
masks them) and an image's codes are predicted by the head restricted to ``code_token_ids``.

transformers' ChameleonVQVAE holds the encoder only, so imported images cannot be decoded back to pixels.
"""

from __future__ import annotations

from typing import Any

import torch

from mimo_spec.errors import InputError
from mimo_spec.interop import hf_weights as hw

IMAGES = "images"
QK_NORM_EPS = 1e-5  # ChameleonLayerNorm's epsilon (fixed, not a config value)
_HINT = ("Chameleon: a gpt with qk_norm_kind layernorm_per_head and one images modality (a chameleon_vq tokenizer, "
         "code_token_offset: codes are LM tokens)")


def gpt_params_from_hf(config: Any, where: str) -> dict[str, Any]:
    """gpt params for a ChameleonConfig (Llama layout, per-head q/k LayerNorms)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise InputError(f"rope_type {rope.get('rope_type')!r} is not supported for Chameleon (plain RoPE only)",
                         path=where)
    if config.hidden_size % config.num_attention_heads:
        raise InputError(f"hidden_size ({config.hidden_size}) must be divisible by num_attention_heads "
                         f"({config.num_attention_heads})", path=where)
    try:
        act = hw._activation(config.hidden_act)
    except ValueError as e:
        raise InputError(str(e), path=where) from None
    bias = bool(getattr(config, "attention_bias", False))
    return dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
                num_heads=config.num_attention_heads,
                num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                ffn_hidden_size=config.intermediate_size, norm="rmsnorm", norm_eps=float(config.rms_norm_eps),
                position_embedding="rope", rope_theta=float(rope.get("rope_theta", 10000.0)),
                max_seq_len=config.max_position_embeddings, mlp="swiglu", activation=act, attention_bias=bias,
                attention_out_bias=bias, mlp_bias=bool(getattr(config, "mlp_bias", False)),
                tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)), qk_norm=True,
                qk_norm_kind="layernorm_per_head", qk_norm_eps=QK_NORM_EPS,
                swin_norm=bool(getattr(config, "swin_norm", False)))


def _code_name(code: int) -> str:
    """The vocabulary_map name of image code ``code`` (digits as the letters A-J, then a closing 'Z')."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def vocabulary_ids(vocab_map: dict, codebook_size: int, vocab_size: int, where: str) -> dict[str, Any]:
    """The ids a ChameleonConfig's vocabulary_map gives: ``image`` (``<image>``), ``begin`` / ``end``
    (``<racm3:break>`` / ``<eoss>``, None when absent), ``generation`` (the first ``<reserved…>`` id above
    ``<image>``'s, else None) and
    ``codes`` (the LM token of each code 0 .. codebook_size - 1, transformers' img2bpe)."""
    if not isinstance(vocab_map, dict) or not vocab_map:
        raise InputError("config.vocabulary_map is empty: Chameleon's image codes are named in it", path=where,
                         hint="use the checkpoint's full config.json")
    image = vocab_map.get("<image>")
    if not isinstance(image, int):
        raise InputError("config.vocabulary_map has no '<image>' token", path=where, hint=_HINT)
    digits = {chr(ord("A") + i): str(i) for i in range(10)}
    codes: dict[int, int] = {}
    for name, tok in vocab_map.items():
        if isinstance(name, str) and name.startswith("IMGIMG"):
            text = "".join(digits.get(c, c) for c in name[len("IMGIMG"):-1])
            if not text.isdigit():
                raise InputError(f"vocabulary_map token {name!r} names no image code", path=where)
            codes[int(text)] = int(tok)
    missing = [c for c in range(codebook_size) if c not in codes]
    if missing or len(codes) != codebook_size:
        raise InputError(f"vocabulary_map names {len(codes)} image codes, the VQ has {codebook_size}"
                         + (f" (code {missing[0]} has no token)" if missing else ""), path=where, hint=_HINT)
    ids = [codes[c] for c in range(codebook_size)]
    bad = [t for t in ids + [image] if not 0 <= t < vocab_size]
    if bad:
        raise InputError(f"vocabulary_map token id {bad[0]} is outside the vocabulary [0, {vocab_size})", path=where)

    def inside(v):
        return int(v) if isinstance(v, int) and 0 <= v < vocab_size else None

    reserved = [int(t) for n, t in vocab_map.items() if isinstance(n, str) and n.startswith("<reserved")
                and isinstance(t, int) and image < t < vocab_size and t not in codes.values()]
    return {"image": image, "begin": inside(vocab_map.get("<racm3:break>")), "end": inside(vocab_map.get("<eoss>")),
            "generation": min(reserved) if reserved else None, "codes": ids}


def import_conversion(config: Any, where: str):
    """ChameleonForConditionalGeneration -> a MimoModel (see the module docstring)."""
    from mimo_spec.interop.hf_import import _Conversion, _clean
    from mimo_spec.interop.hf_tokenizers import tokenizer_params_from_hf

    lm = _clean(gpt_params_from_hf(config, where))
    tok_name, tok = tokenizer_params_from_hf(config.vq_config, where)
    ids = vocabulary_ids(getattr(config, "vocabulary_map", None), int(tok["codebook_size"]), int(lm["vocab_size"]),
                         where)
    params = {"special_token_id": ids["image"], "begin_token_id": ids["begin"], "end_token_id": ids["end"],
              "generation_token_id": ids["generation"], "code_token_offset": min(ids["codes"]), "item_kind": "image"}
    images = {"module": "modality", "params": {k: v for k, v in params.items() if v is not None},
              "submodules": {"tokenizer": {"module": tok_name, "params": tok}}}
    cfg: dict[str, Any] = {"model": {"module": "gpt", "params": lm}, "modalities": {IMAGES: images}}
    text_ids = {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    cfg["hf_config"] = {"model_type": "chameleon",
                        "text_config": {k: v for k, v in text_ids.items() if v is None or isinstance(v, (int, list))}}

    def vq_plan(keys: list[str]) -> hw.Plan:
        pre = hw._find_prefix(keys, "vqmodel.encoder.conv_in.weight", None) + "vqmodel."
        return {k[len(pre):]: [(k, None, False)] for k in keys if k.startswith(pre)}

    ignore = [r"(^|\.)lm_head\.weight$"] if lm["tie_embeddings"] else []
    constants = {f"modalities.{IMAGES}.code_token_ids": torch.tensor(ids["codes"], dtype=torch.long)}
    return _Conversion(cfg, True, [("language_model.", "gpt", lm)], ignore=ignore,
                       extra=[(f"modalities.{IMAGES}.tokenizer.", vq_plan)], constants=constants)


def _shape(model):
    """(name, modality) when the model is Chameleon-shaped: one modality, a chameleon_vq tokenizer in vocabulary
    mode, no encoders; None otherwise."""
    from mimo_spec.components.tokenizers.vq import ChameleonVQ

    if len(model.modalities) != 1:
        return None
    name, mod = next(iter(model.modalities.items()))
    if not isinstance(getattr(mod, "tokenizer", None), ChameleonVQ) or mod.code_token_offset is None:
        return None
    return name, mod


def export(model, spec, lm_params: dict, dtype, extras: dict):
    """(HF config, HF tensors) for a Chameleon-shaped MimoModel (see :func:`_shape`), None for a model of
    another shape. What ChameleonForConditionalGeneration cannot express is refused by name: the config, read
    back with the importer, must give every parameter of ours again. The config's vocabulary_map holds the
    tokens the model uses (``<image>``, ``<racm3:break>``, ``<eoss>``, the generation placeholder as a
    ``<reserved…>`` name, and one ``IMGIMG…`` name per code); a release's tokenizer files keep the rest."""
    from mimo_spec.components.tokenizers.vq import ChameleonVQ
    from mimo_spec.interop import hf_export as he

    shape = _shape(model)
    if shape is None:
        return None
    name, mod = shape
    path = f"modalities.{name}"
    node = spec.modalities[name].submodules
    tok_p = he._full_params(ChameleonVQ, dict(node["tokenizer"].params))
    p = he._gpt_canonical(lm_params)
    bad = []
    if p["mlp"] != "swiglu" or p["norm"] != "rmsnorm" or p["position_embedding"] != "rope":
        bad.append(f"model.params: mlp {p['mlp']!r}, norm {p['norm']!r}, position_embedding "
                   f"{p['position_embedding']!r} (Chameleon's are swiglu, rmsnorm, rope)")
    if mod.special_token_id is None:
        bad.append(f"{path}.params.special_token_id: Chameleon's images need the <image> placeholder")
    if bad:
        raise he._refuse(bad[0].split(":")[0], "; ".join(bad), _HINT)
    codes = [int(t) for t in mod.code_token_ids.tolist()]
    vocab_map: dict[str, int] = {_code_name(c): t for c, t in enumerate(codes)}
    vocab_map["<image>"] = int(mod.special_token_id)
    for token, value in (("<racm3:break>", mod.begin_token_id), ("<eoss>", mod.end_token_id),
                         (f"<reserved{mod.generation_token_id}>", mod.generation_token_id)):
        if value is not None:
            vocab_map[token] = int(value)
    used = list(vocab_map.values())
    if len(set(used)) != len(used):
        raise he._refuse(f"{path}.params", "the image codes' token ids, <image>, the begin / end and the "
                         "generation token ids must all differ", _HINT)
    import transformers

    ids = {k: v for k, v in (extras.get("text_config") or {}).items() if k in he.HF_TEXT_CONFIG_KEYS}
    vq = dict(embed_dim=tok_p["embed_dim"], num_embeddings=tok_p["codebook_size"],
              latent_channels=tok_p["latent_channels"], resolution=tok_p["image_size"], in_channels=tok_p["in_channels"],
              base_channels=tok_p["base_channels"], channel_multiplier=list(tok_p["channel_multiplier"]),
              num_res_blocks=tok_p["num_res_blocks"], attn_resolutions=list(tok_p["attn_resolutions"] or []) or None)
    act = {v: k for k, v in hw.ACTIVATIONS.items() if k in ("silu", "gelu", "gelu_pytorch_tanh", "relu")}
    config = he._hf_config(
        "ChameleonConfig", dtype, "ChameleonForConditionalGeneration", vocab_size=p["vocab_size"],
        hidden_size=p["hidden_size"], intermediate_size=p["ffn_hidden_size"], num_hidden_layers=p["num_layers"],
        num_attention_heads=p["num_heads"], num_key_value_heads=p["num_kv_heads"],
        hidden_act=act.get(p["activation"], p["activation"]), max_position_embeddings=p["max_seq_len"],
        rms_norm_eps=p["norm_eps"], rope_parameters={"rope_type": "default", "rope_theta": p["rope_theta"]},
        attention_bias=p["attention_bias"], mlp_bias=p["mlp_bias"], tie_word_embeddings=p["tie_embeddings"],
        swin_norm=p["swin_norm"], vq_config=transformers.ChameleonVQVAEConfig(**vq).to_dict(), vocabulary_map=vocab_map,
        **ids)

    # The config, read back as import_hf reads it, must give this very model.
    try:
        back = import_conversion(config, "config")
    except InputError as e:
        raise he._refuse(path, e.problems[0].message, _HINT) from None
    bad = he._differences(p, he._gpt_canonical(back.cfg["model"]["params"]), "model.params")
    bm = back.cfg["modalities"][IMAGES]
    bad += he._differences(tok_p, he._full_params(ChameleonVQ, bm["submodules"]["tokenizer"]["params"]),
                           f"{path}.submodules.tokenizer.params")
    for k, v in bm["params"].items():
        if k not in ("item_kind", "code_token_offset") and getattr(mod, k, None) != v:
            bad.append(f"{path}.params.{k}: {getattr(mod, k, None)!r} (Hugging Face's would be {v!r})")
    for k in ("begin_token_id", "end_token_id", "generation_token_id"):
        if getattr(mod, k) is not None and k not in bm["params"]:
            bad.append(f"{path}.params.{k}: {getattr(mod, k)!r} (Hugging Face's would be None)")
    extra_subs = [k for k in ("encoders", "input_projections", "code_embedding", "code_projection", "output_head",
                              "code_position_embedding", "item_layout")
                  if getattr(mod, k, None) is not None and (not hasattr(getattr(mod, k), "__len__")
                                                             or len(getattr(mod, k)))]
    if extra_subs:
        bad.append(f"{path}.submodules.{extra_subs[0]}: Chameleon's images are VQ codes in the LM's vocabulary only")
    if bad:
        more = f" ... ({len(bad)} in all)" if len(bad) > 6 else ""
        raise he._refuse(bad[0].split(":")[0], "; ".join(bad[:6]) + more,
                         f"no ChameleonForConditionalGeneration computes this model: {_HINT}")

    tensors = he._lm_tensors(model.language_model, lm_params)
    tensors.update({f"model.vqmodel.{k}": v for k, v in mod.tokenizer.state_dict().items()})
    return config, tensors
