"""The service's response models: what the OpenAPI schema documents and routes return."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from sweeper.states import STATES

# Largest OFFSET/event id a query takes: SQLite's and PostgreSQL's BIGINT (larger ones 500ed).
MAX_INT64 = 2**63 - 1


class ErrorItem(BaseModel):
    path: str = Field(
        description="Dotted field path in the spec ('' for the whole body); for a bad "
        "request parameter, its location and name (query.limit)."
    )
    msg: str
    type: str


class ErrorBody(BaseModel):
    detail: str | list[ErrorItem]


# A router's ``responses``: request validation errors are ErrorBody too (see api.errors),
# not FastAPI's default schema.
INVALID_PARAMS: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorBody, "description": "Invalid request parameters."}
}


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


# A trial as the service mirrors it: api.db.TRIAL_FIELDS (the driver's sweeper.trials.TrialRow)
# with its id and when it started and ended (tests/api/test_schemas.py holds them together).
# A comment, not a docstring: that would change the OpenAPI schema.
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
