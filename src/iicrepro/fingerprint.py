"""Code fingerprints: which version of the package's code a step's result was computed with.

A step's fingerprint hashes the source of every package module the step can run: its module (the
one `iicrepro <step>` dispatches to) and every `iicrepro` module that one imports, directly or
through others, at module level or inside functions (its import closure, found statically with
`ast`, so nothing is imported). Package `__init__` modules count for the modules below them (Python
runs them on import), and so do the data files a module names next to it (`paper_results.csv`).

The source is normalised before hashing: the hash is of the syntax tree without docstrings, so a
comment, a docstring or a reformatting changes no fingerprint, and a change of code does. Fields
that are empty or unset are left out of the tree's text, so the same source gives the same
fingerprint on every Python version that parses it alike.

The modules in `NOT_HASHED` are followed (their imports count) but their own text is not hashed:
it never changes a result, and it changes whenever a step, a knob or a tracking feature is added.

The workflow computes every step's fingerprint once when it is parsed (a rerun trigger of each
rule, see workflow/rules/common.smk); the steps record theirs in the provenance of their
metrics.json (`io.provenance`), and `iicrepro report` flags results made by other code.
"""

from __future__ import annotations

import ast
import hashlib
import re
from functools import cache
from pathlib import Path

PACKAGE = "iicrepro"
ROOT = Path(__file__).resolve().parent
ENTRY_POINT = "iicrepro.cli"
NOT_HASHED = {
    ENTRY_POINT: "the table of steps and their options",
    "iicrepro.track": "the MLflow mirror of results that the steps write to files first",
    "iicrepro.steps": "the settings it lists are compared themselves, as rerun params",
    "iicrepro.fingerprint": "the fingerprints it computes are compared themselves",
}
DATA_FILE = re.compile(r"[\w-]+\.\w+")  # a file name next to the module, e.g. paper_results.csv


@cache
def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> source file."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _parents(name: str) -> list[str]:
    """'iicrepro.data.frames' -> ['iicrepro', 'iicrepro.data']."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@cache
def _scan(name: str) -> tuple[frozenset[str], str]:
    """One pass over a module's syntax tree: the package modules it names, and the hash of its
    normalised source plus the package data files it names."""
    path = modules()[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    strings: list[str] = []
    text = _text(ast.parse(path.read_bytes(), filename=str(path)), package, names, strings)
    h = hashlib.sha256(text.encode())
    for value in strings:
        if name not in NOT_HASHED and value.startswith(f"{PACKAGE}."):
            names.add(value)  # a registry naming a module, e.g. the backbone table
        elif DATA_FILE.fullmatch(value) and not value.endswith(".py"):
            data = path.parent / value
            if data.is_file():
                h.update(value.encode() + b"\0" + data.read_bytes())
    known = modules()
    found = set()
    for n in names:
        if n in known:
            found.add(n)
            found.update(p for p in _parents(n) if p in known)
    found.discard(name)
    return frozenset(found), h.hexdigest()


_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _is_docstring(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


def _text(node, package: str, names: set[str], strings: list[str]) -> str:
    """The tree as text: node types and their set fields; no positions, no docstrings, no empty
    fields. Collects imported module names into `names` and string constants into `strings`."""
    if isinstance(node, list):
        return "[" + ",".join([_text(v, package, names, strings) for v in node]) + "]"
    if not isinstance(node, ast.AST):
        if isinstance(node, str):
            strings.append(node)
        return repr(node)
    if isinstance(node, ast.Import):
        names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from . import x, from ..data import y
            up = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            base = f"{up}.{base}" if base else up
        names.add(base)
        names.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
    fields = []
    for field in node._fields:
        value = getattr(node, field, None)
        if field == "body" and isinstance(node, _DOCUMENTED) and value and _is_docstring(value[0]):
            value = value[1:] or [ast.Pass()]
        if value is None or (isinstance(value, list) and not value):
            continue
        fields.append(f"{field}={_text(value, package, names, strings)}")
    return f"{type(node).__name__}({','.join(fields)})"


def imported(name: str) -> frozenset[str]:
    """Package modules that module `name` names anywhere in its source (not transitively): import
    statements at any depth, `importlib.import_module("iicrepro...")`, and strings holding a
    module's dotted name (registries such as the backbone table). In the modules of `NOT_HASHED`
    only imports count: the entry point's table of steps names every step, and `iicrepro <step>`
    runs one of them."""
    return _scan(name)[0]


def closure(name: str) -> set[str]:
    """Module `name`, its parent packages and every package module reachable by imports."""
    known = modules()
    if name not in known:
        raise KeyError(f"{name} is not a module of {PACKAGE} ({ROOT})")
    todo = [name, *(p for p in _parents(name) if p in known)]
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(imported(module) - seen)
    return seen


def of_module(name: str) -> str:
    """Fingerprint of a module's import closure (16 hex digits)."""
    h = hashlib.sha256()
    for module in sorted(closure(name) - NOT_HASHED.keys()):
        h.update(f"{module}:{_scan(module)[1]}\n".encode())
    return h.hexdigest()[:16]


def step_module(step: str) -> str:
    """The module that `iicrepro <step>` runs."""
    from iicrepro.cli import STEPS

    if step not in STEPS:
        raise KeyError(f"unknown step {step!r}; steps: {', '.join(STEPS)}")
    return STEPS[step][0]


def of_step(step: str) -> str:
    """Fingerprint of the code `iicrepro <step>` runs."""
    return of_module(step_module(step))
