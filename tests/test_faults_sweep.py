"""The fault sweep (scripts/faults.py) names real tests and never hides one it cannot find."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _faults():
    if "faults" not in sys.modules:  # registered before it runs: dataclasses look it up by name
        spec = importlib.util.spec_from_file_location("faults", ROOT / "scripts" / "faults.py")
        sys.modules["faults"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["faults"])
    return sys.modules["faults"]


def test_every_pattern_of_every_case_names_a_collected_test():
    faults = _faults()
    files = sorted({p.split("::")[0] for c in faults.CASES for p in c.patterns})
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    nodeids = [line for line in out.splitlines() if "::" in line]
    assert len(nodeids) > 100
    lost = {c.name: faults.unmatched(c.patterns, nodeids) for c in faults.CASES}
    assert {name: pats for name, pats in lost.items() if pats} == {}


def test_a_pattern_that_matches_nothing_is_reported_not_counted():
    faults = _faults()
    case = faults.Case("c", "e", ["tests/a.py::test_kept", "tests/a.py::test_renamed"])
    case.results = [("tests/a.py::test_kept", "passed", "", [])]
    text = faults.observed(case)
    assert text.startswith("**NOT CHECKED**") and "`tests/a.py::test_renamed`" in text
    case.patterns = case.patterns[:1]
    assert faults.observed(case).startswith("as expected (1 of 1 tests pass)")
    case.results = []
    assert faults.observed(case) == "**NOT CHECKED**: no test matches `tests/a.py::test_kept`"
