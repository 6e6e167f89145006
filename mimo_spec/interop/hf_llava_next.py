"""Hugging Face interop for the AnyRes LLaVA family: LLaVA-NeXT (``llava_next``), LLaVA-OneVision
(``llava_onevision``) and LLaVA-NeXT-Video (``llava_next_video``).

What each becomes (one ``images`` modality; OneVision and NeXT-Video also a ``videos`` modality reading
it through ``inputs_from: images``, one set of weights)::

    images:  encoders.vit = anyres (tower = clip_vit read at vision_feature_layer, grid_pinpoints
                                    = image_grid_pinpoints; NeXT-Video: video_pool = spatial_pool_mode)
             input_projections.vit = mlp (2 layers: multi_modal_projector)
             item_layout = anyres_layout (image_newline; OneVision: max_tiles from anyres_max_N,
                                          video_downscale 2, video_newline)
    videos:  inputs_from: images (special_token_id = video_token_index)

HF tensors: ``image_newline`` <-> ``modalities.images.item_layout.image_newline``; the tower, projector
and LM as for LLaVA. Export writes the Hub layout (``language_model.*``, ``vision_tower.*``,
``multi_modal_projector.*``, ``image_newline``), which transformers loads for all three.

OneVision's multi-image samples (``batch_num_images`` > 1: each image only its base tile and a newline)
are images whose ``image_sizes`` row carries a third column ``tiled`` = 0 (see
:mod:`mimo_spec.components.vision.anyres`).
"""

from __future__ import annotations

import re
from typing import Any

from mimo_spec.errors import InputError
from mimo_spec.interop import hf_weights as hw

_FAMILIES = ("llava_next", "llava_onevision", "llava_next_video")
_CONFIG = {"llava_next": ("LlavaNextConfig", "LlavaNextForConditionalGeneration"),
           "llava_onevision": ("LlavaOnevisionConfig", "LlavaOnevisionForConditionalGeneration"),
           "llava_next_video": ("LlavaNextVideoConfig", "LlavaNextVideoForConditionalGeneration")}
_POOL = {"average": "average", "max": "max"}


def _max_tiles(aspect: Any, where: str) -> int:
    m = re.fullmatch(r"anyres_max_(\d+)", str(aspect))
    if not m or int(m.group(1)) < 1:
        raise InputError(f"vision_aspect_ratio {aspect!r} is not supported", path=where,
                         hint="OneVision's anyres_max_N (e.g. anyres_max_9)")
    return int(m.group(1))


def import_conversion(config: Any, where: str):
    from mimo_spec.interop import hf_import as hi

    mt = config.model_type
    if mt not in _FAMILIES:
        raise hi._unsupported(mt, "", where)
    text, vision = config.text_config, config.vision_config
    if vision.model_type not in hi._VISION_TYPES:
        raise hi._unsupported(vision.model_type, f"{mt} vision tower", where)
    layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
    if not isinstance(layer, int):
        raise InputError(f"vision_feature_layer {layer!r}: several feature layers are not supported", path=where,
                         hint="use a single layer index")
    siglip = vision.model_type.startswith("siglip")
    if strategy not in ("default", "full") or (strategy == "full" and not siglip) or (siglip and strategy == "default"):
        raise InputError(f"vision_feature_select_strategy {strategy!r} is not supported for a {vision.model_type} "
                         f"tower in {mt}", path=where,
                         hint="AnyRes tiles need a square token grid: 'default' for CLIP (class token dropped), "
                              "'full' for SigLIP (no class token)")
    lm, ignore = hi._lm(text, where)
    ignore = hi._tie_by_top_level(config, lm, ignore)
    vit = hi._feature(hw.clip_vit_params_from_hf, vision, feature_layer=layer, feature_select="patch",
                      keep_unused_layers=True, where=where)
    vit["post_norm"] = False  # LLaVA reads hidden_states[layer], before any post-norm (kept, unused)
    pins = [[int(h), int(w)] for h, w in config.image_grid_pinpoints]
    enc: dict[str, Any] = {"grid_pinpoints": pins}
    layout: dict[str, Any] = {"hidden_size": text.hidden_size, "newline": True, "unpad": True}
    if mt == "llava_onevision":
        layout.update(max_tiles=_max_tiles(config.vision_aspect_ratio, where), video_downscale=2,
                      video_newline=True)
    if mt == "llava_next_video":
        mode = config.spatial_pool_mode
        if mode not in _POOL:
            raise InputError(f"spatial_pool_mode {mode!r} is not supported", path=where,
                             hint="'average' (the released models) or 'max'")
        enc.update(video_pool=_POOL[mode], video_pool_stride=int(config.spatial_pool_stride))
    bias = bool(getattr(config, "multimodal_projector_bias", True))
    act = hi._feature(hw._activation, config.projector_hidden_act, where=where)
    proj = {"in_features": vision.hidden_size, "out_features": text.hidden_size, "num_layers": 2,
            "activation": act, "bias": bias}
    images = {"module": "modality", "params": {"special_token_id": config.image_token_index, "item_kind": "image"},
              "submodules": {"encoders": {"vit": {"module": "anyres", "params": enc,
                                                  "submodules": {"tower": {"module": "clip_vit", "params": vit}}}},
                             "input_projections": {"vit": {"module": "mlp", "params": proj}},
                             "item_layout": {"module": "anyres_layout", "params": layout}}}
    modalities = {"images": images}
    if mt != "llava_next":
        modalities["videos"] = {"module": "modality", "params": {"special_token_id": config.video_token_index,
                                                                 "item_kind": "video", "inputs_from": "images"}}
    cfg = {"model": {"module": "gpt", "params": lm}, "modalities": modalities}
    base = "modalities.images."

    def newline(keys: list[str]) -> hw.Plan:
        prefix = hw._find_prefix(keys, "image_newline", None)
        return {"image_newline": [(prefix + "image_newline", None, False)]}

    return hi._Conversion(cfg, True, [("language_model.", "gpt", lm), (f"{base}encoders.vit.tower.", "clip_vit", vit)],
                          projector=(f"{base}input_projections.vit.", bias), extra=[(f"{base}item_layout.", newline)],
                          ignore=ignore + [r"(^|\.)head\."])


def export(model, spec, lm_params: dict, dtype, extras: dict):
    """(HF config, HF tensors) for a LLaVA-NeXT / OneVision / NeXT-Video-shaped MimoModel; None when the
    model has no anyres encoder (not this family)."""
    from mimo_spec.components.projectors import MLPProjector
    from mimo_spec.components.vision.anyres import AnyRes, AnyResLayout
    from mimo_spec.components.vision.clip_vit import ClipViT
    from mimo_spec.interop import hf_export as he

    own = [n for n, m in model.modalities.items() if m.inputs_from is None]
    if len(own) != 1:
        return None
    name = own[0]
    mod = model.modalities[name]
    if len(mod.encoders) != 1 or not isinstance(next(iter(mod.encoders.values())), AnyRes):
        return None
    hint = ("LLaVA-NeXT / OneVision / NeXT-Video: one images modality (an anyres encoder around a clip_vit, a "
            "2-layer mlp projector, an anyres_layout with newline and unpad), videos (OneVision, NeXT-Video) "
            "through inputs_from")
    path = f"modalities.{name}"
    enc_name, enc = next(iter(mod.encoders.items()))
    proj = mod.input_projections[enc_name] if enc_name in mod.input_projections else None
    layout = mod.item_layout
    if not isinstance(enc.tower, ClipViT) or not isinstance(proj, MLPProjector) or not isinstance(layout, AnyResLayout):
        raise he._refuse(path, f"tower {type(enc.tower).__name__}, projector {type(proj).__name__}, item_layout "
                         f"{type(layout).__name__}", hint)
    if not (layout.newline and layout.unpad):
        raise he._refuse(f"{path}.submodules.item_layout.params", "Hugging Face always unpads and adds "
                         "image_newline", "set newline: true and unpad: true")
    for n, m in model.modalities.items():
        if m.decoder is not None or m.output_projection is not None or m.combine != "per_item" \
                or m.special_token_id is None:
            raise he._refuse(f"modalities.{n}", "a LLaVA modality is an input with a special_token_id, per_item, "
                             "no decoder or output projection", hint)
    videos = [n for n, m in model.modalities.items() if m.inputs_from is not None]
    if len(videos) > 1 or any(model.modalities[v].inputs_from != name for v in videos):
        raise he._refuse("modalities", f"modalities {', '.join(videos)}: at most one video modality reading "
                         f"{name}", hint)
    onevision = layout.max_tiles is not None or layout.video_downscale is not None or layout.video_newline
    if onevision:
        family = "llava_onevision"
        if layout.max_tiles is None or layout.video_downscale != 2 or not layout.video_newline \
                or enc.video_pool is not None:
            raise he._refuse(f"{path}.submodules", "OneVision needs max_tiles, video_downscale 2 and video_newline "
                             "in the layout and no video_pool in the encoder", hint)
    elif enc.video_pool is not None:
        family = "llava_next_video"
    else:
        family = "llava_next"
        if videos:
            raise he._refuse(f"modalities.{videos[0]}", "LLaVA-NeXT takes no videos (videos need the encoder's "
                             "video_pool: LLaVA-NeXT-Video, or the layout's video_downscale: OneVision)", hint)

    node = spec.modalities[name].submodules
    enc_node = node["encoders"][enc_name]
    vit_p = he._params_of(enc_node.submodules["tower"], ClipViT)
    proj_p = he._params_of(node["input_projections"][enc_name], MLPProjector)
    if proj_p["num_layers"] != 2 or proj_p["hidden_features"] not in (None, proj_p["out_features"]):
        raise he._refuse(f"{path}.submodules.input_projections.{enc_name}", "the mlp projector must have "
                         "num_layers 2 and hidden_features = out_features", hint)
    if vit_p["post_norm"]:
        raise he._refuse(f"{path}.submodules.encoders.{enc_name}.submodules.tower.params.post_norm",
                         "LLaVA applies no post-norm to the features", "set post_norm: false")
    text_config = he._lm_config(lm_params, dtype, "model.params")
    vision_config, feature_layer = he._vit_config(vit_p, dtype, f"{path}.submodules.encoders.{enc_name}", False)
    strategy = "default" if vit_p["class_token"] else "full"
    kw: dict[str, Any] = dict(
        vision_config=vision_config, text_config=text_config, image_token_index=mod.special_token_id,
        vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
        projector_hidden_act=he._HF_ACT[proj_p["activation"]], multimodal_projector_bias=proj_p["bias"],
        image_grid_pinpoints=[list(p) for p in enc.grid_pinpoints], tie_word_embeddings=lm_params["tie_embeddings"])
    if family != "llava_next":
        kw["video_token_index"] = (model.modalities[videos[0]].special_token_id if videos
                                   else mod.special_token_id + 1)
    if family == "llava_onevision":
        kw["vision_aspect_ratio"] = f"anyres_max_{layout.max_tiles}"
    if family == "llava_next_video":
        kw.update(spatial_pool_mode=enc.video_pool, spatial_pool_stride=enc.video_pool_stride,
                  image_seq_length=enc.tile_tokens, video_seq_length=enc.video_grid ** 2)
    if family == "llava_next":
        kw["image_seq_length"] = enc.tile_tokens
    cls_name, arch = _CONFIG[family]
    config = he._hf_config(cls_name, dtype, arch, **kw)
    tensors = he._lm_tensors(model.language_model, lm_params, "language_model.")
    tensors.update(he._vit_tensors(enc.tower, vit_p, "vision_tower.vision_model."))
    tensors.update(hw.llava_projector_state_dict_to_hf(proj.state_dict()))
    tensors["image_newline"] = layout.image_newline.detach()
    return config, tensors
