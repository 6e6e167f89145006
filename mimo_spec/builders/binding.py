"""Binding a spec tree to component signatures, before anything is built.

Each node's ``module`` is looked up in the registry of its kind, and its
``params`` are checked against the constructor's signature and type hints with
pydantic. Every problem in the whole tree is collected, so one ``ConfigError``
lists them all with full config paths.
"""

from __future__ import annotations

import collections.abc
import inspect
import math
import re
import types
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
    """(params: name -> (type hint, default), submodules: name -> kind, accepts **kwargs).

    Positional-only parameters are left out (a config passes keywords); ``unbindable`` names them.
    """
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):  # a constructor without a readable signature: nothing can be bound
        return {}, {}, False
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
        if p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY):
            continue
        hint = hints.get(name, Any)
        default = ... if p.default is p.empty else p.default
        if name in declared or _is_module_hint(hint):
            subs[name] = declared.get(name)
        else:
            params[name] = (hint, default)
    return params, subs, var_kw


# What the model calls on a component of each kind, besides forward (checked on the class when binding).
INTERFACES: dict[str, tuple[str, ...]] = {
    "language_model": ("embed_tokens", "logits"),
    # "a|b": either (fixed-size items count tokens from a shape, items of any size per item from a grid)
    "encoder": ("validate_inputs", "tokens_per_item|item_tokens", "example_inputs"),
    "projector": ("tokens_out",),
    "layout": ("item_tokens",),
    "decoder": ("example_targets",),
    "tokenizer": ("encode", "decode"),
}

# the Python types a value from a YAML config can have
_CONFIG_TYPES = (bool, int, float, str, type(None), list, dict)
_COLLECTIONS = (list, tuple, dict, set, frozenset, collections.abc.Iterable)


def config_can_give(hint: Any) -> bool:
    """Whether some value a config can hold (a number, string, bool, null, list or mapping) fits ``hint``.

    False for a class such as transformers' ``PretrainedConfig``, a dataclass, ``torch.dtype`` or a
    callable: a constructor that needs one cannot be built from a config.
    """
    if hint is Any or isinstance(hint, (str, typing.ForwardRef, typing.TypeVar)):
        return True
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return True
    if origin is typing.Annotated:
        return config_can_give(typing.get_args(hint)[0])
    if origin is typing.Union or origin is types.UnionType:
        return any(config_can_give(a) for a in typing.get_args(hint))
    if origin is not None:
        return isinstance(origin, type) and issubclass(origin, _COLLECTIONS)
    if isinstance(hint, type):
        return any(issubclass(t, hint) for t in _CONFIG_TYPES)
    return True  # something typing cannot take apart: let the constructor judge


@lru_cache(maxsize=None)
def unbindable(cls: type) -> tuple[str, list[tuple[str, Any, bool]]]:
    """Why ``cls`` cannot be built from a config: (reason or "", [(param, hint, required)] a config cannot give).

    The reason is set when the constructor's signature cannot be read or it has a required
    positional-only parameter.
    """
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError) as e:
        return f"its constructor's signature cannot be read ({e})", []
    for name, p in list(sig.parameters.items())[1:]:
        if p.kind is p.POSITIONAL_ONLY and p.default is p.empty:
            return f"its constructor needs {name} as a positional argument, which a config cannot give", []
    params, _, _ = signature_of(cls)
    return "", [(n, h, d is ...) for n, (h, d) in params.items() if not config_can_give(h)]


# Sizes of the built-in components (hidden_size, num_heads, in_features, ...) must be >= 1; plugins and
# allowlisted classes check their own parameters.
_SIZE_NAME = re.compile(r"^(num_\w+|\w+_(size|features|dim|factor|channels|heads|layers|positions|bins|len))$")


@lru_cache(maxsize=None)
def _is_builtin(cls: type) -> bool:
    from mimo_spec.registry import BUILTINS

    target = f"{cls.__module__}:{cls.__qualname__}"
    return any(target in entries.values() for entries in BUILTINS.values())


# Upper bounds no real model reaches: one dimension of a weight (torch indexes with 64-bit sizes, and a
# product of a few such dimensions must still fit), and a stack of layers (the largest published
# language models have ~128; building each layer costs time even on the meta device).
MAX_DIM = 2**31 - 1
MAX_LAYERS = 1024
_LAYERS_NAME = re.compile(r"^(num_\w*layers|\w+_layers|num_blocks)$")


def _value_problem(name: str, value: Any) -> tuple[str, str] | None:
    """(message, hint) for a built-in component's parameter value that fits its type but not its meaning."""
    if type(value) is int and value < 1 and _SIZE_NAME.match(name):
        return f"must be >= 1 (a size or count), got {value}", "sizes and counts are positive integers"
    if type(value) is int and _LAYERS_NAME.match(name) and value > MAX_LAYERS:
        return (f"must be at most {MAX_LAYERS} (a layer count), got {value}",
                f"the largest published models have ~128 layers: set {name} to at most {MAX_LAYERS}")
    if type(value) is int and value > MAX_DIM and _SIZE_NAME.match(name):
        return (f"must be at most {MAX_DIM} (2**31 - 1, a size or count), got {value}",
                f"no real model has a {name} this large: set it to at most {MAX_DIM}")
    if type(value) is float and not math.isfinite(value):
        return f"must be a finite number, got {value}", "nan and inf are not parameter values"
    return None


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
def _adapter(hint: Any) -> pydantic.TypeAdapter | None:
    """One validator per type hint, shared by every component that uses it (int, bool, a Literal...):
    much cheaper than a pydantic model per component class, which the CLI's startup time feels.
    None for a hint pydantic cannot build a validator for (the value is then not checked here)."""
    try:
        return pydantic.TypeAdapter(hint, config=_STRICT)
    except Exception:  # pydantic's schema errors for types it cannot take apart
        return None


def _validate_params(cls: type, values: dict[str, Any]) -> list[tuple[str, str]]:
    """(param name, pydantic message) for every value that does not fit its type hint."""
    params, _, _ = signature_of(cls)
    errors = []
    for name, value in values.items():
        hint = params[name][0]
        adapter = None if hint is Any else _adapter(hint)
        if adapter is None:
            continue
        try:
            adapter.validate_python(value)
        except pydantic.ValidationError as e:
            errors.append((name, e.errors()[0]["msg"]))
        except TypeError:  # an annotation pydantic cannot validate against: accept the value
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
        for p in e.problems:  # one, or one per broken plugin
            problems.add(f"{spec.path}.module", p.message, p.hint)
        return None
    missing = [m.replace("|", " or ") for m in INTERFACES.get(kind, ())
               if not any(hasattr(cls, alt) for alt in m.split("|"))]
    if missing:
        a = "an" if kind[0] in "aeiou" else "a"
        problems.add(f"{spec.path}.module", f"{_label(spec, cls)} cannot serve as {a} {kind}: it has no "
                     f"{', '.join(missing)}", f"{a} {kind} implements {', '.join(INTERFACES[kind])}: use a "
                     f"registered {kind}, or wrap the class in a component that implements them".replace("|", " or "))
    params, subs, var_kw = signature_of(cls)
    reason, foreign = unbindable(cls)
    if reason:
        problems.add(f"{spec.path}.module", f"{_label(spec, cls)} cannot be built from a config: {reason}",
                     _UNBINDABLE_HINT)
        return cls
    for name, hint, required in foreign:
        if required and name not in spec.params:
            problems.add(f"{spec.path}.module",
                         f"{_label(spec, cls)} cannot be built from a config: its constructor needs {name} "
                         f"({type_name(hint)}), which no config value can be", _UNBINDABLE_HINT)
        elif name in spec.params:
            problems.add(f"{spec.path}.params.{name}",
                         f"{_label(spec, cls)} takes {type_name(hint)} here, which no config value can be",
                         f"leave {name} unset")
    cannot = {name for name, _, _ in foreign}
    for name in spec.params:
        if name in params:
            continue
        if name in subs:
            problems.add(f"{spec.path}.params.{name}", f"{name} is a submodule of {_label(spec, cls)}",
                         f"put it under {spec.path}.submodules.{name}")
        elif not var_kw:
            problems.add(f"{spec.path}.params.{name}", f"unknown parameter of {_label(spec, cls)}",
                         did_you_mean(name, params))
    missing = [n for n, (_, d) in params.items() if d is ... and n not in spec.params and n not in cannot]
    for name in missing:
        problems.add(f"{spec.path}.params.{name}",
                     f"missing required parameter of {_label(spec, cls)} (expected {type_name(params[name][0])})",
                     f"set {spec.path}.params.{name}")
    if any(isinstance(v, Unresolved) for v in spec.params.values()):
        failed.add(spec.path)  # already reported; the node cannot be built
    known = {k: v for k, v in spec.params.items()
             if k in params and k not in cannot and not isinstance(v, Unresolved)}
    wrong = _validate_params(cls, known)
    for name, msg in wrong:
        problems.add(f"{spec.path}.params.{name}",
                     f"expected {type_name(params[name][0])}, got {type(known[name]).__name__} {known[name]!r}",
                     msg.lower())
    if _is_builtin(cls):
        typed = {n for n, _ in wrong}
        for name, value in known.items():
            found = None if name in typed else _value_problem(name, value)
            if found:
                problems.add(f"{spec.path}.params.{name}", *found)
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


_UNBINDABLE_HINT = ("name an nn.Module whose constructor takes plain values (numbers, strings, lists), or "
                    "register a component that builds this class")


def _label(spec: ModuleSpec, cls: type) -> str:
    return spec.module if isinstance(spec.module, str) else cls.__name__


def check_node(spec: ModuleSpec, kind: str, allow_imports: list[str] = ()) -> type:
    """Bind one subtree or raise a ConfigError listing every problem in it."""
    problems = ProblemCollector()
    cls = bind_node(spec, kind, list(allow_imports), problems)
    problems.raise_if_any(ConfigError)
    assert cls is not None
    return cls
