"""Start N ranks of a worker script the way torchrun does, without paying torch's import N + 1 times.

``torchrun`` starts a launcher and N fresh interpreters, each importing torch, transformers and mimo-spec
(about 5-8 s of CPU each on this project's 2-core machines: a 4-rank group spent a third of its minute
there). :func:`run_ranks` forks the ranks from one clean server process per test process (Python's
``forkserver``, preloading those imports once), gives each torchrun's environment (RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and runs the script as ``__main__`` with its
arguments. As torchrun does, a rank that fails ends the others, and the result carries every rank's output.

What runs in a rank is the same code as under torchrun: mimo-spec reads only that environment
(``mimo_spec.parallel.env.read_env``). The tests that are about torchrun itself (the CLI under torchrun,
its exit codes and error lines) still start the real one (``test_parallel_run.torchrun``).
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# imported once by the server the ranks are forked from
PRELOAD = ["torch", "torch.distributed", "mimo_spec.config", "mimo_spec.train.loop", "transformers"]
_LAUNCHER_ONLY = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "HYDRA_FULL_ERROR")

_context = None


def _ctx():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(script: str, args: list[str], env: dict[str, str], cwd: str | None, out: str, err: str) -> None:
    """One rank, in the forked process: torchrun's environment, output to files, the script as __main__."""
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    if cwd:
        os.chdir(cwd)
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).parent))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def run_ranks(nproc: int, script, *args, timeout: float = 300, cwd=None) -> subprocess.CompletedProcess:
    """Run ``script args...`` as ``nproc`` ranks of one process group (as ``torchrun --standalone
    --nproc-per-node=nproc script args...``); returns the exit code (the first failing rank's, else 0) and
    every rank's stdout and stderr, rank by rank. Raises subprocess.TimeoutExpired past ``timeout`` seconds
    (every rank is killed)."""
    ctx = _ctx()
    base = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ONLY}
    base["PYTHONPATH"] = os.pathsep.join([str(ROOT), base.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    port = _free_port()
    args = [str(a) for a in args]
    with tempfile.TemporaryDirectory(prefix="ranks-") as tmp:
        procs, files = [], []
        for r in range(nproc):
            env = dict(base, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                       GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            out, err = os.path.join(tmp, f"{r}.out"), os.path.join(tmp, f"{r}.err")
            p = ctx.Process(target=_rank, args=(str(script), args, env, None if cwd is None else str(cwd), out, err))
            p.start()
            procs.append(p)
            files.append((out, err))
        code, deadline, timed_out = 0, time.monotonic() + timeout, False
        try:
            while any(p.is_alive() for p in procs):
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if failed:  # as torchrun: one rank's failure ends the group
                    code = failed[0]
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join()
        if not code:
            code = next((p.exitcode for p in procs if p.exitcode), 0)
        stdout = "".join(Path(o).read_text(errors="replace") for o, _ in files)
        stderr = "".join(Path(e).read_text(errors="replace") for _, e in files)
    cmd = ["run_ranks", str(nproc), str(script), *args]
    if timed_out:
        raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr)
    return subprocess.CompletedProcess(cmd, code, stdout, stderr)


def _script(script: str, args: list[str], env: dict[str, str], cwd: str | None, out: str, err: str) -> None:
    """One script run in a forked process, then the interpreter's exit functions, as a fresh ``python``
    would run them at exit (a forked process otherwise leaves them out)."""
    import atexit

    # what a fresh interpreter puts on sys.path from PYTHONPATH (the server started with another environment)
    for entry in reversed([e for e in env.get("PYTHONPATH", "").split(os.pathsep) if e]):
        sys.path.insert(0, os.path.abspath(os.path.join(cwd or ".", entry)))
    try:
        _rank(script, args, env, cwd, out, err)
    finally:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()


def run_script(script, args, *, env: dict[str, str], cwd, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python script args...`` in ``cwd`` with exactly ``env`` as its environment, forked from the same
    preloaded server as :func:`run_ranks` (no import of torch and transformers per run); returns its exit code
    (a ``sys.exit`` code, 1 for an uncaught exception, whose traceback is on stderr) and its output.
    Raises subprocess.TimeoutExpired past ``timeout`` seconds (the process is killed)."""
    ctx = _ctx()
    args = [str(a) for a in args]
    cmd = [sys.executable, str(script), *args]
    with tempfile.TemporaryDirectory(prefix="script-") as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        p = ctx.Process(target=_script, args=(str(script), args, dict(env), str(cwd), out, err))
        p.start()
        p.join(timeout)
        timed_out = p.is_alive()
        if timed_out:
            p.kill()
            p.join()
        stdout, stderr = (Path(f).read_text(errors="replace") if os.path.exists(f) else "" for f in (out, err))
    if timed_out:
        raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr)
    return subprocess.CompletedProcess(cmd, p.exitcode, stdout, stderr)
