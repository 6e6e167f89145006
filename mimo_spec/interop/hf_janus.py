"""Hugging Face interop for Janus (``JanusForConditionalGeneration``: Janus-1.3B, Janus-Pro-1B / 7B).

What Janus is, in our components:

- the language model: the Llama text config -> ``gpt`` (``tie_word_embeddings`` is the Janus config's own);
- ``images`` (understanding): the SigLIP-style vision tower (``model.vision_model``, read after its
  post-layernorm: no class token, no pre-norm, a biased patch conv) -> ``clip_vit``, and the aligner MLP
  (``model.aligner``: fc1, then ``depth - 1`` hidden layers, the activation between) -> ``mlp``; one
  ``image_token_id`` placeholder per patch, as LLaVA;
- ``image_gen`` (generation, head mode): the VQ-VAE (``model.vqmodel``) -> the ``janus_vq`` tokenizer, whose
  tensors are transformers' own; ``model.generation_embeddings`` -> ``code_embedding`` (``embedding``),
  ``model.generation_aligner`` -> ``code_projection`` (``mlp``), ``model.generation_head`` (proj_out, the
  activation, vision_head) -> ``output_head`` (``mlp``, 2 layers).

Token ids: ``begin_token_id`` is ``<begin_of_image>`` (the id Janus's generate reads from
``generation_config.generation_kwargs["boi_token_id"]``; config.json does not hold it: the importer takes
``config.boi_token_id`` when set, else ``generation_kwargs.boi_token_id`` of a generation_config.json beside
config.json, else the released models' 100016), ``end_token_id`` ``<end_of_image>``
(``config.eoi_token_id``, else 100593), both only when the vocabulary holds them. Janus writes no
placeholder at generated code positions; ours is ``generation_token_id`` (``config.generation_token_id``
when set, else the last id of the vocabulary: the released embedding (102400 rows) is padded past the
tokenizer's ids): those positions take the code embeddings, never the LM's embedding of that id. The
released ids are worth checking against the checkpoint's generation_config.json / tokenizer when importing.
"""

from __future__ import annotations

from typing import Any

from mimo_spec.errors import InputError
from mimo_spec.interop import hf_weights as hw

ENCODER = "siglip"
IMAGES, GEN = "images", "image_gen"
BOI, EOI = 100016, 100593  # Janus-1.3B / Janus-Pro's <begin_of_image>, <end_of_image>
_HINT = ("Janus: a gpt (Llama), an images modality (SigLIP clip_vit + mlp aligner) and an image_gen modality "
         "(janus_vq tokenizer, embedding code_embedding, mlp code_projection and output_head)")


def vision_params_from_hf(vision: Any, where: str) -> dict[str, Any]:
    """clip_vit params for a JanusVisionConfig: SigLIP read after its post-layernorm."""
    if getattr(vision, "use_qk_norm", False):
        raise InputError("use_qk_norm (LayerNorm over all heads' queries / keys) is not supported", path=where)
    sizes = {}
    for key in ("image_size", "patch_size"):
        v = getattr(vision, key)
        if isinstance(v, (list, tuple)):
            if len(set(v)) != 1:
                raise InputError(f"vision_config.{key} {list(v)}: only square ones are supported", path=where)
            v = v[0]
        sizes[key] = int(v)
    try:
        act = hw._activation(vision.hidden_act)
    except ValueError as e:
        raise InputError(str(e), path=where) from None
    return dict(image_size=sizes["image_size"], patch_size=sizes["patch_size"], hidden_size=vision.hidden_size,
                num_layers=vision.num_hidden_layers, num_heads=vision.num_attention_heads,
                ffn_hidden_size=int(vision.hidden_size * vision.mlp_ratio), num_channels=vision.num_channels,
                activation=act, layer_norm_eps=float(vision.layer_norm_eps), class_token=False, pre_norm=False,
                post_norm=True, patch_bias=True, feature_layer=-1, feature_select="patch",
                qkv_bias=bool(vision.attention_bias))


def _generation_kwargs(where: str) -> dict[str, Any]:
    """``generation_kwargs`` of the generation_config.json beside an imported config.json ({} if none)."""
    from pathlib import Path

    from mimo_spec.interop.hf_safetensors import read_json_file

    path = Path(where)
    if path.name != "config.json" or not (path.parent / "generation_config.json").is_file():
        return {}
    try:
        data = read_json_file(path.parent / "generation_config.json")
    except ValueError:  # unreadable JSON: the defaults apply
        return {}
    kwargs = data.get("generation_kwargs") if isinstance(data, dict) else None
    return kwargs if isinstance(kwargs, dict) else {}


def _mlp_table(prefix: str, first: str, rest: list[str]) -> hw.Plan:
    """An ``mlp`` projector's plan (Linear layers at even positions of ``layers``) from HF Linear names."""
    plan: hw.Plan = {}
    for i, name in enumerate([first] + rest):
        for leaf in ("weight", "bias"):
            plan[f"layers.{2 * i}.{leaf}"] = [(f"{prefix}{name}.{leaf}", None, False)]
    return plan


def import_conversion(config: Any, where: str):
    """JanusForConditionalGeneration -> a MimoModel (see the module docstring)."""
    from mimo_spec.interop.hf_import import _Conversion, _clean, _feature, _unsupported
    from mimo_spec.interop.hf_tokenizers import tokenizer_params_from_hf

    text, vision, vq = config.text_config, config.vision_config, config.vq_config
    if text.model_type not in ("llama",):
        raise _unsupported(text.model_type, "Janus text model", where)
    lm = _clean(_feature(hw.gpt_params_from_hf, text, where=where))
    lm["tie_embeddings"] = bool(getattr(config, "tie_word_embeddings", False))
    vocab = int(lm["vocab_size"])
    vit = vision_params_from_hf(vision, where)
    act = _feature(hw._activation, vision.hidden_act, where=where)
    aligner = {"in_features": vision.hidden_size, "out_features": vision.projection_dim,
               "hidden_features": vision.projection_dim, "num_layers": int(vision.depth), "activation": act}
    if vision.projection_dim != text.hidden_size:
        raise InputError(f"vision_config.projection_dim ({vision.projection_dim}) != the text model's hidden_size "
                         f"({text.hidden_size})", path=where, hint=_HINT)
    tok_name, tok = tokenizer_params_from_hf(vq, where)
    grid = tok["image_size"] // 2 ** (len(tok["channel_multiplier"]) - 1)
    if grid * grid != int(vision.num_image_tokens):
        raise InputError(f"vision_config.num_image_tokens ({vision.num_image_tokens}) != the VQ's codes per image "
                         f"({grid} x {grid})", path=where, hint=_HINT)
    gen_act = _feature(hw._activation, vq.hidden_act, where=where)
    if vq.projection_dim != text.hidden_size or vq.image_token_embed_dim != text.hidden_size:
        raise InputError(f"vq_config.projection_dim ({vq.projection_dim}) and image_token_embed_dim "
                         f"({vq.image_token_embed_dim}) must be the text hidden_size ({text.hidden_size})",
                         path=where, hint=_HINT)
    code_projection = {"in_features": vq.embed_dim, "out_features": vq.projection_dim,
                       "hidden_features": vq.projection_dim, "num_layers": int(vq.num_hidden_layers),
                       "activation": gen_act}
    head = {"in_features": vq.image_token_embed_dim, "out_features": vq.num_embeddings,
            "hidden_features": vq.projection_dim, "num_layers": 2, "activation": gen_act}

    # generation_config.json's generation_kwargs beside a folder's config.json, or an in-memory model's own
    generation = {**_generation_kwargs(where), **(getattr(config, "mimo_generation_kwargs", None) or {})}

    def token(name: str, default: int) -> int | None:
        v = getattr(config, name, None)
        v = generation.get(name) if v is None else v
        v = default if not isinstance(v, int) or isinstance(v, bool) else int(v)
        return v if 0 <= v < vocab else None

    gen_params = {"generation_token_id": token("generation_token_id", vocab - 1),
                  "begin_token_id": token("boi_token_id", BOI), "end_token_id": token("eoi_token_id", EOI),
                  "item_kind": "image"}
    images = {"module": "modality", "params": {"special_token_id": int(config.image_token_id), "item_kind": "image"},
              "submodules": {"encoders": {ENCODER: {"module": "clip_vit", "params": vit}},
                             "input_projections": {ENCODER: {"module": "mlp", "params": aligner}}}}
    image_gen = {"module": "modality", "params": {k: v for k, v in gen_params.items() if v is not None},
                 "submodules": {
                     "tokenizer": {"module": tok_name, "params": tok},
                     "code_embedding": {"module": "embedding", "params": {"num_embeddings": vq.num_embeddings,
                                                                          "embedding_dim": vq.embed_dim}},
                     "code_projection": {"module": "mlp", "params": code_projection},
                     "output_head": {"module": "mlp", "params": head}}}
    cfg: dict[str, Any] = {"model": {"module": "gpt", "params": lm},
                           "modalities": {IMAGES: images, GEN: image_gen}}
    ids = {k: getattr(text, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    cfg["hf_config"] = {"model_type": "janus",
                        "text_config": {k: v for k, v in ids.items() if v is None or isinstance(v, (int, list))}}

    def vision_plan(keys: list[str]) -> hw.Plan:
        table = hw._vit_table(vit)
        table = {ours: [(None if h is None else h.replace("self_attn.out_proj.", "self_attn.projection_layer."), r)
                        for h, r in parts] for ours, parts in table.items()}
        return hw._plan(table, hw._find_prefix(keys, "vision_model.embeddings.patch_embedding.weight", None)
                        + "vision_model.")

    def prefixed(name: str):
        def make(keys: list[str]) -> hw.Plan:
            pre = hw._find_prefix(keys, f"{name}.encoder.conv_in.weight", None) + name + "."
            return {k[len(pre):]: [(k, None, False)] for k in keys if k.startswith(pre)}
        return make

    def linear_plan(anchor: str, first: str, rest: list[str]):
        def make(keys: list[str]) -> hw.Plan:
            pre = hw._find_prefix(keys, f"{anchor}.{first}.weight", None) + anchor + "."
            return _mlp_table(pre, first, rest)
        return make

    def embedding_plan(keys: list[str]) -> hw.Plan:
        return {"weight": [(hw._find_prefix(keys, "generation_embeddings.weight", None)
                            + "generation_embeddings.weight", None, False)]}

    ignore = [r"(^|\.)lm_head\.weight$"] if lm["tie_embeddings"] else []
    img, gen = f"modalities.{IMAGES}.", f"modalities.{GEN}."
    extra = [
        (f"{img}encoders.{ENCODER}.", vision_plan),
        (f"{img}input_projections.{ENCODER}.",
         linear_plan("aligner", "fc1", [f"hidden_layers.{i}" for i in range(int(vision.depth) - 1)])),
        (f"{gen}tokenizer.", prefixed("vqmodel")),
        (f"{gen}code_embedding.", embedding_plan),
        (f"{gen}code_projection.",
         linear_plan("generation_aligner", "fc1",
                     [f"hidden_layers.{i}" for i in range(int(vq.num_hidden_layers) - 1)])),
        (f"{gen}output_head.", linear_plan("generation_head", "proj_out", ["vision_head"])),
    ]
    return _Conversion(cfg, True, [("language_model.", "gpt", lm)], ignore=ignore, extra=extra)


def _shape(model):
    """(images name, images modality, generation name, generation modality) when the model is Janus-shaped:
    two modalities, an input one with one clip_vit and an mlp projector, and a head-mode discrete one with a
    janus_vq tokenizer; None otherwise."""
    from mimo_spec.components.embedding import EmbeddingProjector
    from mimo_spec.components.projectors import MLPProjector
    from mimo_spec.components.tokenizers.vq import JanusVQ
    from mimo_spec.components.vision.clip_vit import ClipViT

    if len(model.modalities) != 2:
        return None
    gen = [(n, m) for n, m in model.modalities.items() if isinstance(getattr(m, "tokenizer", None), JanusVQ)]
    und = [(n, m) for n, m in model.modalities.items() if getattr(m, "tokenizer", None) is None]
    if len(gen) != 1 or len(und) != 1:
        return None
    (g_name, g), (i_name, i) = gen[0], und[0]
    if len(i.encoders) != 1:
        return None
    enc_name, enc = next(iter(i.encoders.items()))
    proj = i.input_projections[enc_name] if enc_name in i.input_projections else None
    if not isinstance(enc, ClipViT) or not isinstance(proj, MLPProjector) \
            or not isinstance(g.code_embedding, EmbeddingProjector) or not isinstance(g.code_projection, MLPProjector) \
            or not isinstance(g.output_head, MLPProjector):
        return None
    return i_name, i, enc_name, g_name, g


def _mlp_to_hf(proj, prefix: str, first: str, rest: list[str]) -> dict:
    sd = proj.state_dict()
    return {f"{prefix}{name}.{leaf}": sd[f"layers.{2 * k}.{leaf}"]
            for k, name in enumerate([first] + rest) for leaf in ("weight", "bias")}


def export(model, spec, lm_params: dict, dtype, extras: dict):
    """(HF config, HF tensors) for a Janus-shaped MimoModel (see :func:`_shape`), None for a model of another
    shape. What JanusForConditionalGeneration cannot express is refused by name: the config, read back with
    the importer, must give every parameter of ours again."""
    from mimo_spec.components.embedding import EmbeddingProjector
    from mimo_spec.components.projectors import MLPProjector
    from mimo_spec.components.tokenizers.vq import JanusVQ
    from mimo_spec.components.vision.clip_vit import ClipViT
    from mimo_spec.interop import hf_export as he

    shape = _shape(model)
    if shape is None:
        return None
    i_name, img, enc_name, g_name, gen = shape
    i_node, g_node = spec.modalities[i_name].submodules, spec.modalities[g_name].submodules
    vit_p = he._full_params(ClipViT, dict(i_node["encoders"][enc_name].params))
    align_p = he._full_params(MLPProjector, dict(i_node["input_projections"][enc_name].params))
    tok_p = he._full_params(JanusVQ, dict(g_node["tokenizer"].params))
    emb_p = he._full_params(EmbeddingProjector, dict(g_node["code_embedding"].params))
    cproj_p = he._full_params(MLPProjector, dict(g_node["code_projection"].params))
    head_p = he._full_params(MLPProjector, dict(g_node["output_head"].params))
    text = he._lm_config(lm_params, dtype, "model.params").to_dict()
    for k in ("architectures", "dtype", "torch_dtype", "transformers_version", "tie_word_embeddings"):
        text.pop(k, None)
    for k, v in (extras.get("text_config") or {}).items():
        if k in he.HF_TEXT_CONFIG_KEYS:
            text[k] = v
    act = {v: k for k, v in hw.ACTIVATIONS.items() if k in ("gelu", "gelu_pytorch_tanh", "silu", "quick_gelu",
                                                               "relu")}
    vision = dict(hidden_size=vit_p["hidden_size"], num_hidden_layers=vit_p["num_layers"],
                  num_attention_heads=vit_p["num_heads"], num_channels=vit_p["num_channels"],
                  image_size=vit_p["image_size"], patch_size=vit_p["patch_size"],
                  hidden_act=act.get(vit_p["activation"], vit_p["activation"]), layer_norm_eps=vit_p["layer_norm_eps"],
                  mlp_ratio=vit_p["ffn_hidden_size"] / vit_p["hidden_size"], attention_bias=vit_p["qkv_bias"],
                  projection_dim=align_p["out_features"], depth=align_p["num_layers"],
                  num_image_tokens=gen.tokenizer.num_tokens)
    vq = dict(embed_dim=tok_p["embed_dim"], num_embeddings=tok_p["codebook_size"],
              latent_channels=tok_p["latent_channels"], in_channels=tok_p["in_channels"],
              out_channels=tok_p["out_channels"], base_channels=tok_p["base_channels"],
              channel_multiplier=list(tok_p["channel_multiplier"]), num_res_blocks=tok_p["num_res_blocks"],
              projection_dim=cproj_p["out_features"], num_hidden_layers=cproj_p["num_layers"],
              hidden_act=act.get(cproj_p["activation"], cproj_p["activation"]),
              image_token_embed_dim=head_p["in_features"])
    path = f"modalities.{g_name}"
    if vit_p["image_size"] // vit_p["patch_size"] != gen.tokenizer.grid[0]:
        raise he._refuse(f"{path}.submodules.tokenizer.params.image_size", f"Janus's code grid "
                         f"({gen.tokenizer.grid[0]}) is its vision tower's patch grid "
                         f"({vit_p['image_size'] // vit_p['patch_size']})", _HINT)
    if img.special_token_id is None:
        raise he._refuse(f"modalities.{i_name}.params.special_token_id", "Janus's images need a placeholder", _HINT)
    config = he._hf_config("JanusConfig", dtype, "JanusForConditionalGeneration", text_config=text,
                           vision_config=vision, vq_config=vq, image_token_id=img.special_token_id,
                           tie_word_embeddings=lm_params["tie_embeddings"])
    for key, value in (("boi_token_id", gen.begin_token_id), ("eoi_token_id", gen.end_token_id),
                       ("generation_token_id", gen.generation_token_id)):
        setattr(config, key, value)

    # The config, read back as import_hf reads it, must give this very model.
    try:
        back = import_conversion(config, "config").cfg
    except InputError as e:
        raise he._refuse(path, e.problems[0].message, _HINT) from None
    bm = back["modalities"]
    bad = he._differences(he._gpt_canonical(lm_params), he._gpt_canonical(back["model"]["params"]), "model.params")
    for ours, node, cls, where in (
            (vit_p, bm[IMAGES]["submodules"]["encoders"][ENCODER], ClipViT,
             f"modalities.{i_name}.submodules.encoders.{enc_name}"),
            (align_p, bm[IMAGES]["submodules"]["input_projections"][ENCODER], MLPProjector,
             f"modalities.{i_name}.submodules.input_projections.{enc_name}"),
            (tok_p, bm[GEN]["submodules"]["tokenizer"], JanusVQ, f"{path}.submodules.tokenizer"),
            (emb_p, bm[GEN]["submodules"]["code_embedding"], EmbeddingProjector, f"{path}.submodules.code_embedding"),
            (cproj_p, bm[GEN]["submodules"]["code_projection"], MLPProjector, f"{path}.submodules.code_projection"),
            (head_p, bm[GEN]["submodules"]["output_head"], MLPProjector, f"{path}.submodules.output_head")):
        theirs = he._full_params(cls, node["params"])
        skip = ("backend",)
        bad += he._differences({k: v for k, v in ours.items() if k not in skip},
                               {k: v for k, v in theirs.items() if k not in skip}, f"{where}.params")
    for mod, name, back_params in ((img, i_name, bm[IMAGES]["params"]), (gen, g_name, bm[GEN]["params"])):
        for k, v in back_params.items():
            if k != "item_kind" and getattr(mod, k, None) != v:
                bad.append(f"modalities.{name}.params.{k}: {getattr(mod, k, None)!r} (Hugging Face's would be {v!r})")
    if gen.code_token_offset is not None or img.item_layout is not None or img.decoder is not None:
        bad.append(f"{path}: Janus's generation is head mode, its understanding a plain per-item modality")
    if bad:
        more = f" ... ({len(bad)} in all)" if len(bad) > 6 else ""
        raise he._refuse(bad[0].split(":")[0], "; ".join(bad[:6]) + more,
                         f"no JanusForConditionalGeneration computes this model: {_HINT}")

    tensors = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
               for k, v in he._lm_tensors(model.language_model, lm_params).items()}
    vis = hw.clip_vit_state_dict_to_hf(img.encoders[enc_name].state_dict(), vit_p, prefix="model.vision_model.")
    tensors.update({k.replace("self_attn.out_proj.", "self_attn.projection_layer."): v for k, v in vis.items()})
    tensors.update(_mlp_to_hf(img.input_projections[enc_name], "model.aligner.", "fc1",
                              [f"hidden_layers.{k}" for k in range(align_p["num_layers"] - 1)]))
    tensors.update({f"model.vqmodel.{k}": v for k, v in gen.tokenizer.state_dict().items()})
    tensors["model.generation_embeddings.weight"] = gen.code_embedding.weight
    tensors.update(_mlp_to_hf(gen.code_projection, "model.generation_aligner.", "fc1",
                              [f"hidden_layers.{k}" for k in range(cproj_p["num_layers"] - 1)]))
    tensors.update(_mlp_to_hf(gen.output_head, "model.generation_head.", "proj_out", ["vision_head"]))
    return config, tensors
