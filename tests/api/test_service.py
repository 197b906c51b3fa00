"""The service end to end: a real ``sweeper serve``, real driver processes, real Ray."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import yaml
from mlflow import MlflowClient

from sweeper.client import SweeperClient

FINAL = ("succeeded", "failed", "cancelled", "interrupted")


def _runs(svc, sw: dict):
    client = MlflowClient(svc.mlflow_uri)
    ml = sw["mlflow"]
    return client.search_runs(
        [ml["experiment_id"]], f"tags.mlflow.parentRunId = '{ml['parent_run_id']}'"
    ), client.get_run(ml["parent_run_id"])


def test_submit_yaml_follow_events_to_the_best_trial(service, db_url, api_spec):
    svc = service(db_url)
    body = yaml.safe_dump(api_spec())
    r = svc.http.post("/sweeps", content=body, headers={"content-type": "application/yaml"})
    assert r.status_code == 201, r.text
    sweep_id = r.json()["id"]
    assert r.headers["location"] == f"/sweeps/{sweep_id}"

    kinds = [kind for kind, _ in SweeperClient(svc.url).events(sweep_id)]  # ends when final
    sw = svc.sweep(sweep_id)
    assert sw["status"] == "succeeded", svc.driver_log(sweep_id)
    assert kinds[:2] == ["sweep", "sweep"]  # queued, running
    assert kinds.count("trial_started") == 2 and kinds.count("trial_finished") == 2
    assert "trial_reported" in kinds and kinds[-1] == "sweep"
    assert sw["trial_counts"] == {"finished": 2}
    best = sw["best"]
    assert best["metric"] == "val/accuracy" and 0 <= best["value"] <= 1
    trials = {t["id"]: t for t in svc.trials(sweep_id)}
    assert set(best["trial_ids"]) <= set(trials)
    assert all(t["step"] == 20 and "val/accuracy" in t["metrics"] for t in trials.values())

    runs, parent = _runs(svc, sw)
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep_id"] == sweep_id
    assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) == 2
    assert {r.info.run_id for r in runs} == {t["mlflow_run_id"] for t in trials.values()}

    metrics = svc.http.get("/metrics").text
    assert 'sweeper_sweeps{state="succeeded"} 1.0' in metrics
    assert 'sweeper_trials{state="finished"} 2.0' in metrics
    assert "sweeper_trial_duration_seconds_count 2.0" in metrics


def test_cli_submit_watch_and_list_through_the_server(service, sqlite_url, api_spec, tmp_path):
    svc = service(sqlite_url, SWEEPER_MLFLOW_UI_URL="http://mlflow.example:5000")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(api_spec(name="cli")))
    env = svc.env | {"SWEEPER_SERVER": svc.url}
    cmd = [sys.executable, "-m", "sweeper"]
    res = subprocess.run(
        [*cmd, "submit", str(spec_file), "--watch"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "succeeded (2 finished)" in out and "best: val/accuracy = " in out
    assert re.search(r"\] 2/2 ended \| trial \w+ finished: ", out), out  # a line per trial
    assert "MLflow: http://mlflow.example:5000/#/experiments/" in out
    res = subprocess.run([*cmd, "list"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0 and "succeeded" in res.stdout and "cli-" in res.stdout
    sweep_id = out.split()[1].rstrip(":")
    res = subprocess.run(
        [*cmd, "report", sweep_id, "-o", "rep"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "rep" / "report.html").is_file()
    assert (tmp_path / "rep" / "accuracy_vs_lambda.png").stat().st_size > 5000
    bad = subprocess.run([*cmd, "status", "nope"], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "no sweep 'nope'" in bad.stderr


def test_cancel_stops_trials_promptly_and_kills_their_runs(service, sqlite_url, api_spec):
    svc = service(sqlite_url)
    sw = svc.submit(api_spec(max_steps=20000, trials=4))
    svc.wait(sw["id"], lambda s: any((t["step"] or 0) > 0 for t in svc.trials(s["id"])))
    # the report of a running sweep shows what exists so far
    page = svc.http.get(f"/sweeps/{sw['id']}/report", timeout=120)
    assert page.status_code == 200, page.text
    assert '<td class="RUNNING"' in page.text and 'id="loss_curves"' in page.text
    t0 = time.monotonic()
    r = svc.http.post(f"/sweeps/{sw['id']}/cancel")
    assert r.status_code == 202 and r.json()["cancel_requested"]
    done = svc.wait(sw["id"], lambda s: s["status"] in FINAL, timeout=60)
    took = time.monotonic() - t0
    assert done["status"] == "cancelled", svc.driver_log(sw["id"])
    assert took < 30, took
    assert svc.http.post(f"/sweeps/{sw['id']}/cancel").status_code == 409
    assert svc.http.post(f"/sweeps/{sw['id']}/resume").status_code == 409
    runs, parent = _runs(svc, done)
    assert runs and {r.info.status for r in runs} == {"KILLED"}
    assert {r.data.tags.get("stopped_by") for r in runs} == {"cancel"}
    assert parent.info.status == "KILLED"
    # cut short by the cancel: not counted as if ASHA had stopped them
    assert {t["status"] for t in svc.trials(sw["id"])} == {"cancelled"}
    assert done["best"] is None


def test_the_api_restarts_while_a_sweep_runs(service, db_url, api_spec):
    svc = service(db_url)
    sw = svc.submit(api_spec(max_steps=300, trials=2))
    svc.wait(sw["id"], lambda s: any((t["step"] or 0) > 0 for t in svc.trials(s["id"])))
    svc.kill()  # SIGKILL: the driver runs on in its own session
    time.sleep(2)
    svc.start()  # same database, same port
    done = svc.wait(sw["id"], lambda s: s["status"] in FINAL, timeout=300)
    assert done["status"] == "succeeded", svc.driver_log(sw["id"])
    assert done["trial_counts"] == {"finished": 2}
    runs, parent = _runs(svc, done)
    assert {r.info.status for r in runs} == {"FINISHED"} and parent.info.status == "FINISHED"


def test_a_killed_driver_is_interrupted_and_resume_finishes_without_rerunning(
    service, sqlite_url, api_spec
):
    svc = service(sqlite_url)
    spec = api_spec(max_steps=200, trials=4)
    spec["budget"]["max_concurrent"] = 1
    sw = svc.submit(spec)
    sid = sw["id"]
    # one trial finished, the next under way
    svc.wait(
        sid,
        lambda s: (
            s["trial_counts"].get("finished", 0) >= 1 and s["trial_counts"].get("running", 0) >= 1
        ),
    )
    before = {t["id"]: t for t in svc.trials(sid)}
    os.kill(_driver_pid(svc, sid), signal.SIGKILL)
    dead = svc.wait(sid, lambda s: s["status"] in FINAL, timeout=30)
    assert dead["status"] == "interrupted" and "resume" in dead["error"]
    runs, parent = _runs(svc, dead)
    assert "RUNNING" not in {r.info.status for r in runs} and parent.info.status == "KILLED"
    # the service closed the dead driver's runs, saying why: the report leaves them out
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert all(r.data.tags.get("stopped_by") == "interrupted" for r in killed), killed

    r = svc.http.post(f"/sweeps/{sid}/resume")
    assert r.status_code == 202 and r.json()["status"] in ("queued", "running")
    done = svc.wait(sid, lambda s: s["status"] in FINAL, timeout=300)
    assert done["status"] == "succeeded", svc.driver_log(sid)
    after = {t["id"]: t for t in svc.trials(sid)}
    finished = [t for t in after.values() if t["status"] == "finished"]
    # A trial started just before the kill, after Tune's last snapshot, is unknown to the
    # restored Tune: it is marked lost and its configuration runs again as a new trial.
    lost = [t for t in after.values() if t["status"] == "lost"]
    assert len(finished) == 4 and len(finished) + len(lost) == len(after), [
        (t["status"], t["step"], t["error"]) for t in after.values()
    ]
    assert all(t["step"] is None or t["step"] < 200 for t in lost)
    for tid, t in before.items():
        if t["status"] == "finished":  # not run again: same end time
            assert after[tid]["ended"] == t["ended"]
    runs, parent = _runs(svc, done)
    # no trial got a second MLflow run: one FINISHED run per finished trial
    assert sorted(r.info.run_id for r in runs if r.info.status == "FINISHED") == sorted(
        t["mlflow_run_id"] for t in finished
    )
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"}
    assert parent.info.status == "FINISHED"


def _driver_pid(svc, sweep_id: str) -> int:
    from sqlalchemy import create_engine, text

    eng = create_engine(svc.db_url)
    with eng.connect() as c:
        ref = c.execute(text("select driver_ref from sweeps where id = :i"), {"i": sweep_id})
        pid = int(ref.scalar())
    eng.dispose()
    return pid


def test_max_running_sweeps_queues_the_second(service, db_url, api_spec):
    svc = service(db_url, SWEEPER_MAX_RUNNING_SWEEPS="1")
    a = svc.submit(api_spec(name="first", max_steps=40))
    b = svc.submit(api_spec(name="second", max_steps=40))
    svc.wait(a["id"], lambda s: s["status"] == "running")
    assert svc.sweep(b["id"])["status"] == "queued"
    listed = svc.http.get("/sweeps", params={"status": "queued"}).json()
    assert [s["id"] for s in listed["items"]] == [b["id"]] and listed["total"] == 1
    done_a = svc.wait(a["id"], lambda s: s["status"] in FINAL, timeout=300)
    done_b = svc.wait(b["id"], lambda s: s["status"] in FINAL, timeout=300)
    assert done_a["status"] == done_b["status"] == "succeeded"
    assert done_b["started"] >= done_a["ended"]
