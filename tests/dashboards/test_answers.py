"""The note's questions (dashboards/answers.py) on a synthetic sweep whose truth is known:
each effect is planted per seed, and the answers must find it, or say "cannot tell"."""

import json

import numpy as np
import pytest

STEPS = np.arange(0, 401, 80)
TRAIN = np.arange(1, 401)
DIGIT, SIZE = "what_digit_is_shown_in_the_image", "is_the_digit_small_or_large"


def _trial(i, lam, k, seed):
    from dashboards.data import Trial

    noise = 0.05 * seed  # seeds differ a lot; the planted effects are steady per seed
    start = 0.95 + noise
    # a: training loses 0.03 of the retained fraction at λ = 0, nothing at λ = 1
    # e: k = 4 keeps 0.01 more at the end, whatever λ
    end = start - (0.03 if lam == 0 else 0.0) + (0.01 if k == 4 else 0.0)
    retained = np.linspace(start, end, len(STEPS))
    # c: the size question (joins at 200) is 0.05 more accurate at λ = 1 after it joins
    size = np.where(STEPS > 200, 0.8 + noise + (0.05 if lam else 0.0), 0.5)
    # d: |∇reg| / |∇lm| grows from 0.1 to 0.3 over training; the cosine stays at 0 (noise)
    g_lm = np.full(len(TRAIN), 2.0)
    g_reg = np.linspace(0.2, 0.6, len(TRAIN))
    cos = 0.01 * np.sin(TRAIN + seed)
    digit = 0.9 + noise - (0.002 * (-1) ** seed if lam else 0.0)  # b: no cost to see
    # p: accuracy still rising at k = 1 (+0.02 over the last fifth), flat at k = 4
    accuracy = np.array([0.1, 0.5, 0.7, 0.8, 0.85, 0.87 if k == 1 else 0.85]) + noise
    history = {
        "val/accuracy": (STEPS, accuracy),
        "val/probe_retained": (STEPS, retained),
        f"val/accuracy_by_question/{SIZE}": (STEPS, size),
        f"val/loss_lm_by_question/{SIZE}": (STEPS, 1 - size),
        "train/grad_norm_lm": (TRAIN, g_lm),
        "train/grad_norm_reg": (TRAIN, g_reg),
        "train/grad_cos": (TRAIN, cos),
    }
    metrics = {
        "val/probe_retained": end,
        "test/probe_retained": end,
        f"val/accuracy_by_question/{DIGIT}": digit,
        f"val/accuracy_by_question/{SIZE}": float(size[-1]),
    }
    params = {"reg_constant": str(lam), "token_expansion": str(k), "seed": str(seed)}
    params |= {"batch_size": "16", "delayed_questions": str({"Is the digit small or large?": 200})}
    return Trial(f"t{i}", f"t{i}", "FINISHED", params, metrics, history=history)


def _sweep():
    from dashboards.data import SweepData
    from sweeper.spec import SweepSpec

    spec = SweepSpec.model_validate(
        {
            "name": "answers",
            "trainer": {
                "dataset": "digits-factors",
                "probe_questions": ["What colour is the digit?"],
                "delayed_questions": {"Is the digit small or large?": 200},
                "max_steps": 400,
            },
            "search": {
                "sampler": "grid",
                "space": {
                    "reg_constant": {"type": "categorical", "choices": [0.0, 1.0]},
                    "token_expansion": {"type": "categorical", "choices": [1, 4]},
                },
            },
            "budget": {"trials": 4},
            "repeats": 8,
        }
    )
    grid = [(lam, k, s) for lam in (0.0, 1.0) for k in (1, 4) for s in range(8)]
    trials = [_trial(i, *c) for i, c in enumerate(grid)]
    return SweepData("s", "0", "p", "FINISHED", "file:///x", spec, trials)


def _find(rows, q, at, quantity, comparison=None):
    hits = [
        r
        for r in rows
        if r["question"] == q
        and r["at"] == at
        and r["quantity"] == quantity
        and (comparison is None or r["comparison"] == comparison)
    ]
    assert len(hits) == 1, (q, at, quantity, [(r["at"], r["quantity"]) for r in rows])
    return hits[0]


def test_the_answers_find_what_was_planted_and_no_more():
    from dashboards.answers import answer_rows

    rows = answer_rows(_sweep())
    # a: λ = 0 loses 0.03 (k = 1) or 0.02 (k = 4: +0.01); λ = 1 at k = 1 loses nothing
    a0 = _find(rows, "a", "λ = 0.0, k = 1", "retained end - start")
    assert a0["mean"] == pytest.approx(-0.03) and a0["verdict"] == "lower" and a0["n"] == 8
    a1 = _find(rows, "a", "λ = 1.0, k = 1", "retained end - start")
    assert a1["mean"] == pytest.approx(0.0, abs=1e-12)
    # b: λ = 1 keeps 0.03 more, at both k; no accuracy cost to see
    b = _find(rows, "b", "k = 4", "retained@end")
    assert b["mean"] == pytest.approx(0.03) and b["verdict"] == "higher"
    cost = _find(rows, "b", "k = 1", "trained accuracy")
    assert cost["verdict"].startswith("cannot tell (rules out |effect| >")
    assert cost["low"] < 0 < cost["high"]
    # c: +0.05 accuracy on the delayed question after it joins, NLL 0.05 lower
    c = _find(rows, "c", "k = 1", "delayed accuracy after join")
    assert c["mean"] == pytest.approx(0.05) and c["verdict"] == "higher"
    c_nll = _find(rows, "c", "k = 4", "delayed NLL after join")
    assert c_nll["mean"] == pytest.approx(-0.05) and c_nll["verdict"] == "lower"
    # d: the unweighted ratio rises by about 0.16 (early fifth ~0.12, late ~0.28)
    d = _find(rows, "d", "λ = 0.0, k = 4", "grad ratio late - early")
    assert 0.1 < d["mean"] < 0.2 and d["verdict"] == "higher"
    assert d["start"] == pytest.approx(0.12, abs=0.01)
    cos = _find(rows, "d", "λ = 1.0, k = 1", "grad cos late - early")
    assert abs(cos["mean"]) < 0.01
    # p: still rising at k = 1, flat at k = 4
    p1 = _find(rows, "p", "λ = 0.0, k = 1", "accuracy change over the last fifth")
    assert p1["mean"] == pytest.approx(0.02) and p1["verdict"] == "higher"
    p4 = _find(rows, "p", "λ = 1.0, k = 4", "accuracy change over the last fifth")
    assert p4["mean"] == pytest.approx(0.0, abs=1e-12) and p4["verdict"].startswith("cannot")
    # e: k = 4 keeps 0.01 more at either λ
    e = _find(rows, "e", "λ = 0.0", "retained@end")
    assert e["comparison"] == "k = 4 vs k = 1"
    assert e["mean"] == pytest.approx(0.01) and e["verdict"] == "higher"


def test_the_report_carries_the_answers_and_their_data(tmp_path):
    from dashboards.report import render

    page = render(_sweep(), tmp_path).read_text()
    assert "The note&#x27;s questions, paired by seed" in page or "note's questions" in page
    rows = json.loads((tmp_path / "answers.json").read_text())
    assert {r["question"] for r in rows} == set("abcdep")
    # the same rows as a Markdown table, to quote: one line each, in order, same figures
    md = (tmp_path / "answers.md").read_text().splitlines()[2:]
    assert len(md) == len(rows)
    for line, r in zip(md, rows, strict=True):
        assert line.startswith(f"| {r['question']} | {r['comparison']} | {r['at']} |")
        if r["low"] is None:  # planted effects that are exact per seed have no spread
            assert f"{r['mean']:+.4f} (no interval) | {r['n']} |" in line
        else:
            assert f"{r['mean']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}] | {r['n']} |" in line
    assert (tmp_path / "paired_differences.png").is_file()
    # the data behind them: a row per trial, and every history point the answers read
    import csv

    trials = list(csv.DictReader((tmp_path / "trials.csv").open()))
    assert len(trials) == 32 and {t["seed"] for t in trials} == {str(s) for s in range(8)}
    points = list(csv.DictReader((tmp_path / "histories.csv").open()))
    grads = [p for p in points if p["key"] == "train/grad_norm_reg" and p["trial_id"] == "t0"]
    assert [int(p["step"]) for p in grads] == list(range(1, 401))


def test_a_sweep_without_probes_or_delays_has_no_answers():
    from dashboards.answers import answer_rows
    from dashboards.data import SweepData, Trial

    trials = [
        Trial("t", "t", "FINISHED", {"reg_constant": "0.0", "seed": "0"}, {"val/accuracy": 0.5})
    ]
    assert answer_rows(SweepData("s", "0", "p", "FINISHED", "file:///x", None, trials)) == []


def test_an_answer_without_spread_makes_no_claim_and_says_why():
    from dashboards.answers import _row, answers_markdown
    from dashboards.paired import paired_difference

    # two seeds, test accuracy quantised: both moved by one question in 550
    d = paired_difference({0: 0.5018, 1: 0.7018}, {0: 0.5, 1: 0.7})
    row = _row("b", "λ = 1 vs λ = 0", "test", "accuracy", d)
    assert row["low"] is None and row["high"] is None
    assert row["verdict"] == "cannot tell (all 2 differences equal: no interval)"
    md = answers_markdown([row])
    assert "+0.0018 (no interval)" in md and "[," not in md


def test_the_gradient_figure_draws_each_configuration_s_seed_mean():
    """d's figure: one curve per configuration (λ, k), the mean over its 8 seeds, of the
    unweighted ratio, so λ = 0 (whose weighted pull is 0) is drawn too."""
    from dashboards.figures import plt
    from dashboards.figures_grad import _grad_groups, _smooth, fig_grad_ratio

    data = _sweep()
    groups = _grad_groups(data)
    assert sorted(groups) == [
        "λ=0.0, k=1",
        "λ=0.0, k=4",
        "λ=1.0, k=1",
        "λ=1.0, k=4",
    ] and all(len(ts) == 8 for ts in groups.values())
    fig, n = fig_grad_ratio(data)
    ax, ax_cos = fig.axes
    ratio = next(ln for ln in ax.get_lines() if ln.get_label() == "λ=0.0, k=1 (8 seeds)")
    assert ratio.get_ydata()[0] == pytest.approx(0.1, abs=1e-3)  # 0.2 / 2.0 at step 1
    assert ratio.get_ydata()[-1] == pytest.approx(0.3, abs=1e-3)
    assert len(ax_cos.get_lines()) == 4 + 1 and n == 4 * 400 * 2  # 4 curves each, and y = 0
    plt.close(fig)
    # the moving mean shrinks its window at the ends rather than averaging in zeros
    assert _smooth(np.ones(100))[0] == pytest.approx(1.0)


def test_the_plateau_figure_draws_each_configuration_s_seed_mean_and_its_interval():
    """The plateau shown: per configuration the seed mean of validation accuracy at every
    evaluation, its 95% interval as a band, the second half alone, the last fifth shaded;
    and the retained fraction the same way."""
    from scipy import stats

    from dashboards.figures import plt
    from dashboards.figures_plateau import fig_plateau

    fig, n = fig_plateau(_sweep())
    whole, zoom, retained = fig.axes
    line = next(ln for ln in whole.get_lines() if ln.get_label() == "λ = 0.0, k = 1 (8 seeds)")
    noise = 0.05 * np.arange(8)
    assert list(line.get_xdata()) == list(STEPS)
    assert line.get_ydata()[-1] == pytest.approx(0.87 + noise.mean())  # k = 1 ends at 0.87
    band = whole.collections[0].get_paths()[0].vertices[:, 1]
    half = stats.t.ppf(0.975, 7) * noise.std(ddof=1) / np.sqrt(8)
    assert band.max() == pytest.approx(0.87 + noise.mean() + half, abs=1e-9)
    flat = next(ln for ln in zoom.get_lines() if ln.get_label() == "λ = 1.0, k = 4 (8 seeds)")
    assert list(flat.get_xdata()) == [240, 320, 400]  # the second half alone
    assert flat.get_ydata()[-1] == pytest.approx(flat.get_ydata()[-2])  # k = 4 is flat
    shaded = zoom.patches[0].get_extents().transformed(zoom.transData.inverted())
    assert (shaded.x0, shaded.x1) == (pytest.approx(320), pytest.approx(400))
    assert len(retained.get_lines()) == 4 and n == 2 * 4 * len(STEPS)
    plt.close(fig)


def test_the_plateau_figure_keeps_every_step_and_only_the_trials_that_count():
    """A seed that reported fewer evaluations does not cut its configuration's curve; a
    failed trial is not averaged in; a step with one finite value has no band; more
    configurations than the gradient figure groups are still drawn as seed means."""
    from dashboards.figures import plt
    from dashboards.figures_plateau import _seed_band, fig_plateau

    data = _sweep()
    short = data.trials[0]  # λ = 0, k = 1, seed 0: its run ended at step 160
    short.history = {k: (s[:3], v[:3]) for k, (s, v) in short.history.items()}
    failed = _trial(99, 0.0, 1, 9)
    failed.status = "FAILED"
    failed.history["val/accuracy"] = (STEPS, np.zeros(len(STEPS)))
    data.trials.append(failed)
    group = [t for t in data.trials if t.params["reg_constant"] == "0.0"][:8]
    steps, mean, _, seeds = _seed_band(group, "val/accuracy")
    assert list(steps) == list(STEPS) and seeds == 8
    assert mean[-1] == pytest.approx(0.87 + 0.05 * np.arange(1, 8).mean())  # seeds 1-7 there
    one = _seed_band(group[:1], "val/accuracy")
    assert np.isnan(one[2]).all() and one[1][0] == pytest.approx(0.1)
    fig, _ = fig_plateau(data)
    labels = [ln.get_label() for ln in fig.axes[0].get_lines()]
    assert "λ = 0.0, k = 1 (8 seeds)" in labels and not any("9 seeds" in x for x in labels)
    plt.close(fig)
    # ten configurations of two seeds: each one a seed mean, none a single "best" trial
    many = [
        _trial(i, lam, 1, s)
        for i, (lam, s) in enumerate((x / 10, s) for x in range(10) for s in (0, 1))
    ]
    data.trials = many
    fig, _ = fig_plateau(data)
    labels = [ln.get_label() for ln in fig.axes[0].get_lines()]
    assert len(labels) == 10 and all(x.endswith("(2 seeds)") for x in labels), labels
    plt.close(fig)
