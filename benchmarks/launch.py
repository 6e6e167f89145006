"""Launching a parallel benchmark's layouts: each layout runs the benchmark script itself (``--layout NAME``)
in one process or under torchrun, and reports one JSON line; stdlib only, so the launcher stays light."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def forwarded(args, skip: tuple[str, ...] = ("layouts", "layout", "nproc")) -> list[str]:
    """The benchmark's own options as flags for a layout's run (``--name=value``), less the launcher's."""
    return [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in skip]


def launch_layouts(script: str, layouts: str, nproc: int, threads: int, flags: list[str]) -> list[dict]:
    """Run ``script --layout NAME flags`` for each comma-separated entry of ``layouts`` (``name`` or
    ``name:procs``): ``single`` in one process, any other under torchrun with ``procs`` (default ``nproc``)
    processes of ``threads`` OpenMP threads each. Returns each run's JSON result line with ``procs`` added;
    a run that prints none is reported with its stderr's tail and left out."""
    rows = []
    for entry in layouts.split(","):
        layout, _, procs = entry.partition(":")
        n = 1 if layout == "single" else int(procs or nproc)
        cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
                                  if n > 1 else []) + [script, "--layout", layout, *flags]
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in r.stdout.splitlines() if x.startswith("{")), None)
        if line is None:
            print(f"{layout}: failed\n{r.stderr[-3000:]}")
            continue
        rows.append(json.loads(line) | {"procs": n})
    return rows
