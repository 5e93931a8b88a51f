"""`iicrepro report`: every result beside the paper's number, plots, and an MLflow summary run.

Reads the metric files the other steps wrote (paths from iicrepro.layout; missing or partial results
are reported as such) and writes:
* ``results/summary.csv``: long form, one row per number, with the paper's number and the delta;
* ``results/summary.md``: the paper's tables with our numbers beside them, mean ± std over seeds with
  the margin over random init, pretraining runs, what is missing, and the source files;
* ``results/ablation.csv``: the paper's ablation, intra-negative none (CMC) / repeat / shuffle per
  backbone, view and retrieval feature (and fine-tuning), mean ± std over seeds beside the paper's;
* ``results/plots/*.png``: pretraining loss curves, retrieval top-k curves and the ablation bars;
* ``results/metrics-<preset>.json`` and ``results/curves/``: headline numbers and per-run curves for
  DVC (`iicrepro.headline`).
Accuracies are percentages, like the paper's. Fine-tuning results of all three splits of a run are
also averaged into a ``split = mean`` row, the number the paper's recognition tables report (spec 17).
"""

from __future__ import annotations

import argparse
import glob
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from iicrepro import fingerprint, grid, io, layout, paper, track
from iicrepro import headline as dvc_files  # DVC's metrics and curves

log = logging.getLogger(__name__)

COLUMNS = [
    "dataset", "protocol", "backbone", "view", "intra_negative", "init", "split", "seed",
    "modality", "variant", "metric", "value", "paper_value", "delta", "paper_table",
    "paper_method", "source", "stale",
]  # fmt: skip
TOPK = ["top1", "top5", "top10", "top20", "top50"]
INIT_ORDER = {"iic": 0, "cmc": 1, "random": 2}
PAPER_DATASETS = {"ucf101": "UCF101", "hmdb51": "HMDB51"}
STALE = "⚠ stale"  # the mark of a row made by older code (see _older_code)
PROTOCOL_STEPS = {"pretrain": "pretrain", "retrieval": "retrieve", "finetune": "finetune"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--results", default=None, metavar="DIR",
        help="results folder to report on (default: paths.results of the settings)",
    )  # fmt: skip
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")


def main(args: argparse.Namespace) -> int:
    from iicrepro.cli import settings_from_args

    settings = settings_from_args(args)
    if args.results:
        settings["paths"]["results"] = args.results
    out = build(settings, mlflow=not args.no_mlflow)
    print(f"wrote {out['csv']}, {out['md']} and {len(out['plots'])} plots")
    return 0


def build(settings: Any, mlflow: bool = True) -> dict:
    """Write summary.csv, summary.md and the plots; log them to MLflow. Returns their paths."""
    table, sources = collect(settings)
    curves, pretrain_sources = pretrain_runs(settings)
    sources += pretrain_sources
    csv_path, md_path = layout.summary_csv(settings), layout.summary_md(settings)
    with io.atomic_path(csv_path, suffix=".csv") as tmp:
        table.to_csv(tmp, index=False)
    ablation = ablation_table(table)
    with io.atomic_path(csv_path.with_name("ablation.csv"), suffix=".csv") as tmp:
        ablation.to_csv(tmp, index=False)
    plots = make_plots(settings, table, curves) + ablation_plots(settings, ablation)
    io.write_text(md_path, render_md(settings, table, curves, sources, plots, ablation))
    io.write_json(csv_path.with_name("summary.json"), metrics_tree(table))
    dvc_files.write(settings, table, curves)
    if mlflow and track.tracking_uri(settings):
        logged, pending = track.sync_pending(settings)
        if logged or pending:
            print(f"MLflow: {logged} pending run(s) logged, {pending} still pending")
        artifacts = [(csv_path, None), (md_path, None)] + [(p, "plots") for p in plots]
        with_paper = table["paper_value"].notna()
        metrics = {
            "rows": len(table),
            "rows_with_paper_value": int(with_paper.sum()),
            "pretrain_runs": len(curves),
            "expected_results": len(grid.expected(settings)),
            "missing_results": len(_missing(settings, table, curves)),
        }
        if with_paper.any():
            metrics["mean_abs_delta"] = float(table.loc[with_paper, "delta"].abs().mean())
        track.log_summary(settings, artifacts, metrics, table=csv_path)
    return {"csv": csv_path, "md": md_path, "plots": plots,
            "ablation": csv_path.with_name("ablation.csv")}  # fmt: skip


def metrics_tree(table) -> dict:
    """summary.csv as nested JSON (protocol / dataset / run / metric -> value), every number; DVC
    reads the compact `iicrepro.headline` file instead."""
    tree: dict = {}
    for row in table.to_dict("records"):
        run = f"{row['backbone']}-{row['view']}-{row['intra_negative']}-s{row['seed']}"
        if isinstance(row.get("variant"), str) and row["variant"]:
            run += f"-{row['variant']}"
        run += f"/split{row['split']}"
        metric = row["metric"]
        if isinstance(row.get("modality"), str) and row["modality"]:
            metric = f"{row['modality']}_{metric}"
        node = tree.setdefault(row["protocol"], {}).setdefault(row["dataset"], {})
        node.setdefault(run, {})[metric] = float(row["value"])
    return tree


# --------------------------------------------------------------------------- reading results


def _glob(pattern: Path) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(pattern)))


def _source(path: Path, data: dict, kind: str) -> dict:
    prov = data.get("provenance") or {}
    return {"path": str(path), "kind": kind, "code_version": prov.get("code_version", "unknown"),
            "stale": _older_code(data, kind)}  # fmt: skip


def _older_code(data: dict, kind: str) -> bool:
    """Whether a result was made by other code than the current: the code fingerprint its step
    recorded differs from the current one, or, for an evaluation, that of the pretraining run
    whose model it evaluates. (Results without a record, made before fingerprints were recorded
    or by hand, are not judged.)"""
    prov = data.get("provenance") or {}
    recorded = prov.get("code_fingerprint")
    if recorded and recorded != fingerprint.of_step(prov.get("step") or PROTOCOL_STEPS[kind]):
        return True
    model = (data.get("checkpoint") or {}).get("path")
    record = Path(model).with_name("metrics.json") if model and kind != "pretrain" else None
    return bool(record and record.is_file() and _older_code(io.read_json(record), "pretrain"))


def _made_with(data: dict, settings: Any) -> Any:
    return (data.get("provenance") or {}).get("settings") or settings


def _base_row(dataset: str, protocol: str, run: str, split: Any, source: Path) -> dict | None:
    parts = layout.parse_run_name(run)
    if parts is None:
        log.warning("report: %s is not a run folder name; skipped", source.parent)
        return None
    return {
        "dataset": dataset, "protocol": protocol, "backbone": parts["backbone"],
        "view": parts["view"], "intra_negative": parts["intra_negative"], "init": parts["init"],
        "split": str(split), "seed": parts["seed"], "variant": parts["variant"],
        "source": str(source),
    }  # fmt: skip


def _retrieval_rows(settings: Any, sources: list) -> list[dict]:
    rows = []
    # layout's own path functions with '*' for the keys give the glob patterns.
    for path in _glob(layout.retrieval_dir(settings, "*", "*") / "metrics.json"):
        data = io.read_json(path)
        split = data.get("split") or _made_with(data, settings)["retrieval"]["split"]
        base = _base_row(path.parent.parent.name, "retrieval", path.parent.name, split, path)
        if base is None:
            continue
        sources.append(_source(path, data, "retrieval"))
        base["stale"] = sources[-1]["stale"]
        for r in data.get("rows", []):
            rows.append({**base, "modality": r["modality"], "metric": r["metric"],
                         "value": float(r["value"])})  # fmt: skip
    return rows


def _finetune_rows(settings: Any, sources: list) -> list[dict]:
    rows = []
    for path in _glob(layout.finetune_dir(settings, "*", "*", "*") / "metrics.json"):
        data = io.read_json(path)
        split = path.parent.parent.name.removeprefix("split")
        base = _base_row(path.parent.parent.parent.name, "finetune", path.parent.name, split, path)
        if base is None or "top1" not in data:
            continue
        sources.append(_source(path, data, "finetune"))
        base["stale"] = sources[-1]["stale"]
        rows.append({**base, "modality": "", "metric": "top1", "value": float(data["top1"])})
    return rows


def _split_means(df):
    """One 'mean' row per fine-tuned model that has all three splits (the paper's protocol)."""
    import pandas as pd

    ft = df[(df["protocol"] == "finetune") & df["split"].isin(["1", "2", "3"])]
    keys = [c for c in COLUMNS if c not in ("split", "value", "source", "paper_value", "delta",
                                            "paper_table", "paper_method", "stale")]  # fmt: skip
    means = []
    for key, group in ft.groupby(keys, dropna=False):
        if set(group["split"]) == {"1", "2", "3"}:
            row = dict(zip(keys, key, strict=True))
            row.update(split="mean", value=group["value"].mean(),
                       source=";".join(sorted(group["source"])),
                       stale=bool(group["stale"].any()))  # fmt: skip
            means.append(row)
    return pd.concat([df, pd.DataFrame(means)], ignore_index=True) if means else df


def _attach_paper(row) -> tuple:
    # Variants (BN recalibration, another fine-tuning input or seed) are not the paper's settings.
    if row["dataset"] not in PAPER_DATASETS or row["variant"]:
        return None, "", ""
    p = paper.lookup(
        row["dataset"], row["protocol"], row["backbone"], row["view"], row["intra_negative"],
        row["metric"], modality=row["modality"] or None, split=row["split"],
    )  # fmt: skip
    return (p.value, p.table, p.method) if p else (None, "", "")


def collect(settings: Any):
    """All retrieval and fine-tuning numbers as a long table with the paper's beside them."""
    import pandas as pd

    sources: list[dict] = []
    rows = _retrieval_rows(settings, sources) + _finetune_rows(settings, sources)
    df = pd.DataFrame(rows, columns=COLUMNS)
    if df.empty:
        return df, sources
    df = _split_means(df)
    attached = df.apply(_attach_paper, axis=1, result_type="expand")
    df["paper_value"] = pd.to_numeric(attached[0])
    df["paper_table"], df["paper_method"] = attached[1], attached[2]
    df["delta"] = df["value"] - df["paper_value"]
    order = {
        "init": df["init"].map(INIT_ORDER),
        "metric": df["metric"].map(lambda m: TOPK.index(m) if m in TOPK else len(TOPK)),
    }
    df = df.assign(_init=order["init"], _metric=order["metric"])
    df = df.sort_values(["dataset", "protocol", "backbone", "view", "_init", "intra_negative",
                         "variant", "seed", "split", "modality", "_metric"])  # fmt: skip
    return df.drop(columns=["_init", "_metric"])[COLUMNS].reset_index(drop=True), sources


def pretrain_runs(settings: Any) -> tuple[dict, list]:
    """Per-epoch curves and final values of every pretraining run: {(dataset, run): info}."""
    import pandas as pd

    shape = {"paths": settings["paths"], "pretrain": {"dataset": "*"}}
    runs, sources = {}, []
    for run_dir in _glob(layout.pretrain_dir(shape, "*", "*", "*", "*")):
        csv_path, json_path = run_dir / "metrics.csv", run_dir / "metrics.json"
        if not csv_path.exists() and not json_path.exists():
            continue
        final = io.read_json(json_path) if json_path.exists() else {}
        curve = pd.read_csv(csv_path) if csv_path.exists() else pd.DataFrame()
        runs[(run_dir.parent.name, run_dir.name)] = {"curve": curve, "final": final}
        for p in (csv_path, json_path):
            if p.exists():
                sources.append(_source(p, final, "pretrain"))
    return runs, sources


# --------------------------------------------------------------------------- plots


def make_plots(settings: Any, table, runs: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir, written = layout.plots(settings), []

    def save(fig, name):
        path = out_dir / name
        with io.atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    curves = {k: v["curve"] for k, v in runs.items() if {"epoch", "loss"} <= set(v["curve"])}
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (dataset, run), c in sorted(curves.items()):
            ax.plot(c["epoch"], c["loss"], label=f"{dataset}/{run}", lw=1.2)
        ax.set(xlabel="epoch", ylabel="pretraining loss (NCE, both views)",
               title="IIC pretraining loss")  # fmt: skip
        ax.legend(fontsize=7)
        save(fig, "pretrain_loss.png")
    retrieval = table[(table["protocol"] == "retrieval") & table["metric"].isin(TOPK)]
    for dataset, d in retrieval.groupby("dataset"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for run, r in d.groupby(d["source"].map(lambda s: Path(s).parent.name)):
            modality = "joint" if (r["modality"] == "joint").any() else r["modality"].iloc[0]
            r = r[r["modality"] == modality]
            ks = [int(m.removeprefix("top")) for m in r["metric"]]
            ax.plot(ks, r["value"], marker="o", lw=1.2, label=f"{run} ({modality})")
            if r["paper_value"].notna().all():
                ax.plot(ks, r["paper_value"], ls="--", lw=1, color=ax.lines[-1].get_color(),
                        label=f"paper: {r['paper_method'].iloc[0]}")  # fmt: skip
        ax.set(xscale="log", xlabel="k", ylabel="top-k accuracy (%)",
               title=f"{dataset} retrieval (nearest neighbours of test videos in train)")  # fmt: skip
        ax.set_xticks([1, 5, 10, 20, 50], labels=["1", "5", "10", "20", "50"])
        ax.legend(fontsize=7)
        save(fig, f"retrieval_topk_{dataset}.png")
    return written


# --------------------------------------------------------------------------- ablation

# The paper's ablation columns: no intra-negative (CMC) against the two kinds, and random init.
ABLATION_MODELS = [("none", ""), ("repeat", ""), ("shuffle", ""), ("random", ""),
                   ("random", "bnrecal")]  # fmt: skip
ABLATION_LABELS = {("none", ""): "CMC (none)", ("repeat", ""): "IIC repeat",
                   ("shuffle", ""): "IIC shuffle", ("random", ""): "random init",
                   ("random", "bnrecal"): "random init (BN recal.)"}  # fmt: skip
ABLATION_COLUMNS = ["dataset", "protocol", "backbone", "view", "feature", "intra_negative",
                    "variant", "seeds", "mean", "std", "paper_value"]  # fmt: skip
FEATURE_ORDER = {"joint": 0, "rgb": 1}  # the paper's feature first; then RGB, then view 2


def ablation_table(table):
    """Top-1 per dataset x protocol x backbone x view x feature x intra-negative, mean and std over
    seeds, with the paper's number where it has one (retrieval on split 1, fine-tuning as the 3-split
    mean). Fine-tuning rows use the 3-split mean where a run has all three splits, else split 1."""
    import pandas as pd

    if table.empty:
        return pd.DataFrame(columns=ABLATION_COLUMNS)
    t = table[table["metric"] == "top1"]
    ret = t[(t["protocol"] == "retrieval") & (t["modality"] != "joint_l2")]
    ft = t[t["protocol"] == "finetune"]
    has_mean = set(ft.loc[ft["split"] == "mean", "source"].str.split(";").explode())
    ft = ft[(ft["split"] == "mean") | ((ft["split"] == "1") & ~ft["source"].isin(has_mean))]
    rows = []
    for part in (ret, ft):
        keys = ["dataset", "protocol", "backbone", "view", "modality", "intra_negative", "variant"]
        for key, g in part.groupby(keys, sort=False):
            d = dict(zip(keys, key, strict=True))
            if (d["intra_negative"], d["variant"]) not in ABLATION_MODELS:
                continue
            values = g["value"].astype(float)
            rows.append({
                "dataset": d["dataset"], "protocol": d["protocol"], "backbone": d["backbone"],
                "view": d["view"], "feature": d["modality"] or "finetune",
                "intra_negative": d["intra_negative"], "variant": d["variant"],
                "seeds": int(g["seed"].nunique()), "mean": values.mean(),
                "std": values.std() if len(values) > 1 else float("nan"),
                "paper_value": g["paper_value"].dropna().iloc[0]
                if g["paper_value"].notna().any() else float("nan"),
            })  # fmt: skip
    out = pd.DataFrame(rows, columns=ABLATION_COLUMNS)
    if out.empty:
        return out
    model = out.apply(lambda r: ABLATION_MODELS.index((r["intra_negative"], r["variant"])), axis=1)
    feature = out["feature"].map(lambda f: FEATURE_ORDER.get(f, 2 if f != "finetune" else 3))
    protocol = out["protocol"].map({"retrieval": 0, "finetune": 1})
    out = out.assign(_p=protocol, _f=feature, _m=model).sort_values(
        ["dataset", "backbone", "view", "_p", "_f", "_m"], kind="stable"
    )
    return out.drop(columns=["_p", "_f", "_m"]).reset_index(drop=True)


def _ablation_cell(r) -> str:
    if r is None:
        return "—"
    ours = _fmt(r["mean"]) + ("" if r["std"] != r["std"] else f" ± {r['std']:.1f}")
    ours += f" ({r['seeds']})"
    if r["paper_value"] == r["paper_value"]:
        ours += f" / {_fmt(r['paper_value'])}"
    return ours


def _ablation_md(ablation, dataset: str) -> str:
    """One row per backbone x view x feature, one column per model (intra-negative)."""
    a = ablation[ablation["dataset"] == dataset]
    models = [m for m in ABLATION_MODELS
              if ((a["intra_negative"] == m[0]) & (a["variant"] == m[1])).any()]  # fmt: skip
    rows = []
    for key, g in a.groupby(["protocol", "backbone", "view", "feature"], sort=False):
        cells = []
        for neg, variant in models:
            hit = g[(g["intra_negative"] == neg) & (g["variant"] == variant)]
            cells.append(_ablation_cell(hit.iloc[0] if len(hit) else None))
        protocol, backbone, view, feature = key
        what = "retrieval" if protocol == "retrieval" else "fine-tuning"
        feature_text = "" if protocol != "retrieval" else f", {feature} feature"
        rows.append([f"{backbone} · view 2 = {view}", f"{what}{feature_text}", *cells])
    header = ["backbone · view", "top-1", *(ABLATION_LABELS[m] for m in models)]
    return _md_table(header, rows)


def ablation_plots(settings: Any, ablation) -> list[Path]:
    """ablation_<dataset>.png: top-1 bars per model (mean, std as error bars) for each backbone,
    view and the paper's retrieval feature (joint) plus fine-tuning; the paper's values as ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for dataset, a in ablation.groupby("dataset", sort=False):
        a = a[(a["feature"] == "joint") | (a["protocol"] == "finetune")]
        if a.empty:
            continue
        groups = list(a.groupby(["protocol", "backbone", "view", "feature"], sort=False))
        models = [m for m in ABLATION_MODELS
                  if ((a["intra_negative"] == m[0]) & (a["variant"] == m[1])).any()]  # fmt: skip
        width = 0.8 / len(models)
        fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(groups) + 2), 4.5))
        for i, (neg, variant) in enumerate(models):
            xs, ys, errs, paper_xs, paper_ys = [], [], [], [], []
            for x, (_, g) in enumerate(groups):
                hit = g[(g["intra_negative"] == neg) & (g["variant"] == variant)]
                if hit.empty:
                    continue
                r = hit.iloc[0]
                pos = x - 0.4 + width * (i + 0.5)
                xs.append(pos)
                ys.append(r["mean"])
                errs.append(0.0 if r["std"] != r["std"] else r["std"])
                if r["paper_value"] == r["paper_value"]:
                    paper_xs.append(pos)
                    paper_ys.append(r["paper_value"])
            bars = ax.bar(
                xs, ys, width, yerr=errs, capsize=3, label=ABLATION_LABELS[(neg, variant)]
            )
            if paper_xs:
                ax.scatter(paper_xs, paper_ys, marker="_", s=300, lw=2.5, zorder=3,
                           color=bars.patches[0].get_facecolor())  # fmt: skip
        labels = [f"{b} {v}\n{'retrieval (joint)' if p == 'retrieval' else 'fine-tuning'}"
                  for (p, b, v, _), _ in groups]  # fmt: skip
        ax.set_xticks(range(len(groups)), labels=labels, fontsize=8)
        title = f"{dataset}: intra-negative ablation, top-1 (mean ± std over seeds)"
        if any(a["paper_value"].notna()):
            ax.scatter([], [], marker="_", s=300, lw=2.5, color="grey", label="paper")
            title += "; ticks: the paper"
        ax.set(ylabel="top-1 accuracy (%)", title=title)
        ax.legend(fontsize=7)
        path = layout.plots(settings) / f"ablation_{dataset}.png"
        with io.atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


# --------------------------------------------------------------------------- summary.md


def _fmt(x, digits: int = 1) -> str:
    return "—" if x is None or x != x else f"{x:.{digits}f}"


def _signed(x) -> str:
    return "—" if x is None or x != x else f"{x:+.1f}"


def _mean_std(values) -> str:
    values = list(values)
    if not values:
        return "—"
    import statistics

    if len(values) == 1:
        return _fmt(values[0])
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _setting(row) -> str:
    init = {"iic": f"IIC {row['intra_negative']}", "cmc": "CMC", "random": "random init"}
    text = f"{row['backbone']} {row['view']} · {init[row['init']]}"
    return text + (f" · {row['variant']}" if row["variant"] else "")


def _label(group) -> str:
    """The setting of a group of rows, marked when older code made any of them."""
    return _setting(group.iloc[0]) + (f" {STALE}" if group["stale"].any() else "")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _paper_label(p: paper.PaperNumber) -> str:
    label = p.method + (f" [{p.backbone}]" if p.backbone else "")
    return label + (" †" if p.table.startswith(paper.ARCHITECTURE_TABLE) else "")


def _paper_retrieval(table, dataset: str) -> str:
    """The paper's retrieval table: ours (mean over seeds) / paper (Δ) for k = 1 ... 50."""
    ret = table[(table["dataset"] == dataset) & (table["protocol"] == "retrieval")]
    # The feature the paper reports per init: joint for IIC and CMC (spec 10.7), RGB for random.
    papers_feature = ret["modality"] == ret["init"].map({"random": "rgb"}).fillna("joint")
    ret = ret[ret["metric"].isin(TOPK) & (papers_feature | ret["paper_value"].notna())]
    rows, covered = [], set()
    keys = ["backbone", "view", "init", "intra_negative", "variant", "modality"]
    for _, g in ret.groupby(keys, sort=False):
        first, cells = g.iloc[0], []
        for k in TOPK:
            gk = g[g["metric"] == k]
            p = gk["paper_value"].iloc[0] if not gk.empty else None
            ours = _mean_std(gk["value"])
            delta = f" ({_signed(gk['value'].mean() - p)})" if p == p and p is not None else ""
            cells.append(f"{ours} / {_fmt(p)}{delta}")
        methods = [m for m in g["paper_method"] if m]
        label = f"{methods[0]} [{first['backbone']}]" if methods else "—"
        covered.add(label)
        seeds = str(g["seed"].nunique())
        rows.append([f"{_label(g)} ({first['modality']})", label, seeds] + cells)
    rows += _paper_only(dataset, "retrieval", covered)
    header = ["ours (feature)", "paper row", "seeds"]
    header += [f"top-{k[3:]} ours / paper (Δ)" for k in TOPK]
    return _md_table(header, rows)


def _paper_only(dataset: str, protocol: str, covered: set) -> list[list[str]]:
    """Paper rows without a result of ours: other methods, and our settings not run yet."""
    groups: dict[str, dict] = {}
    for p in paper.numbers(dataset, protocol):
        label = _paper_label(p)
        if label.removesuffix(" †") not in covered and not p.table.startswith(paper.RELEASED_TABLE):
            groups.setdefault(label, {})[p.metric] = p.value
    if protocol == "retrieval":
        return [
            ["—", lb, "0"] + [f"— / {_fmt(v.get(k))}" for k in TOPK] for lb, v in groups.items()
        ]
    return [["—", lb, "—", "—", _fmt(v.get("top1")), "—"] for lb, v in groups.items()]


def _paper_recognition(table, dataset: str) -> str:
    """The paper's recognition table: ours on split 1 and as a 3-split mean, beside the paper's."""
    ft = table[(table["dataset"] == dataset) & (table["protocol"] == "finetune")]
    rows, covered = [], set()
    keys = ["backbone", "view", "init", "intra_negative", "variant"]
    for _, g in ft.groupby(keys, sort=False):
        first = g.iloc[0]
        args = (dataset, "finetune", *first[["backbone", "view", "intra_negative"]], "top1")
        p_mean, p_1 = paper.lookup(*args, split="mean"), paper.lookup(*args, split="1")
        label = f"{p_mean.method} [{first['backbone']}]" if p_mean else "—"
        covered.add(label)
        split1, mean = g[g["split"] == "1"]["value"], g[g["split"] == "mean"]["value"]
        split1_text = _mean_std(split1) + (f" (paper split 1: {_fmt(p_1.value)})" if p_1 else "")
        delta = _signed(mean.mean() - p_mean.value) if p_mean and len(mean) else "—"
        paper_mean = _fmt(p_mean.value) if p_mean else "—"
        rows.append([_label(g), label, split1_text, _mean_std(mean), paper_mean, delta])
    rows += _paper_only(dataset, "finetune", covered)
    header = ["ours", "paper row", "ours split 1", "ours 3-split mean", "paper (3-split mean)",
              "Δ (mean − paper)"]  # fmt: skip
    return _md_table(header, rows)


def _margin(g, random_g) -> str:
    """Top-1 margin over random init, paired by seed where both exist."""
    if random_g is None or random_g.empty or g.empty:
        return "—"
    a, b = g.set_index("seed")["value"], random_g.set_index("seed")["value"]
    common = a.index.intersection(b.index)
    diff = (a[common] - b[common]).mean() if len(common) else a.mean() - b.mean()
    return _signed(diff)


def _seed_tables(table, dataset: str) -> str:
    """Mean ± std over seeds per setting and feature, with the margin over random init."""
    out = []
    d = table[(table["dataset"] == dataset) & (table["split"] != "mean")]
    ret = d[d["protocol"] == "retrieval"]
    if not ret.empty:
        rows = []
        keys = ["backbone", "view", "init", "intra_negative", "variant", "modality", "split"]
        randoms = ret[(ret["init"] == "random") & (ret["metric"] == "top1")]
        variants = sorted(randoms["variant"].unique())
        for _, g in ret.groupby(keys, sort=False):
            first = g.iloc[0]
            cells = [_mean_std(g[g["metric"] == k]["value"]) for k in TOPK]
            top1 = g[g["metric"] == "top1"]
            margins = []
            for v in variants:
                r = randoms[(randoms["backbone"] == first["backbone"])
                            & (randoms["view"] == first["view"]) & (randoms["variant"] == v)
                            & (randoms["modality"] == first["modality"])]  # fmt: skip
                margins.append("—" if first["init"] == "random" else _margin(top1, r))
            rows.append([_label(g), first["modality"], str(g["seed"].nunique())]
                        + cells + margins)  # fmt: skip
        header = ["setting", "feature", "seeds"] + [f"top-{k[3:]}" for k in TOPK]
        header += [f"top-1 margin over random init{f' ({v})' if v else ''}" for v in variants]
        out.append(f"### Retrieval\n\n{_md_table(header, rows)}")
    ft = d[d["protocol"] == "finetune"]
    if not ft.empty:
        rows = []
        randoms = ft[ft["init"] == "random"]
        for _, g in ft.groupby(["backbone", "view", "init", "intra_negative", "variant", "split"],
                               sort=False):  # fmt: skip
            first = g.iloc[0]
            r = randoms[
                (randoms["backbone"] == first["backbone"])
                & (randoms["view"] == first["view"])
                & (randoms["split"] == first["split"])
            ]
            margin = "—" if first["init"] == "random" else _margin(g, r)
            rows.append([_label(g), first["split"], str(g["seed"].nunique()),
                         _mean_std(g["value"]), margin])  # fmt: skip
        header = ["setting", "split", "seeds", "top-1", "margin over random init"]
        out.append(f"### Fine-tuning (video top-1)\n\n{_md_table(header, rows)}")
    return "\n".join(out)


def _pretrain_table(runs: dict) -> str:
    rows = []
    for (dataset, run), info in sorted(runs.items()):
        c, final = info["curve"], info["final"]
        last = c.iloc[-1].to_dict() if not c.empty else {}
        loss = final.get("final_loss", last.get("loss"))
        rank1 = final.get("final_positive_rank1", last.get("positive_rank1"))
        epochs = final.get("epochs", last.get("epoch"))
        run = f"{run} {STALE}" if final and _older_code(final, "pretrain") else run
        rows.append([dataset, run, _fmt(epochs, 0), _fmt(loss, 3), _fmt(final.get("chance_loss"), 3),
                     _fmt(rank1, 3), "yes" if final else "no (running or stopped)"])  # fmt: skip
    header = ["dataset", "run", "epochs", "final loss", "chance loss", "positive ranked 1st",
              "finished"]  # fmt: skip
    return _md_table(header, rows)


def _video_counts(path: Path, data: dict) -> list[tuple[str, str, dict]]:
    """(protocol, subset, counts) of the usable-video counts a metrics.json records."""
    counts = data.get("counts") or {}
    if "videos" in data:  # pretraining: its training subset
        return [("pretrain", "train", data["videos"])]
    if "gallery" in counts:  # retrieval: gallery = train, queries = test
        return [("retrieval", "train", counts["gallery"]), ("retrieval", "test", counts["query"])]
    if "train_list" in counts:
        return [
            ("finetune", "train", counts["train_list"]),
            ("finetune", "test", counts["test_list"]),
        ]
    return []


def _exclusions(sources: list) -> str:
    """Every video a step left out (data.datasets: not decoded, too short, no flow), by step,
    dataset and subset; runs that left out the same videos share a row."""
    groups: dict[tuple, dict] = {}
    for src in sources:
        path = Path(src["path"])
        if path.suffix != ".json" or not path.is_file():
            continue
        data = io.read_json(path)
        dataset = (
            path.parent.parent.parent if src["kind"] == "finetune" else path.parent.parent
        ).name
        for protocol, subset, c in _video_counts(path, data):
            videos = tuple(c.get("excluded_videos") or ())
            reasons = c.get("excluded_by_reason") or {}
            key = (protocol, dataset, subset, videos, tuple(sorted(reasons.items())))
            g = groups.setdefault(
                key, {"runs": 0, "listed": c.get("listed"), "used": c.get("used")}
            )
            g["runs"] += 1
    rows = []
    for (protocol, dataset, subset, videos, reasons), g in sorted(groups.items()):
        if not videos:
            continue
        why = ", ".join(f"{n} {r}" for r, n in reasons) or str(len(videos))
        shown = ", ".join(f"`{v}`" for v in videos[:10]) + (" …" if len(videos) > 10 else "")
        rows.append([protocol, dataset, subset, str(g["runs"]), _fmt(g["listed"], 0),
                     _fmt(g["used"], 0), why, shown])  # fmt: skip
    intro = (
        "Videos a step could not use (frame step failures, fewer frames than one clip needs, no "
        "flow), from each result's metrics.json; a step stops instead when more than "
        "`data.max_excluded_fraction` of a subset is left out.\n\n"
    )
    if not rows:
        return intro + "* none: every listed video was used\n"
    header = ["step", "dataset", "subset", "runs", "listed", "used", "left out", "videos"]
    return intro + _md_table(header, rows)


def _missing(settings: Any, table, runs: dict) -> list[str]:
    """Results the preset's grid (iicrepro.grid, as the workflow builds it) implies but that were
    not found."""
    have = {(r.dataset, r.protocol, Path(r.source.split(";")[0]).parent.name, r.split)
            for r in table.itertuples()}  # fmt: skip
    missing = []
    for r in grid.expected(settings):
        if r.protocol == "pretrain":
            found = bool((runs.get((r.dataset, r.run)) or {}).get("final"))
        else:
            found = (r.dataset, r.protocol, r.run, str(r.split)) in have
        if not found:
            missing.append(str(r))
    return missing


def _absent_videos(settings: Any) -> list[str]:
    """Per dataset of the grid: listed videos the splits step found absent (when it recorded it)."""
    from iicrepro.data import splits

    lines = []
    for d in grid.needed_datasets(settings):
        folder = layout.manifests(settings, d)
        n = splits.missing_count(folder)
        if n is not None:
            lines.append(f"{d}: {n or 'none'}" + (f" (`{folder / splits.MISSING}`)" if n else ""))
    return lines


# The retrieval feature a summary leads with: the paper's (joint) on its datasets; RGB on the
# synthetic data, where the calibration chose it on validation before any test run
# (docs/synthetic.md).
HEADLINE_FEATURE = {"synthetic": "rgb"}


def _top1(table, dataset: str, protocol: str, neg: str, variant: str = "", feature: str = ""):
    t = table[(table["dataset"] == dataset) & (table["protocol"] == protocol)
              & (table["metric"] == "top1") & (table["intra_negative"] == neg)
              & (table["variant"] == variant) & (table["split"] != "mean")]  # fmt: skip
    if feature:
        t = t[t["modality"] == feature]
    return t["value"].astype(float).mean() if not t.empty else None


def headline(settings: Any, table) -> str:
    """The summary's first lines: in words, what to look at and what it shows."""
    dataset = settings["pretrain"]["dataset"]
    if table.empty or dataset not in set(table["dataset"]):
        return ""
    feature = HEADLINE_FEATURE.get(dataset, "joint")
    chance = ""
    if dataset == "synthetic":
        chance = f" (chance {100 / len(settings['synthetic']['classes']):.0f} %)"
    random = _top1(table, dataset, "retrieval", "random", "bnrecal", feature)
    baseline = "random init with BatchNorm statistics recalibrated, the stronger baseline"
    if random is None:
        random = _top1(table, dataset, "retrieval", "random", "", feature)
        baseline = "random init"
    lines = [
        "**What to look at.** Self-supervised pretraining works if the pretrained network's "
        "retrieval top-1 (the nearest training video of each test video, by features alone, has "
        f"its class) is well above that of the same network at random init{chance}, and if "
        "fine-tuning from it is at least as good as fine-tuning from random init. "
        f"Headline feature: {feature}. Mean over seeds:\n"
    ]
    ft_random = _top1(table, dataset, "finetune", "random")
    for neg in ("repeat", "shuffle", "none"):
        ours = _top1(table, dataset, "retrieval", neg, "", feature)
        if ours is None:
            continue
        name = "CMC (no intra-negative)" if neg == "none" else f"IIC {neg}"
        text = f"* {name}: retrieval top-1 **{ours:.1f}**"
        if random is not None:
            text += f" against {random:.1f} for {baseline}: **{ours - random:+.1f} points**"
        ft = _top1(table, dataset, "finetune", neg)
        if ft is not None and ft_random is not None:
            text += (f"; fine-tuning top-1 {ft:.1f} against {ft_random:.1f} from random init "
                     f"({ft - ft_random:+.1f})")  # fmt: skip
        lines.append(text + ".\n")
    return "".join(lines) if len(lines) > 1 else ""


def render_md(
    settings: Any, table, runs: dict, sources: list, plots: list[Path], ablation=None
) -> str:
    now = datetime.now(UTC).isoformat(timespec="seconds")
    lead = headline(settings, table)
    parts = [
        "# IIC reproduction: results beside the paper\n",
        *([lead] if lead else []),
        f"Preset `{settings.get('preset', '')}`, generated {now} by `iicrepro report` "
        f"(code {io.code_version()}). Accuracies in %. Paper numbers: "
        "`src/iicrepro/paper_results.csv` (the paper's and upstream README's tables; its `source` "
        "column says where each number comes from). Δ = ours − paper. Where several seeds exist, "
        "ours = mean ± std over seeds. Long form of every number: `summary.csv`. "
        "† = post-paper README table (3-split average).\n",
    ]
    datasets = sorted(set(table["dataset"])) if not table.empty else []
    for dataset, name in PAPER_DATASETS.items():
        if dataset not in datasets:
            parts.append(f"## {name}\n\nNo {name} results yet (the `paper` preset runs them).\n")
            continue
        parts.append(
            f"## {name} retrieval (split 1)\n\nThe paper's IIC rows are joint retrieval "
            "(RGB and second-view features concatenated, spec 10.7), so they sit beside our `joint` "
            "rows; its random-init row is RGB.\n\n" + _paper_retrieval(table, dataset)
        )
        parts.append(
            f"## {name} recognition (fine-tuning, video top-1)\n\nThe paper's recognition "
            "numbers are 3-split means (spec 17), compared with our mean over splits 1-3 when all "
            "three exist. The benchmark index lists HMDB51 IIC 38.8 as the 3-split average and 38.3 "
            "without a split, so the table's HMDB51 numbers may be split 1.\n\n"
            + _paper_recognition(table, dataset)
        )
    for dataset in datasets:
        parts.append(f"## {dataset}: mean ± std over seeds\n\n" + _seed_tables(table, dataset))
    if ablation is None:
        ablation = ablation_table(table)
    for dataset in [d for d in datasets if (ablation["dataset"] == d).any()]:
        paper_note = (" After the `/`: the paper's number (UCF101 retrieval split 1, recognition "
                      "3-split mean)." if dataset in PAPER_DATASETS else "")  # fmt: skip
        parts.append(
            f"## {dataset}: intra-negative ablation (top-1)\n\nThe paper's ablation: the same "
            "backbone and view pretrained without intra-negatives (CMC) and with each kind, "
            "beside random init. Mean ± std over seeds (number of seeds)."
            + paper_note
            + f" Long form: `ablation.csv`; chart: `plots/ablation_{dataset}.png`.\n\n"
            + _ablation_md(ablation, dataset)
        )
    if runs:
        parts.append("## Pretraining runs\n\n" + _pretrain_table(runs))
    parts.append("## Videos left out\n\n" + _exclusions(sources))
    if plots:
        parts.append("## Plots\n\n" + "".join(f"* `plots/{p.name}`\n" for p in plots))
    absent = _absent_videos(settings)
    if absent:
        parts.append(
            "## Videos absent from the archives\n\nListed in the official splits but not in the "
            "extracted archive, so left out of the manifests (at most `splits.max_missing` of "
            "them):\n\n" + "".join(f"* {line}\n" for line in absent)
        )
    missing = _missing(settings, table, runs)
    parts.append(
        "## Missing\n\nExpected from the params.yaml grid of this preset but not found:\n\n"
        + ("".join(f"* {m}\n" for m in missing) if missing else "* nothing\n")
    )
    stale = [s for s in sources if s["stale"]]
    if stale:
        parts.append(
            f"## Stale results\n\n{len(stale)} result files were made by older code (rows marked "
            f"{STALE} above): the code fingerprint their step recorded in their provenance, or that "
            "of the pretraining run they evaluate, differs from the current code's. "
            "`snakemake --cores N` (or `dvc repro`) reruns exactly the jobs whose code changed and "
            "those that use their outputs; if the change is known not to affect them, "
            '`snakemake --touch` keeps them as they are (README, "Keeping results after a neutral '
            'code change").\n\n' + "".join(f"* `{s['path']}` ({s['kind']})\n" for s in stale)
        )
    versions = sorted({s["code_version"] for s in sources})
    parts.append(
        "## Sources\n\nEvery number above comes from these files (code versions: "
        + (", ".join(f"`{v}`" for v in versions) or "none")
        + "):\n\n"
        + "".join(
            f"* `{s['path']}` ({s['kind']}, code `{s['code_version']}`"
            + (f", {STALE}: made by older code)\n" if s["stale"] else ")\n")
            for s in sources
        )
    )
    return "\n".join(parts)
