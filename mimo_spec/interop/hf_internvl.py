"""Hugging Face interop for InternVL 2 / 2.5 / 3 (``internvl``: transformers' InternVLForConditionalGeneration).

What it becomes: the language model (Qwen2 or Llama, the ``gpt`` table) and one ``images`` modality whose
items are TILES: the 448x448 tiles (dynamic tiling, plus a thumbnail when there are several) that
GotOcr2ImageProcessor(crop_to_patches=True) cuts each image into::

    images:  encoders.vit = clip_vit (InternViT: class token, no pre-norm, biased patch conv, LayerScale;
                                      6B: RMSNorm blocks, q/k norm over all heads, no q/k/v bias)
             input_projections.vit = pixel_shuffle_mlp (scale_factor = 1 / downsample_ratio, LayerNorm,
                                                       2-layer MLP: InternVL's multi_modal_projector)

Each tile gives (image_size / patch_size / scale_factor)^2 tokens (256 for 448 px, patch 14, scale 2). The
processor writes ``<img>`` + that many ``<IMG_CONTEXT>`` per tile + ``</img>`` per image: one run of
placeholders per image, which the model reads as that image's tiles, one after the other (the ``<img>``
/ ``</img>`` ids are ordinary text tokens).

HF tensors (under ``model.``): ``vision_tower.*`` <-> ``modalities.images.encoders.vit.*`` (see
``hf_weights._internvit_table``), ``multi_modal_projector.{layer_norm, linear_1, linear_2}`` <->
``input_projections.vit.{norm, mlp.0, mlp.2}``, ``language_model.*`` + ``lm_head`` <-> the gpt.
"""

from __future__ import annotations

from typing import Any

from mimo_spec.errors import InputError
from mimo_spec.interop import hf_weights as hw

# our pixel_shuffle_mlp tensors -> InternVL's multi_modal_projector
_PROJECTOR = {"norm": "layer_norm", "mlp.0": "linear_1", "mlp.2": "linear_2"}
# config.json values our model does not use, kept under the run config's hf_config for the export
_TEXT_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _projector_plan(keys: list[str]) -> hw.Plan:
    pre = hw._find_prefix(keys, "multi_modal_projector.linear_1.weight", None) + "multi_modal_projector."
    return {f"{ours}.{leaf}": [(f"{pre}{hf}.{leaf}", None, False)] for ours, hf in _PROJECTOR.items()
            for leaf in ("weight", "bias")}


def import_conversion(config: Any, where: str):
    from mimo_spec.interop import hf_import as hi

    text, vision = config.text_config, config.vision_config
    if vision.model_type != "internvl_vision":
        raise hi._unsupported(vision.model_type, "InternVL vision tower", where)
    layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise InputError(f"vision_feature_layer {layer!r}: several feature layers are not supported", path=where,
                         hint="use a single layer index")
    if strategy != "default":
        raise InputError(f"vision_feature_select_strategy {strategy!r} is not supported", path=where,
                         hint="'default' (the class token dropped): pixel shuffle needs a square grid")
    ratio = float(config.downsample_ratio)
    scale = round(1 / ratio) if ratio > 0 else 0
    if scale < 1 or abs(scale * ratio - 1) > 1e-9:
        raise InputError(f"downsample_ratio {ratio} is not 1 / an integer", path=where,
                         hint="InternVL uses 0.5 (2x2 neighbourhoods)")
    lm, ignore = hi._lm(text, where)
    lm["tie_embeddings"] = bool(config.tie_word_embeddings)  # transformers ties by the top-level value
    ignore = [r"(^|\.)lm_head\.weight$"] if lm["tie_embeddings"] else []
    last = layer == -1  # HF reads last_hidden_state only for -1, else hidden_states[layer]
    # HF's final layernorm exists without mean pooling and is applied to last_hidden_state only; reading
    # another layer, the later blocks (and that norm) are held unused when HF has the norm, else left out
    keep = not last and not vision.use_mean_pooling
    vit = hi._feature(hw.clip_vit_params_from_hf, vision, feature_layer=layer, feature_select="patch",
                      keep_unused_layers=keep, where=where)
    vit["post_norm"] = last and not vision.use_mean_pooling
    try:
        blocks = hw.resolve_feature_layer(layer, vision.num_hidden_layers)
    except ValueError as e:  # ParamError: out of range
        raise InputError(f"vision_feature_layer: {e}", path=where) from None
    if not keep and blocks < vision.num_hidden_layers:  # HF blocks past the feature layer: ours has none
        later = "|".join(str(i) for i in range(blocks, vision.num_hidden_layers))
        ignore.append(rf"(^|\.)vision_tower\.encoder\.layer\.({later})\.")
    act = hi._feature(hw._activation, config.projector_hidden_act, where=where)
    proj = {"in_features": vision.hidden_size, "out_features": text.hidden_size, "scale_factor": scale,
            "hidden_features": None, "activation": act, "norm": True, "num_layers": 2, "bias": True}
    images = {"module": "modality", "params": {"special_token_id": config.image_token_id, "item_kind": "image"},
              "submodules": {"encoders": {"vit": {"module": "clip_vit", "params": vit}},
                             "input_projections": {"vit": {"module": "pixel_shuffle_mlp", "params": proj}}}}
    cfg = {"model": {"module": "gpt", "params": lm}, "modalities": {"images": images}}
    text_ids = {k: getattr(text, k, None) for k in _TEXT_IDS}
    cfg["hf_config"] = {"text_config": {k: v for k, v in text_ids.items() if v is None or isinstance(v, (int, list))}}
    base = "modalities.images."
    return hi._Conversion(cfg, True, [("language_model.", "gpt", lm), (f"{base}encoders.vit.", "clip_vit", vit)],
                          extra=[(f"{base}input_projections.vit.", _projector_plan)], ignore=ignore)


def _shape(model) -> tuple[str, str, Any, Any] | None:
    """(modality name, encoder name, encoder, projector) when the model has InternVL's shape: one input
    modality with one clip_vit in InternViT's style (class token, no pre-norm) and a pixel_shuffle_mlp;
    None otherwise."""
    from mimo_spec.components.projectors import PixelShuffleMLPProjector
    from mimo_spec.components.vision.clip_vit import ClipViT

    from mimo_spec.interop.hf_shapes import single_tower

    shape = single_tower(model, ClipViT, PixelShuffleMLPProjector)
    if shape is None:
        return None
    name, _, enc_name, vit, proj = shape
    if vit.class_embedding is None or vit.pre_norm is not None:  # SigLIP-style: Idefics3 / SmolVLM
        return None
    return name, enc_name, vit, proj


def export(model, spec, lm_params: dict, dtype, extras: dict):
    """(HF config, HF tensors) for an InternVL-shaped MimoModel (see :func:`_shape`); None for other shapes.
    What InternVL cannot express is refused by name (ConfigError)."""
    from mimo_spec.components.projectors import PixelShuffleMLPProjector
    from mimo_spec.components.vision.clip_vit import ClipViT
    from mimo_spec.interop import hf_export as he

    found = _shape(model)
    if found is None:
        return None
    name, enc_name, vit, proj = found
    mod = model.modalities[name]
    path = f"modalities.{name}"
    enc_path, proj_path = f"{path}.submodules.encoders.{enc_name}.params", \
        f"{path}.submodules.input_projections.{enc_name}.params"
    hint = ("InternVL: one images modality, a clip_vit in InternViT's style (class_token, no pre_norm, "
            "patch_bias, layer_scale, feature_select patch) and a pixel_shuffle_mlp (norm, 2 layers, bias)")
    if mod.decoder is not None or mod.output_projection is not None or mod.combine != "per_item" \
            or mod.special_token_id is None or mod.item_layout is not None or mod.deepstack_projections:
        raise he._refuse(path, "an InternVL modality is an input with a special_token_id, per_item, no "
                         "item_layout, deepstack, decoder or output projection", hint)
    node = spec.modalities[name].submodules
    p = he._full_params(ClipViT, dict(node["encoders"][enc_name].params))
    q = he._full_params(PixelShuffleMLPProjector, dict(node["input_projections"][enc_name].params))
    checks = [(p["layer_scale"] is not None, "layer_scale", "InternViT's blocks always carry LayerScale"),
              (p["patch_bias"], "patch_bias", "InternViT's patch conv has a bias"),
              (p["mlp"] == "gelu", "mlp", "InternViT's MLP is fc1, activation, fc2 (no swiglu)"),
              (p["register_tokens"] == 0, "register_tokens", "InternViT has no register tokens"),
              (p["feature_select"] == "patch", "feature_select", "InternVL drops the class token ('default')"),
              (not p["qk_norm"] or p["layer_norm_eps"] == 1e-6, "layer_norm_eps",
               "transformers' InternViT q/k norms use eps 1e-6")]
    for ok, key, why in checks:
        if not ok:
            raise he._refuse(f"{enc_path}.{key}", f"{p[key]!r}: {why}", hint)
    if p["activation"] not in he._HF_ACT or q["activation"] not in he._HF_ACT:
        raise he._refuse(enc_path, "an activation Hugging Face has no name for", hint)
    for ok, key, why in ((q["norm"], "norm", "InternVL's projector starts with a LayerNorm"),
                         (q["num_layers"] == 2, "num_layers", "InternVL's projector has 2 Linear layers"),
                         (q["bias"], "bias", "InternVL's projector Linear layers have biases"),
                         (q["hidden_features"] in (None, q["out_features"]), "hidden_features",
                          "InternVL's projector is as wide as the language model")):
        if not ok:
            raise he._refuse(f"{proj_path}.{key}", f"{q[key]!r}: {why}", hint)
    blocks = hw.resolve_feature_layer(p["feature_layer"], p["num_layers"])
    layers = p["num_layers"] if p["keep_unused_layers"] else blocks
    if layers == 0:
        raise he._refuse(enc_path, "the tower has no blocks", "set keep_unused_layers: true")
    feature_layer = p["feature_layer"] if p["keep_unused_layers"] else -1
    last = feature_layer == -1  # HF applies its final layernorm to last_hidden_state (-1) only
    has_norm = p["post_norm"] or p["keep_unused_layers"]
    if has_norm and p["post_norm"] != last:  # HF applies its final norm exactly when reading the last layer
        raise he._refuse(f"{enc_path}.post_norm", f"{p['post_norm']!r} with feature_layer {p['feature_layer']} "
                         "and keep_unused_layers: InternVL applies its final layernorm to the last layer's "
                         "output and to no other", hint)
    vision = dict(hidden_size=p["hidden_size"], num_hidden_layers=layers, num_attention_heads=p["num_heads"],
                  intermediate_size=p["ffn_hidden_size"], hidden_act=he._HF_ACT[p["activation"]],
                  layer_norm_eps=p["layer_norm_eps"], image_size=p["image_size"], patch_size=p["patch_size"],
                  num_channels=p["num_channels"], attention_bias=p["qkv_bias"], use_qk_norm=p["qk_norm"],
                  norm_type={"layernorm": "layer_norm", "rmsnorm": "rms_norm"}[p["norm"]],
                  layer_scale_init_value=float(p["layer_scale"]), use_mean_pooling=not has_norm)
    text = he._lm_config(lm_params, dtype, "model.params").to_dict()
    if text["model_type"] not in ("llama", "qwen2", "qwen3"):
        raise he._refuse("model.params", f"a {text['model_type']} language model: InternVL holds Llama, Qwen2 or "
                         "Qwen3 ones (rope, rmsnorm, swiglu)", hint)
    for k in ("architectures", "dtype", "torch_dtype", "transformers_version"):
        text.pop(k, None)
    text.update({k: v for k, v in (extras.get("text_config") or {}).items() if k in _TEXT_IDS})
    tokens = vit.tokens_per_item((1, p["num_channels"], p["image_size"], p["image_size"]))
    config = he._hf_config("InternVLConfig", dtype, "InternVLForConditionalGeneration", vision_config=vision,
                           text_config=text, image_token_id=mod.special_token_id,
                           image_seq_length=proj.tokens_out(tokens), downsample_ratio=1 / q["scale_factor"],
                           projector_hidden_act=he._HF_ACT[q["activation"]], vision_feature_layer=feature_layer,
                           vision_feature_select_strategy="default",
                           tie_word_embeddings=lm_params["tie_embeddings"])
    tensors = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
               for k, v in he._lm_tensors(model.language_model, lm_params).items()}
    tensors.update(hw.clip_vit_state_dict_to_hf(vit.state_dict(), p, prefix="model.vision_tower."))
    for key, t in proj.state_dict().items():
        layer, leaf = key.rsplit(".", 1)
        tensors[f"model.multi_modal_projector.{_PROJECTOR[layer]}.{leaf}"] = t
    return config, tensors

