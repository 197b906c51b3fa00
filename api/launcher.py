"""Starting sweep drivers, watching them, and the queue (``SWEEPER_MAX_RUNNING_SWEEPS``).

A driver is ``python -m api.runner ID``: a local subprocess in its own session by default
(so it outlives an API restart), or a Ray Job when ``RAY_ADDRESS`` names a cluster's
job-submission address. :meth:`Launcher.reconcile` runs at start-up and every second:
a sweep marked running whose driver is gone becomes ``interrupted`` (its MLflow runs are
closed KILLED; ``resume`` continues it) and queued sweeps start while there is room.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import select, update

from api.db import Database, Sweep, TrialRow, db_unavailable, sweep_summary
from api.settings import Settings

log = logging.getLogger("sweeper.api")

ACTIVE = ("running",)


class Launcher:
    def __init__(self, db: Database, settings: Settings):
        self.db, self.settings = db, settings
        self.procs: dict[str, subprocess.Popen] = {}  # drivers this process started
        self.host = socket.gethostname()

    # ---- starting -------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = os.environ.copy()
        env["SWEEPER_HOME"] = str(self.settings.home.resolve())
        env["SWEEPER_DATABASE_URL"] = self.db.url
        env.pop("RAY_ADDRESS", None)  # a local driver starts its own local Ray
        return env

    def _claim(self, sweep_id: str) -> bool:
        """queued -> running, only if it is still queued (a cancel may have come first)."""
        now = time.time()
        with self.db.session() as s:
            res = s.execute(
                update(Sweep)
                .where(Sweep.id == sweep_id, Sweep.status == "queued")
                .values(
                    status="running",
                    updated=now,
                    started=now,
                    error=None,
                    driver=None,
                    driver_ref=None,
                )
            )
            if res.rowcount != 1:
                return False
            sw = s.get(Sweep, sweep_id)
            s.refresh(sw)
            self.db.add_event(s, sweep_id, "sweep", sweep_summary(s, sw))
        return True

    def start(self, sweep_id: str) -> None:
        if not self._claim(sweep_id):
            return
        if self.settings.ray_address:
            self._start_ray_job(sweep_id)
            return
        work = self.settings.home.resolve() / sweep_id
        work.mkdir(parents=True, exist_ok=True)
        with open(work / "driver.log", "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "api.runner", sweep_id],
                env=self._env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # an API restart or Ctrl-C leaves the driver running
                cwd=os.getcwd(),
            )
        self.procs[sweep_id] = proc
        self._mark_started(sweep_id, "local", str(proc.pid))
        log.info("sweep %s: driver pid %s", sweep_id, proc.pid)

    def _start_ray_job(self, sweep_id: str) -> None:
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(self.settings.ray_address)
        # The job sees the service's SWEEPER_*/MLFLOW_*/HF_* settings (not its token).
        env = {
            k: v
            for k, v in os.environ.items()
            if k.startswith(("SWEEPER_", "MLFLOW_", "HF_")) and k != "SWEEPER_API_TOKEN"
        }
        env |= {
            "SWEEPER_HOME": str(self.settings.home.resolve()),
            "SWEEPER_DATABASE_URL": self.db.url,
            "SWEEPER_DRIVER_KIND": "ray-job",
        }
        # The job's id is recorded before the job exists. Recorded after, a database that
        # dropped in between left a running job the service did not know of: the sweep
        # looked dead, went "interrupted", and a resume started a second driver on it.
        # Recorded first, a job that never got submitted answers 404 and the sweep goes
        # "interrupted" at the next reconcile, with nothing running.
        job_id = f"sweep-{sweep_id}-{time.time_ns()}"
        self._mark_started(sweep_id, "ray-job", job_id)
        try:
            client.submit_job(
                entrypoint=f"python -m api.runner {sweep_id}",
                submission_id=job_id,
                runtime_env={"env_vars": env},
            )
        except Exception:
            # The answer may be lost after the job was created: then it runs, and the
            # sweep is its. Otherwise the sweep fails with the submit's error.
            try:
                exists = _job_status(client, job_id) is not None
            except Exception:  # the cluster does not answer: the job is taken as not made
                exists = False
            if not exists:
                raise
            log.warning(
                "sweep %s: submit of Ray job %s failed, but the job exists", sweep_id, job_id
            )
        log.info("sweep %s: Ray job %s", sweep_id, job_id)

    def _mark_started(self, sweep_id: str, driver: str, ref: str) -> None:
        with self.db.session() as s:
            sw = s.get(Sweep, sweep_id)
            sw.driver, sw.driver_ref, sw.driver_host = driver, ref, self.host

    # ---- watching -------------------------------------------------------------------
    def alive(self, sw: Sweep) -> bool:
        if sw.driver == "ray-job":
            return self._job_alive(sw.driver_ref)
        proc = self.procs.get(sw.id)
        if not sw.driver_ref:
            # Started here, but the database went away before its pid was recorded.
            return proc is not None and proc.poll() is None
        if proc is not None and str(proc.pid) == sw.driver_ref:
            return proc.poll() is None
        if sw.driver_host and sw.driver_host != self.host:
            return True  # another machine's process: not ours to judge
        return _pid_runs_driver(int(sw.driver_ref), sw.id)

    def _job_alive(self, job_id: str | None) -> bool:
        if not job_id or not self.settings.ray_address:
            return False
        from ray.job_submission import JobStatus, JobSubmissionClient

        try:
            status = _job_status(JobSubmissionClient(self.settings.ray_address), job_id)
        except Exception as e:  # the cluster is unreachable: don't declare the job dead
            log.warning("Ray job %s: status unknown (%s)", job_id, e)
            return True
        # None: no such job (its submit never got through)
        return status in (JobStatus.PENDING, JobStatus.RUNNING)

    def reconcile(self) -> None:
        """Mark sweeps whose driver died interrupted; start queued sweeps while there is room."""
        for sweep_id, proc in list(self.procs.items()):
            if proc.poll() is not None:  # reap it
                del self.procs[sweep_id]
        with self.db.session() as s:
            running = s.scalars(select(Sweep).where(Sweep.status.in_(ACTIVE))).all()
        for sw in running:
            if not self.alive(sw):
                self._driver_died(sw)
        with self.db.session() as s:
            n_running = len(s.scalars(select(Sweep.id).where(Sweep.status.in_(ACTIVE))).all())
            queued = s.scalars(
                select(Sweep.id).where(Sweep.status == "queued").order_by(Sweep.created)
            ).all()
        for sweep_id in queued[: max(0, self.settings.max_running_sweeps - n_running)]:
            try:
                self.start(sweep_id)
            except Exception as e:
                if db_unavailable(e):
                    raise  # not the sweep's fault: the scheduler retries when the database is back
                log.exception("sweep %s: driver did not start", sweep_id)
                self.db.set_status(sweep_id, "failed", error=f"driver did not start: {e}")

    def _driver_died(self, sw: Sweep) -> None:
        status = "cancelled" if sw.cancel_requested else "interrupted"
        why = (
            None
            if sw.cancel_requested
            else (
                f"driver ({sw.driver} {sw.driver_ref}) ended without finishing the sweep; "
                "resume continues it"
            )
        )
        with self.db.session() as s:
            # The driver may have written its own end just before it exited.
            if s.get(Sweep, sw.id).status != "running":
                return
        _close_mlflow_runs(sw)  # before the new status shows: no run is left RUNNING then
        now = time.time()
        with self.db.session() as s:
            res = s.execute(
                update(Sweep)
                .where(
                    Sweep.id == sw.id,
                    Sweep.status == "running",
                    Sweep.driver_ref == sw.driver_ref,
                )
                .values(status=status, error=why, ended=now, updated=now)
            )
            if res.rowcount != 1:
                return
            # its unfinished trials continue from their checkpoints on resume
            s.execute(
                update(TrialRow)
                .where(TrialRow.sweep_id == sw.id, TrialRow.status.in_(("running", "retrying")))
                .values(status="cancelled" if sw.cancel_requested else "paused")
            )
            fresh = s.get(Sweep, sw.id)
            s.refresh(fresh)
            self.db.add_event(s, sw.id, "sweep", sweep_summary(s, fresh))
        log.warning("sweep %s: driver gone; now %s", sw.id, status)


def _job_status(client, job_id: str):
    """The Ray job's status, or None when the cluster has no such job (HTTP 404); any other
    error (the cluster unreachable) is raised."""
    try:
        return client.get_job_status(job_id)
    except RuntimeError as e:  # the job SDK's answer to an error status
        if "status code 404" in str(e):
            return None
        raise


def _pid_runs_driver(pid: int, sweep_id: str) -> bool:
    """Is ``pid`` a live (not zombie) ``api.runner`` process for this sweep?"""
    proc = Path(f"/proc/{pid}")
    try:
        cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
        return False
    return state != "Z" and b"api.runner" in cmdline and sweep_id.encode() in cmdline


def _close_mlflow_runs(sw: Sweep) -> None:
    """End the sweep's parent run and any child left RUNNING as KILLED (a dead driver's),
    tagged with what stopped it (the report leaves such half-trained trials out)."""
    if not sw.parent_run_id:
        return
    try:
        from mlflow import MlflowClient

        client = MlflowClient(sw.tracking_uri) if sw.tracking_uri else MlflowClient()
        runs = client.search_runs(
            [sw.experiment_id],
            f"tags.mlflow.parentRunId = '{sw.parent_run_id}' and attributes.status = 'RUNNING'",
        )
        cause = "cancel" if sw.cancel_requested else "interrupted"
        for r in runs:
            client.set_tag(r.info.run_id, "stopped_by", cause)
            client.set_terminated(r.info.run_id, status="KILLED")
        client.set_terminated(sw.parent_run_id, status="KILLED")
    except Exception as e:
        log.warning("sweep %s: could not close its MLflow runs: %s", sw.id, e)
