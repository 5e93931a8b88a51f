"""Package structure: no package of iicrepro imports a package that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "iicrepro"


def unit(path: Path) -> str:
    """The top-level part of iicrepro a file belongs to: its package, or the module itself."""
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_units(path: Path) -> set[str]:
    """Top-level parts of iicrepro a file imports, wherever the import statement stands."""
    units = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from iicrepro import layout` names a module in the import list
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "iicrepro" and len(parts) > 1:
                units.add(parts[1])
    return units


def graph() -> dict[str, set[str]]:
    known = {unit(p) for p in SRC.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        src = unit(path)
        edges.setdefault(src, set()).update(u for u in imported_units(path) & known if u != src)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of units (Tarjan), sorted."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


# `cli` is the entry point: every step's `main` reads its settings through it, and it imports the
# steps only by name (importlib), so it is not a package the steps depend on.
ENTRY = "cli"


def test_no_import_cycle_between_packages():
    edges = {u: deps - {ENTRY} for u, deps in graph().items()}
    assert cycles(edges) == [], "packages that import each other (move the shared code down)"


def test_cycle_detection_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("step", ["train", "evaluate"])
def test_training_and_evaluation_take_their_data_from_the_data_package(step):
    assert "data" in graph()[step]
