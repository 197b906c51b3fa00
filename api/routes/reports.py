"""``GET /sweeps/{id}/report``: the per-sweep HTML report, built from MLflow on demand."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response

from api import crud
from api.db import Database
from api.deps import Authorized, DbDep, SettingsDep
from api.schemas import INVALID_PARAMS, ErrorBody
from api.settings import Settings

router = APIRouter(
    prefix="/sweeps", tags=["sweeps"], dependencies=[Authorized], responses=INVALID_PARAMS
)


@router.get(
    "/{sweep_id}/report",
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
    request: Request,
    sweep_id: str,
    db: DbDep,
    settings: SettingsDep,
    refresh: Annotated[bool, Query(description="Rebuild even if nothing changed.")] = False,
):
    """The per-sweep report, built from MLflow (and logged to the parent run) on demand.

    Rebuilt when the sweep changed since the last build; a running sweep shows what
    exists so far.
    """
    with db.session() as s:
        crud.get_or_404(s, sweep_id)
    # One build per sweep at a time; the locks live as long as the app.
    locks: dict[str, asyncio.Lock] = request.app.state.report_locks
    async with locks.setdefault(sweep_id, asyncio.Lock()):
        try:
            page = await asyncio.to_thread(_build, db, settings, sweep_id, refresh)
        except HTTPException:
            raise
        except Exception as e:
            # Imported here: the report code (matplotlib, optuna, mlflow) takes seconds to
            # import, and a service that never builds a report should not wait for it.
            from dashboards.data import ReportError

            if isinstance(e, ReportError):
                raise HTTPException(409, str(e)) from None
            raise
        text = page.read_text()
    return HTMLResponse(text)


def _build(db: Database, settings: Settings, sweep_id: str, refresh: bool) -> Path:
    from sweeper.reports import publish

    with db.session() as s:
        sw = crud.get_or_404(s, sweep_id)
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
