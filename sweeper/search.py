"""From a spec's `search` to Optuna's sampler and Ray Tune's searcher."""

from __future__ import annotations

import optuna
from ray.tune.search import Repeater, Searcher
from ray.tune.search.optuna import OptunaSearch

from sweeper.spec import CategoricalParam, SweepSpec


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    """The Optuna sampler the spec names, seeded by ``search.seed``."""
    s = spec.search
    if s.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=s.seed)
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.sampler == "grid":
        grid = {k: p.choices for k, p in s.space.items() if isinstance(p, CategoricalParam)}
        return optuna.samplers.GridSampler(grid, seed=s.seed)
    if s.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=s.seed)
    if s.sampler == "gp":
        return optuna.samplers.GPSampler(seed=s.seed)
    return optuna.samplers.QMCSampler(seed=s.seed)


def make_searcher(spec: SweepSpec) -> Searcher:
    """OptunaSearch over the spec's space; with ``repeats`` > 1 each configuration runs that
    many times (seed, seed+1, ...) and Optuna is told the mean of their objective."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {k: p.distribution() for k, p in spec.search.space.items()}
    # With its own space, OptunaSearch is never handed TuneConfig's metric: give it here too.
    searcher: Searcher = OptunaSearch(
        space=space,
        metric=spec.objective.metric,
        mode=spec.objective.mode,
        points_to_evaluate=[dict(p) for p in spec.search.points] or None,
        sampler=make_sampler(spec),
    )
    if spec.repeats > 1:
        searcher = Repeater(searcher, repeat=spec.repeats, set_index=True)
    return searcher
