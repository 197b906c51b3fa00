"""Starting a sweep's driver as a Ray Job, against a job server that loses answers.

The job server is a fake with the real SDK's behaviour (``submit_job`` with a chosen
``submission_id``; ``get_job_status`` raises ``RuntimeError("Request failed with status
code 404: ...")`` for an unknown job); the database is a real SQLite one.
"""

from __future__ import annotations

import time

import pytest
from ray.job_submission import JobStatus

from api.db import Database, Sweep
from api.launcher import Launcher
from api.settings import Settings


class FakeJobs:
    """The cluster's job table, shared by every client the launcher makes."""

    def __init__(self):
        self.jobs: dict[str, JobStatus] = {}
        self.submitted_while_recorded: list[bool] = []
        self.lose_answer = False  # create the job, then fail as a dropped connection does
        self.refuse = False  # fail before creating it
        self.unreachable = False
        self.db: Database | None = None

    def client(self, address: str) -> FakeJobs:
        return self

    def submit_job(self, entrypoint: str, submission_id: str, runtime_env: dict) -> str:
        with self.db.session() as s:  # what the service had recorded when the job was made
            refs = [sw.driver_ref for sw in s.query(Sweep)]
        self.submitted_while_recorded.append(submission_id in refs)
        if self.refuse:
            raise ConnectionError("connection refused")
        self.jobs[submission_id] = JobStatus.RUNNING
        if self.lose_answer:
            raise ConnectionError("connection reset by peer")
        return submission_id

    def get_job_status(self, job_id: str) -> JobStatus:
        if self.unreachable:
            raise ConnectionError("connection refused")
        if job_id not in self.jobs:
            raise RuntimeError(f"Request failed with status code 404: Job {job_id} does not exist.")
        return self.jobs[job_id]


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    jobs = FakeJobs()
    monkeypatch.setattr("ray.job_submission.JobSubmissionClient", jobs.client)
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    jobs.db = db
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")  # a job server: drivers are jobs
    settings = Settings(home=tmp_path / "home")
    assert settings.ray_address
    now = time.time()
    with db.session() as s:
        s.add(Sweep(id="sw", name="sw", status="queued", spec={}, created=now, updated=now))
    return jobs, db, settings


def _sweep(db: Database) -> Sweep:
    with db.session() as s:
        return s.get(Sweep, "sw")


def test_the_job_id_is_recorded_before_the_job_exists(cluster):
    jobs, db, settings = cluster
    Launcher(db, settings).reconcile()  # queued -> running, its job submitted
    sw = _sweep(db)
    assert sw.status == "running" and sw.driver == "ray-job"
    assert jobs.submitted_while_recorded == [True] and list(jobs.jobs) == [sw.driver_ref]
    # A restarted service (a new launcher) finds the job through the database and leaves
    # the sweep running: no "interrupted", so no resume can start a second driver.
    Launcher(db, settings).reconcile()
    assert _sweep(db).status == "running" and len(jobs.jobs) == 1


def test_a_submit_whose_answer_was_lost_keeps_the_job_it_made(cluster):
    jobs, db, settings = cluster
    jobs.lose_answer = True
    Launcher(db, settings).reconcile()
    sw = _sweep(db)
    assert sw.status == "running" and sw.error is None, sw.error
    assert list(jobs.jobs) == [sw.driver_ref]


def test_a_refused_submit_fails_the_sweep_with_its_error(cluster):
    jobs, db, settings = cluster
    jobs.refuse = True
    Launcher(db, settings).reconcile()
    sw = _sweep(db)
    assert sw.status == "failed" and "connection refused" in sw.error and not jobs.jobs


def test_a_recorded_job_that_was_never_made_is_interrupted_then_resumes_once(cluster):
    jobs, db, settings = cluster
    Launcher(db, settings).reconcile()
    first = _sweep(db).driver_ref
    del jobs.jobs[first]  # the service died between recording the id and submitting
    jobs.unreachable = True  # while the cluster does not answer, nothing is declared dead
    Launcher(db, settings).reconcile()
    assert _sweep(db).status == "running"
    jobs.unreachable = False
    Launcher(db, settings).reconcile()
    sw = _sweep(db)
    assert sw.status == "interrupted" and "resume continues it" in sw.error
    with db.session() as s:  # what POST /sweeps/{id}/resume does
        s.get(Sweep, "sw").status, s.get(Sweep, "sw").resume = "queued", True
    Launcher(db, settings).reconcile()
    sw = _sweep(db)
    assert sw.status == "running" and sw.driver_ref != first and list(jobs.jobs) == [sw.driver_ref]
