"""MLflow's tracking server stops mid-sweep for 30 s and starts again: nothing is lost.

A real ``mlflow server`` (its own process group, a free port on 127.0.0.1, SQLite and an
artifact folder in the test's folder) tracks a real sweep (Ray Tune on 2 CPUs, the tiny
model, run in this process as ``sweeper submit`` runs it). Once the first trial has
reported, the server's process group is killed (SIGKILL: requests in flight are cut), kept
down ``OUTAGE_S`` (longer if no trial has started while it was down, so a run is created
late), then started again on the same port and store. Every trial must finish, every run
must end FINISHED with exactly one point per step for each metric.
"""

from __future__ import annotations

import threading
import time

import pytest
from mlflow import MlflowClient

from sweeper.driver import run_sweep
from sweeper.mlflow_retry import MLFLOW_HTTP_DEFAULTS
from sweeper.spec import SweepSpec
from sweeper.store import SweepRecord
from tests.api.cluster import MlflowServer
from tests.conftest import make_dataset
from trainer.metrics import TRAIN_METRICS

pytestmark = pytest.mark.usefixtures("ray_session")

OUTAGE_S = 30.0
MAX_OUTAGE_S = 90.0  # waiting for a trial to start while MLflow is down
# Ten short trials one at a time, each reporting (and checkpointing) every 10 steps, an
# evaluation over 600 images each time: ~5 s a trial on 2 quiet cores, so the outage spans
# several trials and the sweep runs on after it, with few points to write.
MAX_STEPS, EVAL_EVERY, TRIALS, IMAGES = 100, 10, 10, 4000


@pytest.fixture
def mlflow_server(tmp_path):
    root = tmp_path / "mlflow-server"
    root.mkdir()
    server = MlflowServer(root, backend=f"sqlite:///{root / 'mlflow.db'}")
    yield server
    server.stop()


def test_mlflow_server_stopped_mid_sweep_loses_no_point(
    sweep_env, tiny_spec, mlflow_server, monkeypatch, tmp_path
):
    t0 = time.monotonic()
    up_s = mlflow_server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("SWEEPER_MLFLOW_RETRY_S", "150")  # the sweep's end waits at most this
    for key in MLFLOW_HTTP_DEFAULTS:  # the driver sets them in this process: undone after
        monkeypatch.delenv(key, raising=False)
    data = make_dataset(tmp_path / "data", n=IMAGES)
    spec = tiny_spec(
        name="mlflow-outage",
        trainer={"max_steps": MAX_STEPS, "eval_every": EVAL_EVERY, "dataset": str(data)},
        budget={"trials": TRIALS, "max_concurrent": 1},
    )
    rec = SweepRecord.create(SweepSpec.model_validate(spec))
    outage: dict[str, float] = {}
    errors: list[BaseException] = []

    def rows() -> dict:
        return rec.read()["trials"]

    def inject() -> None:
        try:
            deadline = time.monotonic() + 180
            while not any((t.get("step") or 0) > 0 for t in rows().values()):
                if time.monotonic() > deadline:
                    raise TimeoutError("no trial reported within 180 s")
                time.sleep(0.2)
            before = set(rows())
            mlflow_server.kill()
            outage["stopped"] = time.monotonic()
            outage["stopped_wall"] = time.time()
            time.sleep(OUTAGE_S)
            # Keep it down until a trial has started meanwhile: that run is created late.
            while set(rows()) == before and time.monotonic() - outage["stopped"] < MAX_OUTAGE_S:
                time.sleep(0.5)
            outage["down"] = time.monotonic() - outage["stopped"]
            outage["restart"] = mlflow_server.start()
            outage["up"] = time.monotonic()
            at_restart = rows()
            outage["running_at_restart"] = sum(
                1 for t in at_restart.values() if t["status"] == "running"
            )
            outage["known_at_restart"] = set(at_restart)
            outage["trials_started_while_down"] = len(set(at_restart) - before)
        except BaseException as e:
            errors.append(e)

    injector = threading.Thread(target=inject, daemon=True)
    injector.start()
    state = run_sweep(rec)
    injector.join(timeout=150)
    sweep_s = time.monotonic() - t0
    assert not errors, errors
    assert "up" in outage, f"the outage never ended: {outage}"

    client = MlflowClient(mlflow_server.url)
    trials = state["trials"]
    runs = client.search_runs(
        [state["mlflow"]["experiment_id"]],
        f"tags.mlflow.parentRunId = '{state['mlflow']['parent_run_id']}'",
    )
    # every train metric at every step, every val metric (any run has) at every eval
    keys = set(TRAIN_METRICS) | {k for r in runs for k in r.data.metrics if k.startswith("val/")}
    assert "val/accuracy" in keys
    expected = found = 0
    problems = []
    for run in runs:
        tid = run.data.tags["trial_id"]
        for key in sorted(keys):
            want = (
                list(range(1, MAX_STEPS + 1))
                if key.startswith("train/")
                else list(range(0, MAX_STEPS + 1, EVAL_EVERY))  # step 0: the untrained floor
            )
            got = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            expected += len(want)
            found += len(got)
            if got != want:
                missing, extra = sorted(set(want) - set(got)), len(got) - len(set(got))
                problems.append(f"{tid} {key}: missing {missing[:5]}... duplicates {extra}")
    late = sum(1 for r in runs if r.info.start_time / 1000 >= outage["stopped_wall"])
    writes = state.get("mlflow_writes") or {}
    finished = sum(1 for t in trials.values() if t["status"] == "finished")
    after = len(set(trials) - outage["known_at_restart"])
    print(
        f"\nmlflow outage: down {outage['down']:.1f} s (unreachable "
        f"{outage['up'] - outage['stopped']:.1f} s from the kill until it answered again, "
        f"{writes.get('unreachable_s')} s as the driver saw it); trials {finished}/{TRIALS} "
        f"finished; points expected {expected} found {found}; writes retried "
        f"{writes.get('retried')}, dropped {writes.get('dropped')}\n"
        f"  server killed (SIGKILL) after the first report, restarted in "
        f"{outage['restart']:.1f} s (first start {up_s:.1f} s); trials started while down "
        f"{outage['trials_started_while_down']} ({late} runs created after the kill), running "
        f"at the restart {outage['running_at_restart']}, started after it {after}; sweep "
        f"{state['status']}; test body {sweep_s:.0f} s"
    )
    assert state["status"] == "succeeded", state.get("error")
    assert finished == TRIALS and {t["status"] for t in trials.values()} == {"finished"}
    assert len(runs) == TRIALS and {r.info.status for r in runs} == {"FINISHED"}
    assert not problems, problems
    assert expected == found
    assert writes["retried"] > 0 and writes["dropped"] == 0 and writes["unwritten"] == 0
    assert outage["trials_started_while_down"] >= 1 and late >= 1
    # every trial row has its run, also the one created after the server came back
    assert {t["mlflow_run_id"] for t in trials.values()} == {r.info.run_id for r in runs}
    parent = client.get_run(state["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED" and "best/val/accuracy" in parent.data.metrics
