"""`iicrepro report` on result folders written the way the pipeline steps write them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest
from mlflow_server import free_port

from iicrepro import cli, config, grid, io, layout, paper, report, track

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def settings_for(results: Path, preset: str = "proof", *overrides: str):
    return config.load(ROOT / "params.yaml", preset, [f"paths.results={results}", *overrides])


def paper_csv_value(**match) -> float:
    """A number straight from the spec's CSV (not through iicrepro.paper)."""
    with open(ROOT / "src" / "iicrepro" / "paper_results.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if all(m(r[k]) for k, m in match.items())]
    assert len(rows) == 1, rows
    return float(rows[0]["value"])


def write_retrieval(settings, dataset: str, run: str, top1: float) -> Path:
    view = layout.parse_run_name(run)["view"]
    rows = [
        {"modality": m, "metric": f"top{k}", "value": top1 + 10 * i + 2 * j}
        for j, m in enumerate(["rgb", view, "joint", "joint_l2"])
        for i, k in enumerate([1, 5, 10, 20, 50])
    ]
    out = layout.retrieval_dir(settings, dataset, run) / "metrics.json"
    io.write_json(out, {"rows": rows, "split": 1, "bn": "as-initialised",
                        "provenance": io.provenance(settings)})  # fmt: skip
    return out


def write_finetune(settings, dataset: str, split: int, run: str, top1: float) -> Path:
    out = layout.finetune_dir(settings, dataset, split, run) / "metrics.json"
    io.write_json(out, {"top1": top1, "clip_top1": top1 - 5, "best_epoch": 3,
                        "provenance": io.provenance(settings)})  # fmt: skip
    return out


def write_pretrain(settings, neg: str, seed: int, epochs: int = 4) -> Path:
    run_dir = layout.pretrain_dir(settings, "r3d", "residual", neg, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = ["epoch,loss,lr,positive_rank1,samples_per_s,seconds"]
    lines += [f"{e},{12 - e + seed / 10},0.03,{e / 10},100,{e}" for e in range(1, epochs + 1)]
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
    io.write_json(run_dir / "metrics.json", {"final_loss": 12 - epochs, "chance_loss": 12.48,
                                             "epochs": epochs})  # fmt: skip
    return run_dir


@pytest.fixture
def results(tmp_path):
    """A partial grid: synthetic seeds 0 and 1, a UCF101/HMDB51 R3D model, one CMC run."""
    s = settings_for(tmp_path / "results")
    for seed in (0, 1):
        for neg, top1 in (("repeat", 50), ("none", 60), ("random", 25)):
            write_retrieval(s, "synthetic", f"r3d-residual-{neg}-s{seed}", top1 + seed)
        write_retrieval(s, "synthetic", f"r3d-residual-random-s{seed}-bnrecal", 33 + seed)
        for neg in ("repeat", "none"):
            write_pretrain(s, neg, seed)
    write_retrieval(s, "ucf101", "r3d-residual-repeat-s632", 35)
    write_retrieval(s, "ucf101", "r3d-residual-random-s632", 10)
    write_retrieval(s, "ucf101", "r3d-u-none-s632", 27)
    write_retrieval(s, "hmdb51", "r3d-residual-repeat-s632", 12)
    for split, top1 in ((1, 71.0), (2, 73.0), (3, 72.5)):
        write_finetune(s, "ucf101", split, "r3d-residual-repeat-s632", top1)
    write_finetune(s, "hmdb51", 1, "r3d-residual-repeat-s632", 33.0)
    write_finetune(s, "synthetic", 1, "r3d-residual-repeat-s0", 70.0)
    return s


def row(table, **where) -> pd.Series:
    hit = table
    for k, v in where.items():
        hit = hit[hit[k].astype(str) == str(v)]
    assert len(hit) == 1, (where, hit)
    return hit.iloc[0]


def test_paper_values_join_the_right_rows(results):
    out = track_off_build(results)
    t = pd.read_csv(out["csv"], dtype={"split": str, "variant": str}, keep_default_na=False,
                    na_values={"paper_value": [""], "delta": [""]})  # fmt: skip
    ucf = dict(dataset="ucf101", protocol="retrieval", backbone="r3d", variant="")

    iic = paper_csv_value(table=lambda t: t.startswith("README-retrieval-UCF101-split1"),
                          pretrain_setting=lambda s: "IIC (repeat + res)" in s,
                          metric=lambda m: m == "top1")  # fmt: skip
    assert iic == 36.5
    r = row(t, **ucf, view="residual", intra_negative="repeat", modality="joint", metric="top1")
    assert (r["value"], r["paper_value"]) == (39.0, iic) and r["delta"] == pytest.approx(2.5)
    assert r["init"] == "iic" and r["split"] == "1" and r["seed"] == 632
    # The released weights' RGB-only number sits beside our RGB feature; top-5 has none.
    rgb = paper_csv_value(table=lambda t: t.startswith("README-released"),
                          modality=lambda m: "modality=rgb" in m)  # fmt: skip
    r = row(t, **ucf, view="residual", intra_negative="repeat", modality="rgb", metric="top1")
    assert r["paper_value"] == rgb
    assert pd.isna(row(t, **ucf, view="residual", intra_negative="repeat", modality="rgb",
                       metric="top5")["paper_value"])  # fmt: skip
    # Random init: the paper's RGB row; CMC: joint, whatever the view.
    r = row(t, **ucf, intra_negative="random", modality="rgb", metric="top10")
    assert r["init"] == "random" and r["paper_value"] == paper_csv_value(
        table=lambda t: t.startswith("README-retrieval"),
        pretrain_setting=lambda s: "R3D (random)" in s, metric=lambda m: m == "top10")  # fmt: skip
    assert pd.isna(row(t, **ucf, intra_negative="random", modality="joint", metric="top1")[
        "paper_value"])  # fmt: skip
    r = row(t, **ucf, view="u", intra_negative="none", modality="joint", metric="top20")
    assert r["init"] == "cmc" and r["paper_value"] == 53.2

    # No paper number: HMDB51 R3D retrieval, synthetic data, BN-recalibrated variants.
    hm = t[(t["dataset"] == "hmdb51") & (t["protocol"] == "retrieval")]
    syn = t[t["dataset"] == "synthetic"]
    assert len(hm) == 20 and hm["paper_value"].isna().all() and hm["delta"].isna().all()
    assert len(syn) > 0 and syn["paper_value"].isna().all()

    # Fine-tuning: split 1 beside the released split-1 model, the 3-split mean beside the table.
    ft = dict(dataset="ucf101", protocol="finetune", intra_negative="repeat", metric="top1")
    assert row(t, **ft, split="1")["paper_value"] == 72.7
    assert pd.isna(row(t, **ft, split="2")["paper_value"])
    mean = row(t, **ft, split="mean")
    table_value = paper_csv_value(table=lambda t: t.startswith("README-recognition"),
                                  dataset=lambda d: d == "UCF101",
                                  pretrain_setting=lambda s: "repeat + res" in s)  # fmt: skip
    assert mean["value"] == pytest.approx((71.0 + 73.0 + 72.5) / 3)
    assert mean["paper_value"] == table_value
    assert mean["delta"] == pytest.approx(mean["value"] - table_value)
    assert len(mean["source"].split(";")) == 3
    assert "mean" not in set(t[t["dataset"] == "hmdb51"]["split"])  # one split only: no mean


def test_summary_md_lays_out_the_papers_tables(results):
    out = track_off_build(results)
    md = out["md"].read_text()
    for heading in ["## UCF101 retrieval", "## UCF101 recognition", "## HMDB51 retrieval",
                    "## HMDB51 recognition", "## synthetic: mean ± std over seeds",
                    "## Pretraining runs", "## Missing", "## Sources"]:  # fmt: skip
        assert heading in md
    assert (
        "| r3d residual · IIC repeat (joint) | IIC (repeat + res) [r3d] | 1 | 39.0 / 36.5 (+2.5)"
        in md
    )
    assert "| 72.2 | 72.8 | -0.6 |" in md  # UCF101 3-split mean beside the table's 72.8
    assert "| — | VCOP [r3d] | 0 | — / 14.1 |" in md  # other methods stay in the table
    # Synthetic: mean ± std over the two seeds and the paired margin over random init.
    syn = md[md.index("## synthetic") : md.index("## ucf101")]
    assert "| r3d residual · IIC repeat | joint | 2 | 54.5 ± 0.7 |" in syn
    assert "| +25.0 | +17.0 |" in syn  # vs random (as initialised) and vs random (bnrecal)
    missing = md[md.index("## Missing") : md.index("## Sources")]
    assert "pretrain synthetic/r3d-residual-shuffle-s2" in missing
    assert "retrieval synthetic/r3d-residual-repeat-s0\n" not in missing
    for path in Path(results["paths"]["results"]).rglob("metrics.json"):
        assert f"`{path}`" in md  # every metrics file is listed as a source


def test_plots_are_valid_pngs(results):
    import matplotlib.image

    out = track_off_build(results)
    names = sorted(p.name for p in out["plots"])
    assert names == ["ablation_hmdb51.png", "ablation_synthetic.png", "ablation_ucf101.png",
                     "pretrain_loss.png", "retrieval_topk_hmdb51.png",
                     "retrieval_topk_synthetic.png", "retrieval_topk_ucf101.png"]  # fmt: skip
    for p in out["plots"]:
        assert p.parent == layout.plots(results) and p.read_bytes()[:8] == PNG_SIGNATURE
        h, w, _ = matplotlib.image.imread(p).shape
        assert h > 200 and w > 300


def test_ablation_table_and_chart_beside_the_paper(results):
    out = track_off_build(results)
    a = pd.read_csv(out["ablation"], keep_default_na=False, na_values={"std": [""],
                    "paper_value": [""]})  # fmt: skip
    key = dict(protocol="retrieval", backbone="r3d", view="residual")
    # Synthetic: mean ± std over the two seeds, per model and feature; no paper numbers.
    r = row(a, dataset="synthetic", **key, feature="joint", intra_negative="repeat", variant="")
    assert (r["seeds"], r["mean"]) == (2, 54.5) and r["std"] == pytest.approx(0.7071, abs=1e-3)
    r = row(a, dataset="synthetic", **key, feature="rgb", intra_negative="random",
            variant="bnrecal")  # fmt: skip
    assert r["mean"] == 33.5 and pd.isna(r["paper_value"])
    assert (a[a["dataset"] == "synthetic"]["feature"] != "joint_l2").all()
    # UCF101: the paper's ablation numbers beside ours (joint); CMC whatever the view.
    r = row(a, dataset="ucf101", **key, feature="joint", intra_negative="repeat")
    assert (r["mean"], r["paper_value"], r["seeds"]) == (39.0, 36.5, 1) and pd.isna(r["std"])
    r = row(a, dataset="ucf101", protocol="retrieval", view="u", feature="joint",
            intra_negative="none")  # fmt: skip
    assert (r["mean"], r["paper_value"]) == (31.0, 26.4)
    # Fine-tuning: the 3-split mean where all three splits exist, beside the paper's mean.
    r = row(a, dataset="ucf101", protocol="finetune", intra_negative="repeat")
    assert r["mean"] == pytest.approx(72.1667, abs=1e-3) and r["paper_value"] == 72.8
    assert r["feature"] == "finetune"

    md = out["md"].read_text()
    syn = md[md.index("## synthetic: intra-negative ablation") :]
    syn = syn[: syn.index("\n## ")]
    assert ("| backbone · view | top-1 | CMC (none) | IIC repeat | random init | "
            "random init (BN recal.) |") in syn  # fmt: skip
    assert ("| r3d · view 2 = residual | retrieval, joint feature | 64.5 ± 0.7 (2) | "
            "54.5 ± 0.7 (2) | 29.5 ± 0.7 (2) | 37.5 ± 0.7 (2) |") in syn  # fmt: skip
    ucf = md[md.index("## ucf101: intra-negative ablation") :]
    assert "| r3d · view 2 = residual | retrieval, joint feature | — | 39.0 (1) / 36.5 |" in ucf
    assert "| r3d · view 2 = u | retrieval, joint feature | 31.0 (1) / 26.4 | — |" in ucf
    assert "| r3d · view 2 = residual | fine-tuning | — | 72.2 (1) / 72.8 |" in ucf

    chart = layout.plots(results) / "ablation_synthetic.png"
    assert chart in out["plots"] and chart.read_bytes()[:8] == PNG_SIGNATURE


def test_summary_opens_with_what_to_look_at(results, tmp_path):
    md = track_off_build(results)["md"].read_text()
    lead = md[md.index("\n") : md.index("Preset `proof`")]
    assert "**What to look at.**" in lead and "Headline feature: rgb" in lead
    assert "(chance 10 %)" in lead
    # IIC repeat RGB 50.5 (seeds 0, 1) against 33.5 for the BN-recalibrated random init.
    assert "* IIC repeat: retrieval top-1 **50.5** against 33.5 for random init with" in lead
    assert "**+17.0 points**" in lead
    assert "* CMC (no intra-negative): retrieval top-1 **60.5**" in lead
    # Fine-tuning from IIC and from random init are compared when both exist.
    write_finetune(results, "synthetic", 1, "r3d-residual-random-s0", 64.0)
    md = track_off_build(results)["md"].read_text()
    assert "fine-tuning top-1 70.0 against 64.0 from random init (+6.0)" in md
    # Nothing to compare: no lead.
    empty = track_off_build(settings_for(tmp_path / "empty", "demo"))["md"].read_text()
    assert "What to look at" not in empty


def test_empty_results_still_report(tmp_path):
    s = settings_for(tmp_path / "empty", "demo")
    out = track_off_build(s)
    assert list(pd.read_csv(out["csv"]).columns)[:14] == [
        "dataset", "protocol", "backbone", "view", "intra_negative", "init", "split", "seed",
        "modality", "variant", "metric", "value", "paper_value", "delta",
    ]  # fmt: skip
    md = out["md"].read_text()
    assert "No UCF101 results yet" in md and "pretrain synthetic/r3d-residual-repeat-s0" in md
    assert out["plots"] == []


@pytest.mark.slow  # a DVC / Snakemake / MLflow round trip
def test_cli_report_syncs_pending_runs_and_logs_one_summary_run(
    results, monkeypatch, session_mlflow_uri
):
    import mlflow

    # A retrieval job and a report that ran while the tracking server was down are queued.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    run_dir = layout.retrieval_dir(results, "synthetic", "r3d-residual-repeat-s1")
    assert track.log_retrieval(results, run_dir) is None
    argv = ["report", "--params", str(ROOT / "params.yaml"), "--preset", "proof",
            "--results", results["paths"]["results"]]  # fmt: skip
    assert cli.main(argv) == 0
    pending = [json.loads(x) for x in layout.mlflow_pending(results).read_text().splitlines()]
    assert [e["kind"] for e in pending] == ["retrieval", "summary"]
    assert pending[0]["record"]["run_dir"] == str(run_dir)

    uri = session_mlflow_uri  # the test session's store (tables made once per session)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert cli.main(argv) == 0  # syncs both, then finds its own table already logged
    assert cli.main(argv) == 0  # idempotent: an unchanged table is not logged again
    assert layout.mlflow_pending(results).read_text() == ""
    mlflow.set_tracking_uri(uri)
    key = "tags.`iicrepro.key` = '{}'".format
    synced = mlflow.search_runs(
        experiment_names=["iicrepro/proof/retrieval"],
        filter_string=key("retrieval/synthetic/r3d-residual-repeat-s1"),
    )
    assert list(synced["tags.iicrepro.run_dir"]) == [str(run_dir)]
    assert synced["metrics.joint.top1"].iloc[0] == 55.0
    summaries = mlflow.search_runs(
        experiment_names=["iicrepro/proof/summary"],
        filter_string=key("summary/proof"),
        output_format="list",
    )
    assert len(summaries) == 1
    client = mlflow.MlflowClient(uri)
    run = summaries[0]
    top = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert top == {"summary.csv", "summary.md", "plots", "summary_table.json"}
    assert len(client.list_artifacts(run.info.run_id, "plots")) == 7  # 4 + 3 ablation charts
    assert run.data.metrics["rows"] == len(pd.read_csv(layout.summary_csv(results)))
    # the grid's size and what it misses, from the one grid definition the workflow uses too
    md = layout.summary_md(results).read_text()
    listed = md[md.index("## Missing") : md.index("## Sources")].count("\n* ")
    assert run.data.metrics["expected_results"] == len(grid.expected(results))
    assert run.data.metrics["missing_results"] == listed > 0
    # the results table is also an MLflow table, searchable in the UI
    table = client.load_table(run.info.experiment_id, "summary_table.json", [run.info.run_id])
    assert len(table) == len(pd.read_csv(layout.summary_csv(results)))
    assert {"dataset", "protocol", "metric", "value", "paper_value"} <= set(table.columns)


def track_off_build(settings):
    from iicrepro import report

    return report.build(settings, mlflow=False)


def test_lookup_maps_the_papers_vocabulary():
    p = paper.lookup("ucf101", "retrieval", "r21d", "residual", "shuffle", "top5", "joint")
    assert p.value == 45.6 and p.table.startswith(paper.ARCHITECTURE_TABLE)
    p = paper.lookup("hmdb51", "finetune", "r3d18", "residual", "repeat", "top1", split="mean")
    assert p.value == 34.3
    assert paper.lookup("ucf101", "retrieval", "r3d", "v", "repeat", "top1", "joint") is None
    assert paper.lookup("ucf101", "finetune", "r3d", "v", "shuffle", "top1", split="1") is None


def test_summary_md_lists_the_videos_each_step_left_out(results):
    md = track_off_build(results)["md"].read_text()
    assert "## Videos left out" in md and "* none: every listed video was used" in md
    path = layout.retrieval_dir(results, "ucf101", "r3d-residual-repeat-s632") / "metrics.json"
    data = io.read_json(path)
    kept = {"listed": 6, "used": 6, "excluded_videos": [], "excluded_by_reason": {}}
    data["counts"] = {
        "gallery": {"listed": 100, "used": 98, "excluded_by_reason": {"corrupt": 1, "too_short": 1},
                    "excluded_videos": ["A/v_a.avi", "B/v_b.avi"]},
        "query": kept,
    }  # fmt: skip
    io.write_json(path, data)
    md = track_off_build(results)["md"].read_text()
    section = md[md.index("## Videos left out") :]
    assert (
        "| retrieval | ucf101 | train | 1 | 100 | 98 | 1 corrupt, 1 too_short | "
        "`A/v_a.avi`, `B/v_b.avi` |" in section
    )
    assert "| retrieval | ucf101 | test |" not in section  # nothing left out there


def test_rows_made_by_older_code_are_marked_stale(results, tmp_path):
    """A result whose recorded code fingerprint differs from the current code's is marked, with how
    to rerun it; so is an evaluation of a pretraining run made by older code."""
    s = results
    current = write_retrieval(s, "synthetic", "r3d-residual-shuffle-s0", 40)
    older = write_retrieval(s, "synthetic", "r3d-residual-shuffle-s1", 41)
    for path, fingerprint in ((current, None), (older, "0123456789abcdef")):
        data = json.loads(path.read_text())
        data["provenance"] = io.provenance(s, step="retrieve")
        assert data["provenance"]["code_fingerprint"] and data["provenance"]["libraries"]["torch"]
        if fingerprint:
            data["provenance"]["code_fingerprint"] = fingerprint
        io.write_json(path, data)
    # a fine-tuning made by the current code from a pretraining run made by older code
    run_dir = layout.pretrain_dir(s, "r3d", "residual", "repeat", 0)
    record = json.loads((run_dir / "metrics.json").read_text())
    record["provenance"] = {**io.provenance(s, step="pretrain"), "code_fingerprint": "feedfeed"}
    io.write_json(run_dir / "metrics.json", record)
    tuned = layout.finetune_dir(s, "synthetic", 1, "r3d-residual-repeat-s0") / "metrics.json"
    data = json.loads(tuned.read_text())
    data["provenance"] = io.provenance(s, step="finetune")
    data["checkpoint"] = {"path": str(run_dir / "checkpoint.pt")}
    io.write_json(tuned, data)

    out = report.build(s, mlflow=False)
    md = Path(out["md"]).read_text()
    table = pd.read_csv(out["csv"])
    stale_sources = set(table.loc[table["stale"], "source"])
    assert str(older) in stale_sources and str(tuned) in stale_sources
    assert str(current) not in stale_sources
    assert not table.loc[table["source"] == str(current), "stale"].any()
    assert "r3d residual · IIC shuffle ⚠ stale" in md  # the seed-1 row of the shuffle setting
    stale_section = md.split("## Stale results", 1)[1].split("\n## ", 1)[0]
    assert f"`{older}`" in stale_section and f"`{tuned}`" in stale_section
    assert f"`{current}`" not in stale_section
    assert "snakemake --cores N" in stale_section and "snakemake --touch" in stale_section
    assert "r3d-residual-repeat-s0 ⚠ stale" in md  # the pretraining table
