"""Training data: the ``data`` config, dataset construction, batches and the training loader.

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

Modules, lowest first (each imports only those above it, never this package):
``batch`` (collate, to_device, model_kwargs; a leaf), ``preprocess`` (image / audio decoding),
``config`` (the pydantic ``data`` config and ``ChatTemplate``), ``tokenizer``, ``synthetic`` and
``llava_json`` (the datasets), ``loader`` (the training DataLoader and its resumable sampler).
"""

from __future__ import annotations

from typing import Literal

import torch

from mimo_spec.data.batch import (
    collate, empty_parts, filler_sample, model_kwargs, pad_batch, to_device)
from mimo_spec.data.config import (
    SOURCES, ChatTemplate, CommonDataConfig, DataConfig, LlavaJsonDataConfig, SyntheticDataConfig, max_length,
    validate_data_config)
from mimo_spec.errors import InputError

__all__ = ["SOURCES", "ChatTemplate", "CommonDataConfig", "DataConfig", "LlavaJsonDataConfig", "SyntheticDataConfig",
           "build_dataset", "collate", "empty_parts", "encode_prompt", "filler_sample", "max_length", "model_kwargs",
           "pad_batch", "to_device", "validate_data_config"]


# ----------------------------------------------------------------------------------- datasets

def build_dataset(data_cfg, model, tokenizer, split: Literal["train", "eval"] = "train") -> torch.utils.data.Dataset:
    """The map-style dataset of ``split`` for ``model``, as ``data_cfg`` describes.

    ``dataset[i]`` depends only on the config (seed included) and ``i``, so a
    resumed run sees identical data; ``dataset.token_length(i)`` is its token count (what packing plans
    with). A sample that cannot be used raises DataError (``mimo_spec.data.samples.Dropped`` for the
    length limit's drops): the loader skips it under ``data.on_bad_sample: skip``.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    cfg = validate_data_config(data_cfg)
    if cfg.source == "synthetic":
        from mimo_spec.data.synthetic import SyntheticDataset

        return SyntheticDataset(cfg, model, tokenizer, split)
    from mimo_spec.data.samples import RecordDataset, SampleBuilder
    from mimo_spec.data.sources import open_source

    # the source only indexes its files here; samples are read, tokenised and decoded when asked for
    return RecordDataset(open_source(cfg, split), SampleBuilder(cfg, model, tokenizer))


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
    enc = encode_conversation(tokenizer, [("user", prompt)], tags, cfg.template, add_generation_prompt=True,
                              reserved=set(reserved_token_ids(model)), where="prompt")
    return torch.tensor([enc.input_ids], dtype=torch.long), modality_inputs
