"""Hugging Face checkpoint directories on disk: reading them lazily, checking them, writing them.

A checkpoint directory holds ``config.json`` and its weights as one
``model.safetensors`` or as shards listed in ``model.safetensors.index.json``.
Only the headers are read up front (key names, dtypes, shapes, and whether the
file is long enough for them). ``stream_into`` then reads each tensor's bytes
straight into its final place in the model (a fused QKV's parts into their rows
of one buffer), shard by shard: importing needs the model's size plus one
tensor, with no memory-mapped pages pinned and no intermediate copies.

Why the header is parsed here and not by the ``safetensors`` library: streaming needs each
tensor's byte offset in its file, which ``safe_open`` does not expose, and reading through
``safe_open`` maps the file and copies each tensor before it reaches its place (twice the
memory of the largest tensor group, plus pinned pages). Everything else that reads
safetensors (``mimo_spec.weights``, training checkpoints) uses the library.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn

from mimo_spec.errors import CheckpointError, InputError, Problem
from mimo_spec.interop.hf_weights import Plan, materialize

# safetensors dtype names <-> torch dtypes
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_HINT_DIR = "point at a Hugging Face model directory: config.json plus model.safetensors (or shards and an index)"


MAX_JSON_BYTES = 100 << 20  # a config.json, a shard index or a safetensors header


def read_json_file(path: Path) -> Any:
    """A small JSON file from a checkpoint folder: a regular file of bounded size and nesting
    (InputError naming it otherwise); JSON syntax errors are left to the caller's message."""
    import stat

    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise InputError("not a regular file", path=str(path), hint="point at a Hugging Face model directory")
    if st.st_size > MAX_JSON_BYTES:
        raise InputError(f"{st.st_size} bytes: too large for a JSON metadata file (at most {MAX_JSON_BYTES})",
                         path=str(path), hint="the file is damaged or not what its name says")
    try:
        return json.loads(Path(path).read_text())
    except RecursionError:
        raise InputError("the JSON is nested too deeply", path=str(path),
                         hint="the file is damaged or not what its name says") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits (JSONDecodeError is a ValueError too)
        if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):
            raise
        raise InputError(f"unreadable JSON: {e}", path=str(path),
                         hint="the file is damaged or not what its name says") from None


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of the tensor's bytes in the file


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Key -> TensorInfo from a safetensors header, checking the file is long enough for its data.

    Raises InputError for a file that is truncated or is not safetensors at all.
    """
    size = path.stat().st_size
    bad = dict(path=str(path), hint="the file is truncated or not a safetensors file: download or save it again")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"not a safetensors file: only {size} bytes", **bad)
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise InputError(f"truncated safetensors file: its header needs {8 + n} bytes, the file has {size}", **bad)
        if n > MAX_JSON_BYTES:  # safetensors itself refuses headers over 100 MB
            raise InputError(f"not a safetensors file: a {n}-byte header (at most {MAX_JSON_BYTES})", **bad)
        try:
            header = json.loads(f.read(n))
        except RecursionError:
            raise InputError("not a safetensors file: its header is nested too deeply", **bad) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"not a safetensors file: unreadable header ({e})", **bad) from None
    out, end = {}, 0
    if not isinstance(header, dict):
        raise InputError("not a safetensors file: its header is not a JSON object", **bad)
    try:
        for key, info in header.items():
            if key == "__metadata__":
                continue
            begin, stop = info["data_offsets"]
            dtype, shape = DTYPES[info["dtype"]], info["shape"]
            why = _bad_entry(dtype, shape, begin, stop)
            if why:
                raise InputError(f"not a safetensors file: tensor {key!r} {why}", **bad)
            out[key] = TensorInfo(path, dtype, tuple(shape), 8 + n + begin)
            end = max(end, stop)
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"not a safetensors file: malformed header entry ({e!r})", **bad) from None
    if 8 + n + end > size:
        raise InputError(f"truncated safetensors file: {size} bytes, its tensors need {8 + n + end}", **bad)
    return out


def _bad_entry(dtype: torch.dtype, shape: Any, begin: Any, stop: Any) -> str:
    """Why a header entry cannot describe its tensor's bytes ("" when it can): the shape must be
    non-negative whole numbers and the offsets must span exactly numel x element size bytes."""
    def whole(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(shape, list) or not all(whole(d) for d in shape):
        return f"has shape {shape!r}: expected a list of non-negative whole numbers"
    if not (whole(begin) and whole(stop)) or stop < begin:
        return f"has data offsets [{begin!r}, {stop!r}]: expected two whole numbers, begin <= end"
    numel = 1
    for d in shape:
        numel *= d
    need = numel * torch.empty((), dtype=dtype).element_size()
    if stop - begin != need:
        return f"spans {stop - begin} bytes, but its shape {shape} of {dtype} needs {need}"
    return ""


def _outside(name: Any) -> str:
    """Why a shard name from an index does not name a file inside the index's folder ("" if it does).

    Judged from the name alone: no absolute path, no ``..``, no drive. A shard that is a symbolic
    link stays allowed (the Hugging Face cache links every snapshot file to its blob store).
    """
    if not isinstance(name, str) or not name:
        return "is not a file name"
    if "\x00" in name:
        return "holds a NUL character"
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or PureWindowsPath(name).drive or name.startswith("~"):
        return "is an absolute path, outside the checkpoint folder"
    if ".." in pure.parts:
        return "leaves the checkpoint folder (..)"
    return ""


class HFCheckpoint:
    """A local Hugging Face checkpoint: ``config`` (the parsed config.json) and ``tensors`` (key -> TensorInfo)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            what = "does not exist" if not self.path.exists() else "is not a directory"
            raise InputError(f"checkpoint directory {what}", path=str(self.path), hint=_HINT_DIR)
        config = self.path / "config.json"
        if not config.is_file():
            raise InputError("no config.json in the checkpoint directory", path=str(self.path), hint=_HINT_DIR)
        try:
            self.config: dict[str, Any] = read_json_file(config)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"config.json is not valid JSON: {e}", path=str(config)) from None
        if not isinstance(self.config, dict):
            raise InputError(f"config.json holds a JSON {type(self.config).__name__}, not an object", path=str(config),
                             hint="fix or re-download config.json")
        auto_map = self.config.get("auto_map")
        if auto_map:
            raise CheckpointError(f"config.json asks to run code from the checkpoint folder (auto_map {auto_map})",
                                  path=str(config), hint="mimo-spec never runs code that comes with a checkpoint; "
                                  "import a model whose architecture transformers ships")
        self.files = self._weight_files()
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            self.tensors.update(read_header(file))

    def _weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = read_json_file(index)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise InputError(f"unreadable shard index: {e!r}", path=str(index),
                                 hint="it must be JSON with a 'weight_map' of tensor name -> shard file") from None
            if not isinstance(weight_map, dict):
                raise InputError(f"the shard index's weight_map is a JSON {type(weight_map).__name__}",
                                 path=str(index), hint="it must map each tensor name to its shard file")
            for key, name in weight_map.items():
                problem = _outside(name)
                if problem:
                    raise CheckpointError(f"weight_map entry {key!r}: shard {name!r} {problem}", path=str(index),
                                          hint="an index names shard files inside its own folder, e.g. "
                                               "model-00001-of-00002.safetensors")
            files = list(dict.fromkeys(self.path / name for name in weight_map.values()))
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise InputError(f"shard files listed in the index are missing: {', '.join(missing)}",
                                 path=str(index), hint="download or copy every shard")
            return files
        single = self.path / "model.safetensors"
        if single.is_file():
            return [single]
        others = sorted(p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (f"found {', '.join(others)}: pickled weights are not read (unsafe); convert them to safetensors"
                if others else _HINT_DIR)
        raise InputError("no model.safetensors or model.safetensors.index.json", path=str(self.path), hint=hint)

    def meta(self) -> dict[str, torch.Tensor]:
        """Every tensor as an empty meta tensor of its dtype and shape (for dry runs)."""
        return {k: torch.empty(i.shape, dtype=i.dtype, device="meta") for k, i in self.tensors.items()}


# --------------------------------------------------------------------------- checks


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_plan(plan: Plan, available: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
               ignore: Iterable[str], where: str) -> None:
    """Check a conversion plan against the checkpoint's tensors (meta is fine) and the model's, before reading data.

    Raises one InputError listing every missing tensor, every unexpected one (not
    used and not matching an ``ignore`` regex), every shape mismatch (naming the
    checkpoint tensor and both shapes) and every model tensor the plan does not fill.
    """
    used = {key for parts in plan.values() for key, _, _ in parts if key is not None}
    problems = []
    missing = sorted(used - set(available))
    if missing:
        problems.append(Problem(where, f"missing tensors: {_listing(missing)}",
                                "the checkpoint does not match its config.json (or is incomplete)"))
    patterns = [re.compile(p) for p in ignore]
    unexpected = sorted(k for k in available if k not in used and not any(p.search(k) for p in patterns))
    if unexpected:
        problems.append(Problem(where, f"unexpected tensors: {_listing(unexpected)}",
                                "the checkpoint holds tensors its config.json does not describe"))
    mismatched = []
    for ours, parts in plan.items():
        if ours not in expected or any(key is not None and key not in available for key, _, _ in parts):
            continue
        want = tuple(expected[ours].shape)
        try:
            got = tuple(materialize(parts, available.__getitem__).shape)
        except RuntimeError:  # fused parts whose trailing sizes disagree
            got = None
        if got != want and not _unit_dims_only(got, want):
            # experts stored one by one: (rows, C) parts of an (E, R, C) tensor
            stacked = len(want) == 3 and len(parts) > 1 and sum(r or 0 for _, r, _ in parts) == want[0] * want[1]
            for key, rows, transpose in parts:
                if key is None:
                    continue
                have = tuple(available[key].shape)
                part_want = want if len(parts) == 1 else (rows, *(want[2:] if stacked else want[1:]))
                part_want = (*part_want[:-2], *part_want[-2:][::-1]) if transpose else part_want
                if have != tuple(part_want):
                    mismatched.append(f"{key}: checkpoint {have}, config expects {tuple(part_want)}")
    if mismatched:
        problems.append(Problem(where, f"shape mismatch: {'; '.join(mismatched[:8])}"
                                + (f" ... ({len(mismatched)} in all)" if len(mismatched) > 8 else ""),
                                "config.json and the weights disagree: the checkpoint is edited or broken"))
    unfilled = sorted(set(expected) - set(plan))
    if unfilled:
        problems.append(Problem(where, f"model tensors with no source in the checkpoint: {_listing(unfilled)}",
                                "this is a converter bug: please report it"))
    if problems:
        raise InputError(problems)


# --------------------------------------------------------------------------- loading


def _unit_dims_only(got: tuple | None, want: tuple) -> bool:
    """Shapes that differ only in dimensions of size 1 (InternViT's (1, 1, H) class token for our (H,))."""
    if got is not None and len(want) == 3 and got == (want[0] * want[1], want[2]):  # experts stored one by one
        return True
    return got is not None and [d for d in got if d != 1] == [d for d in want if d != 1]


def _fit(batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Reshape tensors whose shape differs from the model's only in size-1 dimensions (check_plan allows it)."""
    shapes = {k: v.shape for k, v in model.state_dict(keep_vars=True).items() if k in batch}
    return {k: t.reshape(shapes[k]) if k in shapes and t.shape != shapes[k] else t for k, t in batch.items()}


def _finish(t: torch.Tensor, dtype: torch.dtype | None, sources: list[torch.Tensor]) -> torch.Tensor:
    """Cast, make contiguous, and own the memory: never a view of a source tensor."""
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    t = t.contiguous()
    if any(t.untyped_storage().data_ptr() == s.untyped_storage().data_ptr() for s in sources):
        t = t.clone()
    return t


def _read_into(fd: int, info: TensorInfo, out: torch.Tensor) -> None:
    """Read one tensor's bytes into ``out`` (contiguous, same dtype and size). ``os.preadv`` has no
    shared file position, so threads can read one file at once (elsewhere: a handle per read)."""
    buf = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
    done = 0
    with contextlib.nullcontext() if hasattr(os, "preadv") else open(info.file, "rb") as handle:
        while done < len(buf):
            if handle is None:
                n = os.preadv(fd, [buf[done:]], info.offset + done)
            else:
                handle.seek(info.offset + done)
                n = handle.readinto(buf[done:])
            if not n:
                raise InputError("safetensors file ended early while reading", path=str(info.file),
                                 hint="the file changed or is truncated: download or save it again")
            done += n


def _read(parts: list, ckpt: HFCheckpoint, fds: dict[Path, int], dtype: torch.dtype | None) -> torch.Tensor:
    """One of our tensors, read part by part into its rows of a single new buffer."""
    infos = [None if key is None else ckpt.tensors[key] for key, _, _ in parts]
    ref = next(i for i in infos if i is not None)
    out_dtype = dtype if dtype is not None and ref.dtype.is_floating_point else ref.dtype
    shapes = [None if i is None else ((*i.shape[:-2], *i.shape[-2:][::-1]) if t else i.shape)
              for i, (_, _, t) in zip(infos, parts)]
    trailing = next(s for s in shapes if s is not None)[1:]
    rows = [rows if s is None else (s[0] if s else 1) for s, (_, rows, _) in zip(shapes, parts)]
    out = torch.empty((sum(rows), *trailing) if len(parts) > 1 else shapes[0], dtype=out_dtype)
    start = 0
    for info, n, (_, _, transpose) in zip(infos, rows, parts):
        piece = out[start:start + n] if len(parts) > 1 else out
        start += n
        if info is None:
            piece.zero_()
        elif info.dtype == out_dtype and not transpose:
            _read_into(fds[info.file], info, piece)
        else:  # a cast or a transpose needs the original first
            raw = torch.empty(info.shape, dtype=info.dtype)
            _read_into(fds[info.file], info, raw)
            piece.copy_(raw.transpose(-2, -1) if transpose else raw)
    return out


def stream_into(model: nn.Module, plan: Plan, ckpt: HFCheckpoint, dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu") -> None:
    """Fill a meta-built ``model`` from ``ckpt``, shard by shard.

    Each of our tensors is allocated once and its HF parts are read from the
    file into it (a fused QKV whose parts sit in two shards reads from both),
    a few tensors at a time in threads. Not memory-mapped on purpose:
    safetensors maps a whole shard and keeps it mapped while any tensor of it
    lives, so every page ever touched (fused parts included) would stay in the
    process. Tensors go into the model with ``load_state_dict(assign=True)``,
    one shard's worth at a time.
    """
    order = {f: i for i, f in enumerate(ckpt.files)}
    by_shard: dict[int, list[str]] = {}
    for ours, parts in plan.items():  # by the shard of the first part, in file order
        info = next(ckpt.tensors[k] for k, _, _ in parts if k is not None)
        by_shard.setdefault(order[info.file], []).append(ours)
    to_device = torch.device(device).type != "cpu"
    fds = {f: os.open(f, os.O_RDONLY | getattr(os, "O_BINARY", 0)) for f in ckpt.files}
    try:
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            for i in sorted(by_shard):
                keys = by_shard[i]
                tensors = pool.map(lambda ours: _read(plan[ours], ckpt, fds, dtype), keys)
                batch = {ours: t.to(device) if to_device else t for ours, t in zip(keys, tensors)}
                model.load_state_dict(_fit(batch, model), strict=False, assign=True)
    finally:
        for fd in fds.values():
            os.close(fd)
    _check_filled(model)


def load_from_state_dict(model: nn.Module, plan: Plan, state: Mapping[str, torch.Tensor],
                         dtype: torch.dtype | None = None) -> None:
    """Fill a meta-built ``model`` from an in-memory HF state dict. Tensors are copied, so the two
    models never share storage."""
    batch = {}
    for ours, parts in plan.items():
        sources = [state[k] for k, _, _ in parts if k is not None]
        batch[ours] = _finish(materialize(parts, state.__getitem__), dtype, sources)
    model.load_state_dict(_fit(batch, model), strict=False, assign=True)
    _check_filled(model)


def _check_filled(model: nn.Module) -> None:
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"import left tensors unfilled (a converter bug): {_listing(left)}")


# --------------------------------------------------------------------------- writing


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file tensor by tensor: memory stays at one tensor, whatever the file's size.

    Views of one storage (the pieces of a split fused QKV) are fine, unlike
    ``safetensors.torch.save_file``.
    """
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as safetensors does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            data = t.detach().to("cpu").contiguous().reshape(-1)
            if data.numel():
                f.write(memoryview(data.view(torch.uint8).numpy()))


def refuse_clashes(out_dir: Path, names: Iterable[str], overwrite: bool) -> None:
    """InputError if ``out_dir`` is a file, or (unless ``overwrite``) already holds one of ``names``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError("the output path is a file", path=str(out_dir), hint="choose a directory")
    clashes = [n for n in names if (out_dir / n).exists()]
    if clashes and not overwrite:
        raise InputError(f"the output directory already holds {', '.join(clashes)}", path=str(out_dir),
                         hint="choose another directory, or overwrite")


def publish(out_dir: str | Path, write: Callable[[Path], None], *, overwrite: bool = False,
            expect: Iterable[str] = (), stale: Iterable[str] = ()) -> Path:
    """Run ``write(tmp_dir)``, then move what it wrote into ``out_dir``: nothing lands on a failure.

    Files already in ``out_dir`` that ``write`` also wrote (or that are named in
    ``expect``, checked before writing) are an InputError unless ``overwrite``;
    then they are replaced, and files matching a ``stale`` glob that this write
    did not produce (the shards of an earlier export) are removed.
    """
    out_dir = Path(out_dir)
    refuse_clashes(out_dir, expect, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp", dir=out_dir.parent))
    try:
        write(tmp)
        names = sorted(p.name for p in tmp.iterdir())
        refuse_clashes(out_dir, names, overwrite)
        if not out_dir.exists():
            os.replace(tmp, out_dir)
            return out_dir
        for pattern in stale:
            for old in out_dir.glob(pattern):
                if old.name not in names:
                    old.unlink()
        # weights before config, so a config never points at weights that are not there yet
        for n in sorted(names, key=lambda n: not n.endswith(".safetensors")):
            os.replace(tmp / n, out_dir / n)
        return out_dir
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
