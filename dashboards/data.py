"""A sweep's records, read back from MLflow: the parent run, its spec, every trial.

MLflow is the source (not the driver's state), so a report works for finished, running,
resumed and service-run sweeps alike, and for anyone who can reach the tracking server.
One ``search_runs`` gives every trial's params, tags and latest metrics (all the
per-configuration figures need); full histories are fetched only for the few trials whose
curves a report draws (:meth:`SweepData.load_histories`): a metric history is one query
per run and key in MLflow's stores, whatever the API.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import yaml
from mlflow import MlflowClient

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class ParamLike(Protocol):
    """A searched field's range: Optuna's distribution of it."""

    def distribution(self) -> Any: ...


class ObjectiveLike(Protocol):
    metric: str
    mode: str  # "max" or "min"


class SpecLike(Protocol):
    """What the report reads of a sweep's spec (the sweeper's ``SweepSpec`` is one)."""

    @property
    def search(
        self,
    ) -> Any: ...  # ``.space``: field name -> ParamLike (``.choices`` if categorical)

    @property
    def objectives(self) -> list[ObjectiveLike]: ...

    @property
    def primary(self) -> ObjectiveLike: ...

    def base_config(self) -> Any: ...  # the base trainer config (a TrainerConfig)


# The parsed spec.yaml of a parent run -> the spec object (``SweepSpec.model_validate``).
ReadSpec = Callable[[Mapping[str, Any]], SpecLike]


class ReportError(Exception):
    """A report cannot be built (no such sweep in MLflow, ...): one line for the user."""


@dataclass
class Trial:
    run_id: str
    trial_id: str
    status: str  # MLflow's: RUNNING, FINISHED, KILLED, FAILED
    params: dict[str, str]
    metrics: dict[str, float]  # the latest value of each
    history: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    error: str | None = None
    last_step: int | None = None  # the driver's ``last_step`` tag
    stopped_by: str | None = None  # a KILLED run's cause: scheduler, time_budget, cancel, ...

    @property
    def cut_short(self) -> bool:
        """Ended early by a cancel or an interruption, not by the sweep's plan (ASHA, the
        time budget): half-trained, so left out of seed means and the best."""
        return self.status == "KILLED" and self.stopped_by not in (
            None,  # a run logged before the tag existed
            "scheduler",
            "time_budget",
        )

    @property
    def counts(self) -> bool:
        """Ended by the plan, seeded: its figures count in seed means and the answers."""
        ended = self.status not in ("FAILED", "RUNNING")
        return ended and not self.cut_short and self.seed is not None

    @property
    def reg_constant(self) -> float:
        return float(self.params.get("reg_constant", "nan"))

    @property
    def token_expansion(self) -> int:
        return int(float(self.params.get("token_expansion", "1")))

    @property
    def seed(self) -> int | None:
        s = self.params.get("seed")
        return int(float(s)) if s not in (None, "None") else None

    @property
    def step(self) -> int | None:
        steps = self.history.get("train/loss_lm", (np.array([]), None))[0]
        if len(steps):
            return int(steps[-1])
        if self.last_step is not None:
            return self.last_step
        if self.status == "FINISHED" and "max_steps" in self.params:
            return int(self.params["max_steps"])
        return None

    def searched(self, spec: SpecLike | None) -> dict[str, Any]:
        """The searched parameters of this trial (the configuration, seeds aside)."""
        keys = list(spec.search.space) if spec else ["reg_constant", "token_expansion"]
        return {k: _typed(self.params.get(k)) for k in keys}


@dataclass
class SweepData:
    sweep_id: str
    experiment_id: str
    parent_run_id: str
    parent_status: str
    tracking_uri: str
    spec: SpecLike | None
    trials: list[Trial]
    client: MlflowClient | None = None
    # the exported folders (``sweeper report``'s CSVs) it was read from; empty from MLflow
    sources: tuple[str, ...] = ()

    def load_histories(self, trials: list[Trial], keys: tuple[str, ...]) -> None:
        """Fill ``history`` of these trials (at most ``max_points`` per key, evenly spaced)."""
        todo = [t for t in trials if not t.history]
        if not todo or self.client is None:
            return
        hist = _histories(self.client, [t.run_id for t in todo], keys, 500)
        for t in todo:
            t.history = hist[t.run_id]

    @property
    def metric(self) -> str:
        return self.spec.primary.metric if self.spec else "val/accuracy"

    @property
    def mode(self) -> str:
        return self.spec.primary.mode if self.spec else "max"


def _typed(v: str | None) -> Any:
    if v is None:
        return None
    try:
        return yaml.safe_load(v)
    except yaml.YAMLError:
        return v


def find_parent(client: MlflowClient, sweep_id: str, experiment_id: str | None = None):
    if experiment_id:
        exp_ids = [experiment_id]
    else:
        exp_ids = [e.experiment_id for e in client.search_experiments(max_results=1000)]
    for i in range(0, len(exp_ids), 100):
        runs = client.search_runs(
            exp_ids[i : i + 100],
            f"tags.sweep_id = '{sweep_id}' and attributes.run_name = '{sweep_id}'",
            max_results=10,
        )
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        if parents:
            return parents[0]
    raise ReportError(f"no MLflow parent run for sweep {sweep_id!r} at {client.tracking_uri}")


def _spec(client: MlflowClient, run_id: str, read_spec: ReadSpec) -> SpecLike | None:
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, "spec.yaml", tmp)
            return read_spec(yaml.safe_load(Path(path).read_text()))
    except Exception:  # an older or hand-made parent: the report still draws what it can
        return None


def _histories(
    client: MlflowClient, run_ids: list[str], keys: tuple[str, ...], max_points: int
) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    store = client._tracking_client.store
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {r: {} for r in run_ids}
    for key in keys:
        rows: dict[str, list[tuple[int, float]]] = {r: [] for r in run_ids}
        for i in range(0, len(run_ids), 100):
            chunk = run_ids[i : i + 100]
            try:  # evenly sampled, first and last kept; a REST server does it in one call
                found = store.get_metric_history_bulk_interval(chunk, key, max_points, None, None)
                for m in found:
                    rows[m.run_id].append((m.step, m.value))
            except Exception:  # a store without it: the whole history, run by run
                for r in chunk:
                    rows[r] = [(m.step, m.value) for m in client.get_metric_history(r, key)]
        for r, pts in rows.items():
            if pts:
                pts.sort()
                steps, values = zip(*pts, strict=True)
                out[r][key] = (np.asarray(steps), np.asarray(values, dtype=float))
    return out


def load_sweep(
    sweep_id: str,
    tracking_uri: str | None = None,
    experiment_id: str | None = None,
    *,
    read_spec: ReadSpec,
) -> SweepData:
    """One sweep's parent, spec (its ``spec.yaml`` through ``read_spec``) and trials
    (latest metrics; histories on demand)."""
    client = MlflowClient(tracking_uri) if tracking_uri else MlflowClient()
    parent = find_parent(client, sweep_id, experiment_id)
    exp_id = parent.info.experiment_id
    runs = client.search_runs(
        [exp_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=50000
    )
    trials = [
        Trial(
            run_id=r.info.run_id,
            trial_id=r.data.tags.get("trial_id", r.info.run_id[:8]),
            status=r.info.status,
            params=dict(r.data.params),
            metrics={k: v for k, v in r.data.metrics.items() if not math.isnan(v)},
            error=r.data.tags.get("error"),
            last_step=int(r.data.tags["last_step"]) if "last_step" in r.data.tags else None,
            stopped_by=r.data.tags.get("stopped_by"),
        )
        for r in runs
    ]
    trials.sort(key=lambda t: t.trial_id)
    return SweepData(
        sweep_id=sweep_id,
        experiment_id=exp_id,
        parent_run_id=parent.info.run_id,
        parent_status=parent.info.status,
        tracking_uri=client.tracking_uri,
        spec=_spec(client, parent.info.run_id, read_spec),
        trials=trials,
        client=client,
    )
