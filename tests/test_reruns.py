"""Reruns follow results: after a finished (shrunk) demo, resource knobs plan nothing, a result
setting or a code change plans exactly the jobs it decides, a comment plans nothing, the report
flags results made by older code, `--touch` keeps them, and switching presets does the right jobs.

Real Snakemake on copies of the session's reference demo (tests/project.py).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from project import Project, reference_demo
from test_workflow import job_counts

from iicrepro import config, layout

NOTHING = "Nothing to be done"
# the pretraining run and everything that uses its models (the random init is its epoch-0 file)
PRETRAIN_AND_DOWNSTREAM = {
    "pretrain": 1, "retrieve": 2, "retrieve_bnrecal": 1, "finetune": 2, "report": 1, "all": 1,
    "total": 8,
}  # fmt: skip


def copy_of(ref: Project, folder: Path) -> Project:
    project = Project(folder)
    shutil.copytree(ref.root, project.root, symlinks=True)
    return project


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Project:
    """One copy of the finished demo that the tests below edit and restore in turn."""
    return copy_of(reference_demo(tmp_path_factory), tmp_path_factory.mktemp("reruns") / "p")


@contextmanager
def demo_preset_with(project: Project, overrides: dict) -> Iterator[None]:
    """params.yaml with `overrides` merged into the demo preset, restored afterwards."""
    path = project.path("params.yaml")
    original = path.read_text()
    raw = yaml.safe_load(original)
    raw["presets"]["demo"] = config.deep_merge(raw["presets"]["demo"], overrides)
    project.write_params(raw)
    try:
        yield
    finally:
        path.write_text(original)


@contextmanager
def edited(project: Project, module: str, text: str) -> Iterator[None]:
    """A package module of the project copy with `text` appended, restored afterwards."""
    path = project.path(Path("src/iicrepro") / module)
    original = path.read_text()
    path.write_text(original + text)
    try:
        yield
    finally:
        path.write_text(original)


def planned(project: Project, *args: str) -> dict:
    out = project.snakemake("-n", *args, timeout=300).stdout
    return {} if NOTHING in out else dict(job_counts(out))


RESOURCE_KNOBS = [
    {"pretrain": {"workers": 2}},
    {"pretrain": {"checkpoint_every": 5}},
    {"retrieval": {"workers": 2}},
    {"frames": {"workers": 1}},
    {"flow": {"workers": 4}},
    {"flow": {"threads": 2}},
    {"finetune": {"workers": 2}},
    {"finetune": {"checkpoint_every": 3}},
    {"tracking": {"enabled": True, "mlflow_uri": "http://127.0.0.1:5999"}},
    {"download": {"retries": 2, "timeout_s": 5}},
]


@pytest.mark.slow
def test_resource_knobs_plan_nothing(finished):
    assert planned(finished) == {}
    for knob in RESOURCE_KNOBS:
        with demo_preset_with(finished, knob):
            assert planned(finished) == {}, knob


@pytest.mark.slow
def test_a_result_setting_plans_exactly_its_jobs(finished):
    with demo_preset_with(finished, {"pretrain": {"nce": {"k": 16}}}):
        assert planned(finished) == PRETRAIN_AND_DOWNSTREAM  # nothing upstream
    with demo_preset_with(finished, {"retrieval": {"topk": [1, 5]}}):
        assert planned(finished) == {"retrieve": 2, "retrieve_bnrecal": 1, "report": 1,
                                     "all": 1, "total": 5}  # fmt: skip


@pytest.mark.slow
def test_code_changes_plan_exactly_the_jobs_that_run_the_code(finished):
    with edited(finished, "method/memory_bank.py", "\n\nNEW_CONSTANT = 1\n"):
        assert planned(finished) == PRETRAIN_AND_DOWNSTREAM  # nothing upstream of pretraining
    with edited(finished, "report.py", "\n\nNEW_CONSTANT = 1\n"):
        assert planned(finished) == {"report": 1, "all": 1, "total": 2}
    with (
        edited(finished, "method/memory_bank.py", "\n# a comment only\n"),
        edited(finished, "report.py", "\n\n# another comment\n"),
    ):
        assert planned(finished) == {}


@pytest.mark.slow
def test_report_flags_results_made_by_older_code(finished, tmp_path):
    project = copy_of(finished, tmp_path / "p")
    s = project.settings()
    summary = project.path(layout.summary_md(s))
    assert "## Stale results" not in summary.read_text()
    record = project.path(layout.pretrain_dir(s, "r3d", "residual", "repeat", 0) / "metrics.json")
    prov = json.loads(record.read_text())["provenance"]
    assert prov["step"] == "pretrain" and len(prov["code_fingerprint"]) == 16
    assert set(prov["libraries"]) == {"torch", "torchvision", "av", "opencv"}

    with edited(project, "method/memory_bank.py", "\n\nNEW_CONSTANT = 1\n"):
        project.run("iicrepro", "report", "--no-mlflow", timeout=300)
    md = summary.read_text()
    stale = md.split("## Stale results", 1)[1].split("\n## ", 1)[0]
    assert "r3d-residual-repeat-s0/metrics.json` (pretrain)" in stale
    # every evaluation uses a model of that pretraining run (the random init is its epoch 0)
    assert stale.count("(retrieval)") == 3 and stale.count("(finetune)") == 2
    assert "r3d residual · IIC repeat ⚠ stale" in md and "snakemake --cores N" in stale


@pytest.mark.slow
def test_touch_keeps_results_after_a_neutral_change(finished, tmp_path):
    project = copy_of(finished, tmp_path / "p")
    before = project.snapshot("results")
    with edited(project, "method/memory_bank.py", "\n\nNEUTRAL = 1\n"):
        assert planned(project) == PRETRAIN_AND_DOWNSTREAM
        assert planned(project, "--rerun-triggers", "mtime", "input", "code", "software-env") == {}
        project.snakemake("--touch", timeout=300)
        assert planned(project) == {}
    assert project.snapshot("results") == before  # same bytes: nothing was recomputed


@pytest.mark.slow
def test_presets_switch_cleanly(tmp_path_factory, tmp_path):
    """demo, then demo-flow, then demo: the data jobs are shared and never rerun, demo-flow makes
    its own summary, and returning to demo plans nothing."""
    project = copy_of(reference_demo(tmp_path_factory), tmp_path / "p")
    flow = ("--config", "preset=demo-flow")
    assert planned(project, *flow) == {
        "flow_chunk": 1, "flow": 1, "pretrain": 2, "retrieve": 4, "retrieve_bnrecal": 2,
        "finetune": 4, "report": 1, "all": 1, "total": 16,
    }  # fmt: skip
    project.snakemake(*flow, timeout=2400)
    s = config.load(project.path("params.yaml"), "demo-flow")
    assert project.path(layout.summary_md(s)).is_file()
    assert planned(project, *flow) == {}
    assert planned(project) == {}  # back to demo: nothing reruns
