"""Model weights on disk: safetensors only (never pickle), written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from mimo_spec.errors import InputError


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Write ``model.state_dict()`` to a safetensors file (temporary file, then rename).

    Tied parameters are stored once (safetensors refuses shared storage).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state, seen = {}, {}
    for key, tensor in model.state_dict().items():
        ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.device.type != "meta" and ptr in seen:
            continue  # a tied weight: load_weights restores it through the tie
        seen[ptr] = key
        state[key] = tensor.detach().contiguous().cpu()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(state, str(tmp), metadata={"format": "pt", "producer": "mimo-spec"})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> nn.Module:
    """Load a safetensors file into ``model``; missing / unexpected keys and shape mismatches
    raise an InputError that names them."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise InputError(f"weights file not found: {path}", path=str(path))
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"cannot read safetensors file: {e}", path=str(path),
                         hint="the file is truncated or not a safetensors file") from None
    own = model.state_dict()
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        raise InputError("shape mismatch: " + "; ".join(mismatched[:10]), path=str(path),
                         hint="the weights were saved from a different config")
    missing = [k for k in own if k not in state and not _is_tied_copy(model, k, state)]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}")
        raise InputError("; ".join(parts), path=str(path), hint="the weights were saved from a different config")
    meta = any(p.device.type == "meta" for p in model.parameters())
    model.load_state_dict(state, strict=False, assign=meta)
    if meta and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def _is_tied_copy(model: nn.Module, key: str, state: dict[str, torch.Tensor]) -> bool:
    """True when ``key`` shares storage with another parameter present in ``state``."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if key not in params:
        return False
    target = params[key]
    return any(other is target and name in state for name, other in params.items() if name != key)
