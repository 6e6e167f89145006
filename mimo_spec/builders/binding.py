"""Binding a spec tree to component signatures, before anything is built.

Each node's ``module`` is looked up in the registry of its kind, and its
``params`` are checked against the constructor's signature and type hints with
pydantic. Every problem in the whole tree is collected, so one ``ConfigError``
lists them all with full config paths.
"""

from __future__ import annotations

import inspect
import typing
from functools import lru_cache
from typing import Any

import pydantic
import torch.nn as nn

from mimo_spec.errors import ConfigError, ProblemCollector, did_you_mean
from mimo_spec.registry import REGISTRIES, RegistryError, resolve
from mimo_spec.spec import ModuleSpec, Unresolved


@lru_cache(maxsize=None)
def signature_of(cls: type) -> tuple[dict[str, tuple[Any, Any]], dict[str, str | None], bool]:
    """(params: name -> (type hint, default), submodules: name -> kind, accepts **kwargs)."""
    sig = inspect.signature(cls.__init__)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: fall back to Any
        hints = {}
    declared: dict[str, str | None] = dict(getattr(cls, "submodule_kinds", {}))
    params: dict[str, tuple[Any, Any]] = {}
    subs: dict[str, str | None] = {}
    var_kw = False
    for name, p in list(sig.parameters.items())[1:]:
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
            continue
        if p.kind is p.VAR_POSITIONAL:
            continue
        hint = hints.get(name, Any)
        default = ... if p.default is p.empty else p.default
        if name in declared or _is_module_hint(hint):
            subs[name] = declared.get(name)
        else:
            params[name] = (hint, default)
    return params, subs, var_kw


def _is_module_hint(hint: Any) -> bool:
    if isinstance(hint, type) and issubclass(hint, nn.Module):
        return True
    return any(_is_module_hint(a) for a in typing.get_args(hint))


def type_name(hint: Any) -> str:
    if hint is Any:
        return "any value"
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


_STRICT = pydantic.ConfigDict(strict=True, arbitrary_types_allowed=True)


@lru_cache(maxsize=None)
def _adapter(hint: Any) -> pydantic.TypeAdapter:
    """One validator per type hint, shared by every component that uses it (int, bool, a Literal...):
    much cheaper than a pydantic model per component class, which the CLI's startup time feels."""
    return pydantic.TypeAdapter(hint, config=_STRICT)


def _validate_params(cls: type, values: dict[str, Any]) -> list[tuple[str, str]]:
    """(param name, pydantic message) for every value that does not fit its type hint."""
    params, _, _ = signature_of(cls)
    errors = []
    for name, value in values.items():
        hint = params[name][0]
        if hint is Any:
            continue
        try:
            _adapter(hint).validate_python(value)
        except pydantic.ValidationError as e:
            errors.append((name, e.errors()[0]["msg"]))
        except TypeError:  # an annotation pydantic cannot build a validator for: accept the value
            continue
    return errors


def _kind_for(name: str, kind: str | None) -> str:
    if kind is not None:
        return kind
    return next((k for k, reg in REGISTRIES.items() if name in reg), "encoder")


def bind_node(spec: ModuleSpec, kind: str, allow_imports: list[str], problems: ProblemCollector,
              failed: set[str] | None = None) -> type | None:
    """Check one node and its subtree; returns the node's class (None if unknown).

    Paths of nodes that cannot be built (their own problems or a child's) go into ``failed``.
    """
    failed = set() if failed is None else failed
    before = len(problems.problems)
    cls = _bind_one(spec, kind, allow_imports, problems, failed)
    if cls is None or len(problems.problems) > before:
        failed.add(spec.path)
    return cls


def _bind_one(spec: ModuleSpec, kind: str, allow_imports: list[str], problems: ProblemCollector,
              failed: set[str]) -> type | None:
    try:
        cls = resolve(kind, spec.module, allow_imports=allow_imports)
    except RegistryError as e:
        p = e.problems[0]
        problems.add(f"{spec.path}.module", p.message, p.hint)
        return None
    params, subs, var_kw = signature_of(cls)
    for name in spec.params:
        if name in params:
            continue
        if name in subs:
            problems.add(f"{spec.path}.params.{name}", f"{name} is a submodule of {_label(spec, cls)}",
                         f"put it under {spec.path}.submodules.{name}")
        elif not var_kw:
            problems.add(f"{spec.path}.params.{name}", f"unknown parameter of {_label(spec, cls)}",
                         did_you_mean(name, params))
    missing = [n for n, (_, d) in params.items() if d is ... and n not in spec.params]
    for name in missing:
        problems.add(f"{spec.path}.params.{name}",
                     f"missing required parameter of {_label(spec, cls)} (expected {type_name(params[name][0])})",
                     f"set {spec.path}.params.{name}")
    if any(isinstance(v, Unresolved) for v in spec.params.values()):
        failed.add(spec.path)  # already reported; the node cannot be built
    known = {k: v for k, v in spec.params.items() if k in params and not isinstance(v, Unresolved)}
    for name, msg in _validate_params(cls, known):
        problems.add(f"{spec.path}.params.{name}",
                     f"expected {type_name(params[name][0])}, got {type(known[name]).__name__} {known[name]!r}",
                     msg.lower())
    for name, value in spec.submodules.items():
        if name not in subs:
            problems.add(f"{spec.path}.submodules.{name}", f"unknown submodule of {_label(spec, cls)}",
                         did_you_mean(name, subs) if subs else f"{_label(spec, cls)} takes no submodules")
            continue
        child_kind = _kind_for(name, subs[name])
        children = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else [value]
        for child in children:
            bind_node(child, child_kind, allow_imports, problems, failed)
    return cls


def _label(spec: ModuleSpec, cls: type) -> str:
    return spec.module if isinstance(spec.module, str) else cls.__name__


def check_node(spec: ModuleSpec, kind: str, allow_imports: list[str] = ()) -> type:
    """Bind one subtree or raise a ConfigError listing every problem in it."""
    problems = ProblemCollector()
    cls = bind_node(spec, kind, list(allow_imports), problems)
    problems.raise_if_any(ConfigError)
    assert cls is not None
    return cls
