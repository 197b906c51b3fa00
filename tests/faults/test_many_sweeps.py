"""Fault injection: 20 sweeps submitted at once against a limit of 2 running sweeps."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

FINAL = ("succeeded", "failed", "cancelled", "interrupted")


def test_twenty_sweeps_at_once_all_finish_none_lost_or_duplicated(service, pg_url, api_spec):
    svc = service(pg_url, SWEEPER_MAX_RUNNING_SWEEPS="2")
    spec = api_spec(name="burst", trials=1, max_steps=10)
    spec["trainer"]["eval_every"] = 10
    t0 = time.monotonic()
    with ThreadPoolExecutor(20) as pool:  # all at once, as 20 users would
        ids = list(pool.map(lambda i: svc.submit(spec | {"name": f"burst-{i}"})["id"], range(20)))
    assert len(set(ids)) == 20

    most_running = 0
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        items = svc.http.get("/sweeps", params={"limit": 100}).json()["items"]
        mine = [s for s in items if s["id"] in ids]
        most_running = max(most_running, sum(s["status"] == "running" for s in mine))
        if len(mine) == 20 and all(s["status"] in FINAL for s in mine):
            break
        time.sleep(1)
    took = time.monotonic() - t0
    assert len(mine) == 20 and {s["id"] for s in mine} == set(ids)
    assert {s["status"] for s in mine} == {"succeeded"}, [(s["id"], s["error"]) for s in mine]
    assert all(s["trial_counts"] == {"finished": 1} for s in mine)
    assert most_running <= 2  # the limit held
    listed = svc.http.get("/sweeps", params={"limit": 100}).json()
    assert listed["total"] == 20  # none duplicated
    print(
        f"20 sweeps at once: limit 2 running (at most {most_running} seen); "
        f"20/20 succeeded, 20 trials, 0 lost, 0 duplicated, {took:.0f} s"
    )
