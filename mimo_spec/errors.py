"""One error type for every mistake a user can make in a config or an input."""

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


class ConfigError(ValueError):
    """All problems found in a config (or an input), reported together.

    Each problem names the full config path, what was expected and what was given.
    """

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


class InputError(ConfigError):
    """A runtime input (a batch, a data file, a checkpoint) does not match the model."""

    kind = "input"


class DataError(InputError):
    """A data file or sample cannot be used: unreadable media, a malformed record, an impossible size."""

    kind = "data"


class CheckpointError(InputError):
    """A checkpoint or weight file cannot be read or written: damaged, foreign, unsafe, or no space left."""

    kind = "checkpoint"


class StorageError(InputError):
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


def error_kind(err: ConfigError) -> str:
    """``config``, ``input``, ``data`` or ``checkpoint``: what the CLI's first line calls the error."""
    return getattr(err, "kind", "config")


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
    shown = ", ".join(choices[:20]) + (" ..." if len(choices) > 20 else "")
    return f"available: {shown}"


class ProblemCollector:
    """Collects problems over a whole tree so they can be raised at once."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, path: str, message: str, hint: str = "") -> None:
        self.problems.append(Problem(path, message, hint))

    def extend(self, err: ConfigError) -> None:
        self.problems.extend(err.problems)

    def raise_if_any(self, cls: type[ConfigError] = ConfigError) -> None:
        if self.problems:
            raise cls(self.problems)

    def __bool__(self) -> bool:
        return bool(self.problems)
