"""The search-efficiency bench's arithmetic: its headline ratio, bootstrap and seed pick."""

import importlib.util
import math
from pathlib import Path

import pytest

_path = Path(__file__).parents[2] / "bench" / "search_efficiency.py"
_spec = importlib.util.spec_from_file_location("search_efficiency", _path)
se = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(se)


def _figures(tpe: list, rnd: list) -> dict:
    def seeds(xs):
        return [{"steps_to_target": x, "steps_total": 2400} for x in xs]

    return {"tpe + asha": {"per_seed": seeds(tpe)}, "random": {"per_seed": seeds(rnd)}}


def test_ratio_counts_misses_against_tpe_and_at_their_cost_for_random():
    # tpe: 200, 400, miss -> median 400; random: 600, 800, miss (2400 spent) -> median 800
    assert se.tpe_asha_vs_random(_figures([200, None, 400], [800, 600, None])) == (0.5, 800)
    # two tpe misses out of three: the median is a miss
    assert math.isinf(se.tpe_asha_vs_random(_figures([None, None, 100], [100, 100, 100]))[0])


def test_bootstrap_resamples_seeds_in_pairs():
    # every seed alone gives 0.5: so does every paired resample, not so unpaired ones
    figures = _figures([100, 200, 400, 800], [200, 400, 800, 1600])
    low, high, at_most_half = se.bootstrap(figures, n=500)
    assert (low, high, at_most_half) == (0.5, 0.5, 1.0)
    spread = _figures([100, 200, 400, 800], [1600, 800, 400, 200])
    low, high, _ = se.bootstrap(spread, n=500)
    assert low < 0.5 < high


def test_a_proposal_picks_its_seed_by_its_exact_lambda():
    picks = [se.pick_seed({"reg_constant": 10 ** (-3 + i / 50)}, 2) for i in range(50)]
    assert set(picks) == {0, 1}  # proposals in one slice see both seeds
    assert picks == [se.pick_seed({"reg_constant": 10 ** (-3 + i / 50)}, 2) for i in range(50)]
    assert se.pick_seed({"reg_constant": 0.5}, 1) == 0


@pytest.mark.parametrize(("lam", "snapped"), [(3e-4, 1e-3), (0.004, 1e-2), (0.3, 0.1), (30, 10)])
def test_lambda_snaps_to_the_nearest_table_value_in_log_space(lam, snapped):
    assert se.snap(lam) == snapped
