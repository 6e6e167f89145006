"""Data files for the sources: path specs to file lists, offset indexes and their cache, reads at an offset.

An index is a few numpy arrays per data file (offsets, sizes, line numbers, tar member names), built
once by a scan that parses as little as it can, and cached in a ``.npz`` file checked against the data
file's size and mtime (``cached_index``). ``Files`` reads byte ranges with ``os.pread``, with
descriptors opened lazily in each process.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import sys
import tarfile
import warnings
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np

from mimo_spec.atomic import atomic_path
from mimo_spec.data.local import resolve_path
from mimo_spec.errors import DataError

INDEX_VERSION = 2  # 2: shards index video members too
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTS = ("wav", "flac", "mp3", "ogg")
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
_OPEN_FILES = 64  # file descriptors a process keeps open per source (least recently used are closed)


class Files:
    """Read-only file descriptors opened lazily in each process, least recently used closed past a limit.
    Reads use ``os.pread`` (no file position), so processes never move each other's reads."""

    def __init__(self):
        self._pid, self._fds = os.getpid(), OrderedDict()

    def read(self, path: str, offset: int, size: int) -> bytes:
        """``size`` bytes of ``path`` at ``offset``; DataError naming the file when it cannot be read."""
        if self._pid != os.getpid():  # a forked copy: its inherited descriptors are closed, its own opened
            self.close()
            self._pid = os.getpid()
        try:
            fd = self._fds.pop(path, None)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                while len(self._fds) >= _OPEN_FILES:
                    os.close(self._fds.popitem(last=False)[1])
            self._fds[path] = fd
            data = os.pread(fd, size, offset)
        except OSError as e:
            raise DataError(f"{path}: cannot read {size} bytes at offset {offset}: {e.strerror or e}", path=path,
                            hint="the data files must stay in place while a run reads them") from None
        if len(data) != size:
            raise DataError(f"{path}: the file is shorter than its index says (changed while in use?)",
                            path=path, hint="restart the run; its index is rebuilt")
        return data

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = OrderedDict()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __reduce__(self):  # a copy in another process starts with no descriptors
        return Files, ()


# -------------------------------------------------------------------------------- file lists
def expand_paths(spec: str | list[str], key: str, suffixes: tuple[str, ...], braces: bool = False) -> list[Path]:
    """``data.path``'s files: each entry a file, a glob or a folder (its files ending in ``suffixes``, sorted);
    ``braces``: ``{0000..0127}`` expanded first. Raises DataError naming ``key`` and the pattern."""
    entries = [spec] if isinstance(spec, str) else list(spec)
    if not entries:
        raise DataError("an empty list of files", path=key, hint="a file, a glob, a folder or a list of them")
    out: list[Path] = []
    for entry in entries:
        patterns = [entry]
        if braces:
            from braceexpand import braceexpand

            patterns = list(braceexpand(entry))
        for pattern in patterns:
            p = resolve_path(pattern)
            if any(c in pattern for c in "*?["):
                found = sorted(Path(f) for f in globlib.glob(str(p), recursive=True) if os.path.isfile(f))
                if not found:
                    raise DataError(f"no file matches {pattern!r} (searched {p})", path=key,
                                    hint="relative paths resolve against the directory the run was started in")
                out += found
            elif p.is_dir():
                found = sorted(f for f in p.iterdir() if f.is_file() and f.name.lower().endswith(suffixes)
                               and not f.name.startswith("."))
                if not found:
                    raise DataError(f"the folder {p} holds no {' / '.join(suffixes)} file", path=key,
                                    hint="point it at the data files, or a glob of them")
                out += found
            elif p.is_file():
                out.append(p)
            else:
                raise DataError(f"data file not found: {p}" + (f" (from {entry!r})" if pattern != entry else ""),
                                path=key, hint="relative paths resolve against the directory the run was started in")
    return out


# ------------------------------------------------------------------------------- index cache
def _index_locations(path: Path, index_dir: str | None) -> list[Path]:
    """Where ``path``'s index may be: ``index_dir``; else beside the data, then the user's cache."""
    digest = hashlib.sha256(str(path.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    if index_dir is not None:
        return [resolve_path(index_dir) / f"{path.name}.{digest}.mimo-index.npz"]
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mimo-spec" / "index"
    return [path.parent / f".{path.name}.mimo-index.npz", home / f"{path.name}.{digest}.mimo-index.npz"]


def cached_index(path: Path, kind: str, build: Callable[[Path], dict[str, np.ndarray]],
                 index_dir: str | None = None) -> dict[str, np.ndarray]:
    """``build(path)``'s arrays, read from the cache when it matches the file's size and mtime, else built and
    written there (atomically; a folder that cannot be written is passed over)."""
    st = path.stat()
    stamp = np.array([INDEX_VERSION, zlib.crc32(kind.encode()), st.st_size, st.st_mtime_ns], dtype=np.int64)
    locations = _index_locations(path, index_dir)
    for loc in locations:
        try:
            with np.load(loc, allow_pickle=False) as z:
                if np.array_equal(z["_stamp"], stamp):
                    return {k: z[k] for k in z.files if k != "_stamp"}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # absent or damaged: rebuilt below
            pass
    arrays = build(path)
    for loc in locations:
        try:
            loc.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(loc) as tmp, open(tmp, "wb") as f:
                np.savez(f, _stamp=stamp, **arrays)
            break
        except OSError:
            continue
    else:
        warnings.warn(f"could not cache the index of {path} in {' or '.join(str(p.parent) for p in locations)}; "
                      "it is rebuilt by every run (set data.index_dir to a writable folder)", stacklevel=2)
    return arrays


# -------------------------------------------------------------------------------- scans
def too_deep(path: Path, key: str, where: str) -> DataError:
    """The DataError for JSON nested deeper than the reader's recursion allows."""
    return DataError(f"{path}: lists/objects nested too deeply at {where} (more than the JSON reader's limit of "
                     f"about {sys.getrecursionlimit()} levels)", path=key,
                     hint="a sample is an object with a list of turns: a few levels deep; this file is damaged "
                          "or not LLaVA data")


def scan_lines(path: Path, chunk_size: int = 1 << 20) -> dict[str, np.ndarray]:
    """JSON Lines index: ``start`` / ``end`` byte offsets and 1-based ``line`` of every non-blank line, found by
    a byte scan in chunks (no JSON parsing; memory: the chunk and 24 bytes a line)."""
    starts, ends, lines = [], [], []
    pos, line_start, line_has, lineno = 0, 0, False, 1
    ws = np.zeros(256, dtype=bool)
    ws[[9, 10, 13, 32]] = True
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            a = np.frombuffer(chunk, dtype=np.uint8)
            nl = np.flatnonzero(a == 10)
            seg = np.concatenate([[0], nl + 1])
            seg = seg[seg < len(a)]
            has = np.logical_or.reduceat(~ws[a], seg)  # any non-blank byte, per piece between newlines
            k = len(nl)
            if k:
                seg_start = np.concatenate([[line_start], pos + seg[1:k]]).astype(np.int64)
                seg_has = np.concatenate([[line_has or bool(has[0])], has[1:k]])
                keep = np.flatnonzero(seg_has)
                starts.append(seg_start[keep])
                ends.append((pos + nl)[keep])
                lines.append(lineno + keep)
                lineno += k
                line_start, line_has = pos + int(nl[-1]) + 1, bool(has[k]) if k < len(has) else False
            else:
                line_has = line_has or bool(has[0])
            pos += len(a)
    if line_has:  # a last line without a newline
        starts.append(np.array([line_start]))
        ends.append(np.array([pos]))
        lines.append(np.array([lineno]))
    cat = (lambda xs: np.concatenate(xs).astype(np.int64) if xs else np.zeros(0, dtype=np.int64))
    return {"start": cat(starts), "end": cat(ends), "line": cat(lines)}


def scan_json_list(path: Path) -> dict[str, np.ndarray]:
    """JSON list index: the ``start`` / ``end`` byte range of every element, parsed once element by element
    (memory: a few times the file's size, while indexing)."""
    from mimo_spec.train.limits import machine_memory, require_fits

    # the bytes, then the text (its decoder may hold two copies for a moment): about three times the file
    require_fits(3 * path.stat().st_size, machine_memory(), f"indexing {path}", "data.path",
                 "split it into smaller files, or convert it to JSON Lines (.jsonl: no parsing to index)",
                 cls=DataError)
    raw = path.read_bytes()
    text = raw.decode("utf-8", "surrogateescape")  # byte-exact: offsets map back to the file
    del raw
    ascii_only = text.isascii()
    dec = json.JSONDecoder()
    starts, ends = [], []
    byte_at, char_at = 0, 0  # a char index and its byte offset (for non-ASCII text)

    def offset(i: int) -> int:
        nonlocal byte_at, char_at
        if ascii_only:
            return i
        byte_at += len(text[char_at:i].encode("utf-8", "surrogateescape"))
        char_at = i
        return byte_at

    def fail(i: int, msg: str) -> DataError:
        line = text.count("\n", 0, i) + 1
        col = i - (text.rfind("\n", 0, i) + 1) + 1
        return DataError(f"{path}: not valid JSON at line {line}, column {col}: {msg}", path="data.path",
                         hint="check it with: python -m json.tool FILE")

    n = len(text)

    def skip(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    i = skip(1 if text.startswith("\ufeff") else 0)
    if i >= n or text[i] != "[":
        kind = "nothing" if i >= n else ("an object" if text[i] == "{" else "no list")
        raise DataError(f"{path}: expected a JSON list of samples, got {kind}", path="data.path",
                        hint='[{"id": ..., "image": ..., "conversations": [...]}, ...]; '
                             "one object a line is JSON Lines: name the file .jsonl")
    i = skip(i + 1)
    if i < n and text[i] == "]":
        i += 1
    else:
        while True:
            try:
                _, end = dec.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise fail(e.pos, e.msg) from None
            except RecursionError:
                raise too_deep(path, "data.path", f"line {text.count(chr(10), 0, i) + 1}") from None
            except ValueError as e:  # e.g. an integer of more digits than Python converts
                raise DataError(f"{path}: cannot read the JSON: {e}"[:400], path="data.path",
                                hint="a list of samples holding ordinary values (strings, short numbers)") from None
            starts.append(offset(i))
            ends.append(offset(end))
            i = skip(end)
            if i < n and text[i] == ",":
                i = skip(i + 1)
            elif i < n and text[i] == "]":
                i += 1
                break
            else:
                raise fail(i, "expected ',' or ']' after a sample")
    if skip(i) != n:
        raise fail(skip(i), "extra data after the list")
    return {"start": np.array(starts, dtype=np.int64), "end": np.array(ends, dtype=np.int64)}

def scan_shard(path: Path) -> dict[str, np.ndarray]:
    """A tar shard's index from its headers (no member data read): the samples' ``key`` (members grouped by
    webdataset's rule: consecutive members sharing ``base_plus_ext``'s base), and per kept member (json, image,
    audio) its ``m_sample``, ``m_ext`` (lower case, e.g. ``0.jpg``), data ``m_offset`` and ``m_size``. Names are
    UTF-8 byte strings (``.decode()`` them): a quarter of numpy's unicode arrays."""
    from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

    keys, dup = [], []
    m_sample, m_ext, m_offset, m_size = [], [], [], []
    kinds = ("json",) + IMAGE_EXTS + AUDIO_EXTS + VIDEO_EXTS
    try:
        with tarfile.open(path, mode="r:") as tf:
            seen: set[str] = set()
            while (info := tf.next()) is not None:
                tf.members = []  # headers only: nothing kept past this loop
                name = info.name
                if not info.isreg() or ("/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix)):
                    continue
                base, ext = base_plus_ext(name)
                if base is None:
                    continue
                ext = ext.lower()
                if not keys or base != keys[-1]:
                    keys.append(base)
                    dup.append(False)
                    seen = set()
                if ext in seen:
                    dup[-1] = True
                seen.add(ext)
                if ext.rsplit(".", 1)[-1] in kinds:
                    m_sample.append(len(keys) - 1)
                    m_ext.append(ext)
                    m_offset.append(info.offset_data)
                    m_size.append(info.size)
    except tarfile.ReadError as e:
        raise DataError(f"{path}: cannot be read as a tar shard ({e})", path="data.path",
                        hint="WebDataset shards are whole, uncompressed .tar files (a compressed or cut-off one "
                             "cannot be indexed)") from None
    return {"key": _utf8(keys), "dup": np.array(dup, dtype=bool),
            "m_sample": np.array(m_sample, dtype=np.int64), "m_ext": _utf8(m_ext),
            "m_offset": np.array(m_offset, dtype=np.int64), "m_size": np.array(m_size, dtype=np.int64)}


def _utf8(names: list[str]) -> np.ndarray:
    return np.array([n.encode("utf-8", "surrogateescape") for n in names], dtype=bytes)
