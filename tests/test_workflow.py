"""The Snakemake workflow: the paper's grid as a DAG, lint, settings errors, the demo end to end,
no reruns after DVC-style mtime changes, and an interrupted pretraining that resumes.

Everything runs real Snakemake and the real steps in a copy of the project (tests/project.py).
"""

from __future__ import annotations

import itertools
import os
import random
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml
from project import LONG_PRETRAIN, ROOT, SHRUNK_DEMO, VENV_BIN, Project, reference_demo

from iicrepro import config, layout, report


def summary_files(project: Project, *args: str) -> dict[str, list[str]]:
    """rule -> output files of every job in the DAG (`snakemake --summary`)."""
    out = project.snakemake("--summary", *args, timeout=300).stdout
    files: dict[str, list[str]] = {}
    for line in out.splitlines()[1:]:
        fields = line.split("\t")
        if len(fields) >= 3 and fields[0] != "output_file":
            files.setdefault(fields[2], []).append(fields[0])
    return files


def job_counts(dry_run_stdout: str) -> Counter:
    """The 'Job stats' table of a dry run."""
    counts = Counter()
    table = dry_run_stdout.split("Job stats:", 1)[1]
    for line in table.splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not m:
            break
        counts[m.group(1)] = int(m.group(2))
    return counts


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> Project:
    """A project copy with the repository's own params.yaml (dry runs only)."""
    return Project.create(tmp_path_factory.mktemp("bare"), demo=None)


# ------------------------------------------------------------------------------------ the DAG
@pytest.mark.slow  # a DVC / Snakemake / MLflow round trip
def test_paper_dry_run_lists_the_full_grid(bare):
    files = summary_files(bare, "--config", "preset=paper")
    seed = yaml.safe_load((bare.root / "params.yaml").read_text())["pretrain"]["seeds"][0]
    grid = [
        f"{b}-{v}-{n}-s{seed}"
        for b, v, n in itertools.product(
            ("c3d", "r3d", "r21d"), ("residual", "u", "v"), ("repeat", "shuffle", "none")
        )
    ]
    randoms = [
        f"{b}-{v}-random-s{seed}" for b in ("c3d", "r3d", "r21d") for v in ("residual", "u", "v")
    ]

    pretrained = {Path(f).parent.name for f in files["pretrain"]}
    assert pretrained == set(grid)
    assert all(Path(f).parts[2] == "ucf101" for f in files["pretrain"])  # pretrained on UCF101

    retrieved = {(Path(f).parts[2], Path(f).parent.name) for f in files["retrieve"]}
    assert retrieved == {(d, r) for d in ("ucf101", "hmdb51") for r in grid + randoms}
    recal = {(Path(f).parts[2], Path(f).parent.name) for f in files["retrieve_bnrecal"]}
    assert recal == {(d, f"{r}-bnrecal") for d in ("ucf101", "hmdb51") for r in randoms}

    # fine-tuning: IIC models (repeat, shuffle) and random init; CMC (`none`) is not in the table
    tuned = {(Path(f).parts[2], Path(f).parts[3], Path(f).parent.name) for f in files["finetune"]}
    iic = [r for r in grid if "-none-" not in r]
    expected = {
        (d, f"split{k}", r) for d in ("ucf101", "hmdb51") for k in (1, 2, 3) for r in iic + randoms
    }
    assert tuned == expected

    # the data of both datasets, flow for the u/v views, no synthetic data
    assert {Path(f).name for f in files["fetch"]} == {
        "UCF101.rar",
        "UCF101TrainTestSplits-RecognitionTask.zip",
        "hmdb51_org.rar",
        "test_train_splits.rar",
    }
    assert {Path(f).parts[2] for f in files["flow"]} == {"ucf101", "hmdb51"}
    assert "synthesize" not in files

    dry = bare.snakemake("-n", "--config", "preset=paper", timeout=300).stdout
    counts = job_counts(dry)
    assert counts["pretrain"] == 27 and counts["retrieve"] == 72 and counts["finetune"] == 162
    assert counts["retrieve_bnrecal"] == 18

    # the report expects exactly what the workflow makes (one grid definition, iicrepro.grid)
    settings = config.load(bare.root / "params.yaml", "paper")
    made = {f"pretrain ucf101/{Path(f).parent.name}" for f in files["pretrain"]}
    made |= {f"retrieval {d}/{r}" for d, r in retrieved | recal}
    made |= {f"finetune {d}/{k}/{r}" for d, k, r in tuned}
    empty = pd.DataFrame(columns=report.COLUMNS)
    assert set(report._missing(settings, empty, {})) == made


def test_demo_dry_run_is_the_demo_grid(bare):
    counts = job_counts(bare.snakemake("-n", timeout=120).stdout)
    # synthetic data; one model, its random init evaluated as is and BN-recalibrated
    assert counts["synthesize"] == 1 and counts["fetch"] == 2 and "flow" not in counts
    assert counts["pretrain"] == 1 and counts["retrieve"] == 2 and counts["retrieve_bnrecal"] == 1
    assert counts["finetune"] == 2 and counts["report"] == 1


def test_flow_runs_as_scattered_chunks(bare):
    """The u/v views need TV-L1 flow: N chunk jobs per dataset (set-scatter), then a merge."""
    dry = bare.snakemake("-n", "--config", "preset=demo-flow", "--set-scatter", "flow=3").stdout
    counts = job_counts(dry)
    assert counts["flow_chunk"] == 3 and counts["flow"] == 1
    chunks = set(re.findall(r"iicrepro flow .* --chunk (\d+/\d+)", dry))
    assert chunks == {"0/3", "1/3", "2/3"}
    assert re.search(r"iicrepro flow .* --merge", dry)


@pytest.mark.slow
def test_flow_chunks_and_merge_build_the_flow_store(tmp_path):
    project = Project.create(tmp_path / "p", demo=SHRUNK_DEMO, preset="demo-flow")
    project.snakemake("data", "--set-scatter", "flow=2", timeout=900)
    s = project.settings()
    store = project.path(layout.flow_store(s, "synthetic"))
    frames = (project.path(layout.frame_store(s, "synthetic")) / "index.csv").read_text()
    flows = (store / "index.csv").read_text()
    assert len(flows.splitlines()) == len(frames.splitlines())  # every video has its flow
    assert (store / "u" / "index.csv").is_file() and (store / "v" / "index.csv").is_file()
    assert sorted(p.name for p in (store / "chunks").iterdir()) == ["1-of-2.done", "2-of-2.done"]


def test_lint_and_format_are_clean(bare):
    lint = bare.snakemake("--lint", timeout=120)
    assert "Lints for" not in lint.stdout + lint.stderr
    smk = [
        "Snakefile",
        *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("workflow/rules/*.smk")),
    ]
    bare.run(str(VENV_BIN / "snakefmt"), "--check", *smk, timeout=120)


def test_profiles_are_found_by_name(bare):
    dry = bare.snakemake("-n", "--profile", "slurm", timeout=120)
    out = dry.stdout + dry.stderr
    assert "Using profiles slurm and workflow specific profile profiles/default" in out
    assert "slurm_partition=gpu" in out and "gpu=1" in out  # pretraining asks for a GPU


# ------------------------------------------------------------------------------ settings errors
def _params_with(project: Project, dotted: str, value) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    project.write_params(raw)


@pytest.mark.parametrize(
    ("dotted", "value", "named"),
    [
        ("download.retries", 0, "download.retries"),
        ("presets.demo.pretrain.views", ["depth"], "pretrain.views.0"),
        ("frames.codek", "raw", "codek"),
    ],
)
def test_bad_value_in_params_stops_with_its_name(tmp_path, dotted, value, named):
    project = Project.create(tmp_path / "p", demo=None)
    _params_with(project, dotted, value)
    run = project.snakemake("-n", check=False, timeout=120)
    assert run.returncode != 0
    assert named in run.stdout + run.stderr
    assert "Nothing to be done" not in run.stdout


def test_bad_command_line_config_stops_with_its_name(bare):
    unknown = bare.snakemake("-n", "--config", "preset=nonesuch", check=False, timeout=120)
    assert (
        unknown.returncode != 0 and "unknown preset 'nonesuch'" in unknown.stdout + unknown.stderr
    )
    # the steps read params.yaml, so only the preset may come from the command line
    stray = bare.snakemake("-n", "--config", "pretrain={epochs: 3}", check=False, timeout=120)
    assert stray.returncode != 0 and "--config sets pretrain.epochs" in stray.stdout + stray.stderr


# ---------------------------------------------------------------------------- end to end (demo)
@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path_factory):
    start = time.monotonic()
    project = reference_demo(tmp_path_factory)
    print(f"shrunk demo, local, 2 cores: {time.monotonic() - start:.0f} s")
    s = project.settings()
    summary = project.path(layout.summary_md(s)).read_text()
    assert "r3d residual · IIC repeat" in summary and "random init · bnrecal" in summary
    assert any(project.path(layout.plots(s)).glob("*.png"))
    # every job logged under logs/<rule>/
    logs = {
        p.relative_to(project.root / "logs").parts[0] for p in project.path("logs").rglob("*.log")
    }
    assert logs == {
        "synthesize", "fetch", "extract", "splits", "frames",
        "pretrain", "retrieve", "finetune", "report",
    }  # fmt: skip
    # the extracted videos are temporary: the frame store holds what the pipeline reads
    assert not project.path(layout.raw(s, "synthetic")).exists()
    metrics = project.metrics()
    assert len([k for k in metrics if k.startswith("retrieval/")]) == 3
    assert len([k for k in metrics if k.startswith("finetune/")]) == 2
    assert "Nothing to be done" in project.snakemake("-n").stdout


@pytest.mark.slow
def test_snakemake_report_holds_the_results_table_and_plots(tmp_path_factory):
    project = reference_demo(tmp_path_factory)
    project.snakemake("--report", "report.html", timeout=300)
    html = project.path("report.html").read_text()
    s = project.settings()
    for path in [layout.summary_md(s), *project.path(layout.plots(s)).glob("*.png")]:
        assert Path(path).name in html


@pytest.mark.slow
def test_new_mtimes_rerun_nothing_but_a_changed_setting_reruns_its_jobs(tmp_path_factory, tmp_path):
    """What `dvc checkout`/`dvc pull` do to files (same bytes, new mtimes, any order) reruns
    nothing; a fine-tuning setting reruns fine-tuning and the report only."""
    ref = reference_demo(tmp_path_factory)
    project = Project(tmp_path / "copy")
    shutil.copytree(ref.root, project.root, symlinks=True)
    files = [p for d in ("data", "results") for p in project.path(d).rglob("*") if p.is_file()]
    random.Random(0).shuffle(files)
    for i, path in enumerate(files):  # newest last, in a random order
        t = time.time() + i
        os.utime(path, (t, t))
    assert "Nothing to be done" in project.snakemake("-n").stdout

    raw = yaml.safe_load(project.path("params.yaml").read_text())
    raw["presets"]["demo"]["finetune"]["epochs"] = 2
    project.write_params(raw)
    counts = job_counts(project.snakemake("-n").stdout)
    assert set(counts) == {"finetune", "report", "all", "total"}
    assert counts["finetune"] == 2


@pytest.mark.slow
def test_changed_setting_reruns_its_jobs_to_the_end(tmp_path_factory, tmp_path):
    ref = reference_demo(tmp_path_factory)
    project = Project(tmp_path / "copy")
    shutil.copytree(ref.root, project.root, symlinks=True)
    raw = yaml.safe_load(project.path("params.yaml").read_text())
    raw["presets"]["demo"]["finetune"]["epochs"] = 2
    project.write_params(raw)
    project.snakemake(timeout=900)
    tuned = [p for k, p in project.metrics().items() if k.startswith("finetune/")]
    assert tuned and all(m["epochs"] == 2 for m in tuned)


# ------------------------------------------------------------------------- interrupt and resume
def _weights(path: Path) -> dict:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)
    return state.get("model", state)


def _per_epoch(path: Path) -> list[dict]:
    """metrics.csv rows without timings."""
    import csv

    rows = list(csv.DictReader(path.open()))
    return [{k: v for k, v in r.items() if "second" not in k and "per_s" not in k} for r in rows]


@pytest.mark.slow
def test_interrupted_pretraining_resumes_to_the_same_model(tmp_path):
    import torch

    whole = Project.create(tmp_path / "whole", demo=LONG_PRETRAIN)
    whole.snakemake("models", timeout=900)
    run = whole.settings()
    backbone, view = run.pretrain.backbones[0], run.pretrain.views[0]
    neg, seed = run.pretrain.intra_negatives[0], run.pretrain.seeds[0]
    rel = layout.pretrain_dir(run, backbone, view, neg, seed)

    cut = Project.create(tmp_path / "cut", demo=LONG_PRETRAIN)
    shutil.copytree(whole.path("data"), cut.path("data"), symlinks=True)  # same data, same mtimes
    proc = cut.snakemake_background("models", timeout=900)
    try:
        assert cut.wait_for(rel / "ckpt" / "last.pt", 600, proc), "no checkpoint before the end"
    finally:
        Project.kill_group(proc)  # SIGKILL snakemake and the running job: no clean-up at all
    assert not cut.path(rel / "checkpoint.pt").exists(), "pretraining ended before the kill"

    cut.snakemake("--unlock", timeout=120)
    cut.snakemake("models", timeout=900)
    log = cut.path(Path("logs") / "pretrain" / f"{rel.name}.log").read_text()
    resumed = re.search(r"resuming \S+ after epoch (\d+)/(\d+)", log)
    assert resumed and 0 < int(resumed.group(1)) < int(resumed.group(2)), log[-2000:]

    for name in ("checkpoint.pt", "init.pt"):
        a, b = _weights(whole.path(rel / name)), _weights(cut.path(rel / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert _per_epoch(whole.path(rel / "metrics.csv")) == _per_epoch(cut.path(rel / "metrics.csv"))
