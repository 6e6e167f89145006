"""The run directory: one run at a time, files complete or absent, no secrets in the record.

Everything that guards a run directory lives here:

* :func:`write_text_atomic` writes a file through a temporary file, ``fsync`` and
  ``os.replace``: a reader (or a SIGKILL) sees the old file or the new one, never a part.
* :class:`RunLock` / :func:`lock_run_dir`: ``mimo-spec.lock`` in the run directory names
  the process that writes there (pid, host). It is taken with ``fcntl.flock`` (the kernel
  drops it when the process dies, however it dies) and removed at release; a second run
  on the same directory is refused. A lock file left by a dead process of this host is
  taken over with a note; one naming a live process, or a process of another host that
  cannot be checked, is not. Under torchrun/SLURM only rank 0 locks: all ranks share the
  directory. ``O_CREAT|O_EXCL`` is the fallback where the filesystem has no ``flock``.
* The run record (``resolved_config.yaml``, ``overrides.yaml``, ``spec.yaml``,
  ``versions.json``) is written only by a run that starts: a training run writes it once
  it has passed every check (:func:`record_when_started` / :func:`run_started`), so a
  refused command never replaces the record of the run that lives there. eval and
  generate write theirs when done; validate and summary only into a directory that has
  no record yet; none of them ever replaces the record of a training run; print, list
  and layout write nothing.
* Two runs never share a directory's checkpoints (:func:`check_fresh_start`): a fresh
  start (``train.resume=none``) or another run's checkpoint in a directory that holds
  checkpoints is refused.
* What the record may say of the environment (secrets) is :mod:`mimo_spec.env_secrets`'s.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from mimo_spec.atomic import pid_alive, write_text_atomic
from mimo_spec.errors import ConfigError

__all__ = ["write_text_atomic"]  # re-exported: the run record and the job outputs are written with it
LOCK_NAME = "mimo-spec.lock"
RECORD_FILES = ("resolved_config.yaml", "overrides.yaml", "spec.yaml", "versions.json")


# --------------------------------------------------------------------------- atomic writes

def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files of ``path`` that processes which are gone left behind."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.tmp*"):
        pid = tmp.name[len(f".{path.name}.tmp"):]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the lock

class RunDirBusy(ConfigError):
    """Another process writes into this run directory."""


def _holder_text() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)[:500]}) + "\n"


def _parse_holder(text: str) -> dict[str, Any]:
    """pid and host from a lock file (ours is JSON; a bare ``pid`` or ``pid host`` is read too)."""
    text = text.strip()
    if not text:
        return {}
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            pid = data.get("pid")
            return {"pid": int(pid) if str(pid).lstrip("-").isdigit() else None, "host": data.get("host")}
        if isinstance(data, int):
            return {"pid": data, "host": None}
    except ValueError:
        pass
    words = text.replace(",", " ").replace("=", " ").split()
    pid = next((int(w) for w in words if w.isdigit()), None)
    host = next((words[i + 1] for i, w in enumerate(words[:-1]) if w.lower() == "host"), None)
    if host is None and len(words) >= 2 and words[0].isdigit():
        host = words[1]
    return {"pid": pid, "host": host}


def _describe(holder: dict[str, Any]) -> str:
    if holder.get("pid") is None:
        return "another process"
    return f"process {holder['pid']}" + (f" on host {holder['host']}" if holder.get("host") else "")


def _busy(run_dir: Path, lock: Path, holder: dict[str, Any], why: str = "") -> RunDirBusy:
    return RunDirBusy(f"the run directory {run_dir} is in use by {_describe(holder)}{why} (lock file {lock}); "
                      "two runs in one directory would mix their checkpoints and garble metrics.csv",
                      path="hydra.run.dir",
                      hint="wait for that run to end, or give this one its own directory (hydra.run.dir=<new dir>); "
                           f"if no such process is running any more, delete {lock}")


class RunLock:
    """The lock of one run directory, held by this process (see the module docstring)."""

    _held: dict[str, "RunLock"] = {}  # run dirs this process holds, so nested takers share one lock

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self._count = 0
        self.note: str | None = None

    # the lock is reentrant within a process: run() locks, and the training loop locks again
    @classmethod
    def acquire(cls, run_dir: Path) -> "RunLock":
        key = os.path.abspath(run_dir)
        lock = cls._held.get(key)
        if lock is None:
            lock = cls(Path(run_dir))
            lock._take()
            cls._held[key] = lock
        lock._count += 1
        return lock

    def release(self, everything: bool = False) -> None:
        """Give one hold back (``everything``: all of them, as the outermost holder does at its end,
        also when an inner holder was left unreleased by an error)."""
        if self._count <= 0:
            return
        self._count = 0 if everything else self._count - 1
        if self._count > 0:
            return
        key = os.path.abspath(self.run_dir)
        if RunLock._held.get(key) is self:
            RunLock._held.pop(key)
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):  # remove it while still holding it: no one opens a dead lock
                self.path.unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _take(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # no flock on this platform
            fcntl = None
        if fcntl is None:
            return self._take_exclusive()
        for _ in range(20):
            try:  # created here: then nobody else can hold it, whatever flock says
                fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, os.O_RDWR), False
                except FileNotFoundError:  # released just now
                    continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read_holder(fd, wait=True)
                os.close(fd)
                raise _busy(self.run_dir, self.path, holder) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                if created:  # a filesystem without flock: the O_EXCL creation is the lock
                    return self._own(fd)
                os.close(fd)
                return self._take_exclusive()
            if not _same_file(fd, self.path):  # the holder removed it while we waited: take the new one
                os.close(fd)
                continue
            holder = self._read_holder(fd)
            try:
                self._check_stale(holder)
            except RunDirBusy:
                os.close(fd)
                raise
            return self._own(fd)
        raise _busy(self.run_dir, self.path, {}, " (its lock file keeps changing)")

    def _own(self, fd: int) -> None:
        """Write this process's name into the lock file it now holds."""
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_text().encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def _check_stale(self, holder: dict[str, Any]) -> None:
        """A lock file nobody holds: take it over when its process is gone, else refuse."""
        pid, host = holder.get("pid"), holder.get("host")
        if pid is None or pid == os.getpid() and host in (None, socket.gethostname()):
            return
        if host not in (None, socket.gethostname()):
            raise _busy(self.run_dir, self.path, holder, " (a process of another host cannot be checked)")
        if pid_alive(pid):
            raise _busy(self.run_dir, self.path, holder)
        self.note = (f"note: took over the lock of {self.run_dir} from process {pid} "
                     f"{'on host ' + host + ' ' if host else ''}(that process is gone; it stopped without releasing it)")
        print(f"mimo-spec: {self.note}", file=sys.stderr)

    @staticmethod
    def _read_holder(fd: int, wait: bool = False) -> dict[str, Any]:
        for _ in range(10 if wait else 1):  # the holder may not have written its name yet
            holder = _parse_holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            if holder or not wait:
                return holder
            time.sleep(0.05)
        return {}

    def _take_exclusive(self) -> None:
        """The lock as a file created with O_CREAT|O_EXCL (filesystems without flock)."""
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    text = self.path.read_text()
                except FileNotFoundError:
                    continue
                holder = _parse_holder(text)
                if holder.get("pid") is None:  # being written right now
                    time.sleep(0.05)
                    holder = _parse_holder(self.path.read_text()) if self.path.exists() else {}
                    if holder.get("pid") is None:
                        raise _busy(self.run_dir, self.path, holder) from None
                self._check_stale(holder)  # refuses unless its process is gone
                aside = self.path.with_name(f".{LOCK_NAME}.stale{os.getpid()}")
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    continue
                if aside.read_text() != text:  # another process took it over first: give its lock back
                    try:
                        os.link(aside, self.path)
                    except OSError:
                        pass
                    aside.unlink(missing_ok=True)
                    raise _busy(self.run_dir, self.path, _parse_holder(self.path.read_text())) from None
                aside.unlink(missing_ok=True)
                continue
            return self._own(fd)
        raise _busy(self.run_dir, self.path, {}, " (its lock file keeps changing)")


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def is_main_process() -> bool:
    """Rank 0 of a torchrun/SLURM job, or a process on its own: the one that locks and writes the record."""
    from mimo_spec.parallel.env import read_env

    env = read_env()
    return env is None or env.rank == 0


def lock_run_dir(run_dir: Path) -> RunLock | None:
    """Take the run directory's lock (rank 0 only; other ranks get None). Release it when done."""
    if not is_main_process():
        return None
    check_not_inside_a_run(run_dir)
    return RunLock.acquire(run_dir)


def check_not_inside_a_run(run_dir: Path) -> None:
    """A run directory may not lie inside a checkpoint folder or another run's ``checkpoints/``:
    pruning old checkpoints there would delete the run, and resuming would read its files as ours."""
    from mimo_spec.train.checkpoint import PREFIX

    here = Path(os.path.abspath(run_dir))
    for folder in (here, *here.parents):
        is_checkpoint = folder.name.startswith(PREFIX) and (folder / "state.json").is_file()
        is_run_checkpoints = folder.name == "checkpoints" and (
            has_record(folder.parent) or (folder.parent / LOCK_NAME).exists() or (folder.parent / "metrics.csv").exists())
        if is_checkpoint or is_run_checkpoints:
            raise ConfigError(f"{here} lies inside {'checkpoint' if is_checkpoint else 'the checkpoints folder'} "
                              f"{folder} of another run: pruning or resuming that run would delete or read this "
                              "one's files", path="hydra.run.dir", hint="give this job a directory of its own")


@contextlib.contextmanager
def holding(run_dir: Path | None) -> Iterator[RunLock | None]:
    """The run directory's lock for the duration of a job (None: no directory, or not rank 0).

    The outermost holder releases it entirely at its end, errors included.
    """
    lock = lock_run_dir(run_dir) if run_dir is not None else None
    outermost = lock is not None and lock._count == 1
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release(everything=outermost)


# --------------------------------------------------------------------------- what a directory holds

def holds_training_run(run_dir: Path) -> bool:
    """True when a training run has written into ``run_dir`` (checkpoints or metrics)."""
    run_dir = Path(run_dir)
    ckpts = run_dir / "checkpoints"
    return (run_dir / "metrics.csv").exists() or (ckpts.is_dir() and any(ckpts.iterdir()))


def has_record(run_dir: Path) -> bool:
    return any((Path(run_dir) / name).exists() for name in RECORD_FILES)


def check_fresh_start(run_dir: Path, resume: Any, source: Path | None = None) -> None:
    """Refuse to start a run (``source`` None: from scratch; else from a checkpoint elsewhere)
    in a directory that already holds another run's checkpoints: the two would mix."""
    from mimo_spec.train.checkpoint import PREFIX

    ckpts = Path(run_dir) / "checkpoints"
    found = sorted(p.name for p in ckpts.iterdir() if p.name.startswith(PREFIX)) if ckpts.is_dir() else []
    if not found:
        return
    shown = ", ".join(found[-3:]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    what = (f"train.resume={resume} starts a new run" if source is None
            else f"train.resume={resume} continues the run of {source}")
    raise ConfigError(f"{what} in {run_dir}, which already holds checkpoints of another run ({shown}): "
                      "their checkpoints and metrics would mix, and a later eval could load the old model",
                      path="train.resume",
                      hint="give this run its own directory (hydra.run.dir=<new dir>), or continue the run "
                           "that is there with train.resume=auto")


# --------------------------------------------------------------------------- the run record

_pending: dict[str, Callable[[], None]] = {}


def record_when_started(run_dir: Path, write: Callable[[], None]) -> None:
    """Have :func:`run_started` call ``write`` once the job in ``run_dir`` has passed its checks."""
    _pending[os.path.abspath(run_dir)] = write


def forget_record(run_dir: Path) -> None:
    _pending.pop(os.path.abspath(run_dir), None)


def run_started(run_dir: Path) -> None:
    """The job in ``run_dir`` starts (every check passed): write the record it left pending, if any."""
    write = _pending.pop(os.path.abspath(run_dir), None)
    if write is not None:
        write()


# --------------------------------------------------------------------------- a run dir that is not a folder

def run_dir_error(e: BaseException) -> ConfigError | None:
    """Hydra could not create the run (or sweep) directory: a ConfigError naming the key, else None."""
    if not isinstance(e, OSError) or e.errno not in (errno.EEXIST, errno.ENOTDIR, errno.EACCES, errno.EROFS,
                                                    errno.ENOSPC, errno.EPERM, errno.EDQUOT, errno.ENAMETOOLONG,
                                                    errno.ELOOP, errno.ENOENT, errno.EINVAL):
        return None
    where = str(e.filename or "")
    key = _dir_key(where)
    if key is None:
        return None
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        blocker = next((p for p in [Path(where), *Path(where).parents] if p.exists() and not p.is_dir()), Path(where))
        return ConfigError(f"{where} cannot be the {key.split('.')[1]} directory: {blocker} is a file, not a directory",
                           path=key, hint=f"set {key} to a directory path (one that is absent or a folder)")
    if e.errno in (errno.ENAMETOOLONG, errno.ELOOP, errno.ENOENT, errno.EINVAL):  # the path itself cannot be a folder
        return ConfigError(f"cannot create the run directory {where}: {e.strerror or e}", path=key,
                           hint=f"set {key} to a folder path that can exist (shorter names, no symlink loop, on a "
                                "file system that takes folders)")
    from mimo_spec.errors import StorageError

    return StorageError(f"cannot create the run directory {where}: {e.strerror or e}", path=key,
                        hint=f"set {key} to a folder you can write to, or free disk space")


def _dir_key(where: str) -> str | None:
    """``hydra.run.dir`` or ``hydra.sweep.dir``, when ``where`` is the one Hydra was creating."""
    multirun = any(a in ("-m", "--multirun") for a in sys.argv[1:])
    fallback = ("hydra.sweep.dir" if multirun else "hydra.run.dir") if where else None
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():  # a sweep's launcher makes its folder before any job
            return fallback
        hc = HydraConfig.get()
        target = os.path.abspath(where)
        run_dir = os.path.abspath(str(hc.run.dir))
        sweep_dir = os.path.abspath(str(hc.sweep.dir))
    except Exception:
        return fallback
    if target == sweep_dir or target.startswith(sweep_dir + os.sep):
        return "hydra.sweep.dir"
    if target == run_dir or run_dir.startswith(target + os.sep) or target.startswith(run_dir + os.sep):
        return "hydra.run.dir"
    return None
