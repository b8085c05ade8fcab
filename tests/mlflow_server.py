"""A real ``mlflow server`` for tests: sqlite backend, local artifact root, 127.0.0.1, a free port.

``start_mlflow_server(tmp)`` starts it in its own process group and waits for ``/health`` (startup
takes ~25 s on this machine; allowed 120 s); ``server.stop()`` kills the whole group (no orphaned
gunicorn/uvicorn workers). The session fixture ``mlflow_server`` in tests/conftest.py wraps it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HEALTH_TIMEOUT_S = 120.0
#: the servers this process started, by tracking URI (a test given the fixture's URI finds the database)
RUNNING: dict[str, MlflowServer] = {}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mlflow_executable() -> list[str]:
    """The ``mlflow`` CLI of the interpreter running the tests."""
    candidate = Path(sys.executable).with_name("mlflow")
    if candidate.exists():
        return [str(candidate)]
    return [sys.executable, "-m", "mlflow"]


@dataclass
class MlflowServer:
    """A running server: its tracking URI, sqlite database, artifact root and process."""

    tracking_uri: str
    db_path: Path
    artifact_root: Path
    port: int
    process: subprocess.Popen
    log_path: Path

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server's whole process group (SIGTERM, then SIGKILL)."""
        RUNNING.pop(self.tracking_uri, None)
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # workers may outlive the master: kill what is left of the group
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.process.poll() is None:
            self.process.wait(timeout=timeout)

    def kill(self) -> None:
        """Kill the server at once (SIGKILL to the group), for outage tests."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=15.0)


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(uri + "/health", timeout=2.0) as response:  # noqa: S310 - local URI
            return bool(response.status == 200)
    except OSError:
        return False


def start_mlflow_server(tmp: Path, *, port: int | None = None, timeout: float = HEALTH_TIMEOUT_S) -> MlflowServer:
    """Start ``mlflow server`` with its state under ``tmp``; return once ``/health`` answers 200.

    Reusing ``tmp`` (and ``port``) restarts a server on the same database and artifacts.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    db_path = tmp / "mlflow.db"
    artifact_root = tmp / "artifacts"
    artifact_root.mkdir(exist_ok=True)
    port = port or free_port()
    log_path = tmp / f"server-{port}.log"
    cmd = [*mlflow_executable(), "server",
           "--backend-store-uri", f"sqlite:///{db_path}",
           "--default-artifact-root", str(artifact_root),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI")
    with open(log_path, "ab") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env=env, cwd=tmp)
    uri = f"http://127.0.0.1:{port}"
    server = MlflowServer(uri, db_path, artifact_root, port, process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            server.stop()
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{tail}")
        if _healthy(uri):
            RUNNING[uri] = server
            return server
        time.sleep(0.5)
    server.stop()
    tail = log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"mlflow server did not answer /health within {timeout:.0f} s:\n{tail}")
