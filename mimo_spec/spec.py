"""Specs: the typed tree a YAML config describes, before anything is built.

A ``ModuleSpec`` is one node of the one shape used everywhere::

    module: clip_vit                 # registry name, allowlisted dotted path, or a class
    params: {hidden_size: 1024}      # constructor arguments
    submodules: {...}                # named child specs (a spec, a dict of specs, or a list)

Every node remembers its config path (``modalities.images.submodules.encoders.clip``)
so errors can name it. ``MimoSpec`` is the whole model: the language model and the
modalities (how the model is laid out over processes is the run's business, not the
model's: :class:`mimo_spec.run_config.RunConfig` holds the ``parallel`` layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from mimo_spec.errors import ConfigError, ProblemCollector, did_you_mean

NODE_KEYS = ("module", "params", "submodules")
# Top-level keys that describe the model (dtype: the weights' when build_model is given none); the rest of a
# run config (action, train, data, parallel, hydra, ...) is ignored by from_config
MODEL_KEYS = ("model", "modalities", "freeze", "allow_imports", "backend", "adapters", "trainable", "dtype")

SubmoduleValue = Union["ModuleSpec", list["ModuleSpec"], dict[str, "ModuleSpec"]]


class Unresolved:
    """Stands in for a value whose ${...} interpolation failed (already reported)."""

    def __repr__(self) -> str:
        return "<unresolved>"


@dataclass
class ModuleSpec:
    """One component: what to build (``module``), with which arguments and children."""

    module: Any
    params: dict[str, Any] = field(default_factory=dict)
    submodules: dict[str, SubmoduleValue] = field(default_factory=dict)
    path: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        module = self.module
        if isinstance(module, type):
            module = f"{module.__module__}.{module.__qualname__}"
        out: dict[str, Any] = {"module": module}
        if self.params:
            out["params"] = dict(self.params)
        if self.submodules:
            out["submodules"] = {k: _sub_to_dict(v) for k, v in self.submodules.items()}
        return out

    def walk(self):
        """Yield every node of this subtree (self first)."""
        yield self
        for value in self.submodules.values():
            for child in _children(value):
                yield from child.walk()


def _children(value: SubmoduleValue) -> list[ModuleSpec]:
    if isinstance(value, ModuleSpec):
        return [value]
    if isinstance(value, dict):
        return list(value.values())
    return list(value)


def _sub_to_dict(value: SubmoduleValue) -> Any:
    if isinstance(value, ModuleSpec):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: v.to_dict() for k, v in value.items()}
    return [v.to_dict() for v in value]


@dataclass
class MimoSpec:
    """A whole multimodal model: language model and modalities."""

    language_model: ModuleSpec
    modalities: dict[str, ModuleSpec] = field(default_factory=dict)
    freeze: list[str] = field(default_factory=list)
    allow_imports: list[str] = field(default_factory=list)
    # default layer backend (local | te | auto) for every component that takes one and
    # does not set its own params.backend; None: each component's default
    backend: str | None = None
    # LoRA / DoRA adapter entries and the modules kept trainable beside them (checked by mimo_spec.peft)
    adapters: list[Any] = field(default_factory=list)
    trainable: list[str] = field(default_factory=list)
    # the config's top-level ``dtype`` (build_model's when it is given none); a run-level setting, so
    # not part of :meth:`to_dict`
    dtype: Any = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "model": self.language_model.to_dict(),
            "modalities": {k: v.to_dict() for k, v in self.modalities.items()},
            "freeze": list(self.freeze),
            "allow_imports": list(self.allow_imports),
            "backend": self.backend,
        }
        if self.adapters or self.trainable:
            out.update(adapters=list(self.adapters), trainable=list(self.trainable))
        return out

    def to_yaml(self) -> str:
        from omegaconf import OmegaConf

        return OmegaConf.to_yaml(OmegaConf.create(self.to_dict()))

    def nodes(self):
        """Every ModuleSpec in the tree, parents before children."""
        yield from self.language_model.walk()
        for spec in self.modalities.values():
            yield from spec.walk()


def _node_from(value: Any, path: str, problems: ProblemCollector) -> ModuleSpec | None:
    if isinstance(value, ModuleSpec):
        return value
    if not isinstance(value, dict):
        problems.add(path, f"expected a component node (a mapping with module/params/submodules), "
                           f"got {type(value).__name__} {value!r}",
                     "write it as {module: <name>, params: {...}}")
        return None
    unknown = [k for k in value if k not in NODE_KEYS]
    for key in unknown:
        problems.add(f"{path}.{key}", "unknown key in a component node", did_you_mean(key, NODE_KEYS))
    if "module" not in value or value["module"] in (None, ""):
        problems.add(f"{path}.module", "missing: every component node names its module",
                     "add module: <registry name>")
        return None
    params = value.get("params") or {}
    if not isinstance(params, dict):
        problems.add(f"{path}.params", f"expected a mapping of parameters, got {params!r}")
        params = {}
    subs_raw = value.get("submodules") or {}
    if not isinstance(subs_raw, dict):
        problems.add(f"{path}.submodules", f"expected a mapping of named children, got {subs_raw!r}")
        subs_raw = {}
    subs: dict[str, SubmoduleValue] = {}
    for name, sub in subs_raw.items():
        sub_path = f"{path}.submodules.{name}"
        if isinstance(sub, list):
            items = [_node_from(s, f"{sub_path}.{i}", problems) for i, s in enumerate(sub)]
            subs[name] = [s for s in items if s is not None]
        elif isinstance(sub, dict) and "module" not in sub and all(isinstance(v, dict) for v in sub.values()):
            items = {k: _node_from(s, f"{sub_path}.{k}", problems) for k, s in sub.items()}
            subs[name] = {k: s for k, s in items.items() if s is not None}
        elif sub is None:
            continue
        else:
            node = _node_from(sub, sub_path, problems)
            if node is not None:
                subs[name] = node
    return ModuleSpec(value["module"], dict(params), subs, path=path)


def load_config(cfg: Any, problems: ProblemCollector | None = None) -> dict[str, Any]:
    """A plain, resolved dict from a DictConfig, dict, YAML path or YAML text file.

    With ``problems``, failed interpolations are recorded there and their values
    become ``Unresolved`` so that the rest of the tree can still be checked.
    """
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(cfg, (str, Path)):
        path = Path(cfg)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}", path=str(path))
        cfg = load_yaml_file(path)
    if isinstance(cfg, dict):
        cfg = OmegaConf.create(cfg)
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"expected a DictConfig, dict, YAML path or MimoSpec, got {type(cfg).__name__}")
    from mimo_spec.safe_yaml import check_expansion

    # every route, not only YAML files: a dict or a checkpoint's recorded config (state.json) may hold a bomb
    check_expansion(OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False))
    cfg = cfg.copy()
    for _ in range(100):
        try:
            return _mark_unresolved(OmegaConf.to_container(cfg, resolve=True))
        except OmegaConfBaseException as e:
            key = str(getattr(e, "full_key", "") or "")
            msg = str(e).splitlines()[0]
            if problems is None or not key:
                raise ConfigError(msg, path=key, hint="check the ${...} interpolation") from None
            problems.add(key, msg, "check the ${...} interpolation")
            from omegaconf import open_dict

            with open_dict(cfg):
                OmegaConf.update(cfg, key, _UNRESOLVED, force_add=True)
    raise ConfigError("too many unresolved interpolations", path="config")


_UNRESOLVED = "\x00unresolved"


def _mark_unresolved(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _mark_unresolved(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_mark_unresolved(v) for v in data]
    return Unresolved() if data == _UNRESOLVED else data


def load_yaml_file(path: Path):
    """Load a YAML config file safely: no object construction, bounded size, depth and aliases
    (:mod:`mimo_spec.safe_yaml`); every fault names the file, line and column."""
    from mimo_spec.safe_yaml import load_yaml_file as load_checked

    return load_checked(path)


def from_config(cfg: Any, problems: ProblemCollector | None = None) -> MimoSpec:
    """Turn a composed config into a MimoSpec (shape only: no registry lookups yet).

    Problems raise a ConfigError, unless a ``problems`` collector is passed: then
    they are added to it and the (partial) spec is still returned.
    """
    if isinstance(cfg, MimoSpec):
        return cfg
    collect = problems is not None
    problems = problems if collect else ProblemCollector()
    data = load_config(cfg, problems)
    if "model" not in data or data["model"] is None:
        problems.add("model", "missing: the config must describe a language model",
                     "choose a preset, e.g. model=llama_tiny")
        raise ConfigError(problems.problems)
    lm = _node_from(data["model"], "model", problems)
    modalities: dict[str, ModuleSpec] = {}
    raw_mods = data.get("modalities") or {}
    if not isinstance(raw_mods, dict):
        problems.add("modalities", f"expected a mapping of modality name to node, got {raw_mods!r}")
        raw_mods = {}
    for name, node in raw_mods.items():
        spec = _node_from(node, f"modalities.{name}", problems)
        if spec is not None:
            modalities[name] = spec
    freeze = data.get("freeze") or []
    if isinstance(freeze, str):
        freeze = [freeze]
    if not isinstance(freeze, list) or not all(isinstance(f, str) for f in freeze):
        problems.add("freeze", f"expected a list of module path globs, got {freeze!r}",
                     "e.g. freeze: ['modalities.*.encoders.*']")
        freeze = []
    allow = data.get("allow_imports") or []
    if isinstance(allow, str):
        allow = [allow]
    if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
        problems.add("allow_imports", f"expected a list of module prefixes, got {allow!r}")
        allow = []
    backend = data.get("backend")
    if backend is not None and backend not in BACKENDS:
        problems.add("backend", f"unknown layer backend {backend!r}: expected one of {', '.join(BACKENDS)} (or null)",
                     did_you_mean(str(backend), BACKENDS))
        backend = None
    adapters = data.get("adapters") or []
    trainable = data.get("trainable") or []
    if isinstance(trainable, str):
        trainable = [trainable]
    for key in data:  # a misspelt model key would otherwise be skipped, and the model built without it
        near = None if key in MODEL_KEYS or key in RUN_KEYS else _near_miss(str(key))
        if near is not None:
            problems.add(str(key), f"unknown top-level key; the model is read from {near!r}", f"did you mean {near}?")
    if not collect or lm is None:
        problems.raise_if_any()
    return MimoSpec(lm, modalities, list(freeze), list(allow), backend,  # adapters: checked by mimo_spec.peft
                    adapters if isinstance(adapters, list) else [adapters],
                    trainable if isinstance(trainable, list) else [trainable], dtype=data.get("dtype"))


def _near_miss(key: str) -> str | None:
    """The model key ``key`` is a typo of (one letter added, dropped, changed, or two swapped: ``modalites``,
    ``freze``), or None. Stricter than a hint's match, since a user's own keys must pass: short keys
    (``mode``), a model key with a suffix or plural (``model_id``, ``models``) and other words (``trainer``)."""
    if len(key) < 5:
        return None
    for known in MODEL_KEYS:
        if key.startswith(known) and len(key) > len(known):  # model_id, models, dtypes: the user's own
            continue
        if _one_edit(key, known):
            return known
    return None


def _one_edit(a: str, b: str) -> bool:
    """``a`` and ``b`` differ by one inserted, deleted or replaced letter, or two adjacent letters swapped."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                  and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    short, long = (a, b) if len(a) < len(b) else (b, a)
    return any(long[:i] + long[i + 1:] == short for i in range(len(long)))


# the rest of a run's config (which build_model ignores): any other top-level key is the user's own (e.g. a
# value their YAML interpolates), unless it is a typo of a model key
RUN_KEYS = ("action", "world_size", "seed", "init_from", "debug", "summary", "data_scan", "eval", "generate",
            "import_hf", "sweep", "hydra", "train", "data", "parallel", "defaults", "preset")


BACKENDS = ("local", "te", "auto")
