"""Import Hugging Face models: config.json -> our config, weights -> a built model.

``import_hf(source)`` takes a local checkpoint directory or an in-memory
transformers model and returns ``(cfg, model)``:

- Llama / Mistral / Qwen2 / Qwen3 / GPT-2 causal LMs -> a text-only ``MimoModel`` (``model: {module: gpt}``),
- Mixtral / Qwen2-MoE / Qwen3-MoE -> the same with a mixture-of-experts gpt (``num_experts`` ...; experts
  read from the released per-expert tensors or transformers 5's fused ones),
- LLaVA -> a ``MimoModel`` with an ``images`` modality (clip_vit + 2-layer mlp),
- CLIP / SigLIP (vision tower, or the vision half of the dual model) -> a ``ClipViT``,
- SigLIP2 NaFlex (Siglip2VisionModel, or the vision half of a Siglip2Model) -> a ``Siglip2NaFlex``,
- Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3-VL-MoE -> a ``MimoModel`` (M-RoPE gpt, ``images`` and ``videos``
  modalities),
- Whisper (the encoder of any Whisper checkpoint) -> a ``WhisperEncoder``.

For whole models ``cfg`` is a run config in our schema (``build_model`` takes
it); for a lone encoder it is one component node ``{module, params}``, to be
placed under a modality's ``encoders`` or built with ``build_module``.

The model is built on the meta device, the checkpoint is checked against it
from the safetensors headers alone (missing / unexpected tensors, shapes), and
only then are the weights streamed in shard by shard.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mimo_spec.errors import ConfigError, InputError
from mimo_spec.interop import hf_weights as hw
from mimo_spec.interop.hf_safetensors import (HFCheckpoint, check_plan, load_from_state_dict, publish, refuse_clashes,
                                          stream_into)

# model_type -> what it becomes
SUPPORTED = {
    "llama": "gpt", "mistral": "gpt", "qwen2": "gpt", "qwen3": "gpt", "gpt2": "gpt",
    "mixtral": "gpt (mixture of experts in every layer)",
    "qwen2_moe": "gpt (mixture of experts with a gated shared expert; decoder_sparse_step / mlp_only_layers)",
    "qwen3_moe": "gpt (mixture of experts; decoder_sparse_step / mlp_only_layers)",
    "olmoe": "gpt (mixture of experts in every layer; q/k RMSNorms over all heads: qk_norm_kind rmsnorm_all_heads)",
    "clip": "clip_vit", "clip_vision_model": "clip_vit", "siglip": "clip_vit", "siglip_vision_model": "clip_vit",
    "siglip2": "siglip2_naflex", "siglip2_vision_model": "siglip2_naflex",
    "whisper": "whisper_encoder", "qwen2_audio_encoder": "whisper_encoder (pool_stride 2: Qwen2-Audio's tower)",
    "llava": "mimo (gpt + clip_vit + mlp)",
    "qwen2_vl": "mimo (gpt with M-RoPE + qwen_vit + patch_merger; images and videos)",
    "qwen2_5_vl": "mimo (gpt with M-RoPE + qwen_vit with window attention + patch_merger; images and videos)",
    "qwen3_vl": "mimo (gpt with interleaved M-RoPE and qk_norm + qwen_vit with DeepStack; images and videos)",
    "qwen3_vl_moe": "mimo (Qwen3-VL with a mixture-of-experts gpt; images and videos)",
    "llava_next": "mimo (gpt + anyres tiles of a clip_vit + mlp + anyres_layout: unpadding, image_newline)",
    "llava_onevision": "mimo (gpt + anyres tiles of a SigLIP clip_vit + mlp + anyres_layout; images and videos)",
    "llava_next_video": "mimo (gpt + anyres tiles of a clip_vit + mlp + anyres_layout; videos pooled 2x2)",
    "internvl": "mimo (gpt + InternViT clip_vit with layer scale + pixel_shuffle_mlp; images as tiles)",
    "idefics3": "mimo (gpt + SigLIP clip_vit + pixel_shuffle_mlp connector; images as tiles)",
    "smolvlm": "mimo (gpt + SigLIP clip_vit + pixel_shuffle_mlp connector; images as tiles)",
    "qwen2_audio": "mimo (gpt + whisper_encoder with average pooling + linear; audio)",
    "janus": "mimo (gpt + images: SigLIP clip_vit + mlp aligner; image_gen: janus_vq tokenizer + embedding, "
             "mlp aligner and mlp head)",
    "chameleon": "mimo (gpt with per-head q/k LayerNorms; images: chameleon_vq tokenizer, codes in the LM's "
                 "vocabulary)",
}
# model_type -> the module of mimo_spec.interop converting that family: its ``import_conversion(config, where)``
# returns a _Conversion; its ``export(model, spec, lm_params, dtype, extras)`` (hf_export) writes it back.
FAMILIES = {"llava_next": "hf_llava_next", "llava_onevision": "hf_llava_next", "llava_next_video": "hf_llava_next",
            "internvl": "hf_internvl", "idefics3": "hf_idefics3", "smolvlm": "hf_idefics3",
            "qwen2_audio": "hf_qwen2_audio", "qwen2_audio_encoder": "hf_qwen2_audio", "janus": "hf_janus", "chameleon": "hf_chameleon"}
_LM_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
_VISION_TYPES = ("clip", "clip_vision_model", "siglip", "siglip_vision_model")
# HF tensors every import may skip: buffers that older checkpoints saved.
_ALWAYS_IGNORED = (r"(^|\.)position_ids$", r"rotary_emb\.inv_freq$")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class _Conversion:
    """What one HF architecture becomes: our config, and the pieces to convert."""

    cfg: dict[str, Any]
    whole_model: bool  # a MimoModel (build_model) rather than one component (build_module)
    # (our key prefix, registry name, params) per converted component
    parts: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    projector: tuple[str, bool] | None = None  # LLaVA: (our key prefix, bias)
    ignore: list[str] = field(default_factory=list)  # regexes of HF tensors deliberately left out
    # (our key prefix, keys -> plan) for components without a PLANS entry (Qwen vision towers)
    extra: list[tuple[str, Any]] = field(default_factory=list)
    # our buffers the conversion computes from the config (no HF tensor holds them): {our key: tensor}
    # (Chameleon's code -> vocabulary id map, from config.vocabulary_map)
    constants: dict[str, torch.Tensor] = field(default_factory=dict)

    # (our key prefix, gpt params) of a gpt whose fused experts are read tensor by tensor as transformers reads
    # them (Qwen3-VL-MoE: transposed when the stored shape is not the in-memory one)
    experts_by_shape: tuple[str, dict[str, Any]] | None = None

    def plan(self, keys: list[str], shapes: dict[str, tuple[int, ...]] | None = None, where: str = "",
             on_disk: bool = False) -> hw.Plan:
        plan: hw.Plan = {}
        for prefix, name, params in self.parts:
            plan.update({prefix + k: v for k, v in hw.PLANS[name](keys, params).items()})
        for prefix, make in self.extra:
            plan.update({prefix + k: v for k, v in make(keys).items()})
        if self.experts_by_shape is not None:
            prefix, lm = self.experts_by_shape
            flipped, square = hw.transposed_experts(shapes or {}, lm)
            if square and on_disk:  # (a model in memory holds them as transformers does: nothing to tell)
                warnings.warn(f"{where}: the fused expert tensors ({square[0]}, ...) are square, so their orientation "
                              "cannot be told from their shapes; they are read as stored, as transformers reads "
                              "them (a checkpoint storing them transposed, as Qwen's releases do, loads wrongly in "
                              "both)", stacklevel=3)
            plan.update({prefix + k: v for k, v in hw.gpt_import_plan(keys, lm, transposed=flipped).items()})
        if self.projector is not None:
            prefix, bias = self.projector
            plan.update({prefix + k: v for k, v in hw.llava_projector_import_plan(keys, bias).items()})
        return plan


def _unsupported(model_type: str, arch: str, where: str) -> InputError:
    return InputError(f"unsupported architecture {model_type!r}{f' ({arch})' if arch else ''}", path=where,
                      hint=f"supported model types: {', '.join(SUPPORTED)}")


def _clean(params: dict[str, Any]) -> dict[str, Any]:
    """Drop None values: they are the constructor defaults, and the YAML stays short."""
    return {k: v for k, v in params.items() if v is not None}


def _feature(fn, *args, where: str, **kwargs):
    """Call a *_params_from_hf function; a ValueError means a feature we do not implement."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise InputError(str(e), path=where, hint="mimo-spec's components do not implement this feature") from None


def _lm(config: Any, where: str) -> tuple[dict[str, Any], list[str]]:
    """(gpt params, ignore regexes) for a causal-LM config."""
    if config.model_type not in _LM_TYPES:
        raise _unsupported(config.model_type, "", where)
    params = _clean(_feature(hw.gpt_params_from_hf, config, where=where))
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", config.model_type in ("mistral", "mixtral"))
    if window and uses_window and window < params["max_seq_len"]:
        warnings.warn(f"{where}: sliding-window attention ({window} tokens) is not modelled; outputs match "
                      f"Hugging Face's for sequences up to {window} tokens", stacklevel=3)
    ignore = [r"(^|\.)lm_head\.weight$"] if params["tie_embeddings"] else []
    if config.model_type == "gpt2":
        ignore.append(r"\.attn\.(masked_)?bias$")  # causal-mask buffers in old GPT-2 checkpoints
    return params, ignore


def _tie_by_top_level(config: Any, lm: dict[str, Any], ignore: list[str]) -> list[str]:
    """A vision-language model's head is tied by its own ``tie_word_embeddings``, as transformers 5 ties it,
    not by its text config's (LlavaNextConfig never copies the text value up; save_pretrained writes both and
    they may disagree): ``lm["tie_embeddings"]`` set from it, and the ignore list to match."""
    lm["tie_embeddings"] = bool(getattr(config, "tie_word_embeddings", False))
    head = r"(^|\.)lm_head\.weight$"
    return [r for r in ignore if r != head] + ([head] if lm["tie_embeddings"] else [])


def _convert(config: Any, where: str) -> _Conversion:
    mt = config.model_type
    if mt in _LM_TYPES:
        params, ignore = _lm(config, where)
        cfg = {"model": {"module": "gpt", "params": params}, "modalities": {}}
        return _Conversion(cfg, True, [("language_model.", "gpt", params)], ignore=ignore)
    if mt in _VISION_TYPES:
        siglip = mt.startswith("siglip")
        # The tower's last_hidden_state: every block, CLIP's class token kept; SigLIP's post-norm applied.
        params = _feature(hw.clip_vit_params_from_hf, config, feature_layer=-1,
                          feature_select="patch" if siglip else "all", keep_unused_layers=True, where=where)
        ignore = [r"^text_model\.", r"(^|\.)(text_projection|visual_projection)\.", r"^logit_(scale|bias)$",
                  r"(^|\.)head\."]  # the text half of a dual model, and SigLIP's pooling head
        return _Conversion({"module": "clip_vit", "params": params}, False, [("", "clip_vit", params)], ignore=ignore)
    if mt in ("siglip2", "siglip2_vision_model"):
        from mimo_spec.components.vision import siglip2 as s2

        # last_hidden_state at the real patches: every block and the post-norm; the pooling head held, unused
        params = _feature(s2.siglip2_params_from_hf, config, feature_layer=-1, post_norm=True,
                          keep_unused_layers=True, where=where)
        ignore = [r"^text_model\.", r"^logit_(scale|bias)$"]  # the text half of a Siglip2Model
        return _Conversion({"module": "siglip2_naflex", "params": params}, False,
                           extra=[("", lambda keys: s2.siglip2_import_plan(keys, params))], ignore=ignore)
    if mt == "whisper":
        params = _feature(hw.whisper_encoder_params_from_hf, config, where=where)
        ignore = [r"(^|\.)decoder\.", r"(^|\.)proj_out\."]
        return _Conversion({"module": "whisper_encoder", "params": params}, False,
                           [("", "whisper_encoder", params)], ignore=ignore)
    if mt == "llava":
        return _llava(config, where)
    if mt in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        return _qwen_vl(config, where)
    if mt in FAMILIES:
        import importlib

        return importlib.import_module(f"mimo_spec.interop.{FAMILIES[mt]}").import_conversion(config, where)
    raise _unsupported(mt, ", ".join(getattr(config, "architectures", None) or []), where)


def _llava(config: Any, where: str) -> _Conversion:
    text, vision = config.text_config, config.vision_config
    if vision.model_type not in _VISION_TYPES:
        raise _unsupported(vision.model_type, "LLaVA vision tower", where)
    layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
    if not isinstance(layer, int):
        raise InputError(f"vision_feature_layer {layer!r}: several feature layers are not supported", path=where,
                         hint="use a single layer index")
    siglip = vision.model_type.startswith("siglip")
    if strategy not in ("default", "full") or (siglip and strategy == "default"):
        raise InputError(f"vision_feature_select_strategy {strategy!r} is not supported for a "
                         f"{vision.model_type} tower", path=where,
                         hint="'default' drops the class token (CLIP); 'full' keeps every token")
    lm, ignore = _lm(text, where)
    ignore = _tie_by_top_level(config, lm, ignore)
    vit = _feature(hw.clip_vit_params_from_hf, vision, feature_layer=layer,
                   feature_select="patch" if strategy == "default" else "all", keep_unused_layers=True, where=where)
    vit["post_norm"] = False  # LLaVA reads hidden_states[layer], before any post-norm (kept, unused)
    bias = bool(getattr(config, "multimodal_projector_bias", True))
    act = _feature(hw._activation, config.projector_hidden_act, where=where)
    proj = {"in_features": vision.hidden_size, "out_features": text.hidden_size, "num_layers": 2,
            "activation": act, "bias": bias}
    enc = "siglip" if siglip else "clip"
    images = {"module": "modality", "params": {"special_token_id": config.image_token_index},
              "submodules": {"encoders": {enc: {"module": "clip_vit", "params": vit}},
                             "input_projections": {enc: {"module": "mlp", "params": proj}}}}
    cfg = {"model": {"module": "gpt", "params": lm}, "modalities": {"images": images}}
    parts = [("language_model.", "gpt", lm), (f"modalities.images.encoders.{enc}.", "clip_vit", vit)]
    return _Conversion(cfg, True, parts, projector=(f"modalities.images.input_projections.{enc}.", bias),
                       ignore=ignore + [r"(^|\.)head\."])


def _qwen_vl(config: Any, where: str) -> _Conversion:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: the text model (M-RoPE gpt), an ``images`` modality (the vision
    tower and its 2x2 patch merger; Qwen3-VL's DeepStack mergers feeding the first LM layers) and a
    ``videos`` modality through the same tower and merger (``inputs_from: images``: one set of weights)."""
    from mimo_spec.interop import hf_qwen_vision as hq

    mt = config.model_type
    lm = _clean(_feature(hw.gpt_params_from_hf, config, where=where))
    if mt == "qwen2_5_vl":  # a video's temporal positions step by tokens_per_second * second_per_grid_ts
        lm["mrope_tokens_per_second"] = float(config.vision_config.tokens_per_second)
    if mt in ("qwen3_vl", "qwen3_vl_moe"):  # each frame group of a video is its own item (timestamps between them)
        lm["mrope_frames_as_items"] = True
    ignore = [r"(^|\.)lm_head\.weight$"] if lm["tie_embeddings"] else []
    enc, merger = _feature(hq.vision_params_from_hf, config.vision_config, where=where)
    subs: dict[str, Any] = {"encoders": {"vit": {"module": "qwen_vit", "params": enc}},
                            "input_projections": {"vit": {"module": "patch_merger", "params": merger}}}
    deep = list(enc.get("deepstack_layers") or [])
    if deep:
        subs["deepstack_projections"] = [{"module": "patch_merger", "params": hq.deepstack_merger_params(merger)}
                                         for _ in deep]
    images = {"module": "modality", "params": {"special_token_id": config.image_token_id, "item_kind": "image"},
              "submodules": subs}
    videos = {"module": "modality", "params": {"special_token_id": config.video_token_id, "item_kind": "video",
                                               "inputs_from": "images"}}
    cfg = {"model": {"module": "gpt", "params": lm}, "modalities": {"images": images, "videos": videos}}
    # config.json ids our model does not use, for export_hf to write back (hf_export.HF_CONFIG_KEYS)
    extras = {k: getattr(config, k) for k in ("vision_start_token_id", "vision_end_token_id")
              if isinstance(getattr(config, k, None), int)}
    text_ids = {k: getattr(config.text_config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    extras["text_config"] = {k: v for k, v in text_ids.items() if v is None or isinstance(v, (int, list))}
    cfg["hf_config"] = extras

    def vision(part: int):
        def make(keys: list[str]) -> hw.Plan:
            plans = hq.vision_import_plan(keys)
            return plans[part] if part < 2 else {f"{j}.{k}": v for j, p in enumerate(plans[2]) for k, v in p.items()}
        return make

    base = "modalities.images."
    extra = [(f"{base}encoders.vit.", vision(0)), (f"{base}input_projections.vit.", vision(1))]
    if deep:
        extra.append((f"{base}deepstack_projections.", vision(2)))
    if mt == "qwen3_vl_moe":  # its releases store the fused experts transposed, transformers' saves do not
        return _Conversion(cfg, True, [], ignore=ignore, extra=extra, experts_by_shape=("language_model.", lm))
    return _Conversion(cfg, True, [("language_model.", "gpt", lm)], ignore=ignore, extra=extra)


# --------------------------------------------------------------------------- sources


def _open(source: Any) -> tuple[Any, HFCheckpoint | None, dict[str, torch.Tensor] | None, str]:
    """(HF config, checkpoint or None, state dict or None, a name for messages)."""
    if isinstance(source, (str, Path)):
        ckpt = HFCheckpoint(source)
        model_type = ckpt.config.get("model_type")
        where = str(ckpt.path / "config.json")
        if not isinstance(model_type, str) or model_type not in SUPPORTED:
            architectures = ckpt.config.get("architectures")
            shown = ", ".join(map(str, architectures)) if isinstance(architectures, list) else str(architectures or "")
            raise _unsupported(repr(model_type) if not isinstance(model_type, str) else model_type, shown, where)
        return _auto_config(ckpt.path), ckpt, None, where
    config = getattr(source, "config", None)
    if isinstance(source, nn.Module) and config is not None and hasattr(config, "model_type"):
        if config.model_type not in SUPPORTED:
            raise _unsupported(config.model_type, type(source).__name__, type(source).__name__)
        kwargs = getattr(getattr(source, "generation_config", None), "generation_kwargs", None)
        if isinstance(kwargs, dict) and kwargs:  # a release's token ids live there (Janus's boi_token_id)
            import copy

            config = copy.copy(config)
            config.mimo_generation_kwargs = dict(kwargs)
        return config, None, source.state_dict(), type(source).__name__
    raise InputError(f"cannot import a {type(source).__name__}", path="source",
                     hint="pass a Hugging Face checkpoint directory or a transformers model (PreTrainedModel)")


def _auto_config(path: Path) -> Any:
    try:
        from transformers import AutoConfig
    except ImportError:
        raise ConfigError("importing Hugging Face checkpoints needs transformers", path="source",
                          hint="pip install 'mimo-spec[hf]'") from None
    try:
        # trust_remote_code=False, never None: None makes transformers ask on stdin (jobs have no terminal)
        return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers' own validation of the values in config.json
        raise InputError(f"transformers cannot read config.json: {e}", path=str(path / "config.json"),
                         hint="fix or re-download config.json") from None


def import_hf(source: Any, *, dtype: Any = None, device: str | torch.device = "cpu") -> tuple[dict[str, Any], nn.Module]:
    """Import a Hugging Face model: ``(cfg, model)``.

    Args:
        source: a local checkpoint directory (config.json + model.safetensors, or
            shards with model.safetensors.index.json) or a transformers model.
        dtype: the weights' dtype ("float32", "bfloat16", a torch.dtype); None: the
            checkpoint's main floating dtype (what most of its numbers are stored in).
        device: where the weights go (read there straight from the files).

    Raises InputError (naming the file and a fix) for a directory without
    config.json, an unsupported architecture, missing or unexpected tensors,
    shape mismatches and truncated files, before any weight is read.
    """
    from mimo_spec.builders.build import _check_device, _skip_init, build_model, build_module, parse_dtype

    device = _check_device(device) or torch.device("cpu")  # a bad name refused before the import's work
    config, ckpt, state, where = _open(source)
    conv = _convert(config, where)
    available = ckpt.meta() if ckpt is not None else {k: v.to("meta") for k, v in state.items()}
    target = parse_dtype(dtype) or hw.main_dtype(available.values())
    if conv.whole_model:
        conv.cfg["dtype"] = _DTYPE_NAMES.get(target, str(target).removeprefix("torch."))
        model = build_model(conv.cfg, device="meta", dtype=target)
    else:
        with _skip_init(True):
            model = build_module(conv.cfg, kind="encoder", device="meta")
    try:
        plan = conv.plan(list(available), {k: tuple(v.shape) for k, v in available.items()},
                         str(ckpt.path) if ckpt is not None else where, on_disk=ckpt is not None)
    except KeyError as e:  # a component's anchor tensor is absent: nothing to convert from
        raise InputError(f"missing tensors: {e.args[0].split('; pass prefix=')[0]}", path=str(ckpt.path) if ckpt else where,
                         hint="the checkpoint does not match its config.json (or is incomplete)") from None
    for key, value in conv.constants.items():  # set before loading: the loaders check that nothing is left meta
        owner, _, name = key.rpartition(".")
        model.get_submodule(owner).register_buffer(name, value.to(device))
    expected = {k: v for k, v in model.state_dict().items() if k not in conv.constants}
    check_plan(plan, available, expected, list(_ALWAYS_IGNORED) + conv.ignore,
               str(ckpt.path) if ckpt is not None else where)
    if ckpt is not None:
        stream_into(model, plan, ckpt, target, device)
    else:
        load_from_state_dict(model, plan, state, target)
        model.to(device)
    return conv.cfg, model


def import_hf_to_dir(source: Any, output_dir: str | Path, *, dtype: Any = None,
                     overwrite: bool = False) -> tuple[Path, Path]:
    """Import ``source`` and write ``output_dir/config.yaml`` (our schema) and ``output_dir/model.safetensors``.

    Returns ``(yaml_path, weights_path)``. Nothing is written unless the import
    succeeds; files already in ``output_dir`` are replaced only with ``overwrite``.
    ``load_imported(output_dir)`` (or ``build_model`` + ``load_weights``) rebuilds the model.
    """
    from omegaconf import OmegaConf

    import mimo_spec
    from mimo_spec.weights import save_weights

    out = Path(output_dir)
    if isinstance(source, (str, Path)) and out.resolve() == Path(source).resolve():
        raise InputError("the output directory is the checkpoint directory", path=str(out),
                         hint="write the import to another directory")
    names = ("config.yaml", "model.safetensors")
    refuse_clashes(out, names, overwrite)  # before the import's work, not after
    cfg, model = import_hf(source, dtype=dtype)
    how = ("build_model('config.yaml') then mimo_spec.weights.load_weights(model, 'model.safetensors')"
           if "model" in cfg else
           "build_module(node, kind='encoder'), or paste the node under a modality's encoders")
    header = (f"# Imported from {source if isinstance(source, (str, Path)) else type(source).__name__} "
              f"by mimo-spec {mimo_spec.__version__}.\n# Rebuild: mimo_spec.interop.load_imported(<this dir>), "
              f"or {how}.\n")

    def write(tmp: Path) -> None:
        save_weights(model, tmp / "model.safetensors")
        (tmp / "config.yaml").write_text(header + OmegaConf.to_yaml(OmegaConf.create(cfg)))

    publish(out, write, overwrite=overwrite, expect=names)
    return out / "config.yaml", out / "model.safetensors"


def load_imported(directory: str | Path, *, device: Any = None) -> tuple[dict[str, Any], nn.Module]:
    """Rebuild what ``import_hf_to_dir`` wrote: ``(cfg, model)`` with the weights loaded."""
    from omegaconf import OmegaConf

    from mimo_spec.builders.build import _skip_init, build_model, build_module
    from mimo_spec.spec import load_yaml_file
    from mimo_spec.weights import load_weights

    directory = Path(directory)
    path = directory / "config.yaml"
    if not path.is_file():
        raise InputError("no config.yaml in the directory", path=str(directory),
                         hint="point at a directory written by import_hf_to_dir (mimo-spec action=import)")
    cfg = OmegaConf.to_container(load_yaml_file(path), resolve=True)
    if "model" in cfg:
        model = build_model(cfg, device="meta", dtype=cfg.get("dtype"))
    else:
        with _skip_init(True):
            model = build_module(cfg, kind="encoder", device="meta")
    load_weights(model, directory / "model.safetensors")
    return cfg, model.to(device) if device is not None else model
