"""MLflow tracking: every execution of a step is its own run, logged live, kept, never fatal.

The metric files are the source of truth (they are DVC metrics); MLflow is where runs are compared,
so it keeps their history:

* A step calls `start_run` when it starts (the run appears at once, RUNNING), `Run.log_epoch` after
  each epoch (live loss / accuracy curves) and `Run.finish` at the end, which logs the final values
  read from the step's files, attaches the files (metrics, log) and ends the run. A rerun is a new
  run; earlier runs are never deleted. A pretraining job that finds its finished checkpoint does
  nothing and so creates no run (an identical rerun is not duplicated); nor does a report whose
  table is unchanged.
* Experiments are named by preset and protocol: ``iicrepro/<preset>/<protocol>`` (protocols
  pretrain, retrieval, finetune, summary), never from an output folder's name.
* Params are the run's own settings: its identity (backbone, view, intra_negative, init, seed,
  dataset, split) and the settings that decide its result (the step passes them). Tags carry the
  same identity for slicing, the preset, the code version, the Snakemake rule and log, and
  ``iicrepro.key`` (protocol/dataset/run: the same model across executions).
* Parent and children: the Snakefile's onstart calls `workflow_start`, which puts a workflow id in
  the environment (``IICREPRO_MLFLOW_WORKFLOW``); every job's run becomes a child
  (``mlflow.parentRunId``) of that workflow execution's parent run in its experiment, created by the
  first child that needs it.
* Lineage: a pretraining run tags the sha256 of its checkpoint.pt and init.pt; a retrieval or
  fine-tuning run names the checkpoint it used (param ``checkpoint_sha256``) and the pretraining
  run that made it (tag ``pretrain_run_id``).
* Never fatal: a store that cannot be reached (server down, timeouts) turns the run offline; at the
  end its description is appended to ``<results>/.mlflow-pending.jsonl`` and `sync_pending` (called
  by ``iicrepro report``) logs it later from the files, into the same run if it was created.
* Concurrency: with a local SQLite store, writers are serialised by a lock file beside the database
  and "database is locked" errors are retried with backoff.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import dataclasses
import fcntl
import json
import logging
import math
import os
import random
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from iicrepro import io, layout

log = logging.getLogger(__name__)

KEY_TAG = "iicrepro.key"  # protocol/dataset/run: one model across executions
EXECUTION_TAG = "iicrepro.execution"  # one execution of a step
WORKFLOW_TAG = "iicrepro.workflow"  # one execution of the workflow (parent and children)
ROLE_TAG = "iicrepro.role"  # "workflow" on parent runs
RESULT_TAG = "iicrepro.result"  # digest of a summary table (identical reports are not duplicated)
PARENT_TAG = "mlflow.parentRunId"
WORKFLOW_ENV = "IICREPRO_MLFLOW_WORKFLOW"  # set by the Snakefile's onstart
RULE_ENV, LOG_ENV = "IICREPRO_RULE", "IICREPRO_LOG"  # set by each rule's shell command
PROBE_TIMEOUT_S = 5.0  # a tracking server that does not answer /health within this is "down"
ATTEMPTS = 8  # tries for transient store errors ("database is locked"), exponential backoff
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
IDENTITY = ("protocol", "dataset", "split", "backbone", "view", "intra_negative", "init", "seed")


@dataclass
class Record:
    """What one MLflow run should contain (JSON-able, so an offline run can be queued)."""

    kind: str  # pretrain | retrieval | finetune | summary
    experiment: str
    execution: str
    run_name: str
    run_dir: str
    tags: dict[str, str]
    params: dict[str, str]
    run_id: str | None = None
    workflow: dict | None = None  # {"id", "preset", "started"} of the Snakemake execution
    lineage: dict | None = None  # {"sha256", "file"} of the checkpoint an evaluation used
    artifacts: list[tuple[str, str | None]] = field(default_factory=list)
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # summary only
    table: str | None = None  # summary only: a CSV logged with mlflow.log_table
    status: str = "FINISHED"


# --------------------------------------------------------------------------- public API


def tracking_uri(settings: Any) -> str | None:
    """MLFLOW_TRACKING_URI if set, else settings.tracking.mlflow_uri; None when tracking is off."""
    if not settings["tracking"]["enabled"]:
        return None
    return os.environ.get("MLFLOW_TRACKING_URI") or settings["tracking"]["mlflow_uri"]


def experiment_name(settings: Any, protocol: str) -> str:
    """``iicrepro/<preset>/<protocol>``: one experiment per protocol and preset."""
    return f"iicrepro/{settings.get('preset') or 'default'}/{protocol}"


def workflow_start(settings: Any) -> dict | None:
    """A new workflow execution id in the environment, so the jobs Snakemake starts log their runs
    as children of one parent run (created by the first child, in each experiment). Instant: it
    does not contact the store."""
    if tracking_uri(settings) is None:
        return None
    info = {
        "id": uuid.uuid4().hex,
        "preset": str(settings.get("preset", "")),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.environ[WORKFLOW_ENV] = json.dumps(info)
    return info


def workflow_end(settings: Any, ok: bool) -> None:
    """End the workflow execution's parent runs (FINISHED or FAILED); best effort."""
    uri, info = tracking_uri(settings), _workflow()
    if uri is None or info is None:
        return

    def end(client, db):
        runs = client.search_runs(
            _experiment_ids(client), f"tags.`{WORKFLOW_TAG}` = '{info['id']}' and "
            f"tags.`{ROLE_TAG}` = 'workflow'", max_results=100,
        )  # fmt: skip
        for run in runs:
            client.set_terminated(run.info.run_id, "FINISHED" if ok else "FAILED")

    with contextlib.suppress(Exception):
        if _reachable(uri):
            _with_store(uri, end)


class Run:
    """One execution of a step in MLflow. Every method is never fatal: when the store fails the
    run goes offline and `finish` queues it for `sync_pending`."""

    def __init__(self, settings: Any, uri: str | None, record: Record):
        self.settings, self.uri, self.record = settings, uri, record
        self.online = False
        self.done = uri is None

    @property
    def run_id(self) -> str | None:
        return self.record.run_id

    def _begin(self) -> None:
        try:
            if not _reachable(self.uri):
                raise ConnectionError(f"tracking server {self.uri} does not answer")
            self.record.run_id = _with_store(
                self.uri, lambda c, db: _create(c, self.record, db, status="RUNNING")
            )
            self.online = True
            _LIVE.add(self)
        except Exception as exc:  # never fatal: logged from the files later
            log.warning("MLflow: run of %s not started (%s); queued", self.record.run_dir,
                        _short(exc))  # fmt: skip

    def log_epoch(self, row: Mapping[str, Any], step: int | None = None) -> None:
        """Numeric fields of one epoch's metrics row, at step `step` (default row['epoch'])."""
        if not self.online:
            return
        step = int(row.get("epoch", 0) if step is None else step)
        values = {k: float(v) for k, v in row.items() if k != "epoch" and _number(v)}
        try:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [Metric(k, _finite(v), now, step) for k, v in values.items()]
            _with_store(self.uri, lambda c, db: c.log_batch(self.record.run_id, metrics=metrics))
        except Exception as exc:
            log.warning("MLflow: epoch %d of %s not logged (%s); the run is logged at its end",
                        step, self.record.run_dir, _short(exc))  # fmt: skip
            self.online = False

    def finish(
        self,
        *,
        complete: bool = True,
        files: tuple[str, ...] = ("metrics.csv", "metrics.json"),
        checkpoint: Path | None = None,
        init: Path | None = None,
    ) -> str | None:
        """Log the step's final values and files and end the run (KILLED if not `complete`).
        A pretraining run passes its `checkpoint` and `init` files, so evaluations can name it."""
        if self.done:
            return self.record.run_id
        self.done = True
        _LIVE.discard(self)
        rec = self.record
        rec.status = "FINISHED" if complete else "KILLED"
        run_dir = Path(rec.run_dir)
        rec.artifacts = [(str(run_dir / f), None) for f in files if (run_dir / f).is_file()]
        log_file = _log_file()
        if log_file is not None:
            rec.artifacts.append((str(log_file), "log"))
        for name, path in (("checkpoint", checkpoint), ("init", init)):
            if path is not None and Path(path).is_file():
                rec.tags[f"{name}_sha256"] = io.sha256_file(path)
                rec.tags[f"{name}_path"] = str(path)
        return _deliver(self.settings, self.uri, rec, queue=True, try_store=self.online)


def start_run(
    settings: Any,
    protocol: str,
    run_dir: str | Path,
    *,
    name: str,
    identity: Mapping[str, Any],
    params: Mapping[str, Any] = (),
    lineage: Mapping[str, str] | None = None,
    enabled: bool = True,
) -> Run:
    """Create the MLflow run of one step execution now (RUNNING) and return its handle.

    `identity`: dataset, split, backbone, view, intra_negative, init, seed (params and tags);
    `params`: the settings that decide this result (nested dicts are flattened to dotted keys);
    `lineage`: {"sha256", "file"} of the checkpoint an evaluation starts from.
    """
    uri = tracking_uri(settings) if enabled else None
    try:
        record = _new_record(settings, protocol, run_dir, name, identity, params, lineage)
    except Exception as exc:  # never fatal: a run without a record logs nothing
        log.warning("MLflow: run of %s not tracked (%s)", run_dir, _short(exc))
        uri, record = None, Record(protocol, "", "", name, str(run_dir), {}, {})
    run = Run(settings, uri, record)
    if uri is not None:
        run._begin()
    return run


def log_pretrain(settings: Any, run_dir: str | Path) -> str | None:
    """Log a finished pretraining folder (metrics.csv, metrics.json) as one new run."""
    return _log_folder("pretrain", settings, Path(run_dir))


def log_retrieval(settings: Any, run_dir: str | Path) -> str | None:
    """Log a finished retrieval folder (metrics.json) as one new run."""
    return _log_folder("retrieval", settings, Path(run_dir))


def log_finetune(settings: Any, run_dir: str | Path) -> str | None:
    """Log a finished fine-tuning folder (metrics.json, metrics.csv) as one new run."""
    return _log_folder("finetune", settings, Path(run_dir))


def log_summary(
    settings: Any,
    artifacts: list[tuple[Path, str | None]],
    metrics: Mapping[str, float],
    table: Path | None = None,
) -> str | None:
    """The report as a run of ``iicrepro/<preset>/summary``: its files as artifacts and the
    results `table` (a CSV) also as an MLflow table (searchable in the UI). A report whose table
    is unchanged since the last summary run is not logged again. Queued when the store is down."""
    uri = tracking_uri(settings)
    if uri is None:
        return None
    preset = str(settings.get("preset", ""))
    digest = io.sha256_file(table) if table is not None and Path(table).is_file() else ""
    tags = {"protocol": "summary", "preset": preset, "code_version": io.code_version(),
            KEY_TAG: f"summary/{preset}", RESULT_TAG: digest, **_job_tags()}  # fmt: skip
    record = Record(
        kind="summary", experiment=experiment_name(settings, "summary"),
        execution=uuid.uuid4().hex, run_name=f"summary-{preset}",
        run_dir=str(layout.summary_csv(settings).parent), tags=tags,
        params={"preset": preset, "results": str(settings["paths"]["results"])},
        workflow=_workflow(), artifacts=[(str(p), a) for p, a in artifacts],
        metrics={k: [(0, float(v))] for k, v in metrics.items()},
        table=str(table) if table is not None else None,
    )  # fmt: skip
    return _deliver(settings, uri, record, queue=True, try_store=True)


def sync_pending(settings: Any) -> tuple[int, int]:
    """Log every queued run; returns (logged, still pending)."""
    path = layout.mlflow_pending(settings)
    uri = tracking_uri(settings)
    if uri is None or not path.exists():
        return 0, 0
    with _locked(path.with_name(path.name + ".lock")):
        entries: dict[str, dict] = {}
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError):
                e = json.loads(line)
                # One folder holds one execution's files: the latest entry per folder wins.
                entries[e["kind"] + ":" + e["record"]["run_dir"]] = e
        if not _reachable(uri):
            return 0, len(entries)
        left = []
        for e in entries.values():
            record = Record(**e["record"])
            if record.kind != "summary" and not Path(record.run_dir).is_dir():
                log.warning("MLflow: pending run %s no longer exists; dropped", record.run_dir)
                continue
            if _deliver(e.get("settings") or settings, uri, record, queue=False) is None:
                left.append(e)
        io.write_text(path, "".join(json.dumps(e, default=str) + "\n" for e in left))
    return len(entries) - len(left), len(left)


# --------------------------------------------------------------------------- records


def _workflow() -> dict | None:
    with contextlib.suppress(ValueError, TypeError):
        info = json.loads(os.environ.get(WORKFLOW_ENV, ""))
        return info if isinstance(info, dict) and info.get("id") else None
    return None


def _log_file() -> Path | None:
    """The step's log: IICREPRO_LOG (set by the workflow's rules)."""
    path = os.environ.get(LOG_ENV)
    return Path(path) if path and Path(path).is_file() else None


def _job_tags() -> dict[str, str]:
    tags = {}
    if os.environ.get(RULE_ENV):
        tags["snakemake.rule"] = os.environ[RULE_ENV]
    if os.environ.get(LOG_ENV):
        tags["snakemake.log"] = os.environ[LOG_ENV]
        tags["snakemake.job"] = f"{os.environ.get(RULE_ENV, '')} {Path(os.environ[LOG_ENV]).stem}"
    return tags


def _new_record(settings, protocol, run_dir, name, identity, params, lineage) -> Record:
    ident = {k: v for k, v in {"protocol": protocol, **dict(identity)}.items() if v is not None}
    if "init" not in ident and ident.get("intra_negative") is not None:
        ident["init"] = layout.init_of(str(ident["intra_negative"]))
    ident = {k: str(v) for k, v in ident.items()}
    split = f"/split{ident['split']}" if protocol == "finetune" and "split" in ident else ""
    key = f"{protocol}/{ident.get('dataset', '')}{split}/{name}"
    tags = {
        **ident,
        "preset": str(settings.get("preset", "")),
        "code_version": io.code_version(),
        "iicrepro.run_dir": str(run_dir),
        KEY_TAG: key,
        **_job_tags(),
    }
    all_params = {**{k: ident[k] for k in IDENTITY if k in ident and k != "protocol"},
                  **_flatten(params)}  # fmt: skip
    if lineage:
        all_params["checkpoint_sha256"] = lineage["sha256"]
        all_params["checkpoint_file"] = lineage.get("file", "")
    return Record(
        kind=protocol, experiment=experiment_name(settings, protocol),
        execution=uuid.uuid4().hex, run_name=name, run_dir=str(run_dir), tags=tags,
        params=all_params, workflow=_workflow(), lineage=dict(lineage) if lineage else None,
    )  # fmt: skip


def _log_folder(kind: str, settings: Any, run_dir: Path) -> str | None:
    """A finished result folder as one new run, identity read from the folder and its files."""
    uri = tracking_uri(settings)
    if uri is None:
        return None
    if not (run_dir / "metrics.json").is_file() and not (run_dir / "metrics.csv").is_file():
        log.warning("MLflow: nothing to log in %s", run_dir)
        return None
    summary = _read_json(run_dir / "metrics.json")
    made_with = (summary.get("provenance") or {}).get("settings") or settings
    ident: dict[str, Any] = dict(layout.parse_run_name(run_dir.name) or {})
    ident.pop("variant", None)
    if kind == "finetune":
        ident["split"] = run_dir.parent.name.removeprefix("split")
        ident["dataset"] = summary.get("dataset") or run_dir.parent.parent.name
    else:
        section = "pretrain" if kind == "pretrain" else "retrieval"
        ident["split"] = summary.get("split") or (made_with.get(section) or {}).get("split")
        ident["dataset"] = summary.get("dataset") or run_dir.parent.name
    lineage = None
    ck = summary.get("checkpoint")
    if isinstance(ck, Mapping) and ck.get("sha256"):
        lineage = {"sha256": ck["sha256"], "file": Path(str(ck.get("path", ""))).name}
    name = run_dir.name if kind != "finetune" else f"{run_dir.name}/split{ident['split']}"
    run = start_run(made_with, kind, run_dir, name=name, identity=ident, lineage=lineage)
    return run.finish()


def _read_json(path: Path) -> dict:
    try:
        data = io.read_json(path)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_csv(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Numeric columns of a per-epoch CSV, stepped by its 'epoch' column (else the row index)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            step = int(float(row["epoch"])) if row.get("epoch") not in (None, "") else i
            for col, text in row.items():
                if col == "epoch" or col is None:
                    continue
                with contextlib.suppress(TypeError, ValueError):
                    series.setdefault(col, []).append((step, float(text)))
    return series


# Final values worth a chart, by step kind; the rest of metrics.json (counts, timings, inputs) is in
# the run's metrics.json artifact, so the UI's charts and compare page open on results.
FINALS = {
    "pretrain": ("chance_loss", "final_loss", "final_positive_rank1"),
    "finetune": ("top1", "clip_top1", "best_epoch", "best_val_loss"),
    "retrieval": (),
}


def _file_metrics(kind: str, run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Metric histories from a step's files: per-epoch curves (metrics.csv) and final values."""
    csv_path = run_dir / "metrics.csv"
    curves = _read_csv(csv_path) if kind in ("pretrain", "finetune") and csv_path.is_file() else {}
    summary = _read_json(run_dir / "metrics.json")
    finals = {k: summary[k] for k in FINALS.get(kind, ()) if _number(summary.get(k))}
    series = {f"epoch.{k}" if k in finals else k: v for k, v in curves.items()}
    series.update({k: [(0, float(v))] for k, v in finals.items()})
    for row in summary.get("rows", []) if kind == "retrieval" else []:
        with contextlib.suppress(KeyError, TypeError, ValueError):
            series[f"{row['modality']}.{row['metric']}"] = [(0, float(row["value"]))]
    return series


def _flatten(values: Any, prefix: str = "") -> dict[str, str]:
    """Nested settings (mappings or dataclasses) as dotted params."""
    if dataclasses.is_dataclass(values) and not isinstance(values, type):
        values = dataclasses.asdict(values)
    out: dict[str, str] = {}
    for k, v in dict(values or {}).items():
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            v = dataclasses.asdict(v)
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out[f"{prefix}{k}"] = text[:MAX_PARAM_CHARS]
    return out


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _finite(x: float) -> float:
    """What the store keeps: SQL cannot hold infinities, MLflow stores the largest finite float."""
    return math.copysign(sys.float_info.max, x) if math.isinf(x) else x


# --------------------------------------------------------------------------- writing to MLflow


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def _reachable(uri: str | None) -> bool:
    """A quick /health probe for servers, so a dead server costs seconds, not MLflow's retries."""
    if not uri or not uri.startswith(("http://", "https://")):
        return bool(uri)
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S) as r:
            return r.status == 200
    except OSError:
        return False


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri.removeprefix("sqlite:///")
    return Path(rest) if rest and rest != ":memory:" else None


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive inter-process lock (fcntl) on `lock_path`."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _transient(exc: BaseException) -> bool:
    """A database that is busy for a moment ("database is locked", a deadlock victim)."""
    text = f"{type(exc).__name__} {exc}".lower()
    return any(s in text for s in ("locked", "deadlock", "busy", "operationalerror"))


_CLIENTS: dict[str, Any] = {}


def _client(uri: str):
    if uri.startswith(("http://", "https://")):
        # Fail over to the pending list in seconds rather than after minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    if uri not in _CLIENTS:
        from mlflow.tracking import MlflowClient

        _CLIENTS[uri] = MlflowClient(tracking_uri=uri)
    return _CLIENTS[uri]


def _with_store(uri: str, fn: Callable[[Any, Path | None], Any]) -> Any:
    """fn(client, sqlite_path) with local writers serialised and transient errors retried."""
    db = _sqlite_path(uri)
    # A server already retries its HTTP requests (MLFLOW_HTTP_REQUEST_MAX_RETRIES); once is enough.
    attempts = ATTEMPTS if db else 2
    for attempt in range(attempts):
        try:
            lock = _locked(db.with_name(db.name + ".lock")) if db else contextlib.nullcontext()
            with lock:
                return fn(_client(uri), db)
        except Exception as exc:
            if attempt == attempts - 1 or not _transient(exc):
                raise
            wait = min(10.0, 0.25 * 2**attempt) * (0.5 + random.random())
            log.info("MLflow: transient error (%s); retry in %.1f s", _short(exc), wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


# Each experiment opens on a saved view (the UI's "shared view state": an experiment tag read when
# the URL has ?viewStateShareKey=compare) and describes it on top of its page.
VIEW_KEY = "compare"
IDENTITY_COLUMNS = ("dataset", "backbone", "view", "intra_negative", "init", "seed")
VIEWS = {
    "pretrain": (("loss", "chance_loss", "positive_rank1"), "loss", True),
    "retrieval": (("joint.top1", "joint.top5", "rgb.top1", "residual.top1"), "joint.top1", False),
    "finetune": (("top1", "clip_top1", "val_acc"), "top1", False),
}
# The saved view's first charts (its chart view); MLflow appends a chart per other metric after
# them. Per-epoch curves come first, not the one-point `final_*` bars.
CHARTS = {
    "pretrain": [("LINE", "loss"), ("LINE", "positive_rank1"), ("LINE", "lr")],
    "retrieval": [("PARALLEL", ("init", "intra_negative"), "joint.top1"), ("BAR", "joint.top1")],
    "finetune": [
        ("LINE", "val_acc"),
        ("LINE", "val_loss"),
        ("LINE", "train_loss"),
        ("BAR", "top1"),
    ],
}
GUIDE = {
    "pretrain": "Pretraining runs, one per execution (children of a `workflow` run). Chart view: "
    "`loss` per epoch against `chance_loss`. Search e.g. `params.view = 'residual' and "
    "params.intra_negative = 'repeat'`.",
    "retrieval": "Retrieval top-k (%) of each model; `tags.pretrain_run_id` names its pretraining "
    "run. Search e.g. `params.init = 'iic'` or `params.intra_negative = 'shuffle' and "
    "metrics.`joint.top1` > 50`; tick runs and Compare.",
    "finetune": "Fine-tuning: `metrics.top1` is the video-level test accuracy, `val_loss` / "
    "`val_acc` the per-epoch curves. Search e.g. `params.init = 'random'`, `params.split = '1'`.",
    "summary": "One run per report: the results table as `summary_table.json` (an MLflow table), "
    "summary.md and the plots.",
}


def _chart(spec: tuple, section: str, i: int) -> dict:
    """One chart card in the shape MLflow's UI stores in a shared view state."""
    card = {"uuid": f"iicrepro-chart-{i}", "type": spec[0], "runsCountToCompare": 20,
            "metricSectionId": section, "deleted": False, "isGenerated": False}  # fmt: skip
    if spec[0] == "PARALLEL":
        return {**card, "selectedParams": list(spec[1]), "selectedMetrics": [spec[2]],
                "showAllRuns": True, "displayName": f"{', '.join(spec[1])} -> {spec[2]}"}  # fmt: skip
    card.update(metricKey=spec[1], displayName=spec[1])
    if spec[0] == "LINE":
        card.update(lineSmoothness=0, xAxisScaleType="linear", scaleType="linear",
                    range={}, xAxisKey="step", selectedXAxisMetricKey="", yAxisKey="metric",
                    yAxisExpressions=[], ignoreOutliers=False, useGlobalXaxisKey=True,
                    useGlobalLineSmoothing=True)  # fmt: skip
    return card


def _view_state(protocol: str) -> str | None:
    """The saved view: the jobs' runs (not their `workflow` parents) with identity params and
    headline metrics as columns, sorted by the headline; its chart view opens on the curves."""
    if protocol not in VIEWS:
        return None
    metrics, order, ascending = VIEWS[protocol]
    section = "iicrepro-section-metrics"  # reordered: MLflow appends the other charts after ours
    return json.dumps({
        "searchFilter": f"tags.protocol = '{protocol}'",
        "orderByKey": f"metrics.`{order}`",
        "orderByAsc": ascending,
        "selectedColumns": [f"params.`{p}`" for p in IDENTITY_COLUMNS]
        + [f"metrics.`{m}`" for m in metrics],
        "runsHiddenMode": "SHOW_ALL",
        "compareRunSections": [{"uuid": section, "name": "Model metrics", "display": True,
                                "isReordered": True, "deleted": False, "isGenerated": True}],
        "compareRunCharts": [_chart(c, section, i) for i, c in enumerate(CHARTS[protocol])],
    })  # fmt: skip


def _describe(client, exp_id: str, protocol: str) -> None:
    # a training experiment: the UI opens on its runs, not on the GenAI traces overview
    client.set_experiment_tag(exp_id, "mlflow.experimentKind", "custom_model_development")
    view = _view_state(protocol)
    note = GUIDE.get(protocol, "")
    if view:
        client.set_experiment_tag(exp_id, f"mlflow.sharedViewState.{VIEW_KEY}", view)
        link = f"#/experiments/{exp_id}/runs?viewStateShareKey={VIEW_KEY}"
        note = (f"**[Open the comparison view]({link})** (the jobs' runs, headline columns; its "
                f"chart view: the curves). {note}")  # fmt: skip
    if note:
        client.set_experiment_tag(exp_id, "mlflow.note.content", note)


def refresh_views(client) -> None:
    """Give every iicrepro experiment in the store the current saved view and page note."""
    for exp in client.search_experiments(filter_string="name LIKE 'iicrepro/%'", max_results=1000):
        _describe(client, exp.experiment_id, exp.name.rsplit("/", 1)[-1])


def _experiment_id(client, name: str, db: Path | None) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        # Artifacts of a local store live beside its database, not in the caller's cwd.
        where = str(db.resolve().parent / "mlartifacts" / name) if db else None
        try:
            exp_id = client.create_experiment(name, artifact_location=where)
            _describe(client, exp_id, name.rsplit("/", 1)[-1])
            return exp_id
        except MlflowException:  # created concurrently by another job
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    protocol = name.rsplit("/", 1)[-1]
    view = _view_state(protocol)
    if view and exp.tags.get(f"mlflow.sharedViewState.{VIEW_KEY}") != view:
        _describe(client, exp.experiment_id, protocol)  # made by older code
    return exp.experiment_id


def _experiment_ids(client, like: str = "iicrepro/%") -> list[str]:
    exps = client.search_experiments(filter_string=f"name LIKE '{like}'", max_results=1000)
    return [e.experiment_id for e in exps]


def _oldest(client, exp_ids: list[str], filter_string: str):
    runs = client.search_runs(exp_ids, filter_string=filter_string, max_results=100)
    return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)) if runs else None


def _parent_id(client, exp_id: str, workflow: dict | None) -> str | None:
    """The workflow execution's parent run in this experiment; the first child creates it (two
    creators racing on a server keep the older run and delete the other, still childless)."""
    if not workflow:
        return None
    where = f"tags.`{WORKFLOW_TAG}` = '{workflow['id']}' and tags.`{ROLE_TAG}` = 'workflow'"
    found = _oldest(client, [exp_id], where)
    if found is not None:
        return found.info.run_id
    tags = {WORKFLOW_TAG: workflow["id"], ROLE_TAG: "workflow",
            "preset": str(workflow.get("preset", "")), "code_version": io.code_version()}  # fmt: skip
    started = workflow.get("started", "")
    mine = client.create_run(exp_id, run_name=f"workflow {started}".strip(), tags=tags)
    winner = _oldest(client, [exp_id], where)
    if winner.info.run_id != mine.info.run_id:
        client.delete_run(mine.info.run_id)
    return winner.info.run_id


def _pretrain_run_id(client, lineage: dict | None) -> str | None:
    """The latest finished pretraining run whose checkpoint (or init.pt) has this sha256."""
    if not lineage or not lineage.get("sha256"):
        return None
    tag = "init_sha256" if lineage.get("file") == "init.pt" else "checkpoint_sha256"
    ids = _experiment_ids(client, "iicrepro/%/pretrain")
    if not ids:
        return None
    runs = client.search_runs(
        ids, f"tags.{tag} = '{lineage['sha256']}' and attributes.status = 'FINISHED'",
        max_results=1, order_by=["attributes.start_time DESC"],
    )  # fmt: skip
    return runs[0].info.run_id if runs else None


def _create(client, record: Record, db: Path | None, status: str) -> str:
    """Find this execution's run (by run id or execution tag) or create it; returns its id."""
    from mlflow.entities import Param

    exp_id = _experiment_id(client, record.experiment, db)
    if record.run_id:
        with contextlib.suppress(Exception):
            client.get_run(record.run_id)
            return record.run_id
    found = _oldest(client, [exp_id], f"tags.`{EXECUTION_TAG}` = '{record.execution}'")
    if found is not None:
        return found.info.run_id
    tags = {**record.tags, EXECUTION_TAG: record.execution}
    if record.workflow:
        tags[WORKFLOW_TAG] = record.workflow["id"]
        tags[PARENT_TAG] = _parent_id(client, exp_id, record.workflow)
    pretrain_run = _pretrain_run_id(client, record.lineage)
    if pretrain_run:
        tags["pretrain_run_id"] = pretrain_run
    run = client.create_run(exp_id, run_name=record.run_name, tags=tags)
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in record.params.items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    if status != "RUNNING":
        client.update_run(run_id, status=status)
    return run_id


def _complete(client, record: Record, db: Path | None) -> str:
    """Bring the run up to date with the files: missing metric points, tags, artifacts, status."""
    from mlflow.entities import Metric, RunTag

    record.run_id = _create(client, record, db, status="RUNNING")
    run = client.get_run(record.run_id)
    series = dict(record.metrics)
    if record.kind != "summary":
        series.update(_file_metrics(record.kind, Path(record.run_dir)))
    now = int(time.time() * 1000)
    metrics = []
    for name, points in series.items():
        stored = set()
        if name in run.data.metrics:
            stored = {m.step for m in client.get_metric_history(record.run_id, name)}
        metrics += [Metric(name, _finite(v), now, s) for s, v in points if s not in stored]
    tags = dict(record.tags)
    if "pretrain_run_id" not in run.data.tags:
        found = _pretrain_run_id(client, record.lineage)
        if found:
            tags["pretrain_run_id"] = found
    new_tags = [RunTag(k, str(v)) for k, v in tags.items() if run.data.tags.get(k) != str(v)]
    for i in range(0, len(metrics), 1000):
        client.log_batch(record.run_id, metrics=metrics[i : i + 1000])
    for i in range(0, len(new_tags), 100):
        client.log_batch(record.run_id, tags=new_tags[i : i + 100])
    for path, artifact_path in record.artifacts:
        if Path(path).is_file():
            client.log_artifact(record.run_id, path, artifact_path)
    if record.table and Path(record.table).is_file():
        import pandas as pd

        client.log_table(record.run_id, pd.read_csv(record.table), "summary_table.json")
    client.set_terminated(record.run_id, record.status)
    return record.run_id


def _same_summary(client, record: Record, db: Path | None) -> str | None:
    """An earlier finished summary run of this preset with the same table digest."""
    digest = record.tags.get(RESULT_TAG)
    if record.kind != "summary" or not digest:
        return None
    exp = client.get_experiment_by_name(record.experiment)
    if exp is None:
        return None
    found = _oldest(
        client, [exp.experiment_id],
        f"tags.`{RESULT_TAG}` = '{digest}' and attributes.status = 'FINISHED'",
    )  # fmt: skip
    return found.info.run_id if found else None


def _deliver(
    settings: Any, uri: str | None, record: Record, *, queue: bool, try_store: bool = True
) -> str | None:
    """Complete the run in the store; on failure (and if `queue`) append it to the pending list."""
    if uri is None:
        return None
    reason = "the store failed during the run"
    if try_store or record.run_id is None:
        try:
            if not _reachable(uri):
                raise ConnectionError(f"tracking server {uri} does not answer")

            def deliver(client, db):
                return _same_summary(client, record, db) or _complete(client, record, db)

            return _with_store(uri, deliver)
        except Exception as exc:  # never fatal: the files are the source of truth
            reason = _short(exc)
            log.warning("MLflow: %s not logged to %s (%s)", record.run_dir, uri, reason)
    if queue:
        _append_pending(settings, record, reason)
    return None


def _append_pending(settings: Any, record: Record, reason: str) -> None:
    """One JSON line per queued run; appends are serialised by a lock file."""
    path = layout.mlflow_pending(settings)
    entry = {
        "kind": record.kind,
        "reason": reason,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "record": asdict(record),
        "settings": settings,
    }
    try:
        with _locked(path.with_name(path.name + ".lock")), open(path, "a") as f:
            f.write(json.dumps(entry, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(f"MLflow: {record.run_dir} queued in {path} ({reason}); `iicrepro report` logs it")
    except OSError as exc:
        log.warning("MLflow: could not queue %s (%s)", record.run_dir, _short(exc))


_LIVE: set[Run] = set()


@atexit.register
def _end_unfinished() -> None:
    """A step that exits without finishing its run (an exception) marks the run FAILED."""
    for run in list(_LIVE):
        with contextlib.suppress(Exception):
            _with_store(run.uri, lambda c, db, r=run: c.set_terminated(r.run_id, "FAILED"))
