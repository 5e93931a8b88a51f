"""DVC around the workflow: dvc.yaml runs Snakemake as one stage; `dvc repro` runs the shrunk demo,
a second `dvc repro` and a following `snakemake` do nothing; `dvc push` to a local remote, a git
clone and `dvc pull` restore data, models and results byte for byte with nothing to recompute; and
`dvc exp run -S` reruns only the jobs that read the changed setting.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from project import ROOT, Project

from iicrepro import layout

DVC_FOLDERS = ("data", "results")


def dvc_tracked(snapshot: dict[str, bytes]) -> dict[str, bytes]:
    """Files DVC versions: .dvcignore leaves out resume state, the retrieval feature cache and
    Snakemake's directory markers."""
    return {
        path: data
        for path, data in snapshot.items()
        if not {"ckpt", "features"} & set(Path(path).parts)
        and Path(path).name != ".snakemake_timestamp"
    }


def test_dvc_yaml_runs_the_snakemake_workflow_and_tracks_all_it_writes(tmp_path):
    """No second DAG: one stage runs Snakemake, and its outputs hold every file any job of any
    preset writes (from `snakemake --summary`)."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    (stage,) = dvc["stages"].values()
    assert stage["cmd"].split()[0] == "snakemake"
    assert {"Snakefile", "workflow/rules"} <= set(stage["deps"])
    assert stage["params"] == [{"params.yaml": None}]  # every knob
    outs = {next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]}
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    outs = {o.replace("${paths.data}", params["paths"]["data"]) for o in outs}
    outs = {o.replace("${paths.results}", params["paths"]["results"]) for o in outs}
    assert outs == {"data", "results", ".snakemake/metadata"}
    assert all(o[next(iter(o))]["persist"] for o in stage["outs"])  # Snakemake sees old results

    project = Project.create(tmp_path / "p", demo=None)
    for preset in params["presets"]:
        out = project.snakemake("--summary", "--config", f"preset={preset}", timeout=300).stdout
        files = [line.split("\t")[0] for line in out.splitlines()[1:] if "\t" in line]
        assert files and all(Path(f).parts[0] in outs for f in files), preset


@pytest.fixture(scope="module")
def repro(tmp_path_factory) -> tuple[Project, Path]:
    """The shrunk demo run by `dvc repro`, committed, with a local default remote."""
    root = tmp_path_factory.mktemp("dvc")
    project = Project.create(root / "project")
    remote = root / "remote"
    project.run("dvc", "remote", "add", "--default", "local", str(remote), timeout=60)
    start = time.monotonic()
    project.run("dvc", "repro", timeout=1500)
    print(f"dvc repro of the shrunk demo: {time.monotonic() - start:.0f} s")
    project.commit("dvc repro")
    return project, remote


@pytest.mark.slow
def test_repro_runs_the_demo_then_nothing(repro):
    project, _ = repro
    s = project.settings()
    assert project.path(layout.summary_md(s)).is_file()
    again = project.run("dvc", "repro", timeout=300).stdout
    assert "didn't change" in again and "Building DAG" not in again  # Snakemake not even started
    assert "Nothing to be done" in project.snakemake("-n", timeout=300).stdout
    assert "up to date" in project.run("dvc", "status", timeout=120).stdout


@pytest.mark.slow
def test_plots_show_the_report_figures(repro, tmp_path):
    project, _ = repro
    plots = json.loads(project.run("dvc", "plots", "show", "--json", "-o", tmp_path).stdout)
    assert "errors" not in plots
    pngs = {Path(p).name for p in project.path("results/plots").glob("*.png")}
    assert pngs and {Path(p).name for p in plots["data"]} == pngs


@pytest.mark.slow
def test_metrics_show_the_summary(repro):
    project, _ = repro
    shown = json.loads(project.run("dvc", "metrics", "show", "--json").stdout)
    assert "error" not in json.dumps(shown)
    metrics = shown[""]["data"]["results/summary.json"]["data"]
    assert metrics == json.loads(project.path("results/summary.json").read_text())


@pytest.fixture(scope="module")
def clone(repro, tmp_path_factory) -> Project:
    """A git clone of the project with `dvc pull` from the remote."""
    project, _ = repro
    project.run("dvc", "push", timeout=300)
    clone = Project(tmp_path_factory.mktemp("clone") / "project")
    project.run("git", "clone", "-q", project.root, clone.root, timeout=120)
    clone.run("dvc", "pull", timeout=300)
    return clone


@pytest.mark.slow
def test_clone_and_pull_restore_everything_with_nothing_to_recompute(repro, clone):
    project, _ = repro
    original = dvc_tracked(project.snapshot(*DVC_FOLDERS))
    restored = clone.snapshot(*DVC_FOLDERS)
    assert restored.keys() == original.keys()
    assert all(restored[k] == original[k] for k in original)  # models and results, byte for byte
    assert any(k.endswith("checkpoint.pt") for k in restored)
    assert "Nothing to be done" in clone.snakemake("-n", timeout=300).stdout
    assert "up to date" in clone.run("dvc", "status", timeout=120).stdout


@pytest.mark.slow
def test_experiment_reruns_only_what_the_setting_changes(clone):
    before = clone.snapshot(*DVC_FOLDERS)
    clone.run("dvc", "exp", "run", "-S", "presets.demo.retrieval.conv_pool=true", timeout=900)
    after = clone.snapshot(*DVC_FOLDERS)
    s = clone.settings()
    assert s.retrieval.conv_pool is True
    retrieved = list(clone.path(Path(s.paths.results) / "retrieval").rglob("metrics.json"))
    assert len(retrieved) == 3
    assert all(json.loads(p.read_text())["conv_pool"] is True for p in retrieved)
    unchanged = [
        k for k in before if "/pretrain/" in k or "/finetune/" in k or k.startswith("data/")
    ]
    assert unchanged and all(after[k] == before[k] for k in unchanged)
    assert after["results/summary.csv"] != before["results/summary.csv"]
    # the experiment is recorded on top of the committed baseline, with its setting
    shown = json.loads(clone.run("dvc", "exp", "show", "--json", timeout=120).stdout)
    (baseline,) = [rev for rev in shown if rev["name"] == "main"]
    (exp,) = [run["revs"][0] for run in baseline["experiments"]]
    presets = exp["data"]["params"]["params.yaml"]["data"]["presets"]
    assert presets["demo"]["retrieval"]["conv_pool"] is True


@pytest.mark.slow
def test_a_code_change_reaches_snakemake_which_decides(repro, tmp_path):
    """The stage depends on the package source: after an edit `dvc status` shows it changed, and
    `dvc repro` starts Snakemake, which reruns nothing for a comment (the stage stays a no-op)."""
    import shutil

    project = Project(tmp_path / "copy")
    shutil.copytree(repro[0].root, project.root, symlinks=True)
    assert "up to date" in project.run("dvc", "status", timeout=120).stdout
    module = project.path("src/iicrepro/method/memory_bank.py")
    module.write_text(module.read_text() + "\n# a comment only\n")
    status = project.run("dvc", "status", timeout=120).stdout
    assert "changed deps" in status and "src/iicrepro" in status, status
    before = dvc_tracked(project.snapshot(*DVC_FOLDERS))
    out = project.run("dvc", "repro", timeout=600)
    assert "Nothing to be done" in out.stdout + out.stderr  # Snakemake ran and had nothing to do
    assert dvc_tracked(project.snapshot(*DVC_FOLDERS)) == before
    assert "up to date" in project.run("dvc", "status", timeout=120).stdout
