"""Reading torch.distributed.checkpoint (DCP) folders without ever running code from them.

DCP's own reader ``pickle.load``s the ``.metadata`` file and its load planner ``torch.load``s every
non-tensor item with ``weights_only=False``: a crafted file in a checkpoint folder would run any
command. Here the metadata goes through an unpickler that admits only the classes DCP writes (the
metadata dataclasses, ``torch.Size``, dtypes, layouts, paths), the result is checked field by
field (shard names are plain file names inside the folder, offsets lie within the shard files),
and non-tensor items are read with ``torch.load(weights_only=True)``. Every failure, a refused
class included, is a CheckpointError naming the file.
"""

from __future__ import annotations

import io
import pickle
import re
import stat
import warnings
from pathlib import Path
from typing import Any

import torch

from mimo_spec.errors import CheckpointError

METADATA = ".metadata"
MAX_METADATA_BYTES = 1 << 30  # metadata of a model with millions of tensors stays far below this
_HINT = "the checkpoint is damaged or not one mimo-spec wrote; resume from an earlier one"


def _dcp_classes() -> dict[tuple[str, str], Any]:
    """(module, name) -> object for everything DCP's FileSystemWriter pickles into ``.metadata``."""
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata

    allowed: dict[tuple[str, str], Any] = {}
    for name in ("Metadata", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "TensorProperties", "MetadataIndex", "_MEM_FORMAT_ENCODING"):
        allowed[("torch.distributed.checkpoint.metadata", name)] = getattr(metadata, name)
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    for name, value in vars(torch).items():  # torch.float32, torch.bfloat16, ... (a dtype pickles by name)
        if isinstance(value, torch.dtype):
            allowed[("torch", name)] = value
    allowed[("torch.serialization", "_get_layout")] = _layout
    # StorageMeta.checkpoint_id: the path the writer was given (pathlib moved its classes in 3.13)
    for module in ("pathlib", "pathlib._local"):
        for name, cls in (("PosixPath", pathlib.PurePosixPath), ("PurePosixPath", pathlib.PurePosixPath),
                          ("WindowsPath", pathlib.PureWindowsPath), ("PureWindowsPath", pathlib.PureWindowsPath)):
            allowed[(module, name)] = cls
    return allowed


def _layout(name: Any) -> torch.layout:
    """torch.serialization._get_layout restricted to real layout names."""
    layouts = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}
    if not isinstance(name, str) or name not in layouts:
        raise pickle.UnpicklingError(f"unknown tensor layout {name!r}")
    return layouts[name]


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only the classes in ``_dcp_classes``; anything else is refused before it is looked up."""

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _MetadataUnpickler._allowed is None:
            _MetadataUnpickler._allowed = _dcp_classes()
        try:
            return _MetadataUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused {module}.{name}: not a class torch.distributed.checkpoint "
                                         "writes into its metadata") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a persistent id: DCP metadata has none")


def _regular_file(path: Path, what: str) -> int:
    """The size of ``path``; a CheckpointError when it is missing or not a regular file (a FIFO or a
    device would block or never end)."""
    try:
        st = path.stat()
    except OSError as e:
        raise CheckpointError(f"{what} is missing or unreadable: {e.strerror or e}", path=str(path),
                              hint=_HINT) from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{what} is not a regular file", path=str(path), hint=_HINT)
    return st.st_size


def read_metadata(folder: Path):
    """The checked ``Metadata`` of DCP folder ``folder`` (its shard files exist and are long enough)."""
    path = Path(folder) / METADATA
    size = _regular_file(path, "the checkpoint's metadata file")
    if size > MAX_METADATA_BYTES:
        raise CheckpointError(f"metadata file is {size} bytes, larger than any DCP metadata", path=str(path),
                              hint=_HINT)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read the metadata file: {e.strerror or e}", path=str(path), hint=_HINT) from None
    try:
        md = _MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"unsafe or damaged metadata file: {e}", path=str(path), hint=_HINT) from None
    except Exception as e:  # noqa: BLE001 - only admitted DCP classes ran: whatever they raise is a damaged file
        raise CheckpointError(f"damaged metadata file (truncated or not DCP metadata): {type(e).__name__}: {e}",
                              path=str(path), hint=_HINT) from None
    problem = _check_metadata(md, Path(folder))
    if problem:
        raise CheckpointError(f"damaged metadata file: {problem}", path=str(path), hint=_HINT)
    return md


_SIZE = torch.Size


def _is_int(x: Any) -> bool:
    return type(x) is int and x >= 0


def _check_metadata(md: Any, folder: Path) -> str | None:
    """What is wrong with unpickled metadata ``md``, or None when it has DCP's shape."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, StorageMeta, TensorProperties,
                                                       TensorStorageMetadata)

    if type(md) is not Metadata:
        return f"holds a {type(md).__name__}, not DCP Metadata"
    if type(md.state_dict_metadata) is not dict:
        return "state_dict_metadata is not a dict"
    for key, entry in md.state_dict_metadata.items():
        if type(key) is not str:
            return f"state_dict_metadata key {key!r} is not a string"
        if type(entry) is BytesStorageMetadata:
            continue
        if type(entry) is not TensorStorageMetadata:
            return f"{key}: a {type(entry).__name__}, not tensor or bytes storage metadata"
        props = entry.properties
        if type(props) is not TensorProperties or not isinstance(props.dtype, torch.dtype):
            return f"{key}: bad tensor properties"
        if type(entry.size) is not _SIZE or type(entry.chunks) is not list:
            return f"{key}: bad size or chunk list"
        for chunk in entry.chunks:
            if (type(chunk) is not ChunkStorageMetadata or type(chunk.offsets) is not _SIZE
                    or type(chunk.sizes) is not _SIZE or len(chunk.offsets) != len(entry.size)
                    or len(chunk.sizes) != len(entry.size)
                    or any(o + s > n for o, s, n in zip(chunk.offsets, chunk.sizes, entry.size))):
                return f"{key}: a chunk does not lie inside the tensor"
    if md.planner_data is not None and type(md.planner_data) is not dict:
        return "planner_data is not a dict"
    if md.storage_meta is not None and type(md.storage_meta) is not StorageMeta:
        return "storage_meta is not DCP StorageMeta"
    if md.version is not None and type(md.version) is not str:
        return "version is not a string"
    if type(md.storage_data) is not dict:
        return "storage_data is not a dict"
    needed: dict[str, int] = {}
    for index, info in md.storage_data.items():
        if type(index) is not MetadataIndex or type(index.fqn) is not str:
            return "a storage_data key is not a MetadataIndex"
        if index.fqn not in md.state_dict_metadata:
            return f"storage_data names {index.fqn!r}, which the state dict metadata lacks"
        if type(info) is not _StorageInfo:
            return f"{index.fqn}: storage info is a {type(info).__name__}"
        name = info.relative_path
        if type(name) is not str or not _SHARD_NAME.fullmatch(name):
            return f"{index.fqn}: shard file {name!r} is not a plain file name inside the checkpoint folder"
        if not (_is_int(info.offset) and _is_int(info.length)):
            return f"{index.fqn}: bad offset or length"
        if getattr(info, "transform_descriptors", None):
            return f"{index.fqn}: stream transforms {info.transform_descriptors!r} are not supported"
        needed[name] = max(needed.get(name, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        size = _regular_file(folder / name, "shard file")
        if size < end:
            raise CheckpointError(f"shard file is truncated: {size} bytes, the metadata needs {end}",
                                  path=str(folder / name), hint=_HINT)
    return None


_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")  # no separators, no leading dot ("..", ".metadata")


def _planner_and_reader(folder: Path, md):
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element

    class SafeReader(FileSystemReader):
        """FileSystemReader whose metadata is the checked one read above (never ``pickle.load``)."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            from torch.distributed.checkpoint.metadata import StorageMeta

            if md.storage_meta is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    class SafePlanner(DefaultLoadPlanner):
        """DefaultLoadPlanner whose non-tensor items load with ``torch.load(weights_only=True)``."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafePlanner(), SafeReader(str(folder))


def describe_failure(exc: BaseException) -> str:
    """One line for a DCP failure: the first rank's underlying exception."""
    failures = getattr(exc, "failures", None)
    prefix = ""
    if failures:
        rank, (exc, _trace) = sorted(failures.items(), key=lambda kv: kv[0])[0]
        prefix = f"rank {rank}: "
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if "Weights only load failed" in text:  # torch's advice to retry unsafely is not passed on
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n|$)", text)
        return (f"{prefix}a shard item was refused by torch's weights-only unpickler"
                + (f" ({detail.group(1).rstrip('.')})" if detail else " (damaged or not plain data)"))
    return f"{prefix}{type(exc).__name__}: {text}".splitlines()[0]


def reraise_interrupt(exc: BaseException) -> None:
    """DCP wraps everything, Ctrl-C and SystemExit included, into a CheckpointException: unwrap those."""
    for inner, _trace in (getattr(exc, "failures", None) or {}).values():
        if isinstance(inner, (KeyboardInterrupt, SystemExit)):
            raise inner


def load(state_dict: dict, folder: Path) -> None:
    """``dcp.load(state_dict)`` from ``folder`` through the checked metadata and the safe planner."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    folder = Path(folder)
    md = read_metadata(folder)
    planner, reader = _planner_and_reader(folder, md)
    try:
        with warnings.catch_warnings():  # one process reading a sharded checkpoint is intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state_dict, checkpoint_id=str(folder), storage_reader=reader, planner=planner)
    except CheckpointException as e:
        reraise_interrupt(e)
        raise CheckpointError(f"cannot read distributed checkpoint: {describe_failure(e)}", path=str(folder),
                              hint="the checkpoint is damaged or was written for another model") from None
    except Exception as e:  # noqa: BLE001 - any read failure means a damaged or mismatched checkpoint
        raise CheckpointError(f"cannot read distributed checkpoint: {type(e).__name__}: {e}".splitlines()[0],
                              path=str(folder), hint="the checkpoint is damaged or was written for another model") \
            from None
