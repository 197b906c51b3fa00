"""The service's database drops and comes back: no restart needed.

A TCP proxy on 127.0.0.1 sits between PostgreSQL and everything that talks to it (the
API and the sweep's driver); ``drop`` cuts every open connection and refuses new ones
until ``restore``. Loopback only. The first two tests are in-process and take seconds;
the last runs a real sweep through a 12 s outage (about a minute).
"""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import struct
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select, text

from api.db import Database, EventRow, Sweep, TrialRow, db_unavailable
from api.main import create_app
from api.runner import Mirror
from api.settings import Settings

OUTAGE_S = 12.0


class FlakyProxy:
    """A threaded TCP proxy to ``upstream`` that can drop everything and refuse for a while."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.lock = threading.Lock()
        self.open: set[socket.socket] = set()
        self.accepted = self.dropped = self.refused = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if not self.up:
                self.refused += 1
                _reset(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _reset(client)
                continue
            server.settimeout(None)
            with self.lock:
                self.accepted += 1
                self.open |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            self._close(s)

    def _close(self, s: socket.socket) -> None:
        with self.lock:
            self.open.discard(s)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv on it
        s.close()

    def drop(self) -> int:
        """Cut every open connection and refuse new ones; returns how many were cut."""
        self.up = False
        with self.lock:
            cut = list(self.open)
        for s in cut:
            self._close(s)
        self.dropped += len(cut) // 2
        return len(cut) // 2

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.listener.close()
        self.drop()


@pytest.fixture
def proxied(pg_url):
    """``(proxy, url)``: a FlakyProxy to the test's PostgreSQL, and its URL through it."""
    pg = urlsplit(pg_url.replace("postgresql+psycopg", "postgresql"))
    proxy = FlakyProxy((pg.hostname or "127.0.0.1", pg.port or 5432))
    url = pg_url.replace(f"@{pg.hostname}:{pg.port}/", f"@127.0.0.1:{proxy.port}/")
    assert url != pg_url
    yield proxy, url
    proxy.close()


def _reset(s: socket.socket) -> None:
    """Close with a RST, as a host with nothing listening (or a dead server) answers."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


class EventFollower(threading.Thread):
    """Follows ``/sweeps/{id}/events`` like a browser's EventSource: on a dropped stream it
    reconnects with ``Last-Event-ID`` (after ``retry`` s); it stops once the stream ends."""

    def __init__(self, url: str, sweep_id: str):
        super().__init__(daemon=True)
        self.url, self.sweep_id = url, sweep_id
        self.events: list[tuple[int, str, dict]] = []
        self.reconnects = 0
        self.errors: list[str] = []

    def run(self) -> None:
        deadline = time.monotonic() + 170
        while time.monotonic() < deadline:
            headers = {"Last-Event-ID": str(self.events[-1][0])} if self.events else {}
            try:
                with httpx.stream(
                    "GET",
                    f"{self.url}/sweeps/{self.sweep_id}/events",
                    headers=headers,
                    timeout=httpx.Timeout(10.0, read=60.0),
                ) as r:
                    if r.status_code != 200:
                        self.errors.append(f"HTTP {r.status_code}")
                    else:
                        eid, kind, data = None, "message", []
                        for line in r.iter_lines():
                            if not line:
                                if data:
                                    self.events.append((eid, kind, json.loads("\n".join(data))))
                                eid, kind, data = None, "message", []
                            elif line.startswith("id:"):
                                eid = int(line[3:].strip())
                            elif line.startswith("event:"):
                                kind = line[6:].strip()
                            elif line.startswith("data:"):
                                data.append(line[5:].strip())
                        return  # the server ended the stream: the sweep is final
            except httpx.HTTPError as e:
                self.errors.append(f"{type(e).__name__}: {e}")
            self.reconnects += 1
            time.sleep(1.0)


def test_requests_answer_503_while_the_database_is_away(proxied, tmp_path):
    proxy, url = proxied
    settings = Settings(home=tmp_path / "sweeps", database_url=url, api_token=None)
    client = TestClient(create_app(settings, start_scheduler=False))  # a 500 would raise
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/sweeps").status_code == 200
    cut = proxy.drop()
    routes = ("/healthz", "/sweeps", "/sweeps/some-sweep", "/sweeps/some-sweep/events", "/metrics")
    for path in routes:
        r = client.get(path)
        assert r.status_code == 503, (path, r.text)
        assert r.headers["retry-after"] == "5"
        assert r.json()["detail"].startswith("database unavailable: OperationalError: ")
    assert client.get("/sweeps/-bad").status_code == 404  # no database needed for that
    proxy.restore()
    t = time.monotonic()
    assert client.get("/healthz").status_code == 200  # the pool reconnects by itself
    assert client.get("/sweeps").json()["total"] == 0
    print(
        f"\nin-process: dropped {cut} connections; {len(routes)} routes answered 503; "
        f"healthy again {time.monotonic() - t:.2f} s after the database returned"
    )


def test_sqlite_schema_errors_are_not_outages(tmp_path):
    from sqlalchemy.exc import OperationalError

    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(OperationalError) as bug, db.session() as s:
        s.execute(text("select * from no_such_table"))
    assert not db_unavailable(bug.value)  # a bug: it stays a 500
    locked = OperationalError("x", {}, sqlite3.OperationalError("database is locked"))
    assert db_unavailable(locked)


def _state(status: str, trials: dict[str, tuple[str, int]], best=None) -> dict:
    rows = {
        tid: {
            "id": tid,
            "status": st,
            "params": {"reg_constant": 0.1},
            "seed": 0,
            "reg_constant": 0.1,
            "token_expansion": 1,
            "step": step,
            "metrics": {"val/accuracy": step / 100},
        }
        for tid, (st, step) in trials.items()
    }
    return {"status": status, "trials": rows, "best": best, "mlflow": {}, "updated": time.time()}


def test_the_driver_mirror_keeps_the_last_state_until_it_lands(proxied, pg_url):
    proxy, url = proxied
    db = Database(url)
    with db.session() as s:
        now = time.time()
        s.add(Sweep(id="s1", name="s", status="running", spec={}, created=now, updated=now))
    mirror = Mirror(db, "s1")
    mirror(_state("running", {"t1": ("running", 10)}))

    proxy.drop()
    t_drop = time.time()
    took = []
    for state in (
        _state("running", {"t1": ("running", 20)}),
        # t1 ends, and t2 starts and ends, all while the database is away
        _state("running", {"t1": ("finished", 30), "t2": ("finished", 30)}),
        _state("succeeded", {"t1": ("finished", 30), "t2": ("finished", 30)}, best={"v": 1}),
    ):
        t = time.monotonic()
        mirror(state)  # never raises, never waits for the database
        took.append(time.monotonic() - t)
    assert max(took) < 2, took
    assert not mirror.close(1.0)  # not landed yet
    time.sleep(2)
    proxy.restore()
    t_up = time.time()
    assert mirror.close(30)
    landed = time.time() - t_up

    eng = create_engine(pg_url)  # straight to PostgreSQL
    with eng.connect() as c:
        assert c.execute(select(Sweep.status, Sweep.best)).one() == ("succeeded", {"v": 1})
        trials = {t.id: t for t in c.execute(select(TrialRow)).all()}
        kinds = [
            (e.type, e.data.get("id")) for e in c.execute(select(EventRow).order_by(EventRow.id))
        ]
    assert {t: (r.status, r.step) for t, r in trials.items()} == {
        "t1": ("finished", 30),
        "t2": ("finished", 30),
    }
    # when the driver saw them end, not when they landed
    assert all(t_drop <= r.ended < t_up for r in trials.values()), (t_drop, t_up, trials)
    assert kinds == [
        ("trial_started", "t1"),
        ("trial_finished", "t1"),
        ("trial_started", "t2"),  # added: t2 ran entirely in the outage
        ("trial_finished", "t2"),
        ("sweep", "s1"),
    ], kinds
    # A retry whose first attempt did commit (its acknowledgement lost) adds nothing.
    again = Mirror(db, "s1")
    again.trials.clear()
    again._write(_state("succeeded", {"t1": ("finished", 30), "t2": ("finished", 30)}, {"v": 1}))
    with eng.connect() as c:
        assert c.execute(select(text("count(*)")).select_from(EventRow)).scalar() == len(kinds)
    eng.dispose()
    print(f"\nmirror: 3 writes during the outage took <= {max(took):.2f} s; landed {landed:.1f} s")


def test_the_service_rides_out_a_database_drop(service, api_spec, proxied, pg_url):
    t0 = time.monotonic()
    proxy, via_proxy = proxied
    pg = urlsplit(pg_url.replace("postgresql+psycopg", "postgresql"))
    svc = service(via_proxy)
    sid = svc.submit(api_spec(name="dbdrop", max_steps=60, trials=2))["id"]
    follower = EventFollower(svc.url, sid)
    follower.start()
    # mid-sweep: a trial has reported
    svc.wait(sid, lambda s: any((t["step"] or 0) > 0 for t in svc.trials(s["id"])), 150)

    # ---- the outage --------------------------------------------------------------
    cut = proxy.drop()
    t_down, down_wall = time.monotonic(), time.time()
    print(
        f"\ninjected: dropped {cut} open PostgreSQL connections, refusing new ones "
        f"for {OUTAGE_S:.0f} s (proxy 127.0.0.1:{proxy.port} -> {pg.hostname}:{pg.port})"
    )
    codes: Counter[int] = Counter()
    bodies: list[str] = []
    while time.monotonic() - t_down < OUTAGE_S:
        for path in (f"/sweeps/{sid}", f"/sweeps/{sid}/trials", "/healthz"):
            r = svc.http.get(path, timeout=20)
            codes[r.status_code] += 1
            if r.status_code == 503:
                assert r.json()["detail"].startswith("database unavailable: "), r.text
                assert r.headers["retry-after"].isdigit()
            else:
                bodies.append(f"{path}: {r.status_code} {r.text[:300]}")
        assert svc.proc.poll() is None, svc.log()
        time.sleep(0.5)
    proxy.restore()
    t_up, up_wall = time.monotonic(), time.time()
    down_s = t_up - t_down

    # ---- recovery, without restarting anything -----------------------------------
    while (r := svc.http.get(f"/sweeps/{sid}")).status_code != 200:
        assert time.monotonic() - t_up < 10, f"no recovery: {r.status_code} {r.text}"
        time.sleep(0.1)
    recovered_s = time.monotonic() - t_up
    assert svc.http.get("/healthz").status_code == 200
    done = svc.wait(sid, lambda s: s["status"] in ("succeeded", "failed", "cancelled"), 120)
    follower.join(60)
    assert svc.proc.poll() is None, svc.log()

    # ---- what survived -----------------------------------------------------------
    assert codes[500] == 0 and set(codes) == {503}, (codes, bodies, svc.log())
    assert done["status"] == "succeeded", svc.driver_log(sid)
    assert done["trial_counts"] == {"finished": 2}, done
    # the database itself (not through the proxy): every trial's last row landed
    eng = create_engine(pg_url)
    with eng.connect() as c:
        status = c.execute(text("select status from sweeps where id = :i"), {"i": sid})
        assert status.scalar() == "succeeded"
        rows = c.execute(
            text("select id, status, step, ended from trials where sweep_id = :i"), {"i": sid}
        ).all()
    eng.dispose()
    assert len(rows) == 2 and all(r.status == "finished" and r.step == 60 for r in rows), rows
    ended_in_outage = sum(down_wall <= r.ended <= up_wall for r in rows)

    # the live follower: no id twice, nothing it missed that a full replay has, and the
    # stream ends with the sweep's final status
    assert not follower.is_alive(), follower.errors
    seen = [e[0] for e in follower.events]
    assert seen == sorted(set(seen)), seen
    replay = [
        int(line[3:])
        for line in svc.http.get(f"/sweeps/{sid}/events").text.splitlines()
        if line.startswith("id:")
    ]
    assert seen == replay, (seen, replay)
    kinds = [k for _, k, _ in follower.events]
    _, last_kind, last = follower.events[-1]
    assert last_kind == "sweep" and last["status"] == "succeeded", follower.events[-3:]
    assert last["trial_counts"] == {"finished": 2}
    assert kinds.count("trial_started") == 2 and kinds.count("trial_finished") == 2, kinds
    for tid in {r.id for r in rows}:  # each trial: started, then finished
        mine = [k for _, k, d in follower.events if k.startswith("trial_") and d["id"] == tid]
        assert mine[0] == "trial_started" and mine[-1] == "trial_finished", mine
    assert "database unavailable" in svc.driver_log(sid)  # the driver did see the outage
    print(
        f"survived: API up throughout, {follower.reconnects} SSE reconnects, "
        f"{len(seen)} events in order and complete; {ended_in_outage} trial(s) ended during "
        f"the outage; test took {time.monotonic() - t0:.0f} s"
    )
    print(
        f"db drop: down {down_s:.1f} s; 503 answers {codes[503]}; 500 answers {codes[500]}; "
        f"recovered in {recovered_s:.1f} s; sweep {done['status']}, "
        f"trials {sum(r.status == 'finished' for r in rows)}/{len(rows)}"
    )
