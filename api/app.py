"""The REST service: ``create_app()``; ``sweeper serve`` runs it under uvicorn.

Routes (``docs/service.md`` has examples): ``POST /sweeps``, ``GET /sweeps``,
``GET /sweeps/{id}``, ``GET /sweeps/{id}/trials``, ``POST /sweeps/{id}/cancel``,
``POST /sweeps/{id}/resume``, ``GET /sweeps/{id}/events`` (Server-Sent Events),
``GET /sweeps/{id}/report`` (HTML), ``GET /healthz``, ``GET /metrics`` (Prometheus).
The API never runs a sweep itself: each runs in its own driver process (``api.launcher``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sse_starlette.sse import EventSourceResponse

from api.db import (
    Database,
    EventRow,
    Sweep,
    TrialRow,
    db_error_text,
    db_unavailable,
    sweep_summary,
    trial_dict,
)
from api.launcher import Launcher
from api.metrics import render_metrics
from api.paths import path_errors
from api.settings import Settings
from sweeper.spec import SweepSpec, spec_errors
from sweeper.states import FINAL_STATES, STATES, TRIAL_UNFINISHED
from sweeper.store import new_id

log = logging.getLogger("sweeper.api")

EXAMPLE_SPEC = (
    yaml.safe_load(
        (Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml").read_text()
    )
    if (Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml").is_file()
    else {}
)

# Largest OFFSET/event id a query takes: SQLite's and PostgreSQL's BIGINT (larger ones 500ed).
MAX_INT64 = 2**63 - 1
_SWEEP_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,119}")
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
# Seconds a client is told to wait (Retry-After) when the database is unreachable.
DB_RETRY_AFTER_S = 5


# ---- response models (the OpenAPI schema) ----------------------------------------------
class ErrorItem(BaseModel):
    path: str = Field(
        description="Dotted field path in the spec ('' for the whole body); for a bad "
        "request parameter, its location and name (query.limit)."
    )
    msg: str
    type: str


class ErrorBody(BaseModel):
    detail: str | list[ErrorItem]


class MlflowIds(BaseModel):
    experiment: str
    experiment_id: str | None = None
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    ui_url: str | None = Field(None, description="Set when SWEEPER_MLFLOW_UI_URL is.")


class ParetoPoint(BaseModel):
    params: dict[str, Any]
    values: dict[str, float] = Field(description="Each objective's mean over the seeds.")
    seeds: int
    trial_ids: list[str]
    mlflow_run_ids: list[str | None]


class BestTrial(BaseModel):
    params: dict[str, Any]
    metric: str = Field(description="The (first) objective's metric.")
    value: float = Field(description="Its mean over the configuration's seeds.")
    seeds: int
    trial_ids: list[str]
    mlflow_run_ids: list[str | None]
    values: dict[str, float] | None = Field(
        None, description="Multi-objective sweeps: every objective's mean."
    )
    pareto: list[ParetoPoint] | None = Field(
        None,
        description="Multi-objective sweeps: the configurations no other one beats on "
        "every objective, best first on the first objective.",
    )


class SweepOut(BaseModel):
    id: str
    name: str
    status: Literal[STATES]  # type: ignore[valid-type]
    created: float
    updated: float
    started: float | None = None
    ended: float | None = None
    trial_counts: dict[str, int] = Field(description="Trials by state.")
    best: BestTrial | None = Field(None, description="Best configuration so far.")
    mlflow: MlflowIds
    error: str | None = None
    cancel_requested: bool = False
    driver: str | None = None
    spec: dict[str, Any]


class SweepList(BaseModel):
    items: list[SweepOut]
    total: int
    limit: int
    offset: int


class TrialOut(BaseModel):
    id: str
    status: str
    params: dict[str, Any]
    seed: int | None = None
    reg_constant: float | None = None
    token_expansion: int | None = None
    step: int | None = None
    metrics: dict[str, float | None]
    mlflow_run_id: str | None = None
    node: str | None = Field(None, description="The Ray node id the trial last ran on.")
    error: str | None = Field(None, description="Why a failed trial failed.")
    started: float | None = None
    ended: float | None = None


class TrialList(BaseModel):
    items: list[TrialOut]


# ---- the app ---------------------------------------------------------------------------
class BodyLimit:
    """413 for a body over ``limit`` bytes, by Content-Length or as it streams in."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = JSONResponse({"detail": f"request body over {self.limit} bytes"}, status_code=413)
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_big(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooBig
            return msg

        try:
            await self.app(scope, limited, send)
        except _TooBig:
            await too_big(scope, receive, send)


class _TooBig(Exception):
    pass


def _non_finite(data: Any) -> str | None:
    """The dotted path of a NaN or infinite number in parsed JSON/YAML, or None.

    Pydantic accepts them in float fields and in the free-form ``trainer``/``points``
    mappings; stored, they became null (a changed spec) or broke every later JSON response.
    Each container is visited once, so YAML aliases (and their cycles) cost nothing extra.
    """
    seen: set[int] = set()
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return where
        if isinstance(value, dict | list) and id(value) not in seen:
            seen.add(id(value))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((v, f"{where}.{k}" if where else str(k)) for k, v in reversed(list(items)))
    return None


def create_app(settings: Settings | None = None, start_scheduler: bool = True) -> FastAPI:
    settings = settings or Settings()
    db = Database(settings.db_url())
    launcher = Launcher(db, settings)
    wake = asyncio.Event()

    async def scheduler() -> None:
        down_since: float | None = None  # the database outage the scheduler is riding out
        while True:
            try:
                await asyncio.to_thread(launcher.reconcile)
                if down_since is not None:
                    log.warning(
                        "scheduler: database back after %.1f s", time.monotonic() - down_since
                    )
                    down_since = None
            except Exception as e:
                if not db_unavailable(e):
                    log.exception("reconcile failed")
                elif down_since is None:  # once per outage; it retries every interval
                    down_since = time.monotonic()
                    log.warning("scheduler: database unavailable (%s); retrying", db_error_text(e))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), settings.reconcile_interval_s)
            wake.clear()

    loop_box: list[asyncio.AbstractEventLoop] = []

    def poke() -> None:
        """Wake the scheduler; safe from the threadpool that runs sync routes."""
        if loop_box:
            loop_box[0].call_soon_threadsafe(wake.set)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop_box.append(asyncio.get_running_loop())
        task = asyncio.create_task(scheduler()) if start_scheduler else None
        yield
        if task:
            task.cancel()

    app = FastAPI(
        title="projector-sweeper",
        version="0.1.0",
        summary="Hyperparameter sweeps for multimodal-LLM projector regularisation research.",
        description=__doc__,
        lifespan=lifespan,
        responses={
            401: {"model": ErrorBody},
            413: {"model": ErrorBody},
            503: {
                "model": ErrorBody,
                "description": "The database is unreachable; retry after `Retry-After` seconds.",
            },
        },
    )
    app.state.db, app.state.settings, app.state.launcher = db, settings, launcher
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    bearer = HTTPBearer(auto_error=False, description="SWEEPER_API_TOKEN, when the service has one")

    def auth(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if settings.api_token is None:
            return
        if cred is None or not secrets.compare_digest(
            cred.credentials.encode(), settings.api_token.encode()
        ):
            raise HTTPException(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        items = [
            {"path": ".".join(str(p) for p in e["loc"]), "msg": e["msg"], "type": e["type"]}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": items}, status_code=422)

    logged_503 = [-math.inf, 0]  # when a 503 was last logged, and how many since

    def _db_down(exc: Exception) -> JSONResponse:
        detail = f"database unavailable: {db_error_text(exc)}"
        # One line (no traceback: an outage is not a bug), at most every 10 s.
        now = time.monotonic()
        if now - logged_503[0] >= 10:
            more = f" (and {logged_503[1]} more 503s before)" if logged_503[1] else ""
            log.warning("503 %s%s", detail, more)
            logged_503[:] = [now, 0]
        else:
            logged_503[1] += 1
        return JSONResponse(
            {"detail": detail},
            status_code=503,
            headers={"Retry-After": str(DB_RETRY_AFTER_S)},
        )

    @app.exception_handler(DBAPIError)  # OperationalError and InterfaceError among them
    async def _db_error(request: Request, exc: DBAPIError):
        if not db_unavailable(exc):
            raise exc  # a bug (a bad query, a constraint): a 500 with its traceback
        return _db_down(exc)

    @app.exception_handler(PoolTimeout)
    async def _pool_timeout(request: Request, exc: PoolTimeout):
        return _db_down(exc)

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict[str, str]:
        """Liveness and database reachability; needs no token.

        200 ``{"status": "ok"}`` once a ``SELECT 1`` answers; 503 with ``Retry-After``
        and ``{"detail": "database unavailable: ..."}`` while the database is unreachable.
        """
        with db.session() as s:
            s.execute(select(1))
        return {"status": "ok"}

    # Request validation errors use ErrorBody too (see _invalid), not FastAPI's default schema.
    api = APIRouter(
        dependencies=[Depends(auth)],
        responses={422: {"model": ErrorBody, "description": "Invalid request parameters."}},
    )

    def _get(s, sweep_id: str) -> Sweep:
        if not _SWEEP_ID.fullmatch(sweep_id):  # never a valid id; also no NUL to PostgreSQL
            raise HTTPException(404, f"no sweep {sweep_id!r}")
        sw = s.get(Sweep, sweep_id)
        if sw is None:
            raise HTTPException(404, f"no sweep {sweep_id!r}")
        return sw

    def _out(s, sw: Sweep) -> dict[str, Any]:
        counts = db.trial_counts(s, sw.id)
        ui = None
        if settings.mlflow_ui_url and sw.experiment_id:
            base = settings.mlflow_ui_url.rstrip("/")
            ui = f"{base}/#/experiments/{sw.experiment_id}/runs"
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

    def _invalid_spec(items: list[dict]) -> JSONResponse:
        return JSONResponse({"detail": items}, status_code=422)

    @api.post(
        "/sweeps",
        status_code=201,
        response_model=SweepOut,
        tags=["sweeps"],
        responses={
            415: {"model": ErrorBody, "description": "Neither JSON nor YAML."},
            422: {
                "model": ErrorBody,
                "description": "Invalid spec; each error has the field path.",
            },
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": "A sweep spec (docs/sweeps.md), as JSON or YAML.",
                "content": {
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/SweepSpec"},
                        "example": EXAMPLE_SPEC,
                    },
                    "application/yaml": {
                        "schema": {"$ref": "#/components/schemas/SweepSpec"},
                        "example": EXAMPLE_SPEC,
                    },
                },
            }
        },
    )
    async def submit(request: Request):
        """Validate and queue a sweep; its driver starts when a slot is free."""
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()
        body = await request.body()
        try:
            text = body.decode()
        except UnicodeDecodeError:
            return _invalid_spec([{"path": "", "msg": "body is not UTF-8", "type": "encoding"}])
        try:
            if ctype in YAML_TYPES:
                data = yaml.safe_load(text)
            elif ctype in ("application/json", "") or ctype.endswith("+json"):
                data = json.loads(text)
            else:
                raise HTTPException(
                    415, f"content type {ctype!r}: send application/json or application/yaml"
                )
        # ValueError: besides JSONDecodeError, an integer over Python's 4300-digit limit, or
        # a YAML value PyYAML cannot build (2001-13-01, !!int x).
        except (yaml.YAMLError, ValueError, RecursionError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            return _invalid_spec(
                [{"path": "", "msg": f"not valid JSON/YAML: {msg}", "type": "parse"}]
            )
        if not isinstance(data, dict):
            return _invalid_spec(
                [
                    {
                        "path": "",
                        "msg": f"a sweep spec is a mapping, got {type(data).__name__}",
                        "type": "type",
                    }
                ]
            )
        where = _non_finite(data)
        if where is not None:
            return _invalid_spec(
                [{"path": where, "msg": "must be a finite number", "type": "finite_number"}]
            )
        try:
            spec = SweepSpec.model_validate(data)
        except ValidationError as e:
            return _invalid_spec(spec_errors(e))
        except (ValueError, TypeError, RecursionError) as e:
            return _invalid_spec([{"path": "", "msg": str(e), "type": "value_error"}])
        # Checked on the spec as it will be stored (a YAML !!binary value becomes its text).
        spec = SweepSpec.model_validate(spec.model_dump(mode="json"))
        bad = path_errors(spec, settings.roots())
        if bad:
            return _invalid_spec(bad)
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
                    out = _out(s, sw)
                break
            except IntegrityError:
                if attempt == 4:
                    raise
        wake.set()
        return JSONResponse(out, status_code=201, headers={"Location": f"/sweeps/{sw.id}"})

    @api.get("/sweeps", response_model=SweepList, tags=["sweeps"])
    def list_sweeps(
        status: Annotated[Literal[STATES] | None, Query(description="Only this state.")] = None,  # type: ignore[valid-type]
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=MAX_INT64)] = 0,
    ):
        """Sweeps, newest first."""
        with db.session() as s:
            q = select(Sweep)
            n = select(func.count()).select_from(Sweep)
            if status:
                q, n = q.where(Sweep.status == status), n.where(Sweep.status == status)
            rows = s.scalars(q.order_by(Sweep.created.desc()).limit(limit).offset(offset)).all()
            return {
                "items": [_out(s, sw) for sw in rows],
                "total": s.scalar(n),
                "limit": limit,
                "offset": offset,
            }

    @api.get(
        "/sweeps/{sweep_id}",
        response_model=SweepOut,
        tags=["sweeps"],
        responses={404: {"model": ErrorBody}},
    )
    def get_sweep(sweep_id: str):
        """Status, trial counts, best configuration so far and MLflow ids of one sweep."""
        with db.session() as s:
            return _out(s, _get(s, sweep_id))

    @api.get(
        "/sweeps/{sweep_id}/trials",
        response_model=TrialList,
        tags=["sweeps"],
        responses={404: {"model": ErrorBody}},
    )
    def get_trials(sweep_id: str):
        """Every trial: state, parameters, seed, last step, last metrics, MLflow run id."""
        with db.session() as s:
            _get(s, sweep_id)
            rows = s.scalars(
                select(TrialRow).where(TrialRow.sweep_id == sweep_id).order_by(TrialRow.started)
            ).all()
            return {"items": [trial_dict(t) for t in rows]}

    @api.post(
        "/sweeps/{sweep_id}/cancel",
        response_model=SweepOut,
        status_code=202,
        tags=["sweeps"],
        responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
    )
    def cancel(sweep_id: str):
        """Stop a sweep's trials (their MLflow runs end KILLED); a queued sweep never starts."""
        with db.session() as s:
            sw = _get(s, sweep_id)
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
                sw = _get(s, sweep_id)
                if sw.status in FINAL_STATES:
                    raise HTTPException(409, f"sweep {sweep_id} is {sw.status}: nothing to cancel")
                sw.cancel_requested, sw.updated = True, time.time()  # its driver stops it
        poke()
        with db.session() as s:
            return _out(s, _get(s, sweep_id))

    @api.post(
        "/sweeps/{sweep_id}/resume",
        response_model=SweepOut,
        status_code=202,
        tags=["sweeps"],
        responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
    )
    def resume(sweep_id: str):
        """Queue an interrupted or failed sweep again; finished trials are not re-run."""
        with db.session() as s:
            sw = _get(s, sweep_id)
            if sw.status not in ("interrupted", "failed"):
                raise HTTPException(
                    409,
                    f"sweep {sweep_id} is {sw.status}: only interrupted or failed sweeps resume",
                )
        db.set_status(
            sweep_id, "queued", resume=True, error=None, ended=None, cancel_requested=False
        )
        poke()
        with db.session() as s:
            return _out(s, _get(s, sweep_id))

    @api.get(
        "/sweeps/{sweep_id}/events",
        tags=["sweeps"],
        response_class=EventSourceResponse,
        responses={
            200: {
                "content": {"text/event-stream": {}},
                "description": "Server-Sent Events: `sweep` (state changes), "
                "`trial_started`, `trial_reported`, `trial_finished`, `trial_retrying`, "
                "`trial_paused`; each `data` is JSON, each `id` resumable via "
                "Last-Event-ID. The stream ends once the sweep is final.",
            },
            404: {"model": ErrorBody},
        },
    )
    async def events(
        request: Request,
        sweep_id: str,
        after: Annotated[
            int, Query(ge=0, le=MAX_INT64, description="Replay events after this id.")
        ] = 0,
    ):
        """The sweep's events from the start (or ``after``/Last-Event-ID), then live."""
        with db.session() as s:
            _get(s, sweep_id)
        last = request.headers.get("last-event-id", "")
        # isascii: str.isdigit() is also true of '²', which int() rejects.
        cursor = int(last) if last.isascii() and last.isdigit() else after
        cursor = min(cursor, MAX_INT64)

        def fetch(cursor: int):
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

        async def stream():
            nonlocal cursor
            pause = 0.5
            while True:
                try:
                    rows, status = await asyncio.to_thread(fetch, cursor)
                except Exception as e:
                    if not db_unavailable(e):
                        raise
                    # The database went away mid-stream: keep the stream (and its pings)
                    # open and read on from the same cursor once it is back, so a client
                    # sees neither a gap nor a repeat.
                    if pause == 0.5:  # once per outage
                        log.warning(
                            "events %s: database unavailable (%s); waiting",
                            sweep_id,
                            db_error_text(e),
                        )
                    if await request.is_disconnected():
                        return
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, DB_RETRY_AFTER_S)
                    continue
                pause = 0.5
                for eid, kind, data in rows:
                    cursor = eid
                    yield {"id": str(eid), "event": kind, "data": json.dumps(data)}
                if not rows and status in (*FINAL_STATES, "interrupted"):
                    return
                if await request.is_disconnected():
                    return
                if not rows:
                    await asyncio.sleep(0.5)

        return EventSourceResponse(stream(), ping=15)

    report_locks: dict[str, asyncio.Lock] = {}

    def build_report(sweep_id: str, refresh: bool) -> Path:
        from dashboards.report import publish

        with db.session() as s:
            sw = _get(s, sweep_id)
            if not sw.parent_run_id:
                raise HTTPException(
                    409, f"sweep {sweep_id} is {sw.status}: it has no MLflow records yet"
                )
            updated, info = sw.updated, (sw.tracking_uri, sw.experiment_id)
        out = settings.home.resolve() / sweep_id / "report"
        page = out / "report.html"
        if not refresh and page.is_file() and page.stat().st_mtime >= updated:
            return page  # nothing changed since it was built
        return publish(sweep_id, out, info[0], info[1], settings.mlflow_ui_url)

    @api.get(
        "/sweeps/{sweep_id}/report",
        tags=["sweeps"],
        # Not HTMLResponse: FastAPI would document the JSON errors as text/html too.
        response_class=Response,
        responses={
            200: {
                "content": {"text/html": {"schema": {"type": "string"}}},
                "description": "The sweep's report: one self-contained HTML page.",
            },
            404: {"model": ErrorBody},
            409: {"model": ErrorBody},
        },
    )
    async def get_report(
        sweep_id: str,
        refresh: Annotated[bool, Query(description="Rebuild even if nothing changed.")] = False,
    ):
        """The per-sweep report, built from MLflow (and logged to the parent run) on demand.

        Rebuilt when the sweep changed since the last build; a running sweep shows what
        exists so far.
        """
        with db.session() as s:
            _get(s, sweep_id)
        lock = report_locks.setdefault(sweep_id, asyncio.Lock())
        async with lock:
            try:
                page = await asyncio.to_thread(build_report, sweep_id, refresh)
            except HTTPException:
                raise
            except Exception as e:
                from dashboards.data import ReportError

                if isinstance(e, ReportError):
                    raise HTTPException(409, str(e)) from None
                raise
            text = page.read_text()
        return HTMLResponse(text)

    @app.get(
        "/metrics",
        tags=["service"],
        # Not PlainTextResponse: FastAPI would document the JSON 401/413 as text/plain too.
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus text exposition format.",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
        dependencies=[Depends(auth)],
    )
    def metrics():
        """Prometheus metrics: sweeps by state, trials by state, trial durations."""
        body, ctype = render_metrics(db)
        return PlainTextResponse(body, media_type=ctype)

    app.include_router(api)

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            description=app.description,
            routes=app.routes,
        )
        spec_schema = SweepSpec.model_json_schema(ref_template="#/components/schemas/{model}")
        defs = spec_schema.pop("$defs", {})
        schema["components"]["schemas"].update(defs)
        schema["components"]["schemas"]["SweepSpec"] = spec_schema
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
    return app
