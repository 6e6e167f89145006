"""Hydra multirun sweeps: every job records its outcome, and the sweep ends with one table.

Each job of a sweep runs through :func:`run_sweep_job`, which never ends the process:
a config error or a crash is written into the job's ``metrics.json`` (``status`` and
``error``) so the launcher goes on with the other jobs. When the sweep ends, the
:class:`SweepSummary` callback (registered under ``hydra.callbacks`` in conf/config.yaml)
reads every job directory and writes ``sweep_summary.csv`` and ``sweep_summary.md``
into the sweep directory, sorted by ``sweep.objective`` / ``sweep.direction``. The
callback runs in the launching process, also with submitit, whose jobs run elsewhere,
because it only reads files the jobs wrote.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from hydra.experimental.callback import Callback

from mimo_spec.errors import ConfigError, MimoError, did_you_mean, format_error

OK_STATUSES = ("completed", "valid", "interrupted")
DIRECTIONS = ("minimize", "maximize")
# metrics shown in the table, in this order, when some job has them
METRIC_COLUMNS = ("final_loss", "eval_loss", "first_loss", "tokens_per_s", "parameters",
                  "trainable_parameters", "steps", "wall_time_s")
# the Markdown table keeps to these (the CSV has every metric)
MARKDOWN_METRICS = ("final_loss", "eval_loss", "tokens_per_s", "parameters", "wall_time_s")
# a sweep job refused in a directory that holds an earlier training run records its outcome here,
# leaving that run's metrics.json as it was; the summary reads it first
JOB_RECORD = "sweep_job.json"
EXIT_JOB_FAILED = 1
EXIT_CONFIG_ERROR = 2

# The last summary made in this process; main() turns it into the sweep's exit code.
_last_summary: dict[str, Any] | None = None
# The sweep under way in this process (its dir, objective, direction), for end_broken_sweep().
_running: dict[str, str] | None = None


def run_sweep_job(cfg, overrides: list[str], out_dir: Path, run: Callable[..., int]) -> float | None:
    """Run one job of a sweep and record how it ended; returns the objective (for Optuna).

    Nothing escapes: raising (or ``sys.exit``) here would stop the whole sweep. The job holds
    its directory's lock throughout; a job whose directory another process is using writes
    nothing there (its error goes to stderr). ``run``: the app's ``run(cfg, overrides, out_dir)``
    (passed in, so that this module does not import the app that imports it).
    """
    from mimo_spec.rundir import lock_run_dir

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = lock_run_dir(out_dir)
    except (MimoError, OSError) as e:
        from mimo_spec.errors import storage_error

        print(format_error(e if isinstance(e, MimoError) else storage_error(e)), file=sys.stderr)
        return None
    outermost = lock is not None and lock._count == 1
    try:
        return _run_locked_sweep_job(cfg, overrides, out_dir, run)
    finally:
        if lock is not None:
            lock.release(everything=outermost)


def _run_locked_sweep_job(cfg, overrides: list[str], out_dir: Path, run: Callable[..., int]) -> float | None:
    from mimo_spec.config import apply_module_swaps

    from mimo_spec.env_secrets import redact_env_values
    from mimo_spec.rundir import holds_training_run

    out_dir.mkdir(parents=True, exist_ok=True)
    # a job dir that holds a training run keeps its metrics.json unless this job trains there (resumes);
    # any other re-used job dir must not report old results
    earlier_run = holds_training_run(out_dir)
    if not earlier_run:
        (out_dir / "metrics.json").unlink(missing_ok=True)
    before = _signature(out_dir / "metrics.json")
    (out_dir / JOB_RECORD).unlink(missing_ok=True)
    action = str(cfg.get("action", "train"))
    start = time.perf_counter()
    record: dict[str, Any] = {}
    try:
        objective_and_direction(cfg)  # each job checks it: Hydra ignores errors raised in callbacks
        apply_module_swaps(cfg, overrides)
        code = run(cfg, overrides, out_dir)
        if code:
            record = {"status": "failed", "error": f"the {action} action ended with exit code {code}"}
    except MimoError as e:  # any mistake the user can fix (config, input, data, checkpoint, storage)
        record = {"status": "invalid", "error": redact_env_values(format_error(e), cfg)}
        print(record["error"], file=sys.stderr)
    except (Exception, SystemExit) as e:  # a crash in one job: report it, keep the sweep going
        text = redact_env_values(traceback.format_exc(), cfg)
        (out_dir / "error.log").write_text(text)
        record = {"status": "failed", "error": redact_env_values(f"{type(e).__name__}: {e}".strip(), cfg)}
        print(text, file=sys.stderr)
    rank = _process_rank()
    if rank:  # one job, several processes (srun): rank 0 keeps the record, the others only their errors
        if record:
            (out_dir / f"error.rank{rank}.log").write_text(str(record["error"]) + "\n")
        return None
    if earlier_run and record and _signature(out_dir / "metrics.json") == before:
        # refused before it started: the earlier run's results stay; this job's outcome goes beside them
        _write_json(out_dir / JOB_RECORD, {**record, "action": action, "wall_time_s": time.perf_counter() - start})
        return None
    metrics = _read_json(out_dir / "metrics.json") or {}
    if action == "eval" and not record:  # an eval job's numbers (eval_loss, ...): rankable like a run's
        metrics.update({k: v for k, v in (_read_json(out_dir / "eval.json") or {}).items()
                        if k.startswith("eval_") or k == "status"})
    metrics.update(record)
    metrics.setdefault("status", "valid" if action == "validate" else "completed")
    metrics["action"] = action
    metrics.setdefault("wall_time_s", time.perf_counter() - start)
    _write_json(out_dir / "metrics.json", metrics)
    value = metrics.get(str((cfg.get("sweep") or {}).get("objective") or "final_loss"))
    if metrics["status"] not in OK_STATUSES or not _is_number(value):
        return None  # Optuna marks the trial as failed
    return float(value)


def _process_rank() -> int:
    """This process's rank within its job (torchrun, SLURM's srun or submitit's local tasks); 0 alone."""
    from mimo_spec.parallel.env import read_env

    launched = read_env()  # torchrun / SLURM: the one reader of RANK and WORLD_SIZE
    if launched is not None:
        return launched.rank
    value = os.environ.get("SUBMITIT_LOCAL_GLOBALID", "")  # submitit's local tasks start no process group
    return int(value) if value.isdigit() else 0


class SweepSummary(Callback):
    """Writes the sweep's summary table when a multirun ends (see the module docstring)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        global _last_summary, _running
        _last_summary = None
        try:
            objective, direction = objective_and_direction(config)
        except ConfigError:  # every job reports it; sort somehow
            objective, direction = str(config.sweep.objective), "minimize"
        sweep_dir = str(config.hydra.sweep.dir)
        # the job folders an earlier sweep left in this sweep dir: left out of this one's summary unless re-run
        _running = {"dir": sweep_dir, "objective": objective, "direction": direction,
                    "earlier": job_markers(Path(sweep_dir))}

    def on_multirun_end(self, config, **kwargs) -> None:
        global _running
        if _running is not None:
            _summarize_running()
            _running = None


def _summarize_running() -> None:
    # Hydra turns a callback's exception into a warning, so a failure here must set the exit code itself.
    global _last_summary
    try:
        _last_summary = summarize(Path(_running["dir"]), _running["objective"], _running["direction"],
                                  earlier=_running.get("earlier"))
        print(_last_summary["text"])
    except Exception as e:
        _last_summary = {"failed": [{"status": "failed"}], "text": ""}
        print(f"mimo-spec: could not summarise the sweep: {type(e).__name__}: {e}", file=sys.stderr)


def end_broken_sweep(error: BaseException) -> int | None:
    """After a sweep stopped with ``error``: summarise what its jobs wrote; the exit code.

    None when no sweep was under way (then the error is not ours to explain).
    """
    global _running
    if _running is None:
        return None
    _summarize_running()
    _running = None
    print(f"mimo-spec: the sweep stopped early: {type(error).__name__}: {_first_line(error)}", file=sys.stderr)
    return sweep_exit_code() or EXIT_JOB_FAILED


def objective_and_direction(config) -> tuple[str, str]:
    sweep = config.get("sweep") or {}
    objective = str(sweep.get("objective") or "final_loss")
    direction = str(sweep.get("direction") or "minimize")
    if direction not in DIRECTIONS:
        raise ConfigError(f"unknown direction {direction!r}", path="sweep.direction",
                          hint=did_you_mean(direction, DIRECTIONS))
    return objective, direction


def forget_last_sweep() -> None:
    """A new command starts: an earlier sweep's outcome in this process (main() called again, as
    tests and notebooks do) must not set its exit code."""
    global _last_summary
    _last_summary = None


def sweep_exit_code() -> int:
    """0 when the last sweep of this process (if any) had no failed job; 2 if only configs were invalid."""
    if not _last_summary or not _last_summary["failed"]:
        return 0
    statuses = {row["status"] for row in _last_summary["failed"]}
    return EXIT_CONFIG_ERROR if statuses == {"invalid"} else EXIT_JOB_FAILED


def job_markers(sweep_dir: Path) -> dict[str, tuple[int, int]]:
    """Each job folder's ``.hydra/overrides.yaml`` under ``sweep_dir`` -> its (mtime_ns, size): Hydra rewrites
    it whenever a job runs there, so a folder whose marker is unchanged at the end was no job of this sweep."""
    out = {}
    for marker in sweep_dir.glob("**/.hydra/overrides.yaml") if sweep_dir.is_dir() else ():
        try:
            st = marker.stat()
        except OSError:
            continue
        out[str(marker)] = (st.st_mtime_ns, st.st_size)
    return out


def collect_jobs(sweep_dir: Path, earlier: dict[str, tuple[int, int]] | None = None) -> list[dict[str, Any]]:
    """One row per job directory (a folder with .hydra/overrides.yaml) under ``sweep_dir``; given ``earlier``
    (:func:`job_markers` when the sweep started), only the folders a job of this sweep ran in."""
    rows = []
    now = job_markers(sweep_dir) if earlier else {}
    for marker in sweep_dir.glob("**/.hydra/overrides.yaml"):
        job_dir = marker.parent.parent
        if ".submitit" in job_dir.parts:
            continue
        if earlier and earlier.get(str(marker)) is not None and earlier.get(str(marker)) == now.get(str(marker)):
            continue  # an earlier sweep's job that this one did not re-run
        metrics = _read_json(job_dir / JOB_RECORD) or _read_json(job_dir / "metrics.json")
        if metrics is None:  # killed before it could write anything (out of memory, time limit, ...)
            metrics = {"status": "failed", "error": "no metrics.json: the job did not finish (see its log)"}
        rows.append({"job": job_dir.relative_to(sweep_dir).as_posix(),
                     "overrides": _job_overrides(marker), **metrics})
    rows.sort(key=lambda r: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", r["job"])])
    return rows


def summarize(sweep_dir: Path, objective: str = "final_loss", direction: str = "minimize",
              earlier: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """Write sweep_summary.csv / .md into ``sweep_dir``; returns rows, failures, best and the text. ``earlier``:
    the job markers when the sweep started (folders of an earlier sweep it did not re-run are left out)."""
    rows = collect_jobs(sweep_dir, earlier)
    sign = 1.0 if direction == "minimize" else -1.0
    ok = [r for r in rows if r.get("status") in OK_STATUSES]
    failed = [r for r in rows if r.get("status") not in OK_STATUSES]
    ranked = sorted((r for r in ok if _is_number(r.get(objective))), key=lambda r: sign * float(r[objective]))
    unranked = [r for r in ok if r not in ranked]
    rows = ranked + unranked + failed
    swept = _varying_keys([r["overrides"] for r in rows])
    metric_cols = [c for c in (objective, *METRIC_COLUMNS) if any(c in r for r in rows)]
    metric_cols = list(dict.fromkeys(metric_cols))  # the objective first, once
    header = ["rank", "job", "status", *swept, *metric_cols, "overrides", "error"]
    table = []
    for i, r in enumerate(rows):
        values = _override_values(r["overrides"])
        table.append({"rank": str(i + 1) if r in ranked else "", "job": r["job"], "status": r.get("status", ""),
                      **{k: values.get(k, "") for k in swept},
                      **{c: _fmt(r.get(c)) for c in metric_cols},
                      "overrides": " ".join(r["overrides"]), "error": _first_line(r.get("error"))})
    with open(sweep_dir / "sweep_summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(table)
    md_cols = [c for c in header if c not in metric_cols or c == objective or c in MARKDOWN_METRICS]
    if swept:  # the swept columns already say what differs
        md_cols.remove("overrides")
    if not failed:
        md_cols.remove("error")
    md = _markdown(table, md_cols)
    counts = {status: sum(r.get("status") == status for r in failed) for status in ("invalid", "failed")}
    head = f"sweep {sweep_dir}: {len(rows)} jobs, {len(ok)} ok" + "".join(
        f", {n} {status}" for status, n in counts.items() if n or status == "failed")
    lines = [head + (f"; sorted by {objective} ({direction})" if ranked else ""), "", md]
    best = ranked[0] if ranked else None
    if best is not None:
        lines.append(f"best: job {best['job']} ({' '.join(best['overrides']) or 'no overrides'}) "
                     f"{objective}={_fmt(best[objective])}")
    elif any(r.get("action", "train") in ("train", "eval") for r in ok):
        known = sorted({k for r in ok for k, v in r.items() if _is_number(v)})
        lines.append(f"no job reported {objective!r} (sweep.objective); "
                     f"{did_you_mean(objective, known)}")
    if rows:
        lines.append(f"re-run a job: mimo-spec --config-dir {sweep_dir}/<job> --config-name resolved_config")
    for r in failed:
        lines.append(f"{r['status']}: job {r['job']} ({' '.join(r['overrides'])})\n"
                     + _indent(str(r.get("error") or "no error recorded")))
    text = "\n".join(lines)
    (sweep_dir / "sweep_summary.md").write_text(text + "\n")
    return {"rows": rows, "failed": failed, "best": best, "objective": objective, "text": text}


def _varying_keys(override_lists: list[list[str]]) -> list[str]:
    """Override keys whose value differs between jobs (the swept ones), in first-seen order."""
    seen: dict[str, set[str]] = {}
    for overrides in override_lists:
        for key, value in _override_values(overrides).items():
            seen.setdefault(key, set()).add(value)
    return [k for k, values in seen.items()
            if len(values) > 1 or any(k not in _override_values(o) for o in override_lists)]


def _override_values(overrides: list[str]) -> dict[str, str]:
    out = {}
    for o in overrides:
        key, sep, value = o.partition("=")
        if sep:
            out[key.lstrip("+~")] = value
    return out


def _markdown(table: list[dict[str, str]], columns: list[str]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    out = io.StringIO()
    out.write("| " + " | ".join(columns) + " |\n")
    out.write("|" + "|".join("---" for _ in columns) + "|\n")
    for row in table:
        out.write("| " + " | ".join(cell(row[c]) for c in columns) + " |\n")
    return out.getvalue().rstrip("\n")


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "nan"
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4g}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _first_line(text: Any) -> str:
    """A one-line error for the table: the first problem of a mimo-spec error (config, data, checkpoint,
    storage, input ...: its ``mimo-spec: <kind> error:`` header line says only the kind), or the exception."""
    lines = [ln.strip() for ln in str(text or "").splitlines() if ln.strip()]
    if len(lines) > 1 and re.fullmatch(r"mimo-spec: [\w ]+ errors?:?", lines[0]):
        lines = lines[1:]
    return lines[0] if lines else ""


def _indent(text: str) -> str:
    return "\n".join("    " + ln for ln in text.splitlines())


def _signature(path: Path) -> tuple[int, int] | None:
    """(modification time, size) of ``path``, None when absent: tells whether a job rewrote it."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _job_overrides(path: Path) -> list[str]:
    """A job's ``.hydra/overrides.yaml``, read with the limits every config file gets (a FIFO or an
    alias bomb planted in a sweep folder must not hang the summary)."""
    import yaml

    from mimo_spec.safe_yaml import read_yaml_file

    try:
        loaded = yaml.safe_load(read_yaml_file(path, top_mapping=False))  # a list of overrides
    except (MimoError, OSError, yaml.YAMLError):
        return [f"<unreadable {path.name}>"]
    return [str(o) for o in loaded] if isinstance(loaded, list) else [f"<unreadable {path.name}>"]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        if not path.is_file() or path.stat().st_size > (64 << 20):  # a FIFO, a device or a flood: unreadable
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from mimo_spec.atomic import write_json_atomic

    write_json_atomic(path, data)
