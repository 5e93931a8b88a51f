"""MLflow tracking: each result folder mirrored into one MLflow run, idempotently, never fatally.

The metric files are the source of truth (they are DVC metrics); MLflow mirrors them. Every
``log_*`` function reads a run folder's files and brings its MLflow run up to date:

* Experiment ``iicrepro/<protocol>/<dataset>`` (e.g. ``iicrepro/retrieval/ucf101``); run name = the
  run's identity (``r3d-residual-repeat-s0``, ``.../split1`` for fine-tuning); tags backbone, view,
  intra_negative, init, seed, dataset, split, protocol, preset, code_version; params = the resolved
  settings the result was made with (its provenance), flattened to dotted keys.
* Idempotent: the run is found by its identity tag ``iicrepro.key``. Metric points whose step is
  already stored with the same value are skipped and only missing steps are logged, so a rerun or a
  job that logs after every epoch never duplicates a point. If a stored point or param disagrees with
  the files (the result was recomputed), the stale run is deleted and a fresh one logged, because
  MLflow can neither edit a metric point nor change a param. Deleted runs are hidden from the UI and
  from ``search_runs``; ``mlflow gc`` purges them.
* Concurrency: with a local SQLite store, writers are serialised by a lock file beside the database
  (this also covers the creation of a fresh database's tables), and "database is locked" errors are
  retried with backoff. Two writers of the same identity on a server resolve to the oldest run.
* Never fatal: when the store cannot be reached (server down, timeouts) or logging fails, the run
  folder is appended to ``results/.mlflow-pending.jsonl`` and the call returns; `sync_pending`
  (called by ``iicrepro report``) logs those later.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import logging
import math
import os
import random
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iicrepro import io, layout

log = logging.getLogger(__name__)

KEY_TAG = "iicrepro.key"
SUMMARY_EXPERIMENT = "iicrepro-summary"
PROBE_TIMEOUT_S = 5.0  # a tracking server that does not answer /health within this is "down"
ATTEMPTS = 8  # tries for transient store errors ("database is locked"), exponential backoff
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


@dataclass
class Record:
    """What one MLflow run should contain, read from a result folder."""

    experiment: str
    key: str
    run_name: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, list[tuple[int, float]]]  # name -> [(step, value)]
    artifacts: list[tuple[Path, str | None]] = field(default_factory=list)
    finished: bool = True


# --------------------------------------------------------------------------- public API


def tracking_uri(settings: Any) -> str | None:
    """MLFLOW_TRACKING_URI if set, else settings.tracking.mlflow_uri; None when tracking is off."""
    if not settings["tracking"]["enabled"]:
        return None
    return os.environ.get("MLFLOW_TRACKING_URI") or settings["tracking"]["mlflow_uri"]


def log_pretrain(settings: Any, run_dir: str | Path) -> str | None:
    """Per-epoch metrics (metrics.csv) and final values (metrics.json) of a pretraining run."""
    return _log("pretrain", settings, Path(run_dir))


def log_retrieval(settings: Any, run_dir: str | Path) -> str | None:
    """Top-k accuracies per modality (metrics.json) of a retrieval evaluation."""
    return _log("retrieval", settings, Path(run_dir))


def log_finetune(settings: Any, run_dir: str | Path) -> str | None:
    """Test accuracy (metrics.json) and per-epoch curves (metrics.csv) of a fine-tuning run."""
    return _log("finetune", settings, Path(run_dir))


def log_summary(
    settings: Any, artifacts: list[tuple[Path, str | None]], metrics: Mapping[str, float]
) -> str | None:
    """The report as one run of experiment 'iicrepro-summary' (files as artifacts)."""
    uri = tracking_uri(settings)
    if uri is None:
        return None
    preset = str(settings.get("preset", ""))
    record = Record(
        experiment=SUMMARY_EXPERIMENT,
        key=f"summary/{preset}",
        run_name=f"summary-{preset}",
        tags={"preset": preset, "code_version": io.code_version(), "protocol": "summary"},
        params=_flatten_settings(settings),
        metrics={k: [(0, float(v))] for k, v in metrics.items()},
        artifacts=list(artifacts),
    )
    try:
        if not _reachable(uri):
            raise ConnectionError(f"tracking server {uri} does not answer")
        return _upsert_with_retries(uri, record)
    except Exception as exc:  # never fatal: the summary files are written already
        log.warning("MLflow: summary not logged to %s (%s)", uri, _short(exc))
        return None


def sync_pending(settings: Any) -> tuple[int, int]:
    """Log every run folder in the pending list; returns (logged, still pending)."""
    path = layout.mlflow_pending(settings)
    uri = tracking_uri(settings)
    if uri is None or not path.exists():
        return 0, 0
    with _locked(path.with_name(path.name + ".lock")):
        entries: dict[tuple[str, str], dict] = {}
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                e = json.loads(line)
                entries[(e["kind"], e["run_dir"])] = e  # the latest entry per run wins
        if not _reachable(uri):
            return 0, len(entries)
        left = []
        for e in entries.values():
            if not Path(e["run_dir"]).is_dir():
                log.warning("MLflow: pending run %s no longer exists; dropped", e["run_dir"])
                continue
            run_settings = e.get("settings") or settings
            if _log(e["kind"], run_settings, Path(e["run_dir"]), uri=uri, queue=False) is None:
                left.append(e)
        io.write_text(path, "".join(json.dumps(e, default=str) + "\n" for e in left))
    return len(entries) - len(left), len(left)


# --------------------------------------------------------------------------- reading results


def _log(
    kind: str, settings: Any, run_dir: Path, uri: str | None = None, queue: bool = True
) -> str | None:
    uri = uri or tracking_uri(settings)
    if uri is None:
        return None
    try:
        record = READERS[kind](settings, run_dir)
    except Exception as exc:  # missing or unreadable files: nothing to log, nothing to retry
        log.warning("MLflow: nothing to log for %s (%s)", run_dir, _short(exc))
        return None
    try:
        if not _reachable(uri):
            raise ConnectionError(f"tracking server {uri} does not answer")
        return _upsert_with_retries(uri, record)
    except Exception as exc:  # never fatal: the files are the source of truth
        log.warning("MLflow: %s not logged to %s (%s)", run_dir, uri, _short(exc))
        if queue:
            _append_pending(settings, kind, run_dir, reason=_short(exc))
        return None


def _identity(protocol: str, run_dir: Path, settings: Any, prov: dict) -> tuple[dict, str, str]:
    """Tags, identity key and run name from the folder layout (iicrepro.layout)."""
    split = None
    if protocol == "finetune":
        split = int(run_dir.parent.name.removeprefix("split"))
        dataset = run_dir.parent.parent.name
    else:
        dataset = run_dir.parent.name
    run = run_dir.name
    parts = layout.parse_run_name(run) or {}
    made_with = prov.get("settings") or settings
    if split is None:
        section = "pretrain" if protocol == "pretrain" else "retrieval"
        split = (made_with.get(section) or {}).get("split", "")
    tags = {
        "protocol": protocol,
        "dataset": dataset,
        "split": split,
        "preset": made_with.get("preset", ""),
        "code_version": prov.get("code_version") or io.code_version(),
        "iicrepro.run_dir": str(run_dir),
        **{k: parts[k] for k in ("backbone", "view", "intra_negative", "init", "seed") if parts},
    }
    if parts.get("variant"):
        tags["variant"] = parts["variant"]
    name = run if protocol != "finetune" else f"{run}/split{split}"
    key = f"{protocol}/{dataset}/{name}"
    tags[KEY_TAG] = key
    return {k: str(v) for k, v in tags.items()}, key, name


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


# metrics.json entries that are identity, inputs or settings rather than results.
NOT_METRICS = {"provenance", "rows", "checkpoint", "bn_recalibration", "seed", "split"}


def _numeric_leaves(data: Any, prefix: str = "") -> dict[str, float]:
    """Dotted numeric leaves of a metrics.json (results only, no booleans)."""
    out: dict[str, float] = {}
    if isinstance(data, Mapping):
        for k, v in data.items():
            if not prefix and k in NOT_METRICS:
                continue
            out.update(_numeric_leaves(v, f"{prefix}{k}."))
    elif isinstance(data, int | float) and not isinstance(data, bool):
        out[prefix.rstrip(".")] = float(data)
    return out


def _record(protocol: str, settings: Any, run_dir: Path, summary: dict, series: dict) -> Record:
    prov = summary.get("provenance") or {}
    tags, key, name = _identity(protocol, run_dir, settings, prov)
    for k in ("bn", "init"):  # result-file facts worth slicing by
        if isinstance(summary.get(k), str):
            tags[f"result.{k}"] = summary[k]
    return Record(
        experiment=f"iicrepro/{protocol}/{tags['dataset']}",
        key=key,
        run_name=name,
        tags=tags,
        params=_flatten_settings(prov.get("settings") or settings),
        metrics=series,
        finished=bool(summary),
    )


def _read_pretrain(settings: Any, run_dir: Path) -> Record:
    csv_path, json_path = run_dir / "metrics.csv", run_dir / "metrics.json"
    if not csv_path.exists() and not json_path.exists():
        raise FileNotFoundError(f"no metrics.csv or metrics.json in {run_dir}")
    series = _read_csv(csv_path) if csv_path.exists() else {}
    summary = io.read_json(json_path) if json_path.exists() else {}
    for k, v in _numeric_leaves(summary).items():
        series[f"final.{k}"] = [(0, v)]  # final values beside the per-epoch curves
    return _record("pretrain", settings, run_dir, summary, series)


def _read_retrieval(settings: Any, run_dir: Path) -> Record:
    summary = io.read_json(run_dir / "metrics.json")
    series = {k: [(0, v)] for k, v in _numeric_leaves(summary).items()}
    for row in summary.get("rows", []):
        series[f"{row['modality']}.{row['metric']}"] = [(0, float(row["value"]))]
    return _record("retrieval", settings, run_dir, summary, series)


def _read_finetune(settings: Any, run_dir: Path) -> Record:
    summary = io.read_json(run_dir / "metrics.json")
    series = {k: [(0, v)] for k, v in _numeric_leaves(summary).items()}
    if (run_dir / "metrics.csv").exists():
        for col, points in _read_csv(run_dir / "metrics.csv").items():
            series[f"epoch.{col}" if col in series else col] = points
    return _record("finetune", settings, run_dir, summary, series)


READERS = {"pretrain": _read_pretrain, "retrieval": _read_retrieval, "finetune": _read_finetune}


def _flatten_settings(settings: Any, prefix: str = "") -> dict[str, str]:
    """Resolved settings as dotted params; the preset table itself is left out (it is not a knob)."""
    out: dict[str, str] = {}
    for k, v in (settings or {}).items():
        if not prefix and k == "presets":
            continue
        if isinstance(v, Mapping):
            out.update(_flatten_settings(v, f"{prefix}{k}."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out[f"{prefix}{k}"] = text[:MAX_PARAM_CHARS]
    return out


# --------------------------------------------------------------------------- writing to MLflow


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def _reachable(uri: str) -> bool:
    """A quick /health probe for servers, so a dead server costs seconds, not MLflow's retries."""
    if not uri.startswith(("http://", "https://")):
        return True
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


def _upsert_with_retries(uri: str, record: Record) -> str:
    db = _sqlite_path(uri)
    # A server already retries its HTTP requests (MLFLOW_HTTP_REQUEST_MAX_RETRIES); once is enough.
    attempts = ATTEMPTS if db else 2
    for attempt in range(attempts):
        try:
            with _store_lock(db):
                return _upsert(_client(uri), record, db)
        except Exception as exc:
            if attempt == attempts - 1 or not _transient(exc):
                raise
            wait = min(10.0, 0.25 * 2**attempt) * (0.5 + random.random())
            log.info("MLflow: transient error (%s); retry in %.1f s", _short(exc), wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _store_lock(db: Path | None):
    """Serialise writers of one local SQLite file (no-op for servers, which serialise themselves)."""
    return _locked(db.with_name(db.name + ".lock")) if db else contextlib.nullcontext()


def _client(uri: str):
    if uri.startswith(("http://", "https://")):
        # Fail over to the pending list in seconds rather than after minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, name: str, db: Path | None) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        # Artifacts of a local store live beside its database, not in the caller's cwd.
        where = str(db.resolve().parent / "mlartifacts" / name) if db else None
        try:
            return client.create_experiment(name, artifact_location=where)
        except MlflowException:  # created concurrently by another job
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def _runs_with_key(client, exp_id: str, key: str) -> list:
    runs = client.search_runs(
        [exp_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'", max_results=100
    )
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def _stored_value(x: float) -> float:
    """What the store keeps: SQL cannot hold infinities, MLflow stores the largest finite float."""
    return math.copysign(sys.float_info.max, x) if math.isinf(x) else x


def _same(a: float, b: float) -> bool:
    a, b = _stored_value(a), _stored_value(b)
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _stored_histories(client, run, record: Record) -> dict[str, dict[int, float]] | None:
    """Stored metric histories by step, or None if they contradict the record (stale run)."""
    if any(k not in record.metrics for k in run.data.metrics):
        return None
    stored = {}
    for name, points in record.metrics.items():
        history = {}
        if name in run.data.metrics:
            for m in client.get_metric_history(run.info.run_id, name):
                if m.step in history and not _same(history[m.step], m.value):
                    return None
                history[m.step] = m.value
        wanted = dict(points)
        if any(s not in wanted or not _same(v, wanted[s]) for s, v in history.items()):
            return None
        stored[name] = history
    return stored


def _upsert(client, record: Record, db: Path | None) -> str:
    from mlflow.entities import Metric, Param, RunTag

    record.tags[KEY_TAG] = record.key
    exp_id = _experiment_id(client, record.experiment, db)
    run, stored = None, None
    for candidate in _runs_with_key(client, exp_id, record.key):
        params = candidate.data.params
        conflict = any(k in params and params[k] != v for k, v in record.params.items())
        histories = None if conflict else _stored_histories(client, candidate, record)
        if run is None and histories is not None:
            run, stored = candidate, histories
        else:  # a stale copy (recomputed result) or a duplicate from a race
            client.delete_run(candidate.info.run_id)
    if run is None:
        run = client.create_run(exp_id, run_name=record.run_name, tags=record.tags)
        winner = _runs_with_key(client, exp_id, record.key)[0]
        if winner.info.run_id != run.info.run_id:  # another writer created it first
            client.delete_run(run.info.run_id)
        run = client.get_run(winner.info.run_id)
        stored = _stored_histories(client, run, record) or {}
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    metrics = [
        Metric(name, value, now, step)
        for name, points in record.metrics.items()
        for step, value in points
        if step not in stored.get(name, {})
    ]
    params = [Param(k, v) for k, v in record.params.items() if k not in run.data.params]
    tags = [RunTag(k, v) for k, v in record.tags.items() if run.data.tags.get(k) != v]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    for i in range(0, max(len(params), len(tags)), 100):
        client.log_batch(run_id, params=params[i : i + 100], tags=tags[i : i + 100])
    for path, artifact_path in record.artifacts:
        client.log_artifact(run_id, str(path), artifact_path)
    if record.finished and run.info.status != "FINISHED":
        client.set_terminated(run_id, "FINISHED")
    return run_id


def _append_pending(settings: Any, kind: str, run_dir: Path, reason: str) -> None:
    """One JSON line per failed run folder; appends are serialised by a lock file."""
    path = layout.mlflow_pending(settings)
    entry = {
        "kind": kind,
        "run_dir": str(run_dir),
        "reason": reason,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "settings": settings,
    }
    try:
        with _locked(path.with_name(path.name + ".lock")), open(path, "a") as f:
            f.write(json.dumps(entry, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        log.warning("MLflow: could not record %s as pending (%s)", run_dir, _short(exc))


def log_best_effort(protocol: str, settings: Any, run_dir: Path) -> None:
    """Mirror one finished run's metric files to MLflow; any failure only warns (the files are
    the source of truth, and a tracking problem must never fail a pipeline job)."""
    loggers = {"pretrain": log_pretrain, "retrieval": log_retrieval, "finetune": log_finetune}
    try:
        loggers[protocol](settings, run_dir)
    except Exception as exc:  # noqa: BLE001
        print(f"warning: MLflow logging of {run_dir} skipped ({type(exc).__name__}: {exc})")
