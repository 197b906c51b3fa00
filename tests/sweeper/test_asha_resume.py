"""A sweep under ASHA, interrupted and resumed, stops what the uninterrupted sweep stops.

Ray Tune does not save the scheduler with the experiment; sweeper.asha keeps ASHA's rungs
and stops in the sweep folder. One trial at a time and a seeded random sampler make the
uninterrupted sweep deterministic, so the two runs can be compared trial by trial.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from sweeper.asha import ResumableASHA
from sweeper.driver import run_sweep
from sweeper.spec import SweepSpec
from sweeper.store import SweepRecord
from sweeper.trials import scheduler_file
from tests.sweeper.conftest import write_spec

pytestmark = pytest.mark.usefixtures("ray_session")

ENDED = ("finished", "stopped")


def _spec(tiny_spec) -> dict:
    return tiny_spec(
        name="asha-resume",
        trainer={"max_steps": 90, "eval_every": 10},
        search={
            "sampler": "random",
            "seed": 3,
            "space": {
                "lr": {"type": "float", "low": 1e-5, "high": 5e-2, "log": True},
                "token_expansion": {"type": "categorical", "choices": [1, 2]},
            },
        },
        budget={"trials": 12, "max_concurrent": 1},
        early_stopping={"type": "asha", "grace_period": 10, "reduction_factor": 3},
    )


def _outcome(state: dict) -> dict:
    """Per configuration (lr, k): (status, last step)."""
    return {
        (round(t["params"]["lr"], 12), t["params"]["token_expansion"]): (t["status"], t["step"])
        for t in state["trials"].values()
    }


def _runs(state: dict):
    client = MlflowClient()
    return client, client.search_runs(
        [state["mlflow"]["experiment_id"]],
        f"tags.mlflow.parentRunId = '{state['mlflow']['parent_run_id']}'",
    )


def test_a_resumed_asha_sweep_stops_what_an_uninterrupted_one_does(sweep_env, tiny_spec, tmp_path):
    spec = _spec(tiny_spec)
    straight = run_sweep(SweepRecord.create(SweepSpec.model_validate(spec)))
    assert straight["status"] == "succeeded"
    expected = _outcome(straight)
    stops = [s for s, _ in expected.values()]
    assert "stopped" in stops and "finished" in stops, expected  # ASHA had work to do

    path = write_spec(tmp_path / "asha.yaml", spec)
    cmd = [sys.executable, "-m", "sweeper"]
    before_ids = {r.id for r in SweepRecord.all()}
    proc = subprocess.Popen(
        [*cmd, "submit", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ.copy(),
    )
    deadline = time.monotonic() + 240
    rec = None
    while time.monotonic() < deadline:
        time.sleep(0.2)
        new = [r for r in SweepRecord.all() if r.id not in before_ids]
        if new:
            rec = new[0]
            rows = rec.read()["trials"].values()
            if sum(t["status"] in ENDED for t in rows) >= 5:
                break
    else:
        proc.kill()
        pytest.fail("5 trials did not end in time")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    interrupted = rec.read()
    assert interrupted["status"] == "interrupted", out[-3000:]
    assert scheduler_file(rec.path).exists()
    ended_at_kill = sum(t["status"] in ENDED for t in interrupted["trials"].values())
    assert 5 <= ended_at_kill < 12, out[-3000:]

    res = subprocess.run(
        [*cmd, "resume", rec.id], capture_output=True, text=True, timeout=300, env=os.environ.copy()
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    after = rec.read()
    assert after["status"] == "succeeded"
    got = _outcome(after)
    # The same configurations, each stopped where the uninterrupted sweep stopped it.
    assert got == expected
    steps = lambda o: sum(s for _, s in o.values())  # noqa: E731
    assert steps(got) == steps(expected)

    client, runs = _runs(after)
    assert len(runs) == 12  # one MLflow run per trial: none left behind by the kill
    by_trial = {r.data.tags["trial_id"]: r for r in runs}
    assert set(by_trial) == set(after["trials"])
    for tid, row in after["trials"].items():
        run = by_trial[tid]
        if row["status"] == "finished":
            assert run.info.status == "FINISHED" and "stopped_by" not in run.data.tags, tid
        else:  # stopped at a rung: its cause, not the interrupt
            assert run.info.status == "KILLED", tid
            assert run.data.tags.get("stopped_by") == "scheduler", (tid, run.data.tags)
        history = client.get_metric_history(run.info.run_id, "train/loss_lm")
        assert sorted(m.step for m in history) == list(range(1, row["step"] + 1)), tid


def test_the_scheduler_state_survives_pickling_through_its_file(tmp_path):
    """What Tuner.restore does to the scheduler: unpickle it; it reads its file back."""
    import pickle

    class T:
        def __init__(self, tid):
            self.trial_id = tid

    asha = ResumableASHA(tmp_path, time_attr="step", max_t=90, grace_period=10, reduction_factor=3)
    asha.set_search_properties("val/accuracy", "max")
    pickled = pickle.dumps(asha)  # as the Tuner pickles it at the start: empty
    for tid, acc in (("a", 0.9), ("b", 0.95), ("c", 0.1)):
        asha.on_trial_add(None, T(tid))
        asha.on_trial_result(None, T(tid), {"step": 10, "val/accuracy": acc})
    assert asha.stopped == {"c": 10}
    restored = pickle.loads(pickled)
    assert restored.stopped == {"c": 10}
    assert [dict(r) for _, r in restored._brackets[0]._rungs][-1] == {
        "a": 0.9,
        "b": 0.95,
        "c": 0.1,
    }
    # A replay of c's rung (restored from an older checkpoint) gets the same verdict.
    restored.on_trial_add(None, T("c"))
    assert restored.on_trial_result(None, T("c"), {"step": 10, "val/accuracy": 0.1}) == "STOP"
    # a new trial is judged against the rung as it was
    restored.on_trial_add(None, T("d"))
    assert restored.on_trial_result(None, T("d"), {"step": 10, "val/accuracy": 0.2}) == "STOP"
    assert restored.on_trial_result(None, T("a"), {"step": 20, "val/accuracy": 0.9}) == "CONTINUE"
    # A trial that ran to max_t is no rung stop; a replay of a stopped trial from before
    # its stop continues up to the step it was stopped at.
    assert restored.on_trial_result(None, T("a"), {"step": 90, "val/accuracy": 0.9}) == "STOP"
    assert "a" not in restored.stopped
    assert restored.on_trial_result(None, T("d"), {"step": 5, "val/accuracy": 0.2}) == "CONTINUE"
