"""Records: one raw sample as a source reads it, before tokenisation and media decoding.

A leaf module (standard library only), shared by the sources (``mimo_spec.data.sources``), the
media decoders (``mimo_spec.data.preprocess``) and the sample builder (``mimo_spec.data.samples``).
Records and media are small and picklable: sources hand them to DataLoader worker processes,
which tokenise and decode them there.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO


@dataclass(frozen=True)
class Media:
    """One image, video or audio item of a record: a file on disk (for a video also a folder of frame
    images), or bytes read from a tar shard or a Parquet cell. ``name`` is what messages show
    (``coco/000.jpg``, ``shard-0003.tar:000017.jpg``); its suffix, when it has one, says the format."""

    name: str
    path: Path | None = None
    data: bytes | None = None
    # a slice of ``path`` (a tar shard's member): read only when the item is decoded
    offset: int | None = None
    length: int | None = None

    def __post_init__(self):
        if (self.path is None) == (self.data is None):
            raise ValueError("a Media item holds a path or bytes, exactly one of them")
        if (self.offset is None) != (self.length is None) or (self.offset is not None and self.path is None):
            raise ValueError("a slice of a file needs a path, an offset and a length")

    @property
    def whole_file(self) -> bool:
        """True when the item is a file of its own (``path`` without a slice)."""
        return self.path is not None and self.offset is None

    @property
    def suffix(self) -> str:
        """The lower-case extension without its dot ("jpg"), or ""."""
        tail = self.name.rsplit("/", 1)[-1].rsplit(":", 1)[-1]
        return tail.rsplit(".", 1)[-1].lower() if "." in tail else ""

    def exists(self) -> bool:
        """The bytes, or the file (or, for a whole-file item, a folder: a video's frames) are there."""
        return self.data is not None or (self.path is not None and (
            self.path.is_file() or (self.offset is None and self.path.is_dir())))

    def is_dir(self) -> bool:
        """True for a folder on disk (a video given as its frame images)."""
        return self.whole_file and self.path.is_dir()

    def stream(self) -> BinaryIO:
        """A seekable binary file object reading only what is asked: the file, the bytes, or a view of a file's
        slice (a tar member read as far as the reader goes, never the whole member up front)."""
        if self.offset is None:
            return self.open()
        return io.BufferedReader(_SliceReader(self.path, self.offset, self.length))

    def head(self, n: int) -> bytes:
        """The first ``n`` bytes (fewer when the item is shorter), reading no more of a file or slice.
        Raises OSError for a missing file."""
        if self.data is not None:
            return self.data[:n]
        with open(self.path, "rb") as f:
            if self.offset is None:
                return f.read(n)
            f.seek(self.offset)
            return f.read(min(n, self.length))

    def size(self) -> int:
        """Bytes of the item (0 for a missing file)."""
        if self.data is not None:
            return len(self.data)
        if self.length is not None:
            return self.length if self.exists() else 0
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def open(self) -> BinaryIO:
        """A binary file object: the file itself, or the bytes in memory (a file's slice is read into memory).
        Raises OSError for a missing file, EOFError for a slice past the file's end."""
        if self.data is not None:
            return io.BytesIO(self.data)
        if self.offset is not None:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.length)
            if len(data) != self.length:
                raise EOFError(f"{self.path} ends inside {self.name} ({len(data)} of {self.length} bytes)")
            return io.BytesIO(data)
        return open(self.path, "rb")


@dataclass
class Record:
    """A sample as read from its source, in the LLaVA conversation layout.

    ``conversations``: the raw turns (``[{"from": "human", "value": "<image>\\nWhat?"}, {"from": "gpt",
    "value": "A cat."}]``), checked by the sample builder, not here. ``images`` / ``videos`` / ``audios``:
    the items in order (each ``<image>`` / ``<video>`` / ``<audio>`` tag takes the next one). ``where`` names the sample in
    messages (``train.jsonl: line 12 (id 000)``); ``file`` is the file or shard it came from.
    ``extra`` holds other fields a source passes on (e.g. ``chosen`` / ``rejected`` answers).
    """

    conversations: Any
    images: list[Media] = field(default_factory=list)
    audios: list[Media] = field(default_factory=list)
    id: str | None = None
    where: str = ""
    file: str = ""
    extra: dict = field(default_factory=dict)
    videos: list[Media] = field(default_factory=list)


class _SliceReader(io.RawIOBase):
    """``length`` bytes of ``path`` from ``offset`` as a seekable read-only file (positions relative to the slice)."""

    def __init__(self, path: Path, offset: int, length: int):
        super().__init__()
        self._f = open(path, "rb")
        self._offset, self._length, self._pos = int(offset), int(length), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + int(pos))
        return self._pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._length - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._offset + self._pos)
        data = self._f.read(n)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()
