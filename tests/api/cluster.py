"""A loopback deployment: Ray head + worker nodes and an ``mlflow server`` on PostgreSQL.

What docker/compose.yaml runs as containers, here as processes on 127.0.0.1, each on
explicit ports (Ray's default GCS port is Redis's 6379) and in its own process group, so a
test can kill a whole node.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.api.conftest import PG_URL, _free_port

TOKEN_ENV = {"RAY_AUTH_MODE": "token"}  # Ray 2.60's `ray start` turns token auth on


def _stop(proc: subprocess.Popen, grace: float = 30) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code < 500:
                return
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        time.sleep(1)
    raise AssertionError(f"{url} did not answer:\n{log.read_text(errors='replace')[-3000:]}")


class RayCluster:
    """``ray start --head`` plus any number of ``ray start --address`` nodes, on loopback."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.gcs_port, self.dash_port = _free_port(), _free_port()
        self.gcs = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dash_port}"
        self.temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # socket paths stay short
        self.nodes: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, args: list[str], cpus: int) -> subprocess.Popen:
        cmd = ["ray", "start", "--block", "--disable-usage-stats"]
        cmd += ["--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus)]
        cmd += ["--resources", json.dumps({name: 1})]  # tells the nodes apart
        cmd += ["--dashboard-agent-listen-port", str(_free_port())]
        cmd += ["--metrics-export-port", str(_free_port())]
        proc = subprocess.Popen(
            cmd + args,
            stdout=open(self.logs / f"{name}.log", "wb"),  # noqa: SIM115 - the process keeps it
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=os.environ | TOKEN_ENV,
        )
        self.nodes[name] = proc
        return proc

    def start_head(self, cpus: int = 1) -> None:
        proc = self._start(
            "head",
            [
                "--head",
                "--port",
                str(self.gcs_port),
                "--dashboard-port",
                str(self.dash_port),
                "--dashboard-host",
                "127.0.0.1",
                "--include-dashboard",
                "true",
                "--temp-dir",
                self.temp,
            ],
            cpus,
        )
        _wait_http(f"{self.dashboard}/api/version", proc, self.logs / "head.log")

    def add_node(self, name: str, cpus: int = 1, timeout: float = 90) -> None:
        self._start(name, ["--address", self.gcs], cpus)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if name in {r for n in self.alive() for r in n["Resources"]}:
                return
            assert self.nodes[name].poll() is None, (self.logs / f"{name}.log").read_text()[-3000:]
            time.sleep(1)
        raise AssertionError(f"node {name} did not join the cluster")

    def kill_node(self, name: str) -> None:
        """SIGKILL the node's raylet, its workers and its agents at once: a lost machine.

        Workers are the raylet's children but not all in its process group, so the whole
        process tree goes, not just the group.
        """
        import psutil

        root = psutil.Process(self.nodes[name].pid)
        tree = [root, *root.children(recursive=True)]
        for proc in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(tree, timeout=10)
        self.nodes[name].wait(10)

    def alive(self) -> list[dict]:
        """``ray.nodes()`` of the live nodes, asked in a fresh process (as a client would)."""
        probe = (
            "import json, sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(json.dumps([n for n in ray.nodes() if n['Alive']]))"
        )
        out = subprocess.run(
            [sys.executable, "-c", probe, self.gcs],
            capture_output=True,
            text=True,
            timeout=120,
            env=os.environ | TOKEN_ENV,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    def node_names(self) -> dict[str, str]:
        """Node id -> the custom resource naming that node."""
        return {
            n["NodeID"]: next(r for r in n["Resources"] if r in self.nodes) for n in self.alive()
        }

    def stop(self) -> None:
        for name in reversed(list(self.nodes)):  # workers first, then the head
            _stop(self.nodes[name])
        shutil.rmtree(self.temp, ignore_errors=True)


class MlflowServer:
    """``mlflow server`` in its own process group, restartable on the same port and store.

    Its backend store is ``backend``, or by default a fresh PostgreSQL database (dropped
    by :meth:`stop`).
    """

    def __init__(self, root: Path, backend: str | None = None):
        from sqlalchemy import create_engine, text

        self.root, self.db, self.backend = root, None, backend
        if backend is None:
            self.db = f"mlflow_test_{secrets.token_hex(4)}"
            admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                c.execute(text(f"CREATE DATABASE {self.db}"))
            admin.dispose()
            self.backend = PG_URL.rsplit("/", 1)[0] + f"/{self.db}"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        """Start it and wait until it answers; returns the seconds that took."""
        t0 = time.monotonic()
        # The same command as docker/compose.yaml's mlflow service.
        cmd = ["mlflow", "server", "--serve-artifacts"]
        cmd += ["--artifacts-destination", str(self.root / "mlartifacts")]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        cmd += ["--allowed-hosts", f"127.0.0.1:{self.port},localhost:{self.port}"]
        log = self.root / "mlflow-server.log"
        self.proc = subprocess.Popen(
            cmd,
            stdout=open(log, "ab"),  # noqa: SIM115 - the process keeps it
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=os.environ | {"MLFLOW_BACKEND_STORE_URI": self.backend},
        )
        _wait_http(f"{self.url}/health", self.proc, log)
        return time.monotonic() - t0

    def kill(self) -> None:
        """SIGKILL the server's process group (requests in flight are cut); the store stays."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        from sqlalchemy import create_engine, text

        if self.proc is not None and self.proc.poll() is None:
            _stop(self.proc)
        if self.db is None:
            return
        admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f"DROP DATABASE IF EXISTS {self.db} WITH (FORCE)"))
        admin.dispose()
