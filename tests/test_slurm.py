"""The shrunk demo through the Slurm profile on a real one-node Slurm cluster (127.0.0.1).

Every job goes through sbatch (executor plugin), the results equal a local run's. The loopback
node has 2 CPUs, no GPU and little memory, so the test derives its profile from
workflow/profiles/slurm by sizing the hardware keys down (no `gpu`/`gres`, 2 threads, small
memory); every other key (executor, status command, requeue, partitions, logs) is the real one.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml
from project import ROOT, Project, reference_demo
from slurm_cluster import SlurmCluster, available

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PROFILE = ROOT / "workflow" / "profiles" / "slurm" / "config.yaml"
HARDWARE = ("gpu", "gpus", "gres", "gpu_model", "cpus_per_task", "cpus_per_gpu")


def profile_partitions(profile: dict) -> list[str]:
    names = [profile["default-resources"]["slurm_partition"]]
    names += [
        r["slurm_partition"] for r in profile["set-resources"].values() if "slurm_partition" in r
    ]
    return list(dict.fromkeys(names))


def loopback_profile(profile: dict, partitions: list[str], threads: int, mem_mb: int) -> dict:
    """The cluster profile sized for the loopback node; partitions it lacks map to its first."""

    def fit(resources: dict) -> dict:
        out = {k: v for k, v in resources.items() if k not in HARDWARE}
        if "mem_mb" in out:
            out["mem_mb"] = min(out["mem_mb"], mem_mb)
        if out.get("slurm_partition") not in (None, *partitions):
            out["slurm_partition"] = partitions[0]
        return out

    derived = dict(profile)
    derived["default-resources"] = fit(profile["default-resources"])
    derived["set-resources"] = {rule: fit(r) for rule, r in profile["set-resources"].items()}
    derived["set-threads"] = {rule: min(n, threads) for rule, n in profile["set-threads"].items()}
    return derived


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = available()
    if missing:
        pytest.skip(f"Slurm not installed: {missing}")
    profile = yaml.safe_load(PROFILE.read_text())
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), tuple(profile_partitions(profile))) as c:
        yield c


def test_profile_asks_for_gpus_and_resumable_jobs():
    profile = yaml.safe_load(PROFILE.read_text())
    assert profile["executor"] == "slurm"
    assert profile["slurm-requeue"] is True and profile["retries"] >= 1
    for rule in ("pretrain", "retrieve", "retrieve_bnrecal", "finetune"):
        assert profile["set-resources"][rule]["gpu"] == 1
    # without slurmdbd only squeue can report job states (see the profile's comments)
    assert profile["slurm-status-command"] == "squeue"


def test_demo_runs_on_slurm_like_locally(cluster, tmp_path, tmp_path_factory):
    local = reference_demo(tmp_path_factory)
    project = Project.create(tmp_path / "project")
    derived = loopback_profile(
        yaml.safe_load(PROFILE.read_text()), cluster.partitions, threads=2, mem_mb=1000
    )
    folder = tmp_path / "loopback-profile"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(derived, sort_keys=False))

    start = time.monotonic()
    run = project.snakemake("--profile", str(folder), "--jobs", "2", timeout=1500)
    wall = time.monotonic() - start
    print(f"shrunk demo through Slurm (loopback, 2 CPUs): {wall:.0f} s")
    assert "Using profiles" in run.stderr + run.stdout

    # every job was a Slurm job: one kept Slurm log per job, named by its job id ...
    logs = sorted(project.path(".snakemake/slurm_logs").rglob("*.log"))
    per_rule = {}
    for path in logs:
        rule = path.relative_to(project.path(".snakemake/slurm_logs")).parts[0]
        per_rule.setdefault(rule.removeprefix("rule_"), []).append(path.stem)
    expected = {
        "synthesize": 1, "fetch": 2, "extract": 1, "splits": 1, "frames": 1, "pretrain": 1,
        "retrieve": 2, "retrieve_bnrecal": 1, "finetune": 2, "report": 1,
    }  # fmt: skip
    assert {rule: len(ids) for rule, ids in per_rule.items()} == expected
    # ... that the controller ran to completion with exit code 0
    if cluster.started:  # our own controller: its log is ours to read
        done = set(
            re.findall(r"_job_complete: JobId=(\d+) WEXITSTATUS 0", cluster.ctld_log.read_text())
        )
        assert {i for ids in per_rule.values() for i in ids} <= done

    assert project.metrics() == local.metrics()
    assert Path(project.path("results/summary.md")).is_file()
