"""Where every pipeline artefact lives: one function per kind of path.

Snakemake rules, DVC stages and the Python steps all take their paths from here, so a path is spelled
once. Outputs are keyed by the settings that made them, e.g.
``results/pretrain/synthetic/r3d-residual-repeat-s0/``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

INITS = ("iic", "cmc", "random")


def _data(settings: Any) -> Path:
    return Path(settings["paths"]["data"])


def _results(settings: Any) -> Path:
    return Path(settings["paths"]["results"])


def downloads(settings: Any, dataset: str) -> Path:
    """Downloaded archives, verified (``<file>`` plus ``<file>.sha256``)."""
    return _data(settings) / "downloads" / dataset


def synthetic_source(settings: Any) -> Path:
    """Where `iicrepro synthesize` writes the synthetic dataset's archives (served as file://)."""
    return _data(settings) / "synthetic-source"


def raw(settings: Any, dataset: str) -> Path:
    """Extracted archives of one dataset (videos and official split files)."""
    return _data(settings) / "raw" / dataset


def manifests(settings: Any, dataset: str) -> Path:
    return _data(settings) / "manifests" / dataset


def manifest(settings: Any, dataset: str, split: int) -> Path:
    """CSV with columns video,class,label,subset (video = '<Class>/<name>.avi')."""
    return manifests(settings, dataset) / f"split{split}.csv"


def frame_store(settings: Any, dataset: str) -> Path:
    """Per-video frame files plus index.csv and failures.csv."""
    return _data(settings) / "frames" / dataset


def flow_store(settings: Any, dataset: str) -> Path:
    """Per-video TV-L1 flow files, one sub-store per component: u/ and v/."""
    return _data(settings) / "flow" / dataset


def intra_negative_or_init(intra_negative: str | None, init: str) -> str:
    """The run-name slot: the intra-negative for pretrained models, 'random' for random init."""
    return "random" if init == "random" else str(intra_negative)


def run_name(backbone: str, view: str, intra_negative: str, seed: int) -> str:
    """Model identity used in every path and MLflow run name, e.g. 'r3d-residual-repeat-s0'.

    `intra_negative` is 'repeat' / 'shuffle' (IIC), 'none' (CMC) or 'random' (no pretraining).
    """
    return f"{backbone}-{view}-{intra_negative}-s{seed}"


def init_of(intra_negative: str) -> str:
    """The `init` column of the results table for a run-name slot."""
    return {"none": "cmc", "random": "random"}.get(intra_negative, "iic")


_RUN_RE = re.compile(
    r"^(?P<backbone>[a-z0-9]+)-(?P<view>[a-z]+)-(?P<intra_negative>[a-z]+)-s(?P<seed>\d+)"
    r"(?:-(?P<variant>[A-Za-z0-9_.-]+))?$"
)


def parse_run_name(name: str) -> dict | None:
    """Inverse of `run_name`, allowing a '-<variant>' suffix (e.g. '-bnrecal'); None if no match."""
    m = _RUN_RE.match(name)
    if not m:
        return None
    d = m.groupdict()
    return {
        **d,
        "seed": int(d["seed"]),
        "variant": d["variant"] or "",
        "init": init_of(d["intra_negative"]),
    }


def retrieval_run(checkpoint: Path, bn: str) -> str:
    """Evaluation run name of a checkpoint: its pretraining folder's name; a seed's init.pt is
    that seed's random-init run; BN-recalibrated evaluations end in '-bnrecal'."""
    run = Path(checkpoint).resolve().parent.name
    if Path(checkpoint).name == "init.pt":
        p = parse_run_name(run)
        run = run_name(p["backbone"], p["view"], "random", p["seed"]) if p else f"{run}-init"
    return run + ("-bnrecal" if bn == "recalibrate" else "")


def finetune_run(checkpoint: Path, view: str, seed: int) -> str:
    """The pretraining run's name (init.pt: its random-init name), suffixed with the fine-tuning
    input and seed where they differ from the pretraining run's."""
    run = retrieval_run(checkpoint, "as-initialised")
    parsed = parse_run_name(run) or {}
    if parsed.get("view") != view:
        run += f"-ft{view}"
    if parsed.get("seed") != seed:
        run += f"-fs{seed}"
    return run


def pretrain_dir(settings: Any, backbone: str, view: str, intra_negative: str, seed: int) -> Path:
    """checkpoint.pt (final), ckpt/last.pt (resume), init.pt (epoch-0 weights), metrics.csv/json."""
    dataset = settings["pretrain"]["dataset"]
    return (
        _results(settings) / "pretrain" / dataset / run_name(backbone, view, intra_negative, seed)
    )


def retrieval_dir(settings: Any, dataset: str, run: str) -> Path:
    """features/*.npz (cached), metrics.json."""
    return _results(settings) / "retrieval" / dataset / run


def finetune_dir(settings: Any, dataset: str, split: int, run: str) -> Path:
    """ckpt/last.pt, best.pt, metrics.csv (per epoch), metrics.json (test)."""
    return _results(settings) / "finetune" / dataset / f"split{split}" / run


def evaluate_dir(settings: Any, dataset: str, split: int, checkpoint: Path) -> Path:
    """`iicrepro evaluate` of a classifier checkpoint: test_predictions.csv, metrics.json. Named
    after the fine-tuning run of a best.pt, else after the checkpoint file."""
    checkpoint = Path(checkpoint)
    run = checkpoint.resolve().parent.name if checkpoint.name == "best.pt" else checkpoint.stem
    return _results(settings) / "evaluate" / dataset / f"split{split}" / run


def summary_csv(settings: Any) -> Path:
    return _results(settings) / "summary.csv"


def summary_md(settings: Any) -> Path:
    return _results(settings) / "summary.md"


def headline(settings: Any) -> Path:
    """A preset's headline numbers for DVC (`dvc metrics`, `dvc exp show`), named by the preset."""
    return _results(settings) / f"metrics-{settings['preset']}.json"


def curves(settings: Any) -> Path:
    """Per-run curves as CSV data files for `dvc plots`: pretrain/, retrieval/, finetune/."""
    return _results(settings) / "curves"


def plots(settings: Any) -> Path:
    return _results(settings) / "plots"


def bench_json(settings: Any) -> Path:
    """`iicrepro bench` measurements: loader and training throughput, MFU, memory."""
    return _results(settings) / "bench.json"


def mlflow_pending(settings: Any) -> Path:
    """Run folders whose MLflow logging failed (server down), one JSON line each; `report` retries."""
    return _results(settings) / ".mlflow-pending.jsonl"
