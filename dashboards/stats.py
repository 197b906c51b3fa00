"""Statistics of a sweep's trials: seed means with t-intervals, configurations, Welch, Pareto."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from typing import Any, TypeVar

from scipy import stats

from dashboards.data import SweepData, Trial

T = TypeVar("T")


def group_configurations(
    items: Iterable[T],
    metrics: list[str],
    params: Callable[[T], dict[str, Any]],
    value: Callable[[T, str], float | None],
) -> list[dict[str, Any]]:
    """The one count of configurations: ``items`` (trials, or state-file rows) that reported
    every one of ``metrics`` (``value`` None: not reported), grouped by their ``params``
    (compared as text), in order of first appearance.

    Each group: ``{"params": the first item's params, "items": [...], "values": {metric:
    [each item's value]}}``. Which items may count (ended, not cut short) is the caller's.
    """
    groups: dict[Hashable, dict[str, Any]] = {}
    for item in items:
        values = [value(item, m) for m in metrics]
        if any(v is None for v in values):
            continue
        conf = params(item)
        key = tuple(sorted((k, str(v)) for k, v in conf.items()))
        g = groups.setdefault(
            key, {"params": conf, "items": [], "values": {m: [] for m in metrics}}
        )
        g["items"].append(item)
        for m, v in zip(metrics, values, strict=True):
            g["values"][m].append(v)
    return list(groups.values())


def pareto_front(values: list[list[float]], modes: list[str]) -> list[int]:
    """Indices of the rows of ``values`` (one value per objective) that no other row beats:
    at least as good on every objective and better on one, each in its ``mode``."""
    sign = [1 if m == "max" else -1 for m in modes]
    scored = [[v * g for v, g in zip(row, sign, strict=True)] for row in values]

    def beaten(a: list[float]) -> bool:
        return any(all(x >= y for x, y in zip(b, a, strict=True)) and b != a for b in scored)

    return [i for i, a in enumerate(scored) if not beaten(a)]


def _last(t: Trial, key: str) -> float | None:
    h = t.history.get(key)
    if h is not None and len(h[1]):
        return float(h[1][-1])
    v = t.metrics.get(key)
    return None if v is None or not math.isfinite(v) else float(v)


def _interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (0 for a single seed)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    sem = statistics.stdev(values) / math.sqrt(len(values))
    return mean, float(stats.t.ppf(0.975, len(values) - 1) * sem)


def configurations(data: SweepData, key: str) -> dict[int, list[dict[str, Any]]]:
    """Per k: one row per configuration (λ, mean, half-width, n seeds), sorted by λ."""
    groups = group_configurations(
        (t for t in data.trials if t.status != "FAILED" and not t.cut_short),
        [key],
        lambda t: t.searched(data.spec) | {"reg_constant": t.reg_constant, "k": t.token_expansion},
        _last,
    )
    out: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for g in groups:
        last = g["items"][-1]
        lam, k = last.reg_constant, last.token_expansion
        values = g["values"][key]
        mean, half = _interval(values)
        out[k].append({"lam": lam, "mean": mean, "half": half, "n": len(values)})
    for rows in out.values():
        rows.sort(key=lambda r: r["lam"])
    return dict(sorted(out.items()))


def _by_configuration(data: SweepData, keys: list[str]) -> list[dict[str, Any]]:
    """Non-failed trials grouped by searched configuration: each key's seed values."""
    # A running trial's values are half-trained: only ended trials count, KILLED ones
    # only if ASHA or the time budget stopped them (not a cancel), as the driver counts.
    groups = group_configurations(
        (t for t in data.trials if t.status not in ("FAILED", "RUNNING") and not t.cut_short),
        keys,
        lambda t: t.searched(data.spec),
        _last,
    )
    # "_seeds": each value's seed, in the values' order, for comparisons paired by seed
    return [
        {"params": g["params"], "_seeds": [t.seed for t in g["items"]], **g["values"]}
        for g in groups
    ]


def by_seed(conf: dict[str, Any], key: str) -> dict[Any, float]:
    """A configuration's values of ``key`` (from :func:`_by_configuration`) by seed; a seed
    seen twice (a trial retried into a new run) keeps its last value."""
    return dict(zip(conf["_seeds"], conf[key], strict=True))


def _pareto(data: SweepData) -> tuple[list[dict[str, Any]], list[int]]:
    """Configurations with every objective reported, and the indices of their Pareto set
    (seed means; none beaten on every objective by another)."""
    objs = data.spec.objectives
    confs = _by_configuration(data, [o.metric for o in objs])
    means = [[statistics.fmean(c[o.metric]) for o in objs] for c in confs]
    return confs, pareto_front(means, [o.mode for o in objs])


def _best_per_k(data: SweepData) -> dict[int, Trial]:
    best: dict[int, Trial] = {}
    sign = 1 if data.mode == "max" else -1
    for t in data.trials:
        v = _last(t, data.metric)
        if v is None or t.status == "FAILED" or t.cut_short:
            continue
        cur = best.get(t.token_expansion)
        if cur is None or sign * v > sign * (_last(cur, data.metric) or -math.inf * sign):
            best[t.token_expansion] = t
    return dict(sorted(best.items()))


def _welch_half(a: list[float], b: list[float]) -> float | None:
    """Half-width of Welch's 95% interval for mean(a) - mean(b); None under 2 seeds."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:  # identical seeds on both sides: no spread to judge a difference by
        return None
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return float(stats.t.ppf(0.975, dof) * se)
