"""What a training run shows on the console: log lines and a live progress line."""

from __future__ import annotations


class Silent:
    """A console for ranks other than 0: prints nothing."""

    def print(self, *a, **k):
        pass


def log_line(row: dict, steps: int) -> str:
    line = (f"step {row['step']}/{steps}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  grad {row['grad_norm']:.3f}  "
            f"{row['tokens_per_s']:.0f} tok/s")
    if row.get("padding_fraction") is not None:
        line += f"  pad {100 * float(row['padding_fraction']):.1f}%"
    if row.get("router_aux_loss") is not None:  # a mixture-of-experts LM: balance of its experts
        line += (f"  aux {float(row['router_aux_loss']):.4f}  load {float(row['expert_load_max']):.2f}/"
                 f"{float(row['expert_load_min']):.2f}")
    if row.get("reward_accuracy") is not None:  # preference training (DPO)
        line += f"  acc {float(row['reward_accuracy']):.2f}  margin {float(row['reward_margin']):.4f}"
    if row.get("skipped_samples"):
        line += f"  skipped {row['skipped_samples']}"
    if "eval_loss" in row and "eval_ppl" in row:
        line += f"  eval loss {row['eval_loss']:.4f} (ppl {row['eval_ppl']:.2f})"
    elif "eval_loss" in row:
        line += f"  eval loss {row['eval_loss']:.4f}"
        if "eval_reward_accuracy" in row:
            line += f" (acc {float(row['eval_reward_accuracy']):.2f})"
    for key in row:  # output modalities: eval_<name>_loss and a discrete one's eval_<name>_acc
        name = key[5:-5]
        if key.startswith("eval_") and key.endswith("_loss") and f"eval_{name}_acc" in row and row[key] is not None:
            line += f"  {name} {float(row[key]):.4f} (acc {float(row[f'eval_{name}_acc']):.2f})"
    return line


def say(console, text: str) -> None:
    if console is not None:
        console.print(text, highlight=False)
    else:
        print(text, flush=True)


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, *a):
        pass


class _RichProgress:
    """step, loss, tokens/s and ETA on one live line (rich)."""

    def __init__(self, console, total: int, start: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._p = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
                           TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)
        self._task = self._p.add_task("train", total=total, completed=start, loss=float("nan"), tps=0.0)

    def __enter__(self):
        self._p.__enter__()
        return self

    def __exit__(self, *exc):
        return self._p.__exit__(*exc)

    def update(self, done: int, loss: float, tps: float) -> None:
        self._p.update(self._task, completed=done, loss=loss, tps=tps)


def progress_display(console, total: int, start: int):
    # a run resumed at its last step has nothing to show (the bar would read "loss nan 0 tok/s")
    if console is None or isinstance(console, Silent) or start >= total:
        return _NoProgress()
    return _RichProgress(console, total, start)
