"""The package's import structure: no cycles, model code free of the run machinery, packaging complete.

Every import counts, at module level or inside a function: a lazy import still ties two
modules together. ``from pkg import sub`` is an edge to the module ``pkg.sub``; taking a name
that ``pkg/__init__.py`` defines is an edge to ``pkg``, also from inside ``pkg``.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mimo_spec"
# model code (what build_model constructs) must not know about processes, configs or training
MODEL_CODE = ("mimo_spec.models", "mimo_spec.components")
RUN_MACHINERY = ("mimo_spec.parallel", "mimo_spec.train", "mimo_spec.config", "mimo_spec.run_config",
                 "mimo_spec.app", "mimo_spec.jobs", "mimo_spec.sweep", "mimo_spec.hydra_guard")


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the mimo_spec modules it imports (anywhere in its code)."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                # `from pkg import sub` imports pkg.sub when it is a module, else a name of pkg
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for name in names:
                target = resolve(name) if name.startswith("mimo_spec") else None
                if target and target != m:
                    graph[m].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_model_code_does_not_import_the_run_machinery():
    graph = import_graph()
    bad = {m: sorted(t for t in targets if t.startswith(RUN_MACHINERY))
           for m, targets in graph.items() if m.startswith(MODEL_CODE)}
    bad = {m: t for m, t in bad.items() if t}
    assert not bad, f"model code importing parallel/train/config modules: {bad}"


def test_pyproject_lists_every_package_and_ships_the_config_tree():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(project["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert on_disk <= listed, f"packages missing from pyproject.toml: {sorted(on_disk - listed)}"
    assert project["package-dir"]["mimo_spec.conf"] == "conf" and (ROOT / "conf" / "config.yaml").is_file()
    assert not (PACKAGE / "conf").exists(), "one copy of the config tree: conf/ at the repository root"
    from mimo_spec.config import CONF_DIR

    assert CONF_DIR == ROOT / "conf"
