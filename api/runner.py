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

from api.db import ENDED_TRIAL, TRIAL_FIELDS, Database, Sweep, TrialRow, sweep_summary, trial_dict
from api.settings import Settings


def _finite(value: Any) -> Any:
    """NaN/inf become None: JSON columns (PostgreSQL's above all) take no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


class Mirror:
    """A store listener: copies each state write of the sweep record into the database."""

    def __init__(self, db: Database, sweep_id: str):
        self.db, self.sweep_id = db, sweep_id
        # What the database holds already (a resumed sweep): no event for unchanged rows.
        with db.session() as s:
            rows = s.scalars(select(TrialRow).where(TrialRow.sweep_id == sweep_id)).all()
            self.trials = {t.id: {k: getattr(t, k) for k in TRIAL_FIELDS} for t in rows}

    def __call__(self, state: dict[str, Any]) -> None:
        """Never raises: a database hiccup must not end the sweep (the next write catches up)."""
        try:
            self._write(state)
        except Exception as e:
            print(f"database mirror: {type(e).__name__}: {e}", file=sys.stderr)

    def _write(self, state: dict[str, Any]) -> None:
        state, now = _finite(state), time.time()
        seen: dict[str, dict[str, Any]] = {}
        with self.db.session() as s:
            sw = s.get(Sweep, self.sweep_id)
            if sw is None:
                return
            for tid, row in state.get("trials", {}).items():
                old = self.trials.get(tid)
                if old is not None and all(old.get(k) == row.get(k) for k in TRIAL_FIELDS):
                    continue
                t = s.get(TrialRow, (self.sweep_id, tid))
                if t is None:
                    t = TrialRow(sweep_id=self.sweep_id, id=tid, started=now)
                    s.add(t)
                prev_status = t.status
                for k in TRIAL_FIELDS:
                    setattr(
                        t, k, row.get(k) if k not in ("params", "metrics") else row.get(k) or {}
                    )
                if row["status"] in ENDED_TRIAL:
                    t.ended = t.ended or now
                else:
                    t.ended = None
                if prev_status != row["status"]:
                    kind = {
                        "running": "trial_started",
                        "finished": "trial_finished",
                        "stopped": "trial_finished",
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
                    sw.ended = now
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
    while not stop.wait(0.5):
        try:
            with db.session() as s:
                sw = s.get(Sweep, sweep_id)
                if sw is not None and sw.cancel_requested:
                    rec.request_cancel()
                    return
        except Exception as e:  # a database hiccup must not end the sweep
            print(f"cancel watcher: {type(e).__name__}: {e}", file=sys.stderr)


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
        return 1
    finally:
        stop.set()
    mirror(state)
    return 0 if state["status"] in ("succeeded", "cancelled", "interrupted") else 1


if __name__ == "__main__":
    sys.exit(main())
