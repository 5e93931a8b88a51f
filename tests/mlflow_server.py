"""A real MLflow tracking server on 127.0.0.1 for tests (SQLite backend, proxied artifacts).

`MlflowServer(folder).start()` launches ``mlflow server`` on a free port in its own process group
and returns once ``/health`` answers (about 12 s on a 2-core machine); `stop()` ends that group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on (right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(uri: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


class MlflowServer:
    def __init__(self, folder: Path, port: int | None = None, store: Path | None = None):
        """`store`: an existing SQLite file to serve (default: a new one in `folder`)."""
        self.folder = Path(folder)
        self.store = Path(store) if store is not None else self.folder / "server.db"
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.folder / "server.log"

    def start(self, timeout: float = 120.0) -> MlflowServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.store.resolve()}",
            "--artifacts-destination", str(self.folder / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited:\n{self.log_path.read_text()[-3000:]}")
            if answers(self.uri):
                return self
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"mlflow server not ready in {timeout} s:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the server's own group: it and its workers
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # open keep-alive connections can delay a clean exit
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
