"""Latency of the sweep service under concurrent clients while a sweep runs.

A real ``sweeper serve`` runs as a subprocess on a free port, with its working files,
model cache, MLflow store and (by default) SQLite database in a temporary folder. One real
sweep (tiny random Llama, a small digit-like dataset, many steps) is submitted and the
load starts once it is running and its driver has written a trial row, so every figure is
measured while a driver process writes trial rows and events to the same database.

Each repeat runs three phases of ``--duration`` seconds, each with ``--clients`` threads
(one ``httpx.Client`` each, keep-alive) sending requests back to back:

* ``healthz``: ``GET /healthz`` (a ``SELECT 1``): the in-run baseline, what the HTTP stack,
  the thread pool and a database round trip cost;
* ``get_sweep``: ``GET /sweeps/{id}`` of the running sweep (the sweep row, its trial
  counts, the response model);
* ``post_sweeps``: ``POST /sweeps`` with a small valid spec (parse, validate, path checks,
  insert and event). These queue behind the running sweep (``SWEEPER_MAX_RUNNING_SWEEPS=1``)
  and are cancelled at the end of the phase, so they never start. All carry the same
  name, as a script submitting a batch would.

At the end the sweep is cancelled, the server stopped (SIGINT, then SIGKILL after 15 s)
and any process still carrying the bench's folder in its environment (a driver's process
group with its local Ray, a straggler) killed, so nothing survives the bench.

Latency is per request, measured in the client (the clients share the machine's cores
with the server and the sweep). Per phase: p50, p99 and throughput (ok responses per
second); reported figures are medians over ``--repeats``. Non-2xx responses and transport
errors are counted apart and listed.

    python bench/api_load.py                               # SQLite, 8 clients, 10 s, 3 repeats
    python bench/api_load.py --database-url postgresql+psycopg://postgres@127.0.0.1:5432/test

With a PostgreSQL URL the bench creates a fresh schema (``sweeper_bench_<hex>``), points
the service at it (``options=-csearch_path=...``) and drops it at the end, so existing
tables are never touched.

Last line: ``p99_get_sweep_ms: X``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np

from trainer.data import DIGIT_CHOICES, digits_examples, write_dataset

PHASES = ("healthz", "get_sweep", "post_sweeps")


def make_dataset(out: Path, n: int = 120, dim: int = 48, seed: int = 0, noise: float = 0.3) -> Path:
    """Digit-like data: each label a prototype embedding plus noise (tests/conftest.py's)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n)
    emb = rng.normal(size=(10, dim))[labels] + noise * rng.normal(size=(n, dim))
    return write_dataset(out, emb, digits_examples(labels), {"choices": DIGIT_CHOICES})


def sweep_spec(name: str, dataset: str, steps: int, trials: int) -> dict:
    return {
        "name": name,
        "trainer": {
            "model": "tiny-llama",
            "dataset": dataset,
            "max_steps": steps,
            "eval_every": 50,
            "batch_size": 16,
            "lr": 0.01,
            "device": "cpu",
        },
        "search": {
            "sampler": "tpe",
            "seed": 0,
            "space": {"reg_constant": {"type": "float", "low": 1e-3, "high": 10.0, "log": True}},
        },
        "budget": {"trials": trials, "max_concurrent": 1},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- PostgreSQL: a private schema ------------------------------------------------------
def pg_schema_url(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}')}"


def pg_exec(url: str, sql: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.begin() as c:
            c.execute(text(sql))
    finally:
        engine.dispose()


# ---- the server ------------------------------------------------------------------------
class Server:
    def __init__(self, work: Path, database_url: str | None):
        self.work, self.port = work, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = os.environ.copy()
        env.pop("SWEEPER_DATABASE_URL", None)
        env.pop("SWEEPER_API_TOKEN", None)
        env.pop("RAY_ADDRESS", None)
        env |= {
            "SWEEPER_HOME": str(work / "sweeps"),
            "SWEEPER_CACHE_DIR": str(work / "cache"),
            "HF_HUB_OFFLINE": "1",
            "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db",
            "SWEEPER_ALLOWED_PATHS": str(work),
            "SWEEPER_MAX_RUNNING_SWEEPS": "1",
        }
        if database_url:
            env["SWEEPER_DATABASE_URL"] = database_url
        sweeper = shutil.which("sweeper") or "sweeper"
        self.log = work / "server.log"
        self._log = open(self.log, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sweeper, "serve", "--port", str(self.port)],
            env=env,
            cwd=work,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited ({self.proc.returncode}); see {self.log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise SystemExit(f"server not healthy after {timeout:.0f} s; see {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def our_processes(work: Path) -> dict[int, str]:
    """Live processes whose command line or environment names the bench's folder (the
    server, sweep drivers and their local Ray all carry it in SWEEPER_HOME): pid -> command."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            blob = cmd + (proc / "environ").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if str(work).encode() in blob and state != "Z":
            found[int(proc.name)] = cmd.replace(b"\0", b" ").decode(errors="replace").strip()
    return found


def drivers(work: Path) -> list[int]:
    return [pid for pid, cmd in our_processes(work).items() if "api.runner" in cmd]


def kill_leftovers(work: Path) -> list[str]:
    """Kill what is left of this bench's processes: each sweep driver's process group (a
    driver leads its own session, its local Ray under it), then any straggler."""
    killed = []
    for pid in drivers(work):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            pgid = os.getpgid(pid)
            if pgid != os.getpgrp():  # never this bench's own group
                os.killpg(pgid, signal.SIGKILL)
                killed.append(f"driver group {pgid}")
    deadline = time.monotonic() + 15
    while our_processes(work) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid, cmd in our_processes(work).items():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed.append(f"{pid} ({cmd[:60]})")
    return killed


# ---- load ------------------------------------------------------------------------------
def run_phase(make_request, clients: int, duration: float) -> dict:
    """``clients`` threads send requests back to back for ``duration`` seconds."""
    lat: list[list[float]] = [[] for _ in range(clients)]
    bad: list[list[str]] = [[] for _ in range(clients)]
    extra: list[list] = [[] for _ in range(clients)]
    stop_at = [0.0]
    # The clock starts once every client has connected (its first request, not timed).
    start = threading.Barrier(
        clients + 1, action=lambda: stop_at.__setitem__(0, time.perf_counter() + duration)
    )

    def worker(i: int) -> None:
        with httpx.Client(timeout=60) as client:
            try:
                r = make_request(client)
                if r.request.method == "POST" and r.is_success:
                    extra[i].append(r.json()["id"])
            except httpx.HTTPError as e:
                bad[i].append(f"(first request) {type(e).__name__}: {e}")
            start.wait()
            while time.perf_counter() < stop_at[0]:
                t0 = time.perf_counter()
                try:
                    r = make_request(client)
                except httpx.HTTPError as e:
                    bad[i].append(f"{type(e).__name__}: {e}")
                    continue
                dt = time.perf_counter() - t0
                if r.is_success:
                    lat[i].append(dt)
                    if r.request.method == "POST":
                        extra[i].append(r.json()["id"])
                else:
                    bad[i].append(f"{r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - (stop_at[0] - duration)
    ms = np.array([x for xs in lat for x in xs]) * 1000
    return {
        "n": len(ms),
        "p50": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p99": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
        "rps": len(ms) / wall,
        "errors": [e for es in bad for e in es],
        "created": [x for xs in extra for x in xs],
    }


def trial_steps(http: httpx.Client, sweep_id: str) -> dict[str, int | None]:
    items = http.get(f"/sweeps/{sweep_id}/trials").json()["items"]
    return {t["id"]: t.get("step") for t in items}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients per phase")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--database-url",
        help="service database (default: SQLite in the temporary folder); a PostgreSQL URL "
        "gets a fresh schema, dropped at the end",
    )
    ap.add_argument(
        "--steps", type=int, default=20000, help="max_steps of each of the sweep's 2 trials"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()

    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="api-load-"))
    db_url, schema = args.database_url, None
    if db_url and db_url.startswith("postgresql"):
        schema = f"sweeper_bench_{secrets.token_hex(4)}"
        pg_exec(db_url, f"CREATE SCHEMA {schema}")
        db_url = pg_schema_url(db_url, schema)
    backend = (args.database_url or "sqlite").split(":")[0].split("+")[0]

    results: dict[str, list[dict]] = {p: [] for p in PHASES}
    notes: list[str] = []
    server = None
    try:
        dataset = make_dataset(work / "data" / "tiny")
        server = Server(work, db_url)
        server.wait_healthy()
        http = httpx.Client(base_url=server.url, timeout=60)
        r = http.post("/sweeps", json=sweep_spec("load", str(dataset), args.steps, 2))
        r.raise_for_status()
        sweep_id = r.json()["id"]
        t0 = time.monotonic()
        while True:
            status = http.get(f"/sweeps/{sweep_id}").json()["status"]
            if status == "running" and trial_steps(http, sweep_id):
                break
            if status not in ("queued", "running") or time.monotonic() - t0 > 300:
                raise SystemExit(
                    f"sweep {sweep_id} is {status} after {time.monotonic() - t0:.0f} s; "
                    f"see {server.log} and {work}/sweeps/{sweep_id}/driver.log"
                )
            time.sleep(0.5)
        print(f"sweep {sweep_id} running with a trial row after {time.monotonic() - t0:.1f} s")
        steps_before = trial_steps(http, sweep_id)

        post_body = sweep_spec("load-post", str(dataset), 10, 1)
        requests = {
            "healthz": lambda c: c.get(f"{server.url}/healthz"),
            "get_sweep": lambda c: c.get(f"{server.url}/sweeps/{sweep_id}"),
            "post_sweeps": lambda c: c.post(f"{server.url}/sweeps", json=post_body),
        }
        for rep in range(args.repeats):
            for phase in PHASES:
                res = run_phase(requests[phase], args.clients, args.duration)
                results[phase].append(res)
                t_cancel = time.perf_counter()
                for sid in res["created"]:  # queued behind the running sweep: cancel them
                    c = http.post(f"/sweeps/{sid}/cancel")
                    if c.status_code != 202 or c.json()["status"] != "cancelled":
                        notes.append(f"cancel {sid}: {c.status_code} {c.text[:200]}")
                if res["created"]:
                    print(
                        f"  cancelled {len(res['created'])} queued sweeps in "
                        f"{time.perf_counter() - t_cancel:.1f} s"
                    )
                status = http.get(f"/sweeps/{sweep_id}").json()["status"]
                print(
                    f"repeat {rep + 1}/{args.repeats} {phase:11s}: {res['n']:6d} ok, "
                    f"{len(res['errors'])} errors, p50 {res['p50']:7.2f} ms, "
                    f"p99 {res['p99']:7.2f} ms, {res['rps']:7.1f} req/s (sweep {status})",
                    flush=True,
                )
                if status != "running":
                    notes.append(f"repeat {rep + 1} {phase}: the sweep was {status} at the end")
                for e in sorted(set(res["errors"]))[:5]:
                    notes.append(f"repeat {rep + 1} {phase}: {e}")
        steps_after = trial_steps(http, sweep_id)
        final = http.get(f"/sweeps/{sweep_id}").json()
        if final["status"] == "running":
            c = http.post(f"/sweeps/{sweep_id}/cancel")
            if c.status_code != 202:
                notes.append(f"cancel {sweep_id}: {c.status_code} {c.text[:200]}")
            t0 = time.monotonic()
            while time.monotonic() - t0 < 60:
                status = http.get(f"/sweeps/{sweep_id}").json()["status"]
                if status != "running":
                    break
                time.sleep(0.5)
            print(f"sweep {sweep_id}: {status} {time.monotonic() - t0:.1f} s after cancel")
            if status != "cancelled":
                notes.append(f"sweep {sweep_id} was {status} 60 s after its cancel")
            while drivers(work) and time.monotonic() - t0 < 90:
                time.sleep(0.5)
            print(f"driver process gone {time.monotonic() - t0:.1f} s after cancel")
        leaked = (
            http.get("/sweeps", params={"status": "queued", "limit": 500}).json()["total"]
            + http.get("/sweeps", params={"status": "running", "limit": 500}).json()["total"]
        )
        if leaked:
            notes.append(f"{leaked} sweeps still queued or running after the cancels")
        http.close()
    finally:
        if server is not None:
            server.stop()
        killed = kill_leftovers(work)
        if killed:
            notes.append("killed left-over processes: " + "; ".join(killed))
        left = our_processes(work)
        if left:
            notes.append(f"processes still running: {left}")
        if schema:
            pg_exec(args.database_url, f"DROP SCHEMA {schema} CASCADE")
        errors = any(r["errors"] for rs in results.values() for r in rs)
        if args.keep or errors:
            print(f"working files kept in {work} (server log: {work / 'server.log'})")
        else:
            shutil.rmtree(work, ignore_errors=True)

    med = {
        p: {k: statistics.median(r[k] for r in rs) for k in ("p50", "p99", "rps")}
        for p, rs in results.items()
    }
    n_err = {p: sum(len(r["errors"]) for r in rs) for p, rs in results.items()}
    print(
        f"\nmachine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; 1-min load average {load_before:.1f} at the "
        f"start, {os.getloadavg()[0]:.1f} at the end"
    )
    print(
        f"database {backend}; {args.clients} clients x {args.duration:g} s per phase, "
        f"median of {args.repeats} repeats; trial steps {steps_before} -> {steps_after} "
        f"during the load"
    )
    print(f"{'route':24s} {'p50 ms':>8s} {'p99 ms':>8s} {'req/s':>8s} {'errors':>7s}")
    names = {
        "healthz": "GET /healthz",
        "get_sweep": "GET /sweeps/{id}",
        "post_sweeps": "POST /sweeps",
    }
    for p in PHASES:
        m = med[p]
        print(f"{names[p]:24s} {m['p50']:8.2f} {m['p99']:8.2f} {m['rps']:8.1f} {n_err[p]:7d}")
    ratio = med["get_sweep"]["p50"] / med["healthz"]["p50"]
    print(f"get_sweep p50 / healthz p50: {ratio:.2f}")
    print(f"post_sweeps p50 / healthz p50: {med['post_sweeps']['p50'] / med['healthz']['p50']:.2f}")
    for n in notes:
        print(f"note: {n}")
    print(f"p99_get_sweep_ms: {med['get_sweep']['p99']:.1f}")


if __name__ == "__main__":
    main()
