"""The errors a user can act on, each with its kind.

:class:`MimoError` is the base of every error the CLI prints as a readable block (exit 2) instead of
a traceback; its ``kind`` names it on the first line (``mimo-spec: <kind> error``):

* :class:`ConfigError` (``config``): a mistake in a config or an argument; ``ParamError`` is a
  component refusing one of its own parameters.
* :class:`InputError` (``input``): a runtime input (a batch, a prompt, a file) that does not match
  the model; :class:`DataError` (``data``) and :class:`CheckpointError` (``checkpoint``) are kinds of it.
* :class:`StorageError` (``storage``): the disk or folder refused a write.

Runtime faults are not config errors: ``except ConfigError`` catches config mistakes only; catch
:class:`MimoError` for "anything the user can fix".
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Problem:
    """One thing wrong: where (a config path or an input name), what, and how to fix it."""

    path: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        line = f"{self.path}: {self.message}" if self.path else self.message
        if self.hint:
            line += f" ({self.hint})"
        return line


class MimoError(ValueError):
    """Every problem found, reported together; each names where (a config path, a file, an argument),
    what was expected and what was given. Subclasses set ``kind``."""

    kind = "config"

    def __init__(self, problems: Iterable[Problem] | Problem | str, *, path: str = "", hint: str = ""):
        if isinstance(problems, str):
            problems = [Problem(path, problems, hint)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        super().__init__(self.render())

    def render(self) -> str:
        if len(self.problems) == 1:
            return str(self.problems[0])
        head = f"{len(self.problems)} problems in the config:"
        return "\n".join([head] + [f"  - {p}" for p in self.problems])


class ConfigError(MimoError):
    """All problems found in a config, reported together.

    Each problem names the full config path, what was expected and what was given.
    """

    kind = "config"


class InputError(MimoError):
    """A runtime input (a batch, a data file, a checkpoint) does not match the model."""

    kind = "input"


class DataError(InputError):
    """A data file or sample cannot be used: unreadable media, a malformed record, an impossible size."""

    kind = "data"


class CheckpointError(InputError):
    """A checkpoint or weight file cannot be read or written: damaged, foreign, unsafe, or no space left."""

    kind = "checkpoint"


class StorageError(MimoError):
    """The run's files cannot be written: the disk is full, the folder is read-only or not a folder."""

    kind = "storage"


class ParamError(ConfigError):
    """A component refusing one of its own constructor parameters, by name.

    The only way a component's constructor reports a user mistake: the builder places it at
    ``<node path>.params.<param>``. Anything else a constructor raises is a bug and keeps its traceback.
    """

    def __init__(self, param: str, message: str, hint: str = ""):
        self.param = param
        super().__init__(message, path=param, hint=hint)


# errno values that mean "the disk or folder refused the write", not a bug in mimo-spec
STORAGE_ERRNOS = frozenset({28, 30, 122, 13, 1, 20, 21, 27})  # ENOSPC EROFS EDQUOT EACCES EPERM ENOTDIR EISDIR EFBIG


def storage_error(e: OSError, doing: str = "write") -> StorageError:
    """An OSError from writing the run's files, as a StorageError naming the file."""
    where = e.filename or ""
    return StorageError(f"cannot {doing} {where}: {e.strerror or e}".replace("  ", " "), path=str(where or "run directory"),
                        hint="free disk space or make the run directory writable, then resume with train.resume=auto")


def error_kind(err: MimoError) -> str:
    """``config``, ``input``, ``data``, ``checkpoint`` or ``storage``: what the CLI's first line calls the error."""
    return getattr(err, "kind", "config")


def format_error(err: MimoError) -> str:
    """The block the CLI prints for a user's mistake; its first line names the kind
    (``config``, ``input``, ``data``, ``checkpoint`` or ``storage`` error)."""
    lines = [f"mimo-spec: {error_kind(err)} error" + ("s:" if len(err.problems) > 1 else ":")]
    for p in err.problems:
        lines.append(f"  {p.path}: {p.message}" if p.path else f"  {p.message}")
        if p.hint:
            lines.append(f"      hint: {p.hint}")
    return "\n".join(lines)


def join_path(path: str, key: str) -> str:
    """``path.key``, or just ``key`` at the root."""
    return f"{path}.{key}" if path else key


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The closest spelling of ``name`` among ``choices``, or None."""
    matches = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A hint naming the closest choice, or listing the available ones."""
    choices = sorted(choices)
    best = closest(name, choices)
    if best is not None:
        return f"did you mean {best}?"
    if not choices:
        return "nothing is available"
    shown = ", ".join(choices[:_LISTED]) + (f" ... ({len(choices)} in all)" if len(choices) > _LISTED else "")
    return f"available: {shown}"


_LISTED = 40  # choices a hint names before eliding the rest (every preset and model of a config group fits)


class ProblemCollector:
    """Collects problems over a whole tree so they can be raised at once."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, path: str, message: str, hint: str = "") -> None:
        if any(p.path == path and p.message == message for p in self.problems):
            return  # the same problem found twice (e.g. one default setting checked for every module)
        self.problems.append(Problem(path, message, hint))

    def extend(self, err: MimoError) -> None:
        self.problems.extend(err.problems)

    def raise_if_any(self, cls: type[MimoError] = ConfigError) -> None:
        if self.problems:
            raise cls(self.problems)

    def __bool__(self) -> bool:
        return bool(self.problems)
