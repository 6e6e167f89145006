"""Files that are complete or absent: every writer of a run's files goes through here.

A file is written to a temporary name beside it, flushed to disk and renamed over the
target (``os.replace`` is atomic on one filesystem), then the folder is synced: a reader,
or a SIGKILL at any moment, sees the old file or the new one, never a part. A folder
(a checkpoint) is filled under a temporary name and renamed into place the same way.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterator


def temporary_name(path: Path) -> Path:
    """``.<name>.tmp<pid>`` beside ``path`` (the pid lets a later run remove a dead writer's leftovers)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    """Sync a folder's entries (the renames in it). Some filesystems cannot: the rename is still atomic."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_files(folder: Path) -> None:
    """Sync every file directly in ``folder`` (before the folder is renamed into place)."""
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on success it replaces ``path``,
    on any failure it is removed and ``path`` is untouched. ``suffix`` keeps a file type
    visible to writers that choose a format by extension (e.g. ``.png``)."""
    path = Path(path)
    tmp = temporary_name(path)
    if suffix:
        tmp = tmp.with_name(tmp.name + suffix)
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file so that it is either complete or absent."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(text)


def _finite(data: Any) -> Any:
    """``data`` with every NaN / infinity as None: strict JSON, which other tools (jq, JavaScript) can read."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def write_json_atomic(path: Path, data: Any, indent: int | None = 2) -> None:
    """``data`` as strict JSON (plus a newline; NaN and infinities as null), complete or absent."""
    write_text_atomic(path, json.dumps(_finite(data), indent=indent, default=str, allow_nan=False) + "\n")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a filled temporary folder into place, replacing an older ``final`` (re-saving a step)."""
    fsync_files(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (someone else's process counts as running)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
