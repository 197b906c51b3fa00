"""From a spec's `search` to Optuna's sampler and Ray Tune's searcher."""

from __future__ import annotations

from typing import Any

import numpy as np
import optuna
from ray.tune.search import Repeater, Searcher
from ray.tune.search.optuna import OptunaSearch

from sweeper.spec import SweepSpec


def startup_trials(dimensions: int, trials: int | None) -> int:
    """Random trials before a model-based sampler starts modelling: Ax's rule (twice the
    searched dimensions, at most a fifth of the budget, at least 5) in place of Optuna's
    fixed 10, which spends 10 of a 16-trial sweep on random search."""
    n = 2 * dimensions
    if trials is not None:
        n = min(n, trials // 5)
    return max(n, 5)


def sampler_arguments(spec: SweepSpec) -> dict[str, Any]:
    """The sampler's keyword arguments in force: sweeper's defaults from the budget, then
    ``search.sampler_options`` over them. (Optuna 5's TPE is already multivariate on a
    single objective, with a constant liar.)"""
    s = spec.search
    defaults: dict[str, Any] = {}
    if s.sampler in ("tpe", "gp"):
        defaults["n_startup_trials"] = startup_trials(len(s.space), spec.budget.trials)
    return defaults | s.sampler_options


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    """The Optuna sampler the spec names, seeded by ``search.seed``."""
    return spec.search.build_sampler(sampler_arguments(spec))


def make_searcher(spec: SweepSpec) -> Searcher:
    """OptunaSearch over the spec's space; with ``repeats`` > 1 each configuration runs that
    many times (seed, seed+1, ...) and Optuna is told the mean of their objective."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {k: p.distribution() for k, p in spec.search.space.items()}
    # With its own space, OptunaSearch is never handed TuneConfig's metric: give it here too.
    warm = [dict(p) for p in spec.search.points if spec.search.in_space(p)]
    baselines = spec.baseline_points()
    objs = spec.objectives
    multi = spec.multi_objective
    searcher: Searcher = OptunaSearch(
        space=space,
        metric=[o.metric for o in objs] if multi else objs[0].metric,
        mode=[o.mode for o in objs] if multi else objs[0].mode,
        points_to_evaluate=warm or None,
        sampler=make_sampler(spec),
    )
    if baselines:
        searcher = Baselines(searcher, baselines)
    if spec.repeats > 1:
        searcher = MeanRepeater(searcher, repeat=spec.repeats, set_index=True)
    return searcher


class MeanRepeater(Repeater):
    """Ray's Repeater, telling the searcher the mean over seeds of every objective.

    Ray's own averages one metric only; a multi-objective OptunaSearch has a list of them,
    and each gets its mean (NaN-skipping, as Ray's does) here.
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, **kwargs) -> None:
        metrics = self.searcher.metric
        if not isinstance(metrics, list):
            return super().on_trial_complete(trial_id, result, **kwargs)
        group = self._trial_id_to_group[trial_id]
        # A tuple per trial: Ray's group looks for None among its scores.
        group.report(trial_id, tuple(float((result or {}).get(m, np.nan)) for m in metrics))
        if group.finished_reporting():
            means = np.nanmean(np.array(group.scores(), dtype=float), axis=0)
            self.searcher.on_trial_complete(
                group.primary_trial_id,
                result=dict(zip(metrics, means.tolist(), strict=True)),
                **kwargs,
            )


class Baselines(Searcher):
    """Serves fixed configurations first and keeps them from the wrapped searcher.

    A baseline such as λ = 0 lies outside a log-uniform range: Optuna cannot hold it, so
    it runs as an ordinary trial (with its own MLflow run) but is never told to Optuna.
    """

    def __init__(self, searcher: Searcher, points: list[dict[str, Any]]):
        self.searcher = searcher
        self.points = list(points)
        self.served: set[str] = set()
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str):
        if self.points:
            self.served.add(trial_id)
            return dict(self.points.pop(0))
        return self.searcher.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self.served:
            self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        if trial_id not in self.served:
            self.searcher.on_trial_complete(trial_id, result=result, error=error)

    # Tune's SearchGenerator saves wrappers (objects with `.searcher`) by get_state and the
    # innermost searcher by save(), as Ray's own Repeater does.
    def get_state(self) -> dict:
        state = self.__dict__.copy()
        del state["searcher"]
        return state

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)
