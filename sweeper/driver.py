"""The sweep's lifecycle: Ray Tune + OptunaSearch (+ ASHA) over the trainer, to its end."""

from __future__ import annotations

import logging
import os
import time
import traceback
from functools import partial
from typing import Any

import ray
from ray import tune
from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig
from ray.tune.schedulers import ASHAScheduler

from sweeper.asha import ResumableASHA
from sweeper.backfill import backfill_final_metrics
from sweeper.callbacks import MlflowTrialLogger, StateWriter
from sweeper.mlflow_retry import WRITES, limit_mlflow_http_retries, mlflow_retry_s, with_retries
from sweeper.mlflow_runs import SweepParentRun
from sweeper.ranking import best_configuration
from sweeper.search import make_searcher
from sweeper.spec import SweepSpec
from sweeper.states import TRIAL_ENDED, TRIAL_UNFINISHED
from sweeper.stopper import CancelStopper
from sweeper.storage import atomic_local_fs
from sweeper.store import LISTENERS, SweepRecord
from sweeper.trials import budget_file
from sweeper.worker import run_trial
from trainer.config import TrainerConfig
from trainer.metrics import question_slug

# LISTENERS: the CLI and the service follow a sweep through them. StateWriter and
# CancelStopper are named here too: Tune states saved before the split pickled them as
# ``sweeper.driver.*``, and a resume unpickles them by that name.
__all__ = ["LISTENERS", "CancelStopper", "StateWriter", "run_sweep"]


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
    for d in datasets:
        data = load_dataset(d)
        _check_questions(d, data, base)
        for metric in (o.metric for o in spec.objectives):
            _check_objective(metric, d, data, base)


def _check_questions(d: str, data, base: TrainerConfig) -> None:
    """Held-out and delayed questions are the dataset's: a typo fails the sweep at once,
    not every trial."""
    known = set(data.questions())
    for field, asked in (
        ("probe_questions", base.probe_questions),
        ("delayed_questions", list(base.delayed_questions)),
    ):
        for q in asked:
            if q not in known:
                raise ValueError(
                    f"trainer.{field}: {q!r} is not a question of dataset {d!r}; it has "
                    + ", ".join(repr(x) for x in sorted(known))
                )


def _check_objective(metric: str, d: str, data, base: TrainerConfig) -> None:
    """The objective is a metric this dataset and trainer config will report."""
    questions = data.questions()
    slugs = {question_slug(q) for q in questions}
    if metric == "val/accuracy_choice" and not all(q in data.choices for q in questions):
        raise ValueError(
            f"objective.metric: dataset {d!r} lists no answer choices for every question, "
            "so val/accuracy_choice is never reported"
        )
    if metric.startswith("val/probe_") and not base.probe_questions:
        raise ValueError(
            f"objective.metric: {metric} is reported only with trainer.probe_questions "
            "(the questions the probe holds out)"
        )
    for family in ("val/accuracy_by_question/", "val/loss_lm_by_question/"):
        if metric.startswith(family) and metric.split("/")[-1] not in slugs:
            raise ValueError(
                f"objective.metric: dataset {d!r} has no such question; it has "
                + ", ".join(sorted(f"{family}{x}" for x in slugs))
            )


def run_sweep(rec: SweepRecord, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) the sweep in ``rec`` to its end; returns its final state."""
    spec = rec.spec()
    # Our MLflow logger is the record; Tune's own CSV/JSON/TensorBoard files would only
    # duplicate every curve on disk.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    # ...so the result grid finds no result files: that is expected, not worth a warning.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    # num_to_keep snapshots the experiment at each checkpoint; that is the point here.
    os.environ["TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"] = "0"
    # The CLI draws its own trial table: Tune's reporter (its config box) stays quiet.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # An MLflow outage is ridden out by the logger's buffer, not by MLflow's own retries,
    # which would hold a write for minutes.
    limit_mlflow_http_retries()
    parent = None
    try:
        rec.update(status="running", pid=os.getpid(), error=None)
        parent = SweepParentRun.open(spec, rec)
        prepare_sources(spec)
        init_ray()
        need = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
        if spec.resources.memory_gb:
            need["memory"] = int(spec.resources.memory_gb * 2**30)
        trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), need)
        fs = atomic_local_fs()
        if resume and tune.Tuner.can_restore(str(rec.tune_dir), storage_filesystem=fs):
            tuner = tune.Tuner.restore(
                str(rec.tune_dir), trainable, resume_unfinished=True, storage_filesystem=fs
            )
            backfill_final_metrics(rec.tune_dir, parent)  # test/ metrics an older driver dropped
        else:
            tuner = _new_tuner(spec, rec, trainable, parent)
        tuner.fit()
        return _finish(spec, rec, parent)
    except KeyboardInterrupt:  # before Tune took over the signal: nothing ran, nothing lost
        _end_parent(parent, "KILLED")
        rec.update(status="interrupted", pid=None)
        raise
    except BaseException as e:
        (rec.path / "error.log").write_text(traceback.format_exc())
        _end_parent(parent, "FAILED")
        rec.update(status="failed", error=f"{type(e).__name__}: {e}", pid=None)
        raise


def _end_parent(parent: SweepParentRun | None, status: str) -> None:
    """Close the parent run on the way out of an error: a short wait for MLflow at most, and
    an MLflow problem here never hides the error being reported."""
    if parent is None:
        return
    parent.until = time.monotonic() + min(30.0, mlflow_retry_s())
    try:
        parent.end(status)
    except Exception as e:
        logging.getLogger("sweeper").warning(
            "parent run %s not closed: %s: %s", parent.run_id, type(e).__name__, e
        )


def _finish(spec: SweepSpec, rec: SweepRecord, parent: SweepParentRun) -> dict[str, Any]:
    """Classify the ended sweep, log the best configuration, close the parent run.

    The trial runs' MLflow writes are done by now (the logger waited for them at the
    experiment's end); the parent's writes wait out a short outage too. If MLflow stayed
    unreachable, the sweep says so in ``error`` and ends ``failed`` (``interrupted`` and
    ``cancelled`` stay as they are): ``sweeper resume ID`` writes what is missing.
    """
    writes = WRITES.pop(rec.id, None)
    lost = _mlflow_lost(rec, writes)
    parent.until = time.monotonic() + mlflow_retry_s()
    parent.offline = bool(lost)  # one try per parent write: MLflow has had its wait
    if writes is not None:
        rec.update(mlflow_writes=writes, **({"error": lost} if lost else {}))
    state = rec.read()
    rows = state["trials"]
    if rec.cancel_file.exists():
        best = best_configuration(spec, rows)
        parent.log_best(best)
        _publish_report(rec, parent)
        parent.end("KILLED", children_stopped_by="cancel")
        for row in rows.values():
            if row["status"] in TRIAL_UNFINISHED:
                row["status"] = "cancelled"
        return rec.update(status="cancelled", trials=rows, best=best, pid=None)
    unfinished = [r for r in rows.values() if r["status"] in TRIAL_UNFINISHED]
    total = (spec.budget.trials or 0) * spec.repeats
    ended = [r for r in rows.values() if r["status"] in TRIAL_ENDED]
    interrupted = bool(unfinished) or (
        len(ended) < total
        and not budget_file(rec.cancel_file).exists()
        and not _searcher_exhausted(spec, rows)
    )
    best = best_configuration(spec, rows)
    if interrupted:
        parent.end("KILLED")
        for row in unfinished:
            row["status"] = "paused"  # resume continues it from its last checkpoint
        return rec.update(status="interrupted", trials=rows, best=best, pid=None)
    parent.log_best(best)
    _publish_report(rec, parent)
    parent.end("FINISHED" if best and not lost else "FAILED")
    if lost:
        return rec.update(status="failed", best=best, error=lost, pid=None)
    if best:
        return rec.update(status="succeeded", best=best, pid=None)
    why = f"no trial reported {spec.primary.metric}"
    if spec.budget.time_budget_s:
        why += f" within the time budget of {spec.budget.time_budget_s:g} s"
    return rec.update(status="failed", best=None, error=why, pid=None)


def _mlflow_lost(rec: SweepRecord, writes: dict[str, Any] | None) -> str | None:
    """Why the sweep's MLflow record is incomplete, or None when every write got there."""
    if not writes or writes.get("drained", True):
        return None
    return (
        f"MLflow at {(rec.read().get('mlflow') or {}).get('tracking_uri', '?')} unreachable: "
        f"{writes['unwritten']} writes ({writes['unwritten_points']} metric points) for "
        f"{writes['unwritten_runs']} trial runs not written: none got through in "
        f"{writes['waited_up_to_s']:g} s (SWEEPER_MLFLOW_RETRY_S); last error: "
        f"{writes['last_error']}. The trials ran; `sweeper resume {rec.id}` writes the rest "
        "once MLflow is back."
    )


def _publish_report(rec: SweepRecord, parent: SweepParentRun) -> None:
    """The sweep's report, logged to its parent run; a report problem never fails a sweep.

    It reads the trials' curves from MLflow and logs files there: a transient MLflow error
    is tried again (like the parent's other writes) before the report is given up.
    """
    if parent.offline:
        logging.getLogger("sweeper").warning("sweep %s: no report (MLflow unreachable)", rec.id)
        return
    try:
        from sweeper.reports import publish  # matplotlib: only when a report is built

        with_retries(
            publish,
            rec.id,
            rec.path / "report",
            parent.client.tracking_uri,
            parent.experiment_id,
            os.environ.get("SWEEPER_MLFLOW_UI_URL"),
            until=parent.until,
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


def make_scheduler(spec: SweepSpec, sweep_dir: str | None = None) -> ASHAScheduler | None:
    """ASHA over trainer steps when the spec asks for early stopping; None otherwise.
    With ``sweep_dir`` its rungs and stops are kept there, so a resume keeps them."""
    if spec.early_stopping is None:
        return None
    kind = ASHAScheduler if sweep_dir is None else partial(ResumableASHA, sweep_dir)
    return kind(
        time_attr="step",
        max_t=_longest(spec),
        grace_period=spec.early_stopping.grace_period,
        reduction_factor=spec.early_stopping.reduction_factor,
    )


def _new_tuner(spec: SweepSpec, rec: SweepRecord, trainable, parent: SweepParentRun) -> tune.Tuner:
    logger = MlflowTrialLogger(spec, parent, str(rec.path))
    return tune.Tuner(
        trainable,
        tune_config=TuneConfig(
            metric=spec.primary.metric,
            mode=spec.primary.mode,
            search_alg=make_searcher(spec),
            scheduler=make_scheduler(spec, str(rec.path)),
            num_samples=(spec.budget.trials or 1) * spec.repeats,
            max_concurrent_trials=spec.budget.max_concurrent,
            reuse_actors=True,
        ),
        run_config=RunConfig(
            name=rec.tune_dir.name,
            storage_path=str(rec.path),
            storage_filesystem=atomic_local_fs(),  # a killed driver leaves no torn file
            callbacks=[logger, StateWriter(str(rec.path), spec, logger)],
            stop=CancelStopper(str(rec.cancel_file), spec.budget.time_budget_s),
            failure_config=FailureConfig(max_failures=spec.failure.max_failures),
            # Two, not one: a driver killed after a trial's newest checkpoint replaced its
            # previous one, but before the experiment state recorded it, restored a state
            # naming the deleted checkpoint, and the trial failed for good ("Could not
            # recover from checkpoint as it does not exist on storage"; seen in CI).
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            verbose=0,
        ),
    )
