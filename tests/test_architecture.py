"""The shape of the package, checked from its source: no import cycle, each layer imports only
layers below it, every module says what it is for, and imports kept inside functions say why."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

import kvmksm

PACKAGE = Path(kvmksm.__file__).parent

# Lowest first. A module may import its own layer and those below, never one above.
LAYERS = [
    (
        "kvmksm",
        "kvmksm.errors",
        "kvmksm.units",
        "kvmksm.progress",
        "kvmksm.signals",
        "kvmksm.security",
        "kvmksm.guest",  # programs run inside guests: they import nothing of kvmksm
        # Ansible's callback plugin of kvmksm fleet: package data Ansible loads; no kvmksm import
        "kvmksm.fleet",
    ),
    ("kvmksm.host",),
    ("kvmksm.scenario",),
    ("kvmksm.results",),
    ("kvmksm.analysis",),
    ("kvmksm.virt", "kvmksm.sampling"),
    ("kvmksm.workloads",),
    ("kvmksm.commands",),
    ("kvmksm.views",),
    ("kvmksm.cli", "kvmksm.__main__"),
]
# cli imports each command's modules inside the command (its docstring says why): start-up.
LAZY_BY_DESIGN = {"kvmksm.cli"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, ast.stmt, bool]]:
    """(imported kvmksm module, the statement, whether it sits inside a function)."""
    tree = ast.parse(path.read_text())
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            inside |= {id(n) for n in ast.walk(node) if n is not node}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from kvmksm.views import charts` imports the module kvmksm.views.charts
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                for a in node.names
            ]
        for name in names:
            if name == "kvmksm" or name.startswith("kvmksm."):
                found.append((name, node, id(node) in inside))
    return found


def graph() -> dict[str, set[str]]:
    """{module: the kvmksm modules it imports}."""
    return {name: {t for t, _, _ in imports(path) if t != name} for name, path in MODULES.items()}


def cycle(g: dict[str, set[str]]) -> list[str] | None:
    """A cycle of imports, or None (graphlib finds one when it cannot order the modules)."""
    try:
        graphlib.TopologicalSorter(g).prepare()
    except graphlib.CycleError as e:
        return list(e.args[1])
    return None


def layer_of(name: str) -> int:
    best = (-1, -1)  # (length of the matching prefix, layer)
    for i, members in enumerate(LAYERS):
        for prefix in members:
            if name == prefix or (prefix != "kvmksm" and name.startswith(prefix + ".")):
                best = max(best, (len(prefix), i))
    assert best[1] >= 0, f"{name} is in no layer: add it to LAYERS"
    return best[1]


def test_no_import_cycle() -> None:
    assert cycle(graph()) is None


def test_layers_import_only_downwards() -> None:
    wrong = [
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
        for a, targets in graph().items()
        for b in sorted(targets)
        if layer_of(b) > layer_of(a)
    ]
    assert wrong == []


def test_cycle_detection_would_catch_one() -> None:
    """The check itself: a back edge like the old compare <-> experiment one is a cycle."""
    g = graph()
    g["kvmksm.analysis.stats"].add("kvmksm.commands.compare")
    found = cycle(g)
    assert found is not None and "kvmksm.commands.compare" in found


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_says_what_it_is_for(name: str) -> None:
    tree = ast.parse(MODULES[name].read_text())
    doc = ast.get_docstring(tree)
    if MODULES[name].name == "__main__.py":
        return
    assert doc and len(doc.split()) >= 5, f"{name}: no docstring saying what it is for"


def test_imports_inside_functions_say_why() -> None:
    """Imports belong at the top of a file; one kept inside a function (libvirt, an optional
    extra; start-up time) has a comment on it or just above it saying why."""
    silent = []
    for name, path in MODULES.items():
        if name in LAZY_BY_DESIGN:
            continue
        lines = path.read_text().splitlines()
        for target, node, inside in imports(path):
            if inside and not any("#" in ln for ln in lines[node.lineno - 4 : node.lineno]):
                silent.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {target}")
    assert silent == []
