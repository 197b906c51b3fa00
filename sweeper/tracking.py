"""MLflow glue: a trainer `report` that writes a run's params and curves in batches."""

from __future__ import annotations

import time
from pathlib import Path

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
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name)


class SweepParentRun:
    """The sweep's parent run: the spec as an artifact, the best configuration when done."""

    def __init__(self, client: MlflowClient, run_id: str, experiment_id: str):
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id

    @classmethod
    def open(cls, spec, rec) -> SweepParentRun:
        """Create the parent run, or reopen the one a resumed sweep already has."""
        client = MlflowClient()
        ids = rec.read().get("mlflow") or {}
        if ids.get("parent_run_id"):
            client.update_run(ids["parent_run_id"], status="RUNNING")
            return cls(client, ids["parent_run_id"], ids["experiment_id"])
        exp_id = _experiment_id(client, spec.experiment)
        run = client.create_run(exp_id, run_name=rec.id, tags={"sweep_id": rec.id})
        client.log_artifact(run.info.run_id, str(rec.path / "spec.yaml"))
        client.log_batch(
            run.info.run_id,
            params=[
                Param("sampler", spec.search.sampler),
                Param("trials", str(spec.budget.trials)),
                Param("repeats", str(spec.repeats)),
                Param("objective", f"{spec.objective.mode} {spec.objective.metric}"),
            ],
        )
        rec.update(
            mlflow={
                "experiment_id": exp_id,
                "parent_run_id": run.info.run_id,
                "tracking_uri": mlflow_uri(),
            }
        )
        return cls(client, run.info.run_id, exp_id)

    def log_best(self, best: dict | None) -> None:
        if not best:
            return
        params = [Param(f"best.{k}", str(v)) for k, v in best["params"].items()]
        metric = Metric(f"best/{best['metric']}", float(best["value"]), int(time.time() * 1000), 0)
        self.client.log_batch(self.run_id, metrics=[metric], params=params)
        self.client.set_tag(self.run_id, "best_trial_ids", ",".join(best["trial_ids"]))

    def end(self, status: str) -> None:
        """End the parent and any child still RUNNING (an interrupted trial) as KILLED."""
        children = self.client.search_runs(
            [self.experiment_id],
            f"tags.mlflow.parentRunId = '{self.run_id}' and attributes.status = 'RUNNING'",
        )
        for child in children:
            self.client.set_terminated(child.info.run_id, status="KILLED")
        self.client.set_terminated(self.run_id, status=status)


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
    """

    def __init__(self, spec, parent: SweepParentRun, sweep_dir: str):
        self.spec, self.sweep_id = spec, Path(sweep_dir).name
        self.parent_run_id, self.experiment_id = parent.run_id, parent.experiment_id
        self.tracking_uri = mlflow_uri()
        self.run_ids: dict[str, str] = {}
        # Last step written per trial: a trial restored from an earlier checkpoint replays
        # steps already in MLflow, and each step is logged once.
        self.logged: dict[str, int] = {}
        self._runtime()

    def _runtime(self) -> None:
        self._client: MlflowClient | None = None
        self._buf: dict[str, list[Metric]] = {}
        self._ended: set[str] = set()

    def __getstate__(self):  # Tune pickles callbacks with its experiment state
        state = self.__dict__.copy()
        for k in ("_client", "_buf", "_ended"):
            state.pop(k, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._runtime()

    def get_state(self) -> dict:  # saved with Tune's experiment state, back on restore
        return {"run_ids": dict(self.run_ids), "logged": dict(self.logged)}

    def set_state(self, state: dict) -> None:
        self.run_ids.update(state.get("run_ids", {}))
        self.logged.update(state.get("logged", {}))

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def _open(self, trial) -> str:
        from sweeper.driver import trial_config

        if trial.trial_id not in self.run_ids:  # restored from an older snapshot: ask MLflow
            found = self.client.search_runs(
                [self.experiment_id],
                f"tags.mlflow.parentRunId = '{self.parent_run_id}' "
                f"and tags.trial_id = '{trial.trial_id}'",
            )
            if found:
                self.run_ids[trial.trial_id] = found[0].info.run_id
        if trial.trial_id in self.run_ids:  # a restored or retried trial keeps its run
            self._ended.discard(trial.trial_id)
            self.client.update_run(self.run_ids[trial.trial_id], status="RUNNING")
            return self.run_ids[trial.trial_id]
        cfg = trial_config(self.spec, trial.config)
        shown = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in trial.config.items()
            if k in self.spec.search.space
        )
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{trial.trial_id} {shown} seed={cfg.seed}".strip(),
            tags={
                "mlflow.parentRunId": self.parent_run_id,
                "trial_id": trial.trial_id,
                "sweep_id": self.sweep_id,
            },
        )
        params = [Param(k, str(v)) for k, v in flatten_config(cfg).items()]
        self.client.log_batch(run.info.run_id, params=params)
        self.run_ids[trial.trial_id] = run.info.run_id
        return run.info.run_id

    def _flush(self, trial_id: str) -> None:
        buf = self._buf.pop(trial_id, [])
        # The last step logged rides along as a tag: a report reads it without histories.
        tags = [RunTag("last_step", str(self.logged.get(trial_id, 0)))]
        for i in range(0, len(buf), _MAX_BATCH):
            last = i + _MAX_BATCH >= len(buf)
            self.client.log_batch(
                self.run_ids[trial_id], metrics=buf[i : i + _MAX_BATCH], tags=tags if last else []
            )

    def _end(self, trial, status: str) -> None:
        if trial.trial_id not in self.run_ids:
            return
        self._flush(trial.trial_id)
        self.client.set_terminated(self.run_ids[trial.trial_id], status=status)
        self._ended.add(trial.trial_id)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._open(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if trial.trial_id not in self.run_ids:
            self._open(trial)
        ts, step = int(time.time() * 1000), int(result.get("step", 0))
        done = self.logged.get(trial.trial_id, 0)
        buf = self._buf.setdefault(trial.trial_id, [])
        for s, metrics in result.get("history", []):
            if s > done:
                buf.extend(Metric(k, float(v), ts, s) for k, v in metrics.items())
        if step > done:
            buf.extend(
                Metric(k, float(v), ts, step)
                for k, v in result.items()
                if k.startswith("val/") and isinstance(v, int | float)
            )
        self.logged[trial.trial_id] = max(done, step)
        self._flush(trial.trial_id)  # one log_batch per report: an eval's worth of steps

    def on_trial_complete(self, iteration, trials, trial, **info):
        from sweeper.driver import ran_to_the_end

        self._end(trial, "FINISHED" if ran_to_the_end(self.spec, trial) else "KILLED")

    def on_trial_recover(self, iteration, trials, trial, **info):
        if trial.trial_id in self.run_ids:
            self._flush(trial.trial_id)
            self.client.set_tag(self.run_ids[trial.trial_id], "retried", str(trial.num_failures))

    def on_trial_error(self, iteration, trials, trial, **info):
        if trial.trial_id in self.run_ids:
            self.client.set_tag(self.run_ids[trial.trial_id], "error", _error_text(trial))
        self._end(trial, "FAILED")

    def on_experiment_end(self, trials, **info):
        from ray.tune.experiment import Trial

        from sweeper.driver import ran_to_the_end

        for trial_id in list(self._buf):
            self._flush(trial_id)
        # A time budget ends trials without on_trial_complete: close their runs here.
        for trial in trials:
            if trial.status == Trial.TERMINATED and trial.trial_id not in self._ended:
                self._end(trial, "FINISHED" if ran_to_the_end(self.spec, trial) else "KILLED")


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "trial failed")[:500]
