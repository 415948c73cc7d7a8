"""Layering: imports point one way, data < models < theory < inference < protocols/cli.

Two checks anyone can run (``pytest tests/test_layering.py``):

- in a fresh interpreter, importing a subpackage and every one of its modules puts nothing of
  the layers above it into ``sys.modules``;
- statically (``ast`` over the sources, imports inside functions included, since a lazy import
  is still an arrow): no module imports a layer above its own, the subpackages import each other
  without cycles, and no two modules of one subpackage import each other (no cycle of any length).
"""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "perturbax"

# subpackage -> the perturbax subpackages it must never load or import
FORBIDDEN = {
    "data": {"models", "theory", "inference", "metrics", "baselines", "protocols", "plotting", "cli"},
    "models": {"theory", "inference", "protocols", "cli"},
    "theory": {"inference", "protocols", "cli"},
}


def _loaded_after_import(package: str) -> list[str]:
    """perturbax modules in ``sys.modules`` after importing ``package`` and all its modules in a
    fresh interpreter."""
    code = (
        "import importlib, json, pkgutil, sys\n"
        f"pkg = importlib.import_module({package!r})\n"
        "for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(json.dumps(sorted(k for k in sys.modules if k.startswith('perturbax'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"PYTHONPATH": str(SRC), "PATH": "", "JAX_PLATFORMS": "cpu"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_importing_a_layer_loads_nothing_above_it(layer):
    loaded = _loaded_after_import(f"perturbax.{layer}")
    above = sorted(m for m in loaded if m.count(".") >= 1 and m.split(".")[1] in FORBIDDEN[layer])
    assert not above, f"importing perturbax.{layer} loads {above}"
    if layer == "data":
        others = sorted(m for m in loaded if m != "perturbax" and not m.startswith("perturbax.data"))
        assert not others, f"importing perturbax.data loads {others}"


# --------------------------------------------------------------------------- static graph
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache
def _import_graph() -> dict[str, set[str]]:
    """perturbax module -> the perturbax modules it imports (at any depth of the file)."""
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for a in node.names:  # `from pkg import module` imports the module
                    targets.add(f"{module}.{a.name}" if f"{module}.{a.name}" in files else module)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_a_layer_above_it():
    bad = sorted(
        f"{m} -> {t}"
        for m, targets in _import_graph().items()
        for t in targets
        if _layer(m) in FORBIDDEN and _layer(t) in FORBIDDEN[_layer(m)]
    )
    assert not bad, "upward imports: " + "; ".join(bad)


def test_subpackages_import_each_other_without_cycles():
    graph: dict[str, set[str]] = {}
    for m, targets in _import_graph().items():
        if _layer(m) is not None:
            graph.setdefault(_layer(m), set()).update(
                _layer(t) for t in targets if _layer(t) not in (None, _layer(m))
            )
    assert not _cycles(graph), f"subpackages in an import cycle: {_cycles(graph)}"


def test_no_import_cycle_within_a_subpackage():
    graph = _import_graph()
    within = {m: {t for t in ts if _layer(t) == _layer(m)} for m, ts in graph.items() if _layer(m)}
    cycles = _cycles(within)
    assert not cycles, f"modules that import each other: {cycles}"


def test_the_checks_see_a_cycle_and_an_upward_import():
    """The graph helpers find what they are meant to find (so a pass means something)."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    graph = _import_graph()
    assert "perturbax.inference.fitting" in graph["perturbax.inference"]
    assert "perturbax.data.core" in graph["perturbax.inference.fitting"]
