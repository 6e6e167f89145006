"""Sources: lazy, indexed readers that turn data files into :class:`~mimo_spec.data.records.Record` s.

``open_source(cfg, split)`` opens the ``train`` or ``eval`` split of a validated data config:

* ``llava_json``: JSON Lines (``.jsonl``, one sample a line) or JSON list (``.json``) files;
* ``webdataset``: tar shards in the WebDataset layout (``key.json`` + ``key.jpg`` / ``key.0.png`` /
  ``key.mp4`` / ``key.wav`` ...);
* ``parquet``: Parquet files (or Arrow IPC ``.arrow`` files), one sample a row;
* ``mixture``: weighted sources (``data.mixture``).

``data.path`` (and ``eval_path``) is a file, a glob (``data/*.jsonl``), a folder (its files of the
source's kinds, sorted), or a list of those; ``webdataset`` paths also take braces
(``shard-{0000..0127}.tar``). The records of a split are the files' records in file order: the
first ``max_samples`` of them, then ``eval_path``'s, or a seeded ``eval_fraction`` held out.

Every source is *indexed*: opening it reads a small offset index per file (JSONL: the byte offset of
each non-blank line, found by a byte scan without parsing; a JSON list: each element's byte range,
found by parsing it once; a tar shard: each member's data offset and size, from its headers; Parquet:
the row groups of its footer), and ``record(i)`` reads that record only (plus its media bytes for
shards and Parquet). Indexes of JSON files and shards are cached (``data.index_dir``; else a hidden
``.<name>.mimo-index.npz`` beside the file when its folder is writable, else
``~/.cache/mimo-spec/index``), checked against the file's size and mtime, and loaded without pickle
(see ``mimo_spec.data.file_index``).

Because shards are indexed too, a WebDataset source is read like every other source: in the exact
seeded permutation of ``SampleOrder`` (no shuffle buffer), and a rank (or DataLoader worker) reads
only the members of the records of its own share.

Sources pickle cheaply into DataLoader workers: index arrays only; file handles are opened lazily in
each process.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from mimo_spec.data.config import (FileDataConfig, LlavaJsonDataConfig, MixtureDataConfig, ParquetDataConfig,
                                   WebDatasetDataConfig)
from mimo_spec.data.file_index import (AUDIO_EXTS, IMAGE_EXTS, VIDEO_EXTS, Files, cached_index, expand_paths,
                                       scan_json_list, scan_lines, scan_shard, too_deep)
from mimo_spec.data.samples import short as _short
from mimo_spec.data.loader import SampleOrder
from mimo_spec.data.records import Media, Record
from mimo_spec.data.local import resolve_path
from mimo_spec.errors import ConfigError, DataError, Problem, did_you_mean


# ----------------------------------------------------------------------------------------- base
class RecordSource(abc.ABC):
    """The records of one split: ``len(source)``, ``source.record(i)``, ``source.order(seed)``."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def record(self, index: int) -> Record:
        """Record ``index`` (0 <= index < len); reads only that record. Raises DataError naming the file and
        line / key of a record that cannot be read."""

    def order(self, seed: int):
        """The record index at each global position (``order[p]``): an exact seeded permutation per epoch."""
        return SampleOrder(len(self), seed)

    @abc.abstractmethod
    def files(self) -> list[str]:
        """The data files this split reads."""


# ------------------------------------------------------------------------------- split rules
def split_indices(n: int, cfg: FileDataConfig, split: str) -> np.ndarray | None:
    """The records (of ``n``, in file order) of ``split`` when it is held out of ``path`` by ``eval_fraction``:
    ``n_eval = min(max(round(n * f), 1 if f > 0 else 0), n - 1)`` records chosen by a ``torch.randperm``
    seeded with ``data.seed``. Sorted int64 indices, or None for all ``n``."""
    f = cfg.eval_fraction
    n_eval = min(max(round(n * f), 1 if f > 0 else 0), max(n - 1, 0))
    if n_eval == 0:
        return None if split == "train" else np.zeros(0, dtype=np.int64)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).numpy()
    held = np.zeros(n, dtype=bool)
    held[perm[:n_eval]] = True
    return np.flatnonzero(held if split == "eval" else ~held).astype(np.int64)


class _FileSource(RecordSource):
    """Records numbered across ``paths`` in file order; the split's are ``selected`` (None: all ``n``).

    Subclasses set ``SUFFIXES`` and implement ``_count(file_no)`` (reading that file's index) and
    ``_read(file_no, local_index)``.
    """

    SUFFIXES: tuple[str, ...] = ()
    BRACES = False

    def __init__(self, cfg: FileDataConfig, split: Literal["train", "eval"], prefix: str = "data"):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self.cfg, self.split = cfg, split
        own_eval = cfg.eval_path is not None and split == "eval"
        self.key = f"{prefix}.eval_path" if own_eval else f"{prefix}.path"
        self.paths: list[Path] = []
        counts, total = [], 0
        for p in expand_paths(cfg.eval_path if own_eval else cfg.path, self.key, self.SUFFIXES, self.BRACES):
            if cfg.max_samples is not None and total >= cfg.max_samples:
                break  # max_samples: the first N records; later files are not read
            self.paths.append(p)
            try:
                counts.append(self._count(len(self.paths) - 1))
            except DataError as e:  # a file that cannot be indexed: named under the key it came from
                raise DataError([Problem(self.key if pr.path == "data.path" else pr.path, pr.message, pr.hint)
                                 for pr in e.problems]) from None
            total += counts[-1]
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        self._n = total if cfg.max_samples is None else min(total, cfg.max_samples)
        self.selected = split_indices(self._n, cfg, split) if cfg.eval_path is None else None
        self._files = Files()
        for key in ("image_folder", "audio_folder", "video_folder"):  # a wrong folder: said once, not per sample
            folder = getattr(cfg, key, None)
            if folder and not resolve_path(folder).is_dir():
                raise ConfigError(f"no such folder: {resolve_path(folder)}", path=f"data.{key}",
                                  hint="the folder relative media paths resolve against; null: each data "
                                       "file's own folder")

    def __len__(self) -> int:
        return self._n if self.selected is None else len(self.selected)

    def files(self) -> list[str]:
        return [str(p) for p in self.paths]

    def record(self, index: int) -> Record:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        g = int(self.selected[index]) if self.selected is not None else int(index)
        file_no = int(np.searchsorted(self.starts, g, side="right")) - 1
        local = g - int(self.starts[file_no])
        try:
            return self._read(file_no, local)
        except DataError as e:  # what bad_samples.jsonl says of it: the file, and where in it
            if getattr(e, "record_info", None) is None:
                path = self.paths[file_no]
                where = e.problems[0].path if e.problems else ""
                if not where or where.startswith("data."):  # a config key: name the record instead
                    where = f"{path.name}: record {local + 1}"
                e.record_info = {"where": where, "file": str(path), "id": None}
            raise

    @abc.abstractmethod
    def _count(self, file_no: int) -> int:
        """Records in file ``file_no`` (from its index)."""

    @abc.abstractmethod
    def _read(self, file_no: int, local: int) -> Record:
        """Record ``local`` of file ``file_no``."""

    def _root(self, folder: str | None, file: Path) -> Path:
        return resolve_path(folder) if folder else file.parent


# -------------------------------------------------------------------------------- llava_json
def _media_list(rec: dict, one: str, many: str, where: str) -> list[str]:
    value = rec.get(many, rec.get(one))
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise DataError(f"{one!r} / {many!r} must be a path or a list of paths, got {_short(value)}", path=where,
                        hint=f'e.g. "{one}": "file" or "{many}": ["file1", "file2"]')
    return values


_MEDIA_KEYS = ("image", "images", "audio", "audios", "video", "videos")


def llava_record(rec, where: str, file: Path, image_root: Path, audio_root: Path,
                 images: list[Media] | None = None, audios: list[Media] | None = None,
                 default_id: str | None = None, video_root: Path | None = None,
                 videos: list[Media] | None = None) -> Record:
    """A parsed LLaVA sample -> Record: ``"image"`` / ``"images"``, ``"video"`` / ``"videos"`` (files or
    folders of frame images) and ``"audio"`` / ``"audios"`` paths resolved against the roots (unless
    ``images`` / ``videos`` / ``audios`` are given), other fields in ``extra``."""
    if not isinstance(rec, dict):
        raise DataError(f"expected a JSON object, got {type(rec).__name__}", path=where,
                        hint='a sample is {"id": ..., "image": ..., "conversations": [...]}')
    rid = rec.get("id", default_id)
    rid = None if rid is None else str(rid)
    if "id" in rec:
        where += f" (id {_short(rec['id'], 40)})"
    try:
        if not images:
            images = [Media(name=n, path=image_root / n) for n in _media_list(rec, "image", "images", where)]
        if not audios:
            audios = [Media(name=n, path=audio_root / n) for n in _media_list(rec, "audio", "audios", where)]
        if not videos:
            root = video_root if video_root is not None else file.parent
            videos = [Media(name=n, path=root / n) for n in _media_list(rec, "video", "videos", where)]
    except DataError as e:
        e.record_info = {"where": where, "file": str(file), "id": rid}
        raise
    extra = {k: v for k, v in rec.items() if k not in ("conversations", "id") + _MEDIA_KEYS}
    return Record(conversations=rec.get("conversations"), images=images, audios=audios, id=rid, where=where,
                  file=str(file), extra=extra, videos=videos)


def parse_json(data: bytes, path: Path, key: str, where: str, line: int | None = None):
    """One JSON value read from ``path`` (a JSONL line or a JSON list element); DataError in read_records'
    wording naming the file and line."""
    at = f" at line {line}" if line is not None else ""
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        place = f"line {line}, column {e.colno}" if line is not None else f"{where.split(': ', 1)[-1]}, column {e.colno}"
        raise DataError(f"{path}: not valid JSON at {place}: {e.msg}", path=key,
                        hint="each line of a .jsonl file is one JSON object" if line is not None
                        else "one JSON object holding the sample") from None
    except RecursionError:
        raise too_deep(path, key, f"line {line}" if line is not None else where.split(": ", 1)[-1]) from None
    except (ValueError, UnicodeDecodeError) as e:  # e.g. an integer of more digits than Python converts
        raise DataError(f"{path}: cannot read the JSON{at}: {e}"[:400], path=key,
                        hint="one JSON object of ordinary values (strings, short numbers)") from None


class JsonSource(_FileSource):
    """``llava_json``: JSON Lines files (a sample a line) and JSON list files."""

    SUFFIXES = (".json", ".jsonl")

    def __init__(self, cfg: LlavaJsonDataConfig, split: Literal["train", "eval"], prefix: str = "data"):
        self._index: list[dict[str, np.ndarray]] = []  # per file: start, end (and line) of each record
        super().__init__(cfg, split, prefix)

    def _count(self, file_no: int) -> int:
        p = self.paths[file_no]
        jsonl = p.suffix.lower() == ".jsonl"
        index = cached_index(p, "jsonl" if jsonl else "json", scan_lines if jsonl else scan_json_list,
                             self.cfg.index_dir)
        self._index.append(index)
        return len(index["start"])

    def _read(self, file_no: int, local: int) -> Record:
        p, index = self.paths[file_no], self._index[file_no]
        start, end = int(index["start"][local]), int(index["end"][local])
        line = int(index["line"][local]) if "line" in index else None
        where = f"{p.name}: line {line}" if line is not None else f"{p.name}: sample {local}"
        try:
            rec = parse_json(self._files.read(str(p), start, end - start), p, self.key, where, line)
        except DataError as e:
            e.record_info = {"where": where, "file": str(p), "id": None}
            raise
        return llava_record(rec, where, p, self._root(self.cfg.image_folder, p), self._root(self.cfg.audio_folder, p),
                            video_root=self._root(self.cfg.video_folder, p))


# -------------------------------------------------------------------------------- webdataset
def _item_order(ext: str) -> tuple:
    """``jpg`` first, then ``0.jpg``, ``1.jpg``, ... in numeric order, then other names."""
    head = ext.rsplit(".", 1)[0] if "." in ext else ""
    return (0, 0, "") if not head else (1, int(head), "") if head.isdigit() else (2, 0, head)


class WebDatasetSource(_FileSource):
    """``webdataset``: indexed tar shards; ``record(i)`` reads that sample's members only.

    ``key.json`` is the LLaVA record (its ``id``, else the key); image members (``jpg jpeg png webp``),
    video members (``mp4 webm mkv avi mov``) and audio members (``wav flac mp3 ogg``) are its items, ``key.jpg`` first, then ``key.0.jpg``, ``key.1.jpg``, ...
    in numeric order; without members of a kind, the json's paths are read (``image_folder`` / the shard's
    folder). Other members (``key.txt``, ``key.cls``) are ignored; a sample without ``key.json`` is a bad record.
    """

    SUFFIXES = (".tar",)
    BRACES = True

    def __init__(self, cfg: WebDatasetDataConfig, split: Literal["train", "eval"], prefix: str = "data"):
        self._index: list[dict[str, np.ndarray]] = []  # per shard: see scan_shard
        super().__init__(cfg, split, prefix)

    def _count(self, file_no: int) -> int:
        index = cached_index(self.paths[file_no], "tar", scan_shard, self.cfg.index_dir)
        index["m_first"] = np.searchsorted(index["m_sample"], np.arange(len(index["key"]) + 1)).astype(np.int64)
        self._index.append(index)
        return len(index["key"])

    def _read(self, file_no: int, local: int) -> Record:
        p, index = self.paths[file_no], self._index[file_no]
        key = index["key"][local].decode("utf-8", "surrogateescape")
        where = f"{p.name}: key {key}"
        if index["dup"][local]:
            raise DataError(f"{p}: two members of sample {key!r} have the same extension", path=where,
                            hint="each sample has one key.json and distinct key.<n>.jpg / key.<n>.wav names")
        json_data, images, audios, videos, outputs = None, [], [], [], {}
        lo, hi = int(index["m_first"][local]), int(index["m_first"][local + 1])
        exts = {m: index["m_ext"][m].decode("utf-8", "surrogateescape") for m in range(lo, hi)}
        for m in sorted(exts, key=lambda m: _item_order(exts[m])):
            ext = exts[m]
            offset, size = int(index["m_offset"][m]), int(index["m_size"][m])
            kind = ext.rsplit(".", 1)[-1]
            # media stay slices of the shard: read where they are decoded (the planner reads the text only)
            if ext == "json":
                json_data = self._files.read(str(p), offset, size)
            elif ext.split(".")[0] == "out" and kind in IMAGE_EXTS + AUDIO_EXTS:  # key.out.png: an item to generate
                key_name = "output_images" if kind in IMAGE_EXTS else "output_audios"  # (data/targets.py)
                outputs.setdefault(key_name, []).append(Media(name=f"{p.name}:{key}.{ext}", path=p, offset=offset,
                                                              length=size))
            elif kind in IMAGE_EXTS:
                images.append(Media(name=f"{p.name}:{key}.{ext}", path=p, offset=offset, length=size))
            elif kind in AUDIO_EXTS:
                audios.append(Media(name=f"{p.name}:{key}.{ext}", path=p, offset=offset, length=size))
            elif kind in VIDEO_EXTS:
                videos.append(Media(name=f"{p.name}:{key}.{ext}", path=p, offset=offset, length=size))
        if json_data is None:
            raise DataError(f"{p}: sample {key!r} has no {key}.json member (the conversation)", path=where,
                            hint='key.json holds {"conversations": [...]} beside key.jpg / key.wav')
        rec = parse_json(json_data, p, self.key, f"{p.name}: {key}.json")
        if outputs and isinstance(rec, dict):
            rec = {**rec, **outputs}
        return llava_record(rec, where, p, self._root(self.cfg.image_folder, p), self._root(self.cfg.audio_folder, p),
                            images, audios, default_id=key, video_root=self._root(self.cfg.video_folder, p),
                            videos=videos)


# ----------------------------------------------------------------------------------- parquet
class ParquetSource(_FileSource):
    """``parquet``: Parquet files (or Arrow IPC ``.arrow`` files), a sample a row; the index is each file's
    row groups (record batches for Arrow), ``record(i)`` reads one row group's needed columns (the last one
    read is kept, per process)."""

    SUFFIXES = (".parquet", ".arrow")

    def __init__(self, cfg: ParquetDataConfig, split: Literal["train", "eval"], prefix: str = "data"):
        self._groups: list[np.ndarray] = []  # per file: the first row of each row group, then the row count
        self._columns: list[list[str]] = []  # per file: the columns read
        self._cache = None  # ((pid, file, row group), its table)
        super().__init__(cfg, split, prefix)

    def _count(self, file_no: int) -> int:
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = self.paths[file_no]
        try:
            if p.suffix.lower() == ".arrow":
                schema, rows = self._arrow_table(p).schema, [self._arrow_table(p).num_rows]
            else:
                meta = pq.ParquetFile(p).metadata
                schema = meta.schema.to_arrow_schema()
                rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{p}: not a readable {'Arrow' if p.suffix.lower() == '.arrow' else 'Parquet'} file "
                            f"({e})"[:400], path=self.key, hint="write it with pyarrow or datasets' to_parquet")
        names = schema.names
        cfg = self.cfg
        for key in ("conversations_column", "image_column", "audio_column", "video_column", "id_column",
                    "chosen_column", "rejected_column"):
            column = getattr(cfg, key, None)
            # the default media / id columns are optional; a column named in the config must be there
            if column is not None and column not in names and (
                    key == "conversations_column" or column != type(cfg).model_fields[key].default):
                raise DataError(f"{p}: no column {column!r} (it has {', '.join(names)})",
                                path=self.key.rsplit(".", 1)[0] + "." + key,
                                hint=did_you_mean(column, names) or f"set {key} to one of the file's columns")
        self._columns.append([c for c in (cfg.conversations_column, cfg.image_column, cfg.audio_column,
                                          getattr(cfg, "video_column", None), cfg.id_column,
                                          getattr(cfg, "chosen_column", None), getattr(cfg, "rejected_column", None))
                              if c is not None and c in names])
        self._groups.append(np.concatenate([[0], np.cumsum(rows, dtype=np.int64)]).astype(np.int64))
        return int(sum(rows))

    def __getstate__(self):  # open files and tables stay in their process
        state = {k: v for k, v in self.__dict__.items() if k not in ("_arrow", "_arrow_pid", "_parquet", "_parquet_pid")}
        state["_cache"] = None
        return state

    def _arrow_table(self, p: Path):
        """An Arrow IPC file (or stream, as Hugging Face datasets writes) as a memory-mapped table: reading it
        copies nothing; the pages a row touches are read from disk."""
        import pyarrow as pa

        if getattr(self, "_arrow_pid", None) != os.getpid():
            self._arrow, self._arrow_pid = {}, os.getpid()
        if str(p) not in self._arrow:
            source = pa.memory_map(str(p))
            try:
                table = pa.ipc.open_file(source).read_all()
            except pa.ArrowInvalid:
                table = pa.ipc.open_stream(pa.memory_map(str(p))).read_all()
            self._arrow[str(p)] = table
        return self._arrow[str(p)]

    def _group(self, file_no: int, group: int):
        """Row group ``group`` of file ``file_no`` (its needed columns), the last one read kept."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        key = (os.getpid(), file_no, group)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        p, columns = self.paths[file_no], self._columns[file_no]
        if p.suffix.lower() == ".arrow":
            table = self._arrow_table(p).select(columns)
        else:
            if getattr(self, "_parquet_pid", None) != os.getpid():
                self._parquet, self._parquet_pid = OrderedDict(), os.getpid()
            pf = self._parquet.pop(file_no, None) or pq.ParquetFile(p)
            self._parquet[file_no] = pf
            while len(self._parquet) > 16:
                self._parquet.popitem(last=False)
            try:
                table = pf.read_row_group(group, columns=columns)
            except (pa.ArrowInvalid, OSError) as e:
                raise DataError(f"{p}: cannot read row group {group}: {e}"[:400], path=self.key,
                                hint="the file is damaged or was changed while in use") from None
        self._cache = (key, table)
        return table

    def _read(self, file_no: int, local: int) -> Record:
        p, cfg, groups = self.paths[file_no], self.cfg, self._groups[file_no]
        group = int(np.searchsorted(groups, local, side="right")) - 1
        if p.suffix.lower() == ".arrow":
            group, row = 0, local
        else:
            row = local - int(groups[group])
        table = self._group(file_no, group)
        where = f"{p.name}: row {local}"
        cell = {c: table.column(c)[row].as_py() for c in table.column_names}
        rid = cell.get(cfg.id_column) if cfg.id_column else None
        if rid is not None:
            where += f" (id {_short(rid, 40)})"
        conv = cell[cfg.conversations_column]
        extra = {}  # a preference pair's answers (train.objective: dpo)
        for key in ("chosen", "rejected"):
            column = getattr(cfg, f"{key}_column", None)
            if column is not None and column in cell:
                extra[key] = _turns_cell(cell[column])
        if extra and isinstance(conv, str) and not conv.lstrip().startswith(("[", "{")):
            conv = [{"from": "human", "value": conv}]  # a plain-text prompt (e.g. RLAIF-V's question)
        if isinstance(conv, (str, bytes)):
            conv = parse_json(conv.encode() if isinstance(conv, str) else conv, p, self.key, where)
        images = self._media(cell.get(cfg.image_column), cfg.image_column, local, p, cfg.image_folder, where)
        audios = self._media(cell.get(cfg.audio_column), cfg.audio_column, local, p, cfg.audio_folder, where)
        videos = self._media(cell.get(cfg.video_column), cfg.video_column, local, p, cfg.video_folder, where)
        return Record(conversations=conv, images=images, audios=audios, id=None if rid is None else str(rid),
                      where=where, file=str(p), videos=videos, extra=extra)

    def _media(self, value, column: str | None, row: int, p: Path, folder: str | None, where: str) -> list[Media]:
        """A media cell -> items: bytes, a path, a Hugging Face Image / Audio struct ``{bytes, path}``, or a list."""
        if value is None:
            return []
        out = []
        for k, v in enumerate(value if isinstance(value, list) else [value]):
            data, path = (v.get("bytes"), v.get("path")) if isinstance(v, dict) else (v, None) if isinstance(v, bytes) \
                else (None, v)
            if isinstance(data, (bytes, bytearray)):
                tail = Path(path).name if isinstance(path, str) and path else f"{column}[{k}]"
                out.append(Media(name=f"{p.name}:row {row}:{tail}", data=bytes(data)))
            elif isinstance(path, str) and path:
                out.append(Media(name=path, path=self._root(folder, p) / path))
            else:
                raise DataError(f"{column}[{k}] holds no bytes and no path: {_short(v)}", path=where,
                                hint="binary, a path, or a {bytes, path} struct (Hugging Face Image / Audio)")
        return out


def _turns_cell(value):
    """A chosen / rejected cell: a text, a list of turn structs, or a JSON string of a turn list (parsed)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            return value
        if isinstance(parsed, list) and all(isinstance(t, dict) for t in parsed):
            return parsed
    return value


# ----------------------------------------------------------------------------------- mixture
def _derived_seed(*parts) -> int:
    """A 63-bit seed from ``parts`` (the same in every process and run)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def mixture_slots(weights: list[float], total: int) -> np.ndarray:
    """Positions per source in an epoch of ``total``: ``weight / sum * total`` rounded by largest remainder."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    slots = np.floor(exact).astype(np.int64)
    left = total - int(slots.sum())
    if left:
        slots[np.argsort(-(exact - slots), kind="stable")[:left]] += 1
    return slots


class MixtureOrder:
    """The mixture's record at each global position.

    An epoch is ``len(mixture)`` positions, of which source ``s`` fills ``slots[s]``, laid out by a permutation
    seeded by (seed, epoch). The k-th visit to source ``s`` over the whole run (``epoch * slots[s]`` + its rank
    in the epoch) reads that source's ``SampleOrder(len_s, seed_s)[k]``: a small source repeats, a big one
    moves on through its records from epoch to epoch.
    """

    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        self.sizes = [int(n) for n in sizes]
        self.total = sum(self.sizes)
        if self.total == 0:
            raise DataError("the mixture holds no records", path="data.mixture", hint="check the entries' paths")
        # an empty source (an entry's eval split may be) gets no positions
        self.slots = mixture_slots([w if n else 0.0 for w, n in zip(weights, self.sizes)], self.total)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.seed = int(seed)
        self.orders = [SampleOrder(n, _derived_seed(self.seed, "source", s)) if n else None
                       for s, n in enumerate(self.sizes)]
        self._epoch, self._source, self._rank = -1, None, None

    def _layout(self, epoch: int) -> None:
        base = np.repeat(np.arange(len(self.sizes), dtype=np.int64), self.slots)
        g = torch.Generator().manual_seed(_derived_seed(self.seed, "mixture", epoch) % 2**63)
        source = base[torch.randperm(self.total, generator=g).numpy()]
        # rank of each position among its source's positions in the epoch: position order within each source
        by_source = np.argsort(source, kind="stable")
        rank = np.empty(self.total, dtype=np.int64)
        rank[by_source] = np.arange(self.total) - np.repeat(np.cumsum(self.slots) - self.slots, self.slots)
        self._epoch, self._source, self._rank = epoch, source, rank

    def source_at(self, position: int) -> tuple[int, int]:
        """(source, that source's record index) at global ``position``."""
        epoch, offset = divmod(int(position), self.total)
        if epoch != self._epoch:
            self._layout(epoch)
        s = int(self._source[offset])
        return s, self.orders[s][epoch * int(self.slots[s]) + int(self._rank[offset])]

    def __getitem__(self, position: int) -> int:
        s, index = self.source_at(position)
        return int(self.offsets[s]) + index


class MixtureSource(RecordSource):
    """``mixture``: the records of every source, one after another (record ``i``); ``order(seed)`` mixes them by
    weight (:class:`MixtureOrder`)."""

    def __init__(self, cfg: MixtureDataConfig, split: Literal["train", "eval"]):
        self.weights, self.sources, self.kinds = [], [], []
        for i, (weight, entry) in enumerate(cfg.sources()):
            source = _open(entry, split, f"data.mixture[{i}]")
            if split == "train" and len(source) == 0:
                raise DataError(f"no records in {', '.join(source.files()) or 'its files'}", path=f"data.mixture[{i}]",
                                hint="remove the entry, or point its path at data")
            self.weights.append(float(weight))
            self.sources.append(source)
            self.kinds.append(entry.source)
        self.offsets = np.concatenate([[0], np.cumsum([len(s) for s in self.sources])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def record(self, index: int) -> Record:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        s = int(np.searchsorted(self.offsets, index, side="right")) - 1
        rec = self.sources[s].record(index - int(self.offsets[s]))
        rec.where = f"mixture[{s}] {self.kinds[s]}: {rec.where}"
        return rec

    def order(self, seed: int) -> MixtureOrder:
        return MixtureOrder([len(s) for s in self.sources], self.weights, seed)

    def files(self) -> list[str]:
        return [f for s in self.sources for f in s.files()]


# ---------------------------------------------------------------------------------------- open
_SOURCE_CLASSES = {LlavaJsonDataConfig: JsonSource, WebDatasetDataConfig: WebDatasetSource,
                   ParquetDataConfig: ParquetSource}


def _open(cfg, split: str, prefix: str) -> RecordSource:
    for config_cls, source_cls in _SOURCE_CLASSES.items():
        if isinstance(cfg, config_cls):
            return source_cls(cfg, split, prefix)
    if isinstance(cfg, MixtureDataConfig):
        return MixtureSource(cfg, split)
    raise TypeError(f"no record source for a {type(cfg).__name__} (data.source {getattr(cfg, 'source', None)!r})")


def open_source(cfg, split: Literal["train", "eval"]) -> RecordSource:
    """The ``train`` or ``eval`` split of a validated data config (a file source's or a mixture's) as a
    :class:`RecordSource`. Builds (or loads) the files' indexes; reads no record."""
    return _open(cfg, split, "data")
