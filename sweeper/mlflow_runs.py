"""MLflow runs: one trainer run fed by `report` (MlflowRun) and a sweep's parent run."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from sweeper.mlflow_retry import _LOG, _short, with_retries
from sweeper.mlflow_writer import _MAX_BATCH
from trainer.config import TrainerConfig, flatten_config


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
