"""Where training numbers go: a CSV file, TensorBoard (when installed) and a loss-curve PNG."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Appends one row per logged step to ``metrics.csv`` and to TensorBoard under ``tb/``."""

    def __init__(self, out_dir: Path, fields: list[str], resume: bool = False):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.csv"
        self.fields = fields
        new = not (resume and self.path.exists())
        self._file = open(self.path, "w" if new else "a", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=fields, extrasaction="ignore")
        if new:
            self._csv.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / "tb"))
        except ImportError:  # tensorboard is optional: CSV and PNG still get written
            self._tb = None

    def log(self, row: dict[str, Any]) -> None:
        self._csv.writerow(row)
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


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
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png_path)
    return png_path


class NullMetrics:
    """Ranks other than 0 write no files; they keep their rows in memory."""

    path = None

    def __init__(self):
        self.rows: list[dict] = []

    def log(self, row: dict) -> None:
        self.rows.append({k: str(v) for k, v in row.items()})

    def close(self) -> None:
        pass


def truncate_metrics(metrics: MetricsWriter, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (they will be redone)."""
    metrics._file.close()
    rows = [r for r in read_metrics(metrics.path) if int(r["step"]) <= step]
    with open(metrics.path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=metrics.fields)
        w.writeheader()
        w.writerows(rows)
    metrics._file = open(metrics.path, "a", newline="")
    metrics._csv = csv.DictWriter(metrics._file, fieldnames=metrics.fields, extrasaction="ignore")
