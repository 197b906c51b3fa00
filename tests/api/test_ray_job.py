"""With RAY_ADDRESS the service runs each sweep's driver as a Ray Job on that cluster."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import httpx

from sweeper.client import SweeperClient
from tests.api.conftest import _free_port


@contextlib.contextmanager
def ray_head(tmp_path):
    """A one-node loopback cluster with its job server (`ray start --head --block`)."""
    gcs, dash = _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    proc = subprocess.Popen(
        [
            "ray",
            "start",
            "--head",
            "--block",
            "--port",
            str(gcs),
            "--dashboard-port",
            str(dash),
            "--dashboard-host",
            "127.0.0.1",
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            "2",
            "--include-dashboard",
            "true",
            "--disable-usage-stats",
            "--temp-dir",
            temp,
        ],
        stdout=open(tmp_path / "ray.log", "wb"),  # noqa: SIM115 - the process keeps it
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=os.environ | {"RAY_AUTH_MODE": "token"},
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/api/version", timeout=2).status_code < 500:
                    break
            assert proc.poll() is None, (tmp_path / "ray.log").read_text()[-3000:]
            time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):  # --block: it stops what it started
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_sweep_runs_as_a_ray_job(service, sqlite_url, api_spec, tmp_path):
    with ray_head(tmp_path) as address:
        svc = service(sqlite_url, RAY_ADDRESS=address, RAY_AUTH_MODE="token")
        sw = svc.submit(api_spec(name="job"))
        kinds = [k for k, _ in SweeperClient(svc.url).events(sw["id"])]
        done = svc.sweep(sw["id"])
        assert done["status"] == "succeeded", (done, svc.log())
        assert done["driver"] == "ray-job" and done["trial_counts"] == {"finished": 2}
        assert "trial_finished" in kinds
        # Ask the cluster in a fresh process: Ray reads RAY_AUTH_MODE when it is imported.
        probe = (
            "import sys; from ray.job_submission import JobSubmissionClient as C; "
            "print(*[f'{j.submission_id} {j.status}' for j in C(sys.argv[1]).list_jobs()])"
        )
        deadline = time.monotonic() + 90  # the job ends once its driver process exits
        while time.monotonic() < deadline:
            out = subprocess.run(
                [sys.executable, "-c", probe, address],
                capture_output=True,
                text=True,
                timeout=60,
                env=os.environ | {"RAY_AUTH_MODE": "token"},
            )
            if "RUNNING" not in out.stdout:
                break
            time.sleep(2)
        assert f"sweep-{sw['id']}" in out.stdout and "SUCCEEDED" in out.stdout, out
