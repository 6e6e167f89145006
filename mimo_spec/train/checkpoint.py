"""Training checkpoints: safetensors + JSON in a folder, written atomically, last N kept.

Layout of ``<run>/checkpoints/step_000050/``:
  model.safetensors      model weights (mimo_spec.weights)
  optimizer.safetensors  optimizer state tensors, keyed ``<param index>.<name>``
  rng.safetensors        torch CPU (and CUDA) generator states
  state.json             step, data position, optimizer hyper-parameters, python RNG, config
Each checkpoint is written to a hidden temporary folder and renamed into place,
so a crash mid-save never leaves a half checkpoint; older ones are removed only
after the new one exists. Nothing is ever unpickled.

Runs with more than one process write the same folder with
torch.distributed.checkpoint instead (``.metadata`` + one ``__<rank>_0.distcp``
file per rank, and the same state.json / rng.safetensors): every rank writes its
own shards, tensors are stored in the single-process layout, and the folder
loads under any other layout or in one process (resharding on load).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from mimo_spec.components.te_backend import te_parameter_renames
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
    except OSError as e:  # e.g. a full disk: the previous checkpoints stay as they were
        shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(ckpt_dir)
        raise InputError(f"cannot write checkpoint {final.name}: {e.strerror or e}; "
                         + (f"the last good checkpoint is {kept[-1]}" if kept else "no earlier checkpoint exists"),
                         path=str(ckpt_dir), hint="free disk space (or move the run), then resume with "
                         "train.resume=auto") from None
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


def load_checkpoint(path: Path, model, optimizer=None, *, drun=None) -> dict[str, Any]:
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
    if (path / ".metadata").exists():
        _load_distributed(path, model, optimizer, drun)
    else:
        if drun is not None:
            raise InputError(f"{path} was written by a single-process run; multi-process runs resume from "
                             "torch.distributed.checkpoint folders only", path="train.resume",
                             hint="start the parallel run with init_from or train.resume=none")
        load_weights(model, path / "model.safetensors")
    if optimizer is not None and not (path / ".metadata").exists():
        try:
            tensors = load_file(str(path / "optimizer.safetensors"))
        except Exception as e:  # noqa: BLE001 - any read failure means a damaged checkpoint
            raise InputError(f"cannot read optimizer state: {e}", path=str(path / "optimizer.safetensors"),
                             hint="the checkpoint is damaged; resume from an earlier one") from None
        _restore_optimizer(optimizer, tensors, state["optimizer"])
    if optimizer is not None:
        rng = load_file(str(path / "rng.safetensors"))
        torch.set_rng_state(rng["torch_cpu"])
        if torch.cuda.is_available():
            cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
            if cuda:
                torch.cuda.set_rng_state_all(cuda)
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))
    return state


# ------------------------------------------------------------------ distributed (DCP)


def _canonical_states(model, optimizer, fused: dict):
    """Model and optimizer state dicts keyed by parameter name; fused TP weights as full tensors in the
    single-process row order (everything else keeps its DTensor shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from mimo_spec.parallel.tp import canonical

    msd = {k: canonical(k, v, fused) if k in fused else v for k, v in model.state_dict().items()}
    osd = None
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))
        renames = te_parameter_renames(model)  # transformer-engine parameter names -> the local ones
        osd = {_rename_opt_key(k, renames): _canonical_opt(k, v, fused) for k, v in osd.items()}
    return msd, osd


def _rename_opt_key(key: str, renames: dict[str, str]) -> str:
    """``state.<fqn>.<name>`` / ``param_groups.<fqn>.<name>`` with ``fqn`` renamed (backend-neutral keys)."""
    if not renames or not key.startswith(("state.", "param_groups.")):
        return key
    head, rest = key.split(".", 1)
    fqn, leaf = rest.rsplit(".", 1)
    return f"{head}.{renames.get(fqn, fqn)}.{leaf}"


def _canonical_opt(key: str, value, fused: dict):
    from mimo_spec.parallel.tp import canonical

    fqn = key.split(".", 1)[1].rsplit(".", 1)[0] if key.startswith("state.") else None
    if fqn in fused and isinstance(value, torch.Tensor) and value.dim() > 0:
        return canonical(fqn, value, fused)
    return value


def save_distributed_checkpoint(ckpt_dir: Path, step: int, model, optimizer, extra: dict[str, Any], keep_last: int,
                                drun) -> Path:
    """Every rank writes its shards of checkpoint ``step`` (collective); rank 0 renames it into place."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    final = ckpt_dir / f"{PREFIX}{step:06d}"
    tmp = ckpt_dir / f".tmp-{PREFIX}{step:06d}"
    if drun.rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    msd, osd = _canonical_states(model, optimizer, drun.fused)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp))
    if drun.rank == 0:
        from safetensors.torch import save_file

        save_file({"torch_cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        state = {"step": step, "format": "dcp", "world_size": drun.world_size, "layout": drun.layout.name,
                 "python_rng": _py_rng_state(), **extra}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _load_distributed(path: Path, model, optimizer, drun) -> None:
    """Load a DCP folder into ``model`` (and ``optimizer``) under this run's layout, or in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_optimizer_state_dict)

    fused = drun.fused if drun is not None else {}
    msd, osd = _canonical_states(model, optimizer, fused)
    target = {"model": msd} if osd is None else {"model": msd, "optimizer": osd}
    try:
        with warnings.catch_warnings():  # one process reading a sharded checkpoint is intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(target, checkpoint_id=str(path))
    except Exception as e:  # noqa: BLE001 - any read failure means a damaged or mismatched checkpoint
        raise InputError(f"cannot read distributed checkpoint: {e}".splitlines()[0], path=str(path),
                         hint="the checkpoint is damaged or was written for another model") from None
    model.load_state_dict({k: _from_canonical(k, v, model, fused) for k, v in msd.items()})
    if osd is not None:
        params = dict(model.named_parameters())
        back = {local: te for te, local in te_parameter_renames(model).items()}
        osd = {k: _opt_from_canonical(k, v, params, fused) for k, v in
               ((_rename_opt_key(k, back), v) for k, v in osd.items())}
        set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(flatten_optimizer_state_dict=True))


def _reshard_like(full: torch.Tensor, like):
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements)
    return full


def _from_canonical(fqn: str, value, model, fused: dict):
    if fqn not in fused:
        return value
    param = model.get_parameter(fqn)
    return _reshard_like(value[fused[fqn]], param)


def _opt_from_canonical(key: str, value, params: dict, fused: dict):
    fqn = key.split(".", 1)[1].rsplit(".", 1)[0] if key.startswith("state.") else None
    if fqn in fused and isinstance(value, torch.Tensor) and value.dim() > 0:
        return _reshard_like(value[fused[fqn]], params[fqn])
    return value
