"""Exception handlers: request errors as ``ErrorBody`` items, an unreachable database as 503."""

from __future__ import annotations

import logging
import math
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.requests import ClientDisconnect

from api.db import db_error_text, db_unavailable

log = logging.getLogger("sweeper.api")

# Seconds a client is told to wait (Retry-After) when the database is unreachable.
DB_RETRY_AFTER_S = 5


class OutageLog:
    """Logs a 503 as one line (no traceback: an outage is not a bug), at most every 10 s."""

    def __init__(self) -> None:
        self.last, self.since = -math.inf, 0  # when a 503 was last logged, and how many since

    def note(self, detail: str) -> None:
        now = time.monotonic()
        if now - self.last >= 10:
            more = f" (and {self.since} more 503s before)" if self.since else ""
            log.warning("503 %s%s", detail, more)
            self.last, self.since = now, 0
        else:
            self.since += 1


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers; the 503 log's state lives on ``app.state.outage_log``."""
    app.state.outage_log = OutageLog()
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(DBAPIError, _db_error)  # OperationalError, InterfaceError, ...
    app.add_exception_handler(PoolTimeout, _pool_timeout)
    app.add_exception_handler(ClientDisconnect, _gone)


async def _gone(request: Request, exc: ClientDisconnect) -> Response:
    """The client went away mid-body: no one reads an answer, and it is no server error
    (it logged a traceback): one debug line, and a 400 for the access log."""
    log.debug("%s %s: client disconnected mid-body", request.method, request.url.path)
    return Response(status_code=400)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    items = [
        {"path": ".".join(str(p) for p in e["loc"]), "msg": e["msg"], "type": e["type"]}
        for e in exc.errors()
    ]
    return JSONResponse({"detail": items}, status_code=422)


async def _db_error(request: Request, exc: DBAPIError) -> JSONResponse:
    if not db_unavailable(exc):
        raise exc  # a bug (a bad query, a constraint): a 500 with its traceback
    return _db_down(request, exc)


async def _pool_timeout(request: Request, exc: PoolTimeout) -> JSONResponse:
    return _db_down(request, exc)


def _db_down(request: Request, exc: Exception) -> JSONResponse:
    detail = f"database unavailable: {db_error_text(exc)}"
    request.app.state.outage_log.note(detail)
    return JSONResponse(
        {"detail": detail},
        status_code=503,
        headers={"Retry-After": str(DB_RETRY_AFTER_S)},
    )
