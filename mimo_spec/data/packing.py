"""Global batches: which samples go in which row, packed (``data.packing``) or one per row.

A global batch is ``train.batch_size`` rows. Unpacked, row ``k`` is the sample at global position
``position + k`` of the run's order. Packed, rows are ``data.max_seq_len`` tokens and filled first-fit
in the order's sequence: each next sample goes into the first row with room for it; one that fits
nowhere is *deferred* (it opens the next batch), and the batch closes once ``lookahead`` samples wait.
The lengths come from ``dataset.token_length(index)`` (text only: nothing is decoded to plan a batch), so
every rank plans the same global batch and then loads only its own rows.

The plan depends on the order, the lengths and the planner's :class:`LoaderState` only, so the
state a checkpoint stores (the next position and the deferred positions) resumes the run exactly.
Samples that cannot be used (a DataError while planning, or :class:`~mimo_spec.data.samples.Dropped`)
are left out of the plan and reported with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mimo_spec.errors import DataError
from mimo_spec.loss import IGNORE_INDEX

# consecutive unusable samples after which planning stops with a data error (the data is not training data)
MAX_UNUSABLE_RUN = 1000


@dataclass(frozen=True)
class LoaderState:
    """Where the run is in its data: the next global position of the order, and the positions read
    but not yet placed in a row (packing defers a sample that did not fit)."""

    position: int = 0
    deferred: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        return {"position": int(self.position), "deferred": [int(p) for p in self.deferred]}

    @classmethod
    def from_dict(cls, d: dict | int | None) -> LoaderState:
        if d is None:
            return cls()
        if isinstance(d, int):
            return cls(int(d))
        return cls(int(d.get("position", 0)), tuple(int(p) for p in d.get("deferred", ())))


@dataclass
class Skipped:
    """A sample left out: ``kind`` "bad" (unusable) or "dropped" (the length limit), with what the log says."""

    kind: str
    index: int
    reason: str
    where: str = ""
    file: str = ""
    id: str | None = None
    position: int = -1  # in the run's order (one sample may come twice in a batch of a small dataset)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "sample": self.index, "position": self.position, "id": self.id, "file": self.file, "where": self.where,
                "reason": self.reason}


def skipped_from(error: DataError, index: int, position: int = -1) -> Skipped:
    """The log entry of a sample that raised ``error`` (a Dropped is "dropped", any other DataError "bad")."""
    from mimo_spec.data.samples import Dropped

    where = error.problems[0].path if error.problems else ""
    info = getattr(error, "record_info", None) or {}
    reason = "; ".join(p.message for p in error.problems) or str(error)
    return Skipped("dropped" if isinstance(error, Dropped) else "bad", int(index), reason[:500],
                   info.get("where", where), info.get("file", ""), info.get("id"), int(position))


@dataclass
class Plan:
    """One global batch: ``rows`` of (position, dataset index) pairs, the samples skipped while planning,
    and the state after it."""

    rows: list[list[tuple[int, int]]]
    skipped: list[Skipped] = field(default_factory=list)
    state: LoaderState = LoaderState()
    tokens: int = 0  # planned tokens (packed batches)


class Planner:
    """Plans global batches of ``batch_size`` rows from ``order`` (position -> dataset index)."""

    def __init__(self, dataset, order, batch_size: int, seq_len: int, packing: bool,
                 on_bad_sample: str = "skip", lookahead: int | None = None):
        self.dataset, self.order = dataset, order
        self.batch_size, self.seq_len, self.packing = int(batch_size), int(seq_len), bool(packing)
        self.on_bad_sample = on_bad_sample
        # samples that may wait for a later batch while this one fills (2 x rows: padding ~3-5%, see
        # benchmarks/data_packing.py); the waiting ones open the next batch
        self.lookahead = int(lookahead) if lookahead is not None else max(16, 2 * self.batch_size)

    def plan(self, state: LoaderState) -> Plan:
        if not self.packing:
            rows = [[(state.position + k, self.order[state.position + k])] for k in range(self.batch_size)]
            return Plan(rows, [], LoaderState(state.position + self.batch_size))
        rows: list[list[tuple[int, int]]] = [[] for _ in range(self.batch_size)]
        room = [self.seq_len] * self.batch_size
        skipped: list[Skipped] = []
        waiting: list[int] = []
        candidates = list(state.deferred)
        position, unusable, tokens = state.position, 0, 0
        while True:
            if candidates:
                pos = candidates.pop(0)
            elif len(waiting) >= self.lookahead:
                break
            else:
                pos, position = position, position + 1
            index = self.order[pos]
            try:
                n = int(self.dataset.token_length(index))
            except DataError as e:
                from mimo_spec.data.samples import Dropped

                if self.on_bad_sample == "error" and not isinstance(e, Dropped):  # (drops are never errors)
                    raise
                skipped.append(skipped_from(e, index, pos))
                unusable += 1
                if unusable >= min(MAX_UNUSABLE_RUN, len(self.dataset)):  # (a whole epoch, for a small set)
                    raise DataError(f"{unusable} samples in a row could not be used; the last: {skipped[-1].reason}",
                                    path=skipped[-1].where or "data", hint="check the data (action=data lists what "
                                    "is wrong) and data.max_seq_len") from None
                continue
            unusable = 0
            row = next((r for r in range(self.batch_size) if room[r] >= n), None)
            if row is None:
                waiting.append(pos)
                continue
            rows[row].append((pos, index))
            room[row] -= n
            tokens += n
            if not any(room):  # every row full
                break
        return Plan(rows, skipped, LoaderState(position, tuple(waiting)), tokens)


def collate_rows(rows: list[list[dict]], pad_id: int, seq_len: int | None) -> dict:
    """Rows of samples -> a batch. ``seq_len`` None: one sample per row (a filler for a skipped one),
    right-padded to the longest (``mimo_spec.data.batch.collate``). Else packed: every row ``seq_len``
    tokens, samples back to back with ``document_ids`` 0, 1, ... and the padding tail the next id;
    items of each modality row by row in sample order; ``items_per_sample`` counts per row; ``num_tokens``
    leaves out each document's first label (it is not predicted across documents)."""
    from mimo_spec.data.batch import collate, filler_sample

    if seq_len is None:  # a skipped sample's row stays, as a filler that trains nothing: the rows always divide
        filler = filler_sample({"input_ids": torch.tensor([int(pad_id)])})  # over the data-parallel ranks
        return collate([row[0] if row else filler for row in rows] or [filler], pad_id)
    b = max(1, len(rows))
    input_ids = torch.full((b, seq_len), int(pad_id), dtype=torch.long)
    labels = torch.full((b, seq_len), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((b, seq_len), dtype=torch.long)
    document_ids = torch.zeros((b, seq_len), dtype=torch.long)
    flat = []
    for r, row in enumerate(rows):
        at = 0
        for d, s in enumerate(row):
            n = int(s["input_ids"].shape[0])
            if at + n > seq_len:
                raise DataError(f"row {r} of a packed batch overflows {seq_len} tokens", path="data.packing")
            input_ids[r, at:at + n] = s["input_ids"]
            labels[r, at:at + n] = s["labels"]
            attention_mask[r, at:at + n] = 1
            document_ids[r, at:at + n] = d
            at += n
        document_ids[r, at:] = len(row)
        flat.append(row)
    # items and targets exactly as collate groups them, one "sample" per row
    merged = [_merge_row(row) for row in rows] or [{"num_items": {}, "items": {}}]
    from mimo_spec.data.batch import collate as _collate

    ids_stub = [{"input_ids": torch.zeros(1, dtype=torch.long), "labels": torch.zeros(1, dtype=torch.long), **m}
                for m in merged]
    grouped = _collate(ids_stub, pad_id)
    same_doc = document_ids[:, 1:] == document_ids[:, :-1]
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
             "document_ids": document_ids, "modality_inputs": grouped["modality_inputs"],
             "items_per_sample": grouped["items_per_sample"],
             "num_tokens": int(((labels[:, 1:] != IGNORE_INDEX) & same_doc).sum())}
    if "output_targets" in grouped:
        batch["output_targets"] = grouped["output_targets"]
    return batch


def _merge_row(row: list[dict]) -> dict:
    """A row's samples as one sample's items: each modality's items concatenated in sample order."""
    num_items: dict[str, int] = {}
    items: dict[str, list] = {}
    targets: dict[str, list] = {}
    for s in row:
        for m, n in (s.get("num_items") or {}).items():
            num_items[m] = num_items.get(m, 0) + int(n)
            if n:
                items.setdefault(m, []).append(s["items"][m])
        for m, t in (s.get("targets") or {}).items():
            if t.shape[0] > 0:
                targets.setdefault(m, []).append(t)
    merged_items = {m: {enc: {kw: torch.cat([p[enc][kw] for p in parts]) for kw in parts[0][enc]}
                        for enc in parts[0]} for m, parts in items.items()}
    return {"num_items": num_items, "items": merged_items,
            "targets": {m: torch.cat(t) for m, t in targets.items()}}
