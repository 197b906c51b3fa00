"""A real sweep service: ``sweeper serve`` in a subprocess, on SQLite or PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_dataset

PG_URL = os.environ.get("SWEEPER_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """The service database: a SQLite file, or a fresh schema in the local PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'service.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def pg_url():
    """A fresh schema in the local PostgreSQL (``SWEEPER_TEST_PG_URL``), dropped afterwards."""
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_URL)
    schema = f"sweeper_fault_{secrets.token_hex(4)}"
    with admin.begin() as c:  # no PostgreSQL is a failure, not a skip: CI has one
        c.execute(text(f"CREATE SCHEMA {schema}"))
    yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    with admin.begin() as c:
        c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'service.db'}"


class Service:
    """One ``sweeper serve`` process; ``restart`` and ``kill`` keep its drivers running."""

    def __init__(self, tmp: Path, db_url: str, **env: str):
        self.tmp, self.db_url = tmp, db_url
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.mlflow_uri = f"sqlite:///{tmp / 'mlflow.db'}"
        inherited = {
            k: v for k, v in os.environ.items() if k not in ("SWEEPER_SERVER", "RAY_ADDRESS")
        }
        self.env = inherited | {
            "SWEEPER_HOME": str(tmp / "sweeps"),
            "SWEEPER_DATABASE_URL": db_url,
            "SWEEPER_ALLOWED_PATHS": str(tmp),
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "SWEEPER_RECONCILE_INTERVAL_S": "0.5",
            **env,
        }
        self.proc: subprocess.Popen | None = None
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def start(self) -> Service:
        log = open(self.tmp / "serve.log", "ab")  # noqa: SIM115 - the process keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sweeper", "serve", "--port", str(self.port)],
            env=self.env,
            cwd=self.tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sweeper serve exited:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if self.http.get("/healthz").status_code == 200:
                    return self
            time.sleep(0.2)
        raise RuntimeError(f"sweeper serve did not answer:\n{self.log()}")

    def log(self) -> str:
        return (self.tmp / "serve.log").read_text(errors="replace")[-5000:]

    def kill(self) -> None:
        """SIGKILL the API process (not its drivers: they run in their own sessions)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def submit(self, spec: dict) -> dict:
        r = self.http.post("/sweeps", json=spec)
        assert r.status_code == 201, r.text
        return r.json()

    def sweep(self, sweep_id: str) -> dict:
        r = self.http.get(f"/sweeps/{sweep_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def trials(self, sweep_id: str) -> list[dict]:
        return self.http.get(f"/sweeps/{sweep_id}/trials").json()["items"]

    def wait(self, sweep_id: str, until, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sw = self.sweep(sweep_id)
            if until(sw):
                return sw
            time.sleep(0.5)
        raise AssertionError(f"timed out; last state {sw}\n--- serve.log\n{self.log()}")

    def driver_log(self, sweep_id: str) -> str:
        p = self.tmp / "sweeps" / sweep_id / "driver.log"
        return p.read_text(errors="replace")[-5000:] if p.exists() else "(no driver.log)"


def _kill_drivers(home: Path) -> None:
    """Teardown: no driver (nor its Ray) outlives the test."""
    out = subprocess.run(["pgrep", "-f", "api.runner"], capture_output=True, text=True).stdout
    for pid in map(int, out.split()):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if f"SWEEPER_HOME={home}".encode() in env:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def service(tmp_path, _private_cache):
    """Factory: ``service(db_url, **env)`` starts ``sweeper serve``; all stop at teardown."""
    started: list[Service] = []

    def make(db_url: str, **env: str) -> Service:
        svc = Service(tmp_path, db_url, **env).start()
        started.append(svc)
        return svc

    yield make
    for svc in started:
        svc.stop()
    _kill_drivers(tmp_path / "sweeps")


@pytest.fixture
def api_spec(tmp_path, tiny_spec):
    """Factory of specs on the tiny model, with the dataset under the allowed root."""
    data = make_dataset(tmp_path / "data")

    def make(name: str = "tiny", max_steps: int = 20, trials: int = 2, **sections) -> dict:
        spec = tiny_spec(
            name=name,
            trainer={"dataset": str(data), "max_steps": max_steps},
            budget={"trials": trials, "max_concurrent": 2},
        )
        spec["search"]["space"]["token_expansion"]["choices"] = [1, 2]
        return spec | sections

    return make
