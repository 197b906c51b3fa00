"""The driver's MLflow writer thread: child-run writes queued per trial, retried in order."""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from sweeper import mlflow_retry as retry
from sweeper.mlflow_retry import _LOG, _answered, _short, is_transient

# MLflow's log_batch takes at most 1000 metrics per call.
_MAX_BATCH = 1000

# A write the server answers with a transient error this many times in a row, while it
# takes other writes, is dropped with a warning rather than retried for ever.
_MAX_STRIKES = 20


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
                    self._retry_at = time.monotonic() + retry._BACKOFF_MAX_S
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
            self._retry_at = now + min(
                retry._BACKOFF_FIRST_S * 2 ** (self._fails - 1), retry._BACKOFF_MAX_S
            )

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
