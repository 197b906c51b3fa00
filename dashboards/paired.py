"""Comparisons paired by seed: seed s is the same initialisation and batch order in every
configuration, so two configurations compare by the mean of their per-seed differences and
its 95% t-interval, not by an unpaired (Welch) interval that counts the seeds' own spread
as noise."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class PairedDifference:
    """``mean(a_s − b_s)`` over the seeds ``s`` both sides ran, with its 95% t-interval."""

    n: int
    mean: float
    low: float | None  # None under 2 pairs, or with no spread: no interval
    high: float | None
    seeds: tuple = ()
    # every pair differed by the same amount (a quantised measure, few seeds): the
    # t-interval would collapse to a point, so there is none, and the verdict falls back
    # on the sign test
    no_spread: bool = False

    @property
    def half(self) -> float | None:
        return None if self.low is None else (self.high - self.low) / 2

    def verdict(self, sign: int = 1) -> str:
        """'better' / 'worse' when the interval excludes 0 (``sign`` 1: higher is better,
        -1: lower is), else 'cannot tell'; 'too few seeds' under 2 pairs.

        With no spread there is no interval: n equal non-zero differences are judged by
        the exact two-sided sign test (p = 2^(1-n), under 0.05 from 6 seeds on), so two
        seeds that happened to move by the same quantum do not make a claim."""
        if self.no_spread:
            if self.mean == 0 or 2.0 ** (1 - self.n) >= 0.05:
                return "cannot tell"
            return "better" if sign * self.mean > 0 else "worse"
        if self.low is None:
            return "too few seeds"
        if self.low > 0 or self.high < 0:
            return "better" if sign * self.mean > 0 else "worse"
        return "cannot tell"

    def rules_out(self) -> float | None:
        """For 'cannot tell': the largest effect the interval leaves possible; effects
        larger than this in size are ruled out (at 95%); None with no interval."""
        if self.low is None:
            return None
        return max(abs(self.low), abs(self.high))

    def text(self, fmt: str = "+.3f") -> str:
        if self.no_spread:
            return f"{self.mean:{fmt}} (n = {self.n}, all equal: no interval)"
        if self.low is None:
            return f"{self.mean:{fmt}} (n = {self.n})"
        return f"{self.mean:{fmt}} [{self.low:{fmt}}, {self.high:{fmt}}] (n = {self.n})"


def paired_difference(
    a: Mapping[object, float], b: Mapping[object, float]
) -> PairedDifference | None:
    """The paired difference ``a − b`` over the seeds present on both sides (each side:
    seed -> value); None when no seed is shared."""
    seeds = sorted((s for s in a if s in b), key=str)
    if not seeds:
        return None
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return PairedDifference(1, mean, None, None, tuple(seeds))
    # Measures are float32 (accuracy) and exports keep 6 digits, so "the same difference"
    # is equal to that precision, not to the last bit: two seeds that each moved by one
    # question in 550 differ by ~1e-7 and would make a near-point t-interval
    tol = 1e-5 * max(1.0, *(abs(float(v)) for s in seeds for v in (a[s], b[s])))
    if max(diffs) - min(diffs) <= tol:
        mean = 0.0 if abs(mean) <= tol else mean
        return PairedDifference(len(diffs), mean, None, None, tuple(seeds), no_spread=True)
    sd = statistics.stdev(diffs)
    half = float(stats.t.ppf(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs)))
    return PairedDifference(len(diffs), mean, mean - half, mean + half, tuple(seeds))


# --- each configuration against its λ = 0 baseline, paired by seed ------------------------


def baseline_rows(data, keys: list[str]) -> list[dict]:
    """Each configuration with λ > 0 against its baseline, the same configuration at λ = 0
    (same k, projector and every other searched field), paired by seed, for each of
    ``keys`` the trials reported. Rows: ``config``, ``k``, ``lam``, ``key``, ``mean`` and
    ``base_mean`` (seed means), ``diff`` (:class:`PairedDifference`)."""
    from dashboards.html import _conf_label
    from dashboards.stats import _by_configuration, by_seed

    rows = []
    for key in keys:
        confs = _by_configuration(data, [key])
        by_params = {_key(c["params"]): c for c in confs}
        for c in confs:
            lam = _float(c["params"].get("reg_constant"))
            if lam is None or lam <= 0:
                continue
            twin = by_params.get(_key(c["params"] | {"reg_constant": 0.0}))
            if twin is None:
                continue
            d = paired_difference(by_seed(c, key), by_seed(twin, key))
            if d is None:
                continue
            others = {k: v for k, v in c["params"].items() if k != "reg_constant"}
            rows.append(
                {
                    "config": _conf_label(others) or "(no other searched field)",
                    "k": int(_float(c["params"].get("token_expansion")) or _k(data, c)),
                    "lam": lam,
                    "key": key,
                    "mean": statistics.fmean(c[key]),
                    "base_mean": statistics.fmean(twin[key]),
                    "diff": d,
                }
            )
    return sorted(rows, key=lambda r: (r["key"], r["config"], r["lam"]))


def _key(params: dict) -> tuple:
    """A configuration's identity, λ and k compared as numbers ("1" and "1.0" alike)."""

    def norm(k, v):
        f = _float(v)
        if k == "reg_constant":
            return f
        if k == "token_expansion" and f is not None and f.is_integer():
            return int(f)
        return v

    return tuple(sorted((k, str(norm(k, v))) for k, v in params.items()))


def _float(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _k(data, conf) -> int:
    """k of a configuration that does not search it: the trials' own (all share it)."""
    ks = {t.token_expansion for t in data.trials}
    return ks.pop() if len(ks) == 1 else 1
