"""The sweep driver: Ray Tune + OptunaSearch (+ ASHA) over the trainer, tracked in MLflow."""

from __future__ import annotations

import logging
import math
import os
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, TuneConfig
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler
from ray.tune.stopper import Stopper

from sweeper.search import make_searcher
from sweeper.spec import SweepSpec
from sweeper.store import LISTENERS, SweepRecord
from sweeper.tracking import MlflowTrialLogger, SweepParentRun
from trainer.config import TrainerConfig
from trainer.loop import VAL_METRICS, question_slug

TRIAL_INDEX = "__trial_index__"  # set by Ray Tune's Repeater: which seed of a configuration

__all__ = ["LISTENERS", "run_sweep"]


def run_trial(config: dict[str, Any], spec: SweepSpec) -> None:
    """One Tune trial: one trainer run, reported to Tune at each evaluation.

    Each report carries the evaluation's metrics (what ASHA and Optuna judge) and
    ``history``, the per-step train metrics since the last report, which the driver's
    MLflow logger writes as curves. A checkpoint goes with every report, so a restored
    or retried trial continues from its last evaluation; one restored at its end (the
    driver was stopped as it finished) only reports its final evaluation again.
    """
    import torch

    cfg = trial_config(spec, config)
    torch.set_num_threads(max(1, int(spec.resources.cpu)))
    with tempfile.TemporaryDirectory(prefix="sweeper-trial-") as tmp:
        _run_trial(cfg, Path(tmp))


def trial_config(spec: SweepSpec, config: dict[str, Any]) -> TrainerConfig:
    """The exact trainer config a trial runs (and MLflow records): checkpoints at evals."""
    cfg = spec.trainer_config(config, repeat=config.get(TRIAL_INDEX, 0))
    return cfg.model_copy(update={"checkpoint_every": cfg.eval_every})


def _run_trial(cfg: TrainerConfig, work: Path) -> None:
    from trainer import train

    restored = tune.get_checkpoint()
    if restored is not None:
        restored.to_directory(str(work / "checkpoint"))
    history: list[tuple[int, dict[str, float]]] = []

    def report(step: int, metrics: dict[str, float]) -> None:
        history.append((step, {k: v for k, v in metrics.items() if k.startswith("train/")}))
        if not any(k.startswith("val/") for k in metrics):
            return
        ckpt = None
        if (work / "checkpoint").is_dir():
            ckpt = Checkpoint.from_directory(str(work / "checkpoint"))
        tune.report({"step": step, **metrics, "history": list(history)}, checkpoint=ckpt)
        history.clear()

    train(cfg, report, checkpoint_dir=work)


def init_ray() -> None:
    """A local Ray on this machine's cores, or the cluster at ``RAY_ADDRESS``."""
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = dict(
        include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False
    )
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=os.cpu_count(), **kwargs)


def prepare_sources(spec: SweepSpec) -> None:
    """Build every model and dataset the sweep can touch once, here, not in each trial."""
    from trainer.data import load_dataset
    from trainer.sources import resolve_model

    base = spec.base_config()
    models, datasets = {base.model}, {base.dataset}
    for key, found in (("model", models), ("dataset", datasets)):
        param = spec.search.space.get(key)
        if param is not None:
            found.update(str(c) for c in param.extremes())
    for m in models:
        resolve_model(m)
    metric = spec.objective.metric
    for d in datasets:
        data = load_dataset(d)
        questions = data.questions()
        slugs = {question_slug(q) for q in questions}
        if metric == "val/accuracy_choice" and not all(q in data.choices for q in questions):
            raise ValueError(
                f"objective.metric: dataset {d!r} lists no answer choices for every question, "
                "so val/accuracy_choice is never reported"
            )
        if metric.startswith("val/accuracy_by_question/") and metric.split("/")[-1] not in slugs:
            raise ValueError(
                f"objective.metric: dataset {d!r} has no such question; it has "
                + ", ".join(sorted(f"val/accuracy_by_question/{x}" for x in slugs))
            )


def ran_to_the_end(spec: SweepSpec, trial: Trial) -> bool:
    """Ended at its max_steps; otherwise an end without error was an early stop (ASHA, time)."""
    max_steps = trial_config(spec, trial.config).max_steps
    return (trial.last_result or {}).get("step") == max_steps


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

    def _row(self, trial: Trial, status: str, result: dict | None = None) -> dict[str, Any]:
        params = {k: v for k, v in trial.config.items() if k in self.spec.search.space}
        cfg = trial_config(self.spec, trial.config)
        row: dict[str, Any] = {
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
            last_train = result["history"][-1][1] if result.get("history") else {}
            val = {k: v for k, v in result.items() if k in VAL_METRICS}
            row["metrics"] = last_train | val
        return row

    def _put(self, trial: Trial, status: str, result: dict | None = None, force=True) -> None:
        now = time.monotonic()
        if not force and now - self._last_write < 1.0:
            return
        rec, state = self._rows()
        old = state["trials"].get(trial.trial_id, {})
        row = self._row(trial, status, result)
        if result is None:  # keep the last step and metrics seen
            row = old | row
        row["metrics"] = (old.get("metrics") or {}) | (row.get("metrics") or {})
        state["trials"][trial.trial_id] = row
        state["updated"] = time.time()
        rec.write(state)
        self._last_write = now

    def on_trial_start(self, iteration, trials, trial, **info):
        self._put(trial, "running")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._put(trial, "running", result, force=False)

    def on_trial_complete(self, iteration, trials, trial, **info):
        done = ran_to_the_end(self.spec, trial)
        self._put(trial, "finished" if done else "stopped", trial.last_result)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._put(trial, "retrying")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._put(trial, "failed", trial.last_result)

    def on_experiment_end(self, trials, **info):
        # A time budget ends trials without on_trial_complete: settle them here.
        rows = self._rows()[1]["trials"]
        for trial in trials:
            row = rows.get(trial.trial_id, {})
            if trial.status == Trial.TERMINATED and row.get("status") in ("running", None):
                done = ran_to_the_end(self.spec, trial)
                self._put(trial, "finished" if done else "stopped", trial.last_result)
        # A driver killed (SIGKILL) just after starting a trial, before Tune saved its
        # experiment state: restored, Tune knows nothing of that trial and proposes its
        # configuration again as a new one. The old row is "lost", not left unfinished.
        rec, state = self._rows()
        known = {t.trial_id for t in trials}
        lost = [
            tid
            for tid, row in state["trials"].items()
            if tid not in known and row["status"] in ("running", "retrying", "paused")
        ]
        if lost:
            for tid in lost:
                state["trials"][tid]["status"] = "lost"
            rec.write(state)


class CancelStopper(Stopper):
    """Stops every trial once the sweep's ``cancel`` file appears (checked once a second).

    It holds only a path, so it pickles with the experiment state as Tune requires.
    """

    def __init__(self, cancel_file: str):
        self.cancel_file = cancel_file
        self._checked = 0.0
        self._cancelled = False

    def __call__(self, trial_id, result) -> bool:
        return self.stop_all()

    def stop_all(self) -> bool:
        now = time.monotonic()
        if not self._cancelled and now - self._checked >= 1.0:
            self._checked = now
            self._cancelled = os.path.exists(self.cancel_file)
        return self._cancelled


def best_configuration(spec: SweepSpec, trials: dict[str, dict]) -> dict[str, Any] | None:
    """The configuration whose seeds' mean objective is best (over finished/stopped trials)."""
    metric, groups = spec.objective.metric, {}
    for row in trials.values():
        value = (row.get("metrics") or {}).get(metric)
        if row["status"] in ("finished", "stopped") and value is not None and math.isfinite(value):
            key = tuple(sorted((k, str(v)) for k, v in row["params"].items()))
            groups.setdefault(key, (row["params"], []))[1].append((value, row))
    if not groups:
        return None
    pick = max if spec.objective.mode == "max" else min
    params, scored = pick(groups.values(), key=lambda g: statistics.mean(v for v, _ in g[1]))
    values = [v for v, _ in scored]
    return {
        "params": params,
        "metric": spec.objective.metric,
        "value": statistics.mean(values),
        "seeds": len(values),
        "trial_ids": [r["id"] for _, r in scored],
        "mlflow_run_ids": [r.get("mlflow_run_id") for _, r in scored],
    }


def run_sweep(rec: SweepRecord, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) the sweep in ``rec`` to its end; returns its final state."""
    spec = rec.spec()
    # Our MLflow logger is the record; Tune's own CSV/JSON/TensorBoard files would only
    # duplicate every curve on disk.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    # ...so the result grid finds no result files: that is expected, not worth a warning.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    # num_to_keep=1 snapshots the experiment at each checkpoint; that is the point here.
    os.environ["TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"] = "0"
    # The CLI draws its own trial table: Tune's reporter (its config box) stays quiet.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    parent = None
    try:
        rec.update(status="running", pid=os.getpid(), error=None)
        parent = SweepParentRun.open(spec, rec)
        prepare_sources(spec)
        init_ray()
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, spec=spec),
            {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu},
        )
        if resume and tune.Tuner.can_restore(str(rec.tune_dir)):
            tuner = tune.Tuner.restore(str(rec.tune_dir), trainable, resume_unfinished=True)
        else:
            tuner = _new_tuner(spec, rec, trainable, parent)
        tuner.fit()
        return _finish(spec, rec, parent)
    except KeyboardInterrupt:  # before Tune took over the signal: nothing ran, nothing lost
        if parent is not None:
            parent.end("KILLED")
        rec.update(status="interrupted", pid=None)
        raise
    except BaseException as e:
        (rec.path / "error.log").write_text(traceback.format_exc())
        if parent is not None:
            parent.end("FAILED")
        rec.update(status="failed", error=f"{type(e).__name__}: {e}", pid=None)
        raise


def _finish(spec: SweepSpec, rec: SweepRecord, parent: SweepParentRun) -> dict[str, Any]:
    """Classify the ended sweep, log the best configuration, close the parent run."""
    state = rec.read()
    rows = state["trials"]
    if rec.cancel_file.exists():
        best = best_configuration(spec, rows)
        parent.log_best(best)
        _publish_report(rec, parent)
        parent.end("KILLED")
        for row in rows.values():
            if row["status"] in ("running", "retrying", "paused"):
                row["status"] = "stopped"
        return rec.update(status="cancelled", trials=rows, best=best, pid=None)
    unfinished = [r for r in rows.values() if r["status"] in ("running", "retrying", "paused")]
    total = (spec.budget.trials or 0) * spec.repeats
    ended = [r for r in rows.values() if r["status"] in ("finished", "stopped", "failed")]
    interrupted = bool(unfinished) or (
        len(ended) < total and not spec.budget.time_budget_s and not _searcher_exhausted(spec, rows)
    )
    best = best_configuration(spec, rows)
    if interrupted:
        parent.end("KILLED")
        for row in unfinished:
            row["status"] = "paused"  # resume continues it from its last checkpoint
        return rec.update(status="interrupted", trials=rows, best=best, pid=None)
    parent.log_best(best)
    _publish_report(rec, parent)
    parent.end("FINISHED" if best else "FAILED")
    if best:
        return rec.update(status="succeeded", best=best, pid=None)
    why = f"no trial reported {spec.objective.metric}"
    if spec.budget.time_budget_s:
        why += f" within the time budget of {spec.budget.time_budget_s:g} s"
    return rec.update(status="failed", best=None, error=why, pid=None)


def _publish_report(rec: SweepRecord, parent: SweepParentRun) -> None:
    """The sweep's report, logged to its parent run; a report problem never fails a sweep."""
    try:
        from dashboards.report import publish

        publish(
            rec.id,
            rec.path / "report",
            parent.client.tracking_uri,
            parent.experiment_id,
            os.environ.get("SWEEPER_MLFLOW_UI_URL"),
        )
    except Exception as e:
        logging.getLogger("sweeper").warning(
            "sweep %s: no report (%s: %s)", rec.id, type(e).__name__, e
        )
        (rec.path / "report-error.log").write_text(traceback.format_exc())


def _searcher_exhausted(spec: SweepSpec, rows: dict) -> bool:
    # A grid with fewer points than the budget ends early; that is not an interruption.
    return spec.search.sampler == "grid" and len(rows) >= (spec.budget.trials or 0) * spec.repeats


def _longest(spec: SweepSpec) -> int:
    """ASHA's max_t: the most steps any trial can run (max_steps may be searched)."""
    steps = [spec.base_config().max_steps]
    if "max_steps" in spec.search.space:
        steps += [int(v) for v in spec.search.space["max_steps"].extremes()]
    return max(steps)


def _new_tuner(spec: SweepSpec, rec: SweepRecord, trainable, parent: SweepParentRun) -> tune.Tuner:
    scheduler = None
    if spec.early_stopping is not None:
        scheduler = ASHAScheduler(
            time_attr="step",
            max_t=_longest(spec),
            grace_period=spec.early_stopping.grace_period,
            reduction_factor=spec.early_stopping.reduction_factor,
        )
    logger = MlflowTrialLogger(spec, parent, str(rec.path))
    return tune.Tuner(
        trainable,
        tune_config=TuneConfig(
            metric=spec.objective.metric,
            mode=spec.objective.mode,
            search_alg=make_searcher(spec),
            scheduler=scheduler,
            num_samples=(spec.budget.trials or 1) * spec.repeats,
            max_concurrent_trials=spec.budget.max_concurrent,
            time_budget_s=spec.budget.time_budget_s,
            reuse_actors=True,
        ),
        run_config=RunConfig(
            name=rec.tune_dir.name,
            storage_path=str(rec.path),
            callbacks=[logger, StateWriter(str(rec.path), spec, logger)],
            stop=CancelStopper(str(rec.cancel_file)),
            failure_config=FailureConfig(max_failures=spec.failure.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            verbose=0,
        ),
    )
