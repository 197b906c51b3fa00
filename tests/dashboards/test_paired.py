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


def test_no_spread_is_no_interval_and_no_claim_from_few_seeds():
    # two seeds whose quantised accuracies moved by the same step: the t-interval would be
    # the point [+0.0018, +0.0018] and claim "better"
    two = paired_difference({0: 0.5018, 1: 0.6018}, {0: 0.5, 1: 0.6})
    assert two.no_spread and two.low is None and two.high is None
    assert two.verdict() == "cannot tell" and two.rules_out() is None
    assert "no interval" in two.text()
    # zero differences: cannot tell, and nothing is ruled out
    same = paired_difference({s: 0.7 for s in range(8)}, {s: 0.7 for s in range(8)})
    assert same.no_spread and same.verdict() == "cannot tell" and same.rules_out() is None
    # the exact sign test decides instead: 5 equal moves p = 0.0625, 6 p = 0.031
    five = paired_difference({s: 0.1 for s in range(5)}, {s: 0.0 for s in range(5)})
    six = paired_difference({s: 0.1 for s in range(6)}, {s: 0.0 for s in range(6)})
    assert five.verdict() == "cannot tell"
    assert six.verdict() == "better" and six.verdict(sign=-1) == "worse"
    assert stats.binomtest(6, 6).pvalue < 0.05 <= stats.binomtest(5, 5).pvalue


def test_no_spread_is_judged_at_the_data_s_precision():
    """Accuracies are float32 and exports keep 6 digits: the same one-question step at two
    accuracy levels differs in the 7th digit, which must not make a near-point interval."""
    import numpy as np

    f32 = lambda k: float(np.float32(k) / np.float32(542))  # noqa: E731
    six = lambda k: float(f"{k / 550:.6g}")  # noqa: E731
    for acc in (f32, six):
        d = paired_difference({0: acc(250), 1: acc(300)}, {0: acc(249), 1: acc(299)})
        assert d.no_spread and d.verdict() == "cannot tell", d
    # a mean inside that precision is no difference at all, whatever the seeds
    tiny = paired_difference({s: 0.0 for s in range(6)}, {s: 1e-13 * (s == 5) for s in range(6)})
    assert tiny.mean == 0.0 and tiny.verdict() == "cannot tell"
    # a real spread stays a t-interval
    assert not paired_difference({0: 0.5, 1: 0.6}, {0: 0.49, 1: 0.58}).no_spread


def _sweep(rows):
    """A synthetic sweep: (λ, k, seed, accuracy, retained) per trial."""
    from dashboards.data import SweepData, Trial
    from sweeper.spec import SweepSpec

    spec = SweepSpec.model_validate(
        {
            "name": "paired",
            "search": {
                "space": {
                    "reg_constant": {"type": "categorical", "choices": [0.0, 1.0]},
                    "token_expansion": {"type": "categorical", "choices": [1, 4]},
                }
            },
        }
    )
    trials = [
        Trial(
            f"t{i}",
            f"t{i}",
            "FINISHED",
            {"reg_constant": str(lam), "token_expansion": str(k), "seed": str(seed)},
            {"val/accuracy": acc, "val/probe_retained": ret},
        )
        for i, (lam, k, seed, acc, ret) in enumerate(rows)
    ]
    return SweepData("s", "0", "p", "FINISHED", "file:///x", spec, trials)


def test_each_configuration_is_paired_with_its_lambda_zero_twin_by_seed(tmp_path):
    from dashboards.paired import baseline_rows
    from dashboards.report import render
    from dashboards.tables import _answer_tables

    # seeds spread by 0.1 each; λ = 1 adds a steady +0.02 retained at k = 1, nothing at k = 4
    rows = []
    for s in range(4):
        rows += [
            (0.0, 1, s, 0.5 + 0.1 * s, 0.6 + 0.1 * s),
            (1.0, 1, s, 0.5 + 0.1 * s + 0.001 * (-1) ** s, 0.62 + 0.1 * s + 0.002 * (s % 2)),
            (0.0, 4, s, 0.6 + 0.1 * s, 0.7 + 0.1 * s),
            (1.0, 4, s, 0.6 + 0.1 * s, 0.7 + 0.1 * s + 0.01 * (-1) ** s),
        ]
    data = _sweep(rows)
    got = {(r["key"], r["k"]): r for r in baseline_rows(data, ["val/probe_retained"])}
    assert set(got) == {("val/probe_retained", 1), ("val/probe_retained", 4)}
    k1, k4 = got[("val/probe_retained", 1)], got[("val/probe_retained", 4)]
    assert k1["lam"] == 1.0 and k1["diff"].n == 4
    assert k1["diff"].mean == pytest.approx(0.021) and k1["diff"].verdict() == "better"
    assert k4["diff"].mean == pytest.approx(0.0, abs=1e-12)
    assert k4["diff"].verdict() == "cannot tell"
    tables = "".join(_answer_tables(data))
    assert "Against λ = 0, paired by seed" in tables and "rules out |difference|" in tables
    page = render(data, tmp_path).read_text()
    assert (tmp_path / "probe_retained.png").is_file() and "probe_retained" in page


def test_a_configuration_missing_seeds_pairs_only_the_shared_ones():
    from dashboards.paired import baseline_rows

    data = _sweep(
        [
            (0.0, 1, 0, 0.5, 0.5),
            (0.0, 1, 1, 0.6, 0.6),
            (1.0, 1, 1, 0.7, 0.7),
            (1.0, 1, 2, 0.9, 0.9),  # seed 2 has no λ = 0 run
        ]
    )
    (row,) = baseline_rows(data, ["val/accuracy"])
    assert row["diff"].n == 1 and row["diff"].seeds == (1,)
    assert row["diff"].mean == pytest.approx(0.1) and row["diff"].verdict() == "too few seeds"


@pytest.mark.usefixtures("ray_session")
def test_a_real_sweep_with_repeats_reports_retained_information_paired_by_seed(
    sweep_env, tiny_spec, tmp_path
):
    """Issue 16's "done when": a sweep with repeats on a dataset with an independent factor
    held out gives a report whose comparisons are paired and which shows what was kept."""
    from mlflow import MlflowClient

    from dashboards.paired import baseline_rows
    from sweeper.driver import run_sweep
    from sweeper.reports import load_sweep, write_report
    from sweeper.spec import SweepSpec
    from sweeper.store import SweepRecord
    from tests.trainer.test_measures import TINT, make_factor_dataset

    folder = make_factor_dataset(tmp_path / "factors")
    spec = SweepSpec.model_validate(
        tiny_spec(
            trainer={
                "model": "tiny-llama",
                "dataset": str(folder),
                "max_steps": 12,
                "eval_every": 6,
                "batch_size": 16,
                "lr": 0.01,
                "device": "cpu",
                "probe_questions": [TINT],
            },
            search={
                "sampler": "grid",
                "space": {"reg_constant": {"type": "categorical", "choices": [0.0, 1.0]}},
            },
            budget={"trials": 2, "max_concurrent": 2},
            repeats=2,
        )
    )
    rec = SweepRecord.create(spec)
    state = run_sweep(rec)
    assert state["status"] == "succeeded"

    data = load_sweep(rec.id, sweep_env)
    assert sorted(t.seed for t in data.trials) == [0, 0, 1, 1]
    client = MlflowClient(sweep_env)
    steps = [m.step for m in client.get_metric_history(data.trials[0].run_id, "val/probe_ceiling")]
    assert steps == [0, 6, 12]  # the floor (step 0) is on record beside the ceiling
    rows = {r["key"]: r for r in baseline_rows(data, ["val/accuracy", "val/probe_retained"])}
    assert set(rows) == {"val/accuracy", "val/probe_retained"}
    for r in rows.values():
        assert r["lam"] == 1.0 and r["diff"].n == 2 and r["diff"].seeds == (0, 1)
        by_seed = {t.seed: t for t in data.trials if t.reg_constant == 1.0}
        base = {t.seed: t for t in data.trials if t.reg_constant == 0.0}
        want = [by_seed[s].metrics[r["key"]] - base[s].metrics[r["key"]] for s in (0, 1)]
        assert r["diff"].mean == pytest.approx(sum(want) / 2)

    page = write_report(rec.id, tmp_path / "out", sweep_env).read_text()
    assert "Against λ = 0, paired by seed" in page
    assert (tmp_path / "out" / "probe_retained.png").is_file()
