"""iicrepro.track against real MLflow stores: SQLite files, concurrent writers, a live server, a real
pretraining step and a real Snakemake workflow."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow_server import MlflowServer, free_port

from iicrepro import config, io, layout, track

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["epoch", "loss", "lr", "positive_rank1", "samples_per_s", "seconds"]
IDENT = {"dataset": "synthetic", "split": 1, "backbone": "r3d", "view": "residual",
         "intra_negative": "repeat", "seed": 0}  # fmt: skip


def settings_for(results: Path, *overrides: str, preset: str = "demo"):
    return config.load(ROOT / "params.yaml", preset, [f"paths.results={results}", *overrides])


def write_pretrain(run_dir: Path, epochs: int, final: bool = True, shift: float = 0.0) -> list:
    """A pretraining run folder as `iicrepro pretrain` leaves it; returns the CSV rows."""
    rows = [
        [e, 12.0 - e * 0.5 + shift, 0.03 / e, e / 20, 100.0 + e, 1.5 * e]
        for e in range(1, epochs + 1)
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(run_dir / "metrics.csv") as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([COLUMNS, *rows])
    if final:
        io.write_json(run_dir / "metrics.json", {"loss": rows[-1][1], "chance_loss": 12.48})
    return rows


def write_retrieval(run_dir: Path, top1: float, checkpoint: Path | None = None) -> None:
    view = (layout.parse_run_name(run_dir.name) or {"view": "residual"})["view"]
    rows = [
        {"modality": m, "metric": f"top{k}", "value": top1 + i * 5 + j}
        for j, m in enumerate(["rgb", view, "joint"])
        for i, k in enumerate([1, 5, 10, 20, 50])
    ]
    data = {"rows": rows, "counts": {"queries": 30}, "bn": "x"}
    if checkpoint is not None:
        data["checkpoint"] = {"path": str(checkpoint), "sha256": io.sha256_file(checkpoint)}
    run_dir.mkdir(parents=True, exist_ok=True)
    io.write_json(run_dir / "metrics.json", data)


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def runs_of(uri: str, experiment: str, where: str = "") -> list:
    c = client_for(uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], where, max_results=500) if exp else []


def keyed(uri: str, experiment: str, key: str) -> list:
    return runs_of(uri, experiment, f"tags.`iicrepro.key` = '{key}'")


def history(uri: str, run_id: str, name: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client_for(uri).get_metric_history(run_id, name))


def assert_mirrors(uri: str, run_id: str, rows: list) -> None:
    """Every CSV point is in MLflow exactly once, with its value."""
    for col_index, name in enumerate(COLUMNS[1:], start=1):
        assert history(uri, run_id, name) == [(r[0], pytest.approx(r[col_index])) for r in rows]


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory) -> Path:
    """An MLflow SQLite file with its tables made once; tests copy it (migrations take seconds)."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    client_for(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, migrated_db) -> str:
    """A private SQLite store for one test, selected through MLFLOW_TRACKING_URI."""
    shutil.copy(migrated_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv(track.WORKFLOW_ENV, raising=False)
    return uri


@pytest.fixture(scope="module")
def server_port():
    return free_port()


@pytest.fixture(scope="module")
def server(server_port, tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), port=server_port).start()
    yield srv
    srv.stop()


# Runs first (file order) so that the module's server is not started yet: it starts in the middle.
@pytest.mark.slow
def test_server_down_queues_the_run_then_sync_logs_it(tmp_path, monkeypatch, server_port, request):
    uri = f"http://127.0.0.1:{server_port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    settings = settings_for(tmp_path / "results")
    run_dir = layout.pretrain_dir(settings, "r3d", "residual", "repeat", 0)

    start = time.monotonic()
    run = track.start_run(settings, "pretrain", run_dir, name=run_dir.name, identity=IDENT,
                          params={"lr": 0.03, "nce": {"k": 64}})  # fmt: skip
    assert run.run_id is None and not run.online
    rows = write_pretrain(run_dir, epochs=4)
    for r in rows:
        run.log_epoch(dict(zip(COLUMNS, r, strict=True)))
    assert run.finish() is None
    assert time.monotonic() - start < 15, "a dead server must not stall the job"
    pending = layout.mlflow_pending(settings).read_text().splitlines()
    assert len(pending) == 1 and str(run_dir) in pending[0]
    assert track.sync_pending(settings) == (0, 1)  # still down: kept

    server = request.getfixturevalue("server")  # now the server comes up on that port
    assert server.uri == uri
    assert track.sync_pending(settings) == (1, 0)
    assert track.sync_pending(settings) == (0, 0)
    [found] = keyed(uri, "iicrepro/demo/pretrain", "pretrain/synthetic/r3d-residual-repeat-s0")
    assert found.info.status == "FINISHED"
    assert_mirrors(uri, found.info.run_id, rows)
    assert found.data.metrics["chance_loss"] == 12.48
    assert found.data.params["nce.k"] == "64" and found.data.params["backbone"] == "r3d"


@pytest.mark.slow
def test_live_run_and_summary_table_through_a_server(tmp_path, monkeypatch, server):
    import pandas as pd

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    settings = settings_for(tmp_path / "results")
    run_dir = layout.pretrain_dir(settings, "r3d", "residual", "repeat", 0)
    run = track.start_run(settings, "pretrain", run_dir, name=run_dir.name, identity=IDENT)
    c = client_for(server.uri)
    assert c.get_run(run.run_id).info.status == "RUNNING"  # there as soon as the step starts
    rows = write_pretrain(run_dir, epochs=3)
    for r in rows:
        run.log_epoch(dict(zip(COLUMNS, r, strict=True)))
        assert len(history(server.uri, run.run_id, "loss")) == r[0]  # live, epoch by epoch
    assert run.finish() == run.run_id
    assert c.get_run(run.run_id).info.status == "FINISHED"
    assert {f.path for f in c.list_artifacts(run.run_id)} == {"metrics.csv", "metrics.json"}
    assert_mirrors(server.uri, run.run_id, rows)  # the file pass adds no duplicate point

    # The report's table: artifacts and an MLflow table, through the server's proxy.
    table = tmp_path / "summary.csv"
    pd.DataFrame({"metric": ["top1", "top5"], "value": [41.0, 60.5]}).to_csv(table, index=False)
    (tmp_path / "summary.md").write_text("# summary\n")
    sid = track.log_summary(settings, [(tmp_path / "summary.md", None)], {"rows": 2}, table=table)
    files = {f.path for f in c.list_artifacts(sid)}
    assert files == {"summary.md", "summary_table.json"}
    loaded = c.load_table(c.get_run(sid).info.experiment_id, "summary_table.json", [sid])
    assert list(loaded["value"]) == [41.0, 60.5]


def test_every_execution_is_kept_across_reruns_and_presets(tmp_path, store):
    uri = store
    demo = settings_for(tmp_path / "results")
    run_dir = layout.pretrain_dir(demo, "r3d", "residual", "none", 1)
    key = "pretrain/synthetic/r3d-residual-none-s1"

    rows = write_pretrain(run_dir, epochs=3)
    first = track.log_pretrain(demo, run_dir)
    second = track.log_pretrain(demo, run_dir)  # the same step executed again: its own run
    rows2 = write_pretrain(run_dir, epochs=3, shift=0.25)  # recomputed: different numbers
    third = track.log_pretrain(settings_for(tmp_path / "results", "pretrain.lr=0.05"), run_dir)
    runs = {r.info.run_id: r for r in keyed(uri, "iicrepro/demo/pretrain", key)}
    assert set(runs) == {first, second, third}  # nothing deleted, nothing overwritten
    assert all(r.info.status == "FINISHED" and r.info.lifecycle_stage == "active"
               for r in runs.values())  # fmt: skip
    assert_mirrors(uri, first, rows)
    assert_mirrors(uri, third, rows2)
    assert runs[third].data.params["init"] == "cmc"

    # Another preset is another experiment: the demo's history is untouched.
    proof = settings_for(tmp_path / "proof", preset="proof")
    proof_dir = layout.pretrain_dir(proof, "r3d", "residual", "none", 1)
    write_pretrain(proof_dir, epochs=2)
    track.log_pretrain(proof, proof_dir)
    assert len(keyed(uri, "iicrepro/proof/pretrain", key)) == 1
    assert len(keyed(uri, "iicrepro/demo/pretrain", key)) == 3

    # An evaluation written to a scratch folder still lands in its protocol's experiment.
    scratch = tmp_path / "tmp"
    write_retrieval(scratch, top1=30.0)
    track.log_retrieval(demo, scratch)
    names = {e.name for e in client_for(uri).search_experiments()}
    assert {"iicrepro/demo/retrieval", "iicrepro/demo/pretrain", "iicrepro/proof/pretrain"} <= names
    assert not any("tmp" in n for n in names)


def test_parent_run_per_workflow_children_per_job_and_lineage(tmp_path, store, monkeypatch):
    uri = store
    s = settings_for(tmp_path / "results")
    monkeypatch.setenv(track.RULE_ENV, "pretrain")
    log_file = tmp_path / "logs" / "pretrain" / "r3d-residual-repeat-s0.log"
    log_file.parent.mkdir(parents=True)
    log_file.write_text("pretrain epoch 1/2 ...\n")
    monkeypatch.setenv(track.LOG_ENV, str(log_file))
    workflow = track.workflow_start(s)
    assert json.loads(os.environ[track.WORKFLOW_ENV])["id"] == workflow["id"]

    run_dir = layout.pretrain_dir(s, "r3d", "residual", "repeat", 0)
    pre = track.start_run(s, "pretrain", run_dir, name=run_dir.name, identity=IDENT,
                          params={"epochs": 2, "nce": {"k": 64, "t": 0.1}})  # fmt: skip
    write_pretrain(run_dir, epochs=2)
    (run_dir / "checkpoint.pt").write_bytes(b"trained weights")
    (run_dir / "init.pt").write_bytes(b"epoch-0 weights")
    pre.finish(checkpoint=run_dir / "checkpoint.pt", init=run_dir / "init.pt")

    monkeypatch.setenv(track.RULE_ENV, "retrieve")
    evaluated = {}
    for name, file in (("r3d-residual-repeat-s0", "checkpoint.pt"),
                       ("r3d-residual-random-s0", "init.pt")):  # fmt: skip
        out = layout.retrieval_dir(s, "synthetic", name)
        write_retrieval(out, 40.0, checkpoint=run_dir / file)
        evaluated[name] = track.log_retrieval(s, out)

    c = client_for(uri)
    pre_run = c.get_run(pre.run_id)
    assert pre_run.data.tags["snakemake.rule"] == "pretrain"
    assert pre_run.data.tags["snakemake.job"] == "pretrain r3d-residual-repeat-s0"
    assert pre_run.data.tags["preset"] == "demo" and pre_run.data.tags["code_version"]
    assert {f.path for f in c.list_artifacts(pre.run_id)} == {"metrics.csv", "metrics.json", "log"}
    assert [f.path for f in c.list_artifacts(pre.run_id, "log")] == [f"log/{log_file.name}"]
    assert pre_run.data.tags["checkpoint_path"] == str(run_dir / "checkpoint.pt")
    # own settings only: identity + what the step passed, not the preset's grid
    assert set(pre_run.data.params) == {"dataset", "split", "backbone", "view", "intra_negative",
                                        "init", "seed", "epochs", "nce.k", "nce.t"}  # fmt: skip

    for name, run_id in evaluated.items():
        run = c.get_run(run_id)
        assert run.data.tags["pretrain_run_id"] == pre.run_id, name  # lineage
        assert run.data.params["checkpoint_sha256"] == io.sha256_file(
            run_dir / run.data.params["checkpoint_file"]
        )
        assert run.data.tags["snakemake.rule"] == "retrieve"
    assert c.get_run(evaluated["r3d-residual-random-s0"]).data.params["init"] == "random"

    # parent/child: one parent per experiment of this workflow execution
    parents = {}
    for exp in ("iicrepro/demo/pretrain", "iicrepro/demo/retrieval"):
        [parent] = runs_of(uri, exp, "tags.`iicrepro.role` = 'workflow'")
        assert parent.data.tags[track.WORKFLOW_TAG] == workflow["id"]
        assert parent.info.status == "RUNNING"
        parents[exp] = parent.info.run_id
    assert pre_run.data.tags["mlflow.parentRunId"] == parents["iicrepro/demo/pretrain"]
    assert all(c.get_run(r).data.tags["mlflow.parentRunId"] == parents["iicrepro/demo/retrieval"]
               for r in evaluated.values())  # fmt: skip
    track.workflow_end(s, ok=True)
    assert all(c.get_run(p).info.status == "FINISHED" for p in parents.values())

    # the next workflow execution gets its own parent; the earlier one and its children stay
    track.workflow_start(s)
    again = track.log_retrieval(s, layout.retrieval_dir(s, "synthetic", "r3d-residual-repeat-s0"))
    assert c.get_run(again).data.tags["mlflow.parentRunId"] != parents["iicrepro/demo/retrieval"]
    assert len(runs_of(uri, "iicrepro/demo/retrieval", "tags.`iicrepro.role` = 'workflow'")) == 2
    assert len(runs_of(uri, "iicrepro/demo/retrieval", "tags.protocol = 'retrieval'")) == 3

    # The saved comparison view: its search lists the jobs' runs without their parents, and its
    # charts and columns name metrics the runs have (the curves first, not the final_* bars).
    for protocol, children in (("pretrain", 1), ("retrieval", 3)):
        exp = c.get_experiment_by_name(f"iicrepro/demo/{protocol}")
        view = json.loads(exp.tags[f"mlflow.sharedViewState.{track.VIEW_KEY}"])
        assert "viewStateShareKey=compare" in exp.tags["mlflow.note.content"]
        shown = c.search_runs([exp.experiment_id], view["searchFilter"])
        assert len(shown) == children
        assert all(track.ROLE_TAG not in r.data.tags for r in shown)
        logged = set().union(*(r.data.metrics for r in shown))
        charts = view["compareRunCharts"]
        keys = [k for ch in charts for k in ch.get("selectedMetrics", [ch.get("metricKey")])]
        assert set(keys) <= logged, (keys, logged)
        columns = {c.split("`")[1] for c in view["selectedColumns"] if c.startswith("metrics.")}
        assert columns and columns <= logged, (columns, logged)
        assert set(charts[0].get("selectedParams", [])) <= set(shown[0].data.params)
    assert json.loads(c.get_experiment_by_name("iicrepro/demo/pretrain").tags[
        f"mlflow.sharedViewState.{track.VIEW_KEY}"])["compareRunCharts"][0]["metricKey"] == "loss"  # fmt: skip

    # A store made by older code gets the current view when a run is next logged to it.
    exp = c.get_experiment_by_name("iicrepro/demo/retrieval")
    c.set_experiment_tag(exp.experiment_id, f"mlflow.sharedViewState.{track.VIEW_KEY}", "{}")
    track.log_retrieval(s, layout.retrieval_dir(s, "synthetic", "r3d-residual-repeat-s0"))
    exp = c.get_experiment_by_name("iicrepro/demo/retrieval")
    assert exp.tags[f"mlflow.sharedViewState.{track.VIEW_KEY}"] != "{}"


def test_documented_searches_slice_the_grid(tmp_path, store):
    """The searches docs/mlflow.md suggests for the UI's search box."""
    import mlflow

    uri = store
    settings = settings_for(tmp_path / "results")
    for i, neg in enumerate(["repeat", "shuffle", "none", "random"]):
        for seed in (0, 1):
            run_dir = layout.retrieval_dir(settings, "synthetic", f"r3d-residual-{neg}-s{seed}")
            write_retrieval(run_dir, top1=20.0 + 10 * i + seed)
            assert track.log_retrieval(settings, run_dir)
    mlflow.set_tracking_uri(uri)
    found = mlflow.search_runs(
        experiment_names=["iicrepro/demo/retrieval"],
        filter_string="params.intra_negative = 'repeat'",
    )
    assert sorted(found["tags.mlflow.runName"]) == [
        "r3d-residual-repeat-s0",
        "r3d-residual-repeat-s1",
    ]
    assert sorted(found["metrics.joint.top1"]) == [22.0, 23.0]
    best = mlflow.search_runs(
        experiment_names=["iicrepro/demo/retrieval"],
        filter_string="params.init = 'cmc' and params.seed = '1' and metrics.`joint.top1` > 40",
    )
    assert list(best["tags.mlflow.runName"]) == ["r3d-residual-none-s1"]


def test_finetune_run_is_named_by_model_and_split(tmp_path, store):
    uri = store
    settings = settings_for(tmp_path / "results")
    run_dir = layout.finetune_dir(settings, "hmdb51", 2, "r3d-v-random-s632")
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.csv").write_text(
        "epoch,train_loss,val_loss,top1\n1,3.9,inf,5.0\n2,3.5,3.6,9.5\n"
    )
    io.write_json(run_dir / "metrics.json", {"top1": 23.4, "clip_top1": 20.1, "best_epoch": 2,
                                             "counts": {"test": 30}})  # fmt: skip
    run_id = track.log_finetune(settings, run_dir)
    run = client_for(uri).get_run(run_id)
    assert run.info.run_name == "r3d-v-random-s632/split2"
    assert run.data.params["split"] == "2" and run.data.params["init"] == "random"
    assert run.data.tags["protocol"] == "finetune" and run.data.tags["dataset"] == "hmdb51"
    assert run.data.metrics["top1"] == 23.4 and run.data.metrics["best_epoch"] == 2
    assert "counts.test" not in run.data.metrics  # counts stay in the metrics.json artifact
    assert history(uri, run_id, "val_loss") == [(1, sys.float_info.max), (2, 3.6)]
    assert history(uri, run_id, "epoch.top1") == [(1, 5.0), (2, 9.5)]  # per epoch, not the test
    exp = client_for(uri).get_experiment(run.info.experiment_id)
    assert exp.name == "iicrepro/demo/finetune"


WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from test_track import COLUMNS, IDENT, settings_for, write_pretrain
    from iicrepro import layout, track

    results, worker = Path(sys.argv[2]), int(sys.argv[3])
    settings = settings_for(results)
    runs = []
    for j in range(2):  # like two training jobs logging after every epoch
        seed = 10 * worker + j
        out = layout.pretrain_dir(settings, "r3d", "residual", "repeat", seed)
        runs.append((out, track.start_run(settings, "pretrain", out, name=out.name,
                                          identity={**IDENT, "seed": seed})))
        assert runs[-1][1].online
    for epoch in range(1, 4):
        for out, run in runs:
            rows = write_pretrain(out, epochs=epoch, final=epoch == 3)
            run.log_epoch(dict(zip(COLUMNS, rows[-1])))
    for out, run in runs:
        assert run.finish(), out
    """
)


@pytest.mark.slow
def test_concurrent_writers_lose_no_metric(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"  # a fresh store: tables made under race
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(track.WORKFLOW_ENV, json.dumps({"id": "w1", "preset": "demo"}))
    results = tmp_path / "results"
    settings = settings_for(results)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(Path(__file__).parent), str(results), str(w)],
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for w in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    assert not layout.mlflow_pending(settings).exists()

    [parent] = runs_of(uri, "iicrepro/demo/pretrain", "tags.`iicrepro.role` = 'workflow'")
    children = runs_of(uri, "iicrepro/demo/pretrain", "tags.protocol = 'pretrain'")
    assert len(children) == 8  # one parent for all four writers racing to create it
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        text = (Path(run.data.tags["iicrepro.run_dir"]) / "metrics.csv").read_text()
        rows = list(csv.reader(text.splitlines()))
        assert_mirrors(uri, run.info.run_id, [[float(x) for x in r] for r in rows[1:]])
        assert len(rows) == 4 and run.info.status == "FINISHED"


def test_disabled_tracking_and_unusable_folders_never_raise(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    off = settings_for(tmp_path / "results", "tracking.enabled=false")
    run_dir = layout.pretrain_dir(off, "r3d", "residual", "repeat", 0)
    write_pretrain(run_dir, epochs=2)
    assert track.tracking_uri(off) is None and track.log_pretrain(off, run_dir) is None
    run = track.start_run(off, "pretrain", run_dir, name="x", identity=IDENT)
    run.log_epoch({"epoch": 1, "loss": 3.0})
    assert run.finish() is None and track.workflow_start(off) is None
    assert not (tmp_path / "mlflow.db").exists()

    on = settings_for(tmp_path / "results")
    assert track.tracking_uri(on) == uri  # the environment wins over params.yaml
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert track.tracking_uri(on) == on["tracking"]["mlflow_uri"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    missing = layout.finetune_dir(on, "synthetic", 1, "r3d-residual-repeat-s0")
    assert track.log_finetune(on, missing) is None  # no files: nothing to log, nothing pending
    assert not layout.mlflow_pending(on).exists()


@pytest.mark.slow
def test_a_real_pretraining_step_logs_while_it_trains(tmp_path, store):
    """`iicrepro pretrain` as a job runs it: the run exists and has loss points while the step is
    still training; at the end it is FINISHED with every epoch, its files and its log."""
    import test_pretrain as tp

    uri = store
    epochs = 40
    s = config.load(tp.PARAMS, "demo", tp.overrides(tmp_path, **{"tracking.enabled": "true"}))
    tp.build_dataset(s)
    sets = [a for o in tp.overrides(tmp_path, **{"tracking.enabled": "true"}) for a in ("--set", o)]
    log_file = tmp_path / "pretrain.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", track.LOG_ENV: str(log_file),
           track.RULE_ENV: "pretrain"}  # fmt: skip
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "iicrepro.cli", "pretrain", "--params", str(tp.PARAMS),
             "--preset", "demo", *sets, "--epochs", str(epochs), "--device", "cpu"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    seen_live = None
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        runs = runs_of(uri, "iicrepro/demo/pretrain")
        if runs:
            points = history(uri, runs[0].info.run_id, "loss")
            if len(points) >= 2 and proc.poll() is None:
                seen_live = (runs[0].info.status, len(points))
                break
        time.sleep(0.1)
    assert proc.wait(timeout=300) == 0, log_file.read_text()[-3000:]
    assert seen_live is not None and seen_live[0] == "RUNNING" and seen_live[1] < epochs
    [run] = runs_of(uri, "iicrepro/demo/pretrain", "tags.protocol = 'pretrain'")
    assert run.info.status == "FINISHED"
    assert [s for s, _ in history(uri, run.info.run_id, "loss")] == list(range(1, epochs + 1))
    files = {f.path for f in client_for(uri).list_artifacts(run.info.run_id)}
    assert files == {"metrics.csv", "metrics.json", "log"}
    assert run.data.params["epochs"] == str(epochs) and "views" not in str(run.data.params)

    # The identical rerun finds its finished checkpoint and does nothing: no second run.
    subprocess.run(proc.args, env=env, check=True, capture_output=True, timeout=300)
    assert len(runs_of(uri, "iicrepro/demo/pretrain", "tags.protocol = 'pretrain'")) == 1


@pytest.mark.slow
def test_a_workflow_execution_is_a_parent_run_with_a_child_run_per_job(tmp_path, migrated_db):
    """The shrunk demo run as the README says, `.venv/bin/snakemake --cores 2` with no activated
    virtual environment: every job's run is a child of the execution's parent run, evaluations
    name their pretraining run, and a second execution adds runs without removing any."""
    from project import ROOT as SOURCE
    from project import SHRUNK_DEMO, Project

    project = Project.create(tmp_path / "p", demo={**SHRUNK_DEMO, "tracking": {"enabled": True}})
    (project.root / ".venv").symlink_to(SOURCE / ".venv")
    shutil.copy(migrated_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = project.env(MLFLOW_TRACKING_URI=uri, PATH="/usr/bin:/bin")  # no venv on PATH
    env.pop("VIRTUAL_ENV", None)
    env.pop(track.WORKFLOW_ENV, None)
    project.run("timeout", "1800", ".venv/bin/snakemake", "--cores", "2", env=env, timeout=1800)

    c = client_for(uri)
    names = {e.name for e in c.search_experiments()}
    assert {f"iicrepro/demo/{p}" for p in ("pretrain", "retrieval", "finetune", "summary")} <= names
    [pre] = runs_of(uri, "iicrepro/demo/pretrain", "tags.protocol = 'pretrain'")
    assert pre.data.tags["snakemake.rule"] == "pretrain"
    assert len(history(uri, pre.info.run_id, "loss")) == 2  # shrunk demo: 2 epochs
    evaluations = runs_of(uri, "iicrepro/demo/retrieval", "tags.protocol = 'retrieval'")
    evaluations += runs_of(uri, "iicrepro/demo/finetune", "tags.protocol = 'finetune'")
    assert len(evaluations) == 5  # iic, random, random bnrecal retrieval; iic, random finetune
    for run in [pre, *evaluations]:
        exp = run.info.experiment_id
        parent = c.get_run(run.data.tags["mlflow.parentRunId"])
        assert parent.info.experiment_id == exp and parent.data.tags["iicrepro.role"] == "workflow"
        assert parent.info.status == "FINISHED"  # ended by the Snakefile's onsuccess
        assert run.info.status == "FINISHED"
        assert "log" in {f.path for f in c.list_artifacts(run.info.run_id)}
    assert all(r.data.tags["pretrain_run_id"] == pre.info.run_id for r in evaluations)
    [summary] = runs_of(uri, "iicrepro/demo/summary", "tags.protocol = 'summary'")
    assert "summary_table.json" in {f.path for f in c.list_artifacts(summary.info.run_id)}
    parents = runs_of(uri, "iicrepro/demo/retrieval", "tags.`iicrepro.role` = 'workflow'")
    assert len(parents) == 1

    # A second execution: the retrieval jobs rerun as children of a new parent; nothing is lost.
    project.run("timeout", "1800", ".venv/bin/snakemake", "--cores", "2", "--forcerun",
                "retrieve", env=env, timeout=1800)  # fmt: skip
    again = runs_of(uri, "iicrepro/demo/retrieval", "tags.protocol = 'retrieval'")
    # the two forced `retrieve` jobs (iic, random) add a run each to the three kept ones
    before = {r.info.run_id for r in evaluations if r.data.tags["protocol"] == "retrieval"}
    assert len(before) == 3 and len(again) == 5 and before <= {r.info.run_id for r in again}
    parents = runs_of(uri, "iicrepro/demo/retrieval", "tags.`iicrepro.role` = 'workflow'")
    assert len(parents) == 2
    assert len(runs_of(uri, "iicrepro/demo/pretrain", "tags.protocol = 'pretrain'")) == 1
