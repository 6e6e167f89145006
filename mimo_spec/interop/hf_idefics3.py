"""Hugging Face interop for Idefics3 and SmolVLM (``Idefics3ForConditionalGeneration``,
``SmolVLMForConditionalGeneration``; SmolVLM-256M/500M/2B-Instruct are published as Idefics3, SmolVLM2 as
SmolVLM; both compute the same thing).

What they are, in our components:

- the language model: the text config (Llama in every release; Mistral / Qwen2 / Qwen3 text configs map
  the same way) -> ``gpt``; ``tie_word_embeddings`` is the VLM config's own;
- an ``images`` modality whose items are TILES: the image processor resizes each image, cuts it into
  ``max_image_size`` squares (rows x cols of them) and adds the whole image resized to one square (the
  global image); every tile and global image is one item of ``image_size`` x ``image_size`` pixels;
- the vision tower: a SigLIP ``clip_vit`` read after its post-layernorm (``last_hidden_state``): no class
  token, no pre-norm, a patch conv with bias, gelu_tanh; patch grids floor (384 px / 14 -> 27 x 27);
- the connector: ``pixel_shuffle_mlp`` with ``norm: false, num_layers: 1, bias: false`` (pixel shuffle by
  ``scale_factor``, then ``modality_projection.proj``, one Linear without bias): (image_size //
  patch_size)^2 / scale_factor^2 tokens per tile (SmolVLM-256M: 1024 / 16 = 64; Idefics3-8B: 676 / 4 = 169).

Hugging Face's vision embeddings give each patch a "bucketed" position id from the tile's
``pixel_attention_mask``. The image processor always makes full tiles (splitting resizes to a multiple of
``max_image_size``; the global image is one whole square), where the bucketed ids are the plain ones for
the released grids (26, 27, 32 patches a side; checked at import for the config's grid). A tile with
padding inside is refused (:func:`tiles_from_hf`). All-zero tiles are the padding Hugging Face's
processor adds so that samples hold the same number of tiles: Hugging Face drops them, and so does
:func:`tiles_from_hf`.
"""

from __future__ import annotations

from typing import Any

import torch

from mimo_spec.errors import InputError
from mimo_spec.interop import hf_weights as hw

# our encoder / projector name inside the images modality
ENCODER = "siglip"
_LM_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_VISION_TYPES = ("idefics3_vision", "smolvlm_vision", "idefics3", "smolvlm")
# model_type -> (config class, architecture)
_CLASSES = {"idefics3": ("Idefics3Config", "Idefics3ForConditionalGeneration"),
            "smolvlm": ("SmolVLMConfig", "SmolVLMForConditionalGeneration")}
_HINT = ("Idefics3 / SmolVLM: a gpt, and one images modality with a SigLIP clip_vit (class_token, pre_norm "
         "false; patch_bias, post_norm true; every block) and a pixel_shuffle_mlp (norm false, num_layers 1, "
         "bias false)")


# --------------------------------------------------------------------------- positions


def bucketed_positions(grid: int) -> list[int]:
    """The position-table row Hugging Face's Idefics3 / SmolVLM vision embeddings give each patch of a
    full ``grid`` x ``grid`` tile (patches row by row), computed as they compute it (float32 buckets on
    the CPU). For most grids this is ``range(grid * grid)``; for some (19, 25, 29, 31, ...) the float
    rounding of the bucket boundaries repeats a row or column."""
    boundaries = torch.arange(1 / grid, 1.0, 1 / grid)
    coords = torch.arange(grid, dtype=torch.float32) * (1.0 / torch.tensor([grid]))[:, None]
    buckets = torch.bucketize(torch.clamp(coords, max=1.0 - 1e-6), boundaries, right=True)[0]
    return (buckets[:, None] * grid + buckets[None, :]).reshape(-1).tolist()


def check_plain_positions(grid: int, where: str) -> None:
    """InputError unless a full tile of ``grid`` patches a side gets plain positions in Hugging Face
    (what ``clip_vit`` computes)."""
    got = bucketed_positions(grid)
    if got != list(range(grid * grid)):
        bad = next(i for i, p in enumerate(got) if p != i)
        raise InputError(f"a {grid}x{grid}-patch tile gets bucketed position ids in Hugging Face's Idefics3 "
                         f"vision embeddings that are not the plain ones (patch {bad} reads row {got[bad]} of "
                         f"the position table)", path=where,
                         hint="clip_vit uses plain positions; choose image_size / patch_size with a grid whose "
                              "buckets are exact (the releases' 26, 27 and 32 are)")


# --------------------------------------------------------------------------- inputs


def tiles_from_hf(pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None,
                  path: str = "pixel_values") -> tuple[torch.Tensor, list[int]]:
    """Hugging Face's processor output -> our items: ``(tiles (N, C, S, S), tiles per sample)``.

    ``pixel_values`` (B, T, C, S, S) holds each sample's tiles then all-zero padding tiles (as
    Idefics3ImageProcessor / SmolVLMImageProcessor return them); the padding is dropped, as Hugging Face
    drops it. ``pixel_attention_mask`` (B, T, S, S), if given, must be all ones on every kept tile: a tile
    with padding inside would need position buckets and attention masking that clip_vit does not do.
    """
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 5:
        got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise InputError(f"expected (batch, tiles, channels, height, width), got {got}", path=path,
                         hint="pass the image processor's pixel_values (return_tensors='pt')")
    b, t = pixel_values.shape[:2]
    real = (pixel_values != 0).flatten(2).any(-1)  # (B, T): Hugging Face's test for a padding tile
    if pixel_attention_mask is not None:
        mask = pixel_attention_mask
        if tuple(mask.shape) != (b, t, *pixel_values.shape[-2:]):
            raise InputError(f"expected a mask of shape {(b, t, *pixel_values.shape[-2:])}, got {tuple(mask.shape)}",
                             path="pixel_attention_mask", hint="pass the image processor's pixel_attention_mask")
        partial = real & ~mask.flatten(2).bool().all(-1)
        if bool(partial.any()):
            s, k = (int(v) for v in partial.nonzero()[0])
            valid = int(mask[s, k].bool().sum())
            raise InputError(f"sample {s}, tile {k}: {valid} of {mask[s, k].numel()} pixels are valid (the tile "
                             "is padded); mimo-spec's Idefics3 / SmolVLM tower takes full tiles only",
                             path=f"pixel_attention_mask[{s}][{k}]",
                             hint="keep the image processor's do_image_splitting (or do_resize) on so that every "
                                  "tile is a full max_image_size square, with max_image_size = the tower's "
                                  "image_size")
    counts = [int(c) for c in real.sum(1).tolist()]
    return pixel_values[real], counts


# --------------------------------------------------------------------------- import


def vision_params_from_hf(vision: Any, where: str) -> dict[str, Any]:
    """clip_vit params for an Idefics3 / SmolVLM vision config: SigLIP read after its post-layernorm."""
    if getattr(vision, "model_type", None) not in _VISION_TYPES:
        raise InputError(f"vision model_type {vision.model_type!r} is not an Idefics3 / SmolVLM vision tower",
                         path=where)
    sizes = {}
    for key in ("image_size", "patch_size"):
        v = getattr(vision, key)
        if isinstance(v, (list, tuple)):
            if len(set(v)) != 1:
                raise InputError(f"vision_config.{key} {list(v)}: non-square {key.split('_')[0]}s are not "
                                 "supported", path=where, hint="clip_vit takes square tiles and patches")
            v = v[0]
        sizes[key] = int(v)
    try:
        act = hw._activation(vision.hidden_act)
    except ValueError as e:
        raise InputError(str(e), path=where, hint="mimo-spec's components do not implement this feature") from None
    return dict(image_size=sizes["image_size"], patch_size=sizes["patch_size"], hidden_size=vision.hidden_size,
                num_layers=vision.num_hidden_layers, num_heads=vision.num_attention_heads,
                ffn_hidden_size=vision.intermediate_size, num_channels=vision.num_channels, activation=act,
                layer_norm_eps=float(vision.layer_norm_eps), class_token=False, pre_norm=False, post_norm=True,
                patch_bias=True, feature_layer=-1, feature_select="patch", dynamic_image_size=False,
                keep_unused_layers=False)


def connector_params(vision_hidden: int, text_hidden: int, scale_factor: int) -> dict[str, Any]:
    """pixel_shuffle_mlp params of Idefics3's connector (pixel shuffle + one Linear without bias)."""
    return dict(in_features=vision_hidden, out_features=text_hidden, scale_factor=int(scale_factor),
                hidden_features=None, activation="gelu", norm=False, num_layers=1, bias=False)


def import_conversion(config: Any, where: str):
    """Idefics3ForConditionalGeneration / SmolVLMForConditionalGeneration -> a MimoModel: the gpt, and an
    ``images`` modality (clip_vit + pixel_shuffle_mlp) whose items are the image processor's tiles."""
    from mimo_spec.interop.hf_import import _Conversion, _clean, _feature, _unsupported

    text, vision = config.text_config, config.vision_config
    if text.model_type not in _LM_TYPES:
        raise _unsupported(text.model_type, f"{config.model_type} text model", where)
    lm = _clean(_feature(hw.gpt_params_from_hf, text, where=where))
    lm["tie_embeddings"] = bool(getattr(config, "tie_word_embeddings", False))  # the VLM's own (HF ties by it)
    vit = vision_params_from_hf(vision, where)
    grid, scale = vit["image_size"] // vit["patch_size"], int(config.scale_factor)
    if grid < 1 or grid % scale:
        raise InputError(f"a tile of {grid}x{grid} patches (image_size {vit['image_size']}, patch_size "
                         f"{vit['patch_size']}) cannot be pixel-shuffled by scale_factor {scale}", path=where,
                         hint="the patch grid must be a multiple of scale_factor")
    check_plain_positions(grid, where)
    proj = connector_params(vision.hidden_size, text.hidden_size, scale)
    images = {"module": "modality", "params": {"special_token_id": int(config.image_token_id), "item_kind": "image"},
              "submodules": {"encoders": {ENCODER: {"module": "clip_vit", "params": vit}},
                             "input_projections": {ENCODER: {"module": "pixel_shuffle_mlp", "params": proj}}}}
    cfg: dict[str, Any] = {"model": {"module": "gpt", "params": lm}, "modalities": {"images": images}}
    # what config.json says that our model does not use, for export_hf to write back
    ids = {k: getattr(text, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    cfg["hf_config"] = {"model_type": config.model_type,
                        "text_config": {k: v for k, v in ids.items() if v is None or isinstance(v, (int, list))}}

    def connector(keys: list[str]) -> hw.Plan:
        pre = hw._find_prefix(keys, "connector.modality_projection.proj.weight", None)
        return {"mlp.0.weight": [(pre + "connector.modality_projection.proj.weight", None, False)]}

    ignore = [r"(^|\.)lm_head\.weight$"] if lm["tie_embeddings"] else []
    base = "modalities.images."
    parts = [("language_model.", "gpt", lm), (f"{base}encoders.{ENCODER}.", "clip_vit", vit)]
    return _Conversion(cfg, True, parts, ignore=ignore, extra=[(f"{base}input_projections.{ENCODER}.", connector)])


# --------------------------------------------------------------------------- export


def export(model, spec, lm_params: dict, dtype, extras: dict):
    """(HF config, HF tensors) for an Idefics3 / SmolVLM-shaped MimoModel (one modality: a clip_vit and a
    pixel_shuffle_mlp; a SigLIP-style tower, or a connector of one Linear and no norm), None for a model of
    another shape. What Hugging Face
    cannot express is refused by name: the config is read back with the importer and must give every
    parameter of ours again."""
    from mimo_spec.components.projectors import PixelShuffleMLPProjector
    from mimo_spec.components.vision.clip_vit import ClipViT
    from mimo_spec.interop import hf_export as he

    from mimo_spec.interop.hf_shapes import single_tower

    shape = single_tower(model, ClipViT, PixelShuffleMLPProjector)
    if shape is None:
        return None
    name, mod, enc_name, vit, proj = shape
    node = spec.modalities[name].submodules
    proj_p = he._full_params(PixelShuffleMLPProjector, dict(node["input_projections"][enc_name].params))
    if vit.class_embedding is not None and (proj_p["num_layers"] != 1 or proj_p["norm"]):
        return None  # a class-token tower with a normed MLP: InternVL's shape, not ours
    path = f"modalities.{name}"
    vit_p = he._full_params(ClipViT, dict(node["encoders"][enc_name].params))
    if mod.decoder is not None or mod.output_projection is not None or mod.special_token_id is None \
            or mod.combine != "per_item" or mod.item_layout is not None or mod.deepstack_projections is not None:
        raise he._refuse(path, "an Idefics3 / SmolVLM modality is an input with a special_token_id, per_item, "
                               "no item_layout, decoder or output projection", _HINT)
    if lm_params["position_embedding"] != "rope":
        raise he._refuse("model.params.position_embedding", "Idefics3 / SmolVLM text models use RoPE "
                         f"(Llama); got {lm_params['position_embedding']!r}", _HINT)

    text = he._lm_config(lm_params, dtype, "model.params").to_dict()
    for k in ("architectures", "dtype", "torch_dtype", "transformers_version", "tie_word_embeddings"):
        text.pop(k, None)
    for k, v in (extras.get("text_config") or {}).items():
        if k in he.HF_TEXT_CONFIG_KEYS:
            text[k] = v
    blocks = hw.resolve_feature_layer(vit_p["feature_layer"], vit_p["num_layers"])
    vision = dict(hidden_size=vit_p["hidden_size"], intermediate_size=vit_p["ffn_hidden_size"],
                  num_hidden_layers=blocks, num_attention_heads=vit_p["num_heads"],
                  num_channels=vit_p["num_channels"], image_size=vit_p["image_size"], patch_size=vit_p["patch_size"],
                  hidden_act=he._HF_ACT.get(vit_p["activation"], vit_p["activation"]),
                  layer_norm_eps=vit_p["layer_norm_eps"])
    kind = extras.get("model_type", "idefics3")
    if kind not in _CLASSES:
        raise he._refuse("hf_config.model_type", f"{kind!r}: use idefics3 or smolvlm", _HINT)
    cls_name, arch = _CLASSES[kind]
    config = he._hf_config(cls_name, dtype, arch, text_config=text, vision_config=vision,
                           scale_factor=proj_p["scale_factor"], image_token_id=mod.special_token_id,
                           tie_word_embeddings=lm_params["tie_embeddings"])

    # The config, read back as import_hf reads it, must give this very model.
    try:
        back = import_conversion(config, "config").cfg
    except InputError as e:
        raise he._refuse(path, e.problems[0].message, _HINT) from None
    back_mod = back["modalities"]["images"]["submodules"]
    bad = he._differences(he._gpt_canonical(lm_params), he._gpt_canonical(back["model"]["params"]), "model.params")
    # Hugging Face runs every block it holds: the blocks ours runs (any held past them are not exported)
    skip = ("backend", "feature_layer", "num_layers", "keep_unused_layers")
    ours_vit = {k: v for k, v in vit_p.items() if k not in skip}
    theirs_vit = {k: v for k, v in he._full_params(ClipViT, back_mod["encoders"][ENCODER]["params"]).items()
                  if k not in skip}
    if not vit_p["class_token"]:
        ours_vit.pop("feature_select"), theirs_vit.pop("feature_select")  # nothing to drop without one
    bad += he._differences(ours_vit, theirs_vit, f"{path}.submodules.encoders.{enc_name}.params")
    ours_proj = {k: v for k, v in proj_p.items() if k not in ("hidden_features", "activation")}  # unused: 1 layer
    theirs_proj = {k: v for k, v in he._full_params(PixelShuffleMLPProjector,
                                                     back_mod["input_projections"][ENCODER]["params"]).items()
                   if k not in ("hidden_features", "activation")}
    bad += he._differences(ours_proj, theirs_proj, f"{path}.submodules.input_projections.{enc_name}.params")
    if bad:
        more = f" ... ({len(bad)} in all)" if len(bad) > 6 else ""
        raise he._refuse(bad[0].split(":")[0], "; ".join(bad[:6]) + more, f"no {arch} computes this model: {_HINT}")

    tensors = {("model.text_model." + k[len("model."):] if k.startswith("model.") else k): v
               for k, v in he._lm_tensors(model.language_model, lm_params).items()}
    out_p = dict(vit_p, keep_unused_layers=False, feature_layer=-1, num_layers=blocks)  # the blocks run
    tensors.update(hw.clip_vit_state_dict_to_hf(vit.state_dict(), out_p, prefix="model.vision_model."))
    tensors["model.connector.modality_projection.proj.weight"] = proj.state_dict()["mlp.0.weight"]
    return config, tensors
