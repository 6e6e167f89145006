"""Training checkpoints: safetensors + JSON in a folder, written atomically, last N kept.

Layout of ``<run>/checkpoints/step_000050/``:
  model.safetensors      model weights (mimo_spec.weights)
  optimizer.safetensors  optimizer state tensors, keyed ``<param index>.<name>``
  rng.safetensors        torch CPU (and CUDA) generator states
  state.json             step, data position, optimizer hyper-parameters, python RNG, config
The data position (``data_position``) counts the samples the whole run has consumed (global
batches, not one rank's share), so a checkpoint resumes under any layout and any
``data.num_workers`` (see mimo_spec.data.loader).
Each checkpoint is written to a hidden temporary folder and renamed into place,
so a crash mid-save never leaves a half checkpoint; older ones are removed only
after the new one exists. Nothing is ever unpickled.

Runs with more than one process write the same folder with
torch.distributed.checkpoint instead (``.metadata`` + one ``__<rank>_0.distcp``
file per rank, and the same state.json / rng.safetensors, whose ``"format": "dcp"``
marks the folder as DCP): every rank writes its own shards, tensors are stored in
the single-process layout, and the folder loads under any other layout or in one
process (resharding on load). DCP folders are read through mimo_spec.train.dcp_safe,
which never unpickles anything but DCP's own metadata classes; a ``.metadata`` file in
a single-process folder is never read.

A model with adapters (mimo_spec.peft) checkpoints only what trains: model.safetensors (or the DCP
model state) holds the adapter and ``trainable`` tensors, the optimizer state is theirs alone, and
state.json's ``adapters.base_hash`` records the frozen base (from ``init_from`` or the seed) they were
trained on; resuming onto another base is a CheckpointError.

Every failure to read a checkpoint is a CheckpointError naming the file (resume then
falls back to the previous checkpoint); a refused write (a full disk, a read-only
folder) is a StorageError naming the checkpoint and the last good one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from mimo_spec.atomic import pid_alive, replace_dir

from mimo_spec.components.te_backend import te_parameter_renames
from mimo_spec.errors import CheckpointError, StorageError
from mimo_spec.weights import check_regular_file, load_weights, save_weights, write_failure

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
        raise CheckpointError(f"checkpoint has {len(groups)} optimizer parameter groups, this run has "
                         f"{len(optimizer.param_groups)}", path="checkpoint.optimizer",
                         hint="resume with the same freeze and train.param_groups settings")
    _check_optimizer_state(optimizer, state, groups)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _check_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[int, dict[str, Any]], groups: list) -> None:
    """Each saved state belongs to a parameter of this optimizer and its tensors fit that parameter (a moment
    of the parameter's shape, a one-value ``step``); the groups' hyperparameters are numbers. The optimizers'
    fused kernels trust the shapes and would write past a short buffer: a damaged or crafted file is a
    CheckpointError, and the resume falls back to an earlier checkpoint."""
    where = "checkpoint.optimizer"
    damaged = "the checkpoint is damaged; resume from an earlier one"
    param_of: dict[int, torch.Tensor] = {}
    for k, (saved, current) in enumerate(zip(groups, optimizer.param_groups)):
        ids = saved.get("params") if isinstance(saved, dict) else None
        if not isinstance(ids, list) or not all(type(i) is int for i in ids) or len(ids) != len(current["params"]):
            raise CheckpointError(f"optimizer group {k} lists {len(ids) if isinstance(ids, list) else ids!r} "
                                  f"parameters, this run's has {len(current['params'])}", path=where,
                                  hint="resume with the same freeze, adapters and train.param_groups settings")
        for key, value in saved.items():
            if key in ("lr", "eps", "weight_decay") and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise CheckpointError(f"optimizer group {k}'s {key} is {value!r}, not a number", path=where,
                                      hint=damaged)
            if key == "betas" and not (isinstance(value, (list, tuple)) and len(value) == 2 and all(
                    isinstance(b, (int, float)) and not isinstance(b, bool) for b in value)):
                raise CheckpointError(f"optimizer group {k}'s betas are {value!r}, not two numbers", path=where,
                                      hint=damaged)
        param_of.update(zip(ids, current["params"]))
    for idx, values in state.items():
        param = param_of.get(idx)
        if param is None:
            raise CheckpointError(f"optimizer state {idx} belongs to no parameter of this run", path=where,
                                  hint=damaged)
        for name, value in values.items():
            if not isinstance(value, torch.Tensor):
                continue
            if name == "step":
                if value.numel() != 1:
                    raise CheckpointError(f"optimizer state {idx}.step holds {value.numel()} values, expected one",
                                          path=where, hint=damaged)
            elif tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"optimizer state {idx}.{name} has shape {tuple(value.shape)}, its parameter "
                                      f"{tuple(param.shape)}", path=where, hint=damaged)


def save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, extra: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically under ``ckpt_dir``; prune to the last ``keep_last``.

    A write the disk refuses (full, read-only) is a StorageError naming the checkpoint and the last
    good one; the temporary folder is removed and the earlier checkpoints stay as they were."""
    from safetensors.torch import save_file

    final = ckpt_dir / f"{PREFIX}{step:06d}"
    tmp = ckpt_dir / f".tmp-{PREFIX}{step:06d}-{os.getpid()}"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        adapters = _adapter_record(model)
        if adapters is None:
            save_weights(model, tmp / "model.safetensors")
        else:  # the base comes from init_from / the seed: only what trains is saved
            keep = set(adapters["keys"])
            save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k in keep},
                      str(tmp / "model.safetensors"), metadata={"format": "pt", "producer": "mimo-spec"})
            extra = {**extra, "adapters": {"base_hash": adapters["base_hash"]}}
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"torch_cuda_{i}"] = s
        save_file(rng, str(tmp / "rng.safetensors"))
        state = {"step": step, "optimizer": opt_meta, "python_rng": _py_rng_state(), **extra}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        replace_dir(tmp, final)  # re-saving the same step (e.g. SIGTERM right after a save) replaces it
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = write_failure(e) if isinstance(e, Exception) else None
        if why is None:  # a bug or an interrupt: not the disk's answer
            raise
        raise write_error(ckpt_dir, final, why) from None
    prune(ckpt_dir, step, keep_last)
    remove_leftovers(ckpt_dir, step)
    return final


def remove_leftovers(ckpt_dir: Path, step: int) -> None:
    """Temporary folders of saves that never finished (a killed process): ``.tmp-step_N-<pid>`` of a process that
    is gone, and a distributed save's ``.tmp-step_N`` of an earlier step. The run directory's lock makes this run
    its only writer, so nothing removed here is being written."""
    for tmp in ckpt_dir.glob(f".tmp-{PREFIX}*"):
        rest = tmp.name[len(f".tmp-{PREFIX}"):]
        number, _, pid = rest.partition("-")
        if not number.isdigit() or not tmp.is_dir():
            continue
        stale = (pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid))) if pid else int(number) < step
        if stale:
            shutil.rmtree(tmp, ignore_errors=True)


def prune(ckpt_dir: Path, step: int, keep_last: int) -> None:
    """After saving ``step``: the checkpoints before it beyond the last ``keep_last`` (it included) go. Never the
    one just written, nor a newer one (a resume that fell back past a damaged checkpoint leaves it, and the run
    re-saves its step when it gets there): sorting newer ones in would delete what was just written."""
    if keep_last <= 0:
        return
    older = [c for c in list_checkpoints(ckpt_dir) if int(c.name[len(PREFIX):]) < step]
    for old in older[:max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def _adapter_record(model) -> dict[str, Any] | None:
    """With adapters: the state-dict keys a checkpoint holds (what trains) and the base's fingerprint."""
    from mimo_spec import peft

    if not peft.has_adapters(model):
        return None
    base = getattr(model, "adapter_base_hash", None)
    if base is None:  # the training loop records it before sharding (peft.base_loaded); else now, once
        base = model.adapter_base_hash = peft.base_fingerprint(model)
    return {"keys": peft.trainable_keys(model), "base_hash": base}


def _check_adapter_base(path: Path, state: dict[str, Any], model) -> list[str] | None:
    """The keys to load from an adapter checkpoint (None: a whole-model one), after checking that it
    and the model agree: both with adapters or neither, and the same base (its fingerprint)."""
    saved = state.get("adapters")
    ours = _adapter_record(model)
    if saved is None and ours is None:
        return None
    if saved is None or ours is None:
        has, lacks = ("this run", "the checkpoint") if saved is None else ("the checkpoint", "this run")
        err = CheckpointError(f"{has} has adapters and {lacks} has none: {path} holds "
                              f"{'the whole model' if saved is None else 'adapter weights only'}",
                              path="train.resume", hint="resume with the adapters: setting the run was started with")
    elif not isinstance(saved, dict) or saved.get("base_hash") != ours["base_hash"]:
        err = CheckpointError(f"{path} holds adapters trained on another base model (base fingerprint "
                              f"{str(saved.get('base_hash') if isinstance(saved, dict) else saved)[:12]}..., this run's "
                              f"base {ours['base_hash'][:12]}...)", path="train.resume",
                              hint="resume with the init_from (and seed) the run was started with")
    else:
        return ours["keys"]
    err.not_damage = True  # a sound checkpoint of another run: resume must not fall back to older ones
    raise err


def write_error(ckpt_dir: Path, final: Path, why: str) -> StorageError:
    """The error for a checkpoint the disk refused: which one, why, and the last good one."""
    kept = list_checkpoints(ckpt_dir)
    last = f"the last good checkpoint is {kept[-1]}" if kept else "no earlier checkpoint exists"
    return StorageError(f"cannot write checkpoint {final}: {why}; {last}", path=str(ckpt_dir),
                        hint="free disk space or make the run directory writable, then resume with "
                        "train.resume=auto")


def _py_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are ignored)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit() and (p / "state.json").exists()]  # not a step_000004.bak copy
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def read_state(path: Path) -> dict[str, Any]:
    """The state.json of checkpoint folder ``path`` (a CheckpointError when it is missing or damaged)."""
    state_file = Path(path) / "state.json"
    if not state_file.exists():
        raise CheckpointError(f"not a checkpoint folder (no state.json): {path}", path=str(path),
                              hint="point at <run>/checkpoints/step_NNNNNN")
    check_regular_file(state_file, "state.json")
    try:
        state = json.loads(state_file.read_text())
    except OSError as e:
        raise CheckpointError(f"cannot read state.json: {e.strerror or e}", path=str(state_file)) from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"corrupt state.json: {e}", path=str(state_file),
                              hint="the checkpoint is damaged; resume from an earlier one") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"corrupt state.json: a JSON {type(state).__name__}, not an object",
                              path=str(state_file), hint="the checkpoint is damaged; resume from an earlier one")
    return state


def checkpoint_format(path: Path, state: dict[str, Any]) -> str:
    """``"dcp"`` for a folder save_distributed_checkpoint wrote (its state.json says so), else
    ``"safetensors"``. A ``.metadata`` file alone never makes a folder DCP."""
    fmt = state.get("format", "safetensors")
    if fmt not in ("dcp", "safetensors"):
        raise CheckpointError(f"unknown checkpoint format {fmt!r} in state.json", path=str(Path(path) / "state.json"),
                              hint="expected 'dcp' or 'safetensors'")
    if fmt == "dcp" and not (Path(path) / ".metadata").exists():
        raise CheckpointError("damaged distributed checkpoint: state.json says it is a DCP folder but it has no "
                              ".metadata file", path=str(path), hint="resume from an earlier checkpoint")
    return fmt


def _resume_fields(path: Path, state: dict[str, Any], fmt: str) -> None:
    """The state.json fields a resume needs, checked before anything is restored."""
    bad = []
    for key in ("step", "data_position") if "data_position" in state else ("step",):
        if type(state.get(key)) is not int or state[key] < 0:
            bad.append(f"{key} is {state.get(key)!r}, expected a whole number >= 0")
    try:
        version, internal, gauss = state["python_rng"]
        random.Random().setstate((version, tuple(internal), gauss))
    except Exception:  # noqa: BLE001 - anything random.setstate refuses
        bad.append("python_rng is not a Python random state")
    if fmt == "safetensors" and not (isinstance(state.get("optimizer"), dict)
                                     and isinstance(state["optimizer"].get("param_groups"), list)):
        bad.append("optimizer has no param_groups list")
    elif fmt == "safetensors":
        scalars = state["optimizer"].get("scalars", {})
        if not (isinstance(scalars, dict) and all(isinstance(v, dict) and str(k).isdigit() for k, v in scalars.items())):
            bad.append("optimizer.scalars is not a mapping of parameter numbers to values")
    data_state = state.get("data_state")
    if data_state is not None:
        ok = isinstance(data_state, dict) and set(data_state) <= {"position", "deferred"}
        position = data_state.get("position", 0) if ok else None
        deferred = data_state.get("deferred", []) if ok else None
        if not (ok and type(position) is int and position >= 0 and isinstance(deferred, list)
                and all(type(i) is int and i >= 0 for i in deferred)):
            bad.append(f"data_state is {data_state!r}, expected {{position: int >= 0, deferred: [int >= 0]}}")
        elif type(state.get("data_position")) is int and position != state["data_position"]:
            bad.append(f"data_state.position {position} disagrees with data_position {state['data_position']}")
    skipped = state.get("data_skipped")
    if skipped is not None and not (isinstance(skipped, dict) and all(
            type(v) is int and v >= 0 for v in skipped.values())):
        bad.append(f"data_skipped is {skipped!r}, expected counts (whole numbers >= 0)")
    if bad:
        raise CheckpointError("corrupt state.json: " + "; ".join(bad), path=str(Path(path) / "state.json"),
                              hint="the checkpoint is damaged; resume from an earlier one")


def _read_tensors(file: Path, what: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_regular_file(file, what)
    try:  # cloned: load_file's tensors map the file, which would pin its disk space after pruning
        return {k: v.clone() for k, v in load_file(str(file)).items()}
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as e:
        raise CheckpointError(f"cannot read {what}: {e}".splitlines()[0], path=str(file),
                              hint="the checkpoint is damaged; resume from an earlier one") from None


def _check_rng(rng: dict[str, torch.Tensor], file: Path) -> None:
    try:
        torch.Generator().set_state(rng["torch_cpu"])
    except (KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"not a torch random state: {type(e).__name__}: {e}".splitlines()[0], path=str(file),
                              hint="the checkpoint is damaged; resume from an earlier one") from None


def load_checkpoint(path: Path, model, optimizer=None, *, drun=None) -> dict[str, Any]:
    """Restore model (and optimizer, RNG) from a checkpoint folder; returns its state.json.

    Every file is checked before it is used; a damaged or foreign one is a CheckpointError. Files
    are read before the model is touched where possible; when a late step fails the model may hold
    new weights, so callers must not go on with it (resume refuses to train on)."""
    path = Path(path)
    state = read_state(path)
    fmt = checkpoint_format(path, state)
    if fmt == "safetensors" and drun is not None:
        raise CheckpointError(f"{path} was written by a single-process run; multi-process runs resume from "
                              "torch.distributed.checkpoint folders only", path="train.resume",
                              hint="start the parallel run with init_from or train.resume=none")
    rng = None
    if optimizer is not None:
        _resume_fields(path, state, fmt)
        rng = _read_tensors(path / "rng.safetensors", "the random state")
        _check_rng(rng, path / "rng.safetensors")
    adapter_keys = _check_adapter_base(path, state, model)
    if fmt == "dcp":
        _load_distributed(path, model, optimizer, drun, adapter_keys)
    else:
        opt_tensors = None
        if optimizer is not None:
            opt_tensors = _read_tensors(path / "optimizer.safetensors", "the optimizer state")
        if adapter_keys is None:
            load_weights(model, path / "model.safetensors")
        else:
            _load_adapter_weights(model, path / "model.safetensors", adapter_keys)
        if optimizer is not None:
            try:
                _restore_optimizer(optimizer, opt_tensors, state["optimizer"])
            except CheckpointError:
                raise
            except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
                raise CheckpointError(f"optimizer state does not fit this run: {type(e).__name__}: {e}"
                                      .splitlines()[0], path=str(path / "optimizer.safetensors"),
                                      hint="the checkpoint is damaged or was written for another model") from None
    if optimizer is not None:
        torch.set_rng_state(rng["torch_cpu"])
        if torch.cuda.is_available():
            cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
            if cuda:
                try:
                    torch.cuda.set_rng_state_all(cuda)
                except RuntimeError as e:  # a checkpoint from a machine with other GPUs: keep this one's
                    warnings.warn(f"{path}: CUDA random state not restored: {e}", stacklevel=2)
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))
    return state


def _load_adapter_weights(model, file: Path, keys: list[str]) -> None:
    """An adapter checkpoint's tensors: exactly ``keys`` (what trains), each of its shape."""
    tensors = _read_tensors(file, "the adapter weights")
    own = model.state_dict()
    missing, unexpected = sorted(set(keys) - set(tensors)), sorted(set(tensors) - set(keys))
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in tensors.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        what = (["missing: " + ", ".join(missing[:6])] if missing else []) + \
            (["unexpected: " + ", ".join(unexpected[:6])] if unexpected else []) + wrong[:6]
        raise CheckpointError("the adapter weights do not fit this run: " + "; ".join(what), path=str(file),
                              hint="resume with the adapters and trainable settings the run was started with")
    model.load_state_dict(tensors, strict=False)


# ------------------------------------------------------------------ distributed (DCP)


def _canonical_states(model, optimizer, fused: dict):
    """Model and optimizer state dicts keyed by parameter name; fused TP weights as full tensors in the
    single-process row order (everything else keeps its DTensor shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from mimo_spec.parallel.tp import canonical

    keep = _adapter_record(model)
    keep = None if keep is None else set(keep["keys"])  # adapters: only what trains
    msd = {k: canonical(k, v, fused) if k in fused else v for k, v in model.state_dict().items()
           if keep is None or k in keep}
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
    """Every rank writes its shards of checkpoint ``step`` (collective); rank 0 renames it into place.

    A write the disk refuses on any rank is a StorageError on every rank (they agree after each
    stage, so no rank waits for one that gave up); rank 0 removes the temporary folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from mimo_spec.train.dcp_safe import describe_failure, reraise_interrupt

    final = ckpt_dir / f"{PREFIX}{step:06d}"
    tmp = ckpt_dir / f".tmp-{PREFIX}{step:06d}"

    def refused(e: BaseException) -> str:
        why = write_failure(e) if isinstance(e, Exception) else None
        if why is None:
            raise e
        return why

    why = None
    if drun.rank == 0:
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except Exception as e:  # noqa: BLE001 - refused() re-raises what is not the disk's answer
            why = refused(e)
    _agree(why, drun, ckpt_dir, final, tmp)
    adapters = _adapter_record(model)
    msd, osd = _canonical_states(model, optimizer, drun.fused)
    try:
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp))
    except CheckpointException as e:  # every rank gets it: DCP gathers the failures
        reraise_interrupt(e)
        inner = [exc for exc, _trace in e.failures.values()]
        reasons = [_shard_write_failure(exc, ckpt_dir) for exc in inner]
        if not reasons or any(r is None for r in reasons):
            raise
        if drun.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(ckpt_dir, final, f"{reasons[0]} ({describe_failure(e)})") from None
    if drun.rank == 0:
        try:
            from safetensors.torch import save_file

            save_file({"torch_cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
            state = {"step": step, "format": "dcp", "world_size": drun.world_size, "layout": drun.layout.name,
                     "python_rng": _py_rng_state(), **extra}
            if adapters is not None:
                state["adapters"] = {"base_hash": adapters["base_hash"]}
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            replace_dir(tmp, final)
        except Exception as e:  # noqa: BLE001 - refused() re-raises what is not the disk's answer
            why = refused(e)
    _agree(why, drun, ckpt_dir, final, tmp)
    if drun.rank == 0:
        prune(ckpt_dir, step, keep_last)
        remove_leftovers(ckpt_dir, step)
    return final


def _shard_write_failure(exc: BaseException, folder: Path) -> str | None:
    """Why DCP could not write a shard when the disk refused it, else None. torch.save reports a full
    disk as a RuntimeError from its zip writer, not an OSError: the filesystem is asked then."""
    why = write_failure(exc) if isinstance(exc, Exception) else None
    if why is not None or not isinstance(exc, RuntimeError):
        return why
    if not re.search(r"PytorchStreamWriter|inline_container|file write failed", str(exc)):
        return None
    try:
        fs = os.statvfs(folder)
    except OSError:
        return None
    if fs.f_flag & os.ST_RDONLY:
        return "Read-only file system"
    if fs.f_bavail * fs.f_frsize < (1 << 20):
        return "No space left on device"
    return f"the shard write failed: {str(exc).splitlines()[0]}"


def _agree(why: str | None, drun, ckpt_dir: Path, final: Path, tmp: Path) -> None:
    """A collective: every rank learns whether rank 0's part of the save failed (then all raise)."""
    import torch.distributed as dist

    from mimo_spec.parallel.env import device_type

    device = torch.device(device_type(), torch.cuda.current_device()) if device_type() == "cuda" else "cpu"
    flag = torch.tensor([0 if why is None else 1], device=device)
    dist.all_reduce(flag)  # also the barrier the save needs between stages
    if int(flag.item()):
        if drun.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(ckpt_dir, final, why or "rank 0 could not write it (see rank 0's error)")


def _load_distributed(path: Path, model, optimizer, drun, adapter_keys: list[str] | None = None) -> None:
    """Load a DCP folder into ``model`` (and ``optimizer``) under this run's layout, or in one process
    (``adapter_keys``: an adapter checkpoint's tensors, the base left as it is)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_optimizer_state_dict)

    from mimo_spec.train import dcp_safe

    fused = drun.fused if drun is not None else {}
    msd, osd = _canonical_states(model, optimizer, fused)
    target = {"model": msd} if osd is None else {"model": msd, "optimizer": osd}
    dcp_safe.load(target, path)  # restricted metadata unpickler, weights_only items: a CheckpointError
    model.load_state_dict({k: _from_canonical(k, v, model, fused) for k, v in msd.items()},
                          strict=adapter_keys is None)
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
