"""Fault injection: a trial runs out of memory under a tiny ``resources.memory_gb`` cap."""

from __future__ import annotations

from mlflow import MlflowClient

FINAL = ("succeeded", "failed", "cancelled", "interrupted")


def test_a_trial_out_of_memory_fails_with_its_reason_and_the_sweep_goes_on(
    service, sqlite_url, api_spec
):
    svc = service(sqlite_url)
    spec = api_spec(name="oom", trials=2)
    # A 2M-wide projector needs ~0.5 GB for one weight matrix; a 64-wide one a few kB.
    spec["search"] = {
        "sampler": "grid",
        "space": {"projector_hidden": {"type": "categorical", "choices": [64, 2_000_000]}},
    }
    spec["resources"] = {"cpu": 1, "memory_gb": 0.4}
    spec["failure"] = {"max_failures": 1}  # retried once, out of memory again, then FAILED
    sw = svc.submit(spec)
    done = svc.wait(sw["id"], lambda s: s["status"] in FINAL, timeout=240)
    assert done["status"] == "succeeded", svc.driver_log(sw["id"])
    assert done["trial_counts"] == {"finished": 1, "failed": 1}
    assert done["best"]["params"] == {"projector_hidden": 64}

    trials = {t["params"]["projector_hidden"]: t for t in svc.trials(sw["id"])}
    failed = trials[2_000_000]
    assert failed["status"] == "failed"
    assert "out of memory" in failed["error"] and "memory_gb=0.4" in failed["error"]
    run = MlflowClient(svc.mlflow_uri).get_run(failed["mlflow_run_id"])
    assert run.info.status == "FAILED" and "out of memory" in run.data.tags["error"]
    assert run.data.tags.get("retried") == "1"
    print(
        f"trial OOM: injected a {spec['resources']['memory_gb']} GB cap; "
        f"survived: sweep {done['status']}, trials {done['trial_counts']}; "
        f"reason: {failed['error'][:90]}"
    )
