"""``/sweeps``: submit, list, show, trials, cancel, resume."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import anyio
import yaml
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from api import crud
from api.deps import Authorized, DbDep, SchedulerDep, SettingsDep
from api.paths import path_errors
from api.schemas import INVALID_PARAMS, MAX_INT64, ErrorBody, SweepList, SweepOut, TrialList
from api.submission import InvalidSpec, read_spec
from sweeper.spec import SweepSpec
from sweeper.states import STATES

_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"
EXAMPLE_SPEC = yaml.safe_load(_EXAMPLE.read_text()) if _EXAMPLE.is_file() else {}

# Validation holds the GIL: more threads at it only share one core. At most PARSES at a
# time in their own limiter (so they never take the threads the sync routes run in). What
# waits is bounded by its cost, the bytes to parse (a burst of small specs from many users
# is cheap; a few maximal ones are not), and by count: beyond either bound a submit is told
# to come back (503, Retry-After) before its body is read.
PARSES = 2
INFLIGHT_BYTES = 2_000_000  # Content-Length of the submits admitted and not yet validated
INFLIGHT_SUBMITS = 64
RETRY_AFTER_S = 5


router = APIRouter(
    prefix="/sweeps", tags=["sweeps"], dependencies=[Authorized], responses=INVALID_PARAMS
)


@router.post(
    "",
    status_code=201,
    response_model=SweepOut,
    responses={
        415: {"model": ErrorBody, "description": "Neither JSON nor YAML."},
        422: {
            "model": ErrorBody,
            "description": "Invalid spec; each error has the field path.",
        },
        503: {
            "model": ErrorBody,
            "description": "Too many specs already wait to be validated (or the database "
            "is unreachable); Retry-After says when to try again.",
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
async def submit(request: Request, db: DbDep, settings: SettingsDep, scheduler: SchedulerDep):
    """Validate and queue a sweep; its driver starts when a slot is free."""
    cost = _admit(request, settings.max_body_bytes)  # before the first await
    try:
        body = await request.body()
        ctype = request.headers.get("content-type", "application/json")
        # Parsing (pure-Python YAML), validation and the path check take up to seconds on
        # a maximal body: in a worker thread, so the event loop (and /healthz) never waits.
        spec = await _validate(request, body, ctype, settings.roots())
    except InvalidSpec as e:
        return JSONResponse({"detail": e.items}, status_code=422)
    finally:
        request.app.state.submits_inflight -= 1
        request.app.state.submit_bytes_inflight -= cost
    out = await run_in_threadpool(crud.create_sweep, db, spec, settings.mlflow_ui_url)
    scheduler.wake()
    return JSONResponse(out, status_code=201, headers={"Location": f"/sweeps/{out['id']}"})


async def _validate(request: Request, body: bytes, ctype: str, roots: list[Path]) -> SweepSpec:
    state = request.app.state
    limiter = getattr(state, "parse_limiter", None)
    if limiter is None:  # made in the event loop, on first use
        limiter = state.parse_limiter = anyio.CapacityLimiter(PARSES)
    return await anyio.to_thread.run_sync(_checked_spec, body, ctype, roots, limiter=limiter)


def _admit(request: Request, max_body: int) -> int:
    """Count this submit in, before anything awaits (so no burst slips past the count), or
    refuse it with a 503 when the specs already admitted and not yet validated come to
    INFLIGHT_BYTES (by Content-Length; a body without one counts as the largest allowed)
    or INFLIGHT_SUBMITS. The first one in is always admitted. Returns its cost in bytes."""
    state = request.app.state
    count = getattr(state, "submits_inflight", 0)
    held = getattr(state, "submit_bytes_inflight", 0)
    length = request.headers.get("content-length", "")
    cost = min(int(length), max_body) if length.isascii() and length.isdigit() else max_body
    if count and (count >= INFLIGHT_SUBMITS or held + cost > INFLIGHT_BYTES):
        raise HTTPException(
            503,
            f"{count} specs ({held // 1000} kB) already wait to be validated; "
            f"try again in {RETRY_AFTER_S} s",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    state.submits_inflight = count + 1
    state.submit_bytes_inflight = held + cost
    return cost


def _checked_spec(body: bytes, ctype: str, roots: list[Path]) -> SweepSpec:
    spec = read_spec(body, ctype)
    bad = path_errors(spec, roots)
    if bad:
        raise InvalidSpec(bad)
    return spec


@router.get("", response_model=SweepList)
def list_sweeps(
    db: DbDep,
    settings: SettingsDep,
    status: Annotated[Literal[STATES] | None, Query(description="Only this state.")] = None,  # type: ignore[valid-type]
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_INT64)] = 0,
):
    """Sweeps, newest first."""
    return crud.list_sweeps(db, status, limit, offset, settings.mlflow_ui_url)


@router.get("/{sweep_id}", response_model=SweepOut, responses={404: {"model": ErrorBody}})
def get_sweep(sweep_id: str, db: DbDep, settings: SettingsDep):
    """Status, trial counts, best configuration so far and MLflow ids of one sweep."""
    with db.session() as s:
        return crud.sweep_out(db, s, crud.get_or_404(s, sweep_id), settings.mlflow_ui_url)


@router.get("/{sweep_id}/trials", response_model=TrialList, responses={404: {"model": ErrorBody}})
def get_trials(sweep_id: str, db: DbDep):
    """Every trial: state, parameters, seed, last step, last metrics, MLflow run id."""
    with db.session() as s:
        crud.get_or_404(s, sweep_id)
        return {"items": crud.list_trials(s, sweep_id)}


@router.post(
    "/{sweep_id}/cancel",
    response_model=SweepOut,
    status_code=202,
    responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
def cancel(sweep_id: str, db: DbDep, settings: SettingsDep, scheduler: SchedulerDep):
    """Stop a sweep's trials (their MLflow runs end KILLED); a queued sweep never starts."""
    crud.cancel_sweep(db, sweep_id)
    scheduler.poke()
    return get_sweep(sweep_id, db, settings)


@router.post(
    "/{sweep_id}/resume",
    response_model=SweepOut,
    status_code=202,
    responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
def resume(sweep_id: str, db: DbDep, settings: SettingsDep, scheduler: SchedulerDep):
    """Queue an interrupted or failed sweep again; finished trials are not re-run."""
    crud.resume_sweep(db, sweep_id)
    scheduler.poke()
    return get_sweep(sweep_id, db, settings)
