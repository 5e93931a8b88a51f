"""iicrepro.track against real MLflow stores: SQLite files, concurrent writers, a live server."""

from __future__ import annotations

import csv
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


def settings_for(results: Path, *overrides: str):
    return config.load(ROOT / "params.yaml", "demo", [f"paths.results={results}", *overrides])


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


def write_retrieval(run_dir: Path, top1: float) -> None:
    view = run_dir.name.split("-")[1]
    rows = [
        {"modality": m, "metric": f"top{k}", "value": top1 + i * 5 + j}
        for j, m in enumerate(["rgb", view, "joint"])
        for i, k in enumerate([1, 5, 10, 20, 50])
    ]
    io.write_json(run_dir / "metrics.json", {"rows": rows, "counts": {"queries": 30}, "bn": "x"})


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def active_runs(uri: str, experiment: str, key: str) -> list:
    c = client_for(uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], f"tags.`iicrepro.key` = '{key}'") if exp else []


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
def test_server_down_goes_pending_then_sync_logs_it(tmp_path, monkeypatch, server_port, request):
    uri = f"http://127.0.0.1:{server_port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    settings = settings_for(tmp_path / "results")
    run_dir = layout.pretrain_dir(settings, "r3d", "residual", "repeat", 0)
    rows = write_pretrain(run_dir, epochs=4)

    start = time.monotonic()
    assert track.log_pretrain(settings, run_dir) is None
    assert time.monotonic() - start < 10, "a dead server must not stall the job"
    pending = layout.mlflow_pending(settings).read_text().splitlines()
    assert len(pending) == 1 and str(run_dir) in pending[0]
    assert track.sync_pending(settings) == (0, 1)  # still down: kept

    server = request.getfixturevalue("server")  # now the server comes up on that port
    assert server.uri == uri
    assert track.sync_pending(settings) == (1, 0)
    assert layout.mlflow_pending(settings).read_text() == ""
    runs = active_runs(
        uri, "iicrepro/pretrain/synthetic", "pretrain/synthetic/r3d-residual-repeat-s0"
    )
    assert len(runs) == 1
    assert_mirrors(uri, runs[0].info.run_id, rows)
    assert runs[0].data.metrics["final.chance_loss"] == 12.48


@pytest.mark.slow
def test_logging_through_a_server(tmp_path, monkeypatch, server):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    settings = settings_for(tmp_path / "results")
    run_dir = layout.retrieval_dir(settings, "srvdata", "r3d-u-shuffle-s3")
    write_retrieval(run_dir, top1=41.0)
    run_id = track.log_retrieval(settings, run_dir)
    assert run_id and track.log_retrieval(settings, run_dir) == run_id

    run = client_for(server.uri).get_run(run_id)
    assert run.data.metrics["joint.top1"] == 43.0 and run.data.metrics["u.top50"] == 62.0
    assert run.data.metrics["counts.queries"] == 30
    assert run.data.tags["intra_negative"] == "shuffle" and run.data.tags["view"] == "u"
    assert run.data.tags["seed"] == "3" and run.data.tags["init"] == "iic"
    assert run.data.params["clips.crop"] == "40"  # the resolved settings, flattened
    assert history(server.uri, run_id, "joint.top1") == [(0, 43.0)]

    # Artifacts go through the server's proxy.
    (tmp_path / "summary.md").write_text("# summary\n")
    sid = track.log_summary(settings, [(tmp_path / "summary.md", None)], {"rows": 3})
    files = [f.path for f in client_for(server.uri).list_artifacts(sid)]
    assert files == ["summary.md"]


def test_rerun_updates_the_same_run_without_duplicates(tmp_path, store):
    uri = store
    settings = settings_for(tmp_path / "results")
    run_dir = layout.pretrain_dir(settings, "r3d", "residual", "none", 1)
    key = "pretrain/synthetic/r3d-residual-none-s1"

    rows = write_pretrain(run_dir, epochs=3, final=False)  # a job logging while it trains
    first = track.log_pretrain(settings, run_dir)
    assert client_for(uri).get_run(first).info.status == "RUNNING"
    rows = write_pretrain(run_dir, epochs=5)  # later epochs appended, then finished
    assert track.log_pretrain(settings, run_dir) == first
    assert track.log_pretrain(settings, run_dir) == first  # and once more: nothing new
    [run] = active_runs(uri, "iicrepro/pretrain/synthetic", key)
    assert run.info.run_id == first and run.info.status == "FINISHED"
    assert run.data.tags["init"] == "cmc" and run.data.tags["intra_negative"] == "none"
    assert_mirrors(uri, first, rows)

    rows = write_pretrain(run_dir, epochs=5, shift=0.25)  # recomputed: different numbers
    second = track.log_pretrain(settings, run_dir)
    [run] = active_runs(uri, "iicrepro/pretrain/synthetic", key)
    assert run.info.run_id == second != first
    assert_mirrors(uri, second, rows)
    assert run.data.metrics["final.loss"] == rows[-1][1]

    # Changed settings (an immutable MLflow param) also give a fresh run, not an error.
    changed = settings_for(tmp_path / "results", "pretrain.lr=0.05")
    third = track.log_pretrain(changed, run_dir)
    [run] = active_runs(uri, "iicrepro/pretrain/synthetic", key)
    assert run.info.run_id == third != second and run.data.params["pretrain.lr"] == "0.05"


WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from test_track import settings_for, write_pretrain
    from iicrepro import layout, track

    results, worker = Path(sys.argv[2]), int(sys.argv[3])
    settings = settings_for(results)
    own = [layout.pretrain_dir(settings, "r3d", "residual", "repeat", 10 * worker + j)
           for j in range(2)]
    shared = layout.pretrain_dir(settings, "r3d", "residual", "shuffle", 99)
    for epoch in range(1, 4):  # like training jobs logging after every epoch
        for run_dir in own:
            write_pretrain(run_dir, epochs=epoch, final=epoch == 3)
            assert track.log_pretrain(settings, run_dir), run_dir
        assert track.log_pretrain(settings, shared), shared  # everyone logs one run too
    """
)


@pytest.mark.slow
def test_concurrent_writers_lose_no_metric(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"  # a fresh store: tables made under race
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    results = tmp_path / "results"
    settings = settings_for(results)
    shared_rows = write_pretrain(layout.pretrain_dir(settings, "r3d", "residual", "shuffle", 99), 6)
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

    exp = client_for(uri).get_experiment_by_name("iicrepro/pretrain/synthetic")
    assert len(client_for(uri).search_runs([exp.experiment_id], max_results=100)) == 9
    for w in range(4):
        for j in range(2):
            run = layout.run_name("r3d", "residual", "repeat", 10 * w + j)
            [found] = active_runs(uri, exp.name, f"pretrain/synthetic/{run}")
            text = (results / "pretrain" / "synthetic" / run / "metrics.csv").read_text()
            rows = list(csv.reader(text.splitlines()))
            assert_mirrors(uri, found.info.run_id, [[float(x) for x in r] for r in rows[1:]])
            assert len(rows) == 4 and found.info.status == "FINISHED"
    [shared] = active_runs(uri, exp.name, "pretrain/synthetic/r3d-residual-shuffle-s99")
    assert_mirrors(uri, shared.info.run_id, shared_rows)


def test_search_runs_slices_the_grid_by_tags(tmp_path, store):
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
        experiment_names=["iicrepro/retrieval/synthetic"],
        filter_string="tags.intra_negative = 'repeat'",
    )
    assert sorted(found["tags.mlflow.runName"]) == [
        "r3d-residual-repeat-s0",
        "r3d-residual-repeat-s1",
    ]
    assert sorted(found["metrics.joint.top1"]) == [22.0, 23.0]
    cmc = mlflow.search_runs(
        experiment_names=["iicrepro/retrieval/synthetic"],
        filter_string="tags.init = 'cmc' and tags.seed = '1'",
    )
    assert list(cmc["tags.mlflow.runName"]) == ["r3d-residual-none-s1"]


def test_finetune_run_is_named_by_model_and_split(tmp_path, store):
    uri = store
    settings = settings_for(tmp_path / "results")
    run_dir = layout.finetune_dir(settings, "hmdb51", 2, "r3d-v-random-s632")
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.csv").write_text(
        "epoch,train_loss,val_loss,top1\n1,3.9,inf,5.0\n2,3.5,3.6,9.5\n"
    )
    io.write_json(run_dir / "metrics.json", {"top1": 23.4, "clip_top1": 20.1, "best_epoch": 2})
    run_id = track.log_finetune(settings, run_dir)
    assert track.log_finetune(settings, run_dir) == run_id  # an infinite loss compares as stored
    run = client_for(uri).get_run(run_id)
    assert run.info.run_name == "r3d-v-random-s632/split2"
    assert run.data.tags["split"] == "2" and run.data.tags["init"] == "random"
    assert run.data.tags["protocol"] == "finetune" and run.data.tags["dataset"] == "hmdb51"
    assert run.data.metrics["top1"] == 23.4 and run.data.metrics["best_epoch"] == 2
    assert history(uri, run_id, "val_loss") == [(1, sys.float_info.max), (2, 3.6)]
    assert history(uri, run_id, "epoch.top1") == [(1, 5.0), (2, 9.5)]  # per-epoch, not the test
    exp = client_for(uri).get_experiment(run.info.experiment_id)
    assert exp.name == "iicrepro/finetune/hmdb51"


def test_disabled_tracking_and_unusable_folders_never_raise(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    off = settings_for(tmp_path / "results", "tracking.enabled=false")
    run_dir = layout.pretrain_dir(off, "r3d", "residual", "repeat", 0)
    write_pretrain(run_dir, epochs=2)
    assert track.tracking_uri(off) is None and track.log_pretrain(off, run_dir) is None
    assert not (tmp_path / "mlflow.db").exists()

    on = settings_for(tmp_path / "results")
    assert track.tracking_uri(on) == uri  # the environment wins over params.yaml
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert track.tracking_uri(on) == on["tracking"]["mlflow_uri"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    missing = layout.finetune_dir(on, "synthetic", 1, "r3d-residual-repeat-s0")
    assert track.log_finetune(on, missing) is None  # no files: nothing to log, nothing pending
    assert not layout.mlflow_pending(on).exists()
