"""``GET /sweeps/{id}/events``: a sweep's event log as Server-Sent Events, replay then live."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from sse_starlette.sse import EventSourceResponse

from api import crud
from api.db import Database, db_error_text, db_unavailable
from api.deps import Authorized, DbDep
from api.errors import DB_RETRY_AFTER_S
from api.schemas import INVALID_PARAMS, MAX_INT64, ErrorBody
from sweeper.states import FINAL_STATES

log = logging.getLogger("sweeper.api")

router = APIRouter(
    prefix="/sweeps", tags=["sweeps"], dependencies=[Authorized], responses=INVALID_PARAMS
)


@router.get(
    "/{sweep_id}/events",
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
    db: DbDep,
    after: Annotated[
        int, Query(ge=0, le=MAX_INT64, description="Replay events after this id.")
    ] = 0,
    last_event_id: Annotated[
        int | None,
        Header(
            alias="last-event-id",
            ge=0,
            le=MAX_INT64,
            description="The last event id seen (a reconnecting EventSource sends it); "
            "wins over `after`.",
        ),
    ] = None,
):
    """The sweep's events from the start (or ``after``/Last-Event-ID), then live."""
    with db.session() as s:
        crud.get_or_404(s, sweep_id)
    # Validated like ``after``: no integer, or one over 2^63 - 1 (4,300 digits made int()
    # raise), is a 422 naming header.last-event-id.
    cursor = after if last_event_id is None else last_event_id
    return EventSourceResponse(_stream(request, db, sweep_id, cursor), ping=15)


async def _stream(
    request: Request, db: Database, sweep_id: str, cursor: int
) -> AsyncIterator[dict[str, str]]:
    pause = 0.5
    while True:
        try:
            rows, status = await asyncio.to_thread(crud.events_after, db, sweep_id, cursor)
        except Exception as e:
            if not db_unavailable(e):
                raise
            # The database went away mid-stream: keep the stream (and its pings) open and
            # read on from the same cursor once it is back, so a client sees neither a gap
            # nor a repeat.
            if pause == 0.5:  # once per outage
                log.warning(
                    "events %s: database unavailable (%s); waiting", sweep_id, db_error_text(e)
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
