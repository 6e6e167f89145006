"""Checks on a batch given to ``MimoModel`` through the Python API: every mistake an InputError naming
the argument (``input_ids``, ``labels``, ``modality_embeddings.images``), never a raw IndexError from
an embedding lookup or a silently wrong loss.

Two kinds, so the forward pass stays free of host syncs under ``torch.compile(fullgraph=True)``:

- ``check_tensors``: types, dtypes, shapes, devices. Tensor metadata only, free when traced.
- ``check_values``: ids inside the vocabulary, labels inside it or -100, positions, and placeholder
  counts against the items given. They read values, so they run in eager mode only (never while
  compiling), as one batch of small reductions and one host sync.
"""

from __future__ import annotations

from typing import Any

import torch

from mimo_spec.errors import InputError

from mimo_spec.loss import IGNORE_INDEX  # noqa: E402,F401
_INDEX_DTYPES = (torch.int64, torch.int32)  # what an embedding lookup takes


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def key_path(path: str, key: Any) -> str:
    """``path.key`` for a mapping key; a key that is not a string is named by its type, never printed
    (a tensor used as a key would put its whole printout in the message)."""
    return f"{path}.{key}" if isinstance(key, str) else f"{path}.<{type(key).__name__} key>"


def check_mapping(value: Any, path: str, what: str) -> dict:
    """``value`` as a dict whose keys are strings; otherwise an InputError naming ``path``."""
    if not isinstance(value, dict):
        raise InputError(f"expected a mapping of {what}, got {type(value).__name__}", path=path)
    for key in value:
        if not isinstance(key, str):
            raise InputError(f"expected names (strings) as keys, got a {type(key).__name__}",
                             path=key_path(path, key), hint=f"{path} maps names to {what.split(' to ')[-1]}")
    return value


def check_devices(inputs: dict, device: torch.device, path: str) -> None:
    """Every tensor in the nested mapping ``inputs`` is on ``device`` (input_ids's); tensor metadata only."""
    for key, value in inputs.items():
        where = key_path(path, key)
        if isinstance(value, dict):
            check_devices(value, device, where)
        elif isinstance(value, torch.Tensor) and value.device != device:
            raise InputError(f"{where} is on {value.device} but input_ids is on {device}", path=where,
                             hint="put every tensor of the batch on one device"
                                  + (" (a meta tensor is a shape without values)" if value.is_meta else ""))


def _tensor(value: Any, path: str, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise InputError(f"expected {what} as a tensor, got {type(value).__name__}", path=path)
    return value


def _check_position_shape(model, position_ids: torch.Tensor, shape: tuple[int, ...]) -> None:
    """(B, S) or (1, S); with an LM that has ``mrope_section`` also (3, B, S) or (3, 1, S) (temporal,
    height and width positions, see :func:`mimo_spec.models.mrope.mrope_position_ids`). Shapes only."""
    got = tuple(position_ids.shape)
    if got in (shape, (1, shape[1])):
        return
    mrope = getattr(getattr(model, "language_model", None), "mrope_section", None) is not None
    if mrope:
        if got in ((3, *shape), (3, 1, shape[1])):
            return
        raise InputError(f"expected shape {shape} (same as input_ids) or (1, seq), or (3, {shape[0]}, {shape[1]}) "
                         f"for M-RoPE (temporal, height, width), got {got}", path="position_ids",
                         hint="3-D positions are (3, batch, seq): mimo_spec.models.mrope.mrope_position_ids")
    raise InputError(f"expected shape {shape} (same as input_ids) or (1, seq), got {got}", path="position_ids",
                     hint="3-D (temporal, height, width) positions need the language model's mrope_section "
                          "(model.params.mrope_section)" if position_ids.dim() == 3 else "")


def check_tensors(model, input_ids: Any, *, labels: Any = None, loss_mask: Any = None, document_ids: Any = None,
                  position_ids: Any = None, attention_mask: Any = None, modality_embeddings: Any = None,
                  modality_inputs: dict | None = None, router_mask: Any = None) -> None:
    """Raise InputError unless every batch tensor has a type, dtype, shape and device the model takes."""
    input_ids = _tensor(input_ids, "input_ids", "token ids (batch, seq)")
    if input_ids.dtype not in _INDEX_DTYPES:
        raise InputError(f"expected integer token ids (int64), got {input_ids.dtype}", path="input_ids",
                         hint="token ids index the vocabulary: pass input_ids.long()")
    if input_ids.dim() != 2:
        raise InputError(f"expected input_ids of shape (batch, seq), got {tuple(input_ids.shape)}", path="input_ids")
    device, shape = input_ids.device, tuple(input_ids.shape)
    if device.type == "meta" and not torch.compiler.is_compiling():
        weight = next(model.parameters(), None)
        if weight is not None and not weight.is_meta:
            raise InputError("input_ids is a meta tensor (a shape without values)", path="input_ids",
                             hint="pass real tensors, on the model's device")
    if device.type != "meta" and not torch.compiler.is_compiling() and any(p.is_meta for p in model.parameters()):
        missing = next(n for n, p in model.named_parameters() if p.is_meta)
        raise InputError(f"the model's weights are on the meta device (shapes without values), e.g. {missing}",
                         path="model", hint="build it on a real device (build_model(cfg, device='cpu')) or load "
                                            "every weight (mimo_spec.weights.load_weights) before calling it")
    checks = (("labels", labels, "int64"), ("loss_mask", loss_mask, "mask"), ("document_ids", document_ids, "int"),
              ("attention_mask", attention_mask, "mask"), ("position_ids", position_ids, "int"),
              ("router_mask", router_mask, "mask"))
    for name, value, kind in checks:
        if value is None:
            continue
        t = _tensor(value, name, f"shape {shape}")
        if name == "position_ids":
            _check_position_shape(model, t, shape)
        elif tuple(t.shape) != shape:
            raise InputError(f"expected shape {shape} (same as input_ids), got {tuple(t.shape)}", path=name)
        if kind == "int64" and t.dtype != torch.int64:
            raise InputError(f"expected int64 token ids (-100 where no loss is taken), got {t.dtype}", path=name,
                             hint="pass labels.long()")
        if kind == "int" and not _is_integer(t):
            raise InputError(f"expected an integer tensor, got {t.dtype}", path=name, hint=f"pass {name}.long()")
        if kind == "mask" and t.is_complex():
            raise InputError(f"expected a bool, integer or float mask, got {t.dtype}", path=name)
        if t.device != device:
            raise InputError(f"{name} is on {t.device} but input_ids is on {device}", path=name,
                             hint="put every tensor of the batch on one device")
    if modality_embeddings is None:
        return
    check_mapping(modality_embeddings, "modality_embeddings", "modality name to (items * tokens, hidden) embeddings")
    hidden = getattr(model.language_model, "hidden_size", None)
    # a modality whose encoders live on other ranks (split layouts) keeps its placeholder token
    known = [n for n, m in model.modalities.items() if m.has_input or m.special_token_id is not None]
    for name, value in modality_embeddings.items():
        path = f"modality_embeddings.{name}"
        if name not in known:
            raise InputError(f"unknown input modality {name!r}", path=path,
                             hint=f"this model's input modalities are: {', '.join(known) or 'none'}")
        if isinstance(modality_inputs, dict) and name in modality_inputs:
            raise InputError("given both as modality_embeddings and as modality_inputs", path=path,
                             hint="pass a modality's items once: encoded (embeddings) or raw (inputs)")
        t = _tensor(value, path, "embeddings (N, hidden)")
        if not t.is_floating_point():
            raise InputError(f"expected floating-point embeddings, got {t.dtype}", path=path)
        if t.dim() != 2 or (hidden is not None and t.shape[1] != hidden):
            raise InputError(f"expected shape (N, {hidden if hidden is not None else 'hidden'}) (one row per "
                             f"placeholder, the language model's hidden_size wide), got {tuple(t.shape)}", path=path)
        if t.device != device:
            raise InputError(f"{path} is on {t.device} but input_ids is on {device}", path=path,
                             hint="put every tensor of the batch on one device")


def expected_placeholders(model, modality_inputs: dict, modality_embeddings: dict | None,
                          output_targets: dict | None) -> dict[str, tuple[int, int]]:
    """argument path -> (token id, how many of it input_ids must hold), from shapes only."""
    out: dict[str, tuple[int, int]] = {}
    for name, mod in model.modalities.items():
        if mod.has_input and mod.special_token_id is not None:
            if modality_embeddings and name in modality_embeddings:
                out[f"modality_embeddings.{name}"] = (mod.special_token_id, int(modality_embeddings[name].shape[0]))
            elif name in modality_inputs:
                out[f"modality_inputs.{name}"] = (mod.special_token_id, int(sum(mod.item_tokens(modality_inputs[name]))))
            else:
                out[f"modality_inputs.{name}"] = (mod.special_token_id, 0)
        if output_targets and name in output_targets and mod.generation_token_id is not None:
            count = int(output_targets[name].shape[0]) * mod.num_generation_tokens
            out[f"output_targets.{name}"] = (mod.generation_token_id, count)
    return out


def check_values(model, input_ids: torch.Tensor, *, labels: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None,
                 placeholders: dict[str, tuple[int, int]] | None = None,
                 loss_mask: torch.Tensor | None = None) -> None:
    """Raise InputError for ids outside the vocabulary, labels outside it (other than -100), negative
    positions (or past max_seq_len with learned positions) and placeholder counts that do not match
    the items. Eager mode only: one host sync for all of it; nothing while compiling."""
    if torch.compiler.is_compiling() or input_ids.numel() == 0 or input_ids.is_meta:
        return
    lm = model.language_model
    stats = [*torch.aminmax(input_ids)]
    if labels is not None:
        stats += torch.aminmax(labels.masked_fill(labels == IGNORE_INDEX, 0))
    if position_ids is not None:
        stats += torch.aminmax(position_ids)
    placeholders = placeholders or {}
    stats += [(input_ids == token).sum() for token, _ in placeholders.values()]
    if loss_mask is not None and loss_mask.numel():  # a negative weight would turn the loss's sign
        stats.append((loss_mask < 0).any())
    values = torch.stack([s.to(torch.int64) for s in stats]).tolist()  # the one host sync
    if loss_mask is not None and loss_mask.numel() and values.pop():
        raise InputError(f"loss_mask holds a negative weight (min {float(loss_mask.min()):g})", path="loss_mask",
                         hint="weights are 0 (no loss) or positive: 1 counts a position once")
    vocab = getattr(lm, "vocab_size", None)
    low, high = values[0], values[1]
    if low < 0 or (vocab is not None and high >= vocab):
        bad = low if low < 0 else high
        raise InputError(f"token id {bad} is outside the vocabulary [0, {vocab if vocab is not None else '...'})",
                         path="input_ids", hint="every id must be below model.params.vocab_size and not negative")
    rest = values[2:]
    if labels is not None:
        (low, high), rest = rest[:2], rest[2:]
        if low < 0 or (vocab is not None and high >= vocab):
            bad = low if low < 0 else high
            raise InputError(f"label {bad} is outside the vocabulary [0, {vocab}) and is not the ignore "
                             f"index {IGNORE_INDEX}", path="labels",
                             hint=f"use token ids, or {IGNORE_INDEX} where no loss is taken")
    if position_ids is not None:
        (low, high), rest = rest[:2], rest[2:]
        limit = lm.max_seq_len if getattr(lm, "position_embedding_kind", None) == "learned" else None
        if low < 0 or (limit is not None and high >= limit):
            raise InputError(f"position {low if low < 0 else high} is outside [0, {limit if limit else '...'})",
                             path="position_ids", hint="positions count from 0"
                             + (f" and stay below max_seq_len {limit} (learned positions)" if limit else ""))
    for (path, (token, want)), have in zip(placeholders.items(), rest):
        if have != want:
            what = "generation" if path.startswith("output_targets") else "placeholder"
            raise InputError(f"input_ids hold {have} {what} tokens (id {token}) but {want} "
                             f"{'embeddings are' if what == 'placeholder' else 'target tokens are'} given",
                             path=path, hint="one placeholder per embedding, in sample order" if what == "placeholder"
                             else f"{model.modalities[path.split('.', 1)[1]].num_generation_tokens} generation "
                                  "tokens per target item, in sample order")
