"""Registry: built-ins known without imports, duplicates refused, plugins, allowlisted dotted paths."""

import subprocess
import sys
import textwrap

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
