"""On resume: final metrics that Tune holds but MLflow lacks, written to the trials' runs.

Until 2026-12-07 the driver logged only ``val/`` metrics, so a trial with ``test_at_end``
computed its test split, reported it to Tune, and the ``test/`` metrics never reached
MLflow. Tune keeps every trial's last result in its experiment state; a resume reads them
back and logs what the trial's run is missing, at the step it was reported. Best effort:
a Tune state it cannot read, or MLflow refusing, leaves the sweep to run as before.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mlflow.entities import Metric

from sweeper.mlflow_runs import SweepParentRun

_LOG = logging.getLogger("sweeper")
PREFIXES = ("test/",)


def last_results(tune_dir: Path) -> dict[str, dict]:
    """trial id -> its last result, from the experiment states Tune saved (one file per
    driver run, named by its start time; a later run's record of a trial wins)."""
    out = {}
    for state in sorted(tune_dir.glob("experiment_state-*.json")):
        for trial_json, runtime_json in json.loads(state.read_text()).get("trial_data", []):
            trial, runtime = json.loads(trial_json), json.loads(runtime_json)
            if runtime.get("last_result"):
                out[trial["trial_id"]] = runtime["last_result"]
    return out


def backfill_final_metrics(tune_dir: Path, parent: SweepParentRun) -> int:
    """Log the ``test/`` metrics of each trial's last Tune result its run lacks; returns
    how many metric points were written."""
    try:
        results = last_results(tune_dir)
    except (OSError, ValueError, KeyError, TypeError) as e:
        _LOG.warning("backfill: Tune's experiment state unreadable (%s)", e)
        return 0
    written = 0
    client = parent.client
    for trial_id, result in results.items():
        missing = {k: v for k, v in result.items() if k.startswith(PREFIXES)}
        if not missing or "step" not in result:
            continue
        try:
            runs = client.search_runs(
                [parent.experiment_id],
                f"tags.mlflow.parentRunId = '{parent.run_id}' and tags.trial_id = '{trial_id}'",
            )
            if not runs:
                continue
            run = runs[0]
            have = run.data.metrics
            points = [
                Metric(k, float(v), int(result.get("timestamp", 0)) * 1000, int(result["step"]))
                for k, v in missing.items()
                if k not in have and isinstance(v, int | float)
            ]
            if points:
                client.log_batch(run.info.run_id, metrics=points)
                written += len(points)
        except Exception as e:  # MLflow down: the resume goes on; the next one tries again
            _LOG.warning("backfill of trial %s: %s: %s", trial_id, type(e).__name__, e)
    if written:
        _LOG.warning("backfill: wrote %d final metric points Tune held but MLflow lacked", written)
    return written
