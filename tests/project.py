"""A throw-away copy of the project for workflow tests: real Snakemake, DVC and steps, tiny settings.

`Project.create(folder, demo=SHRUNK_DEMO, preset="demo")` copies the repository's tracked and
untracked-not-ignored files (so no data, results, .venv or caches), writes params.yaml selecting the
preset shrunk by the given overrides, and commits it all to a fresh git repository (DVC needs one).
Commands run in the copy with the project's virtual environment first on PATH and its own src/ on
PYTHONPATH; Snakemake always runs under `timeout`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from iicrepro import config

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
SKIP = ("data/", "results/", "logs/", ".venv/", ".snakemake/", "mlruns/")

# The demo preset shrunk to seconds per step on 2 cores: 3 motion classes x 3 groups x 2 videos,
# a half-width model, 2 pretraining epochs (checkpointed every epoch so an interruption has
# something to resume from), 1 fine-tuning epoch. Every step of the demo still runs; MLflow logging, which has its own tests,
# is off to save ~5 s per job.
SHRUNK_DEMO: dict[str, Any] = {
    "tracking": {"enabled": False},
    "synthetic": {
        "classes": ["right", "rotate_cw", "zoom_in"],
        "groups": 3,
        "videos_per_group": 2,
        "test_groups": 1,
    },
    "clips": {"eval_clips": 2},
    "model": {"width": 0.125},
    "pretrain": {"epochs": 2, "checkpoint_every": 1, "batch_size": 4, "nce": {"k": 8}},
    "retrieval": {"batch_size": 4},
    "finetune": {"epochs": 1, "batch_size": 4, "val_size": {"synthetic": 3}},
}


# Longer pretraining (18 training videos, 6 epochs) for a run that is interrupted after its first
# checkpoint: five more epochs leave time to kill it before it ends.
LONG_PRETRAIN = config.deep_merge(
    SHRUNK_DEMO, {"synthetic": {"videos_per_group": 3}, "pretrain": {"epochs": 6}}
)

_REFERENCE: dict[str, Project] = {}


def reference_demo(folder_factory) -> Project:
    """The shrunk demo run once locally per test session (`folder_factory`: pytest's
    tmp_path_factory); workflow, Slurm and DVC tests compare their results with it."""
    if "demo" not in _REFERENCE:
        project = Project.create(folder_factory.mktemp("reference-demo"))
        project.snakemake(timeout=900)
        _REFERENCE["demo"] = project
    return _REFERENCE["demo"]


def project_files(root: Path = ROOT) -> list[str]:
    """Tracked and untracked-not-ignored files of the working tree, minus data and results."""
    out = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = sorted({n for n in out.split("\0") if n and not n.startswith(SKIP)})
    # a tracked file deleted from the working tree is listed too: keep only what exists
    return [n for n in names if (root / n).is_symlink() or (root / n).is_file()]


def shrink(params: dict, preset: str, overrides: Mapping) -> dict:
    """params.yaml content with `overrides` merged into `presets.<preset>`."""
    params = dict(params)
    presets = dict(params.get("presets") or {})
    presets[preset] = config.deep_merge(presets.get(preset) or {}, overrides)
    params["presets"] = presets
    params["preset"] = preset
    return params


class Project:
    def __init__(self, root: Path):
        self.root = Path(root)

    # ------------------------------------------------------------------------- creation
    @classmethod
    def create(
        cls,
        folder: Path,
        demo: Mapping | None = SHRUNK_DEMO,
        source: Path = ROOT,
        preset: str = "demo",
    ) -> Project:
        """Copy the project; with `demo` overrides, params.yaml selects `preset` shrunk by them."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in project_files(source):
            src, dst = source / name, folder / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_symlink():
                os.symlink(os.readlink(src), dst)
            else:
                shutil.copy2(src, dst)
        project = cls(folder)
        if demo is not None:
            raw = yaml.safe_load((source / "params.yaml").read_text())
            project.write_params(shrink(raw, preset, demo))
        project.git("init", "-q", "-b", "main")
        project.commit("project copy for a workflow test")
        return project

    def write_params(self, params: Mapping) -> None:
        (self.root / "params.yaml").write_text(yaml.safe_dump(dict(params), sort_keys=False))

    # ------------------------------------------------------------------------- commands
    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
        # the copy's own code, not the checkout's (which may change while a test runs)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(self.root / "src"), env.get("PYTHONPATH")) if p
        )
        env.update(
            GIT_AUTHOR_NAME="iicrepro tests",
            GIT_AUTHOR_EMAIL="tests@iicrepro.invalid",
            GIT_COMMITTER_NAME="iicrepro tests",
            GIT_COMMITTER_EMAIL="tests@iicrepro.invalid",
        )
        env.update(extra)
        return env

    def run(
        self, *cmd: str, timeout: float = 600, check: bool = True, env: Mapping | None = None
    ) -> subprocess.CompletedProcess:
        """Run a command in the project; on failure the error shows its output."""
        proc = subprocess.run(
            [str(c) for c in cmd],
            cwd=self.root,
            env=dict(env) if env is not None else self.env(),
            capture_output=True,
            text=True,
            timeout=timeout + 30,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
            )
        return proc

    def snakemake(
        self, *args: str, timeout: int = 600, check: bool = True, env: Mapping | None = None
    ) -> subprocess.CompletedProcess:
        """`snakemake --cores 2 ARGS` under `timeout` (the workflow profile applies)."""
        cmd = ["timeout", "-k", "10", str(timeout), "snakemake", "--cores", "2", *args]
        return self.run(*cmd, timeout=timeout, check=check, env=env)

    def snakemake_background(self, *args: str, timeout: int = 600) -> subprocess.Popen:
        """Start snakemake in its own process group (see `kill_group`)."""
        log = open(self.root / "snakemake-background.log", "w")  # noqa: SIM115 - outlives call
        return subprocess.Popen(
            ["timeout", "-k", "10", str(timeout), "snakemake", "--cores", "2", *args],
            cwd=self.root,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @staticmethod
    def kill_group(proc: subprocess.Popen) -> None:
        """SIGKILL the whole process group: Snakemake and the job it runs, no clean-up."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def git(self, *args: str) -> str:
        return self.run("git", *args, timeout=60).stdout

    def commit(self, message: str) -> None:
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)

    # ------------------------------------------------------------------------- results
    def settings(self):
        return config.load(self.root / "params.yaml")

    def path(self, relative: str | Path) -> Path:
        return self.root / relative

    def wait_for(self, relative: str | Path, timeout: float, proc: subprocess.Popen) -> bool:
        """Wait until a file exists; False if `proc` ends or time runs out first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if self.path(relative).exists():
                return True
            time.sleep(0.2)
        return self.path(relative).exists()

    def metrics(self) -> dict[str, Any]:
        """Every results metrics.json (retrieval, fine-tuning), minus when/where it was made."""
        results = self.root / self.settings().paths.results
        found = {}
        for path in sorted(results.glob("*/**/metrics.json")):
            if path.relative_to(results).parts[0] in ("retrieval", "finetune"):
                found[str(path.relative_to(results))] = _strip(json.loads(path.read_text()))
        return found

    def snapshot(self, *folders: str) -> dict[str, bytes]:
        """Bytes of every file under the given project folders (for byte-identity checks)."""
        out = {}
        for folder in folders:
            for path in sorted(self.path(folder).rglob("*")):
                if path.is_file():
                    out[str(path.relative_to(self.root))] = path.read_bytes()
        return out


# Record keys that describe a run rather than its result (checkpoint files embed their creation
# time, so their sha256 differs between equal runs).
_VOLATILE = {
    "provenance",
    "created",
    "sha256",
    "seconds",
    "elapsed_s",
    "wall_s",
    "duration_s",
    "host",
}


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value
