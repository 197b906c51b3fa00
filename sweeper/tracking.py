"""MLflow glue: a trainer `report` that writes a run's params and curves in batches."""

from __future__ import annotations

import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from trainer.config import TrainerConfig, flatten_config

# MLflow's log_batch takes at most 1000 metrics per call.
_MAX_BATCH = 1000


class MlflowRun:
    """One MLflow run fed by the trainer's ``report(step, metrics)``.

    Metrics are buffered and written with ``log_batch`` every ``flush_every`` steps, so
    logging costs one round trip per few steps, not one per metric.
    """

    def __init__(
        self,
        experiment: str,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        parent_run_id: str | None = None,
        flush_every: int = 10,
    ):
        self.client = MlflowClient()
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        tags = dict(tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        self.run = self.client.create_run(exp_id, run_name=run_name, tags=tags)
        self.run_id = self.run.info.run_id
        self.experiment_id = exp_id
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
