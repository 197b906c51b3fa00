"""Optuna's samplers by spec name, the options a spec may give each, and building one."""

from __future__ import annotations

import warnings
from typing import Annotated, Any, Literal

import optuna
import optuna.samplers as osamplers
from pydantic import BaseModel, ConfigDict, Field, ValidationError

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)

SAMPLERS: dict[str, type[osamplers.BaseSampler]] = {
    "tpe": osamplers.TPESampler,
    "random": osamplers.RandomSampler,
    "grid": osamplers.GridSampler,
    "cmaes": osamplers.CmaEsSampler,
    "gp": osamplers.GPSampler,
    "qmc": osamplers.QMCSampler,
}

_Startup = Annotated[int, Field(ge=0, le=10_000)]


class _SamplerOptions(BaseModel):
    """Keyword arguments of one Optuna sampler that a spec may set: plain values with
    bounds, none that Optuna has deprecated or that would take a Python object."""

    model_config = _STRICT


class TPEOptions(_SamplerOptions):
    n_startup_trials: _Startup | None = None
    n_ei_candidates: Annotated[int, Field(ge=1, le=10_000)] | None = None
    multivariate: bool | None = None
    group: bool | None = None
    constant_liar: bool | None = None


class GPOptions(_SamplerOptions):
    n_startup_trials: _Startup | None = None
    deterministic_objective: bool | None = None


class CmaEsOptions(_SamplerOptions):
    n_startup_trials: _Startup | None = None
    popsize: Annotated[int, Field(ge=1, le=10_000)] | None = None
    use_separable_cma: bool | None = None
    with_margin: bool | None = None
    lr_adapt: bool | None = None
    consider_pruned_trials: bool | None = None


class QMCOptions(_SamplerOptions):
    qmc_type: Literal["sobol", "halton"] | None = None
    scramble: bool | None = None


SAMPLER_OPTIONS: dict[str, type[_SamplerOptions]] = {
    "tpe": TPEOptions,
    "random": _SamplerOptions,
    "grid": _SamplerOptions,
    "cmaes": CmaEsOptions,
    "gp": GPOptions,
    "qmc": QMCOptions,
}


def check_sampler_options(sampler: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` validated (and coerced) for ``sampler``; ValueError led by the option's
    path below ``search``."""
    model = SAMPLER_OPTIONS[sampler]
    try:
        return model.model_validate(options).model_dump(exclude_unset=True, exclude_none=True)
    except ValidationError as err:
        e = err.errors()[0]
        name = ".".join(str(p) for p in e["loc"])
        if name == "seed":
            msg = "set by search.seed, not here"
        elif e["type"] == "extra_forbidden":
            known = ", ".join(model.model_fields) or "none"
            msg = (
                f"not an option of Optuna's {SAMPLERS[sampler].__name__} that a spec can set "
                f"(options: {known})"
            )
        else:
            msg = e["msg"]
        raise ValueError(f"sampler_options.{name}: {msg}") from None


def build_sampler(
    sampler: str, seed: int, grid: dict[str, list[Any]] | None, kwargs: dict[str, Any]
) -> osamplers.BaseSampler:
    """Optuna's ``sampler`` seeded by ``seed`` with keyword ``kwargs``; the grid sampler
    walks ``grid`` (each searched field's categorical choices)."""
    cls = SAMPLERS[sampler]
    # Optuna marks multivariate, constant_liar, the gp sampler... experimental.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if sampler == "grid":
            return cls(grid, seed=seed, **kwargs)
        return cls(seed=seed, **kwargs)
