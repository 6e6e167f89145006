"""Model weights on disk: safetensors only (never pickle), written atomically."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import torch
import torch.nn as nn

from mimo_spec.atomic import atomic_path
from mimo_spec.errors import CheckpointError, StorageError


def write_failure(e: BaseException) -> str | None:
    """Why a write was refused by the disk or the folder (full, read-only, over quota), or None when
    ``e`` is something else. safetensors reports I/O failures as its own SafetensorError, not OSError."""
    from safetensors import SafetensorError

    if isinstance(e, StorageError):
        return getattr(e, "reason", None) or str(e)
    if isinstance(e, OSError):
        return str(e.strerror or e)
    if isinstance(e, SafetensorError):
        m = re.search(r"I/O error: (.*?)\s*(\(os error \d+\)|$)", str(e))
        return m.group(1) if m else None
    return None


def check_regular_file(path: Path, what: str = "file") -> None:
    """A CheckpointError unless ``path`` is an existing regular file (a FIFO or device would block)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {path}", path=str(path)) from None
    except OSError as e:
        raise CheckpointError(f"cannot read {what}: {e.strerror or e}", path=str(path)) from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{what} is not a regular file: {path}", path=str(path))


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
    try:
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "producer": "mimo-spec"})
    except Exception as e:  # noqa: BLE001 - only a refused write is turned into a StorageError
        why = write_failure(e)
        if why is None:
            raise
        err = StorageError(f"cannot write {path}: {why}", path=str(path),
                           hint="free disk space or make the folder writable")
        err.reason = why
        raise err from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only folder: nothing was written there either
            pass
    return path


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> nn.Module:
    """Load a safetensors file into ``model``; an unreadable file, missing / unexpected keys and shape
    mismatches raise a CheckpointError that names them (the model is untouched then)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    check_regular_file(path, "weights file")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as e:
        raise CheckpointError(f"cannot read safetensors file: {e}", path=str(path),
                         hint="the file is truncated or not a safetensors file") from None
    own = model.state_dict()
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        raise CheckpointError("shape mismatch: " + "; ".join(mismatched[:10]), path=str(path),
                         hint="the weights were saved from a different config")
    missing = [k for k in own if k not in state and not _is_tied_copy(model, k, state)]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}")
        raise CheckpointError("; ".join(parts), path=str(path), hint="the weights were saved from a different config")
    meta = any(p.device.type == "meta" for p in model.parameters())
    if meta:  # assigned, not copied: own the memory (load_file's tensors map the file)
        state = {k: v.clone() for k, v in state.items()}
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
