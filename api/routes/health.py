"""``/healthz`` and ``/metrics`` (the service itself), and the OpenAPI schema's spec model."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse, Response
from sqlalchemy import select

from api.deps import Authorized, DbDep
from api.metrics import render_metrics
from sweeper.spec import SweepSpec

router = APIRouter(tags=["service"])


@router.get("/healthz")
def healthz(db: DbDep) -> dict[str, str]:
    """Liveness and database reachability; needs no token.

    200 ``{"status": "ok"}`` once a ``SELECT 1`` answers; 503 with ``Retry-After``
    and ``{"detail": "database unavailable: ..."}`` while the database is unreachable.
    """
    with db.session() as s:
        s.execute(select(1))
    return {"status": "ok"}


@router.get(
    "/metrics",
    # Not PlainTextResponse: FastAPI would document the JSON 401/413 as text/plain too.
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
    dependencies=[Authorized],
)
def metrics(db: DbDep):
    """Prometheus metrics: sweeps by state, trials by state, trial durations."""
    body, ctype = render_metrics(db)
    return PlainTextResponse(body, media_type=ctype)


def install_openapi(app: FastAPI) -> None:
    """Document ``POST /sweeps``'s body as the ``SweepSpec`` model (read by hand, JSON or YAML)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            description=app.description,
            routes=app.routes,
        )
        spec_schema = SweepSpec.model_json_schema(ref_template="#/components/schemas/{model}")
        schema["components"]["schemas"].update(spec_schema.pop("$defs", {}))
        schema["components"]["schemas"]["SweepSpec"] = spec_schema
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
