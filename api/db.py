"""The service's database: sweeps, their trials and their event log (SQLAlchemy 2).

SQLite by default, PostgreSQL by URL. Drivers write their sweep's rows themselves (see
``api.runner``), so the API can restart while sweeps run and lose nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sweeper import trials


class Base(DeclarativeBase):
    pass


class Sweep(Base):
    __tablename__ = "sweeps"

    id: Mapped[str] = mapped_column(String(120), primary_key=True)
    name: Mapped[str] = mapped_column(String(80), index=True)
    status: Mapped[str] = mapped_column(String(20), index=True)
    spec: Mapped[dict] = mapped_column(JSON)
    created: Mapped[float] = mapped_column(Float, index=True)
    updated: Mapped[float] = mapped_column(Float)
    started: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended: Mapped[float | None] = mapped_column(Float, nullable=True)
    # how the driver runs: "local" (pid on driver_host) or "ray-job" (driver_ref = job id)
    driver: Mapped[str | None] = mapped_column(String(20), nullable=True)
    driver_ref: Mapped[str | None] = mapped_column(String(120), nullable=True)
    driver_host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    resume: Mapped[bool] = mapped_column(Boolean, default=False)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    best: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    experiment_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    parent_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    tracking_uri: Mapped[str | None] = mapped_column(Text, nullable=True)


class TrialRow(Base):
    __tablename__ = "trials"

    sweep_id: Mapped[str] = mapped_column(
        ForeignKey("sweeps.id", ondelete="CASCADE"), primary_key=True
    )
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(20), index=True)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    seed: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reg_constant: Mapped[float | None] = mapped_column(Float, nullable=True)
    token_expansion: Mapped[int | None] = mapped_column(Integer, nullable=True)
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    node: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended: Mapped[float | None] = mapped_column(Float, nullable=True)


class EventRow(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sweep_id: Mapped[str] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"), index=True)
    ts: Mapped[float] = mapped_column(Float)
    type: Mapped[str] = mapped_column(String(40))
    data: Mapped[dict] = mapped_column(JSON)


# The trial fields the service mirrors: the driver's trial row (``sweeper.trials.TrialRow``,
# the one definition), less its id (a column of its own) and the worker-process details
# (pid, resumed_from_step) a client has no use for.
TRIAL_FIELDS = tuple(
    k for k in trials.TrialRow.__annotations__ if k not in ("id", "pid", "resumed_from_step")
)
POOL_RECYCLE_S = 1800
CONNECT_TIMEOUT_S = 10


class Database:
    """An engine and a session factory; ``create_all`` on first use (no migrations yet)."""

    def __init__(self, url: str):
        self.url = url
        # pre_ping: a pooled connection the server (or a network blip) dropped is replaced
        # at checkout instead of failing the request; recycle: no connection outlives a
        # firewall's or PgBouncer's idle cut-off.
        kw: dict[str, Any] = {"pool_pre_ping": True}
        if url.startswith("sqlite"):
            kw["connect_args"] = {"timeout": 30, "check_same_thread": False}
        else:
            kw["pool_recycle"] = POOL_RECYCLE_S
        if url.startswith("postgresql") and "connect_timeout" not in url:
            # an unreachable host fails in seconds instead of hanging the caller
            kw["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
        self.engine: Engine = create_engine(url, **kw)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        _add_new_columns(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as s, s.begin():
            yield s

    def add_event(self, s: Session, sweep_id: str, type_: str, data: dict) -> None:
        s.add(EventRow(sweep_id=sweep_id, ts=time.time(), type=type_, data=data))

    def set_status(self, sweep_id: str, status: str, **fields: Any) -> Sweep | None:
        """Change a sweep's status (and other columns), logging a ``sweep`` event."""
        with self.session() as s:
            sw = s.get(Sweep, sweep_id, with_for_update=True)
            if sw is None:
                return None
            old = sw.status
            for k, v in fields.items():
                setattr(sw, k, v)
            sw.status, sw.updated = status, time.time()
            if status == "running" and not sw.started:
                sw.started = sw.updated
            if status in ("succeeded", "failed", "cancelled", "interrupted"):
                sw.ended = sw.updated
            if old != status or fields.get("error"):
                self.add_event(s, sweep_id, "sweep", sweep_summary(s, sw))
            return sw

    def trial_counts(self, s: Session, sweep_id: str) -> dict[str, int]:
        rows = s.execute(
            select(TrialRow.status, func.count())
            .where(TrialRow.sweep_id == sweep_id)
            .group_by(TrialRow.status)
        ).all()
        return {status: n for status, n in rows}


def sweep_summary(s: Session, sw: Sweep) -> dict[str, Any]:
    """The fields a ``sweep`` event carries (status and what changes with it)."""
    counts = dict(
        s.execute(
            select(TrialRow.status, func.count())
            .where(TrialRow.sweep_id == sw.id)
            .group_by(TrialRow.status)
        ).all()
    )
    return {
        "id": sw.id,
        "status": sw.status,
        "trial_counts": counts,
        "best": sw.best,
        "error": sw.error,
    }


def trial_dict(t: TrialRow) -> dict[str, Any]:
    """A mirrored trial as ``api.schemas.TrialOut`` (and a trial event) has it."""
    out = {"id": t.id, **{k: getattr(t, k) for k in TRIAL_FIELDS}}
    out["started"], out["ended"] = t.started, t.ended
    return out


def _add_new_columns(engine: Engine) -> None:
    """Add the nullable columns a newer version brought to a database an older one made.

    ``create_all`` makes missing tables only; this is the one upgrade step there is.
    """
    from sqlalchemy import inspect

    have = inspect(engine)
    with engine.begin() as c:
        for table in Base.metadata.sorted_tables:
            present = {col["name"] for col in have.get_columns(table.name)}
            for col in table.columns:
                if col.name not in present and col.nullable:
                    kind = col.type.compile(dialect=engine.dialect)
                    add = f'ALTER TABLE {table.name} ADD COLUMN "{col.name}" {kind}'
                    if engine.dialect.name == "postgresql":  # another process may be first
                        add = add.replace("ADD COLUMN", "ADD COLUMN IF NOT EXISTS")
                    c.exec_driver_sql(add)


def db_unavailable(exc: BaseException) -> bool:
    """Is ``exc`` the database being unreachable (down, restarting, connection dropped)?

    SQLAlchemy's ``OperationalError`` and ``InterfaceError`` (refused or lost connections,
    a server shutting down), any DBAPI error that invalidated its connection, and a pool
    that found no connection in time. SQLite raises ``OperationalError`` for schema bugs
    too ("no such table"): only its busy, locked and cannot-open errors count.
    """
    if isinstance(exc, OperationalError) and type(exc.orig).__module__.startswith("sqlite3"):
        text = str(exc.orig).lower()
        return any(w in text for w in ("locked", "busy", "unable to open", "disk i/o"))
    if isinstance(exc, OperationalError | InterfaceError | SATimeoutError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def db_error_text(exc: BaseException) -> str:
    """One line about a database error, without SQLAlchemy's statement and link."""
    orig = getattr(exc, "orig", None) or exc
    text = " ".join(str(orig).split())[:300]
    return f"{type(orig).__name__}: {text}" if text else type(orig).__name__


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # the API reads while drivers write
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
