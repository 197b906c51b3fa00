"""MLflow glue: a trainer `report` that writes a run's params and curves in batches, and the
sweep driver's writers, which ride out an MLflow outage (buffer and retry)."""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from ray import tune

from trainer.config import TrainerConfig, flatten_config

# MLflow's log_batch takes at most 1000 metrics per call.
_MAX_BATCH = 1000


class MlflowRun:
    """One MLflow run fed by the trainer's ``report(step, metrics)``.

    Metrics are buffered and written with ``log_batch`` every ``flush_every`` steps, so
    logging costs one round trip per few steps, not one per metric.
    """

    def __init__(self, experiment: str, run_name: str | None = None, flush_every: int = 10):
        self.client = MlflowClient()
        self.experiment_id = _experiment_id(self.client, experiment)
        self.run = self.client.create_run(self.experiment_id, run_name=run_name)
        self.run_id = self.run.info.run_id
        self.flush_every = flush_every
        self._buf: list[Metric] = []
        self._steps = 0

    def log_config(self, cfg: TrainerConfig) -> None:
        params = [Param(k, str(v)) for k, v in flatten_config(cfg).items()]
        self.client.log_batch(self.run_id, params=params)

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        ts = int(time.time() * 1000)
        self._buf.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())
        self._steps += 1
        if self._steps % self.flush_every == 0:
            self.flush()

    def flush(self) -> None:
        while self._buf:
            chunk, self._buf = self._buf[:_MAX_BATCH], self._buf[_MAX_BATCH:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_artifacts(self, directory: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """Flush and close with FINISHED, FAILED or KILLED; never leave a run RUNNING."""
        try:
            self.flush()
        finally:
            self.client.set_terminated(self.run_id, status=status)


def _experiment_id(client: MlflowClient, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as e:  # another sweep made it first
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def init_store(uri: str) -> None:
    """Create a local SQLite store's schema under a file lock.

    Two drivers starting at once on a new store would both create MLflow's tables, and
    one would fail on "table ... already exists".
    """
    if not uri.startswith("sqlite:///"):
        return
    import fcntl

    db = Path(uri.removeprefix("sqlite:///").split("?")[0])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.init-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        MlflowClient(uri).search_experiments(max_results=1)


_LOG = logging.getLogger("sweeper")

# Backoff between tries while MLflow is unreachable: 0.5 s, doubling, at most 5 s.
_BACKOFF_FIRST_S, _BACKOFF_MAX_S = 0.5, 5.0

# MLflow's own HTTP retries inside the driver: one quick retry (a reset connection), no
# long backoff, a request timeout in seconds. Outages are ridden out by our buffering, which
# keeps each write and tries it again later. Set explicitly in the environment, they win.
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def limit_mlflow_http_retries() -> None:
    """MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) can hold one call for
    minutes; the driver asks once and buffers instead (`MLFLOW_HTTP_DEFAULTS`)."""
    for key, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # urllib3 warns at each of its retries; while MLflow is down, ours say it once.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def mlflow_retry_s() -> float:
    """How long the driver keeps trying MLflow without getting a write through, at a sweep's
    end and for each parent-run write (``SWEEPER_MLFLOW_RETRY_S``, default 300 s)."""
    return float(os.environ.get("SWEEPER_MLFLOW_RETRY_S", "300"))


_TRANSIENT_STATUS = frozenset({408, 429})
# A write the server answers with a transient error this many times in a row, while it
# takes other writes, is dropped with a warning rather than retried for ever.
_MAX_STRIKES = 20


def _answered(exc: BaseException) -> bool:
    """The server was reached and answered with an error status (not unreachable)."""
    from mlflow.exceptions import MlflowException, RestException

    return isinstance(exc, RestException) or (
        isinstance(exc, MlflowException) and "failed with error code" in exc.message
    )


def is_transient(exc: BaseException) -> bool:
    """True for an MLflow failure worth trying again: the server unreachable (connection
    refused or reset, a timeout), a 5xx, 408 or 429. False for the rest (a 400 bad request,
    a missing run): retrying those would fail the same way."""
    import requests
    from mlflow.exceptions import MlflowException, RestException

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(
            e,
            requests.exceptions.ConnectionError
            | requests.exceptions.Timeout
            | requests.exceptions.RetryError  # MLflow's own retries ran out on 5xx/429
            | ConnectionError  # refused, reset, aborted
            | TimeoutError,
        ):
            return True
        if type(e).__name__ in ("OperationalError", "DisconnectionError"):  # a SQL store away
            return True
        if isinstance(e, MlflowException) and (
            isinstance(e, RestException) or "failed with error code" in e.message
        ):  # the server answered with an error
            status = e.get_http_status_code()
            return status >= 500 or status in _TRANSIENT_STATUS
        e = e.__cause__ or e.__context__
    return False


def _short(e: BaseException) -> str:
    """One line: the error's type and start, and the OS's reason when it is buried deeper
    (MLflow wraps "[Errno 111] Connection refused" in a long urllib3 message)."""
    text = " ".join(str(e).split())
    short = f"{type(e).__name__}: {text[:160]}"
    reason = re.search(r"\[Errno -?\d+\][^'\")]*|timed out", text)
    if len(text) > 160 and reason:
        short += f" ... {reason.group(0).strip()}"
    return short


def with_retries(fn: Callable[..., Any], *args: Any, until: float | None = None, **kwargs: Any):
    """``fn(*args, **kwargs)``, tried again after transient MLflow errors (`is_transient`)
    with backoff until ``until`` (``time.monotonic()``; default: ``mlflow_retry_s()`` from
    now). Any other error, or a transient one past ``until``, is raised."""
    until = time.monotonic() + mlflow_retry_s() if until is None else until
    delay, warned = _BACKOFF_FIRST_S, False
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not is_transient(e) or time.monotonic() + delay > until:
                raise
            if not warned:
                left = max(0.0, until - time.monotonic())
                _LOG.warning(
                    "MLflow unreachable for %s (%s); retrying for up to %.0f s",
                    getattr(fn, "__name__", "a write"),
                    _short(e),
                    left,
                )
                warned = True
            time.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX_S)


class _NoRun(Exception):
    """A write for a run that could not be created (its create failed for good)."""


class RunWriter:
    """MLflow writes for a sweep's child runs: queued, written by a background thread.

    Writes are kept per run (``key``: the trial id) in order. A write that fails for a
    transient reason (`is_transient`) stays at the head of its queue and is tried again
    after a backoff (0.5 s doubling to 5 s); one that fails for any other reason is logged
    and dropped. The caller (Tune's event loop) only appends, so it never waits on MLflow.

    Operations (plain tuples, so that the unwritten ones pickle with Tune's state):
    ``("open", {"run_name", "tags", "params"})`` creates the run, or reopens the one the
    trial already has; ``("metrics", [(key, value, timestamp_ms, step), ...], upto)``
    writes points and the ``last_step`` tag (``upto``); ``("tag", key, value)``;
    ``("end", status)``. Consecutive metric writes of a run go out as one ``log_batch``.
    Every write is idempotent, so one retried after its answer was lost does no harm:
    MLflow ignores a point logged twice with the same timestamp, and an ``open`` looks for
    the trial's run before it creates one.

    ``run_ids`` (trial id -> run id) and ``logged`` (trial id -> last step written) are the
    caller's dicts, updated here as writes succeed.
    """

    def __init__(
        self,
        client_factory: Callable[[], MlflowClient],
        experiment_id: str,
        parent_run_id: str,
        run_ids: dict[str, str],
        logged: dict[str, int],
    ):
        self._client_factory = client_factory
        self._client: MlflowClient | None = None
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        self.run_ids, self.logged = run_ids, logged
        self.final: set[str] = set()  # runs FINISHED before a restore: their writes dropped
        self._queues: dict[str, deque] = {}
        self._single: set[str] = set()  # runs whose next writes go one at a time
        self._strikes: dict[str, int] = {}  # transient errors in a row, by run, server up
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._busy = False
        self._closed = False
        self._retry_at = 0.0
        self._fails = 0  # transient failures in a row
        self._down_since: float | None = None
        self.written = self.retried = self.dropped = 0
        self.unreachable_s = 0.0
        self.last_error = ""

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    # ---- the caller's side ----

    def put(self, key: str, op: tuple) -> None:
        with self._cv:
            self._queues.setdefault(key, deque()).append(op)
            if not self._closed and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(
                    target=self._loop, name="mlflow-writer", daemon=True
                )
                self._thread.start()
            self._cv.notify_all()

    def has(self, key: str) -> bool:
        with self._cv:
            return bool(self._queues.get(key))

    def snapshot(self) -> dict[str, Any]:
        """Run ids, steps written and the writes not yet done, consistent with each other."""
        with self._cv:
            return {
                "run_ids": dict(self.run_ids),
                "logged": dict(self.logged),
                "pending": {k: list(q) for k, q in self._queues.items() if q},
            }

    def drain(self, timeout: float) -> bool:
        """Wait until every write is done (True), or until ``timeout`` seconds have passed
        without MLflow taking one (False): a long queue written at MLflow's pace after an
        outage is waited for, a server that stays away is not."""
        start = time.monotonic()
        deadline, told, written = start + timeout, start, self.written
        with self._cv:
            self._cv.notify_all()
            while any(self._queues.values()) or self._busy:
                now = time.monotonic()
                if self.written != written:  # progress: the wait starts again
                    deadline, written = now + timeout, self.written
                if now >= deadline or (self._closed and not self._busy):
                    return False
                if now - told >= 30:
                    told = now
                    _LOG.warning(
                        "waiting for MLflow: %d writes not done after %.0f s (gives up after "
                        "%.0f s without one written, SWEEPER_MLFLOW_RETRY_S); %s",
                        self._count(),
                        now - start,
                        timeout,
                        f"unreachable: {self.last_error}"
                        if self._down_since is not None
                        else "reachable, writing",
                    )
                self._cv.wait(min(deadline - now, 1.0))
        return True

    def close(self) -> None:
        """Stop the thread; writes not done stay queued (and in `snapshot`)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def stats(self) -> dict[str, Any]:
        with self._cv:
            ops = [op for q in self._queues.values() for op in q]
            down = time.monotonic() - self._down_since if self._down_since is not None else 0.0
            return {
                "written": self.written,
                "retried": self.retried,
                "dropped": self.dropped,
                "unwritten": len(ops),
                "unwritten_points": sum(len(op[1]) for op in ops if op[0] == "metrics"),
                "unwritten_runs": sum(1 for q in self._queues.values() if q),
                "unreachable_s": round(self.unreachable_s + down, 1),
                "last_error": self.last_error,
            }

    def _count(self) -> int:
        return sum(len(q) for q in self._queues.values())

    # ---- the thread's side ----

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not (
                    any(self._queues.values()) and time.monotonic() >= self._retry_at
                ):
                    wait = self._retry_at - time.monotonic() if any(self._queues.values()) else None
                    self._cv.wait(None if wait is None else max(wait, 0.01))
                if self._closed:
                    return
                keys = [k for k, q in self._queues.items() if q]
                self._busy = True
            try:
                self._round(keys)
            except Exception:  # a bug here must not stop the thread with writes queued
                _LOG.exception("MLflow writer")
                with self._cv:
                    self._retry_at = time.monotonic() + _BACKOFF_MAX_S
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _round(self, keys: list[str]) -> None:
        """One write (or one merged batch) per run; stops at the first transient failure."""
        for key in keys:
            with self._cv:
                q = self._queues.get(key)
                if not q:
                    continue
                batch = self._batch(key, q)
            try:
                run_id = self._write(key, batch)
            except Exception as e:
                if is_transient(e) and not _answered(e):  # unreachable: all would fail
                    self._failed(e)
                    return
                if is_transient(e):  # the server answered 5xx/408/429 to this write
                    strikes = self._strikes[key] = self._strikes.get(key, 0) + 1
                    if strikes < _MAX_STRIKES:
                        self._failed(e)
                        continue  # the other runs' writes go on
                    _LOG.warning("MLflow refused a write %d times in a row", strikes)
                if len(batch) > 1:  # find the bad one: this run's writes go one at a time
                    with self._cv:
                        self._single.add(key)
                    continue
                self.dropped += 1
                _LOG.warning(
                    "MLflow write %s for trial %s dropped: %s", batch[0][0], key, _short(e)
                )
                run_id = None
            else:
                self._succeeded()
                self.written += len(batch)
            self._strikes.pop(key, None)
            with self._cv:
                for _ in batch:
                    q.popleft()
                if run_id is not None:
                    self.run_ids[key] = run_id
                upto = [op[2] for op in batch if op[0] == "metrics"]
                if upto and key not in self.final:
                    self.logged[key] = max([self.logged.get(key, 0), *upto])
                if not q:
                    self._single.discard(key)

    def _batch(self, key: str, q: deque) -> list[tuple]:
        head = q[0]
        if head[0] != "metrics" or key in self._single:
            return [head]
        batch, n = [head], len(head[1])
        for op in itertools.islice(q, 1, None):
            if op[0] != "metrics" or n + len(op[1]) > _MAX_BATCH:
                break
            batch.append(op)
            n += len(op[1])
        return batch

    def _write(self, key: str, batch: list[tuple]) -> str | None:
        op = batch[0]
        if key in self.final:
            return None  # finished before a restore: replayed writes are left out
        if op[0] == "open":
            return self._open(key, op[1])
        run_id = self.run_ids.get(key)
        if run_id is None:
            raise _NoRun(f"no MLflow run for trial {key}")
        if op[0] == "metrics":
            points = [Metric(k, v, ts, s) for o in batch for (k, v, ts, s) in o[1]]
            # The last step logged rides along as a tag: a report reads it without histories.
            tags = [RunTag("last_step", str(batch[-1][2]))]
            for i in range(0, max(len(points), 1), _MAX_BATCH):
                last = i + _MAX_BATCH >= len(points)
                self.client.log_batch(
                    run_id, metrics=points[i : i + _MAX_BATCH], tags=tags if last else []
                )
        elif op[0] == "tag":
            self.client.set_tag(run_id, op[1], op[2])
        elif op[0] == "end":
            self.client.set_terminated(run_id, status=op[1])
        else:
            raise ValueError(f"unknown MLflow write {op[0]!r}")
        return None

    def _open(self, key: str, how: dict[str, Any]) -> str:
        run_id = self.run_ids.get(key)
        if run_id is None:  # restored from an older snapshot, or a create whose answer was lost
            found = self.client.search_runs(
                [self.experiment_id],
                f"tags.mlflow.parentRunId = '{self.parent_run_id}' and tags.trial_id = '{key}'",
            )
            run_id = found[0].info.run_id if found else None
        if run_id is not None:  # a restored or retried trial keeps its run
            run = self.client.get_run(run_id)
            if run.info.status == "FINISHED":
                # It finished after Tune's last snapshot: the restored Tune only replays
                # its final evaluation, which is logged already.
                self.final.add(key)
                return run_id
            if "stopped_by" in run.data.tags:  # it runs on: what stopped it is past
                self.client.delete_tag(run_id, "stopped_by")
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                self.experiment_id, run_name=how["run_name"], tags=how["tags"]
            )
            run_id = run.info.run_id
            with self._cv:
                self.run_ids[key] = run_id  # a retry of the params below needs no search
        params = [Param(k, v) for k, v in how["params"].items()]
        self.client.log_batch(run_id, params=params)  # the same values again: a no-op
        return run_id

    def _failed(self, e: BaseException) -> None:
        now = time.monotonic()
        self.retried += 1
        self._fails += 1
        self.last_error = _short(e)
        if self._down_since is None:
            self._down_since = now
            _LOG.warning(
                "MLflow unreachable (%s): keeping its writes (%d queued) and retrying",
                self.last_error,
                self._count(),
            )
        with self._cv:
            self._retry_at = now + min(_BACKOFF_FIRST_S * 2 ** (self._fails - 1), _BACKOFF_MAX_S)

    def _succeeded(self) -> None:
        if self._down_since is not None:
            down = time.monotonic() - self._down_since
            self.unreachable_s += down
            self._down_since = None
            _LOG.warning(
                "MLflow reachable again after %.1f s: writing the %d queued writes",
                down,
                self._count(),
            )
        self._fails = 0


# The last sweep end's MLflow write figures, by sweep id (RunWriter.stats plus "drained"):
# the driver reads them in the process the logger ran in.
WRITES: dict[str, dict[str, Any]] = {}


class SweepParentRun:
    """The sweep's parent run: the spec as an artifact, the best configuration when done.

    Each write is tried again through a transient MLflow outage (`with_retries`) until
    ``until`` (``time.monotonic()``; None: ``SWEEPER_MLFLOW_RETRY_S`` from each write).
    ``offline`` (MLflow stayed unreachable to the end): one try per write, failures logged.
    """

    def __init__(self, client: MlflowClient, run_id: str, experiment_id: str):
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id
        self.until: float | None = None
        self.offline = False

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any):
        if not self.offline:
            return with_retries(fn, *args, until=self.until, **kwargs)
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            _LOG.warning("MLflow %s on the parent run skipped: %s", fn.__name__, _short(e))
            return None

    @classmethod
    def open(cls, spec, rec) -> SweepParentRun:
        """Create the parent run, or reopen the one a resumed sweep already has."""
        init_store(mlflow_uri())
        client = MlflowClient()
        ids = rec.read().get("mlflow") or {}
        if ids.get("parent_run_id"):
            with_retries(client.update_run, ids["parent_run_id"], status="RUNNING")
            return cls(client, ids["parent_run_id"], ids["experiment_id"])
        from sweeper.search import sampler_arguments

        exp_id = with_retries(_experiment_id, client, spec.experiment)
        run_id = with_retries(_parent_run, client, exp_id, rec.id)
        with_retries(client.log_artifact, run_id, str(rec.path / "spec.yaml"))
        with_retries(
            client.log_batch,
            run_id,
            params=[
                Param("sampler", spec.search.sampler),
                Param("trials", str(spec.budget.trials)),
                Param("repeats", str(spec.repeats)),
                Param("objective", ", ".join(f"{o.mode} {o.metric}" for o in spec.objectives)),
                # the sampler's arguments in force, sweeper's defaults included
                *(
                    Param(f"sampler.{k}", str(v))
                    for k, v in sorted(sampler_arguments(spec).items())
                ),
            ],
        )
        rec.update(
            mlflow={"experiment_id": exp_id, "parent_run_id": run_id, "tracking_uri": mlflow_uri()}
        )
        return cls(client, run_id, exp_id)

    def log_best(self, best: dict | None) -> None:
        if not best:
            return
        params = [Param(f"best.{k}", str(v)) for k, v in best["params"].items()]
        metric = Metric(f"best/{best['metric']}", float(best["value"]), int(time.time() * 1000), 0)
        self._call(self.client.log_batch, self.run_id, metrics=[metric], params=params)
        self._call(self.client.set_tag, self.run_id, "best_trial_ids", ",".join(best["trial_ids"]))
        if best.get("pareto") is not None:  # a multi-objective sweep: its Pareto set too
            front = best["pareto"]
            ids = ",".join(t for c in front for t in c["trial_ids"])
            self._call(self.client.set_tag, self.run_id, "pareto_trial_ids", ids)
            self._call(self.client.log_dict, self.run_id, front, "pareto.json")

    def end(self, status: str, children_stopped_by: str = "interrupted") -> None:
        """End the parent and any child still RUNNING as KILLED, tagged ``stopped_by``: an
        ``interrupted`` trial (resume continues it) or one a ``cancel`` cut short."""
        children = self._call(
            self.client.search_runs,
            [self.experiment_id],
            f"tags.mlflow.parentRunId = '{self.run_id}' and attributes.status = 'RUNNING'",
        )
        for child in children or []:
            run_id = child.info.run_id
            self._call(self.client.set_tag, run_id, "stopped_by", children_stopped_by)
            self._call(self.client.set_terminated, run_id, status="KILLED")
        self._call(self.client.set_terminated, self.run_id, status=status)


def _parent_run(client: MlflowClient, exp_id: str, sweep_id: str) -> str:
    """The sweep's parent run, created once: a create retried after its answer was lost
    finds the run it made."""
    found = client.search_runs(
        [exp_id], f"tags.sweep_id = '{sweep_id}' and attributes.run_name = '{sweep_id}'"
    )
    found = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    if found:
        return found[0].info.run_id
    return client.create_run(exp_id, run_name=sweep_id, tags={"sweep_id": sweep_id}).info.run_id


def mlflow_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


class MlflowTrialLogger(tune.Callback):
    """One MLflow child run per Tune trial, written from the driver.

    Each Tune report carries an evaluation and the steps since the last one (``history``),
    written with one ``log_batch``: the trial itself never waits on MLflow.

    Runs live in the driver because code after a trial's last report may never run: the
    driver sees every result and every end (finished, stopped by ASHA, failed), so it is
    the one place that can close each run FINISHED, KILLED or FAILED.

    Tune's event loop never calls MLflow: each write goes to a `RunWriter`, whose thread
    writes it and, while MLflow is unreachable, keeps it and tries again. At the end of the
    experiment the logger waits for every write to be done, giving up once MLflow has taken
    none for ``SWEEPER_MLFLOW_RETRY_S``; the sweep then says what is missing.
    """

    def __init__(self, spec, parent: SweepParentRun, sweep_dir: str):
        self.spec, self.sweep_id = spec, Path(sweep_dir).name
        from sweeper.store import SweepRecord

        self.cancel_file = str(SweepRecord(Path(sweep_dir)).cancel_file)
        self.parent_run_id, self.experiment_id = parent.run_id, parent.experiment_id
        self.tracking_uri = mlflow_uri()
        self.run_ids: dict[str, str] = {}
        # Last step written to MLflow per trial: a trial restored from an earlier checkpoint
        # replays steps already in MLflow, and each step is logged once. Only written steps
        # count; the queued ones are saved with Tune's state as writes still to do.
        self.logged: dict[str, int] = {}
        self._runtime()

    def _runtime(self) -> None:
        self._writer = RunWriter(
            lambda: MlflowClient(self.tracking_uri),
            self.experiment_id,
            self.parent_run_id,
            self.run_ids,
            self.logged,
        )
        self._queued: dict[str, int] = {}  # last step handed to the writer, per trial
        self._opened: set[str] = set()
        self._ended: set[str] = set()

    def __getstate__(self):  # Tune pickles callbacks with its experiment state
        state = self.__dict__.copy()
        for k in ("_writer", "_queued", "_opened", "_ended"):
            state.pop(k, None)
        return state

    def __setstate__(self, state):
        if "cancel_file" not in state:  # pickled by a version without it
            from sweeper.store import SweepRecord, home

            state["cancel_file"] = str(SweepRecord(home() / state["sweep_id"]).cancel_file)
        self.__dict__.update(state)
        self._runtime()

    def get_state(self) -> dict:  # saved with Tune's experiment state, back on restore
        return self._writer.snapshot()

    def set_state(self, state: dict) -> None:
        self.run_ids.update(state.get("run_ids", {}))
        self.logged.update(state.get("logged", {}))
        # Writes MLflow had not taken when the state was saved: done first, in order.
        for key, ops in (state.get("pending") or {}).items():
            for op in ops:
                self._writer.put(key, tuple(op))
                if op[0] == "metrics":
                    self._queued[key] = max(self._queued.get(key, 0), op[2])

    def _known(self, trial_id: str) -> bool:
        return trial_id in self.run_ids or trial_id in self._opened or self._writer.has(trial_id)

    def _open(self, trial) -> None:
        from sweeper.driver import trial_config

        cfg = trial_config(self.spec, trial.config)
        shown = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in trial.config.items()
            if k in self.spec.search.space
        )
        how = {
            "run_name": f"{trial.trial_id} {shown} seed={cfg.seed}".strip(),
            "tags": {
                "mlflow.parentRunId": self.parent_run_id,
                "trial_id": trial.trial_id,
                "sweep_id": self.sweep_id,
            },
            "params": {k: str(v) for k, v in flatten_config(cfg).items()},
        }
        self._writer.put(trial.trial_id, ("open", how))
        self._opened.add(trial.trial_id)
        self._ended.discard(trial.trial_id)

    def _end(self, trial, status: str) -> None:
        if not self._known(trial.trial_id):
            return
        self._writer.put(trial.trial_id, ("end", status))
        self._ended.add(trial.trial_id)

    def _end_early_or_not(self, trial, at_end: bool = False) -> None:
        """Close a trial that ended without error: FINISHED at its max_steps, else KILLED
        with a ``stopped_by`` tag (scheduler, time_budget, cancel or interrupted) that says
        whether its figures count (the report leaves cancelled and interrupted ones out)."""
        from sweeper.driver import stopped_by

        cause = stopped_by(self.spec, trial, self.cancel_file, at_end)
        if cause != "max_steps" and self._known(trial.trial_id):
            self._writer.put(trial.trial_id, ("tag", "stopped_by", cause))
        self._end(trial, "FINISHED" if cause == "max_steps" else "KILLED")

    def on_trial_start(self, iteration, trials, trial, **info):
        self._open(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        tid = trial.trial_id
        if tid not in self._opened:
            self._open(trial)
        ts, step = int(time.time() * 1000), int(result.get("step", 0))
        done = max(self._queued.get(tid, 0), self.logged.get(tid, 0))
        points = [
            (k, float(v), ts, s)
            for s, metrics in result.get("history", [])
            if s > done
            for k, v in metrics.items()
        ]
        if step > done:
            points += [
                (k, float(v), ts, step)
                for k, v in result.items()
                if k.startswith("val/") and isinstance(v, int | float)
            ]
        self._queued[tid] = max(done, step)
        # one log_batch per report (an eval's worth of steps), more merged after an outage
        self._writer.put(tid, ("metrics", points, self._queued[tid]))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end_early_or_not(trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        if self._known(trial.trial_id):
            self._writer.put(trial.trial_id, ("tag", "retried", str(trial.num_failures)))

    def on_trial_error(self, iteration, trials, trial, **info):
        if self._known(trial.trial_id):
            self._writer.put(trial.trial_id, ("tag", "error", error_text(trial)))
        self._end(trial, "FAILED")

    def on_experiment_end(self, trials, **info):
        from ray.tune.experiment import Trial

        # A time budget, a cancel or an interrupt ends trials without on_trial_complete:
        # close their runs here.
        for trial in trials:
            if trial.status == Trial.TERMINATED and trial.trial_id not in self._ended:
                self._end_early_or_not(trial, at_end=True)
        wait = mlflow_retry_s()
        drained = self._writer.drain(wait)
        self._writer.close()  # its thread ends; writes not done stay queued (and saved)
        stats = self._writer.stats() | {"drained": drained, "waited_up_to_s": wait}
        WRITES[self.sweep_id] = stats
        if drained:
            _LOG.info(
                "sweep %s: MLflow writes %d, retried %d, dropped %d, unreachable %.1f s",
                self.sweep_id,
                stats["written"],
                stats["retried"],
                stats["dropped"],
                stats["unreachable_s"],
            )
        else:
            _LOG.error(
                "sweep %s: MLflow at %s unreachable: %d writes (%d metric points) for %d "
                "trials not written: none got through in %g s (SWEEPER_MLFLOW_RETRY_S); "
                "last error: %s",
                self.sweep_id,
                self.tracking_uri,
                stats["unwritten"],
                stats["unwritten_points"],
                stats["unwritten_runs"],
                wait,
                stats["last_error"],
            )


def error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "trial failed")[:500]
