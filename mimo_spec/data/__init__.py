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

        dataset = SyntheticDataset(cfg, model, tokenizer, split)
    else:
        from mimo_spec.data.samples import RecordDataset, SampleBuilder
        from mimo_spec.data.sources import open_source

        # the source only indexes its files here; samples are read, tokenised and decoded when asked for
        dataset = RecordDataset(open_source(cfg, split), SampleBuilder(cfg, model, tokenizer))
    if split == "train" and cfg.condition_dropout > 0 and any(
            getattr(m, "has_output", False) for m in model.modalities.values()):
        from mimo_spec.data.targets import ConditionDropout

        dataset = ConditionDropout(dataset, model, cfg.condition_dropout, cfg.seed, tokenizer.pad_id,
                                   getattr(tokenizer, "bos_id", None))
    return dataset


# ------------------------------------------------------------------------------------- prompts

def encode_prompt(prompt: str, model, tokenizer, data_cfg, *, images=(), audio=(),
                  videos=()) -> tuple[torch.Tensor, dict]:
    """A user prompt with image / audio / video files -> (input_ids (1, S), modality_inputs) ready to generate from.

    Laid out with the training data's chat template and ending with the assistant
    prefix. ``data.image_token`` / ``data.audio_token`` tags (``<image>`` / ``<audio>``) in the prompt
    place the files in order; without tags the files go first, one per line (as in training). Files
    are decoded exactly as training samples are (image processor, audio overflow split).
    """
    from mimo_spec.data.samples import SampleBuilder

    return SampleBuilder(validate_data_config(data_cfg), model, tokenizer).prompt(prompt, images, audio,
                                                                                  videos=videos)
