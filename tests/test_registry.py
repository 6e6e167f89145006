"""Registry: built-ins known without imports, duplicates refused, plugins, allowlisted dotted paths."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch.nn as nn

from mimo_spec.errors import ConfigError
from mimo_spec.registry import BUILTINS, REGISTRIES, RegistryError, load_builtins, register, registry, resolve


def test_builtin_index_matches_decorators():
    load_builtins()
    for kind, entries in BUILTINS.items():
        for name, target in entries.items():
            cls = registry(kind).get(name)
            assert f"{cls.__module__}:{cls.__qualname__}" == target
            assert cls._registry_name == name


def test_builtins_known_without_importing_components():
    code = ("import sys; from mimo_spec.registry import registry; "
            "assert 'mimo_spec.components.vision.clip_vit' not in sys.modules; "
            "cls = registry('encoder').get('clip_vit'); print(cls.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ClipViT"


def test_unknown_name_lists_closest_match():
    with pytest.raises(RegistryError) as e:
        registry("encoder").get("clip_vt")
    assert "unknown encoder 'clip_vt'" in str(e.value)
    assert "did you mean clip_vit?" in str(e.value)
    with pytest.raises(RegistryError) as e:
        registry("projector").get("zzz")
    assert "available:" in str(e.value) and "mlp" in str(e.value)


def test_duplicate_names_are_refused():
    class A(nn.Module):
        pass

    class B(nn.Module):
        pass

    register("projector", "test_dup_a")(A)
    register("projector", "test_dup_a")(A)  # the same class again is fine
    with pytest.raises(RegistryError, match="duplicate name"):
        register("projector", "test_dup_a")(B)
    with pytest.raises(RegistryError, match="duplicate name.*MLPProjector|built-in projector"):
        register("projector", "mlp")(B)
    REGISTRIES["projector"]._entries.pop("test_dup_a")


def test_dotted_paths_need_the_allowlist():
    with pytest.raises(ConfigError) as e:
        resolve("encoder", "torch.nn.Identity")
    assert "not allowlisted" in str(e.value) and "allow_imports" in str(e.value)
    assert resolve("encoder", "torch.nn.Identity", allow_imports=["torch.nn"]) is nn.Identity
    with pytest.raises(ConfigError, match="not an nn.Module class"):
        resolve("encoder", "torch.nn.functional.relu", allow_imports=["torch."])
    for target in ("os.system", "subprocess.Popen", "builtins.eval"):
        with pytest.raises(ConfigError, match="refusing to import"):
            resolve("encoder", target, allow_imports=[target.split(".")[0], ""])


def test_plugins_register_through_entry_points(tmp_path):
    pkg = tmp_path / "my_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        from mimo_spec.registry import register

        @register("projector", "my_proj")
        class MyProj(nn.Module):
            '''A projector from a plugin.'''
            def __init__(self, in_features: int, out_features: int):
                super().__init__()
                self.in_features, self.out_features = in_features, out_features
                self.lin = nn.Linear(in_features, out_features)
            def tokens_out(self, t): return t
            def forward(self, x): return self.lin(x)
    """))
    dist = tmp_path / "my_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mimo_spec.plugins]\nmy_plugin = my_plugin\n")
    code = textwrap.dedent("""
        from mimo_spec.registry import registry
        cls = registry("projector").get("my_proj")
        print(cls.__module__, "my_proj" in registry("projector").names())
    """)
    env = {"PYTHONPATH": str(tmp_path)}
    import os
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["my_plugin", "True"]


def _plugin_dist(root, entry_points: str, modules: dict[str, str]):
    """A real installed distribution on ``root``: importlib.metadata finds its entry points there."""
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    dist = root / "broken_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mimo_spec.plugins]\n" + entry_points)


def test_a_broken_or_missing_plugin_is_a_config_error_naming_it(tmp_path):
    """Each kind of broken entry point (a module that is not there, one that raises on import, a
    callable that raises, a name that clashes with a built-in) is named, with its value and its
    package, in a config error: in the Python API and from the CLI (exit 2, no traceback)."""
    import os

    _plugin_dist(tmp_path, textwrap.dedent("""
        gone = no_such_plugin_module
        boom = boom_plugin
        calls = call_plugin:setup
        clash = clash_plugin
    """), {
        "boom_plugin": "raise RuntimeError('plugin import exploded')\n",
        "call_plugin": "def setup():\n    raise KeyError('missing thing')\n",
        "clash_plugin": """
            import torch.nn as nn
            from mimo_spec.registry import register

            @register("projector", "mlp")
            class NotTheMLP(nn.Module):
                pass
        """,
    })
    code = textwrap.dedent("""
        from mimo_spec.errors import ConfigError
        from mimo_spec.registry import registry
        assert registry("projector").get("mlp").__name__ == "MLPProjector"  # built-ins need no plugin
        for attempt in range(2):  # the failure stays reported, not only the first time
            try:
                registry("projector").get("my_proj")
            except ConfigError as e:
                print(type(e).__name__, len(e.problems))
                for p in e.problems:
                    print(p.path, "|", p.message, "|", p.hint)
            else:
                raise SystemExit("no error")
    """)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "RegistryError 4"
    by_path = {line.split(" | ")[0]: line for line in lines[1:5]}
    assert set(by_path) == {"plugins.gone", "plugins.boom", "plugins.calls", "plugins.clash"}
    assert "gone = no_such_plugin_module" in by_path["plugins.gone"]
    assert "ModuleNotFoundError" in by_path["plugins.gone"] and "broken-plugins" in by_path["plugins.gone"]
    assert "RuntimeError: plugin import exploded" in by_path["plugins.boom"]
    assert "calls = call_plugin:setup" in by_path["plugins.calls"] and "KeyError" in by_path["plugins.calls"]
    assert "duplicate name" in by_path["plugins.clash"]
    assert lines[5:] == lines[:5]

    # the CLI: a config naming a plugin component while a plugin is broken
    cli = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "cli.py"), "action=validate",
                          "modalities.images.submodules.input_projections.clip.module=my_proj", "modality=vision_clip"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert cli.returncode == 2, cli.stderr
    assert "Traceback" not in cli.stderr
    assert cli.stderr.startswith("mimo-spec: config error")
    for name, value in (("gone", "no_such_plugin_module"), ("boom", "boom_plugin"), ("calls", "call_plugin:setup")):
        assert f"plugin '{name}' (entry point {name} = {value}" in cli.stderr


def test_a_component_bug_keeps_its_traceback_and_a_refused_parameter_is_a_config_error(tmp_path, monkeypatch):
    """The line between a user mistake and a bug: a registered component refuses a parameter by raising
    ParamError (placed at <node>.params.<name>); anything else it raises (TypeError, ...) propagates as
    itself. A class imported through allow_imports is not mimo-spec's: its refusal is a config error at
    its node. A class a config cannot construct at all (a required parameter no YAML value can be) is
    named when binding."""
    from mimo_spec import build_model
    from mimo_spec.errors import ParamError

    from conftest import tiny_config

    class Refusing(nn.Module):
        def __init__(self, in_features: int, out_features: int, mode: str = "a"):
            super().__init__()
            if mode == "param":
                raise ParamError("mode", f"mode ({mode!r}) is not supported", "use mode: a")
            if mode == "bug":
                len(None)  # a TypeError: a bug in this component
            self.in_features, self.out_features = in_features, out_features
            self.lin = nn.Linear(in_features, out_features)

        def tokens_out(self, t):
            return t

        def forward(self, x):
            return self.lin(x)

    register("projector", "test_refusing")(Refusing)
    (tmp_path / "foreign_mod.py").write_text(textwrap.dedent("""
        import dataclasses
        import torch.nn as nn

        @dataclasses.dataclass
        class Settings:
            width: int = 4

        class Foreign(nn.Module):
            def __init__(self, in_features: int, out_features: int, mode: str = "a"):
                super().__init__()
                if mode != "a":
                    raise TypeError(f"unsupported mode {mode}")
                self.in_features, self.out_features = in_features, out_features
            def tokens_out(self, t):
                return t

        class NeedsObject(Foreign):
            def __init__(self, settings: Settings):
                super().__init__(4, 4)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    node = "modalities.images.submodules.input_projections.clip"

    def build(module, **params):
        cfg = tiny_config(allow_imports=["foreign_mod"])
        cfg["modalities"]["images"]["submodules"]["input_projections"]["clip"] = {
            "module": module, "params": {"in_features": 16, "out_features": 32, **params}}
        return build_model(cfg, device="meta")

    try:
        build("test_refusing")  # valid
        with pytest.raises(ConfigError) as e:
            build("test_refusing", mode="param")
        assert [(p.path, p.message, p.hint) for p in e.value.problems] == [
            (f"{node}.params.mode", "mode ('param') is not supported", "use mode: a")]
        with pytest.raises(TypeError, match="has no len"):
            build("test_refusing", mode="bug")
        with pytest.raises(ConfigError) as e:
            build("foreign_mod.Foreign", mode="b")
        assert [(p.path, p.message) for p in e.value.problems] == [
            (node, "foreign_mod.Foreign refused its parameters: TypeError: unsupported mode b")]
        with pytest.raises(ConfigError) as e:
            build("foreign_mod.NeedsObject")
        messages = {p.path: p.message for p in e.value.problems}
        assert messages[f"{node}.module"] == ("foreign_mod.NeedsObject cannot be built from a config: its "
                                              "constructor needs settings (Settings), which no config value can be")
    finally:
        REGISTRIES["projector"]._entries.pop("test_refusing", None)
