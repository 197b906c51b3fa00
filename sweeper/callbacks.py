"""The driver's Tune callbacks: the trial table in state.json, and a child run per trial."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from ray import tune
from ray.tune.experiment import Trial

from sweeper.mlflow_retry import _LOG, WRITES, mlflow_retry_s
from sweeper.mlflow_runs import SweepParentRun, mlflow_uri
from sweeper.mlflow_writer import RunWriter
from sweeper.ranking import best_configuration
from sweeper.spec import SweepSpec
from sweeper.states import TRIAL_COUNTED, TRIAL_UNFINISHED
from sweeper.store import SweepRecord, home
from sweeper.trials import END_STATUS, TrialRow, error_text, stopped_by, trial_config
from trainer.config import flatten_config


class StateWriter(tune.Callback):
    """Keeps the sweep's trial table in ``state.json`` and tells the listeners."""

    def __init__(self, record_path: str, spec: SweepSpec, mlflow_logger: MlflowTrialLogger):
        self.record_path = record_path
        self.spec = spec
        self.mlflow_logger = mlflow_logger
        self._last_write = 0.0

    def _rows(self) -> tuple[SweepRecord, dict[str, Any]]:
        rec = SweepRecord(Path(self.record_path))
        return rec, rec.read()

    def _row(self, trial: Trial, status: str, result: dict | None = None) -> TrialRow:
        params = {k: v for k, v in trial.config.items() if k in self.spec.search.space}
        cfg = trial_config(self.spec, trial.config)
        row: TrialRow = {
            "id": trial.trial_id,
            "status": status,
            "params": params,
            "seed": cfg.seed,
            "reg_constant": cfg.reg_constant,
            "token_expansion": cfg.token_expansion,
            "mlflow_run_id": self.mlflow_logger.run_ids.get(trial.trial_id),
        }
        if result:
            row["step"] = result.get("step")
            row["pid"] = result.get("pid")  # the worker process: trials reuse it
            row["node"] = result.get("node_id")  # the Ray node it ran on
            row["resumed_from_step"] = result.get("resumed_from_step")  # > 0: from a checkpoint
            last_train = result["history"][-1][1] if result.get("history") else {}
            # Every val/ metric (per-question accuracies and probes can be objectives too),
            # and the test/ ones a trial with test_at_end reports at its last step.
            val = {k: v for k, v in result.items() if k.startswith(("val/", "test/"))}
            row["metrics"] = last_train | val
        return row

    def _put(
        self,
        trial: Trial,
        status: str,
        result: dict | None = None,
        force: bool = True,
        error: str | None = None,
    ) -> None:
        now = time.monotonic()
        if not force and now - self._last_write < 1.0:
            return
        rec, state = self._rows()
        old = state["trials"].get(trial.trial_id, {})
        if old.get("status") == "finished":
            # Finished before the driver was killed, but after Tune's last snapshot: the
            # restored Tune reruns it from its final checkpoint, which only reports the
            # final evaluation again. The row stays as it was.
            return
        row = self._row(trial, status, result)
        if result is None:  # keep the last step and metrics seen
            row = old | row
        row["metrics"] = (old.get("metrics") or {}) | (row.get("metrics") or {})
        row["error"] = error
        state["trials"][trial.trial_id] = row
        if row["status"] in TRIAL_COUNTED and old.get("status") != row["status"]:
            # The best so far, as each trial ends: a driver killed before the sweep's end
            # leaves it on record (the service's `interrupted` event carries it).
            state["best"] = best_configuration(self.spec, state["trials"])
        state["updated"] = time.time()
        rec.write(state)
        self._last_write = now

    def on_trial_start(self, iteration, trials, trial, **info):
        self._put(trial, "running")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._put(trial, "running", result, force=False)

    def _end_status(self, trial: Trial, at_end: bool = False) -> str:
        cancel = SweepRecord(Path(self.record_path)).cancel_file
        return END_STATUS[stopped_by(self.spec, trial, cancel, at_end)]

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._put(trial, self._end_status(trial), trial.last_result)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._put(trial, "retrying")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._put(trial, "failed", trial.last_result, error=error_text(trial))

    def on_experiment_end(self, trials, **info):
        # A time budget, a cancel or an interrupt ends trials without on_trial_complete:
        # settle them here (an interrupted one stays "running" until the sweep's end).
        rows = self._rows()[1]["trials"]
        for trial in trials:
            row = rows.get(trial.trial_id, {})
            if trial.status == Trial.TERMINATED and row.get("status") in ("running", None):
                self._put(trial, self._end_status(trial, at_end=True), trial.last_result)
        # A driver killed (SIGKILL) just after starting a trial, before Tune saved its
        # experiment state: restored, Tune knows nothing of that trial and proposes its
        # configuration again as a new one. The old row is "lost", not left unfinished.
        rec, state = self._rows()
        known = {t.trial_id for t in trials}
        lost = [
            tid
            for tid, row in state["trials"].items()
            if tid not in known and row["status"] in TRIAL_UNFINISHED
        ]
        if lost:
            for tid in lost:
                state["trials"][tid]["status"] = "lost"
        # A run created late (MLflow was down when its trial started, or the whole trial
        # through): the logger has waited for its writes, so its id is known now.
        late = {
            tid: self.mlflow_logger.run_ids[tid]
            for tid, row in state["trials"].items()
            if not row.get("mlflow_run_id") and tid in self.mlflow_logger.run_ids
        }
        for tid, run_id in late.items():
            state["trials"][tid]["mlflow_run_id"] = run_id
        if lost or late:
            rec.write(state)


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
        # -1: nothing logged yet, so the step-0 evaluation (the untrained floor) is logged
        done = max(self._queued.get(tid, -1), self.logged.get(tid, -1))
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
                if k.startswith(("val/", "test/")) and isinstance(v, int | float)
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
