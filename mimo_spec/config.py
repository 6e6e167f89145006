"""Composing run configs with Hydra, and turning Hydra's errors into ConfigErrors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from mimo_spec.errors import ConfigError, Problem, did_you_mean



def _conf_dir() -> Path:
    """The shipped config tree: ``conf/`` at the repository root in a checkout (and an editable
    install); an installed wheel carries the same files as ``mimo_spec/conf`` (pyproject's
    package-dir mapping), so there is one copy of them either way."""
    checkout = Path(__file__).resolve().parent.parent / "conf"
    if (checkout / "config.yaml").is_file():
        return checkout
    return Path(__file__).resolve().parent / "conf"


CONF_DIR = _conf_dir()


def compose_config(overrides: Sequence[str] = (), *, config_name: str = "config",
                   config_dir: str | Path | None = None):
    """Compose the run config from the shipped presets plus Hydra-style overrides.

    Extra config folders join through Hydra's search path, e.g.
    ``compose_config(["hydra.searchpath=[file:///my/conf]", "modality=[my_modality]"])``.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mimo_spec.hydra_guard import guarded

    overrides = list(overrides)
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:  # guarded: bounded YAML, and nothing Hydra would instantiate that is not allowed
        with guarded(), initialize_config_dir(str(config_dir or CONF_DIR), version_base=None):
            cfg = compose(config_name, overrides=overrides)
    except Exception as e:  # Hydra/OmegaConf/YAML errors -> one readable ConfigError
        raise translate_hydra_error(e, overrides) from None
    apply_module_swaps(cfg, overrides)
    return cfg


def task_overrides(task) -> list[str]:
    """Hydra's ``hydra.overrides.task`` as strings: read, it resolves ``${...}`` in each override,
    so an override whose interpolation fails (``train.lr=${oc.env:UNSET}``) is kept as typed.
    The config itself holds the same interpolation, and resolving it there names the key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    raw = OmegaConf.to_container(task, resolve=False)
    out = []
    for i, text in enumerate(raw):
        try:
            out.append(str(task[i]))
        except OmegaConfBaseException:
            out.append(str(text))
    return out


def apply_module_swaps(cfg, overrides: Sequence[str]) -> None:
    """Swapping a node's ``module`` from the command line replaces the whole node.

    ``modalities.images.submodules.encoders.clip.module=whisper_encoder`` keeps none of
    the old component's params: only those given on the same command line survive
    (the merge bug that torchtune and LightningCLI users hit).
    """
    from omegaconf import OmegaConf, open_dict

    parsed = [_split_override(o) for o in overrides]
    swaps = [key[: -len(".module")] for key, _ in parsed if key and key.endswith(".module")]
    for node_path in swaps:
        node = OmegaConf.select(cfg, node_path)
        if node is None or not OmegaConf.is_dict(node):
            continue
        prefix = f"{node_path}.params."
        kept = {k[len(prefix):] for k, _ in parsed if k and k.startswith(prefix)}
        with open_dict(cfg):
            params = node.get("params") or {}
            node["params"] = {k: params[k] for k in params if k in kept} if params else {}
            sub_prefix = f"{node_path}.submodules."
            if not any(k and k.startswith(sub_prefix) for k, _ in parsed):
                node["submodules"] = {}


def _split_override(text: str) -> tuple[str | None, str]:
    m = re.match(r"^[+~]{0,2}([\w.\-@/]+)=(.*)$", text)
    return (m.group(1), m.group(2)) if m else (None, text)


def translate_hydra_error(e: Exception, overrides: Sequence[str] = ()) -> ConfigError:
    """A Hydra / OmegaConf / YAML exception as a ConfigError naming the path and a hint."""
    import yaml

    if isinstance(e, ConfigError):
        return e
    if isinstance(e, yaml.YAMLError):
        return yaml_error_in_configs(e, overrides)
    cause = e.__cause__ or e.__context__
    if isinstance(cause, yaml.YAMLError):
        return yaml_error_in_configs(cause, overrides)
    text = str(e).strip()
    full_key = getattr(cause, "full_key", None) or getattr(e, "full_key", None)
    m = re.search(r"Could not (?:find|load) '([^']+)'", text)
    if m:
        group, _, option = m.group(1).rpartition("/")
        options = re.findall(r"^\t(\S+)$", text, flags=re.M) or _group_options(group, overrides)
        hint = did_you_mean(option, options) if options else f"check the {group} group's options"
        if options and "did you mean" in hint:
            hint += f" available: {', '.join(options)}"
        return ConfigError(Problem(group or option, f"no config option {option!r} in group {group!r}", hint))
    m = re.search(r"Could not (?:override|append to|delete from) '([^']+)'", text)
    if m and full_key is not None:
        key = str(full_key)
        cause_text = str(cause).splitlines()[0] if cause else text.splitlines()[-1]
        if "not in struct" in cause_text:
            siblings = _siblings(key, overrides)
            hint = did_you_mean(key.rsplit(".", 1)[-1], siblings) if siblings else "prefix with + to add a new key"
            return ConfigError(Problem(key, "unknown key", hint))
        return ConfigError(Problem(key, cause_text, "check the override's value"))
    m = re.search(r"An item is already at '([^']+)'", text)
    if m:
        return ConfigError(Problem(m.group(1), "already exists, so '+' cannot add it",
                                   "set it without '+', or use '++' to set or add"))
    if ("Error parsing override" in text or "mismatched input" in text or "no viable alternative" in text
            or "LexerNoViableAlt" in text or "LexerNoViableAlt" in type(e).__name__
            or "LexerNoViableAlt" in type(cause).__name__):
        bad = _unparsable_override(overrides)
        where = f"cannot parse {bad!r}: " if bad else ""
        detail = text.splitlines()[-1] if text else "syntax error"
        if bad and ("\n" in bad or "\r" in bad):  # e.g. a quoted list continued on the next shell line
            detail = "a line break inside the override (it must be on one line)"
        elif "LexerNoViableAlt" in text or "LexerNoViableAlt" in type(e).__name__ + type(cause).__name__:
            detail = "a character Hydra's override syntax does not allow here (such as '<' or '%')"
        return ConfigError(Problem("overrides", where + detail,
                                   "write overrides as key=value, e.g. model.params.num_layers=4; quote values "
                                   "with brackets, spaces or symbols: 'generate.prompt=\"<image> one\"'"))
    m = re.search(r"Value '(.*)' of type '(\w+)' could not be converted to (\w+)", str(cause or ""))
    if m and full_key:  # e.g. hydra.launcher.nodes=two against a typed (structured) config
        return ConfigError(Problem(str(full_key), f"expected {m.group(3).lower()}, got {m.group(2)} {m.group(1)!r}",
                                   "give a value of the type this option expects"))
    # Hydra's ConfigCompositionException carries no text of its own: the cause says what went wrong
    first = (text or str(cause or "").strip() or type(e).__name__).splitlines()[0]
    if full_key:
        return ConfigError(Problem(str(full_key), first, "check this key in the config"))
    return ConfigError(Problem("config", first, "run with debug=true for the full traceback"))


def _unparsable_override(overrides: Sequence[str]) -> str | None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for o in overrides:
        try:
            parser.parse_override(o)
        except Exception:  # noqa: BLE001 - any parse failure marks the culprit
            return o
    return None


def _group_options(group: str, overrides: Sequence[str]) -> list[str]:
    """Option names of a config group, from the shipped tree and any search-path folders."""
    dirs = [CONF_DIR]
    for o in overrides:
        if o.startswith("hydra.searchpath="):
            dirs += [Path(p.strip().removeprefix("file://")) for p in o.split("=", 1)[1].strip("[]").split(",")]
    return sorted({f.stem for d in dirs for f in (Path(d) / group).glob("*.yaml")})


def _siblings(key: str, overrides: Sequence[str]) -> list[str]:
    """Keys that exist beside ``key`` in the config composed without the failing override."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    rest = [o for o in overrides if not o.lstrip("+~").startswith(key + "=")
            and ("=" in o and o.split("=", 1)[0].lstrip("+~") != key)]
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(CONF_DIR), version_base=None):
            cfg = compose("config", overrides=[o for o in rest if not o.startswith("hydra.")])
        parent = OmegaConf.select(cfg, key.rsplit(".", 1)[0]) if "." in key else cfg
        return [str(k) for k in parent.keys()] if OmegaConf.is_dict(parent) else []
    except Exception:
        return []


def yaml_error_in_configs(err, overrides: Sequence[str] = (), extra_dirs: Sequence[str] = ()) -> ConfigError:
    """A YAML error blamed on the file it came from (the stream name PyYAML put in its mark).

    Config files read under :func:`mimo_spec.hydra_guard.guarded` already fail with a
    ConfigError naming their file; this covers YAML read elsewhere. A stream without a
    file name is reported as such, never blamed on some other broken file that happens to
    lie in a config folder. (``overrides`` and ``extra_dirs`` are kept for callers.)
    """
    from mimo_spec.safe_yaml import yaml_error

    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    name = str(getattr(mark, "name", "") or "")
    if name and not name.startswith("<"):  # "<unicode string>", "<file>": no file to name
        return yaml_error(err, name)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return ConfigError(Problem("config", f"YAML syntax error{at}: {problem}", "fix the YAML syntax"))
