"""build_module / build_model: the one path from a spec to an nn.Module."""

from __future__ import annotations

import contextlib
import fnmatch
from typing import Any

import torch
import torch.nn as nn

from mimo_spec.builders.binding import bind_node, signature_of
from mimo_spec.errors import ConfigError, ProblemCollector, did_you_mean
from mimo_spec.registry import resolve
from mimo_spec.spec import MimoSpec, ModuleSpec, from_config

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: Any, path: str = "dtype") -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ConfigError(f"unknown dtype {dtype!r}", path=path, hint=did_you_mean(str(dtype), DTYPES))


def _construct(spec: ModuleSpec, kind: str, allow: list[str], problems: ProblemCollector) -> nn.Module | None:
    """Build children first, then the node; constructor errors are attributed to the node's path."""
    cls = resolve(kind, spec.module, allow_imports=allow)
    _, sub_kinds, _ = signature_of(cls)
    kwargs: dict[str, Any] = dict(spec.params)
    failed = False
    for name, value in spec.submodules.items():
        from mimo_spec.builders.binding import _kind_for

        child_kind = _kind_for(name, sub_kinds.get(name))
        if isinstance(value, ModuleSpec):
            built: Any = _construct(value, child_kind, allow, problems)
            failed |= built is None
        elif isinstance(value, dict):
            built = {k: _construct(v, child_kind, allow, problems) for k, v in value.items()}
            failed |= any(b is None for b in built.values())
        else:
            built = [_construct(v, child_kind, allow, problems) for v in value]
            failed |= any(b is None for b in built)
        kwargs[name] = built
    if failed:
        return None
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        problems.add(spec.path, str(e), "fix the parameters of this node")
        return None


def build_module(spec: ModuleSpec | dict, *, kind: str = "encoder", allow_imports: list[str] = (),
                 device: Any = None) -> nn.Module:
    """Validate and build one component subtree (e.g. an encoder) from its spec."""
    if isinstance(spec, dict):
        problems = ProblemCollector()
        from mimo_spec.spec import _node_from

        node = _node_from(spec, kind, problems)
        problems.raise_if_any()
        spec = node
    problems = ProblemCollector()
    bind_node(spec, kind, list(allow_imports), problems)
    problems.raise_if_any()
    with torch.device(device) if device is not None else contextlib.nullcontext():
        module = _construct(spec, kind, list(allow_imports), problems)
    problems.raise_if_any()
    return module


def validate_spec(cfg: Any) -> MimoSpec:
    """Bind every node of a config's model tree; raise one ConfigError listing all problems."""
    spec = from_config(cfg)
    problems = ProblemCollector()
    bind_node(spec.language_model, "language_model", spec.allow_imports, problems)
    for m in spec.modalities.values():
        bind_node(m, "modality", spec.allow_imports, problems)
    problems.raise_if_any()
    return spec


def build_model(cfg: Any, *, device: Any = None, dtype: Any = None, seed: int | None = None):
    """Build a MimoModel from a DictConfig, dict, YAML path or MimoSpec.

    Everything is validated before any weight is allocated; ``device="meta"``
    allocates nothing. The same ``seed`` gives the same weights.
    """
    from mimo_spec.builders.checks import cross_check
    from mimo_spec.models.mimo import MimoModel

    spec = validate_spec(cfg)
    dtype = parse_dtype(dtype)
    problems = ProblemCollector()
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    on_meta = str(device) == "meta"
    with rng, _default_dtype(dtype), torch.device(device if device is not None else "cpu"), _skip_init(on_meta):
        if seed is not None:
            torch.manual_seed(seed)
        lm = _construct(spec.language_model, "language_model", spec.allow_imports, problems)
        mods = {name: _construct(m, "modality", spec.allow_imports, problems) for name, m in spec.modalities.items()}
        problems.raise_if_any()
        cross_check(spec, lm, mods)
        model = MimoModel(language_model=lm, modalities=mods)
    model.spec = spec
    apply_freeze(model, spec.freeze)
    return model


_INIT_FUNCS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
               "xavier_normal_", "zeros_", "ones_", "constant_", "orthogonal_")


@contextlib.contextmanager
def _skip_init(active: bool):
    """On the meta device there is nothing to initialise; skipping it also keeps
    ``action=summary`` fast (meta init goes through torch's reference kernels,
    which import the compiler stack)."""
    if not active:
        yield
        return
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCS}
    for name in _INIT_FUNCS:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype | None):
    if dtype is None:
        yield
        return
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def apply_freeze(model: nn.Module, patterns: list[str]) -> None:
    """Freeze every module whose dotted path matches one of ``patterns`` (fnmatch globs)."""
    if not patterns:
        return
    names = [n for n, _ in model.named_modules() if n]
    problems = ProblemCollector()
    for i, pattern in enumerate(patterns):
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            problems.add(f"freeze.{i}", f"{pattern!r} matches no module",
                         did_you_mean(pattern, [n for n in names if n.count(".") <= 3]))
        for name in hits:
            model.get_submodule(name).requires_grad_(False)
    problems.raise_if_any()
