"""The command-line app: Hydra composes the config, ``action=`` picks what to do.

Config mistakes end as one readable block on stderr and exit code 2, with no
Python traceback unless ``debug=true`` or ``HYDRA_FULL_ERROR=1``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from mimo_spec.errors import ConfigError, MimoError, Problem, format_error  # noqa: F401  (app.format_error stays)
from mimo_spec.rundir import write_text_atomic  # noqa: F401  (app.write_text_atomic stays importable)

ACTIONS = ("train", "eval", "generate", "summary", "validate", "data", "list", "print", "import", "layout")
EXIT_CONFIG_ERROR = 2


def write_run_record(cfg, overrides: list[str], spec, out_dir: Path) -> None:
    """Resolved config, overrides, spec tree and versions: enough to rebuild the same model.

    Values read from the environment (``${oc.env:...}``) stay unresolved: no secret in clear.
    """
    import torch
    from omegaconf import OmegaConf

    import mimo_spec
    from mimo_spec.env_secrets import raw_overrides, record_config

    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = record_config(cfg)
    resolved.pop("hydra", None)
    write_text_atomic(out_dir / "resolved_config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))
    write_text_atomic(out_dir / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(raw_overrides(overrides))))
    write_text_atomic(out_dir / "spec.yaml", spec.to_yaml())
    versions = {"mimo_spec": mimo_spec.__version__, "torch": torch.__version__, "python": sys.version.split()[0]}
    write_text_atomic(out_dir / "versions.json", json.dumps(versions, indent=2) + "\n")


def use_imported_model(cfg) -> None:
    """Replace the model description with the one in ``init_from``/config.yaml."""
    from omegaconf import OmegaConf, open_dict

    from mimo_spec.spec import load_yaml_file

    if not isinstance(cfg.init_from, str):
        value = cfg.init_from
        shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        raise ConfigError(f"expected a folder path (a string), got {type(shown).__name__} {shown!r}",
                          path="init_from", hint="point at a folder written by action=import, e.g. init_from=imported/")
    folder = Path(cfg.init_from)
    if not (folder / "config.yaml").exists() or not (folder / "model.safetensors").exists():
        raise ConfigError(f"{folder} has no config.yaml + model.safetensors", path="init_from",
                          hint="point at a folder written by action=import")
    imported = load_yaml_file(folder / "config.yaml")
    if "model" not in imported:
        raise ConfigError(f"{folder / 'config.yaml'} describes a single component, not a whole model",
                          path="init_from", hint="import a language model or a LLaVA checkpoint")
    with open_dict(cfg):
        cfg.model = imported.model
        cfg.modalities = imported.get("modalities") or {}
        if imported.get("dtype"):
            cfg.dtype = imported.dtype
        if imported.get("hf_config"):  # ids of the original that the model does not use (export writes them back)
            cfg.hf_config = imported.hf_config


def run(cfg, overrides: list[str], out_dir: Path | None) -> int:
    """Carry out ``cfg.action``; returns the exit code."""
    from omegaconf import OmegaConf

    action = cfg.get("action", "train")
    if cfg.get("init_from"):
        use_imported_model(cfg)
    if action not in ACTIONS:
        from mimo_spec.errors import did_you_mean

        raise ConfigError(f"unknown action {action!r}", path="action", hint=did_you_mean(action, ACTIONS))
    if action == "list":
        from mimo_spec.summary import render_registry

        print(render_registry())
        return 0
    if action == "print":
        resolved = OmegaConf.to_container(cfg, resolve=True)
        resolved.pop("hydra", None)
        print(OmegaConf.to_yaml(OmegaConf.create(resolved)), end="")
        return 0
    if action == "import":  # the config to check is the one being imported
        from mimo_spec import jobs, rundir

        with rundir.holding(out_dir):
            return jobs.run_import(cfg, out_dir or Path("."))
    from mimo_spec.run_config import RunConfig, build_meta_model

    if action == "layout":  # the rank map for any world size, without starting a process
        from mimo_spec.parallel.layout import run_layout_action

        build_meta_model(cfg)  # first the model's and its layout's own problems, as for every action
        return run_layout_action(cfg)

    try:
        model = build_meta_model(cfg)  # the model's checks and the parallel layout's, in one error
    except ConfigError as model_error:  # every problem at once: the other sections' too
        extra = []
        try:
            RunConfig.from_config(cfg)
        except ConfigError as section_error:
            seen = {(p.path, p.message) for p in model_error.problems}
            extra = [p for p in section_error.problems if (p.path, p.message) not in seen]
        except Exception:  # noqa: BLE001 - a section that cannot even be read: the model's error says enough
            extra = []
        if extra:
            raise ConfigError([*model_error.problems, *extra]) from None
        raise

    def record() -> None:
        if out_dir is not None:
            write_run_record(cfg, overrides, model.spec, out_dir)

    if action == "summary":  # needs the summary section only
        from mimo_spec.builders.build import parse_dtype
        from mimo_spec.summary import render_summary

        run_cfg = RunConfig.from_config(cfg, spec=model.spec, sections=("summary",))
        print(render_summary(model, parse_dtype(run_cfg.dtype) or _float32(), depth=run_cfg.summary.depth))
        _record_if_new(record, out_dir)
        return 0
    run_cfg = RunConfig.from_config(cfg, spec=model.spec)  # every section checked, once
    run_cfg.command_overrides = tuple(str(o) for o in overrides or ())
    if action == "validate":
        from mimo_spec.jobs import check_run_resources

        check_run_resources(run_cfg, model)  # the model (on meta) sizes the memory checks
        found, warnings = [], []
        if run_cfg.data is not None:  # the tokenizer must fit the LM's vocabulary and miss the placeholders
            from mimo_spec.data.stats import validate_run_data

            tokenizer = _data_tokenizer(run_cfg.data, model)
            # the data: every record read, its files there, a sample decoded (DataError past max_bad_fraction)
            found, warnings = validate_run_data(run_cfg, model, tokenizer, cfg.get("data_scan"), _err_console())
        _record_if_new(record, out_dir)
        print(f"config is valid: {sum(p.numel() for p in model.parameters()):,} parameters")
        for line in found:
            print(f"data {line}")
        for line in warnings:
            print(f"warning: {line}", file=sys.stderr)
        return 0
    if action == "data":  # the data's statistics (data_stats.json, token_lengths.png in the run dir)
        from mimo_spec.data.stats import run_data_action

        if run_cfg.data is None or run_cfg.train is None:
            raise ConfigError("action=data needs the data and train sections", path="data")
        tokenizer = _data_tokenizer(run_cfg.data, model)
        code = run_data_action(run_cfg, model, tokenizer, cfg.get("data_scan"), out_dir, _err_console())
        _record_if_new(record, out_dir)
        return code
    return _run_job(action, run_cfg, out_dir, record)


def _data_tokenizer(data, model):
    """The data's tokenizer, after the sample length limit is checked against the model: a problem with each
    is reported together (one ConfigError), not the tokenizer's alone."""
    from mimo_spec.data.config import max_length
    from mimo_spec.data.tokenizer import build_tokenizer
    from mimo_spec.errors import ProblemCollector

    problems = ProblemCollector()
    try:
        max_length(data, model)
    except ConfigError as e:
        problems.extend(e)
    tokenizer = None
    try:
        tokenizer = build_tokenizer(data, model)
    except ConfigError as e:
        problems.extend(e)
    problems.raise_if_any()
    return tokenizer


def _record_if_new(record, out_dir: Path | None) -> None:
    """Read-only actions (validate, summary) record their config only in a directory that holds no
    record and no training run: they never replace the record of a run that lives there."""
    from mimo_spec.rundir import check_not_inside_a_run, has_record, holds_training_run, is_main_process

    if out_dir is not None and is_main_process() and not has_record(out_dir) and not holds_training_run(out_dir):
        check_not_inside_a_run(out_dir)
        record()


def _run_job(action: str, run_cfg, out_dir: Path | None, record) -> int:
    """train, eval, generate: one process (rank 0) holds the run directory's lock while the job runs.

    A training run writes its record once it has passed every check (config, data, the resume
    check) and starts; eval and generate write theirs when they are done, and never over the
    record of a training run in the same directory.
    """
    from mimo_spec import jobs, rundir

    with rundir.holding(out_dir) as lock:
        out_dir = out_dir or Path(".")
        try:
            if action == "train":
                if lock is not None:
                    rundir.record_when_started(out_dir, record)
                return jobs.run_train(run_cfg, out_dir)
            code = getattr(jobs, f"run_{action}")(run_cfg, out_dir)
            if not code and lock is not None and not rundir.holds_training_run(out_dir):
                record()
            return code
        finally:
            rundir.forget_record(out_dir)


def _err_console():
    """A rich console on stderr: progress bars of long checks (drawn only on a terminal)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _float32():
    import torch

    return torch.float32


def _task(cfg) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from mimo_spec.config import apply_module_swaps, task_overrides

    hc = HydraConfig.get()
    overrides = task_overrides(hc.overrides.task)  # an override whose ${...} fails is named by the config's check
    if hc.mode == RunMode.MULTIRUN:  # one job of a sweep: record a failure, don't end the sweep
        from mimo_spec.sweep import run_sweep_job

        return run_sweep_job(cfg, overrides, Path(hc.runtime.output_dir), run)
    try:
        apply_module_swaps(cfg, overrides)
        code = run(cfg, overrides, Path(hc.runtime.output_dir))
        if not code:
            from mimo_spec.parallel.env import shutdown_distributed

            shutdown_distributed()  # every rank ends its process group together
    except MimoError as e:  # config, input, data, checkpoint and storage errors: the user's to fix
        if _DEBUG["on"]:
            raise
        print(format_error(e), file=sys.stderr)
        code = EXIT_CONFIG_ERROR
    except OSError as e:  # a full disk or a read-only run directory is the machine's answer, not our bug
        from mimo_spec.errors import STORAGE_ERRNOS, storage_error

        if _DEBUG["on"] or e.errno not in STORAGE_ERRNOS:
            raise
        print(format_error(storage_error(e)), file=sys.stderr)
        code = EXIT_CONFIG_ERROR
    if code:
        sys.exit(code)


_DEBUG = {"on": False}  # set by main() from the user's switches, before HYDRA_FULL_ERROR is forced


def _is_debug(argv: list[str]) -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or any(
        a.lower() in ("debug=true", "debug=1", "+debug=true") for a in argv)


_HYDRA_FLAGS = ("-m", "--multirun", "-cd", "--config-dir", "-cp", "--config-path", "-cn", "--config-name")


def _plain_run(argv: list[str]) -> bool:
    """True when Hydra's first, mode-probing compose can only answer "not set".

    Hydra composes the whole config twice for a plain run: once to read
    ``hydra.mode`` (which a YAML file could set to MULTIRUN), then for the job.
    When nothing on the command line asks for another mode or another config
    tree, and no shipped YAML mentions MULTIRUN, the probe's answer is known
    (None, i.e. a single run) and costs a tenth of a second for nothing.
    """
    from mimo_spec.config import CONF_DIR

    if any(a.split("=")[0] in _HYDRA_FLAGS or a.startswith(("hydra.mode", "hydra.searchpath", "+hydra.searchpath"))
           for a in argv):
        return False
    return not any("MULTIRUN" in f.read_text() for f in CONF_DIR.rglob("*.yaml"))


@contextlib.contextmanager
def _skip_mode_probe(skip: bool):
    """Within this block (when ``skip``), Hydra takes the mode probe's answer as "not set"."""
    from hydra._internal.hydra import Hydra

    original = Hydra.__dict__["get_mode"]
    if skip:
        Hydra.get_mode = lambda self, config_name, overrides: None
    try:
        yield
    finally:
        Hydra.get_mode = original


MAX_OVERRIDE_CHARS = 64 << 10  # one key=value argument: a long list of paths fits; Hydra's parser is slow
MAX_OVERRIDE_ITEMS = 2_000  # values in one override's lists/dicts: Hydra's parser takes time quadratic in them


def _override_shape(text: str) -> tuple[int, int]:
    """(deepest nesting of brackets and braces, number of separators) outside quotes."""
    depth = deepest = items = 0
    quote = None
    escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
        elif ch in ",:":
            items += 1
    return deepest, items


def _check_command_line(argv: list[str]) -> None:
    """Refused before Hydra reads the command line: flags that run code from a file or a package
    (``--experimental-rerun`` unpickles the file it names; ``--config-path pkg://X`` imports X), and
    overrides Hydra's parser cannot take (so long it parses for minutes, so deep it recurses out)."""
    from mimo_spec.safe_yaml import MAX_DEPTH

    problems = []
    for i, arg in enumerate(argv):
        flag, _, value = arg.partition("=")
        if not arg.startswith("-") and "=" in arg:
            shown = flag if len(flag) <= 80 else flag[:77] + "..."
            deepest, items = _override_shape(value) if len(arg) <= MAX_OVERRIDE_CHARS else (0, 0)
            if len(arg) > MAX_OVERRIDE_CHARS:
                problems.append(Problem("overrides", f"{shown}=...: the override is {len(arg):,} characters long "
                                        f"(at most {MAX_OVERRIDE_CHARS:,})", "put long values in a config file "
                                        "(hydra.searchpath) and select it"))
            elif items > MAX_OVERRIDE_ITEMS:
                problems.append(Problem("overrides", f"{shown}=...: the override holds {items:,} values "
                                        f"(at most {MAX_OVERRIDE_ITEMS:,} on the command line)",
                                        "put long lists in a config file (hydra.searchpath) and select it"))
            elif deepest > MAX_DEPTH:
                problems.append(Problem("overrides", f"{shown}=...: the value is nested {deepest} levels deep "
                                        f"(at most {MAX_DEPTH})", "a config is a shallow tree; flatten this value"))
            continue
        if flag == "--experimental-rerun":
            problems.append(Problem("--experimental-rerun", "refused: Hydra re-runs a job by unpickling the "
                                    "config.pickle it names, which runs any code the file holds",
                                    "re-run a job from its record instead: --config-dir <run dir> "
                                    "--config-name resolved_config"))
        elif flag in ("--config-path", "-cp", "--config-dir", "-cd"):
            value = value or (argv[i + 1] if i + 1 < len(argv) else "")
            module = value[len("pkg://"):].replace("/", ".").strip(".") if value.startswith("pkg://") else ""
            if module and module not in sys.modules:
                problems.append(Problem(flag, f"{value}: a pkg:// config path imports that package, which runs "
                                        "its code", "name the folder instead: --config-dir /path/to/conf"))
    if problems:
        raise ConfigError(problems)


def main() -> None:
    """Console entry point (``mimo-spec`` and ``python cli.py``)."""
    import hydra
    import yaml
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from mimo_spec.config import translate_hydra_error

    argv = sys.argv[1:]
    debug = _DEBUG["on"] = _is_debug(argv)
    saved = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us; we decide how to show them
    from mimo_spec.config import CONF_DIR

    task = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)(_task)
    from mimo_spec.hydra_guard import guarded

    from mimo_spec.sweep import forget_last_sweep

    forget_last_sweep()
    try:
        _check_command_line(argv)
        # every YAML file and every composed config is checked before Hydra acts on it
        with guarded(), _skip_mode_probe(_plain_run(argv)):
            task()
        from mimo_spec.sweep import sweep_exit_code

        code = sweep_exit_code()  # a multirun with failed jobs: 1, or 2 when all failures were config errors
        if code:
            sys.exit(code)
    except (MimoError, HydraException, OmegaConfBaseException, yaml.YAMLError) as e:
        if debug:
            raise
        err = e if isinstance(e, MimoError) else translate_hydra_error(e, [a for a in argv if not a.startswith("-")])
        print(format_error(err), file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    except Exception as e:  # a sweep stopped midway (a lost submitit job, no finished Optuna trial)?
        if not debug and isinstance(e, ValueError) and str(e).startswith(("Only one of --run", "The --resolve")):
            err = ConfigError(str(e), path="command line", hint="give one of -m, --cfg, --info per command")
            print(format_error(err), file=sys.stderr)  # Hydra's own check of its flags
            sys.exit(EXIT_CONFIG_ERROR)
        from mimo_spec.rundir import run_dir_error

        err = None if debug else run_dir_error(e)  # Hydra could not create hydra.run.dir (a file there?)
        if err is not None:
            print(format_error(err), file=sys.stderr)
            sys.exit(EXIT_CONFIG_ERROR)
        from mimo_spec.sweep import end_broken_sweep

        code = None if debug else end_broken_sweep(e)
        if code is None:
            raise
        sys.exit(code)
    finally:
        if saved is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved


if __name__ == "__main__":
    main()
