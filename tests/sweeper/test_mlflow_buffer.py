"""The driver's MLflow buffer (``sweeper.tracking.RunWriter``) against an MLflow that fails.

An in-memory MlflowClient that refuses N calls (the way a stopped server does), loses
answers, or rejects a bad write; then the logger's Tune state across a driver restart.
"""

from __future__ import annotations

import pickle
import re
import socket
import threading
import time
from types import SimpleNamespace

import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException

from sweeper import mlflow_retry as tracking
from sweeper.callbacks import MlflowTrialLogger
from sweeper.mlflow_retry import is_transient
from sweeper.mlflow_writer import RunWriter
from sweeper.spec import SweepSpec
from sweeper.store import home


def _refused() -> MlflowException:
    """What MlflowClient raises when the server is down: a ConnectionError inside."""
    cause = requests.exceptions.ConnectionError("[Errno 111] Connection refused")
    e = MlflowException(f"API request to http://127.0.0.1:1/api/2.0/mlflow/runs failed: {cause}")
    e.__context__ = cause
    return e


class FakeMlflow:
    """Runs, params, tags and metric points in memory; a point logged twice with the same
    (key, value, timestamp, step) is kept once, as MLflow's stores do."""

    def __init__(self):
        self.runs: dict[str, dict] = {}
        self.calls: list[str] = []
        self.refuse = 0  # refuse this many calls
        self.down = False  # refuse every call
        self.lose: dict[str, int] = {}  # per method: do the call, then lose its answer
        self.gate: threading.Event | None = None  # the first call waits for it
        self.lock = threading.Lock()

    def _enter(self, name: str) -> None:
        if self.gate is not None:
            gate, self.gate = self.gate, None
            gate.wait(10)
        with self.lock:
            self.calls.append(name)
            if self.down or self.refuse > 0:
                self.refuse = max(0, self.refuse - 1)
                raise _refused()

    def _leave(self) -> None:
        with self.lock:
            name = self.calls[-1]
            if self.lose.get(name):
                self.lose[name] -= 1
                raise _refused()

    def create_run(self, experiment_id, run_name=None, tags=None):
        self._enter("create_run")
        run_id = f"run{len(self.runs)}"
        self.runs[run_id] = {
            "name": run_name,
            "tags": dict(tags or {}),
            "params": {},
            "points": [],
            "status": "RUNNING",
            "ends": [],
        }
        self._leave()
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id))

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self._enter("log_batch")
        run = self.runs[run_id]
        if any(m.key == "bad" for m in metrics):
            raise RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad key"})
        for m in metrics:
            point = (m.key, m.value, m.timestamp, m.step)
            if point not in run["points"]:
                run["points"].append(point)
        run["params"].update({p.key: p.value for p in params})
        run["tags"].update({t.key: t.value for t in tags})
        self._leave()

    def set_tag(self, run_id, key, value):
        self._enter("set_tag")
        self.runs[run_id]["tags"][key] = value
        self._leave()

    def set_terminated(self, run_id, status=None):
        self._enter("set_terminated")
        self.runs[run_id]["status"] = status
        self.runs[run_id]["ends"].append(status)
        self._leave()

    def update_run(self, run_id, status=None):
        self._enter("update_run")
        self.runs[run_id]["status"] = status
        self._leave()

    def search_runs(self, experiment_ids, filter_string):
        self._enter("search_runs")
        wanted = re.findall(r"(tags|attributes)\.([\w.]+) = '([^']*)'", filter_string)

        def match(r: dict) -> bool:
            return all((r["tags"].get(k) if kind == "tags" else r[k]) == v for kind, k, v in wanted)

        return [
            SimpleNamespace(info=SimpleNamespace(run_id=rid))
            for rid, r in self.runs.items()
            if match(r)
        ]

    def delete_tag(self, run_id, key):
        self._enter("delete_tag")
        del self.runs[run_id]["tags"][key]
        self._leave()

    def get_run(self, run_id):
        self._enter("get_run")
        run = self.runs[run_id]
        return SimpleNamespace(
            info=SimpleNamespace(status=run["status"]), data=SimpleNamespace(tags=run["tags"])
        )

    def steps(self, run_id: str, key: str) -> list[int]:
        return [s for k, _, _, s in self.runs[run_id]["points"] if k == key]


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch):
    monkeypatch.setattr(tracking, "_BACKOFF_FIRST_S", 0.01)
    monkeypatch.setattr(tracking, "_BACKOFF_MAX_S", 0.05)


def _writer(fake: FakeMlflow, run_ids=None, logged=None) -> RunWriter:
    run_ids = {} if run_ids is None else run_ids
    logged = {} if logged is None else logged
    return RunWriter(lambda: fake, "0", "parent", run_ids, logged)


def _open(trial_id: str) -> tuple:
    tags = {"mlflow.parentRunId": "parent", "trial_id": trial_id}
    return ("open", {"run_name": trial_id, "tags": tags, "params": {"lr": "0.01"}})


def _points(first: int, last: int, key: str = "train/loss_lm") -> tuple:
    return ("metrics", [(key, float(s), 1000 + s, s) for s in range(first, last + 1)], last)


def test_refused_writes_are_kept_in_order_and_written_once(monkeypatch):
    fake = FakeMlflow()
    fake.refuse = 7
    fake.lose = {"create_run": 1, "log_batch": 1}  # done, but the answers are lost
    run_ids, logged = {}, {}
    w = _writer(fake, run_ids, logged)
    for t in ("a", "b"):
        w.put(t, _open(t))
    for first in range(1, 100, 10):
        for t in ("a", "b"):
            w.put(t, _points(first, first + 9))
    for t in ("a", "b"):
        w.put(t, ("tag", "retried", "1"))
        w.put(t, ("end", "FINISHED"))
    start = time.monotonic()
    assert w.drain(10)
    stats = w.stats()
    print(f"buffer: refused 7, answers lost 2; retried {stats['retried']}, {stats['written']} ops")
    assert time.monotonic() - start < 5
    assert stats["retried"] == 9 and stats["dropped"] == 0 and stats["unwritten"] == 0
    assert len(fake.runs) == 2  # a create whose answer was lost found its run again
    for t in ("a", "b"):
        run = fake.runs[run_ids[t]]
        assert fake.steps(run_ids[t], "train/loss_lm") == list(range(1, 101))
        assert run["ends"] == ["FINISHED"] and run["tags"]["retried"] == "1"
        assert run["params"] == {"lr": "0.01"} and run["tags"]["last_step"] == "100"
        assert logged[t] == 100
    w.close()


def test_a_run_created_while_mlflow_is_down_gets_its_points_later():
    fake = FakeMlflow()
    fake.down = True
    run_ids: dict[str, str] = {}
    w = _writer(fake, run_ids)
    w.put("a", _open("a"))
    w.put("a", _points(1, 10))
    w.put("a", ("end", "FINISHED"))
    assert not w.drain(0.3)  # 0.3 s without a write: gives up waiting, keeps the writes
    assert run_ids == {} and w.stats()["unwritten"] == 3 and w.stats()["unwritten_points"] == 10
    fake.down = False
    assert w.drain(5)
    assert fake.steps(run_ids["a"], "train/loss_lm") == list(range(1, 11))
    assert fake.runs[run_ids["a"]]["status"] == "FINISHED"
    w.close()


def test_a_reopened_run_loses_what_stopped_it_and_a_finished_one_is_left_alone():
    """An interrupted trial's run (KILLED, ``stopped_by=interrupted``) that a resume
    continues is RUNNING again with no stale cause; a FINISHED run is not reopened."""
    fake = FakeMlflow()
    run_ids: dict[str, str] = {}
    w = _writer(fake, run_ids)
    for t in ("a", "b"):
        w.put(t, _open(t))
        w.put(t, _points(1, 10))
    w.put("a", ("tag", "stopped_by", "interrupted"))
    w.put("a", ("end", "KILLED"))
    w.put("b", ("end", "FINISHED"))
    assert w.drain(5)
    w.close()
    w = _writer(fake, run_ids)  # the resumed driver's
    for t in ("a", "b"):
        w.put(t, _open(t))
    assert w.drain(5)
    a, b = fake.runs[run_ids["a"]], fake.runs[run_ids["b"]]
    assert a["status"] == "RUNNING" and "stopped_by" not in a["tags"]
    assert b["status"] == "FINISHED" and b["ends"] == ["FINISHED"]
    w.close()


def test_a_rejected_write_is_dropped_not_retried_forever():
    fake = FakeMlflow()
    gate = fake.gate = threading.Event()  # hold the first call: the next three merge
    run_ids: dict[str, str] = {}
    w = _writer(fake, run_ids)
    w.put("a", _open("a"))
    w.put("a", _points(1, 5))
    w.put("a", _points(6, 6, key="bad"))
    w.put("a", _points(7, 10))
    gate.set()
    assert w.drain(5)
    stats = w.stats()
    assert stats["dropped"] == 1 and stats["retried"] == 0
    # the good points around it all landed, in order
    assert fake.steps(run_ids["a"], "train/loss_lm") == [1, 2, 3, 4, 5, 7, 8, 9, 10]
    assert fake.calls.count("log_batch") <= 6  # params, the merged try, then one per write
    w.close()


def test_transient_or_not(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on: a stopped server
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(MlflowException) as refused:
        MlflowClient(f"http://127.0.0.1:{port}").get_experiment("0")
    assert is_transient(refused.value)
    assert is_transient(RestException({"error_code": "INTERNAL_ERROR", "message": "db"}))
    assert is_transient(RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "x"}))
    assert is_transient(requests.exceptions.ReadTimeout("read timed out"))
    assert not is_transient(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": ""}))
    assert not is_transient(RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": ""}))
    assert not is_transient(ValueError("a bug"))


class _Trial(SimpleNamespace):
    pass


def _logger(tiny_spec, fake: FakeMlflow, tmp_path) -> MlflowTrialLogger:
    spec = SweepSpec.model_validate(tiny_spec(trainer={"max_steps": 30}))
    parent = SimpleNamespace(run_id="parent", experiment_id="0")
    logger = MlflowTrialLogger(spec, parent, str(tmp_path / "sweep-x"))
    logger._writer._client_factory = lambda: fake
    return logger


def _result(first: int, last: int) -> dict:
    history = [(s, {"train/loss_lm": 1.0 / s}) for s in range(first, last + 1)]
    return {"step": last, "val/accuracy": last / 100, "history": history}


def test_logged_counts_only_written_steps_and_a_restored_driver_writes_the_rest(
    tiny_spec, tmp_path, monkeypatch
):
    from ray.tune.experiment import Trial

    fake = FakeMlflow()
    trial = _Trial(
        trial_id="t1",
        config={"reg_constant": 0.1, "token_expansion": 1},
        num_failures=0,
        status=Trial.RUNNING,
        last_result={},
    )
    logger = _logger(tiny_spec, fake, tmp_path)
    logger.on_trial_start(0, [], trial)
    logger.on_trial_result(0, [], trial, _result(1, 10))
    assert logger._writer.drain(5)
    fake.down = True  # MLflow stops
    logger.on_trial_result(0, [], trial, _result(11, 20))
    time.sleep(0.2)
    state = logger.get_state()  # what Tune saves: steps 11-20 are not claimed as logged
    assert state["logged"] == {"t1": 10}
    assert [op[0] for op in state["pending"]["t1"]] == ["metrics"]

    # The driver dies here. Restored from Tune's state, with the trial's checkpoint at 20:
    restored = pickle.loads(pickle.dumps(logger))
    assert restored._writer is not logger._writer and not restored._writer.has("t1")
    assert restored.cancel_file == logger.cancel_file
    # pickled by a version before cancel_file: it finds the sweep's cancel file anyway
    old = logger.__getstate__()
    del old["cancel_file"]
    older = MlflowTrialLogger.__new__(MlflowTrialLogger)
    older.__setstate__(old)
    assert older.cancel_file == str(home() / "sweep-x" / "cancel")
    older._writer.close()
    logger._writer.close()
    restored._writer._client_factory = lambda: fake
    restored.set_state(pickle.loads(pickle.dumps(state)))
    fake.down = False  # MLflow is back
    restored.on_trial_start(0, [], trial)
    restored.on_trial_result(0, [], trial, _result(21, 30))
    trial.status, trial.last_result = Trial.TERMINATED, {"step": 30}
    restored.on_trial_complete(0, [], trial)
    monkeypatch.setenv("SWEEPER_MLFLOW_RETRY_S", "5")
    restored.on_experiment_end([trial])
    assert tracking.WRITES.pop("sweep-x")["drained"]
    (run_id,) = fake.runs
    assert fake.steps(run_id, "train/loss_lm") == list(range(1, 31))
    assert fake.steps(run_id, "val/accuracy") == [10, 20, 30]
    assert fake.runs[run_id]["status"] == "FINISHED" and restored.logged == {"t1": 30}
    restored._writer.close()


def test_experiment_end_waits_a_bounded_time_and_says_what_is_missing(
    tiny_spec, tmp_path, monkeypatch, caplog
):
    from ray.tune.experiment import Trial

    fake = FakeMlflow()
    fake.down = True
    trial = _Trial(
        trial_id="t1",
        config={"reg_constant": 0.1, "token_expansion": 1},
        num_failures=0,
        status=Trial.TERMINATED,
        last_result={"step": 30},
    )
    logger = _logger(tiny_spec, fake, tmp_path)
    logger.on_trial_start(0, [], trial)
    logger.on_trial_result(0, [], trial, _result(1, 30))
    monkeypatch.setenv("SWEEPER_MLFLOW_RETRY_S", "0.5")
    start = time.monotonic()
    logger.on_experiment_end([trial])
    assert time.monotonic() - start < 3
    writes = tracking.WRITES.pop("sweep-x")
    assert not writes["drained"]
    assert writes["unwritten"] == 3 and writes["unwritten_points"] == 31
    assert "none got through in 0.5 s" in caplog.text and "Connection refused" in caplog.text
    assert logger.get_state()["logged"] == {}  # nothing claimed: a resume writes them all


def test_parent_run_writes_ride_out_a_short_outage():
    from sweeper.mlflow_runs import SweepParentRun

    fake = FakeMlflow()
    parent_id = fake.create_run("0", run_name="sweep").info.run_id
    parent = SweepParentRun(fake, parent_id, "0")
    fake.refuse = 3
    best = {"params": {"reg_constant": 0.1}, "metric": "val/accuracy", "value": 0.8}
    parent.log_best(best | {"trial_ids": ["t1"]})
    fake.refuse = 2
    parent.end("FINISHED")
    run = fake.runs[parent_id]
    assert run["params"] == {"best.reg_constant": "0.1"} and run["tags"]["best_trial_ids"] == "t1"
    assert run["points"][0][:2] == ("best/val/accuracy", 0.8) and run["ends"] == ["FINISHED"]
    fake.down = True
    parent.until = time.monotonic() + 0.2  # bounded: then the error is raised
    with pytest.raises(MlflowException):
        parent.end("FINISHED")
    parent.offline = True  # MLflow had its wait at the sweep's end: one quiet try each
    parent.end("FAILED")


def test_a_sweep_whose_writes_could_not_drain_fails_and_says_why(sweep_env, tiny_spec):
    from sweeper.driver import _finish
    from sweeper.mlflow_runs import SweepParentRun
    from sweeper.store import SweepRecord

    spec = SweepSpec.model_validate(tiny_spec(budget={"trials": 1, "max_concurrent": 1}))
    rec = SweepRecord.create(spec)
    row = {"id": "t1", "status": "finished", "params": {"reg_constant": 0.1}}
    rec.update(
        trials={"t1": row | {"metrics": {"val/accuracy": 0.7}, "mlflow_run_id": None}},
        mlflow={"tracking_uri": "http://127.0.0.1:1"},
    )
    fake = FakeMlflow()
    fake.down = True
    tracking.WRITES[rec.id] = {
        "drained": False,
        "written": 3,
        "retried": 40,
        "dropped": 0,
        "unwritten": 5,
        "unwritten_points": 120,
        "unwritten_runs": 1,
        "unreachable_s": 300.0,
        "waited_up_to_s": 300.0,
        "last_error": "MlflowException: ... [Errno 111] Connection refused",
    }
    start = time.monotonic()
    state = _finish(spec, rec, SweepParentRun(fake, "parent", "0"))
    assert time.monotonic() - start < 5  # no second long wait for the parent's writes
    assert state["status"] == "failed" and state["best"]["value"] == 0.7
    why = state["error"]
    assert "MLflow at http://127.0.0.1:1 unreachable: 5 writes (120 metric points)" in why
    assert f"sweeper resume {rec.id}" in why
    assert state["mlflow_writes"]["retried"] == 40
