"""Cluster mode on loopback: the service, a two-node Ray cluster, an MLflow server on Postgres.

No Docker engine runs here: these are docker/compose.yaml's services as processes. The
sweep's driver is a Ray Job on the head; its trials spread over both nodes (1 CPU each),
and every trial's run lands in the MLflow server.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import yaml
from mlflow import MlflowClient

from tests.api.cluster import TOKEN_ENV, MlflowServer, RayCluster

FINAL = ("succeeded", "failed", "cancelled", "interrupted")
# The tiny model trains at ~65 steps/s on one core: 400 steps took 6 s in CI, and the
# node-loss test's poll (0.5 s; the state file is written at most once a second) missed
# the window in which a node_b trial was running past a checkpoint. Long enough to see.
STEPS = 500
LONG = 2000


@pytest.fixture
def cluster(tmp_path):
    ray = RayCluster(tmp_path)
    mlflow = MlflowServer(tmp_path)
    try:
        mlflow.start()
        ray.start_head(cpus=1)
        ray.add_node("node_b", cpus=1)
        yield ray, mlflow
    finally:
        ray.stop()
        mlflow.stop()


def _service(service, db_url, ray, mlflow):
    return service(
        db_url,
        RAY_ADDRESS=ray.dashboard,
        MLFLOW_TRACKING_URI=mlflow.url,
        SWEEPER_MLFLOW_UI_URL=mlflow.url,
        **TOKEN_ENV,
    )


def _state(svc, sweep_id: str) -> dict:
    return json.loads((svc.tmp / "sweeps" / sweep_id / "state.json").read_text())


def test_trials_run_on_both_nodes_and_land_in_the_mlflow_server(
    cluster, service, pg_url, api_spec, tmp_path
):
    ray, mlflow = cluster
    svc = _service(service, pg_url, ray, mlflow)
    # Trials long enough (~8 s each at ~65 steps/s on the tiny model) that the second
    # node's worker is up before they end.
    spec = tmp_path / "cluster.yaml"
    spec.write_text(yaml.safe_dump(api_spec(name="cluster", trials=4, max_steps=STEPS)))
    # The README's "Run on a cluster" submit step, against this stack.
    out = subprocess.run(
        [sys.executable, "-m", "sweeper", "submit", str(spec), "--server", svc.url, "--watch"],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sweep_id = re.search(r"sweep (\S+): queued", out.stdout).group(1)
    done = svc.sweep(sweep_id)
    assert done["status"] == "succeeded", out.stdout[-3000:]
    assert done["driver"] == "ray-job" and done["trial_counts"] == {"finished": 4}

    names = ray.node_names()
    trials = svc.trials(sweep_id)
    placed = {t["id"]: names.get(t["node"]) for t in trials}
    assert set(placed.values()) == {"head", "node_b"}, placed

    client = MlflowClient(mlflow.url)
    runs = client.search_runs(
        [done["mlflow"]["experiment_id"]],
        f"tags.mlflow.parentRunId = '{done['mlflow']['parent_run_id']}'",
    )
    assert {r.info.run_id for r in runs} == {t["mlflow_run_id"] for t in trials}
    assert {r.info.status for r in runs} == {"FINISHED"}
    for r in runs:
        assert len(client.get_metric_history(r.info.run_id, "train/loss_lm")) == STEPS
    assert (
        done["mlflow"]["ui_url"].startswith(mlflow.url)
        and done["mlflow"]["tracking_uri"] == mlflow.url
    )
    print(f"cluster: 4 trials on {sorted(set(placed.values()))}; 4 runs in {mlflow.url}")


def test_a_killed_worker_node_s_trials_retry_on_the_head_from_their_checkpoint(
    cluster, service, sqlite_url, api_spec
):
    ray, mlflow = cluster
    svc = _service(service, sqlite_url, ray, mlflow)
    spec = api_spec(name="nodeloss", trials=4, max_steps=LONG)
    spec["trainer"]["eval_every"] = 50  # a checkpoint every 50 steps
    spec["failure"] = {"max_failures": 2}
    sw = svc.submit(spec)
    names = ray.node_names()

    def on_b_past_a_checkpoint(t):
        return t["status"] == "running" and names.get(t["node"]) == "node_b" and t["step"] >= 100

    def ready(s):
        assert s["status"] not in FINAL, f"no trial ran long on node_b: {svc.trials(s['id'])}"
        return any(on_b_past_a_checkpoint(t) for t in svc.trials(s["id"]))

    svc.wait(sw["id"], ready, timeout=300)
    victim = next(t for t in svc.trials(sw["id"]) if on_b_past_a_checkpoint(t))
    killed_at = victim["step"]
    t0 = time.monotonic()
    ray.kill_node("node_b")
    done = svc.wait(sw["id"], lambda s: s["status"] in FINAL, timeout=400)
    recovered_s = time.monotonic() - t0
    assert done["status"] == "succeeded", svc.driver_log(sw["id"])
    assert done["trial_counts"] == {"finished": 4}

    after = {t["id"]: t for t in svc.trials(sw["id"])}[victim["id"]]
    assert names.get(after["node"]) == "head"  # it finished on the surviving node
    row = _state(svc, sw["id"])["trials"][victim["id"]]
    # It resumed from a checkpoint (an eval step; the row's step may lag the trial's), not
    # from step 0.
    assert row["resumed_from_step"] % 50 == 0 and 50 <= row["resumed_from_step"] < LONG, row
    run = MlflowClient(mlflow.url).get_run(after["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags.get("retried") == "1"
    steps = [
        m.step
        for m in MlflowClient(mlflow.url).get_metric_history(run.info.run_id, "train/loss_lm")
    ]
    assert sorted(steps) == list(range(1, LONG + 1))  # every step once: none lost, none twice
    print(
        f"worker node killed: trial {victim['id']} at step {killed_at} on node_b; "
        f"retried once, resumed on head from step {row['resumed_from_step']}; "
        f"sweep {done['status']} {recovered_s:.0f} s after the kill; {LONG}/{LONG} points"
    )
