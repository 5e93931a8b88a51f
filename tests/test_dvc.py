"""DVC around the workflow: dvc.yaml runs Snakemake as one stage; `.venv/bin/dvc repro` (no activated
virtual environment) runs the shrunk demo, a second `dvc repro` and a following `snakemake` do
nothing; `dvc metrics` / `dvc plots` read each preset's headline numbers and curves; `dvc push` to a
local remote, a git clone and `dvc pull` restore data, models and results byte for byte with nothing
to recompute; `dvc exp run -S` reruns only the jobs that read the changed setting, keeps the presets'
`extends:` and `dvc exp show --only-changed` fits a 120-column terminal.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml
from project import ROOT, Project

from iicrepro import config, layout

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


@pytest.mark.slow  # a DVC / Snakemake / MLflow round trip
def test_dvc_yaml_runs_the_snakemake_workflow_and_tracks_all_it_writes(tmp_path):
    """No second DAG: one stage runs Snakemake, and its outputs hold every file any job of any
    preset writes (from `snakemake --summary`)."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    (stage,) = dvc["stages"].values()
    # the project's .venv on PATH whether or not it is activated
    assert stage["cmd"].split()[:2] == ["scripts/with-venv", "snakemake"]
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


def test_dvc_yaml_lists_every_presets_metrics_and_curves():
    """dvc.yaml's metrics and plots are each preset's `layout.headline` and `layout.curves`
    (a preset added to params.yaml must be added here too)."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    plots = {next(iter(p)): p[next(iter(p))] for p in dvc["plots"] if isinstance(p, dict)}
    for preset in raw["presets"]:
        s = config.resolve(raw, preset)
        assert str(layout.headline(s)) in dvc["metrics"], preset
        curves = layout.curves(s)
        assert plots[str(curves / "pretrain")] == {"x": "epoch", "y": "loss",
                                                   "title": "pretraining loss"}  # fmt: skip
        assert plots[str(curves / "retrieval")]["x"] == "k"
        if s.finetune.datasets:
            assert plots[str(curves / "finetune")]["x"] == "epoch"


@pytest.mark.slow  # a DVC / Snakemake / MLflow round trip
def test_exp_run_set_keeps_presets_extending_each_other(tmp_path):
    """`dvc exp run -S` rewrites params.yaml; presets written with `extends:` keep their meaning
    (demo-flow still follows demo). A one-stage project reading the real params.yaml."""
    project = Project(tmp_path / "p")
    project.root.mkdir()
    shutil.copy(ROOT / "params.yaml", project.path("params.yaml"))
    project.path("dvc.yaml").write_text(
        "stages:\n  echo:\n    cmd: echo ok > out.txt\n    params:\n      - params.yaml:\n"
        "    outs:\n      - out.txt\n"
    )
    project.git("init", "-q", "-b", "main")
    project.run("dvc", "init", "-q", timeout=60)
    project.run("dvc", "config", "core.analytics", "false", timeout=60)
    project.commit("params")
    project.run("dvc", "exp", "run", "-S", "presets.demo.pretrain.epochs=7", timeout=300)
    raw = yaml.safe_load(project.path("params.yaml").read_text())
    assert raw["presets"]["demo"]["pretrain"]["epochs"] == 7
    assert raw["presets"]["demo-flow"]["extends"] == "demo"
    flow = config.load(project.path("params.yaml"), "demo-flow")
    assert flow.pretrain.epochs == 7 and flow.pretrain.views == ["u", "v"]
    assert "&" not in project.path("params.yaml").read_text().split("presets:")[1]


@pytest.fixture(scope="module")
def repro(tmp_path_factory) -> tuple[Project, Path]:
    """The shrunk demo run by `.venv/bin/dvc repro` as the README says, with no virtual environment
    on PATH; committed, with a local default remote."""
    root = tmp_path_factory.mktemp("dvc")
    project = Project.create(root / "project")
    (project.root / ".venv").symlink_to(ROOT / ".venv")  # a fresh clone after `make venv`
    remote = root / "remote"
    project.run("dvc", "remote", "add", "--default", "local", str(remote), timeout=60)
    start = time.monotonic()
    bare = project.env(PATH="/usr/bin:/bin")
    bare.pop("VIRTUAL_ENV", None)
    project.run(".venv/bin/dvc", "repro", timeout=1500, env=bare)
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


def not_run_yet(entries: list, project: Project) -> set[str]:
    """dvc.yaml's metrics / plots paths of presets that have not run in `project`."""
    paths = {e if isinstance(e, str) else next(iter(e)) for e in entries}
    return {p for p in paths if not project.path(p).exists()}


@pytest.mark.slow
def test_plots_show_the_figures_and_the_curves(repro, tmp_path):
    project, _ = repro
    dvc = yaml.safe_load(project.path("dvc.yaml").read_text())
    plots = json.loads(project.run("dvc", "plots", "show", "--json", "-o", tmp_path).stdout)
    absent = not_run_yet(dvc["plots"], project)
    assert {e["name"] for e in plots.get("errors", [])} == absent  # only presets not run yet
    shown = {Path(p).relative_to("results").as_posix() for p in plots["data"]}
    pngs = {p.relative_to(project.path("results")).as_posix()
            for p in project.path("results/plots").glob("*.png")}  # fmt: skip
    curves = {"curves/pretrain/synthetic_r3d-residual-repeat-s0.csv",
              "curves/retrieval/synthetic_r3d-residual-repeat-s0.csv",
              "curves/retrieval/synthetic_r3d-residual-random-s0-bnrecal.csv",
              "curves/finetune/synthetic_split1_r3d-residual-random-s0.csv"}  # fmt: skip
    assert pngs and pngs | curves <= shown
    loss = plots["data"]["results/curves/pretrain/synthetic_r3d-residual-repeat-s0.csv"][0]
    assert loss["content"]["encoding"]["x"]["field"] == "epoch"  # x / y from dvc.yaml
    assert [int(v["epoch"]) for v in loss["content"]["data"]["values"]] == [1, 2]


@pytest.mark.slow
def test_metrics_show_the_presets_headline_numbers(repro):
    project, _ = repro
    dvc = yaml.safe_load(project.path("dvc.yaml").read_text())
    shown = json.loads(project.run("dvc", "metrics", "show", "--json").stdout)[""]["data"]
    assert {p for p, v in shown.items() if "error" in v} == not_run_yet(dvc["metrics"], project)
    metrics = shown["results/metrics-demo.json"]["data"]
    assert metrics == json.loads(project.path("results/metrics-demo.json").read_text())
    assert metrics.keys() == {"top1", "ft"}
    assert metrics["top1"].keys() == {"iic", "rand"} and metrics["ft"].keys() == {"iic", "rand"}


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

    # `dvc exp show --only-changed` in a 120-column terminal: every line fits, and the headline
    # numbers it changed and the changed setting are shown, not collapsed into "…"
    table = clone.run(
        "dvc", "exp", "show", "--only-changed", "--no-pager", timeout=120,
        env=clone.env(COLUMNS="120", LINES="50"),
    ).stdout  # fmt: skip
    if os.environ.get("IICREPRO_SAMPLES"):  # refresh the sample in docs/
        (ROOT / "docs" / "dvc-exp-show.txt").write_text(table)
    assert max(len(line) for line in table.splitlines()) <= 120, table
    header = next(line for line in table.splitlines() if "Experiment" in line)
    for column in ("top1.iic", "top1.rand", "presets.demo.retrieval.conv_pool"):
        assert column in header, table


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
