"""A real ``mlflow server`` for the tests: a free 127.0.0.1 port, a sqlite backend, served
artifacts, in its own process group so that a test can take it down like a crash and bring it
back on the same port and data:

    with MlflowServer(tmp_path) as server:
        server.uri          # http://127.0.0.1:PORT
        server.stop()       # SIGKILL: the outage starts
        server.backend      # sqlite:///.../server.db: read the store while the server is down
        server.start()      # same port, same database and artifacts
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.helpers.http_server import free_port, wait_until_answering


class MlflowServer:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.backend = f"sqlite:///{self.folder}/server.db"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> None:
        """Start the server (unless it runs) and wait until it answers ``/health``."""
        if self.proc is not None and self.proc.poll() is None:
            return
        log = open(self.folder / "mlflow-server.log", "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                self.backend,
                "--artifacts-destination",
                str(self.folder / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            # No GenAI job runners (huey consumers): nothing here uses them, and they double the
            # server's start-up time.
            env={
                **os.environ,
                "MLFLOW_DISABLE_TELEMETRY": "true",
                "DO_NOT_TRACK": "true",
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            },
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        try:
            wait_until_answering(self.uri + "/health", self.proc, timeout, self._log_text, pause=0.25)
        except RuntimeError:
            self.stop()
            raise

    def _log_text(self) -> str:
        return (self.folder / "mlflow-server.log").read_text(errors="replace")

    def stop(self) -> None:
        """Kill the server and its workers at once (SIGKILL), as a crash or a power cut would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
