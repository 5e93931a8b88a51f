"""Shared pytest setup: CPU-only and isolated from the user's MLflow store."""

import os

import pytest

# A tracking server that is down must fail fast in tests, not retry for minutes.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


@pytest.fixture(scope="session")
def session_mlflow_uri(tmp_path_factory):
    """One SQLite store for the whole session (creating a store runs its schema migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def _isolated_tracking(session_mlflow_uri, monkeypatch):
    """Steps run by tests log here unless a test sets MLFLOW_TRACKING_URI itself. A test that
    sets mlflow's process-wide URI (``mlflow.set_tracking_uri``) has it reset afterwards: it
    overrides the environment variable, so it would leak into every later test."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", session_mlflow_uri)
    yield
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waiting on a shared CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
