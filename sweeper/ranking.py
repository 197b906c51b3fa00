"""A sweep's result from its trial rows: configurations (seed means), best, Pareto set."""

from __future__ import annotations

import math
import statistics
from typing import Any

from dashboards.stats import group_configurations, pareto_front
from sweeper.spec import SweepSpec
from sweeper.states import TRIAL_COUNTED


def configurations(spec: SweepSpec, trials: dict[str, dict], metrics: list[str]) -> list[dict]:
    """Finished/stopped trials grouped by configuration, each metric the mean over its seeds.

    A trial counts only if it reported every one of ``metrics`` as a finite number, and
    only if it ended on the sweep's own terms (``TRIAL_COUNTED``): a trial a cancel cut
    short is half-trained and would drag its configuration's mean down.
    """
    groups = group_configurations(
        (row for row in trials.values() if row["status"] in TRIAL_COUNTED),
        metrics,
        lambda row: row["params"],
        _finite,
    )
    return [
        {
            "params": g["params"],
            "values": {m: statistics.mean(g["values"][m]) for m in metrics},
            "seeds": len(g["items"]),
            "trial_ids": [r["id"] for r in g["items"]],
            "mlflow_run_ids": [r.get("mlflow_run_id") for r in g["items"]],
        }
        for g in groups
    ]


def _finite(row: dict[str, Any], metric: str) -> float | None:
    v = (row.get("metrics") or {}).get(metric)
    return v if v is not None and math.isfinite(v) else None


def pareto_set(spec: SweepSpec, trials: dict[str, dict]) -> list[dict]:
    """The configurations no other one beats on every objective (seed means), best first
    on the primary objective."""
    objs = spec.objectives
    configs = configurations(spec, trials, [o.metric for o in objs])
    values = [[c["values"][o.metric] for o in objs] for c in configs]
    front = [configs[i] for i in pareto_front(values, [o.mode for o in objs])]
    return sorted(front, key=lambda c: c["values"][objs[0].metric], reverse=objs[0].mode == "max")


def best_configuration(spec: SweepSpec, trials: dict[str, dict]) -> dict[str, Any] | None:
    """The configuration whose seeds' mean objective is best (over finished/stopped trials).

    With several objectives: the best on the first, with every objective's mean in
    ``values`` and the Pareto set in ``pareto``.
    """
    primary = spec.primary
    every = [o.metric for o in spec.objectives]
    # Multi-objective: ranked among configurations that reported every objective (so the
    # best has all its values and belongs to the same set as the Pareto set), falling back
    # to those with the first objective alone.
    configs = configurations(spec, trials, every) if spec.multi_objective else []
    configs = configs or configurations(spec, trials, [primary.metric])
    if not configs:
        return None
    pick = max if primary.mode == "max" else min
    top = pick(configs, key=lambda c: c["values"][primary.metric])
    best = {
        "params": top["params"],
        "metric": primary.metric,
        "value": top["values"][primary.metric],
        "seeds": top["seeds"],
        "trial_ids": top["trial_ids"],
        "mlflow_run_ids": top["mlflow_run_ids"],
    }
    if spec.multi_objective:
        best["values"] = top["values"]
        best["pareto"] = pareto_set(spec, trials)
    return best
