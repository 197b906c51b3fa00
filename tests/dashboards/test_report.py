"""The per-sweep report, from a real sweep's MLflow records, opened in a real Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from matplotlib import image as mpimg
from mlflow import MlflowClient
from typer.testing import CliRunner

from dashboards.stats import configurations
from dashboards.tables import _trial_rows
from sweeper.cli import app
from sweeper.driver import run_sweep
from sweeper.reports import load_sweep, write_compare, write_report
from sweeper.spec import SweepSpec
from sweeper.store import SweepRecord

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(page, tmp_path) -> tuple[str, str, np.ndarray]:
    """Open ``page`` headless with no network: (DOM after scripts, browser log, screenshot)."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium")
        pytest.skip("Debian's chromium is not installed here (apt-get install chromium)")
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--enable-logging=stderr",
        "--v=0",
        f"--user-data-dir={tmp_path / 'chrome'}",
        "--proxy-server=127.0.0.1:9",
        "--window-size=1300,2600",  # no network at all
    ]
    url = page.resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    shot = tmp_path / "shot.png"
    res = subprocess.run(
        [*flags, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120
    )
    return dom.stdout, dom.stderr + res.stderr, mpimg.imread(shot)


def _console_errors(log: str) -> list[str]:
    lines = [line for line in log.splitlines() if "CONSOLE" in line]
    return [line for line in lines if re.search(r"error|uncaught", line, re.I)]


@pytest.mark.usefixtures("ray_session")
def test_report_of_a_sweep_with_repeats_and_a_baseline(sweep_env, tiny_spec, tmp_path):
    spec = SweepSpec.model_validate(
        tiny_spec(
            search={
                "sampler": "tpe",
                "seed": 0,
                "space": {
                    "reg_constant": {"type": "float", "low": 0.01, "high": 10.0, "log": True},
                    "token_expansion": {"type": "categorical", "choices": [1, 2]},
                },
                "points": [{"reg_constant": 0.0, "token_expansion": 1}],
            },
            budget={"trials": 3, "max_concurrent": 2},
            repeats=2,
        )
    )
    rec = SweepRecord.create(spec)
    state = run_sweep(rec)
    assert state["status"] == "succeeded"

    # the driver logged the report to the parent run when the sweep ended
    client = MlflowClient(sweep_env)
    logged = {a.path for a in client.list_artifacts(state["mlflow"]["parent_run_id"], "report")}
    assert "report/report.html" in logged and "report/accuracy_vs_lambda.png" in logged

    # seeds are grouped with a 95% interval; the baseline is its own configuration
    confs = configurations(load_sweep(rec.id, sweep_env), "val/accuracy")
    rows = [r for per_k in confs.values() for r in per_k]
    assert {r["n"] for r in rows} == {2} and any(r["lam"] == 0 for r in confs[1])
    assert all(r["half"] >= 0 for r in rows) and any(r["half"] > 0 for r in rows)

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["report", rec.id, "-o", str(out)])
    assert res.exit_code == 0, res.output
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "accuracy_vs_lambda.png" in pngs and "grad_norm_ratio.png" in pngs
    # every figure has data: Optuna's three, the paired differences and the plateau (the
    # note's answers)
    assert len(pngs) == 9 and {"paired_differences.png", "plateau.png"} <= set(pngs), pngs
    page = (out / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # nothing to fetch
    assert page.count('<td class="FINISHED"') == 6  # a row per trial (3 configurations x 2)

    dom, log, shot = _chromium(out / "report.html", tmp_path)
    assert 'data-figures-loaded="9"' in dom, dom[:2000]  # every <img> decoded
    assert _console_errors(log) == [], log
    pixels = shot[..., :3].reshape(-1, 3)
    ink = (pixels.mean(axis=1) < 0.9).mean()  # share of non-white pixels
    assert shot.shape[0] > 1000 and 0.02 < ink < 0.9, ink

    cmp = write_compare([rec.id, rec.id], tmp_path / "cmp", sweep_env)
    assert (tmp_path / "cmp" / "compare_accuracy_vs_lambda.png").stat().st_size > 10_000
    assert rec.id in cmp.read_text()


def test_report_without_the_sweep_is_a_clear_error(sweep_env, tmp_path):
    res = CliRunner().invoke(app, ["report", "nope", "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and "no MLflow parent run for sweep 'nope'" in res.output
    with pytest.raises(Exception, match="no MLflow parent run"):
        write_report("nope", tmp_path / "o", sweep_env)


def test_trials_a_cancel_cut_short_are_left_out_of_seed_means():
    """A cancel's half-trained seed would drag its configuration's mean down (and flip a
    variant's verdict); ASHA's and the time budget's stops are part of the plan and count."""
    from dashboards.data import SweepData, Trial
    from dashboards.tables import variant_rows

    spec = SweepSpec.model_validate(
        {
            "name": "cut",
            "search": {
                "space": {
                    "projector": {"type": "categorical", "choices": ["mlp", "moe"]},
                    "reg_constant": {"type": "float", "low": 0.01, "high": 1, "log": True},
                }
            },
        }
    )

    def trial(tid, projector, acc, status="FINISHED", stopped_by=None):
        params = {"projector": projector, "reg_constant": "0.1", "token_expansion": "1"}
        metrics = {"val/accuracy": acc}
        return Trial(tid, tid, status, params, metrics, stopped_by=stopped_by)

    trials = [
        trial("m1", "mlp", 0.80),
        trial("m2", "mlp", 0.82),
        trial("m3", "mlp", 0.40, "KILLED", "cancel"),  # killed at step 40 by a cancel
        trial("e1", "moe", 0.84),
        trial("e2", "moe", 0.86),
        trial("e3", "moe", 0.83, "KILLED", "scheduler"),  # ASHA: counts
        trial("e4", "moe", 0.10, "KILLED", "interrupted"),  # a killed driver: does not
    ]
    data = SweepData("s", "0", "p", "KILLED", "file:///x", spec, trials)
    assert [t.trial_id for t in trials if t.cut_short] == ["m3", "e4"]
    rows = {r["value"]: r for r in variant_rows(data)}
    assert rows["mlp"]["n"] == 2 and rows["mlp"]["mean"] == pytest.approx(0.81)
    moe = (0.84 + 0.86 + 0.83) / 3
    assert rows["moe"]["n"] == 3 and rows["moe"]["mean"] == pytest.approx(moe)
    assert rows["moe"]["diff"] == pytest.approx(moe - 0.81)
    per_k = configurations(data, "val/accuracy")[1]
    assert sorted(r["n"] for r in per_k) == [2, 3]
    head, table = _trial_rows(data, None)
    states = {r[0]: r[head.index("state")] for r in table}
    assert states["m3"] == "KILLED (cancel)" and states["m1"] == "FINISHED"


def test_matched_rows_compare_each_variant_with_its_twin_at_the_default():
    """A one-factor-at-a-time design: each variant against the same settings with the
    field at its default, which the best-vs-best view cannot promise."""
    from dashboards.data import SweepData, Trial
    from dashboards.tables import _answer_tables, matched_rows

    spec = SweepSpec.model_validate(
        {
            "name": "ofat",
            "search": {
                "space": {
                    "projector": {"type": "categorical", "choices": ["mlp", "moe", "qformer"]},
                    "reg_schedule": {"type": "categorical", "choices": ["constant", "warmup"]},
                    "reg_constant": {"type": "float", "low": 0.01, "high": 10, "log": True},
                }
            },
        }
    )
    runs = [  # (projector, schedule, λ, accuracy)
        ("mlp", "constant", "0.1", 0.80),
        ("mlp", "constant", "0.1", 0.82),
        ("moe", "constant", "0.1", 0.87),
        ("moe", "constant", "0.1", 0.89),
        ("mlp", "warmup", "0.1", 0.70),
        ("mlp", "warmup", "0.1", 0.72),
        ("qformer", "warmup", "1.0", 0.99),  # no twin ran (mlp, warmup, λ = 1): not matched
        ("mlp", "constant", "1.0", 0.95),  # the best mlp, but not moe's twin
        ("mlp", "constant", "1.0", 0.97),
    ]
    trials = [
        Trial(
            f"t{i}",
            f"t{i}",
            "FINISHED",
            {"projector": p, "reg_schedule": s, "reg_constant": lam, "token_expansion": "1"},
            {"val/accuracy": acc},
        )
        for i, (p, s, lam, acc) in enumerate(runs)
    ]
    data = SweepData("s", "0", "p", "FINISHED", "file:///x", spec, trials)
    rows = matched_rows(data)
    got = {(r["field"], r["value"]): r for r in rows}
    assert set(got) == {("projector", "moe"), ("reg_schedule", "warmup")}
    moe = got[("projector", "moe")]
    assert moe["ref_mean"] == pytest.approx(0.81) and moe["diff"] == pytest.approx(0.07)
    assert moe["verdict"] == "better" and moe["config"] == "reg_schedule=constant, λ=0.1"
    assert got[("reg_schedule", "warmup")]["verdict"] == "worse"
    html_out = "".join(_answer_tables(data))
    assert "Matched: each variant against the default" in html_out
    assert "moe vs mlp" in html_out

    # A field whose default is None reads back from MLflow as "None": the default itself
    # is no variant of its own, and 256 is matched against it.
    spec = SweepSpec.model_validate(
        {
            "name": "hidden",
            "search": {
                "space": {"projector_hidden": {"type": "categorical", "choices": [None, 256]}}
            },
        }
    )
    trials = [
        Trial(f"h{i}", f"h{i}", "FINISHED", {"projector_hidden": h}, {"val/accuracy": a})
        for i, (h, a) in enumerate([("None", 0.8), ("None", 0.82), ("256", 0.7), ("256", 0.71)])
    ]
    data = SweepData("s", "0", "p", "FINISHED", "file:///x", spec, trials)
    (row,) = matched_rows(data)
    assert row["value"] == 256 and row["ref_n"] == 2 and row["verdict"] == "worse"
