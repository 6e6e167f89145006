"""build_module / build_model: the one path from a spec to an nn.Module."""

from __future__ import annotations

import contextlib
import fnmatch
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from mimo_spec.builders.binding import bind_node, signature_of
from mimo_spec.errors import ConfigError, ParamError, ProblemCollector, did_you_mean
from mimo_spec.registry import RegistryError, resolve
from mimo_spec.spec import MimoSpec, ModuleSpec, from_config

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: Any, path: str = "dtype") -> torch.dtype | None:
    if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
        raise ConfigError(f"expected a floating dtype for the weights, got {dtype}", path=path,
                          hint="use torch.float32, torch.bfloat16 or torch.float16")
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ConfigError(f"unknown dtype {dtype!r}", path=path, hint=did_you_mean(str(dtype), DTYPES))


def _construct(spec: ModuleSpec, kind: str, allow: list[str], problems: ProblemCollector,
               skip: set[str] = frozenset(), backend: str | None = None) -> nn.Module | None:
    """Build children first, then the node.

    A constructor reports a bad parameter only by raising ``ParamError``, placed at the node's config path;
    anything else a registered component raises (a TypeError included: binding has already matched the
    config's params to the signature) is a bug and propagates with its traceback.

    Nodes in ``skip`` (already reported as invalid) are not built. ``backend`` (the
    config's top-level ``backend``) goes to every node that takes one and sets none.
    """
    if spec.path in skip and not _has_buildable_child(spec, skip):
        return None
    try:
        cls = resolve(kind, spec.module, allow_imports=allow)
    except RegistryError:
        if spec.path in skip:  # already reported when binding; its children's kinds are unknown
            return None
        raise
    params, sub_kinds, _ = signature_of(cls)
    kwargs: dict[str, Any] = dict(spec.params)
    if backend is not None and "backend" in params and "backend" not in kwargs:
        kwargs["backend"] = backend
    failed = False
    for name, value in spec.submodules.items():
        from mimo_spec.builders.binding import _kind_for

        if name not in sub_kinds:  # not a submodule of this class: reported when binding
            failed = True
            continue
        child_kind = _kind_for(name, sub_kinds.get(name))
        if isinstance(value, ModuleSpec):
            built: Any = _construct(value, child_kind, allow, problems, skip, backend)
            failed |= built is None
        elif isinstance(value, dict):
            built = {k: _construct(v, child_kind, allow, problems, skip, backend) for k, v in value.items()}
            failed |= any(b is None for b in built.values())
        else:
            built = [_construct(v, child_kind, allow, problems, skip, backend) for v in value]
            failed |= any(b is None for b in built)
        kwargs[name] = built
    if failed or spec.path in skip:
        return None
    try:
        return cls(**kwargs)
    except ParamError as e:  # the component refusing one of its parameters: the user's to fix
        for problem in e.problems:
            path = _param_path(spec, params, problem.path)
            hint = problem.hint or f"change {path} ({_label(spec)}'s constructor refused it)"
            problems.add(path, problem.message, hint)
        return None
    except Exception as e:
        if _too_large_to_address(e):  # sizes whose product no 64-bit tensor size can hold
            problems.add(spec.path, f"{_label(spec)}'s parameters make a tensor too large to address: {e}",
                         f"lower the sizes in {spec.path}.params (each is at most 2**31 - 1, and their "
                         "products must stay far below 2**63 bytes)")
            return None
        if "_registry_name" in vars(cls):
            raise  # a registered component's own failure is a bug in it: keep the traceback
        # a class imported through allow_imports: not ours, it refused what the config gave it
        first = str(e).splitlines()[0] if str(e) else ""
        problems.add(spec.path, f"{spec.module} refused its parameters: {type(e).__name__}: {first}",
                     "check this node's params against the class's constructor")
        return None


def _too_large_to_address(e: Exception) -> bool:
    text = str(e)
    return isinstance(e, RuntimeError) and ("Storage size calculation overflowed" in text
                                            or "integer multiplication overflow" in text)


def _label(spec: ModuleSpec) -> str:
    return spec.module if isinstance(spec.module, str) else getattr(spec.module, "__name__", str(spec.module))


def _param_path(spec: ModuleSpec, params: dict, relative: str) -> str:
    """Where a constructor's ConfigError belongs: ``<node>.params.<name>`` for one of the node's
    parameters (``ParamError("num_heads", ...)``), else the node itself."""
    head = relative.split(".")[0]
    if head and (head in params or head in spec.params):
        return f"{spec.path}.params.{relative}"
    return spec.path


def _has_buildable_child(spec: ModuleSpec, skip: set[str]) -> bool:
    return any(node.path not in skip for node in spec.walk() if node is not spec)


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
    """Check the whole model tree (bindings, constructors, cross-checks) on the meta device.

    Raises one ConfigError listing every problem; returns the MimoSpec when valid.
    """
    return build_model(cfg, device="meta").spec


def _bind_all(spec: MimoSpec, problems: ProblemCollector) -> set[str]:
    failed: set[str] = set()
    bind_node(spec.language_model, "language_model", spec.allow_imports, problems, failed)
    for m in spec.modalities.values():
        bind_node(m, "modality", spec.allow_imports, problems, failed)
    return failed


def build_model(cfg: Any, *, device: Any = None, dtype: Any = None, seed: int | None = None,
                train: Any = None, world_size: int = 1, checks: Sequence[Callable[..., None]] = ()):
    """Build a MimoModel from a DictConfig, dict, YAML path or MimoSpec.

    Everything is validated before any weight is allocated; ``device="meta"``
    allocates nothing. The same ``seed`` gives the same weights on the same kind of device (they are
    drawn where they are built: a GPU's generator draws other values than the CPU's). On any other device the
    model is first sized on the meta device and refused (a ConfigError at ``model``) when
    its weights, plus for training (``train``: the train section, a TrainConfig) its gradients
    and optimizer state spread over ``world_size`` processes, cannot fit in the device's memory.

    Only the model sections of ``cfg`` are read (``model``, ``modalities``, ``freeze``,
    ``adapters``, ``trainable``, ``allow_imports``, ``backend``; adapters: :mod:`mimo_spec.peft`): the
    model knows nothing of processes or layouts.
    ``checks``: further checks ``check(spec, lm, modalities, problems)`` run on the modules built
    on the meta device, whose problems join the model's in one ConfigError (the app checks the
    parallel layout this way: :func:`mimo_spec.run_config.layout_check`).
    """
    from mimo_spec.builders.checks import cross_check
    from mimo_spec.models.mimo import MimoModel

    device = _check_device(device)
    _check_seed(seed)
    if device is None or device.type != "meta":
        # sized before any weight is allocated: the same model on the meta device costs nothing
        from mimo_spec.train.limits import check_model_memory

        meta = build_model(cfg, device="meta", dtype=dtype, checks=checks)
        check_model_memory(meta, device, train, world_size)
        cfg, checks = meta.spec, ()
    problems = ProblemCollector()
    if isinstance(cfg, MimoSpec):
        spec = cfg
    else:
        spec = from_config(cfg, problems)
    if dtype is None and spec is not None:  # none given: the config's own top-level dtype
        dtype = spec.dtype
    failed = _bind_all(spec, problems)
    backend = spec.backend
    if backend == "te":
        from mimo_spec.components.te_backend import te_unavailable_reason

        reason = te_unavailable_reason()
        if reason is not None:  # once here, not once per component
            problems.add("backend", f"backend 'te' cannot run here: {reason}", "use backend: local or auto")
            backend = None
    dtype = parse_dtype(dtype)
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    on_meta = str(device) == "meta" or bool(problems)
    with rng, _default_dtype(dtype), torch.device(device if device is not None else "cpu"), _skip_init(on_meta):
        if seed is not None:
            torch.manual_seed(seed)
        # with problems already found, build the valid parts on meta only, to cross-check them
        build_device = torch.device("meta") if problems else None
        with build_device or contextlib.nullcontext():
            lm = _construct(spec.language_model, "language_model", spec.allow_imports, problems, failed, backend)
            mods = {name: _construct(m, "modality", spec.allow_imports, problems, failed, backend)
                    for name, m in spec.modalities.items()}
        built = {k: v for k, v in mods.items() if v is not None}
        cross_check(spec, lm, built, problems)
        for check in checks:
            check(spec, lm, built, problems)
        problems.raise_if_any()
        model = MimoModel(language_model=lm, modalities=mods)
        model.spec = spec
        apply_freeze(model, spec.freeze)
        if spec.adapters or spec.trainable:  # seeded with the model: the same seed, the same adapters
            from mimo_spec.peft import add_adapters

            add_adapters(model, spec.adapters, spec.trainable)
    return model


SEED_LIMIT = 2**63


def _check_seed(seed: Any) -> None:
    if seed is None:
        return
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"expected an integer in [0, 2**63) or None, got {type(seed).__name__} {seed!r}",
                          path="seed", hint="pass seed=0 (or any integer below 2**63)")


def _check_device(device: Any) -> torch.device | None:
    """``device`` as a torch.device that exists on this machine (None stays None: the CPU)."""
    if device is None:
        return None
    hint = "use device='cpu', 'meta', or 'cuda'/'cuda:N' for a GPU this machine has"
    if not isinstance(device, (str, torch.device)) or isinstance(device, str) and not device.strip():
        raise ConfigError(f"expected a device name such as 'cpu' or 'cuda:0', got {type(device).__name__} "
                          f"{device!r}", path="device", hint=hint)
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"not a torch device: {device!r} ({str(e).splitlines()[0] if str(e) else e})",
                          path="device", hint=hint) from None
    if dev.type in ("cpu", "meta"):
        return dev
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {device!r}: CUDA is not available here", path="device", hint=hint)
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"device {device!r}: this machine has {count} GPU(s) (cuda:0..cuda:{count - 1})",
                              path="device", hint=hint)
        return dev
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if callable(available) and available():
        return dev
    raise ConfigError(f"device {device!r}: no {dev.type} device is available here", path="device", hint=hint)


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
