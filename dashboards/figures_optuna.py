"""Optuna's own plots of a sweep: its trials replayed into an in-memory study."""

from __future__ import annotations

import warnings

import numpy as np

from dashboards.data import SweepData
from dashboards.figures import _NotApplicable, _Skip
from dashboards.stats import _last


def study(data: SweepData):
    """An in-memory Optuna study of the sweep's trials, for Optuna's own plots."""
    import optuna

    if data.spec is None:
        return None
    dists = {k: p.distribution() for k, p in data.spec.search.space.items()}
    st = optuna.create_study(direction="maximize" if data.mode == "max" else "minimize")
    for t in data.trials:
        params = t.searched(data.spec)
        if any(v is None for v in params.values()):
            continue
        if not all(_inside(dists[k], v) for k, v in params.items()):
            continue  # a baseline outside the space (λ = 0 beside a log range)
        value = _last(t, data.metric)
        if t.cut_short:
            continue  # half-trained by a cancel: not a measurement of its configuration
        if t.status == "FAILED":
            state, value = optuna.trial.TrialState.FAIL, None
        elif value is None:
            continue
        else:
            state = optuna.trial.TrialState.COMPLETE
        st.add_trial(
            optuna.trial.create_trial(params=params, distributions=dists, value=value, state=state)
        )
    return st


def _inside(dist, value) -> bool:
    try:
        return bool(dist._contains(dist.to_internal_repr(value)))
    except (ValueError, TypeError):
        return False


def fig_optuna(data: SweepData, kind: str):
    import optuna
    from optuna.visualization import matplotlib as ovm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if data.sources:
        raise _NotApplicable("exported data: no search space to rebuild a study on")
    st = study(data)
    complete = [] if st is None else st.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    plot = {
        "history": ovm.plot_optimization_history,
        "importances": ovm.plot_param_importances,
        "parallel": ovm.plot_parallel_coordinate,
    }[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if len(complete) < 2:
            raise _Skip(
                f"needs at least 2 completed trials inside the search space (has {len(complete)})"
            )
        try:
            ax = plot(st)
        except (ValueError, RuntimeError) as e:
            raise _Skip(str(e).splitlines()[0]) from None
    ax = np.atleast_1d(ax).ravel()[0]
    fig = ax.figure
    fig.set_size_inches(8, 4.5)
    fig.tight_layout()
    return fig, len(complete)
