"""Values read from the environment stay out of every file a run writes.

A token or a password passed as ``${oc.env:NAME}`` must not land in clear in the run record
(``resolved_config.yaml``, ``overrides.yaml``), in a checkpoint's ``state.json`` or in a
sweep's summary. :func:`record_config` resolves a config for the record but keeps every
interpolation whose value comes from the environment (directly or through other
interpolations) as written; :func:`raw_overrides` gives the command line's overrides as
typed (Hydra's list resolves them); :func:`redact_env_values` replaces such values in an
error message that quotes them.
"""

from __future__ import annotations

import os
import re
import uuid
from typing import Any

_ENV_RESOLVERS = ("oc.env", "env")


_ENV_READ = re.compile(r"\$\{(?:oc\.env|env):\s*([A-Za-z_][A-Za-z0-9_]*)")


def redact_env_values(text: str, cfg) -> str:
    """``text`` (an error message bound for a file) with the value of every environment variable the
    config reads through ``${oc.env:NAME}`` replaced by that interpolation: messages quote values."""
    from omegaconf import OmegaConf

    try:
        raw = OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=False)) if OmegaConf.is_config(cfg) else str(cfg)
    except Exception:  # noqa: BLE001 - an unreadable config: nothing to look up
        return text
    for name in sorted(set(_ENV_READ.findall(raw))):
        value = os.environ.get(name)
        if value and len(value) >= 3:
            text = text.replace(value, "${oc.env:" + name + "}")
    return text


def record_config(cfg) -> Any:
    """``cfg`` as plain containers, resolved, except that every interpolation whose value comes
    from the environment (``${oc.env:...}``, also through other interpolations) stays as written."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if not isinstance(cfg, (DictConfig, ListConfig)):
        return cfg
    real = OmegaConf.to_container(cfg, resolve=True)
    marker = f"MIMO_SPEC_ENV_{uuid.uuid4().hex}"
    try:
        canary = _resolve_with_env_marker(cfg, marker)
    except Exception:  # the config cannot do without its real environment: keep every interpolation
        canary = _ALL_AS_WRITTEN
    return _merge(cfg, real, canary, marker)


_ALL_AS_WRITTEN = object()


def _resolve_with_env_marker(cfg, marker: str) -> Any:
    """The config resolved with every environment variable read as ``marker:NAME``."""
    from omegaconf import OmegaConf
    from omegaconf.basecontainer import BaseContainer

    saved = {name: BaseContainer._resolvers[name] for name in _ENV_RESOLVERS if name in BaseContainer._resolvers}

    def fake(key: str, default: Any = None, *args, **kwargs) -> str:
        return f"{marker}:{key}"

    try:
        for name in saved:
            OmegaConf.register_new_resolver(name, fake, replace=True)
        return OmegaConf.to_container(cfg, resolve=True)
    finally:
        for name, fn in saved.items():
            BaseContainer._resolvers[name] = fn


def _mentions(value: Any, marker: str) -> bool:
    if isinstance(value, dict):
        return any(_mentions(k, marker) or _mentions(v, marker) for k, v in value.items())
    if isinstance(value, list):
        return any(_mentions(v, marker) for v in value)
    return isinstance(value, str) and marker in value


def _part(canary: Any, key: Any, default: Any) -> Any:
    """``canary[key]`` (the same place in the marker-resolved config), when there is one."""
    if canary is _ALL_AS_WRITTEN:
        return canary
    if isinstance(canary, dict):
        return canary.get(key, default)
    if isinstance(canary, list) and isinstance(key, int) and key < len(canary):
        return canary[key]
    return default


def _merge(node, real: Any, canary: Any, marker: str) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, DictConfig) and isinstance(real, dict):
        keys = [k for k in node.keys() if k in real]
    elif isinstance(node, ListConfig) and isinstance(real, list):
        keys = range(len(real))
    else:
        return real
    out: Any = {} if isinstance(real, dict) else []
    for key in keys:
        r = real[key]
        c = _part(canary, key, r)
        child = node._get_node(key)
        if OmegaConf.is_interpolation(node, key):
            value = child._value() if (c != r or _mentions(c, marker)) else r  # from the environment: as written
        elif isinstance(child, (DictConfig, ListConfig)) and not child._is_none() and not child._is_missing():
            value = _merge(child, r, c, marker)
        else:
            value = r
        if isinstance(out, dict):
            out[key] = value
        else:
            out.append(value)
    return out


def raw_overrides(overrides: list[str]) -> list[str]:
    """The command line's overrides as typed (``${oc.env:X}`` not replaced by X's value).

    Hydra hands the task its overrides as a list that resolves interpolations when read.
    """
    try:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        if HydraConfig.initialized():
            task = HydraConfig.get().overrides.task
            raw = [str(o) for o in OmegaConf.to_container(task, resolve=False)]
            if len(raw) == len(overrides):
                resolved = []
                for i in range(len(task)):
                    try:
                        resolved.append(str(task[i]))
                    except Exception:  # an interpolation that cannot be read: keep it as typed
                        resolved.append(raw[i])
                if resolved == [str(o) for o in overrides]:
                    return raw
    except ImportError:
        pass
    return [str(o) for o in overrides]
