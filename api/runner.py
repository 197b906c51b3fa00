"""One sweep's driver process: ``python -m api.runner SWEEP_ID``.

Started by the service (a local subprocess, or a Ray Job on a cluster), it runs the sweep
with ``sweeper.driver.run_sweep`` and mirrors the sweep's state into the service database
as it changes: trial rows, the sweep's status, best configuration and MLflow ids, and an
event per change for ``GET /sweeps/{id}/events``. A cancel flag set in the database
becomes the sweep's cancel file, which the driver's Tune stopper watches.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from sqlalchemy import select

from api.db import (
    TRIAL_FIELDS,
    Database,
    Sweep,
    TrialRow,
    db_error_text,
    db_unavailable,
    sweep_summary,
    trial_dict,
)
from api.settings import Settings
from sweeper.states import TRIAL_ENDED


def _finite(value: Any) -> Any:
    """NaN/inf become None: JSON columns (PostgreSQL's above all) take no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# A pending state is retried after 0.5 s, then 1, 2, 4 and every 5 s while the database is down.
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 5.0


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # driver.log


class Mirror:
    """A store listener: copies each state write of the sweep record into the database.

    Every write carries the sweep's whole state, so only the newest has to land. When one
    fails because the database is unreachable, it stays pending and a retry thread writes
    the newest pending state (backing off to every ``RETRY_MAX_S``) until one lands; later
    writes meanwhile only replace it, so the sweep never waits on the database.
    :meth:`close` waits for it before the driver exits, so a sweep that ends during an
    outage still reaches the database with its trials and final status.

    Each write is compared with the rows in the database, not only with what this process
    wrote last: a retry whose earlier attempt did commit (its acknowledgement lost with the
    connection) changes nothing and logs no second event.
    """

    def __init__(self, db: Database, sweep_id: str):
        self.db, self.sweep_id = db, sweep_id
        self._write_lock = threading.Lock()  # one database write at a time
        self._cv = threading.Condition()  # guards _pending and _retrying
        self._pending: dict[str, Any] | None = None
        self._retrying = False
        self._down_since = 0.0
        self._superseded = 0  # states replaced by a newer one before they landed
        # When each trial was first seen, and first seen ended: its row's started/ended,
        # also when the state lands later (after an outage).
        self._times: dict[str, list[float | None]] = {}
        # What the database holds already (a resumed sweep): no event for unchanged rows.
        with db.session() as s:
            rows = s.scalars(select(TrialRow).where(TrialRow.sweep_id == sweep_id)).all()
            self.trials = {t.id: {k: getattr(t, k) for k in TRIAL_FIELDS} for t in rows}

    def __call__(self, state: dict[str, Any]) -> None:
        """Never raises: a database outage must not end the sweep."""
        now = time.time()
        with self._cv:
            for tid, row in (state.get("trials") or {}).items():
                seen = self._times.setdefault(tid, [now, None])
                seen[1] = (seen[1] or now) if row.get("status") in TRIAL_ENDED else None
            if self._pending is not None:
                self._superseded += 1
            self._pending = state
            if self._retrying:
                return  # the retry thread writes it once the database is back
        if self._attempt():
            return
        with self._cv:
            if self._retrying:
                return
            self._retrying, self._down_since = True, time.monotonic()
        threading.Thread(target=self._retry, name="db-mirror-retry", daemon=True).start()

    def _attempt(self) -> bool:
        """Write the newest pending state; False if the database is unreachable (kept)."""
        with self._write_lock:
            with self._cv:
                state, self._pending = self._pending, None
            if state is None:
                return True
            try:
                self._write(state)
            except Exception as e:
                if not db_unavailable(e):  # a bug, not an outage: retrying would not help
                    _say(f"database mirror: {type(e).__name__}: {e}")
                    return True
                with self._cv:
                    if self._pending is None:
                        self._pending = state
                    else:
                        self._superseded += 1
                    first = not self._retrying
                if first:
                    _say(
                        f"database mirror: database unavailable ({db_error_text(e)}); "
                        "keeping the newest state and retrying until it lands"
                    )
                return False
            with self._cv:
                self._cv.notify_all()
            return True

    def _retry(self) -> None:
        delay = RETRY_FIRST_S
        while True:
            time.sleep(delay)
            if not self._attempt():
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            with self._cv:
                if self._pending is not None:  # a newer state came during the write
                    delay = 0.0
                    continue
                self._retrying = False
                superseded, self._superseded = self._superseded, 0
                self._cv.notify_all()
            _say(
                f"database mirror: database back; caught up after "
                f"{time.monotonic() - self._down_since:.1f} s "
                f"({superseded} intermediate states superseded)"
            )
            return

    def close(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the last state to land; True once it has."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._retrying or self._pending is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 1.0))
        return True

    def _write(self, state: dict[str, Any]) -> None:
        state, now = _finite(state), time.time()
        with self._cv:
            times = {tid: tuple(v) for tid, v in self._times.items()}
        # when the driver wrote this state, which may be well before it lands
        at = state.get("updated")
        at = at if isinstance(at, int | float) and at <= now else now
        seen: dict[str, dict[str, Any]] = {}
        with self.db.session() as s:
            sw = s.get(Sweep, self.sweep_id)
            if sw is None:
                return
            for tid, row in state.get("trials", {}).items():
                old = self.trials.get(tid)
                if old is not None and all(old.get(k) == row.get(k) for k in TRIAL_FIELDS):
                    continue
                values = {
                    k: row.get(k) if k not in ("params", "metrics") else row.get(k) or {}
                    for k in TRIAL_FIELDS
                }
                t = s.get(TrialRow, (self.sweep_id, tid))
                if t is not None and all(getattr(t, k) == v for k, v in values.items()):
                    seen[tid] = {k: row.get(k) for k in TRIAL_FIELDS}  # landed already
                    continue
                first_seen, ended_seen = times.get(tid, (now, now))
                if t is None:
                    t = TrialRow(sweep_id=self.sweep_id, id=tid, started=first_seen)
                    s.add(t)
                prev_status = t.status
                for k, v in values.items():
                    setattr(t, k, v)
                if row["status"] in TRIAL_ENDED:
                    t.ended = t.ended or ended_seen or now
                else:
                    t.ended = None
                if prev_status is None and row["status"] in TRIAL_ENDED:
                    # Started and ended while the database was away: its start is logged
                    # too, so a client sees every trial start before it ends.
                    started = trial_dict(t) | {"status": "running", "ended": None}
                    self.db.add_event(s, self.sweep_id, "trial_started", started)
                if prev_status != row["status"]:
                    kind = {
                        "running": "trial_started",
                        "finished": "trial_finished",
                        "stopped": "trial_finished",
                        "cancelled": "trial_finished",
                        "failed": "trial_finished",
                    }.get(row["status"], f"trial_{row['status']}")
                else:
                    kind = "trial_reported"
                self.db.add_event(s, self.sweep_id, kind, trial_dict(t))
                seen[tid] = {k: row.get(k) for k in TRIAL_FIELDS}
            ml = state.get("mlflow") or {}
            sw.experiment_id = ml.get("experiment_id") or sw.experiment_id
            sw.parent_run_id = ml.get("parent_run_id") or sw.parent_run_id
            sw.tracking_uri = ml.get("tracking_uri") or sw.tracking_uri
            status, changed = state.get("status", sw.status), False
            if status != sw.status:
                sw.status, changed = status, True
                if status in ("succeeded", "failed", "cancelled", "interrupted"):
                    sw.ended = at
            if state.get("best") != sw.best:
                sw.best, changed = state.get("best"), True
            if state.get("error") != sw.error:
                sw.error, changed = state.get("error"), True
            sw.updated = now
            if changed:
                s.flush()
                self.db.add_event(s, self.sweep_id, "sweep", sweep_summary(s, sw))
        self.trials.update(seen)  # only once committed


def _watch_cancel(db: Database, sweep_id: str, rec, stop: threading.Event) -> None:
    failing = False
    while not stop.wait(0.5):
        try:
            with db.session() as s:
                sw = s.get(Sweep, sweep_id)
                if sw is not None and sw.cancel_requested:
                    rec.request_cancel()
                    return
            failing = False
        except Exception as e:  # a database hiccup must not end the sweep
            if not failing:  # once per outage, not twice a second
                _say(f"cancel watcher: {db_error_text(e)}")
            failing = True


def _land(mirror: Mirror, timeout: float) -> None:
    """Before the driver exits: wait for its last state to reach the database."""
    if not mirror.close(timeout):
        _say(
            f"database mirror: the database did not take the sweep's last state within "
            f"{timeout:g} s; it is in state.json only (the service will mark the sweep "
            "interrupted, and resume finishes it)"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_id")
    args = ap.parse_args(argv)
    settings = Settings()
    os.environ["SWEEPER_HOME"] = str(settings.home.resolve())

    from sweeper import driver
    from sweeper.spec import SweepSpec
    from sweeper.store import LISTENERS, SweepRecord

    db = Database(settings.db_url())
    with db.session() as s:
        sw = s.get(Sweep, args.sweep_id)
        if sw is None:
            print(f"no sweep {args.sweep_id!r} in {settings.db_url()}", file=sys.stderr)
            return 2
        spec, resume = SweepSpec.model_validate(sw.spec), sw.resume
        if os.environ.get("SWEEPER_DRIVER_KIND") != "ray-job":  # a job's id is the service's
            sw.driver, sw.driver_ref = "local", str(os.getpid())
        sw.driver_host = socket.gethostname()
    try:
        rec = SweepRecord.open(args.sweep_id)
    except KeyError:
        rec = SweepRecord.create(spec, args.sweep_id)
    rec.cancel_file.unlink(missing_ok=True)
    resume = resume or rec.tune_dir.exists()  # a driver restarted after dying early
    mirror = Mirror(db, args.sweep_id)
    LISTENERS.append(mirror)
    stop = threading.Event()
    threading.Thread(target=_watch_cancel, args=(db, args.sweep_id, rec, stop), daemon=True).start()
    # SIGTERM (a Ray Job stop, a service shutting drivers down) pauses like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    try:
        state = driver.run_sweep(rec, resume=resume)
    except KeyboardInterrupt:
        state = rec.update(status="interrupted", pid=None)
    except BaseException as e:  # run_sweep has written error.log and state "failed"
        state = rec.read()
        state.setdefault("error", f"{type(e).__name__}: {e}")
        mirror(state | {"status": "failed"})
        _land(mirror, settings.mirror_flush_timeout_s)
        return 1
    finally:
        stop.set()
    mirror(state)
    _land(mirror, settings.mirror_flush_timeout_s)
    return 0 if state["status"] in ("succeeded", "cancelled", "interrupted") else 1


if __name__ == "__main__":
    sys.exit(main())
