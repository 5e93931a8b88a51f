"""DVC's view of a preset's results: a compact metrics file and per-run curves as data files.

Written by `iicrepro report` beside the results table; dvc.yaml lists them (``metrics:`` and
``plots:`` with x / y), so ``dvc metrics diff``, ``dvc exp show`` and ``dvc plots diff`` compare
experiments by these files:

* ``<results>/metrics-<preset>.json`` (`layout.headline`): the headline numbers under short keys,
  so that ``dvc exp show --only-changed`` shows them and the changed setting in a 120-column
  terminal. ``top1.<init>``: retrieval top-1 on the headline feature (joint: RGB + view 2, or RGB
  for the rgb view); ``ft.<init>``: fine-tuning video top-1 (the mean over splits). Each is the mean
  over the preset's runs of that init (backbones, views, intra-negatives, seeds). Inits: ``iic``
  (repeat / shuffle), ``cmc`` (no intra-negative) and ``rand``, random init: for retrieval with
  its BatchNorm statistics recalibrated, the stronger baseline (the as-initialised one is in
  summary.csv). A preset that evaluates several datasets has a level per dataset
  (``top1.ucf101.iic``). Everything else (top-5..50, per-model rows, losses) is in summary.csv
  and the curves.
* ``<results>/curves/pretrain/<dataset>_<run>.csv`` (epoch, loss, positive_rank1),
  ``curves/finetune/<dataset>_split<k>_<run>.csv`` (epoch, train/val loss and accuracy) and
  ``curves/retrieval/<dataset>_<run>.csv`` (k, top-k accuracy of rgb, view 2 as ``view``, joint).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from iicrepro import io, layout

PRETRAIN_COLUMNS = ["epoch", "loss", "positive_rank1"]
FINETUNE_COLUMNS = ["epoch", "train_loss", "val_loss", "train_acc", "val_acc"]


def _init(row) -> str | None:
    """The headline's name for a row's init, None for rows the headline leaves out."""
    if row["protocol"] == "retrieval" and row["init"] == "random":
        return "rand" if row["variant"] == "bnrecal" else None
    if row["variant"]:  # another seed's fine-tuning input and the like
        return None
    return {"iic": "iic", "cmc": "cmc", "random": "rand"}.get(row["init"])


def headline(table) -> dict:
    """The compact metrics tree (see the module docstring)."""
    tree: dict = {}
    if table.empty:
        return tree
    ret = table[(table["protocol"] == "retrieval") & (table["metric"] == "top1")]
    ret = ret[ret["modality"] == ret["view"].map(lambda v: "rgb" if v == "rgb" else "joint")]
    ft = table[table["protocol"] == "finetune"]
    if (ft["split"] == "mean").any():  # the paper's number; else the preset's one split
        ft = ft[ft["split"] == "mean"]
    several = len(set(ret["dataset"]) | set(ft["dataset"])) > 1
    for measure, rows in (("top1", ret), ("ft", ft)):
        if rows.empty:
            continue
        inits = rows.apply(_init, axis=1)
        for (dataset, init), g in rows.groupby([rows["dataset"], inits]):
            node = tree.setdefault(measure, {})
            node = node.setdefault(dataset, {}) if several else node
            node[init] = round(float(g["value"].mean()), 2)
    return tree


def _write_csv(path: Path, df) -> None:
    with io.atomic_path(path, suffix=".csv") as tmp:
        df.to_csv(tmp, index=False)


def write(settings: Any, table, runs: dict) -> list[Path]:
    """Write the metrics file and the curves (replacing earlier curves); returns their paths."""
    import pandas as pd

    out = layout.curves(settings)
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    for (dataset, run), info in sorted(runs.items()):
        curve = info["curve"]
        if {"epoch", "loss"} <= set(curve.columns):
            cols = [c for c in PRETRAIN_COLUMNS if c in curve.columns]
            _write_csv(staging / "pretrain" / f"{dataset}_{run}.csv", curve[cols])
    if not table.empty:
        ret = table[table["protocol"] == "retrieval"]
        for source, g in ret.groupby("source"):
            wide = g.pivot_table(index="metric", columns="modality", values="value")
            view = g["view"].iloc[0]  # view 2's column is `view`, whatever the view (fixed y)
            wide = wide.rename(columns={view: "view"} if view != "rgb" else {})
            wide = wide.reindex([m for m in ("top1", "top5", "top10", "top20", "top50")
                                 if m in wide.index])  # fmt: skip
            wide.insert(0, "k", [int(m.removeprefix("top")) for m in wide.index])
            name = f"{g['dataset'].iloc[0]}_{Path(source).parent.name}.csv"
            _write_csv(staging / "retrieval" / name, wide.reset_index(drop=True))
        ft = table[(table["protocol"] == "finetune") & (table["split"] != "mean")]
        for source, g in ft.groupby("source"):
            csv_path = Path(source).parent / "metrics.csv"
            if csv_path.is_file():
                curve = pd.read_csv(csv_path)
                cols = [c for c in FINETUNE_COLUMNS if c in curve.columns]
                row = g.iloc[0]
                name = f"{row['dataset']}_split{row['split']}_{Path(source).parent.name}.csv"
                _write_csv(staging / "finetune" / name, curve[cols])
    staging.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    metrics_path = layout.headline(settings)
    io.write_json(metrics_path, headline(table))
    return [metrics_path, *sorted(out.rglob("*.csv"))]
