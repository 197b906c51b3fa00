"""A resume writes the test/ metrics Tune holds but an older driver never logged."""

import json

from mlflow import MlflowClient

from sweeper.backfill import backfill_final_metrics, last_results
from sweeper.mlflow_runs import SweepParentRun


def _tune_state(tune_dir, results: dict[str, dict]) -> None:
    """Tune 2.60's experiment state: trial_data holds [trial JSON, runtime JSON] pairs."""
    tune_dir.mkdir(parents=True)
    data = [
        [json.dumps({"trial_id": tid, "stub": False}), json.dumps({"last_result": res})]
        for tid, res in results.items()
    ]
    (tune_dir / "experiment_state-2026-12-07_10-00-00.json").write_text(
        json.dumps({"trial_data": data, "runner_data": {}, "stats": {}})
    )


def test_a_resume_backfills_the_test_metrics_once(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("bf")
    parent = client.create_run(exp).info.run_id
    child = client.create_run(exp, tags={"mlflow.parentRunId": parent, "trial_id": "t1"})
    client.log_metric(child.info.run_id, "val/accuracy", 0.8, step=400)
    results = {
        "t1": {"step": 400, "val/accuracy": 0.8, "test/accuracy": 0.79, "test/probe_retained": 0.9},
        "t2": {"step": 200, "test/accuracy": 0.5},  # no run (never opened): skipped
    }
    _tune_state(tmp_path / "tune", results)
    assert last_results(tmp_path / "tune")["t1"]["test/accuracy"] == 0.79
    run = SweepParentRun(client, parent, exp)
    assert backfill_final_metrics(tmp_path / "tune", run) == 2
    hist = client.get_metric_history(child.info.run_id, "test/accuracy")
    assert [(m.step, m.value) for m in hist] == [(400, 0.79)]
    assert backfill_final_metrics(tmp_path / "tune", run) == 0  # what is there is kept


def test_an_unreadable_tune_state_leaves_the_resume_alone(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("bf")
    run = SweepParentRun(client, client.create_run(exp).info.run_id, exp)
    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "experiment_state-x.json").write_text("{not json")
    assert backfill_final_metrics(tmp_path / "tune", run) == 0
    assert backfill_final_metrics(tmp_path / "missing", run) == 0
