"""Code fingerprints (iicrepro.fingerprint): each step's fingerprint follows its import closure, so an
edit changes exactly the steps that can run the edited code, and comments, docstrings and
formatting change nothing. Each case edits a copy of the package and computes the fingerprints in
a fresh interpreter, as the workflow does when it is parsed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from iicrepro import fingerprint

SRC = Path(fingerprint.__file__).resolve().parents[1]
WORKFLOW_STEPS = ("synthesize", "splits", "frames", "flow", "pretrain", "retrieve", "finetune",
                  "report")  # fmt: skip
PRINT = """
import json, time
start = time.process_time()
from iicrepro import fingerprint
prints = {s: fingerprint.of_step(s) for s in %r}
print(json.dumps({"prints": prints, "seconds": time.process_time() - start}))
"""


def fingerprints(src: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src))
    out = subprocess.run(
        [sys.executable, "-c", PRINT % (WORKFLOW_STEPS,)],
        env=env, capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    return json.loads(out)


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> tuple[Path, dict]:
    src = tmp_path_factory.mktemp("original") / "src"
    shutil.copytree(SRC, src, ignore=shutil.ignore_patterns("__pycache__"))
    return src, fingerprints(src)["prints"]


@pytest.fixture
def copy(original, tmp_path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(original[0], src)
    return src


def changed(original, src: Path) -> set[str]:
    now = fingerprints(src)["prints"]
    return {step for step in WORKFLOW_STEPS if now[step] != original[1][step]}


def edit(src: Path, module: str, old: str, new: str) -> None:
    path = src / module
    text = path.read_text()
    assert old in text, f"{old!r} not in {module}"
    path.write_text(text.replace(old, new, 1))


def test_every_step_fingerprint_in_well_under_a_second(original):
    timing = fingerprints(original[0])
    print(f"fingerprints of {len(WORKFLOW_STEPS)} steps: {timing['seconds']:.2f} s")
    assert timing["seconds"] < 1.0  # CPU time: the cores of a test machine are often shared
    assert len(set(timing["prints"].values())) == len(WORKFLOW_STEPS)


def test_comments_docstrings_and_formatting_change_nothing(original, copy):
    path = copy / "iicrepro" / "method" / "memory_bank.py"
    text = path.read_text()
    text = text.replace('"""', '"""A rewritten docstring. ', 1)  # the module docstring
    text = text.replace("\n\n\n", "\n\n\n# a new comment between definitions\n\n\n", 1)
    text = text.replace("import torch", "import torch  # a trailing comment", 1)
    path.write_text(text + "\n\n# a comment at the end\n")
    edit(copy, "iicrepro/report.py", "TOPK = [", "TOPK = [  # reformatted\n    ")
    assert changed(original, copy) == set()


def test_memory_bank_change_reaches_pretraining_only(original, copy):
    # appended code, as a fix pulled into the module would be
    path = copy / "iicrepro" / "method" / "memory_bank.py"
    path.write_text(path.read_text() + "\n\nNEW_CONSTANT = 1\n")
    assert changed(original, copy) == {"pretrain"}


def test_report_change_reaches_the_report_only(original, copy):
    edit(copy, "iicrepro/report.py", 'TOPK = ["top1"', 'TOPK = ["top1", "top2"')
    assert changed(original, copy) == {"report"}


def test_backbones_named_in_the_registry_count(original, copy):
    """models/__init__ imports backbones by their dotted name (a string): they are in the closure
    of every step that builds or loads a model."""
    path = copy / "iicrepro" / "models" / "r3d.py"
    path.write_text(path.read_text() + "\n\nEXTRA = 2\n")
    assert changed(original, copy) == {"pretrain", "retrieve", "finetune"}


def test_package_data_next_to_a_module_counts(original, copy):
    path = copy / "iicrepro" / "paper_results.csv"
    path.write_text(path.read_text() + path.read_text().splitlines()[-1] + "\n")
    assert changed(original, copy) == {"report"}


def test_a_moved_module_is_followed_by_its_imports(original, copy):
    """No list of modules: a new module imported by a relative import is part of the closure."""
    (copy / "iicrepro" / "method" / "newpart.py").write_text("SCALE = 1\n")
    edit(copy, "iicrepro/method/memory_bank.py", "\nimport ", "\nfrom . import newpart\nimport ")
    assert changed(original, copy) == {"pretrain"}
    before = fingerprints(copy)["prints"]
    (copy / "iicrepro" / "method" / "newpart.py").write_text("SCALE = 2\n")
    after = fingerprints(copy)["prints"]
    assert {s for s in WORKFLOW_STEPS if after[s] != before[s]} == {"pretrain"}


def test_tracking_and_the_entry_point_are_not_hashed(original, copy):
    for module in ("iicrepro/track.py", "iicrepro/cli.py"):
        path = copy / module
        path.write_text(path.read_text() + "\n\nUNUSED = 3\n")
    assert changed(original, copy) == set()
    assert "iicrepro.track" in fingerprint.closure("iicrepro.train.pretrain")


def test_closures_do_not_reach_upstream_steps():
    down = fingerprint.closure(fingerprint.step_module("pretrain"))
    assert "iicrepro.method.memory_bank" in down and "iicrepro.models.r3d" in down
    for step in ("synthesize", "splits", "frames", "flow", "report"):
        assert "iicrepro.method.memory_bank" not in fingerprint.closure(
            fingerprint.step_module(step)
        ), step
