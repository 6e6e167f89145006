"""Training checkpoints: safetensors + JSON in a folder, written atomically, last N kept.

Layout of ``<run>/checkpoints/step_000050/``:
  model.safetensors      model weights (mimo_spec.weights)
  optimizer.safetensors  optimizer state tensors, keyed ``<param index>.<name>``
  rng.safetensors        torch CPU (and CUDA) generator states
  state.json             step, data position, optimizer hyper-parameters, python RNG, config
Each checkpoint is written to a hidden temporary folder and renamed into place,
so a crash mid-save never leaves a half checkpoint; older ones are removed only
after the new one exists. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from mimo_spec.errors import InputError
from mimo_spec.weights import load_weights, save_weights

PREFIX = "step_"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    groups = meta["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise InputError(f"checkpoint has {len(groups)} optimizer parameter groups, this run has "
                         f"{len(optimizer.param_groups)}", path="checkpoint.optimizer",
                         hint="resume with the same freeze and train.param_groups settings")
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, extra: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically under ``ckpt_dir``; prune to the last ``keep_last``."""
    from safetensors.torch import save_file

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"{PREFIX}{step:06d}"
    tmp = ckpt_dir / f".tmp-{PREFIX}{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_weights(model, tmp / "model.safetensors")
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"torch_cuda_{i}"] = s
        save_file(rng, str(tmp / "rng.safetensors"))
        state = {"step": step, "optimizer": opt_meta, "python_rng": _py_rng_state(), **extra}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. SIGTERM right after a save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _py_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are ignored)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def load_checkpoint(path: Path, model, optimizer=None) -> dict[str, Any]:
    """Restore model (and optimizer, RNG) from a checkpoint folder; returns its state.json."""
    from safetensors.torch import load_file

    path = Path(path)
    state_file = path / "state.json"
    if not state_file.exists():
        raise InputError(f"not a checkpoint folder (no state.json): {path}", path=str(path),
                         hint="point at <run>/checkpoints/step_NNNNNN")
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"corrupt state.json: {e}", path=str(state_file)) from None
    load_weights(model, path / "model.safetensors")
    if optimizer is not None:
        try:
            tensors = load_file(str(path / "optimizer.safetensors"))
        except Exception as e:  # noqa: BLE001 - any read failure means a damaged checkpoint
            raise InputError(f"cannot read optimizer state: {e}", path=str(path / "optimizer.safetensors"),
                             hint="the checkpoint is damaged; resume from an earlier one") from None
        _restore_optimizer(optimizer, tensors, state["optimizer"])
        rng = load_file(str(path / "rng.safetensors"))
        torch.set_rng_state(rng["torch_cpu"])
        if torch.cuda.is_available():
            cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
            if cuda:
                torch.cuda.set_rng_state_all(cuda)
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))
    return state
