"""The run's record of samples it skipped: ``bad_samples.jsonl`` in the run dir, counts, and the stop rule.

Every training micro-batch carries the samples skipped while planning its global batch (the same on
every rank) and while loading this rank's rows (``skipped`` / ``load_skipped``, see
``mimo_spec.data.loader``). :meth:`SkipLog.update` counts them over the whole run (once per sample,
whatever the layout), appends one JSON line per sample to ``bad_samples.jsonl`` (the main process
writes) and stops the run with a :class:`~mimo_spec.errors.DataError` naming samples once bad ones
(unreadable, not the length limit's drops) pass ``data.max_bad_fraction`` of the samples read --
checked once 100 samples (or the whole dataset, if smaller) have been read.
"""

from __future__ import annotations

import json
from pathlib import Path

from mimo_spec.errors import DataError

MIN_READ = 100  # samples read before the bad fraction is judged


class SkipLog:
    def __init__(self, out_dir: Path | None, main: bool, drun, max_bad_fraction: float, dataset_size: int,
                 counts: dict | None = None):
        self.path = Path(out_dir) / "bad_samples.jsonl" if out_dir is not None else None
        self.main, self.drun, self.max_bad_fraction = main, drun, float(max_bad_fraction)
        self.min_read = max(1, min(MIN_READ, int(dataset_size)))
        counts = counts or {}
        self.read, self.bad, self.dropped = (int(counts.get(k, 0)) for k in ("read", "bad", "dropped"))
        self.examples: list[dict] = []  # the first few bad ones, for the stop message

    def counts(self) -> dict:
        return {"read": self.read, "bad": self.bad, "dropped": self.dropped}

    def update(self, micro: list[dict]) -> None:
        """Count and log the skipped samples of one step's micro-batches; raise DataError past the limit."""
        planned = [s for b in micro for s in b.get("skipped", []) if s not in b.get("load_skipped", [])]
        loaded = [s for b in micro for s in b.get("load_skipped", [])]
        self.read += sum(int(b.get("planned", 0)) for b in micro)
        if self.drun is not None:  # rows are loaded by their share's ranks: gather, once per sample
            loaded = self._gathered(loaded)
        entries = {(s.kind, s.position, s.index): s for s in planned + loaded}  # once per sample read
        new = list(entries.values())
        for s in new:
            if s.kind == "bad":
                self.bad += 1
                if len(self.examples) < 5:
                    self.examples.append(s.to_dict())
            else:
                self.dropped += 1
        if new and self.main and self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                for s in new:
                    f.write(json.dumps(s.to_dict(), ensure_ascii=False) + "\n")
        if self.read >= self.min_read and self.bad + self.dropped >= self.read:
            raise self._none_usable("; ".join(f"{s.where or s.index}: {s.reason}" for s in new[:3]))
        if self.read >= self.min_read and self.bad > self.max_bad_fraction * self.read:
            shown = "; ".join(f"{e['where'] or e['sample']}: {e['reason']}" for e in self.examples[:3])
            raise DataError(f"{self.bad} of {self.read} samples read could not be used, more than "
                            f"data.max_bad_fraction={self.max_bad_fraction:g} of them (e.g. {shown})",
                            path="data.max_bad_fraction",
                            hint="fix the data (action=data lists the bad samples; the run dir's bad_samples.jsonl "
                                 "has each), or raise data.max_bad_fraction")

    def require_some_used(self) -> None:
        """At the end of a run: a DataError when samples were read and none could be used (a run shorter than
        the checks in :meth:`update` need, with unpacked rows, which keep a skipped sample's row as a filler
        that trains nothing)."""
        if self.read and self.bad + self.dropped >= self.read:
            raise self._none_usable("; ".join(f"{e['where'] or e['sample']}: {e['reason']}" for e in self.examples[:3]))

    def _none_usable(self, shown: str) -> DataError:
        return DataError(f"none of the {self.read} samples read could be used" + (f" (e.g. {shown})" if shown else ""),
                         path="data", hint="check the data and data.max_seq_len (action=data shows what is wrong)")

    def _gathered(self, mine: list) -> list:
        import torch
        import torch.distributed as dist

        count = torch.tensor([len(mine)], dtype=torch.int64)
        dist.all_reduce(count)
        if int(count) == 0:
            return []
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        return [s for part in everyone for s in part]
