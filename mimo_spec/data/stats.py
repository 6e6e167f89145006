"""Dataset scans: what ``action=validate`` checks and ``action=data`` reports, usable from Python.

:func:`scan_dataset` reads a dataset built by :func:`mimo_spec.data.build_dataset`:

- every record (or the first ``max_samples`` of a seeded random choice of them, for huge datasets) is read
  and encoded: its text, tags and length limit (:meth:`SampleBuilder.encode`: no media decoded);
- every media file a record refers to must exist (:meth:`Media.exists`; bytes from a shard always do);
- a seeded random ``decode_samples`` of the samples that passed are built whole (their media decoded), to
  find undecodable files without decoding the whole dataset.

A synthetic dataset has no records or files: a few of its samples (at most :data:`SYNTHETIC_SCAN`) are
built whole instead.

The result, :class:`DataStats`, holds the usable samples' token lengths and item counts, every problem
counted (the first :data:`MAX_LISTED` kept with their ``where`` and reason), and computes the length
statistics, a histogram and the share of padding with and without packing (packed rows planned by
:class:`~mimo_spec.data.packing.Planner`, exactly as training plans them).
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mimo_spec.data.packing import Skipped
from mimo_spec.errors import ConfigError, DataError, Problem

MAX_LISTED = 20  # problems kept with their details; the rest are counted
SYNTHETIC_SCAN = 256  # synthetic samples built (they are generated: their statistics need few)
HISTOGRAM_BINS = 16


class DataScanConfig(BaseModel):
    """``data_scan``: how much of the data ``action=validate`` and ``action=data`` read."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    # samples read and encoded per split (a seeded random choice when the split holds more)
    max_samples: int = Field(100_000, ge=1)
    # of those, samples built whole (media decoded) to find undecodable files
    decode_samples: int = Field(64, ge=0)


def validate_scan_config(value) -> DataScanConfig:
    """The ``data_scan`` section (a mapping, a DictConfig or None) -> its model; ConfigError naming each key."""
    import pydantic
    from omegaconf import OmegaConf

    from mimo_spec.errors import did_you_mean

    raw = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else (value or {})
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping, got {type(raw).__name__}", path="data_scan")
    try:
        return DataScanConfig(**raw)
    except pydantic.ValidationError as e:
        problems = []
        for err in e.errors():
            path = "data_scan." + ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(Problem(path, "unknown key", did_you_mean(str(err["loc"][-1]),
                                                                          DataScanConfig.model_fields)))
            else:
                problems.append(Problem(path, f"{err['msg'].lower()}, got {err.get('input')!r}",
                                        "see data_scan in conf/config.yaml"))
        raise ConfigError(problems) from None


@dataclass
class ScanProblem(Skipped):
    """A sample that cannot be used (a :class:`~mimo_spec.data.packing.Skipped`), and ``check``: what found
    it: ``read`` (the record or its text), ``length``, ``file`` (a media file is missing) or ``decode``
    (its media did not decode)."""

    check: str = "read"

    @classmethod
    def of(cls, check: str, kind: str, index: int, reason: str, where: str = "", file: str = "",
           id: str | None = None) -> ScanProblem:
        return cls(kind, index, reason, where, file, id, check=check)

    def to_dict(self) -> dict:
        d = super().to_dict()
        del d["position"]
        return {"kind": d.pop("kind"), "check": self.check, **d}

    def line(self) -> str:
        return f"{self.where or f'sample {self.index}'}: {self.reason}"


@dataclass
class DataStats:
    """One split's scan. ``lengths`` / ``items``: the usable samples' token lengths and items per input
    modality, by dataset index; ``order``: the usable samples in the order training reads them."""

    split: str
    total: int  # samples in the split
    scanned: int = 0  # samples read (all of them, unless capped)
    capped: bool = False  # scanned a seeded random choice of max_samples
    synthetic: bool = False
    lengths: dict[int, int] = field(default_factory=dict)
    items: dict[int, dict[str, int]] = field(default_factory=dict)
    modalities: list[str] = field(default_factory=list)
    order: list[int] = field(default_factory=list)
    problems: list[ScanProblem] = field(default_factory=list)  # the first MAX_LISTED bad and dropped ones
    bad: int = 0
    dropped: int = 0
    missing_files: int = 0  # distinct files
    undecodable: int = 0  # samples whose media did not decode
    decoded: int = 0  # samples built whole
    truncated: int = 0  # samples cut to the length limit (truncation: truncate)
    audio_cut: int = 0  # audio files cut to the encoder's window (audio_overflow: truncate)
    max_len: int = 0  # the sample length limit (data.max_seq_len)

    # ------------------------------------------------------------------------------ recording
    def _problem(self, p: ScanProblem) -> None:
        if p.kind == "bad":
            self.bad += 1
        else:
            self.dropped += 1
        if sum(1 for q in self.problems if q.kind == p.kind) < MAX_LISTED:  # the first of each kind
            self.problems.append(p)

    @property
    def usable(self) -> int:
        return len(self.lengths)

    @property
    def bad_fraction(self) -> float:
        return self.bad / self.scanned if self.scanned else 0.0

    # ------------------------------------------------------------------------------ statistics
    def length_summary(self) -> dict | None:
        """min / median / p95 / max / mean / total of the usable samples' token lengths (None: none usable)."""
        if not self.lengths:
            return None
        x = np.fromiter(self.lengths.values(), dtype=np.int64)
        return {"min": int(x.min()), "median": float(np.percentile(x, 50)), "p95": float(np.percentile(x, 95)),
                "max": int(x.max()), "mean": float(x.mean()), "total": int(x.sum())}

    def histogram(self, bins: int = HISTOGRAM_BINS) -> dict:
        """Counts of the token lengths in ``bins`` bins of equal integer width ``w`` from 0 (bin ``k`` holds
        lengths ``k*w`` .. ``(k+1)*w - 1``; together they cover 0 .. max_len); ``edges``: ``bins + 1`` values."""
        top = max(self.max_len, max(self.lengths.values(), default=0), 1)
        w = max(1, -(-(top + 1) // bins))
        edges = np.arange(bins + 1, dtype=np.int64) * w
        counts, _ = np.histogram(np.fromiter(self.lengths.values(), dtype=np.int64), bins=edges)
        return {"edges": [int(e) for e in edges], "counts": [int(c) for c in counts]}

    def item_summary(self) -> dict[str, dict]:
        """Per input modality: items in all usable samples, per sample mean and max, samples with any."""
        out = {}
        n = max(self.usable, 1)
        for m in self.modalities:
            counts = [c.get(m, 0) for c in self.items.values()]
            out[m] = {"total": int(sum(counts)), "mean": sum(counts) / n, "max": int(max(counts, default=0)),
                      "samples": int(sum(1 for c in counts if c))}
        return out

    def padding_unpacked(self, batch_size: int) -> float | None:
        """Share of padding with one sample per row: batches of ``batch_size`` rows in ``order``, each
        padded to its longest sample."""
        lengths = [self.lengths[i] for i in self.order]
        if not lengths:
            return None
        tokens = positions = 0
        for k in range(0, len(lengths), batch_size):
            chunk = lengths[k:k + batch_size]
            tokens += sum(chunk)
            positions += len(chunk) * max(chunk)
        return 1.0 - tokens / positions

    def padding_packed(self, batch_size: int, seq_len: int) -> float | None:
        """Share of padding in packed rows of ``seq_len`` tokens, ``batch_size`` rows a batch, planned as
        training plans them over ``order`` (repeated: a batch may reach into the next epoch) until every
        usable sample was read once."""
        from mimo_spec.data.packing import LoaderState, Planner

        if not self.order:
            return None
        planner = Planner(_Lengths(self.lengths), _Cycle(self.order), batch_size, seq_len, packing=True)
        state, batches, tokens = LoaderState(), 0, 0
        while state.position < len(self.order):
            plan = planner.plan(state)
            state, batches, tokens = plan.state, batches + 1, tokens + plan.tokens
        return 1.0 - tokens / (batches * batch_size * seq_len)

    def to_dict(self, batch_size: int | None = None, seq_len: int | None = None) -> dict:
        out = {"samples": self.total, "scanned": self.scanned, "capped": self.capped, "usable": self.usable,
               "bad": self.bad, "dropped": self.dropped, "missing_files": self.missing_files,
               "undecodable": self.undecodable, "decoded": self.decoded, "truncated": self.truncated,
               "audio_cut": self.audio_cut, "max_seq_len": self.max_len,
               "token_length": self.length_summary(), "histogram": self.histogram(), "items": self.item_summary()}
        if batch_size:
            out["padding"] = {"batch_size": int(batch_size), "seq_len": int(seq_len or self.max_len),
                              "unpacked": self.padding_unpacked(batch_size),
                              "packed": self.padding_packed(batch_size, seq_len or self.max_len)}
        out["problems"] = [p.to_dict() for p in self.problems]
        out["problems_not_listed"] = self.bad + self.dropped - len(self.problems)
        return out


class _Lengths:
    """What the planner asks of a dataset: ``token_length(i)``, here from the scan."""

    def __init__(self, lengths: dict[int, int]):
        self.lengths = lengths

    def token_length(self, index: int) -> int:
        return self.lengths[index]


class _Cycle:
    def __init__(self, order: list[int]):
        self.order = order

    def __getitem__(self, position: int) -> int:
        return self.order[int(position) % len(self.order)]


# ------------------------------------------------------------------------------------------ scanning
def scan_dataset(dataset, max_samples: int = 100_000, decode_samples: int = 64, seed: int = 0,
                 progress=None, split: str = "train") -> DataStats:
    """Scan ``dataset`` (a :class:`~mimo_spec.data.samples.RecordDataset` or any dataset with ``dataset[i]``,
    e.g. the synthetic one). ``seed``: the training seed (the order padding is measured in, the random
    choices). ``progress``: a rich Console to draw progress bars on (None: quiet)."""
    n = len(dataset)
    records = hasattr(dataset, "source") and hasattr(dataset, "builder")
    stats = DataStats(split, n, synthetic=not records, max_len=int(getattr(dataset, "max_len", 0) or 0))
    if records:
        stats.modalities = list(dataset.builder.input_modalities)
    cap = max_samples if records else min(max_samples, SYNTHETIC_SCAN)
    if n > cap:  # a seeded random choice, read in index order
        stats.capped = True
        chosen = sorted(int(i) for i in np.random.default_rng(seed).choice(n, size=cap, replace=False))
    else:
        chosen = list(range(n))
    stats.scanned = len(chosen)
    with _bars(progress) as bar:
        if records:
            _scan_records(dataset, chosen, decode_samples, seed, stats, bar)
        else:
            _scan_built(dataset, chosen, stats, bar)
    stats.problems.sort(key=lambda p: p.index)
    # the order training reads them in: the epoch's order when all were read, else the choice shuffled
    if stats.capped or not stats.lengths:
        stats.order = sorted(stats.lengths)
        random.Random(seed).shuffle(stats.order)
    else:
        order = dataset.order(seed) if hasattr(dataset, "order") else _sample_order(n, seed)
        stats.order = [i for i in (int(order[p]) for p in range(n)) if i in stats.lengths]
    return stats


def _sample_order(n: int, seed: int):
    from mimo_spec.data.loader import SampleOrder

    return SampleOrder(n, seed)


def _scan_records(dataset, chosen: list[int], decode_samples: int, seed: int, stats: DataStats, bar) -> None:
    from mimo_spec.data.packing import skipped_from

    exists: dict[str, bool] = {}
    missing: set[str] = set()
    task = bar.add("reading", len(chosen))
    for index in chosen:
        bar.advance(task)
        try:
            record = dataset.source.record(index)
        except DataError as e:  # the record itself cannot be read (bad JSON, a broken shard member)
            s = skipped_from(e, index)
            stats._problem(ScanProblem.of("read", "bad", index, s.reason, s.where, s.file, s.id))
            continue
        absent = []  # files first: encoding reads audio headers, which would report a missing file less plainly
        for m in [*record.images, *record.audios, *record.videos]:
            if m.path is None:  # bytes from a shard or a Parquet cell
                continue
            key = str(m.path)
            if key not in exists:
                if len(exists) > 1 << 20:
                    exists.clear()
                exists[key] = m.exists()
            if not exists[key] and m.name not in absent:
                absent.append(m.name)
                missing.add(key)
        if absent:
            stats._problem(ScanProblem.of("file", "bad", index, f"missing file{'s' if len(absent) > 1 else ''}: "
                                       + ", ".join(absent), record.where, str(record.file or ""), record.id))
            continue
        try:
            enc = dataset.builder.encode(record)  # what dataset.encoded(index) does, with the record at hand
        except DataError as e:
            s = skipped_from(e, index)
            stats._problem(ScanProblem.of("length" if s.kind == "dropped" else "read", s.kind, index, s.reason,
                                       record.where or s.where, str(record.file or s.file or ""), record.id))
            continue
        stats.lengths[index] = len(enc)
        stats.items[index] = {m: len(entries) for m, entries in enc.media.items()}
        stats.truncated += int(enc.truncated)
        stats.audio_cut += int(enc.audio_cut)
    stats.missing_files = len(missing)
    if not decode_samples or not stats.lengths:
        return
    picked = sorted(random.Random(seed).sample(sorted(stats.lengths), min(decode_samples, len(stats.lengths))))
    task = bar.add("decoding", len(picked))
    for index in picked:
        bar.advance(task)
        enc = dataset.encoded(index)  # read again: a scan keeps no record in memory
        try:
            dataset.builder.build(enc)
        except DataError as e:
            s = skipped_from(e, index)
            stats._problem(ScanProblem.of("decode", "bad", index, s.reason, enc.where, enc.file, enc.id))
            stats.undecodable += 1
            del stats.lengths[index], stats.items[index]
        stats.decoded += 1


def _scan_built(dataset, chosen: list[int], stats: DataStats, bar) -> None:
    """Datasets without records (synthetic): each chosen sample built whole."""
    from mimo_spec.data.packing import skipped_from

    task = bar.add("building", len(chosen))
    for index in chosen:
        bar.advance(task)
        try:
            sample = dataset[index]
        except DataError as e:
            s = skipped_from(e, index)
            stats._problem(ScanProblem.of("read", s.kind, index, s.reason, s.where, s.file, s.id))
            continue
        stats.decoded += 1
        stats.lengths[index] = int(sample["input_ids"].shape[0])
        counts = {m: int(c) for m, c in (sample.get("num_items") or {}).items()}
        for m in counts:
            if m not in stats.modalities:
                stats.modalities.append(m)
        stats.items[index] = {m: c for m, c in counts.items() if c}


class _NoBars:
    def add(self, what: str, total: int):
        return None

    def advance(self, task) -> None:
        pass


class _RichBars:
    def __init__(self, progress):
        self.p = progress

    def add(self, what: str, total: int):
        return self.p.add_task(what, total=total)

    def advance(self, task) -> None:
        self.p.advance(task)


@contextlib.contextmanager
def _bars(console):
    """Progress bars on ``console`` (a rich Console) while it is a terminal; else nothing drawn."""
    if console is None or not getattr(console, "is_terminal", False):
        yield _NoBars()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as p:
        yield _RichBars(p)


# ------------------------------------------------------------------------------------------ verdicts
def check_bad_samples(stats: list[DataStats], on_bad_sample: str, max_bad_fraction: float) -> None:
    """Raise a DataError naming the bad samples when the scans hold more than ``max_bad_fraction`` of bad
    ones (any under ``on_bad_sample: error``)."""
    bad = sum(s.bad for s in stats)
    scanned = sum(s.scanned for s in stats)
    if not bad:
        return
    if on_bad_sample == "error":
        head = Problem("data.on_bad_sample", f"{bad} of {scanned} samples scanned cannot be used, and "
                       "on_bad_sample is error", "fix or remove them, or set data.on_bad_sample=skip")
    elif bad > max_bad_fraction * scanned:
        head = Problem("data.max_bad_fraction", f"{bad} of {scanned} samples scanned ({bad / scanned:.1%}) cannot "
                       f"be used, more than data.max_bad_fraction={max_bad_fraction:g}",
                       "fix or remove them (action=data lists them), or raise data.max_bad_fraction")
    else:
        return
    listed = [p for s in stats for p in s.problems if p.kind == "bad"]
    problems = [head] + [Problem(p.where or f"{s.split} sample {p.index}", p.reason) for s in stats
                         for p in s.problems if p.kind == "bad"][:MAX_LISTED]
    if bad > len(problems) - 1:
        problems.append(Problem("", f"... and {bad - min(len(listed), MAX_LISTED)} more bad samples"))
    raise DataError(problems)


# ------------------------------------------------------------------------------------------ reports
def summary_line(s: DataStats) -> str:
    """One line: how much was scanned and what was found."""
    if s.total == 0:
        return f"{s.split}: no samples"
    scanned = (f"{s.scanned:,} of {s.total:,} samples scanned (a seeded random choice)" if s.capped
               else f"{s.total:,} samples")
    if s.synthetic:
        scanned += " (synthetic)"
    parts = [f"{s.usable:,} usable"]
    if s.bad:
        parts.append(f"{s.bad:,} bad")
    if s.dropped:
        parts.append(f"{s.dropped:,} dropped (length)")
    if s.decoded and not s.synthetic:
        parts.append(f"{s.decoded:,} decoded")
    line = f"{s.split}: {scanned}: " + ", ".join(parts)
    lengths = s.length_summary()
    if lengths:
        line += (f"; tokens min {lengths['min']} / median {lengths['median']:g} / p95 {lengths['p95']:g} / "
                 f"max {lengths['max']} (limit {s.max_len})")
    return line


def problem_lines(s: DataStats, prefix: str = "") -> list[str]:
    lines = [f"{prefix}{s.split} {p.kind} ({p.check}): {p.line()}" for p in s.problems]
    rest = s.bad + s.dropped - len(s.problems)
    if rest > 0:
        lines.append(f"{prefix}... and {rest:,} more {s.split} samples left out")
    return lines


def histogram_lines(s: DataStats, width: int = 40) -> list[str]:
    h = s.histogram()
    top = max(h["counts"], default=0) or 1
    edges = h["edges"]
    w = len(str(int(edges[-1])))
    lines = []
    for k, c in enumerate(h["counts"]):
        bar = "\u2588" * max(1, round(width * c / top)) if c else ""
        lines.append(f"  {edges[k]:>{w}}-{edges[k + 1] - 1:<{w}} | {bar} {c}")
    return lines


def report_lines(stats: list[DataStats], batch_size: int, seq_len: int, packing: bool) -> list[str]:
    """What ``action=data`` prints."""
    lines = []
    for s in stats:
        lines.append(summary_line(s))
        if s.split == "train" or s.usable:
            items = s.item_summary()
            for m, it in items.items():
                lines.append(f"  {m}: {it['total']:,} items, {it['mean']:.2f} per sample (max {it['max']}), "
                             f"in {it['samples']:,} samples")
            if s.truncated:
                lines.append(f"  {s.truncated:,} samples truncated to {s.max_len} tokens")
            if s.audio_cut:
                lines.append(f"  {s.audio_cut:,} audio files cut to the encoder's window")
        if s.split == "train" and s.usable:
            lines.append(f"  token lengths ({s.usable:,} usable samples):")
            lines += histogram_lines(s)
            un, pk = s.padding_unpacked(batch_size), s.padding_packed(batch_size, seq_len)
            lines.append(f"  padding: {un:.1%} with one sample per row (batches of {batch_size} rows padded to "
                         f"the longest), {pk:.1%} packed (rows of {seq_len} tokens); training uses "
                         f"{'packed rows' if packing else 'one sample per row'} (data.packing={str(packing).lower()})")
        lines += problem_lines(s, "  ")
    return lines


def plot_lengths(s: DataStats, png_path: Path) -> Path | None:
    """The train split's token-length histogram as a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    h = s.histogram()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    edges = h["edges"]
    ax.bar(edges[:-1], h["counts"], width=np.diff(edges), align="edge", edgecolor="white")
    ax.axvline(s.max_len, color="gray", linestyle="--", linewidth=1, label=f"max_seq_len {s.max_len}")
    ax.set_xlabel("tokens per sample")
    ax.set_ylabel("samples")
    ax.set_title(f"{s.split}: {s.usable:,} usable samples" + (" (scanned choice)" if s.capped else ""))
    ax.legend()
    fig.tight_layout()
    from mimo_spec.atomic import atomic_path

    try:
        with atomic_path(Path(png_path), suffix=".png") as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return Path(png_path)


# ------------------------------------------------------------------------------------------ the actions
def scan_run_data(run, model, tokenizer, scan: DataScanConfig, console=None, quick: bool = False) -> list[DataStats]:
    """Scan the train and eval splits of a run's data (``run``: a RunConfig). ``quick``: a synthetic
    dataset builds only ``decode_samples`` samples (``action=validate``)."""
    from mimo_spec.data import build_dataset

    out = []
    for split in ("train", "eval"):
        dataset = build_dataset(run.data, model, tokenizer, split)
        if getattr(run.train, "objective", "sft") == "dpo":  # records are preference pairs, read as training reads them
            inner = getattr(dataset, "dataset", dataset)
            if not callable(getattr(inner, "use_pairs", None)):
                from mimo_spec.errors import ConfigError
                from mimo_spec.train.preference import PAIR_DATA_HINT

                raise ConfigError(f"train.objective dpo needs preference pairs, and data.source {run.data.source} "
                                  "has none", path="train.objective", hint=PAIR_DATA_HINT)
            inner.use_pairs()
        cap = scan.max_samples
        if quick and run.data.source == "synthetic":
            cap = min(cap, max(1, scan.decode_samples))
        out.append(scan_dataset(dataset, cap, scan.decode_samples, run.train_seed, console, split))
    return out


def validate_run_data(run, model, tokenizer, scan_config=None, console=None) -> tuple[list[str], list[str]]:
    """``action=validate``'s data check: (summary lines, warning lines). Raises DataError naming the bad
    samples when there are more than ``data.max_bad_fraction`` of them (any under on_bad_sample: error)."""
    scan = validate_scan_config(scan_config)
    stats = scan_run_data(run, model, tokenizer, scan, console, quick=True)
    check_bad_samples(stats, run.data.on_bad_sample, run.data.max_bad_fraction)
    if not stats[0].usable:
        raise DataError(nothing_usable(stats[0]))
    return [summary_line(s) for s in stats], [line for s in stats for line in problem_lines(s)]


def nothing_usable(s: DataStats) -> list[Problem]:
    if s.total == 0:
        return [Problem("data", f"the {s.split} set is empty", "check data.path / data.num_samples")]
    head = Problem("data", f"none of the {s.scanned:,} {s.split} samples scanned can be used",
                   "check data.path, the media folders and data.max_seq_len")
    return [head] + [Problem(p.where or f"sample {p.index}", p.reason) for p in s.problems[:5]]


def run_data_action(run, model, tokenizer, scan_config, out_dir: Path | None, console=None) -> int:
    """``action=data``: print the statistics, write ``data_stats.json`` and ``token_lengths.png`` to ``out_dir``."""
    from mimo_spec.atomic import write_json_atomic

    scan = validate_scan_config(scan_config)
    stats = scan_run_data(run, model, tokenizer, scan, console)
    train = stats[0]
    if not train.usable:
        raise DataError(nothing_usable(train))
    batch_size, seq_len, packing = run.train.batch_size, train.max_len, bool(run.data.packing)
    for line in report_lines(stats, batch_size, seq_len, packing):
        print(line)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        report = {"source": run.data.source, "seed": run.train_seed,
                  "scan": {"max_samples": scan.max_samples, "decode_samples": scan.decode_samples},
                  "training": {"packing": packing, "batch_size": batch_size, "seq_len": seq_len},
                  "train": train.to_dict(batch_size, seq_len), "eval": stats[1].to_dict()}
        write_json_atomic(out_dir / "data_stats.json", report)
        png = plot_lengths(train, out_dir / "token_lengths.png")
        print(f"wrote {out_dir / 'data_stats.json'}" + (f" and {png}" if png else
                                                         " (token_lengths.png skipped: matplotlib is not installed)"))
    return 0
