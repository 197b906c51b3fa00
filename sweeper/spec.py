"""The sweep spec: one pydantic model shared by the CLI, the API and the driver."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

import optuna.distributions as od
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from sweeper.samplers import build_sampler, check_sampler_options
from sweeper.spec_bounds import (
    MAX_CHOICES,
    MAX_CONCURRENT,
    MAX_CPU,
    MAX_FAILURES,
    MAX_GPU,
    MAX_MEMORY_GB,
    MAX_POINTS,
    MAX_REPEATS,
    MAX_SEED,
    MAX_STEPS,
    MAX_TIME_BUDGET_S,
    MAX_TRIALS,
    out_of_bounds,
)
from sweeper.spec_errors import format_spec_errors, spec_errors
from trainer.config import TrainerConfig

if TYPE_CHECKING:
    import optuna

__all__ = ["SweepSpec", "format_spec_errors", "spec_errors"]  # the API reads these here

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class FloatParam(BaseModel):
    """A float searched between ``low`` and ``high`` (log-uniform with ``log``)."""

    model_config = _STRICT
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = None

    def distribution(self) -> od.BaseDistribution:
        return od.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def extremes(self) -> list[Any]:
        return [self.low, self.high]


class IntParam(BaseModel):
    """An integer searched between ``low`` and ``high`` inclusive."""

    model_config = _STRICT
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = 1

    def distribution(self) -> od.BaseDistribution:
        return od.IntDistribution(self.low, self.high, log=self.log, step=self.step)

    def extremes(self) -> list[Any]:
        return [self.low, self.high]


class CategoricalParam(BaseModel):
    """One of ``choices`` (numbers, strings, booleans or null)."""

    model_config = _STRICT
    type: Literal["categorical"]
    choices: list[float | int | str | bool | None] = Field(max_length=MAX_CHOICES)

    def distribution(self) -> od.BaseDistribution:
        return od.CategoricalDistribution(self.choices)

    def extremes(self) -> list[Any]:
        return list(self.choices)


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


class Search(BaseModel):
    model_config = _STRICT
    sampler: Literal["tpe", "random", "grid", "cmaes", "gp", "qmc"] = "tpe"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    space: dict[str, Param]
    points: list[dict[str, Any]] = Field(
        default_factory=list,
        max_length=MAX_POINTS,
        description="Configurations tried first. Inside the space they warm-start the "
        "sampler; outside it (say λ = 0 beside a log range) they run as baselines that the "
        "sampler never sees.",
    )
    sampler_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments of the Optuna sampler (tpe: n_startup_trials, "
        "n_ei_candidates, multivariate, group, constant_liar; gp: n_startup_trials, "
        "deterministic_objective; cmaes: n_startup_trials, popsize, use_separable_cma, "
        "with_margin, lr_adapt, consider_pruned_trials; qmc: qmc_type, scramble); they "
        "override the defaults sweeper.search picks from the budget.",
    )

    def in_space(self, point: dict[str, Any]) -> bool:
        """Whether Optuna's distributions hold every value of ``point``."""
        for name, value in point.items():
            dist = self.space[name].distribution()
            try:
                if not dist._contains(dist.to_internal_repr(value)):
                    return False
            except (ValueError, TypeError):
                return False
        return True

    @model_validator(mode="after")
    def _check(self) -> Search:
        if not self.space:
            raise ValueError("space: name at least one trainer field to search")
        for name, p in self.space.items():
            try:
                p.distribution()  # Optuna's own checks, in Optuna's words
            except ValueError as e:
                raise ValueError(f"space.{name}: {e}") from None
            except ArithmeticError:  # Optuna's decimal arithmetic on an extreme step
                raise ValueError(
                    f"space.{name}: Optuna cannot divide the range {p.low}..{p.high} into "
                    f"steps of {p.step}"
                ) from None
        self.sampler_options = check_sampler_options(self.sampler, self.sampler_options)
        if self.sampler == "grid":
            bad = [n for n, p in self.space.items() if not isinstance(p, CategoricalParam)]
            if bad:
                raise ValueError(
                    f"space.{bad[0]}: the grid sampler needs categorical choices, not a range: "
                    "give it `type: categorical` and the values to try"
                )
        if self.sampler_options:
            try:  # the sampler's own checks of its arguments, in Optuna's words
                self.build_sampler()
            except (ValueError, TypeError) as e:
                raise ValueError(f"sampler_options: {e}") from None
        for i, point in enumerate(self.points):
            for name in point:
                if name not in self.space:
                    raise ValueError(f"points.{i}.{name}: not a key of search.space")
            missing = [name for name in self.space if name not in point]
            if missing:
                raise ValueError(
                    f"points.{i}.{missing[0]}: missing (a point gives every key of search.space)"
                )
        return self

    def build_sampler(self, arguments: dict[str, Any] | None = None) -> optuna.samplers.BaseSampler:
        """The Optuna sampler with keyword ``arguments`` (default: ``sampler_options``),
        seeded by ``seed``; the grid sampler walks the categorical choices of ``space``."""
        kwargs = self.sampler_options if arguments is None else arguments
        grid = None
        if self.sampler == "grid":
            grid = {k: p.choices for k, p in self.space.items()}  # type: ignore[union-attr]
        return build_sampler(self.sampler, self.seed, grid, kwargs)

    def grid_size(self) -> int:
        return math.prod(len(p.choices) for p in self.space.values())  # type: ignore[union-attr]


class Objective(BaseModel):
    model_config = _STRICT
    metric: str = "val/accuracy"
    mode: Literal["max", "min"] = "max"

    @field_validator("metric")
    @classmethod
    def _known(cls, v: str) -> str:
        from trainer.metrics import VAL_METRICS, is_metric

        if is_metric(v):
            return v
        raise ValueError(f"{v!r} is not a metric the trainer reports; one of {VAL_METRICS}")


# One objective, or a list of several; tagged so that errors name only the form given.
Objectives = Annotated[
    Annotated[Objective, Tag("single")] | Annotated[list[Objective], Tag("several")],
    Discriminator(lambda v: "several" if isinstance(v, list) else "single"),
]


class Budget(BaseModel):
    model_config = _STRICT
    trials: int | None = Field(
        16,
        ge=1,
        le=MAX_TRIALS,
        description="Configurations to try (each run `repeats` times); null: grid size.",
    )
    max_concurrent: int = Field(2, ge=1, le=MAX_CONCURRENT, description="Trials running at once.")
    time_budget_s: float | None = Field(
        None, gt=0, le=MAX_TIME_BUDGET_S, description="Stop the sweep (running trials too)."
    )


class EarlyStopping(BaseModel):
    model_config = _STRICT
    type: Literal["asha"] = "asha"
    grace_period: int = Field(
        50, ge=1, le=MAX_STEPS, description="Steps every trial runs before it can stop."
    )
    reduction_factor: float = Field(2, gt=1, le=1_000)


class Resources(BaseModel):
    model_config = _STRICT
    cpu: float = Field(1, gt=0, le=MAX_CPU)
    gpu: float = Field(0, ge=0, le=MAX_GPU, description="Per trial; fractions share a GPU.")
    memory_gb: float | None = Field(
        None,
        gt=0,
        le=MAX_MEMORY_GB,
        description=(
            "Per trial, optional: reserved from Ray's `memory` resource when trials are "
            "placed, and a cap on the trial's memory growth; a trial that needs more ends "
            "FAILED with an 'out of memory' reason and the sweep goes on."
        ),
    )


class Failure(BaseModel):
    model_config = _STRICT
    max_failures: int = Field(
        1, ge=0, le=MAX_FAILURES, description="Retries of a failing trial before FAILED."
    )


class SweepSpec(BaseModel):
    """A sweep: a base trainer config, the space to search, and how to run it."""

    model_config = _STRICT
    name: str = Field(max_length=64, description="Lower-case letters, digits and '-'.")
    experiment: str | None = Field(
        None,
        min_length=1,
        max_length=250,
        description="MLflow experiment; default: name. At most 250 characters, no control "
        "characters, no '/' or backslash, not '.' or '..'.",
    )
    trainer: dict[str, Any] = Field(default_factory=dict)
    search: Search
    objective: Objectives = Field(
        default_factory=Objective,
        description="The metric to optimise, or a list of several for a multi-objective "
        "sweep: Optuna then searches for their Pareto set (every configuration no other "
        "beats on all of them), ASHA stops trials on the first, and `best` is the best "
        "configuration on the first.",
    )
    budget: Budget = Field(default_factory=Budget)
    repeats: int = Field(
        1, ge=1, le=MAX_REPEATS, description="Seeds per configuration; objective = their mean."
    )
    early_stopping: EarlyStopping | None = None
    resources: Resources = Field(default_factory=Resources)
    failure: Failure = Field(default_factory=Failure)

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", v):
            raise ValueError(f"must be lower-case letters, digits and '-', but got {v!r}")
        return v

    @field_validator("experiment")
    @classmethod
    def _check_experiment(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if v.strip() != v or not v:
            raise ValueError("must not be empty nor start or end with white space")
        if _CONTROL.search(v):
            raise ValueError("must not hold control characters (NUL, newline, ...)")
        if "/" in v or "\\" in v or v in (".", ".."):
            raise ValueError(f"must not be a path ('/', a backslash, '.', '..'), but got {v!r}")
        return v

    @field_validator("trainer")
    @classmethod
    def _check_trainer(cls, v: dict[str, Any]) -> dict[str, Any]:
        TrainerConfig.model_validate(v)  # unknown keys and bad values, with their path
        bad = out_of_bounds(v)
        if bad:
            raise ValueError(bad)
        return v

    @model_validator(mode="after")
    def _check_space_against_trainer(self) -> SweepSpec:
        fields = TrainerConfig.model_fields
        for name, param in self.search.space.items():
            if name not in fields:
                raise ValueError(f"search.space.{name}: not a trainer field")
            if isinstance(param, FloatParam) and _is_int_field(name):
                raise ValueError(
                    f"search.space.{name}: the trainer field is an integer: use `type: int` "
                    "or `type: categorical`"
                )
            for value in param.extremes():
                try:
                    TrainerConfig.model_validate(self.trainer | {name: value})
                except ValidationError as e:
                    msg = e.errors()[0]["msg"]
                    err = f"search.space.{name}: {value!r} is not valid: {msg}"
                    raise ValueError(err) from None
                bad = out_of_bounds({name: value})
                if bad:
                    raise ValueError(f"search.space.{name}: {value!r} is not valid: {bad}")
        for i, point in enumerate(self.search.points):
            try:
                TrainerConfig.model_validate(self.trainer | point)
            except ValidationError as e:
                err = e.errors()[0]
                where = ".".join(str(x) for x in err["loc"])
                raise ValueError(f"search.points.{i}.{where}: {err['msg']}") from None
            bad = out_of_bounds(point)
            if bad:
                raise ValueError(f"search.points.{i}.{bad}")
        if isinstance(self.objective, list):
            if not self.objective:
                raise ValueError("objective: name at least one metric")
            seen = set()
            for i, o in enumerate(self.objective):
                if o.metric in seen:
                    raise ValueError(f"objective.{i}.metric: {o.metric} is listed twice")
                seen.add(o.metric)
            if self.multi_objective and self.search.sampler == "cmaes":
                raise ValueError(
                    "search.sampler: cmaes optimises a single objective; a multi-objective "
                    "sweep needs tpe, random, grid, gp or qmc"
                )
        if self.experiment is None:
            self.experiment = self.name
        if self.search.sampler == "grid":
            # Baseline points (outside the grid) are trials of their own.
            size = self.search.grid_size() + len(self.baseline_points())
            if self.budget.trials is None:
                self.budget.trials = size
            elif self.budget.trials > size:
                raise ValueError(
                    f"budget.trials: {self.budget.trials} is more than the grid's {size} "
                    "points (baselines included); use null to run each once"
                )
        elif self.budget.trials is None:
            raise ValueError("budget.trials: may be null only with the grid sampler")
        return self

    @property
    def objectives(self) -> list[Objective]:
        """Every objective, the first one primary."""
        return list(self.objective) if isinstance(self.objective, list) else [self.objective]

    @property
    def primary(self) -> Objective:
        """The objective ASHA stops on and `best` ranks by: the first."""
        return self.objectives[0]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def baseline_points(self) -> list[dict[str, Any]]:
        """Points outside the space: run as trials, never told to the sampler."""
        return [p for p in self.search.points if not self.search.in_space(p)]

    def base_config(self) -> TrainerConfig:
        return TrainerConfig.model_validate(self.trainer)

    def trainer_config(self, params: dict[str, Any], repeat: int = 0) -> TrainerConfig:
        """The full trainer config of one trial: base, sampled params, and its seed."""
        fields = self.trainer | {k: v for k, v in params.items() if k in self.search.space}
        cfg = TrainerConfig.model_validate(fields)
        return cfg.model_copy(update={"seed": cfg.seed + repeat})


def _is_int_field(name: str) -> bool:
    annotation = TrainerConfig.model_fields[name].annotation
    return annotation is int or annotation == (int | None)
