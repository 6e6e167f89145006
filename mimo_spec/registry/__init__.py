"""Component registries: one per kind, with built-ins known without importing them.

``@register("encoder", "clip_vit")`` sits on the class it names. The built-in
index below maps every shipped name to where it lives, so a lookup imports the
component on demand: a user never sees "X is not in the registry" because some
module was not imported. Third-party packages add components through the
entry-point group ``mimo_spec.plugins`` (each entry point is a module to import,
or a callable to call, that registers its components).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any, Callable, Iterable

from mimo_spec.errors import ConfigError, Problem, did_you_mean

KINDS = ("language_model", "encoder", "projector", "layout", "decoder", "tokenizer", "modality", "model")

# name -> "module:attribute" for every built-in component, per kind.
# tests/test_registry.py checks this index against the @register decorators.
BUILTINS: dict[str, dict[str, str]] = {
    "language_model": {
        "gpt": "mimo_spec.components.language.gpt:GPT",
    },
    "encoder": {
        "clip_vit": "mimo_spec.components.vision.clip_vit:ClipViT",
        "whisper_encoder": "mimo_spec.components.audio.whisper:WhisperEncoder",
        "siglip2_naflex": "mimo_spec.components.vision.siglip2:Siglip2NaFlex",
        "radio": "mimo_spec.components.vision.radio:RadioViT",
        "qwen_vit": "mimo_spec.components.vision.qwen_vit:QwenViT",
        "anyres": "mimo_spec.components.vision.anyres:AnyRes",
    },
    "projector": {
        "identity": "mimo_spec.components.projectors:IdentityProjector",
        "linear": "mimo_spec.components.projectors:LinearProjector",
        "mlp": "mimo_spec.components.projectors:MLPProjector",
        "pixel_shuffle_mlp": "mimo_spec.components.projectors:PixelShuffleMLPProjector",
        "patch_merger": "mimo_spec.components.vision.qwen_vit:PatchMerger",
        "avg_pool": "mimo_spec.components.pooling:AvgPoolProjector",
        "pool2d": "mimo_spec.components.pooling:Pool2dProjector",
        "embedding": "mimo_spec.components.embedding:EmbeddingProjector",
        "grid_position_embedding": "mimo_spec.components.grid_position:GridPositionEmbedding",
    },
    "layout": {
        "anyres_layout": "mimo_spec.components.vision.anyres:AnyResLayout",
    },
    # continuous decoders (LM hidden states -> items): none built in; generation goes through discrete tokenizers
    "decoder": {
    },
    # discrete tokenizers (VQ image tokenizers, neural audio codecs): items <-> codes
    "tokenizer": {
        "janus_vq": "mimo_spec.components.tokenizers.vq:JanusVQ",
        "chameleon_vq": "mimo_spec.components.tokenizers.vq:ChameleonVQ",
        "emu3_vq": "mimo_spec.components.tokenizers.vq:Emu3VQ",
        "encodec": "mimo_spec.components.tokenizers.codec:Encodec",
        "dac": "mimo_spec.components.tokenizers.codec:Dac",
        "mimi": "mimo_spec.components.tokenizers.codec:Mimi",
        "patch_palette": "mimo_spec.components.tokenizers.palette:PatchPalette",
    },
    "modality": {
        "modality": "mimo_spec.models.modality:Modality",
    },
    "model": {
        "mimo": "mimo_spec.models.mimo:MimoModel",
    },
}

PLUGIN_GROUP = "mimo_spec.plugins"

# Callables a config may never name, whatever the allowlist says.
DENIED_TARGETS = (
    "os.", "posix.", "nt.", "subprocess.", "builtins.", "__builtin__.", "sys.",
    "shutil.", "importlib.", "pickle.", "marshal.", "ctypes.", "socket.", "pty.",
    "runpy.", "code.", "codeop.", "multiprocessing.", "webbrowser.", "eval", "exec",
)


class RegistryError(ConfigError):
    """A registry lookup or registration failed."""


class Registry:
    """Names to component classes, for one kind."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, type] = {}

    def add(self, name: str, obj: type) -> None:
        builtin = BUILTINS.get(self.kind, {}).get(name)
        target = f"{obj.__module__}:{obj.__qualname__}"
        if name in self._entries and self._entries[name] is not obj:
            old = self._entries[name]
            raise RegistryError(Problem(
                f"registry.{self.kind}.{name}",
                f"duplicate name: already registered to {old.__module__}.{old.__qualname__}, "
                f"refusing {obj.__module__}.{obj.__qualname__}",
                "choose another name",
            ))
        if builtin is not None and builtin != target:
            raise RegistryError(Problem(
                f"registry.{self.kind}.{name}",
                f"duplicate name: {name!r} is a built-in {self.kind} ({builtin.replace(':', '.')}), "
                f"refusing {target.replace(':', '.')}",
                "choose another name",
            ))
        self._entries[name] = obj

    def names(self) -> list[str]:
        _load_plugins(strict=False)  # for listings and hints; a broken plugin is reported by get()
        return sorted(set(self._entries) | set(BUILTINS.get(self.kind, {})))

    def get(self, name: str) -> type:
        if name not in self._entries and name in BUILTINS.get(self.kind, {}):
            module, _, _attr = BUILTINS[self.kind][name].partition(":")
            importlib.import_module(module)
        if name not in self._entries:
            _load_plugins()
        if name not in self._entries:
            raise RegistryError(Problem(
                "", f"unknown {self.kind} {name!r}", did_you_mean(name, self.names())))
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self._entries or name in BUILTINS.get(self.kind, {})


REGISTRIES: dict[str, Registry] = {kind: Registry(kind) for kind in KINDS}


def registry(kind: str) -> Registry:
    """The registry of one kind (adding a new kind on first use)."""
    if kind not in REGISTRIES:
        REGISTRIES[kind] = Registry(kind)
    return REGISTRIES[kind]


def register(kind: str, name: str) -> Callable[[type], type]:
    """Class decorator: register ``cls`` under ``name`` in the ``kind`` registry."""

    def deco(cls: type) -> type:
        registry(kind).add(name, cls)
        cls._registry_name = name
        cls._registry_kind = kind
        return cls

    return deco


_plugins_loaded = False
_plugin_error: RegistryError | None = None


def _load_plugins(strict: bool = True) -> None:
    """Import (or call) every entry point of the ``mimo_spec.plugins`` group, once.

    A plugin that fails (a missing module, an import that raises, a callable that raises, a
    duplicate name) is a RegistryError naming the entry point, its value and its distribution,
    raised now and on every later lookup that needs plugins (``strict``); never a traceback.
    """
    global _plugins_loaded, _plugin_error
    if not _plugins_loaded:
        _plugins_loaded = True
        failures = []
        for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP):
            try:
                loaded = ep.load()
                if callable(loaded) and not isinstance(loaded, type):
                    loaded()
            except (Exception, SystemExit) as e:  # anything a third-party plugin does wrong
                failures.append(_plugin_failure(ep, e))
        if failures:
            _plugin_error = RegistryError(failures)
    if strict and _plugin_error is not None:
        raise _plugin_error


def _plugin_failure(ep: importlib.metadata.EntryPoint, e: Exception) -> Problem:
    dist = getattr(getattr(ep, "dist", None), "name", None)
    where = f"plugins.{ep.name}"
    what = (f"{type(e).__name__}: {e.problems[0].message}" if isinstance(e, ConfigError) and e.problems
            else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else '(no message)'}")
    return Problem(
        where, f"plugin {ep.name!r} (entry point {ep.name} = {ep.value} in group {PLUGIN_GROUP}"
        f"{f', from the {dist} package' if dist else ''}) failed to load: {what}",
        f"fix or uninstall {dist or 'the package that declares it'}")


def load_builtins() -> None:
    """Import every built-in component (for listing and for tests)."""
    for kind, entries in BUILTINS.items():
        for name in entries:
            registry(kind).get(name)
    _load_plugins()


def _is_denied(target: str) -> bool:
    return any(target == d or target.startswith(d) for d in DENIED_TARGETS) or target.split(".")[-1] in {
        "system", "popen", "Popen", "eval", "exec", "compile", "__import__", "spawn", "execv", "execve",
    }


def resolve(kind: str, name: Any, *, allow_imports: Iterable[str] = ()) -> type:
    """Find the class a spec's ``module`` names.

    ``name`` is a registry name, a class, or a dotted path ``pkg.mod.Class`` that
    is imported only when one of ``allow_imports`` is a prefix of it.
    """
    import torch.nn as nn

    if isinstance(name, type):
        return name
    if not isinstance(name, str) or not name:
        raise RegistryError(Problem("", f"expected a {kind} name (a string), got {name!r}",
                                    did_you_mean("", registry(kind).names())))
    reg = registry(kind)
    if name in reg or "." not in name:
        return reg.get(name)
    allowed = [p for p in allow_imports if name == p or name.startswith(p if p.endswith(".") else p + ".")]
    if not allowed:
        raise RegistryError(Problem(
            "", f"dotted path {name!r} is not a registered {kind} and its module is not allowlisted",
            f"add its package prefix to allow_imports, or use a registered name: "
            f"{', '.join(reg.names())}"))
    if _is_denied(name):
        raise RegistryError(Problem(
            "", f"refusing to import {name!r}: it is not a model component",
            "configs may only name nn.Module classes"))
    module, _, attr = name.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise RegistryError(Problem("", f"cannot import {name!r}: {e}", "check the dotted path")) from None
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise RegistryError(Problem(
            "", f"{name!r} is not an nn.Module class", "configs may only name nn.Module classes"))
    return obj
