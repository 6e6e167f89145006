"""Where training numbers go: a CSV file, TensorBoard (when installed) and a loss-curve PNG."""

from __future__ import annotations

import csv
import os
import io
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Appends one row per logged step to ``metrics.csv`` and to TensorBoard under ``tb/``.

    The file only ever grows by whole rows (one write each), or is replaced whole
    (a new run's header, a resume's truncated copy: temporary file, fsync, rename):
    a SIGKILL at any moment leaves a complete file. The writer holds the run
    directory's lock (see :mod:`mimo_spec.rundir`) until :meth:`close`.
    """

    def __init__(self, out_dir: Path, fields: list[str], resume: bool = False):
        from mimo_spec.rundir import RunLock

        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.csv"
        self.fields = fields
        if self.path.exists() and not self.path.is_file():  # a FIFO or a device would hang or flood the resume
            from mimo_spec.errors import StorageError

            raise StorageError("metrics.csv in the run directory is not a regular file", path=str(self.path),
                               hint="remove it, or give this run a directory of its own")
        self._lock = RunLock.acquire(self.out_dir)  # already ours when the CLI runs the job
        try:
            if not (resume and self.path.exists()):
                _replace_rows(self.path, fields, [])
            self._open()
        except BaseException:
            self._lock.release()
            raise
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / "tb"))
        except ImportError:  # tensorboard is optional: CSV and PNG still get written
            self._tb = None

    def log(self, row: dict[str, Any]) -> None:
        self.rows_written += 1
        self._csv.writerow(row)
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, row["step"])

    rows_written = 0

    def discard(self) -> None:
        """Remove the files of a run that failed before logging a row (the header, TensorBoard's folder)."""
        import shutil

        self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self.path.unlink(missing_ok=True)
        shutil.rmtree(self.out_dir / "tb", ignore_errors=True)
        self._file = open(os.devnull, "a", newline="")

    def _open(self) -> None:
        self._file = open(self.path, "a", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=self.fields, extrasaction="ignore")

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __del__(self):  # a training run that raised never called close(): don't keep its directory locked
        lock = getattr(self, "_lock", None)
        if lock is not None:
            self._lock = None
            lock.release()


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_loss(csv_path: Path, png_path: Path) -> Path | None:
    """Draw the loss (and eval loss, when present) against the step; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(csv_path)
    train = [(int(r["step"]), float(r["loss"])) for r in rows if r.get("loss")]
    evals = [(int(r["step"]), float(r["eval_loss"])) for r in rows if r.get("eval_loss")]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from mimo_spec.atomic import atomic_path

    try:
        with atomic_path(png_path, suffix=".png") as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return png_path


class NullMetrics:
    """Ranks other than 0 write no files; they keep their rows in memory."""

    path = None

    def __init__(self):
        self.rows: list[dict] = []

    def log(self, row: dict) -> None:
        self.rows.append({k: str(v) for k, v in row.items()})

    @property
    def rows_written(self) -> int:
        return len(self.rows)

    def discard(self) -> None:
        pass

    def close(self) -> None:
        pass


def truncate_metrics(metrics: MetricsWriter, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (they will be redone).

    The shortened copy replaces the file atomically; a row cut short by a kill is dropped.
    """
    metrics._file.close()
    rows = [r for r in _complete_rows(metrics.path) if int(r["step"]) <= step]
    _replace_rows(metrics.path, metrics.fields, rows)
    metrics._open()


def _complete_rows(path: Path) -> list[dict[str, str]]:
    """The rows of ``path`` that were written whole (a last line without its newline was cut short)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows = []
    for r in csv.DictReader(io.StringIO(text, newline="")):
        step = (r.get("step") or "").strip()
        if step.isdigit():
            rows.append(r)
    return rows


def _replace_rows(path: Path, fields: list[str], rows: list[dict]) -> None:
    from mimo_spec.atomic import write_text_atomic
    from mimo_spec.rundir import remove_stale_temporaries

    remove_stale_temporaries(path)  # a rewrite killed midway left one (we hold the run's lock)
    out = io.StringIO(newline="")
    w = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(path, out.getvalue())
