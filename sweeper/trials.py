"""A trial of a sweep: its row in the state file, its trainer config, and why it ended."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from trainer.config import TrainerConfig

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

    from sweeper.spec import SweepSpec

TRIAL_INDEX = "__trial_index__"  # set by Ray Tune's Repeater: which seed of a configuration


class TrialRow(TypedDict, total=False):
    """One trial in the sweep's ``state.json`` (``trials[id]``), as the driver's StateWriter
    writes it; the API's trial table and the CLI's trial table show these fields."""

    id: str
    status: str  # one of sweeper.states.TRIAL_STATES
    params: dict[str, Any]  # the searched fields' values (the configuration)
    seed: int
    reg_constant: float
    token_expansion: int
    mlflow_run_id: str | None
    step: int | None  # the last step reported
    pid: int | None  # the worker process: trials reuse it
    node: str | None  # the Ray node it ran on
    resumed_from_step: int | None  # > 0: continued from a checkpoint
    metrics: dict[str, float]  # the last train/ metrics and every val/ metric reported
    error: str | None


def trial_config(spec: SweepSpec, config: dict[str, Any]) -> TrainerConfig:
    """The exact trainer config a trial runs (and MLflow records): checkpoints at evals."""
    cfg = spec.trainer_config(config, repeat=config.get(TRIAL_INDEX, 0))
    return cfg.model_copy(update={"checkpoint_every": cfg.eval_every})


def ran_to_the_end(spec: SweepSpec, trial: Trial) -> bool:
    """Ended at its max_steps; otherwise an end without error was an early stop (ASHA, time)."""
    max_steps = trial_config(spec, trial.config).max_steps
    return (trial.last_result or {}).get("step") == max_steps


def scheduler_file(sweep_dir: str | os.PathLike) -> Path:
    """Where the sweep's ASHA keeps its rungs and stops (sweeper.asha.ResumableASHA)."""
    return Path(sweep_dir) / "scheduler.json"


def stopped_by_scheduler(sweep_dir: str | os.PathLike) -> set[str]:
    """The trials the sweep's ASHA stopped (empty without ASHA or before its first stop)."""
    try:
        return set(json.loads(scheduler_file(sweep_dir).read_text()).get("stopped") or {})
    except (OSError, ValueError):
        return set()


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
    if trial.trial_id in stopped_by_scheduler(Path(cancel_file).parent):
        return "scheduler"  # stopped at a rung, though the kill came before its end
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


def error_text(trial) -> str:
    """The last line of a failed trial's error file (at most 500 characters)."""
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "trial failed")[:500]
