"""The sweep driver: Ray Tune + OptunaSearch (+ ASHA) over the trainer, tracked in MLflow."""

from __future__ import annotations

import contextlib
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
from sweeper.spec import SweepSpec, pareto_front
from sweeper.states import TRIAL_COUNTED, TRIAL_ENDED, TRIAL_UNFINISHED
from sweeper.storage import atomic_local_fs
from sweeper.store import LISTENERS, SweepRecord
from sweeper.tracking import (
    WRITES,
    MlflowTrialLogger,
    SweepParentRun,
    error_text,
    limit_mlflow_http_retries,
    mlflow_retry_s,
    with_retries,
)
from trainer.config import TrainerConfig
from trainer.metrics import question_slug

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
    limit = spec.resources.memory_gb
    cap = limit if not spec.resources.gpu else None  # CUDA maps far more than it uses
    try:
        with memory_cap(cap), tempfile.TemporaryDirectory(prefix="sweeper-trial-") as tmp:
            _run_trial(cfg, Path(tmp))
    except (MemoryError, RuntimeError) as e:
        oom = _out_of_memory(e, limit)
        if oom is e:
            raise
        raise oom from e


class TrialOutOfMemory(RuntimeError):
    """The trial ran out of memory: its ``resources.memory_gb`` cap, the host's or the GPU's."""


def _out_of_memory(e: BaseException, limit_gb: float | None) -> BaseException:
    """A clear reason for an allocation failure; any other error is returned as it is."""
    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    gpu = type(e).__name__ == "OutOfMemoryError"  # torch.cuda.OutOfMemoryError
    cpu = isinstance(e, MemoryError) or "can't allocate memory" in text
    if gpu:
        return TrialOutOfMemory(
            f"out of GPU memory ({text}); lower batch_size or token_expansion, "
            "or give each trial more of a GPU (resources.gpu)"
        )
    if cpu:
        cap = f"its cap resources.memory_gb={limit_gb:g}" if limit_gb else "the host's memory"
        return TrialOutOfMemory(f"out of memory: the trial needed more than {cap} ({text})")
    return e


@contextlib.contextmanager
def memory_cap(limit_gb: float | None):
    """Cap the trial's memory growth at ``limit_gb`` over what its worker holds now.

    The cap is an address-space limit (``RLIMIT_AS``) on the worker process, so an
    allocation past it fails at once (``MemoryError``, or torch's "can't allocate
    memory") instead of the host swapping or the kernel's OOM killer picking a victim.
    It is lifted again when the trial ends: Tune reuses worker processes.
    """
    if not limit_gb:
        yield
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * resource.getpagesize()
    cap = size + int(limit_gb * 2**30)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


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
    first: list[int] = []  # the first step this process trains: a resumed trial's is past 1

    def report(step: int, metrics: dict[str, float]) -> None:
        first[:] = first or [step]
        history.append((step, {k: v for k, v in metrics.items() if k.startswith("train/")}))
        if not any(k.startswith("val/") for k in metrics):
            return
        ckpt = None
        if (work / "checkpoint").is_dir():
            ckpt = Checkpoint.from_directory(str(work / "checkpoint"))
        node = ray.get_runtime_context().get_node_id()
        tune.report(
            {
                "step": step,
                **metrics,
                "history": list(history),
                "node_id": node,
                "resumed_from_step": first[0] - 1,
            },
            checkpoint=ckpt,
        )
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
    for d in datasets:
        data = load_dataset(d)
        for metric in (o.metric for o in spec.objectives):
            _check_objective(metric, d, data, base)


def _check_objective(metric: str, d: str, data, base: TrainerConfig) -> None:
    """The objective is a metric this dataset and trainer config will report."""
    questions = data.questions()
    slugs = {question_slug(q) for q in questions}
    if metric == "val/accuracy_choice" and not all(q in data.choices for q in questions):
        raise ValueError(
            f"objective.metric: dataset {d!r} lists no answer choices for every question, "
            "so val/accuracy_choice is never reported"
        )
    if metric.startswith("val/probe_accuracy") and not base.probe_questions:
        raise ValueError(
            f"objective.metric: {metric} is reported only with trainer.probe_questions "
            "(the questions the probe holds out)"
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


def budget_file(cancel_file: str | os.PathLike) -> Path:
    """The mark the sweep's stopper leaves beside its cancel file once the time budget ran out."""
    return Path(cancel_file).with_name("budget_spent")


def stopped_by(spec: SweepSpec, trial: Trial, cancel_file: str | os.PathLike, at_end: bool) -> str:
    """What ended a trial that ended without error: ``max_steps`` (it ran to the end),
    ``cancel`` (the sweep's cancel cut it short), ``scheduler`` (ASHA stopped it at a
    rung), or, for a trial still running when the experiment ended (``at_end``),
    ``time_budget`` (the budget ran out) or ``interrupted`` (Ctrl-C, SIGTERM: resume
    continues it)."""
    if ran_to_the_end(spec, trial):
        return "max_steps"
    if os.path.exists(cancel_file):
        return "cancel"
    if not at_end:
        return "scheduler"
    return "time_budget" if budget_file(cancel_file).exists() else "interrupted"


# The trial table's status for each cause: a cancel's half-trained trials do not count,
# and an interrupted one is left "running" for the sweep's end to mark "paused".
END_STATUS = {
    "max_steps": "finished",
    "scheduler": "stopped",
    "time_budget": "stopped",
    "cancel": "cancelled",
    "interrupted": "running",
}


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
            row["node"] = result.get("node_id")  # the Ray node it ran on
            row["resumed_from_step"] = result.get("resumed_from_step")  # > 0: from a checkpoint
            last_train = result["history"][-1][1] if result.get("history") else {}
            # Every val/ metric: per-question accuracies and probes can be objectives too.
            val = {k: v for k, v in result.items() if k.startswith("val/")}
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


class CancelStopper(Stopper):
    """Stops every trial once the sweep's ``cancel`` file appears (checked once a second),
    or once the sweep has run for its ``time_budget_s``.

    The budget is kept here rather than by Tune's ``time_budget_s`` so that its end leaves
    a mark (the ``budget_spent`` file): the trials it stops and the ones a Ctrl-C or
    SIGTERM stops both end without ``on_trial_complete``, and only the mark tells them
    apart. As with Tune's TimeoutStopper, only time spent running counts: a resumed sweep
    goes on with what was left. It holds paths and numbers, so it pickles with the
    experiment state as Tune requires.
    """

    def __init__(self, cancel_file: str, time_budget_s: float | None = None):
        self.cancel_file = cancel_file
        self.budget_file = str(budget_file(cancel_file))
        self.budget_left = time_budget_s
        self._last = None  # wall time of the last budget check (None: not running yet)
        self._checked = 0.0
        self._cancelled = False

    def __setstate__(self, state):
        # Pickled by a version that left the budget to Tune: no budget of its own.
        state.setdefault("budget_left", None)
        state.setdefault("budget_file", str(budget_file(state["cancel_file"])))
        state["_last"] = None  # restored: the time the sweep was stopped does not count
        state["_checked"] = 0.0  # a monotonic clock from another boot or machine
        self.__dict__.update(state)
        if self.budget_left is None or self.budget_left > 0:
            # Written after Tune's last save, by a driver that died then: not spent yet.
            Path(self.budget_file).unlink(missing_ok=True)

    def __call__(self, trial_id, result) -> bool:
        # Only the cancel stops a trial on its result; the budget ends the experiment
        # (stop_all), as Tune's own TimeoutStopper does, so its trials are "time_budget".
        return self._cancel_requested()

    def _cancel_requested(self) -> bool:
        now = time.monotonic()
        if not self._cancelled and now - self._checked >= 1.0:
            self._checked = now
            self._cancelled = os.path.exists(self.cancel_file)
        return self._cancelled

    def stop_all(self) -> bool:
        return self._cancel_requested() or self._budget_spent()

    def _budget_spent(self) -> bool:
        if self.budget_left is None:
            return False
        now = time.time()
        if self._last is not None:
            self.budget_left -= now - self._last
        self._last = now
        if self.budget_left > 0:
            return False
        if not os.path.exists(self.budget_file):
            Path(self.budget_file).touch()
        return True


def configurations(spec: SweepSpec, trials: dict[str, dict], metrics: list[str]) -> list[dict]:
    """Finished/stopped trials grouped by configuration, each metric the mean over its seeds.

    A trial counts only if it reported every one of ``metrics`` as a finite number, and
    only if it ended on the sweep's own terms (``TRIAL_COUNTED``): a trial a cancel cut
    short is half-trained and would drag its configuration's mean down.
    """
    groups: dict[tuple, tuple[dict, list[dict]]] = {}
    for row in trials.values():
        got = row.get("metrics") or {}
        values = [got.get(m) for m in metrics]
        if row["status"] in TRIAL_COUNTED and all(
            v is not None and math.isfinite(v) for v in values
        ):
            key = tuple(sorted((k, str(v)) for k, v in row["params"].items()))
            groups.setdefault(key, (row["params"], []))[1].append(row)
    return [
        {
            "params": params,
            "values": {m: statistics.mean(r["metrics"][m] for r in rows) for m in metrics},
            "seeds": len(rows),
            "trial_ids": [r["id"] for r in rows],
            "mlflow_run_ids": [r.get("mlflow_run_id") for r in rows],
        }
        for params, rows in groups.values()
    ]


def pareto_set(spec: SweepSpec, trials: dict[str, dict]) -> list[dict]:
    """The configurations no other one beats on every objective (seed means), best first
    on the primary objective."""
    objs = spec.objectives
    configs = configurations(spec, trials, [o.metric for o in objs])
    values = [[c["values"][o.metric] for o in objs] for c in configs]
    front = [configs[i] for i in pareto_front(values, [o.mode for o in objs])]
    return sorted(front, key=lambda c: c["values"][objs[0].metric], reverse=objs[0].mode == "max")


def best_configuration(spec: SweepSpec, trials: dict[str, dict]) -> dict[str, Any] | None:
    """The configuration whose seeds' mean objective is best (over finished/stopped trials).

    With several objectives: the best on the first, with every objective's mean in
    ``values`` and the Pareto set in ``pareto``.
    """
    primary = spec.primary
    every = [o.metric for o in spec.objectives]
    # Multi-objective: ranked among configurations that reported every objective (so the
    # best has all its values and belongs to the same set as the Pareto set), falling back
    # to those with the first objective alone.
    configs = configurations(spec, trials, every) if spec.multi_objective else []
    configs = configs or configurations(spec, trials, [primary.metric])
    if not configs:
        return None
    pick = max if primary.mode == "max" else min
    top = pick(configs, key=lambda c: c["values"][primary.metric])
    best = {
        "params": top["params"],
        "metric": primary.metric,
        "value": top["values"][primary.metric],
        "seeds": top["seeds"],
        "trial_ids": top["trial_ids"],
        "mlflow_run_ids": top["mlflow_run_ids"],
    }
    if spec.multi_objective:
        best["values"] = top["values"]
        best["pareto"] = pareto_set(spec, trials)
    return best


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
        from dashboards.report import publish

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


def make_scheduler(spec: SweepSpec) -> ASHAScheduler | None:
    """ASHA over trainer steps when the spec asks for early stopping; None otherwise."""
    if spec.early_stopping is None:
        return None
    return ASHAScheduler(
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
            scheduler=make_scheduler(spec),
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
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            verbose=0,
        ),
    )
