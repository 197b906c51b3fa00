"""The REST service: ``create_app()``; ``sweeper serve`` runs it under uvicorn.

Routes (``docs/service.md`` has examples): ``POST /sweeps``, ``GET /sweeps``,
``GET /sweeps/{id}``, ``GET /sweeps/{id}/trials``, ``POST /sweeps/{id}/cancel``,
``POST /sweeps/{id}/resume``, ``GET /sweeps/{id}/events`` (Server-Sent Events),
``GET /sweeps/{id}/report`` (HTML), ``GET /healthz``, ``GET /metrics`` (Prometheus).
The API never runs a sweep itself: each runs in its own driver process (``api.launcher``).
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.db import Database
from api.errors import install_error_handlers
from api.launcher import Launcher
from api.middleware import BodyLimit
from api.routes import events, health, reports, sweeps
from api.scheduler import Scheduler
from api.schemas import ErrorBody
from api.settings import Settings

DB_DOWN = "The database is unreachable; retry after `Retry-After` seconds."


@asynccontextmanager
async def lifespan(app: FastAPI):
    async with app.state.scheduler.running():
        yield


def create_app(settings: Settings | None = None, start_scheduler: bool = True) -> FastAPI:
    """The service on ``settings`` (default: from the environment).

    ``start_scheduler=False`` starts no drivers: submitted sweeps stay queued (tests).
    """
    settings = settings or Settings()
    app = FastAPI(
        title="projector-sweeper",
        version="0.1.0",
        summary="Hyperparameter sweeps for multimodal-LLM projector regularisation research.",
        description=__doc__,
        lifespan=lifespan,
        responses={
            401: {"model": ErrorBody},
            413: {"model": ErrorBody},
            503: {"model": ErrorBody, "description": DB_DOWN},
        },
    )
    app.state.settings = settings
    app.state.db = Database(settings.db_url())
    app.state.launcher = Launcher(app.state.db, settings)
    app.state.scheduler = Scheduler(
        app.state.launcher, settings.reconcile_interval_s, enabled=start_scheduler
    )
    app.state.report_locks = {}
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    install_error_handlers(app)
    for router in (health.router, sweeps.router, events.router, reports.router):
        app.include_router(router)
    health.install_openapi(app)
    return app
