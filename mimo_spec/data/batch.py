"""Batches: samples -> the padded keyword batch ``MimoModel`` takes, and that batch on a device.

A leaf module (it imports torch, ``mimo_spec.loss`` and ``mimo_spec.errors`` only), so the data
loader, the training step, the parallel runners and the jobs all share one copy.

A sample (what ``dataset[i]`` returns)::

    {"input_ids": LongTensor (S,), "labels": LongTensor (S,),      # -100 = no loss
     "items":     {modality: {encoder: {kwarg: tensor (n, ...)}}},  # input modalities with n > 0
     "num_items": {modality: n},                                    # every input modality, 0 included
     "targets":   {modality: tensor (n, ...)}}                      # output modalities with n > 0
"""

from __future__ import annotations

from typing import Any

import torch

from mimo_spec.errors import DataError, InputError
from mimo_spec.loss import IGNORE_INDEX


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
    if any("rejected_input_ids" in s for s in samples):  # preference pairs: two rows each
        return collate_pairs(samples, pad_id)
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


def collate_pairs(samples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Preference pairs (samples with ``rejected_input_ids`` / ``rejected_labels``) -> a batch of two adjacent
    rows per pair: row ``2p`` the chosen conversation, row ``2p + 1`` the rejected one, both with the pair's
    items (decoded once, given to both rows). A sample without a pair (a filler for a skipped one) becomes two
    filler rows. Besides :func:`collate`'s keys: ``pair_valid`` (P,) bool, true where both rows have a counted
    label, and ``num_tokens``: the number of valid pairs (what a preference loss is averaged over)."""
    rows = []
    for s in samples:
        if "rejected_input_ids" in s:
            shared = {k: s[k] for k in ("items", "num_items", "targets") if k in s}
            rows += [{"input_ids": s["input_ids"], "labels": s["labels"], **shared},
                     {"input_ids": s["rejected_input_ids"], "labels": s["rejected_labels"], **shared}]
        else:
            rows += [filler_sample(s)] * 2
    batch = collate(rows, pad_id)
    counted = (batch["labels"][:, 1:] != IGNORE_INDEX).any(1).view(-1, 2)
    batch["pair_valid"] = counted.all(1)
    batch["num_tokens"] = int(batch["pair_valid"].sum())
    return batch


def pad_batch(batch: dict[str, Any], seq_len: int, pad_id: int) -> dict[str, Any]:
    """``batch`` right-padded to ``seq_len`` positions (as if collated with a longer sample): pad ids,
    ignored labels, mask 0 (``attention_mask`` and a ``loss_mask``). Packed rows (``document_ids``) give
    the added positions a document id of their own in each row (one above the row's largest), so no
    real token attends to them or predicts them whatever the row ended with. Returns ``batch`` itself
    when it is that long already."""
    have = int(batch["input_ids"].shape[1])
    if have >= seq_len:
        return batch
    extra = seq_len - have
    out = dict(batch)
    for key, value in (("input_ids", int(pad_id)), ("labels", IGNORE_INDEX), ("attention_mask", 0),
                       ("loss_mask", 0)):
        t = batch.get(key)
        if t is None and key in ("attention_mask", "loss_mask"):  # optional
            continue
        out[key] = torch.cat([t, torch.full((t.shape[0], extra), value, dtype=t.dtype)], dim=1)
    docs = batch.get("document_ids")
    if docs is not None:  # one fresh id per row: positions restart there and attention stays apart
        fresh = docs.amax(dim=1, keepdim=True) + 1 if docs.shape[1] else torch.zeros_like(docs[:, :1])
        out["document_ids"] = torch.cat([docs, fresh.expand(docs.shape[0], extra)], dim=1)
    return out


def filler_sample(sample: dict) -> dict:
    """A filler sample (fixed batch shapes): one ignored token, no modality item."""
    ids = sample["input_ids"][:1]
    return {"input_ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX), "num_items": {}, "items": {}}


def empty_parts(model) -> dict[str, dict]:
    """No item of each of ``model``'s modalities: {"inputs": {modality: {encoder: {kwarg: (0, ...)}}},
    "targets": {modality: (0, ...)}}. A data-parallel share without an item of a modality the global
    batch has gets these, so its rank runs the encoder / decoder (on nothing) in step with the others."""
    g = torch.Generator()  # example inputs draw from it: the run's global RNG stays untouched
    inputs = {name: mod.example_inputs(0, generator=g) for name, mod in model.modalities.items() if mod.has_input}
    targets = {name: mod.example_targets(0, generator=g)
               for name, mod in model.modalities.items() if mod.has_output}
    return {"inputs": inputs, "targets": targets}


def to_device(x, device: torch.device | str, keep: frozenset[str] | set[str] = frozenset()):
    """Tensors, and nested dicts of them (``modality_inputs``), moved to ``device``; entries named in
    ``keep`` (items' grids: host data, see :func:`host_keys`) stay where they are."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: v if k in keep else to_device(v, device, keep) for k, v in x.items()}
    return x


def host_keys(model) -> frozenset[str]:
    """Input names ``model``'s encoders keep on the host (their items' grids, e.g. ``image_grid_thw``)."""
    mods = getattr(model, "modalities", None) or {}
    return frozenset(k for m in mods.values() for e in getattr(m, "encoders", {}).values()
                     for k in (getattr(e, "grid_inputs", None) or {}))


def model_kwargs(batch: dict, device: torch.device | str, model=None) -> dict:
    """The collated batch as MimoModel.forward keyword arguments, on ``device``. A packed batch's
    ``document_ids`` go with them: the model restarts positions and keeps attention inside each document
    (its loss, with the same ids, counts no document's first token). Given ``model``, the items' grids
    stay on the host and positions that depend on the items (M-RoPE) are computed here, on the host,
    so the forward pass does not read token ids back from the device."""
    keep = host_keys(model) if model is not None else frozenset()
    kw = {"input_ids": to_device(batch["input_ids"], device), "labels": to_device(batch["labels"], device),
          "modality_inputs": to_device(batch.get("modality_inputs") or {}, device, keep)}
    positions = getattr(model, "position_ids", None)
    if callable(positions) and batch.get("position_ids") is None:
        pos = positions(batch["input_ids"], batch.get("modality_inputs") or {},
                        document_ids=batch.get("document_ids"))
        if pos is not None:
            kw["position_ids"] = to_device(pos, device)
    elif batch.get("position_ids") is not None:
        kw["position_ids"] = to_device(batch["position_ids"], device)
    if batch.get("document_ids") is not None:
        kw["document_ids"] = to_device(batch["document_ids"], device)
    if batch.get("output_targets"):
        kw["output_targets"] = to_device(batch["output_targets"], device)
    return kw
