"""Route dependencies as ``Annotated`` aliases: settings, database, scheduler, auth.

Each reads what :func:`api.main.create_app` put on ``app.state``; none does I/O, so they
are ``async`` and run on the event loop (not in the threadpool).
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.db import Database
from api.scheduler import Scheduler
from api.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_db(request: Request) -> Database:
    return request.app.state.db


async def get_scheduler(request: Request) -> Scheduler:
    return request.app.state.scheduler


SettingsDep = Annotated[Settings, Depends(get_settings)]
DbDep = Annotated[Database, Depends(get_db)]
SchedulerDep = Annotated[Scheduler, Depends(get_scheduler)]

bearer = HTTPBearer(auto_error=False, description="SWEEPER_API_TOKEN, when the service has one")


async def require_token(
    settings: SettingsDep,
    cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """401 unless the request carries the service's bearer token (when it has one)."""
    if settings.api_token is None:
        return
    if cred is None or not secrets.compare_digest(
        cred.credentials.encode(), settings.api_token.encode()
    ):
        raise HTTPException(
            401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
        )


# For a router's or route's ``dependencies=[...]``.
Authorized = Depends(require_token)
