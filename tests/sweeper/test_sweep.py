"""Real sweeps: Ray Tune on 2 CPUs, Optuna, a real MLflow sqlite store, the tiny model."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from dashboards.stats import configurations as report_configurations
from sweeper.cli import app
from sweeper.driver import run_sweep
from sweeper.reports import load_sweep
from sweeper.spec import SweepSpec
from sweeper.store import SweepRecord
from tests.conftest import make_dataset
from tests.sweeper.conftest import write_spec

pytestmark = pytest.mark.usefixtures("ray_session")


def _sweep(spec: dict) -> tuple[dict, SweepRecord]:
    rec = SweepRecord.create(SweepSpec.model_validate(spec))
    return run_sweep(rec), rec


def _children(uri: str, state: dict):
    client = MlflowClient(uri)
    parent = state["mlflow"]["parent_run_id"]
    runs = client.search_runs(
        [state["mlflow"]["experiment_id"]], f"tags.mlflow.parentRunId = '{parent}'"
    )
    return client, runs


def test_sweep_logs_a_parent_and_a_finished_child_per_trial(sweep_env, tiny_spec):
    state, rec = _sweep(tiny_spec())
    assert state["status"] == "succeeded"
    client, runs = _children(sweep_env, state)
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    for r in runs:
        assert {"reg_constant", "token_expansion", "lr", "seed", "model"} <= r.data.params.keys()
        assert r.data.tags["trial_id"] in state["trials"]
        for key in ("train/loss_lm", "train/loss_reg", "train/reg_constant", "train/grad_norm_lm"):
            steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
            assert steps == list(range(1, 21)), key  # one point per reported step
        acc = client.get_metric_history(r.info.run_id, "val/accuracy")
        assert [m.step for m in acc] == [0, 10, 20]  # step 0: the untrained projector
        assert float(r.data.params["reg_constant"]) == pytest.approx(
            state["trials"][r.data.tags["trial_id"]]["params"]["reg_constant"]
        )
    parent = client.get_run(state["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep_id"] == rec.id
    assert "spec.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    best = state["best"]
    assert parent.data.metrics["best/val/accuracy"] == pytest.approx(best["value"])
    assert parent.data.params["best.token_expansion"] == str(best["params"]["token_expansion"])
    # the sampler's arguments in force: 2 dimensions, 4 trials -> Ax's floor of 5
    assert parent.data.params["sampler"] == "tpe"
    assert parent.data.params["sampler.n_startup_trials"] == "5"
    accs = [t["metrics"]["val/accuracy"] for t in state["trials"].values()]
    # Two trial processes for four trials: workers are reused, and with them the model
    # and data they loaded (prepared once, in the driver).
    assert len({t["pid"] for t in state["trials"].values()}) <= 2
    assert best["value"] == pytest.approx(max(accs))

    out = CliRunner().invoke(app, ["status", rec.id]).output
    assert "succeeded (4 finished)" in out and "best: val/accuracy" in out
    assert rec.id in CliRunner().invoke(app, ["list"]).output


def test_asha_stops_weak_trials_and_their_runs_end_killed(sweep_env, tiny_spec):
    spec = tiny_spec(
        trainer={"max_steps": 40},
        search={
            "sampler": "random",
            "space": {
                "lr": {"type": "categorical", "choices": [1e-6, 3e-2]},
                "token_expansion": {"type": "categorical", "choices": [1, 4]},
            },
        },
        budget={"trials": 8, "max_concurrent": 1},
        early_stopping={"type": "asha", "grace_period": 10, "reduction_factor": 3},
    )
    state, _ = _sweep(spec)
    stopped = [t for t in state["trials"].values() if t["status"] == "stopped"]
    assert stopped and all(t["step"] < 40 for t in stopped)
    _, runs = _children(sweep_env, state)
    status = {r.data.tags["trial_id"]: r.info.status for r in runs}
    assert {status[t["id"]] for t in stopped} == {"KILLED"}
    cause = {r.data.tags["trial_id"]: r.data.tags.get("stopped_by") for r in runs}
    assert {cause[t["id"]] for t in stopped} == {"scheduler"}
    assert "RUNNING" not in status.values()
    assert state["status"] == "succeeded"


def test_failing_trial_ends_failed_and_the_sweep_goes_on(
    sweep_env, tiny_spec, tiny_dataset, tmp_path
):
    bad = make_dataset(tmp_path / "nan-data", n=40)
    emb = np.load(bad / "embeddings.npy")
    emb[:] = np.nan
    np.save(bad / "embeddings.npy", emb)
    spec = tiny_spec(
        search={
            "sampler": "grid",
            "space": {"dataset": {"type": "categorical", "choices": [tiny_dataset, str(bad)]}},
        },
        budget={"trials": None, "max_concurrent": 2},
        failure={"max_failures": 1},
    )
    state, _ = _sweep(spec)
    by_data = {t["params"]["dataset"]: t for t in state["trials"].values()}
    assert by_data[str(bad)]["status"] == "failed"
    assert by_data[tiny_dataset]["status"] == "finished"
    assert state["status"] == "succeeded"
    _, runs = _children(sweep_env, state)
    run = {r.data.params["dataset"]: r for r in runs}
    assert run[str(bad)].info.status == "FAILED"
    assert "non-finite loss" in run[str(bad)].data.tags["error"]
    assert run[str(bad)].data.tags["retried"] == "1"  # retried once (max_failures), then FAILED
    assert run[tiny_dataset].info.status == "FINISHED"
    # the report lists the failed trial and still draws the others
    from sweeper.reports import write_report

    page = write_report(state["id"], tmp_path / "report", sweep_env).read_text()
    failed = next(t for t in state["trials"].values() if t["status"] == "failed")
    assert "<h2>Failed trials</h2>" in page and failed["id"] in page
    assert "non-finite loss" in page and 'id="loss_curves"' in page


def test_repeats_run_each_configuration_with_several_seeds(sweep_env, tiny_spec):
    state, _ = _sweep(tiny_spec(repeats=3, budget={"trials": 2, "max_concurrent": 2}))
    rows = list(state["trials"].values())
    assert len(rows) == 6
    configs: dict = {}
    for t in rows:
        configs.setdefault(tuple(sorted(t["params"].items())), []).append(t["seed"])
    assert len(configs) == 2 and all(sorted(s) == [0, 1, 2] for s in configs.values())
    assert state["best"]["seeds"] == 3
    _, runs = _children(sweep_env, state)
    assert len(runs) == 6 and {r.data.params["seed"] for r in runs} == {"0", "1", "2"}


def _state(home, sweep_id=None):
    recs = SweepRecord.all()
    return recs[-1].read() if sweep_id is None else SweepRecord.open(sweep_id).read()


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(
    sweep_env, tiny_spec, tmp_path
):
    spec = tiny_spec(
        trainer={"max_steps": 600, "eval_every": 100}, budget={"trials": 5, "max_concurrent": 2}
    )
    path = write_spec(tmp_path / "spec.yaml", spec)
    cmd = [sys.executable, "-m", "sweeper"]
    proc = subprocess.Popen(
        [*cmd, "submit", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ.copy(),
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        time.sleep(1)
        recs = SweepRecord.all()
        rows = recs[-1].read()["trials"].values() if recs else []
        if any(t["status"] == "finished" for t in rows):
            break
    else:
        proc.kill()
        pytest.fail("no trial finished in time")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    before = SweepRecord.all()[-1].read()
    assert before["status"] == "interrupted", out
    assert f"sweeper resume {before['id']}" in out
    # no terminal: progress came as a line per trial as it went, not only at the end
    assert re.search(
        r"\] [1-4]/5 ended( \([^)]* left at this pace\))? \| trial \w+ finished: .*, seed \d+ "
        r"\| step 600, val acc",
        out,
    ), out
    done_before = {k for k, t in before["trials"].items() if t["status"] == "finished"}
    assert done_before and len(done_before) < 5
    # Ctrl-C cut the others short: "paused" for resume, not "stopped" as if ASHA had
    # judged them, so the best counts only finished trials, and their runs say why.
    assert {t["status"] for t in before["trials"].values()} <= {"finished", "paused"}
    assert set(before["best"]["trial_ids"]) <= done_before
    _, runs = _children(sweep_env, before)
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert {r.data.tags.get("stopped_by") for r in killed} <= {"interrupted"}

    res = subprocess.run(
        [*cmd, "resume", before["id"]],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ.copy(),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    after = SweepRecord.open(before["id"]).read()
    assert after["status"] == "succeeded"
    assert len(after["trials"]) == 5
    assert {t["status"] for t in after["trials"].values()} == {"finished"}
    client, runs = _children(sweep_env, after)
    assert len(runs) == 5  # no trial got a second run
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert not any("stopped_by" in r.data.tags for r in runs)  # resumed runs lost the cause
    for r in runs:
        # every step logged once, also for trials resumed from a checkpoint behind them
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "train/loss_lm")]
        assert steps == list(range(1, 601)), r.data.tags["trial_id"]
        val = [m.step for m in client.get_metric_history(r.info.run_id, "val/accuracy")]
        assert val == list(range(0, 601, 100))  # step 0 once, though trials resumed


def test_time_budget_ends_the_sweep_and_closes_every_run(sweep_env, tiny_spec):
    spec = tiny_spec(
        # the budget must outlast Ray's start and a first eval on a slow CI machine
        trainer={"max_steps": 5000, "eval_every": 10},
        budget={"trials": 4, "max_concurrent": 2, "time_budget_s": 25},
    )
    state, _ = _sweep(spec)
    assert state["status"] == "succeeded"
    # the time budget is part of the plan: its cut trials count (best), as ASHA's do
    assert {t["status"] for t in state["trials"].values()} <= {"stopped", "finished"}
    assert state["best"] is not None
    _, runs = _children(sweep_env, state)
    assert runs and "RUNNING" not in {r.info.status for r in runs}
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert killed and {r.data.tags.get("stopped_by") for r in killed} == {"time_budget"}


def test_cancel_file_stops_the_sweep_and_kills_its_runs(sweep_env, tiny_spec):
    import threading

    spec = SweepSpec.model_validate(
        tiny_spec(trainer={"max_steps": 20000, "eval_every": 10}, budget={"trials": 4})
    )
    rec = SweepRecord.create(spec)
    seen: list[float] = []

    def cancel_once_running() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            rows = rec.read()["trials"].values()
            if any((t.get("step") or 0) > 0 for t in rows):
                seen.append(time.monotonic())
                # what `sweeper cancel ID` does for a running local sweep
                assert CliRunner().invoke(app, ["cancel", rec.id]).exit_code == 0
                return
            time.sleep(0.2)

    rec.update(pid=os.getpid())  # the CLI checks the driver is alive
    threading.Thread(target=cancel_once_running, daemon=True).start()
    state = run_sweep(rec)
    assert seen and time.monotonic() - seen[0] < 30
    assert state["status"] == "cancelled"
    # Half-trained by the cancel: "cancelled", not "stopped" as ASHA's are, so no seed
    # mean, best or report figure counts them.
    assert {t["status"] for t in state["trials"].values()} == {"cancelled"}
    assert state["best"] is None
    client, runs = _children(sweep_env, state)
    assert runs and {r.info.status for r in runs} == {"KILLED"}
    assert {r.data.tags.get("stopped_by") for r in runs} == {"cancel"}
    data = load_sweep(rec.id, sweep_env)
    assert data.trials and all(t.cut_short for t in data.trials)
    assert report_configurations(data, "val/accuracy") == {}
    assert client.get_run(state["mlflow"]["parent_run_id"]).info.status == "KILLED"
    res = CliRunner().invoke(app, ["cancel", rec.id])
    assert res.exit_code == 1 and "cancelled: nothing to cancel" in res.output


def _dominates(a: tuple, b: tuple) -> bool:
    return all(x >= y for x, y in zip(a, b, strict=True)) and a != b


def test_multi_objective_sweep_returns_a_non_dominated_set(sweep_env, tiny_spec):
    spec = tiny_spec(
        objective=[
            {"metric": "val/accuracy", "mode": "max"},
            {"metric": "val/loss_reg", "mode": "min"},
        ],
        search={
            "sampler": "grid",
            "seed": 0,
            "space": {
                "reg_constant": {"type": "categorical", "choices": [0.01, 3.0]},
                "projector": {"type": "categorical", "choices": ["mlp", "mlp_residual"]},
            },
        },
        repeats=2,
        budget={"trials": None, "max_concurrent": 2},
    )
    state, rec = _sweep(spec)
    assert state["status"] == "succeeded" and len(state["trials"]) == 8
    # Each configuration's seed means, oriented so that larger is better on both axes.
    confs: dict = {}
    for row in state["trials"].values():
        key = tuple(sorted(row["params"].items()))
        m = row["metrics"]
        confs.setdefault(key, []).append((m["val/accuracy"], -m["val/loss_reg"]))
    means = {k: tuple(np.mean(v, axis=0)) for k, v in confs.items()}
    front = state["best"]["pareto"]
    on = {tuple(sorted(c["params"].items())) for c in front}
    assert on and all(c["seeds"] == 2 for c in front)
    for k, point in means.items():
        beaten = any(_dominates(other, point) for other in means.values())
        assert (k in on) == (not beaten), (k, means)
    for c in front:
        got = c["values"]
        want = means[tuple(sorted(c["params"].items()))]
        assert (got["val/accuracy"], -got["val/loss_reg"]) == pytest.approx(want)
    # The parent run and the report show the set.
    client = MlflowClient(sweep_env)
    parent = client.get_run(state["mlflow"]["parent_run_id"])
    assert parent.data.params["objective"] == "max val/accuracy, min val/loss_reg"
    assert set(parent.data.tags["pareto_trial_ids"].split(",")) == {
        t for c in front for t in c["trial_ids"]
    }
    page = (rec.path / "report" / "report.html").read_text()
    assert 'id="pareto"' in page and "<h2>Pareto set</h2>" in page
    # The projector is a searched variant: compared with the default mlp at its best λ.
    assert 'id="variants"' in page and "Does each variant beat the default?" in page
    assert "<th>projector</th>" in page  # the trial table shows every searched field
    assert any(v in page for v in ("better", "worse", "cannot tell"))
