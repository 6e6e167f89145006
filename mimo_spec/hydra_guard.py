"""Check what Hydra would instantiate, and every YAML file it reads, before it acts on them.

Hydra creates objects from the composed config before our task runs: the
``hydra.callbacks.*`` (``_target_``), the launcher and the sweeper (and every
``_target_`` nested in them), the Optuna sampler and ``custom_search_space``, and
the handlers, formatters and filters of ``hydra.job_logging`` /
``hydra.hydra_logging`` (``class`` and ``()`` keys, ``ext://`` objects). Hydra's
own blocklist stops ``os.system`` but not ``numpy.save``, ``site.addsitedir`` or
``torch.load``, so :func:`check_hydra_config` allows only

- the shipped targets of each slot (:data:`SHIPPED`), or
- classes of the slot's kind (a Callback, a logging.Handler, ...) under the
  config's ``allow_imports``, except the always-denied system callables
  (:func:`mimo_spec.registry._is_denied`);

log files stay inside the run directory (or relative, ending in ``.log``),
``ext://`` may only name ``sys.stdout``/``sys.stderr``, the ``.`` (set attributes)
key is refused, and ``hydra.job.env_set`` may not set variables that make later
processes load other code (``LD_PRELOAD``, ``PYTHONPATH``, ``PATH`` ...), and
``hydra.searchpath`` may not name a ``pkg://`` package that is not imported yet
(Hydra imports it to list its files). Anything else is a ConfigError naming the key.

:func:`guarded` installs the hooks (once) and switches them on for its duration:
``ConfigLoaderImpl.load_configuration`` checks every composed config (the run,
the mode probe, each job of a sweep, ``hydra.compose``) before Hydra builds its
callbacks, configures logging or creates the launcher and sweeper; the file and
package config sources check each YAML file with :mod:`mimo_spec.safe_yaml` and
blame a parse error on that file, and refuse a ``# @package`` line below the header, where Hydra
would silently ignore it (:func:`check_package_header`). Outside :func:`guarded` Hydra is untouched.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import re
import sys
from typing import Any, Iterator

from mimo_spec.errors import ConfigError, Problem, ProblemCollector

_SUBMITIT = "hydra_plugins.hydra_submitit_launcher.submitit_launcher."
_OPTUNA_SAMPLERS = ("GridSampler", "TPESampler", "RandomSampler", "CmaEsSampler", "NSGAIISampler", "MOTPESampler")
_FILE_HANDLERS = ("logging.FileHandler", "logging.handlers.RotatingFileHandler",
                  "logging.handlers.TimedRotatingFileHandler", "logging.handlers.WatchedFileHandler")

# slot -> (what it is, the targets shipped for it, dotted name of the base class allowlisted ones must subclass)
SLOTS: dict[str, tuple[str, frozenset[str], str | None]] = {
    "callback": ("Hydra callback", frozenset({"mimo_spec.sweep.SweepSummary"}), "hydra.experimental.callback.Callback"),
    "launcher": ("Hydra launcher", frozenset({
        "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
        _SUBMITIT + "LocalLauncher", _SUBMITIT + "SlurmLauncher"}), "hydra.plugins.launcher.Launcher"),
    "sweeper": ("Hydra sweeper", frozenset({
        "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
        "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"}), "hydra.plugins.sweeper.Sweeper"),
    "sampler": ("Optuna sampler", frozenset(f"optuna.samplers.{s}" for s in _OPTUNA_SAMPLERS),
                "optuna.samplers.BaseSampler"),
    "search_space": ("Optuna custom_search_space function", frozenset(), None),
    "handler": ("logging handler", frozenset(_FILE_HANDLERS + (
        "logging.StreamHandler", "logging.NullHandler", "logging.handlers.MemoryHandler")), "logging.Handler"),
    "formatter": ("logging formatter", frozenset({"logging.Formatter", "colorlog.ColoredFormatter"}),
                  "logging.Formatter"),
    "filter": ("logging filter", frozenset({"logging.Filter"}), "logging.Filter"),
    "other": ("object", frozenset(), "builtins.object"),
}
SHIPPED = {slot: names for slot, (_, names, _) in SLOTS.items()}

EXT_OBJECTS = frozenset({"ext://sys.stdout", "ext://sys.stderr"})
# a log file's name: the run's output dir (or a relative path), then a name ending in .log
_LOG_DIR_PREFIXES = ("${hydra.runtime.output_dir}/", "${hydra:runtime.output_dir}/")
_LOG_NAME_PARTS = re.compile(r"\$\{hydra[.:]job\.(?:name|num|id)\}")
_LOG_NAME = re.compile(r"[\w.\-]+(?:/[\w.\-]+)*\.log")


# hydra.job.env_set may set only these (an allowlist: a compiler, a temp folder, a plugin path or a
# library path set from a config would run someone else's code)
_ENV_ALLOWED = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "CUDA_LAUNCH_BLOCKING", "PYTORCH_CUDA_ALLOC_CONF",
                "TORCH_DISTRIBUTED_DEBUG", "TORCH_CPP_LOG_LEVEL", "TORCH_SHOW_CPP_STACKTRACES",
                "TOKENIZERS_PARALLELISM", "GLOO_SOCKET_IFNAME", "HYDRA_FULL_ERROR", "MASTER_ADDR", "MASTER_PORT")
_ENV_ALLOWED_PREFIXES = ("OMP_", "MKL_", "OPENBLAS_", "NCCL_", "TORCH_NCCL_", "MIMO_")
_ENV_UNSAFE_PARTS = ("PLUGIN", "PATH", "LIB", "DIR", "FILE", "PRELOAD", "SOCKET_PATH", "CONFIG")


def _env_allowed(name: str) -> bool:
    if name in _ENV_ALLOWED:
        return True
    return name.startswith(_ENV_ALLOWED_PREFIXES) and not any(part in name for part in _ENV_UNSAFE_PARTS)


# launcher options submitit runs as shell lines (before srun, or as srun's arguments in the sbatch script)
_SHELL_LINES = ("setup", "srun_args")


def override_keys(overrides) -> list[str]:
    """The dotted keys (or group names) command-line overrides set, in order (``+`` / ``++`` / ``~`` dropped)."""
    keys = []
    for text in overrides or ():
        key = str(text).split("=", 1)[0].lstrip("+~").strip()
        if key and key not in keys:
            keys.append(key)
    return keys


def _check_launcher_shell(launcher: dict, overrides, problems: ProblemCollector) -> None:
    """Shell lines the launcher runs (``setup``, ``srun_args``) only from the command line, where the person
    starting the run typed them: a config file (a shared preset, a search-path folder) may not run commands.
    A line break in any launcher string is refused (it would start a shell line in the sbatch script), and an
    ``additional_parameters`` key must be an option name (its value is shell-quoted by submitit)."""
    given = set(override_keys(overrides))

    def strings(node, keys):
        if isinstance(node, str):
            yield keys, node
        elif isinstance(node, dict):
            for k, v in node.items():
                yield from strings(v, [*keys, str(k)])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from strings(v, [*keys, str(i)])

    for keys, text in strings(launcher, ["hydra", "launcher"]):
        if "\n" in text or "\r" in text:
            problems.add(".".join(keys), "a line break in a launcher option would start a shell line in the job "
                         "script", "give the value on one line")
    for name in _SHELL_LINES:
        value = launcher.get(name)
        if value in (None, "", [], {}) or f"hydra.launcher.{name}" in given:
            continue
        problems.add(f"hydra.launcher.{name}", f"{value!r}: shell lines the launcher runs may be given only on the "
                     "command line, not by a config file (a config must not run commands)",
                     f"pass it when you start the sweep: 'hydra.launcher.{name}=[...]', or set it up in your shell")
    extra = launcher.get("additional_parameters")
    if isinstance(extra, dict):  # values are shell-quoted on #SBATCH lines; an option's name is not
        for k in extra:
            if not re.fullmatch(r"[\w\-]+", str(k)):
                problems.add(f"hydra.launcher.additional_parameters.{k}", f"{k!r} is not an sbatch option name "
                             "(letters, digits, _ and -)", "name the option as sbatch spells it, e.g. mail-type")


def check_hydra_config(cfg, overrides=None) -> None:
    """ConfigError (naming each key) for anything Hydra would instantiate that is not allowed. ``overrides``:
    the command line's overrides (what the user typed may set the launcher's shell lines)."""
    from omegaconf import OmegaConf

    from mimo_spec.safe_yaml import check_expansion

    check_expansion(OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False))  # before any ${...} resolves
    problems = ProblemCollector()
    allow = _allow_imports(cfg)
    data = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    hydra = data.get("hydra") if isinstance(data, dict) else None
    if isinstance(hydra, dict):  # what Hydra builds objects from is checked as Hydra will read it
        for section in INSTANTIATED:
            if section in hydra:
                hydra[section] = _expand(cfg, hydra[section], ["hydra", section], problems)
    _walk(cfg, data, [], allow, problems)
    if isinstance(hydra, dict):
        for section in ("job_logging", "hydra_logging"):
            if isinstance(hydra.get(section), dict):
                _check_logging(cfg, hydra[section], ["hydra", section], allow, problems)
        launcher = hydra.get("launcher")
        if isinstance(launcher, dict):
            _check_launcher_shell(launcher, overrides, problems)
        sweeper = hydra.get("sweeper")
        if isinstance(sweeper, dict) and sweeper.get("custom_search_space") is not None:
            _check_target(cfg, ["hydra", "sweeper", "custom_search_space"], sweeper["custom_search_space"],
                          "search_space", allow, problems)
        job = hydra.get("job")
        env = job.get("env_set") if isinstance(job, dict) else None
        for name in env if isinstance(env, dict) else ():
            if not _env_allowed(str(name)):
                problems.add(f"hydra.job.env_set.{name}", f"a config may not set {name}: only thread, device and "
                             "collective-communication settings may be set from a config (others can change "
                             "which code the run and the processes it starts load)",
                             f"set it in your shell if you mean it; allowed: {', '.join(_ENV_ALLOWED)} and "
                             f"{', '.join(p + '*' for p in _ENV_ALLOWED_PREFIXES)}")
    problems.raise_if_any()


# the sections of ``hydra`` that Hydra creates objects from
INSTANTIATED = ("callbacks", "launcher", "sweeper", "job_logging", "hydra_logging")
_WHOLE_INTERPOLATION = re.compile(r"^\$\{.*\}$", re.S)


def _expand(cfg, node: Any, keys: list, problems: ProblemCollector) -> Any:
    """``node`` with every value that is one whole interpolation (``${evil}``, ``${oc.create:{...}}``,
    ``${oc.decode:...}``) replaced by what it resolves to, so a ``_target_`` or a logging factory that
    only an interpolation produces is checked too. One that cannot be resolved before the run starts
    could become anything then: refused."""
    from omegaconf import OmegaConf

    if isinstance(node, dict):
        return {k: _expand(cfg, v, keys + [k], problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(cfg, v, keys + [i], problems) for i, v in enumerate(node)]
    if not (isinstance(node, str) and _WHOLE_INTERPOLATION.match(node.strip())) or keys[-1] in ("_target_", "()",
                                                                                              "class"):
        return node  # a target's own interpolation is resolved (or refused) where the target is checked
    try:
        value = _resolve(cfg, keys, node)
    except Exception:  # noqa: BLE001 - whatever stops it resolving now, it cannot be checked now
        problems.add(_path(keys), f"{node!r} cannot be resolved before the run starts, so what Hydra would "
                     "build from it cannot be checked", "write the value out")
        return None
    if OmegaConf.is_config(value):
        try:
            value = OmegaConf.to_container(value, resolve=True)
        except Exception as e:  # noqa: BLE001
            problems.add(_path(keys), f"{node!r} cannot be resolved: {str(e).splitlines()[0]}", "write the value out")
            return None
    return value


def _walk(cfg, node: Any, keys: list, allow: list[str], problems: ProblemCollector) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "_target_":
                _check_target(cfg, keys + [k], v, _slot(keys), allow, problems)
            else:
                _walk(cfg, v, keys + [k], allow, problems)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _walk(cfg, v, keys + [i], allow, problems)


def _slot(keys: list) -> str:
    path = [str(k) for k in keys]
    if len(path) == 3 and path[:2] == ["hydra", "callbacks"]:
        return "callback"
    return {("hydra", "launcher"): "launcher", ("hydra", "sweeper"): "sweeper",
            ("hydra", "sweeper", "sampler"): "sampler"}.get(tuple(path), "other")


def _check_logging(cfg, conf: dict, keys: list, allow: list[str], problems: ProblemCollector) -> None:
    """A logging.config dict: factories, classes, attribute setting, ext:// objects and log file names."""
    for section, slot in (("handlers", "handler"), ("formatters", "formatter"), ("filters", "filter")):
        entries = conf.get(section)
        for name, entry in entries.items() if isinstance(entries, dict) else ():
            if not isinstance(entry, dict):
                continue
            where = keys + [section, name]
            for key in ("()", "class"):
                if key in entry:
                    _check_target(cfg, where + [key], entry[key], slot, allow, problems)
            if "." in entry:
                problems.add(_path(where + ["."]), "setting attributes of a logging object ('.') is not allowed",
                             "pass them as arguments instead")
            if slot == "handler":  # whatever the class: a handler's file stays in the run directory
                for key in ("filename", "file"):
                    if key in entry and not _log_file_ok(entry[key]):
                        problems.add(_path(where + [key]), f"log file {entry[key]!r} is outside the run directory",
                                     "write logs to ${hydra.runtime.output_dir}/<name>.log, or a relative "
                                     "<name>.log")
    for where, factory in _nested_factories(conf, keys, depth=0):  # '()' below the top-level entries
        _check_target(cfg, where, factory, "other", allow, problems)
    for where, value in _strings(conf, keys):
        if "${" in value:  # logging reads the resolved value (and turns any "<scheme>://..." into an object)
            try:
                value = _resolve(cfg, where, value)
            except Exception:  # noqa: BLE001 - it may resolve otherwise later: refuse what cannot be checked
                if where[-1] not in ("filename", "file"):  # log files have their own, stricter rule
                    problems.add(_path(where), f"{value!r} cannot be resolved before the run starts, so it "
                                 "cannot be checked", "write the value out")
                continue
        if isinstance(value, str) and value.startswith("ext://") and value not in EXT_OBJECTS:
            problems.add(_path(where), f"{value!r}: logging may only use ext://sys.stdout or ext://sys.stderr",
                         "ext:// imports and hands over any Python object")


def _nested_factories(node: Any, keys: list, depth: int) -> Iterator[tuple[list, Any]]:
    """``()`` keys deeper than ``<section>.<name>`` (logging builds some nested objects too, e.g. a queue)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "()" and depth > 2:
                yield keys + [k], v
            elif k != "()":
                yield from _nested_factories(v, keys + [k], depth + 1)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _nested_factories(v, keys + [i], depth + 1)


def _log_file_ok(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    rest = next((value[len(p):] for p in _LOG_DIR_PREFIXES if value.startswith(p)), value)
    rest = _LOG_NAME_PARTS.sub("x", rest)
    return bool(_LOG_NAME.fullmatch(rest)) and ".." not in rest.split("/")


def _strings(node: Any, keys: list) -> Iterator[tuple[list, str]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, keys + [k])
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, keys + [i])
    elif isinstance(node, str):
        yield keys, node


def _path(keys: list) -> str:
    out = ""
    for k in keys:
        if isinstance(k, int) or k == ".":
            out += f"[{k!r}]"
        else:
            out += f".{k}" if out else str(k)
    return out


def _check_target(cfg, keys: list, value: Any, slot: str, allow: list[str], problems: ProblemCollector) -> None:
    what, shipped, base = SLOTS[slot]
    where = _path(keys)
    if isinstance(value, str) and "${" in value:
        try:
            value = _resolve(cfg, keys, value)
        except Exception as e:  # noqa: BLE001 - any failure to resolve is the config's
            problems.add(where, f"cannot resolve {value!r}: {str(e).splitlines()[0]}", "write the dotted path out")
            return
    if value == "???":  # mandatory and unset: Hydra reports it itself, and instantiates nothing
        return
    if not isinstance(value, str) or not value:
        problems.add(where, f"expected a dotted path (a string), got {value!r}", "e.g. mypkg.callbacks.MyCallback")
        return
    if value in shipped:
        return
    from mimo_spec.registry import _is_denied

    shown = ", ".join(sorted(shipped))
    kind = f"a {base.rsplit('.', 1)[-1]} class" if base and slot != "other" else ("a class" if base else "a function")
    if not any(value == p or value.startswith(p if p.endswith(".") else p + ".") for p in allow):
        allowed = f"the shipped {what}s ({shown}) or {kind}" if shipped else kind
        problems.add(where, f"{value!r} is not allowed: Hydra would create it before the run starts; only {allowed} "
                     "under allow_imports may be named here",
                     f"remove it, or add its package to allow_imports if it is {kind} you trust")
        return
    if _is_denied(value):
        problems.add(where, f"refusing {value!r}: system callables are never allowed, whatever allow_imports says",
                     f"name {kind}")
        return
    try:
        obj = _locate(value)
    except ImportError as e:
        problems.add(where, f"cannot import {value!r}: {e}", "check the dotted path")
        return
    if base is None:
        ok = callable(obj) and not isinstance(obj, type)
    else:
        ok = isinstance(obj, type) and issubclass(obj, _locate(base))
    if not ok:
        problems.add(where, f"{value!r} is not {kind}", f"a {what} here must be {kind}")


def _resolve(cfg, keys: list, raw: str) -> Any:
    """The value at ``keys`` with its interpolations resolved, as Hydra will see it."""
    if "${hydra:" in raw:  # reads the job's HydraConfig, set only when the job starts (or stale, in-process)
        raise LookupError(f"{raw} is known only once the job starts")
    return functools.reduce(lambda node, k: node[k], keys, cfg)


def _locate(path: str) -> Any:
    """Import ``pkg.mod.Attr.attr``: the longest importable module, then attributes."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as e:
            if e.name and not ".".join(parts[:i]).startswith(e.name):
                raise ImportError(str(e)) from None
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                raise ImportError(f"{'.'.join(parts[:i])} has no attribute {attr!r}")
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no module named {parts[0]!r}")


def _allow_imports(cfg) -> list[str]:
    try:
        allow = cfg.get("allow_imports") or []
        allow = [allow] if isinstance(allow, str) else list(allow)
    except Exception:  # noqa: BLE001 - an unresolvable allow_imports allows nothing; its own check reports it
        return []
    return [a for a in allow if isinstance(a, str) and a]


# --- hooks into Hydra -----------------------------------------------------------------------------
_state = {"installed": False, "active": 0}


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """Within this block, Hydra checks every config it composes and every YAML file it reads."""
    install()
    _state["active"] += 1
    try:
        yield
    finally:
        _state["active"] -= 1


def _no_hydra_subdir_for_single_runs(cfg) -> None:
    """A single run keeps its record in mimo-spec's own files, written only once the run starts
    (mimo_spec.rundir); Hydra's ``.hydra/`` copy would be rewritten by every command pointed at the
    run directory, a refused one included. Sweeps keep it: their summary reads each job's
    ``.hydra/overrides.yaml``, and every job has a directory of its own."""
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    hydra = cfg.get("hydra")
    if hydra is None or hydra.get("mode") == RunMode.MULTIRUN or hydra.get("output_subdir") != ".hydra":
        return
    with read_write(hydra), open_dict(hydra):
        hydra.output_subdir = None


def install() -> None:
    """Wrap Hydra's config loader and config sources (once; they act only inside :func:`guarded`).

    The sources are wrapped per instance, when a config repository creates them: Hydra's plugin
    scan re-executes its core plugin modules, so their classes are not the ones an import sees.
    """
    if _state["installed"]:
        return
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.config_repository import ConfigRepository

    load_configuration = ConfigLoaderImpl.load_configuration

    @functools.wraps(load_configuration)
    def checked_load_configuration(self, *args, **kwargs):
        cfg = load_configuration(self, *args, **kwargs)
        if _state["active"]:
            overrides = kwargs.get("overrides", args[1] if len(args) > 1 else None)
            check_hydra_config(cfg, overrides)
            _no_hydra_subdir_for_single_runs(cfg)
        return cfg

    initialize_sources = ConfigRepository.initialize_sources

    @functools.wraps(initialize_sources)
    def checked_initialize_sources(self, config_search_path) -> None:
        if _state["active"]:
            _check_search_path(config_search_path)
        initialize_sources(self, config_search_path)
        for source in self.sources:
            _wrap_source(source)

    ConfigLoaderImpl.load_configuration = checked_load_configuration
    ConfigRepository.initialize_sources = checked_initialize_sources
    _state["installed"] = True


def _check_search_path(config_search_path) -> None:
    """``hydra.searchpath`` may add folders (file://); a pkg:// entry imports its package, which runs
    that package's code (``pkg://this`` prints a poem), so only packages already imported may be named."""
    problems = ProblemCollector()
    for entry in config_search_path.get_path():
        path, provider = str(entry.path or ""), str(entry.provider or "")
        if not provider.startswith("hydra.searchpath") or not path.startswith("pkg://"):
            continue
        module = path[len("pkg://"):].replace("/", ".").strip(".")
        if module not in sys.modules:
            problems.add("hydra.searchpath", f"{path}: a pkg:// search path imports that package, which runs its "
                         "code", "name the folder instead: file:///path/to/conf")
    problems.raise_if_any()


def _wrap_source(source) -> None:
    """File sources load from the text we checked; package sources are checked, then read by Hydra."""
    scheme = source.scheme()
    if scheme == "file":
        original = source.load_config

        def load_config(config_path: str):
            shown = os.path.join(source.path, source._normalize_file_name(config_path))
            if not _state["active"] or not os.path.exists(shown):
                return original(config_path)  # unguarded, or Hydra's own "not found"
            from mimo_spec.safe_yaml import read_yaml_file

            return _config_result(source, read_yaml_file(shown), shown)

        source.load_config = load_config
    elif scheme == "pkg":
        original_read = source._read_config

        def read_config(res):
            if _state["active"]:
                from mimo_spec.safe_yaml import check_yaml_text, decode_yaml_bytes

                shown = str(res)  # the file inside the installed package
                text = decode_yaml_bytes(res.read_bytes(), shown)
                check_yaml_text(text, shown)
                check_package_header(text, shown)
            return original_read(res)

        source._read_config = read_config


def _config_result(source, text: str, shown: str):
    """What FileConfigSource.load_config returns, built from the text we checked (not read twice)."""
    import io

    import yaml
    from hydra.plugins.config_source import ConfigResult, ConfigSource
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from mimo_spec.safe_yaml import yaml_error

    check_package_header(text, shown)
    try:
        cfg = OmegaConf.load(io.StringIO(text))
    except yaml.YAMLError as e:  # e.g. a duplicate key
        raise yaml_error(e, shown) from None
    except OmegaConfBaseException as e:
        raise ConfigError(Problem(shown, str(e).splitlines()[0], "fix this config file")) from None
    return ConfigResult(config=cfg, path=f"{source.scheme()}://{source.path}", provider=source.provider,
                        header=ConfigSource._get_header_dict(text[:_HEADER_CHARS]))


_DIRECTIVE = re.compile(r"^\s*#\s*@")
_PACKAGE_DIRECTIVE = re.compile(r"^\s*#\s*@package\b")
_HEADER_CHARS = 512  # Hydra reads a config's header from its first 512 characters


def check_package_header(text: str, shown: str) -> None:
    """ConfigError for a ``# @package`` line Hydra would not read: Hydra takes a config's directives
    only from the lines at the very top that are directives (``# @package ...``), within its first
    512 characters, and stops at the first other line, a comment included. A directive below that is
    silently ignored, so the file's keys land under its group's name (``preset.model``) instead of
    where it says, and the error Hydra gives later ("Could not override 'model@preset.model'")
    does not say why."""
    consumed, in_header = 0, True
    for number, line in enumerate(text.splitlines(keepends=True), 1):
        consumed += len(line)
        stripped = line.strip()
        if in_header and stripped and not (_DIRECTIVE.match(stripped) and consumed <= _HEADER_CHARS):
            in_header = False
        if not in_header and _PACKAGE_DIRECTIVE.match(line):
            raise ConfigError(Problem(
                shown, f"line {number}, {stripped!r}, is not read: Hydra takes the package directive only "
                "from the lines at the top of the file, before any other line (a comment too)",
                "make it the file's first line"))

