"""Training data: the ``data`` config, dataset construction and batch collation.

Sources (``data.source``):

- ``synthetic`` (``mimo_spec.data.synthetic``): generated from the model's own
  modalities, so any composed model trains with nothing on disk.
- ``llava_json`` (``mimo_spec.data.llava_json``): LLaVA-style conversation JSON
  with image and WAV files.

A sample (what ``dataset[i]`` returns; the same index always gives the same sample)::

    {"input_ids": LongTensor (S,), "labels": LongTensor (S,),      # -100 = no loss
     "items":     {modality: {encoder: {kwarg: tensor (n, ...)}}},  # input modalities with n > 0
     "num_items": {modality: n},                                    # every input modality, 0 included
     "targets":   {modality: tensor (n, ...)}}                      # output modalities with n > 0

``collate(samples, pad_id)`` right-pads them into the keyword batch ``MimoModel`` takes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import pydantic
import torch
from pydantic import BaseModel, ConfigDict, Field

from mimo_spec.errors import ConfigError, DataError, InputError, Problem, did_you_mean
from mimo_spec.data.preprocess import CLIP_MEAN, CLIP_STD
from mimo_spec.data.tokenizer import IGNORE_INDEX, ChatTemplate

SOURCES = ("synthetic", "llava_json")


# ------------------------------------------------------------------------------------ config

class TemplateConfig(BaseModel):
    """``data.template``: the chat layout (see ``ChatTemplate``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    system: str = ""
    user_prefix: str = "USER: "
    user_suffix: str = " "
    assistant_prefix: str = "ASSISTANT: "
    assistant_suffix: str = ""

    def build(self) -> ChatTemplate:
        return ChatTemplate(**self.model_dump())


class CommonDataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # inf / nan are refused in every float
    source: str = "synthetic"
    seed: int = Field(0, ge=0, le=2**63 - 1)
    # "byte" (built in) or a local Hugging Face tokenizer directory
    tokenizer: str = "byte"
    # byte tokenizer: bos/eos/pad ids are special_tokens_start .. special_tokens_start + 2
    special_tokens_start: int = Field(256, ge=256)
    # longest sample in tokens; null = the language model's max_seq_len
    max_seq_len: int | None = Field(None, ge=8)
    template: TemplateConfig = TemplateConfig()
    image_mean: list[float] = Field(default_factory=lambda: list(CLIP_MEAN), min_length=1)
    image_std: list[Annotated[float, Field(gt=0.0)]] = Field(default_factory=lambda: list(CLIP_STD), min_length=1)


class SyntheticDataConfig(CommonDataConfig):
    """``data.source: synthetic``: see ``mimo_spec.data.synthetic``."""

    source: Literal["synthetic"] = "synthetic"
    num_samples: int = Field(4096, ge=1)
    eval_samples: int = Field(64, ge=0)
    max_items_per_sample: int = Field(2, ge=1)
    text_only_fraction: float = Field(0.2, ge=0.0, le=1.0)
    # share of samples that ask for an output modality (when the model has one)
    generation_fraction: float = Field(0.3, ge=0.0, le=1.0)
    # std of Gaussian noise added to synthetic images and audio features
    noise: float = Field(0.05, ge=0.0)


class LlavaJsonDataConfig(CommonDataConfig):
    """``data.source: llava_json``: see ``mimo_spec.data.llava_json``."""

    source: Literal["llava_json"] = "llava_json"
    path: str
    eval_path: str | None = None
    eval_fraction: float = Field(0.02, ge=0.0, lt=1.0)
    image_folder: str | None = None
    audio_folder: str | None = None
    truncation: Literal["drop", "truncate"] = "drop"
    image_resize: Literal["pad", "crop", "squash"] = "pad"
    image_modality: str | None = None
    audio_modality: str | None = None
    max_samples: int | None = Field(None, ge=1)
    check_files: bool = True


DataConfig = Union[SyntheticDataConfig, LlavaJsonDataConfig]
_CONFIG_CLASSES = {"synthetic": SyntheticDataConfig, "llava_json": LlavaJsonDataConfig}


def _plain(cfg) -> dict:
    if isinstance(cfg, BaseModel):
        return cfg.model_dump()
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"expected a mapping, got {type(cfg).__name__}", path="data")
    return dict(cfg)


def validate_data_config(data_cfg) -> DataConfig:
    """A ``data`` config (dict / DictConfig / model) -> its pydantic model.

    Raises one ConfigError listing every problem as ``data.<key>``, with a
    did-you-mean hint for misspelt keys.
    """
    if isinstance(data_cfg, (SyntheticDataConfig, LlavaJsonDataConfig)):
        return data_cfg
    # a mandatory value left unset in YAML (``???``) counts as missing
    raw = {k: v for k, v in _plain(data_cfg).items() if not (isinstance(v, str) and v == "???")}
    source = raw.get("source", "synthetic")
    if source not in _CONFIG_CLASSES:
        raise ConfigError(f"unknown data source {source!r}", path="data.source", hint=did_you_mean(source, SOURCES))
    cls = _CONFIG_CLASSES[source]
    try:
        return cls(**raw)
    except pydantic.ValidationError as e:
        raise ConfigError([_problem(err, cls) for err in e.errors()]) from None


def _problem(err: dict, cls: type[BaseModel]) -> Problem:
    loc = [str(p) for p in err["loc"]]
    path = "data." + ".".join(loc)
    if err["type"] == "extra_forbidden":
        fields = cls.model_fields if len(loc) == 1 else TemplateConfig.model_fields
        return Problem(path, f"unknown key for source {cls.model_fields['source'].default!r}",
                       did_you_mean(loc[-1], fields))
    if err["type"] == "missing":
        return Problem(path, f"required for source {cls.model_fields['source'].default!r}", f"set {path}=...")
    return Problem(path, f"{err['msg'].lower()}, got {err.get('input')!r}",
                   f"see conf/data/{cls.model_fields['source'].default}.yaml for the expected values")


# ----------------------------------------------------------------------------------- datasets

def build_dataset(data_cfg, model, tokenizer, split: Literal["train", "eval"] = "train") -> torch.utils.data.Dataset:
    """The map-style dataset of ``split`` for ``model``, as ``data_cfg`` describes.

    ``dataset[i]`` depends only on the config (seed included) and ``i``, so a
    resumed run sees identical data. Datasets expose ``num_dropped`` and
    ``drop_reasons`` ({reason: count}) for the trainer to report.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    cfg = validate_data_config(data_cfg)
    if cfg.source == "synthetic":
        from mimo_spec.data.synthetic import SyntheticDataset

        return SyntheticDataset(cfg, model, tokenizer, split)
    from mimo_spec.data.llava_json import LlavaJsonDataset

    return LlavaJsonDataset(cfg, model, tokenizer, split)


def max_length(cfg: DataConfig, model) -> int:
    """The sample length limit: ``data.max_seq_len``, which may not exceed the LM's ``max_seq_len``."""
    lm_max = getattr(model.language_model, "max_seq_len", None)
    if cfg.max_seq_len is None:
        if lm_max is None:
            raise ConfigError("the language model has no max_seq_len", path="data.max_seq_len",
                              hint="set data.max_seq_len")
        return int(lm_max)
    if lm_max is not None and cfg.max_seq_len > lm_max:
        raise ConfigError(f"{cfg.max_seq_len} exceeds the language model's max_seq_len {lm_max}",
                          path="data.max_seq_len", hint="lower it, or raise model.params.max_seq_len")
    return int(cfg.max_seq_len)


# ------------------------------------------------------------------------------------- prompts

def encode_prompt(prompt: str, model, tokenizer, data_cfg, *, images=(), audio=()) -> tuple[torch.Tensor, dict]:
    """A user prompt with image / WAV files -> (input_ids (1, S), modality_inputs) ready to generate from.

    Laid out with the training data's chat template and ending with the assistant
    prefix. ``<image>`` / ``<audio>`` tags in the prompt place the files in order;
    without tags the files go first, one per line (as in training). Files are
    preprocessed exactly as ``llava_json`` does (mean/std from ``data_cfg``).
    """
    from mimo_spec.data.llava_json import AUDIO_TAG, IMAGE_TAG
    from mimo_spec.data.preprocess import MediaProcessor
    from mimo_spec.data.tokenizer import Tag, encode_conversation, reserved_token_ids, resolve_path

    cfg = validate_data_config(data_cfg)
    media = MediaProcessor(model, image_modality=getattr(cfg, "image_modality", None),
                           audio_modality=getattr(cfg, "audio_modality", None), image_mean=cfg.image_mean,
                           image_std=cfg.image_std, image_resize=getattr(cfg, "image_resize", "pad"))
    tags, modality_inputs, prefix = {}, {}, ""
    kinds = [(IMAGE_TAG, list(images), media.image_modality, media.image),
             (AUDIO_TAG, list(audio), media.audio_modality, media.audio)]
    order = list(model.modalities)  # untagged files go first in the model's modality order, as in synthetic data
    for tag, files, name, load in sorted(kinds, key=lambda k: order.index(k[2]) if k[2] in order else len(order)):
        n_tags = prompt.count(tag)
        if (files or n_tags) and name is None:
            raise InputError(f"the prompt has {tag} input but the model has no such input modality", path="prompt")
        if files and n_tags == 0:
            prefix += f"{tag}\n" * len(files)
        elif n_tags != len(files):
            raise InputError(f"{n_tags} {tag} tag(s) in the prompt but {len(files)} file(s)", path="prompt",
                             hint="each tag takes the next file, in order")
        if files:
            loaded = [load(resolve_path(f), "prompt") for f in files]
            modality_inputs[name] = {enc: {kw: torch.cat([x[enc][kw] for x in loaded]) for kw in kws}
                                     for enc, kws in loaded[0].items()}
            tags[tag] = Tag(name, model.modalities[name].special_token_id, media.tokens_per_item[name])
    prompt = prefix + prompt
    enc = encode_conversation(tokenizer, [("user", prompt)], tags, cfg.template.build(), add_generation_prompt=True,
                              reserved=set(reserved_token_ids(model)), where="prompt")
    return torch.tensor([enc.input_ids], dtype=torch.long), modality_inputs


# ------------------------------------------------------------------------------------ collate

def _cat_items(parts: list[torch.Tensor], where: str) -> torch.Tensor:
    shapes = {tuple(p.shape[1:]) for p in parts}
    if len(shapes) > 1:
        raise DataError(f"items of different shapes {sorted(shapes)} cannot share a batch", path=where,
                         hint="resize images / pad audio features to one shape")
    return torch.cat(parts, dim=0)


def collate(samples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Samples -> a batch, right-padded to the longest sample.

    Returns ``input_ids``, ``labels``, ``attention_mask`` (B, S) long (mask 1 = real
    token); ``modality_inputs`` {modality: {encoder: {kwarg: (N, ...)}}} with items
    concatenated sample by sample (modalities with no item in the batch left out);
    ``items_per_sample`` {modality: [n_b] * B}; ``output_targets`` {modality: (N, ...)}
    when any sample has one; ``num_tokens``: how many labels the loss counts (label
    != -100 after the model's one-token shift, i.e. positions 1..S-1).
    """
    if not samples:
        raise InputError("cannot collate an empty list of samples", path="batch")
    b = len(samples)
    seq = max(int(s["input_ids"].shape[0]) for s in samples)
    input_ids = torch.full((b, seq), int(pad_id), dtype=torch.long)
    labels = torch.full((b, seq), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((b, seq), dtype=torch.long)
    for i, s in enumerate(samples):
        n = int(s["input_ids"].shape[0])
        input_ids[i, :n] = s["input_ids"]
        labels[i, :n] = s["labels"]
        attention_mask[i, :n] = 1

    names = sorted({m for s in samples for m in s.get("num_items", {})})
    items_per_sample = {m: [int(s.get("num_items", {}).get(m, 0)) for s in samples] for m in names}
    modality_inputs: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for m in names:
        with_items = [s["items"][m] for s in samples if s.get("num_items", {}).get(m, 0) > 0]
        if not with_items:
            continue
        modality_inputs[m] = {
            enc: {kw: _cat_items([it[enc][kw] for it in with_items], f"modality_inputs.{m}.{enc}.{kw}")
                  for kw in with_items[0][enc]}
            for enc in with_items[0]}

    targets: dict[str, list[torch.Tensor]] = {}
    for s in samples:
        for m, t in (s.get("targets") or {}).items():
            if t.shape[0] > 0:
                targets.setdefault(m, []).append(t)

    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
             "modality_inputs": modality_inputs, "items_per_sample": items_per_sample,
             "num_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum())}
    if targets:
        batch["output_targets"] = {m: _cat_items(t, f"output_targets.{m}") for m, t in targets.items()}
    return batch
