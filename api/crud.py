"""What the routes read and write in the service database, as plain functions of a session.

Routes stay thin: they check the request, call these, and pick the status code.
"""

from __future__ import annotations

import re
import time
from typing import Any

from fastapi import HTTPException
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.db import Database, EventRow, Sweep, TrialRow, sweep_summary, trial_dict
from sweeper.spec import SweepSpec
from sweeper.states import FINAL_STATES, TRIAL_UNFINISHED
from sweeper.store import new_id

RESUMABLE = ("interrupted", "failed")
_SWEEP_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,119}")


def get_or_404(s: Session, sweep_id: str) -> Sweep:
    if not _SWEEP_ID.fullmatch(sweep_id):  # never a valid id; also no NUL to PostgreSQL
        raise HTTPException(404, f"no sweep {sweep_id!r}")
    sw = s.get(Sweep, sweep_id)
    if sw is None:
        raise HTTPException(404, f"no sweep {sweep_id!r}")
    return sw


def sweep_out(db: Database, s: Session, sw: Sweep, mlflow_ui_url: str | None) -> dict[str, Any]:
    """A sweep as :class:`api.schemas.SweepOut` has it, every string encodable as UTF-8."""
    return readable(_sweep_out(db, s, sw, mlflow_ui_url))


def readable(value: Any) -> Any:
    """``value`` with each string that cannot be UTF-8 (a lone surrogate) backslash-escaped.

    Submission refuses such text (``sweeper.spec_parse.storable``); a row stored before
    that (or written by hand) is shown escaped rather than failing its route, and a list
    that holds it, with a 500 for ever.
    """
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode()
        return value
    if isinstance(value, dict):
        return {readable(k): readable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [readable(v) for v in value]
    return value


def _sweep_out(db: Database, s: Session, sw: Sweep, mlflow_ui_url: str | None) -> dict[str, Any]:
    counts = db.trial_counts(s, sw.id)
    ui = None
    if mlflow_ui_url and sw.experiment_id:
        ui = f"{mlflow_ui_url.rstrip('/')}/#/experiments/{sw.experiment_id}/runs"
        if sw.parent_run_id:
            ui += f"/{sw.parent_run_id}"
    return {
        "id": sw.id,
        "name": sw.name,
        "status": sw.status,
        "created": sw.created,
        "updated": sw.updated,
        "started": sw.started,
        "ended": sw.ended,
        "trial_counts": counts,
        "best": sw.best,
        "mlflow": {
            "experiment": sw.spec.get("experiment") or sw.name,
            "experiment_id": sw.experiment_id,
            "parent_run_id": sw.parent_run_id,
            "tracking_uri": sw.tracking_uri,
            "ui_url": ui,
        },
        "error": sw.error,
        "cancel_requested": sw.cancel_requested,
        "driver": sw.driver,
        "spec": sw.spec,
    }


def create_sweep(db: Database, spec: SweepSpec, mlflow_ui_url: str | None) -> dict[str, Any]:
    """Store ``spec`` as a queued sweep (with its first ``sweep`` event); its ``SweepOut``."""
    for attempt in range(5):  # an id is name-time-random: a clash is rare; retry it
        now = time.time()
        sw = Sweep(
            id=new_id(spec.name),
            name=spec.name,
            status="queued",
            spec=spec.model_dump(mode="json"),
            created=now,
            updated=now,
        )
        try:
            with db.session() as s:
                s.add(sw)
                s.flush()
                summary = {
                    "id": sw.id,
                    "status": "queued",
                    "trial_counts": {},
                    "best": None,
                    "error": None,
                }
                db.add_event(s, sw.id, "sweep", summary)
                return sweep_out(db, s, sw, mlflow_ui_url)
        except IntegrityError:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


def list_sweeps(
    db: Database, status: str | None, limit: int, offset: int, mlflow_ui_url: str | None
) -> dict[str, Any]:
    """A page of sweeps, newest first, as :class:`api.schemas.SweepList` has it."""
    with db.session() as s:
        q = select(Sweep)
        n = select(func.count()).select_from(Sweep)
        if status:
            q, n = q.where(Sweep.status == status), n.where(Sweep.status == status)
        rows = s.scalars(q.order_by(Sweep.created.desc()).limit(limit).offset(offset)).all()
        return {
            "items": [sweep_out(db, s, sw, mlflow_ui_url) for sw in rows],
            "total": s.scalar(n),
            "limit": limit,
            "offset": offset,
        }


def list_trials(s: Session, sweep_id: str) -> list[dict[str, Any]]:
    rows = s.scalars(
        select(TrialRow).where(TrialRow.sweep_id == sweep_id).order_by(TrialRow.started)
    ).all()
    return [trial_dict(t) for t in rows]


def cancel_sweep(db: Database, sweep_id: str) -> None:
    """Cancel at once when no driver runs it, else ask its driver to; 409 once it is final."""
    with db.session() as s:
        sw = get_or_404(s, sweep_id)
        if sw.status in FINAL_STATES:
            raise HTTPException(409, f"sweep {sweep_id} is {sw.status}: nothing to cancel")
    # No driver yet (queued) or none any more (interrupted): cancelled at once, but only
    # if the scheduler did not start it meanwhile.
    with db.session() as s:
        res = s.execute(
            update(Sweep)
            .where(Sweep.id == sweep_id, Sweep.status.in_(("queued", "interrupted")))
            .values(
                status="cancelled",
                cancel_requested=True,
                updated=time.time(),
                ended=time.time(),
            )
        )
        if res.rowcount == 1:
            # No driver will continue its unfinished trials: cut short for good.
            s.execute(
                update(TrialRow)
                .where(
                    TrialRow.sweep_id == sweep_id,
                    TrialRow.status.in_(TRIAL_UNFINISHED),
                )
                .values(status="cancelled")
            )
            sw = s.get(Sweep, sweep_id)
            s.refresh(sw)
            db.add_event(s, sweep_id, "sweep", sweep_summary(s, sw))
        else:
            # A driver runs it: ask it to stop, in one conditional update too, so a sweep
            # that became final meanwhile answers 409 rather than taking the flag.
            res = s.execute(
                update(Sweep)
                .where(Sweep.id == sweep_id, Sweep.status.not_in(FINAL_STATES))
                .values(cancel_requested=True, updated=time.time())
            )
            if res.rowcount != 1:
                sw = get_or_404(s, sweep_id)
                raise HTTPException(409, f"sweep {sweep_id} is {sw.status}: nothing to cancel")


def resume_sweep(db: Database, sweep_id: str) -> None:
    """Queue an interrupted or failed sweep again; 409 for any other state.

    One conditional update (compare-and-set on the status): of N concurrent resumes
    exactly one changes the row and logs the ``queued`` event; the others see 409.
    """
    if not _SWEEP_ID.fullmatch(sweep_id):
        raise HTTPException(404, f"no sweep {sweep_id!r}")
    with db.session() as s:
        res = s.execute(
            update(Sweep)
            .where(Sweep.id == sweep_id, Sweep.status.in_(RESUMABLE))
            .values(
                status="queued",
                resume=True,
                error=None,
                ended=None,
                cancel_requested=False,
                updated=time.time(),
            )
        )
        if res.rowcount != 1:
            sw = get_or_404(s, sweep_id)
            s.refresh(sw)
            raise HTTPException(
                409,
                f"sweep {sweep_id} is {sw.status}: only interrupted or failed sweeps resume",
            )
        sw = s.get(Sweep, sweep_id)
        s.refresh(sw)
        db.add_event(s, sweep_id, "sweep", sweep_summary(s, sw))


def events_after(db: Database, sweep_id: str, cursor: int) -> tuple[list[tuple], str]:
    """Up to 500 of the sweep's events after id ``cursor``, and its status read before them."""
    with db.session() as s:
        # Status first: a driver commits its last events with its final status, so
        # events read after a final status include them all.
        status = s.get(Sweep, sweep_id).status
        rows = s.scalars(
            select(EventRow)
            .where(EventRow.sweep_id == sweep_id, EventRow.id > cursor)
            .order_by(EventRow.id)
            .limit(500)
        ).all()
        return [(e.id, e.type, e.data) for e in rows], status
