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
    low: float | None  # None under 2 pairs: no interval
    high: float | None
    seeds: tuple = ()

    @property
    def half(self) -> float | None:
        return None if self.low is None else (self.high - self.low) / 2

    def verdict(self, sign: int = 1) -> str:
        """'better' / 'worse' when the interval excludes 0 (``sign`` 1: higher is better,
        -1: lower is), else 'cannot tell'; 'too few seeds' under 2 pairs."""
        if self.low is None:
            return "too few seeds"
        if self.low > 0 or self.high < 0:
            return "better" if sign * self.mean > 0 else "worse"
        return "cannot tell"

    def rules_out(self) -> float | None:
        """For 'cannot tell': the largest effect the interval leaves possible; effects
        larger than this in size are ruled out (at 95%)."""
        if self.low is None:
            return None
        return max(abs(self.low), abs(self.high))

    def text(self, fmt: str = "+.3f") -> str:
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
    sd = statistics.stdev(diffs)
    half = float(stats.t.ppf(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs)))
    return PairedDifference(len(diffs), mean, mean - half, mean + half, tuple(seeds))
