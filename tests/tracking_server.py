"""A real MLflow tracking server for the tests: PostgreSQL (Debian's package) in a temporary data folder and
`mlflow server` on top of it, both on 127.0.0.1 and a free port each; the server can be stopped and started
again on the same port (an outage)."""
from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str:
    """A PostgreSQL server program: Debian keeps them under /usr/lib/postgresql/<version>/bin, off PATH."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    if not found[-1]:
        raise RuntimeError(f"PostgreSQL's {name} is not installed (scripts/install.sh installs postgresql)")
    return found[-1]


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the `postgres` user the package creates."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class TrackingServer:
    """PostgreSQL plus `mlflow server` (artifacts served from `folder/artifacts`), started by `start()`."""

    def __init__(self, folder: Path):
        self.folder, self.pg_port, self.port = folder, free_port(), free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.server: subprocess.Popen[bytes] | None = None

    def start_database(self) -> None:
        data = self.folder / "pg"
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres")
        subprocess.run(_as_postgres([_pg_bin("initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust", "-E",
                                     "UTF8"]), check=True, capture_output=True, timeout=120)
        subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(data), "-l", str(self.folder / "pg.log"), "-w",
                                     "-o", f"-h 127.0.0.1 -p {self.pg_port} -k {self.folder}", "start"]),
                       check=True, capture_output=True, timeout=120)
        subprocess.run(_as_postgres([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "mlflow",
                                     "mlflow"]), check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        """Start `mlflow server` and wait until it answers (its first start creates the tables)."""
        mlflow = str(Path(sys.executable).with_name("mlflow"))
        log = open(self.folder / "mlflow-server.log", "ab")  # noqa: SIM115 - kept open by the server process
        self.server = subprocess.Popen(
            [mlflow, "server", "--backend-store-uri", f"postgresql://mlflow@127.0.0.1:{self.pg_port}/mlflow",
             "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", "1"], stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.server.poll() is None:
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2).read()
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not start: see {self.folder / 'mlflow-server.log'}")

    def stop(self) -> None:
        """Stop `mlflow server` (its whole process group: uvicorn's workers too)."""
        if self.server is not None:
            os.killpg(self.server.pid, signal.SIGTERM)
            self.server.wait(timeout=60)
            self.server = None

    def stop_database(self) -> None:
        subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(self.folder / "pg"), "-m", "fast", "stop"]),
                       check=False, capture_output=True, timeout=60)
