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
    """One image or audio item of a record: a file on disk, or bytes read from a tar shard or a
    Parquet cell. ``name`` is what messages show (``coco/000.jpg``, ``shard-0003.tar:000017.jpg``);
    its suffix, when it has one, says the format."""

    name: str
    path: Path | None = None
    data: bytes | None = None

    def __post_init__(self):
        if (self.path is None) == (self.data is None):
            raise ValueError("a Media item holds a path or bytes, exactly one of them")

    @property
    def suffix(self) -> str:
        """The lower-case extension without its dot ("jpg"), or ""."""
        tail = self.name.rsplit("/", 1)[-1].rsplit(":", 1)[-1]
        return tail.rsplit(".", 1)[-1].lower() if "." in tail else ""

    def exists(self) -> bool:
        return self.data is not None or (self.path is not None and self.path.is_file())

    def size(self) -> int:
        """Bytes of the item (0 for a missing file)."""
        if self.data is not None:
            return len(self.data)
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def open(self) -> BinaryIO:
        """A binary file object: the file itself, or the bytes in memory. Raises OSError for a missing file."""
        if self.data is not None:
            return io.BytesIO(self.data)
        return open(self.path, "rb")


@dataclass
class Record:
    """A sample as read from its source, in the LLaVA conversation layout.

    ``conversations``: the raw turns (``[{"from": "human", "value": "<image>\\nWhat?"}, {"from": "gpt",
    "value": "A cat."}]``), checked by the sample builder, not here. ``images`` / ``audios``: the items
    in order (each ``<image>`` / ``<audio>`` tag takes the next one). ``where`` names the sample in
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
