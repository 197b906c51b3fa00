"""Paired-by-seed differences: the arithmetic, against scipy's paired t-test."""

import math

import pytest
from scipy import stats

from dashboards.paired import paired_difference


def test_the_interval_is_the_paired_t_interval():
    a = {0: 0.80, 1: 0.93, 2: 0.71, 3: 0.88, 4: 0.77}
    b = {0: 0.78, 1: 0.90, 2: 0.70, 3: 0.84, 4: 0.76, 9: 0.1}  # seed 9 has no pair
    d = paired_difference(a, b)
    diffs = [a[s] - b[s] for s in range(5)]
    assert d.n == 5 and d.seeds == (0, 1, 2, 3, 4)
    assert d.mean == pytest.approx(sum(diffs) / 5)
    sem = stats.sem(diffs)
    half = stats.t.ppf(0.975, 4) * sem
    assert (d.low, d.high) == (pytest.approx(d.mean - half), pytest.approx(d.mean + half))
    # the same verdict as scipy's paired t-test at 5%
    assert (stats.ttest_rel([a[s] for s in range(5)], [b[s] for s in range(5)]).pvalue < 0.05) == (
        d.verdict() != "cannot tell"
    )
    assert d.verdict() == "better" and d.verdict(sign=-1) == "worse"


def test_pairing_sees_what_an_unpaired_interval_cannot():
    # seeds differ by 10-14 points, the configuration by a steady 2: paired, it is clear
    base = {s: 0.6 + 0.12 * s for s in range(4)}
    better = {s: v + 0.02 + 0.002 * (-1) ** s for s, v in base.items()}
    d = paired_difference(better, base)
    assert d.verdict() == "better" and d.half < 0.01
    welch = stats.ttest_ind(list(better.values()), list(base.values()), equal_var=False)
    assert welch.pvalue > 0.5  # the unpaired test cannot tell


def test_cannot_tell_states_the_effect_it_rules_out():
    d = paired_difference({0: 0.5, 1: 0.7, 2: 0.6}, {0: 0.6, 1: 0.6, 2: 0.6})
    assert d.verdict() == "cannot tell"
    assert d.rules_out() == pytest.approx(max(abs(d.low), abs(d.high)))
    assert "[" in d.text()


def test_too_few_pairs():
    assert paired_difference({0: 1.0}, {1: 1.0}) is None
    one = paired_difference({0: 1.0}, {0: 0.5})
    assert one.n == 1 and one.low is None and one.verdict() == "too few seeds"
    assert math.isclose(one.mean, 0.5)
