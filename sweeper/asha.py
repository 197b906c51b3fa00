"""ASHA whose decisions outlive its driver: a resumed sweep stops what an uninterrupted one would.

Ray Tune saves trials and the searcher with the experiment, not the scheduler: a restored
Tuner gets the ASHA it was built with, with empty rungs, so a trial that an uninterrupted
sweep stops at a rung runs on to the end after a resume (seen: 60 steps for 20), and a trial
stopped just before a kill is resumed as if it had never been judged.

`ResumableASHA` writes its rungs, its bracket per trial and the trials it stopped to
``scheduler.json`` in the sweep folder after every decision (before Tune's own snapshot,
which follows the result), and reads them back when Tune unpickles it on restore. A trial
restored from a checkpoint behind a rung it already passed replays results the rungs hold:
ASHA continues it as before; one it stopped at a rung is stopped again at that step.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from sweeper.trials import scheduler_file


class ResumableASHA(ASHAScheduler):
    """Ray's ASHA (AsyncHyperBand), its state kept in ``sweep_dir/scheduler.json``."""

    def __init__(self, sweep_dir: str | os.PathLike, **kwargs: Any):
        super().__init__(**kwargs)
        self.sweep_dir = str(sweep_dir)
        self.stopped: dict[str, int] = {}  # trial -> the step ASHA stopped it at (a rung)
        # A new experiment (a first run, or a resume with no Tune state to restore): what
        # an earlier one decided is about trials that no longer exist.
        scheduler_file(sweep_dir).unlink(missing_ok=True)

    # --- Tune's hooks ----------------------------------------------------------------
    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        tid, step = trial.trial_id, result.get(self._time_attr)
        if tid in self.stopped and step is not None:
            # Judged before the driver died; a restore from an older checkpoint replays
            # the same path: continue up to the step it was stopped at, and stop there.
            return TrialScheduler.STOP if step >= self.stopped[tid] else TrialScheduler.CONTINUE
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and step is not None and step < self._max_t:
            self.stopped[tid] = int(step)  # a rung stop (at max_t a trial simply ends)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if trial.trial_id in self.stopped:  # its rung result is recorded already
            self._trial_info.pop(trial.trial_id, None)
        else:
            super().on_trial_complete(tune_controller, trial, result)
        self._save()

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._trial_info.pop(trial.trial_id, None)
        self._save()

    # --- the state on disk -------------------------------------------------------------
    def __setstate__(self, state: dict) -> None:  # a Tuner.restore unpickles the scheduler
        self.__dict__.update(state)
        self.stopped = dict(state.get("stopped") or {})
        self._load()

    def _state(self) -> dict[str, Any]:
        index = {id(b): i for i, b in enumerate(self._brackets)}
        return {
            "rungs": [
                [[m, {t: _num(v) for t, v in rec.items()}] for m, rec in b._rungs]
                for b in self._brackets
            ],
            "brackets": {t: index[id(b)] for t, b in self._trial_info.items()},
            "stopped": self.stopped,
            "num_stopped": self._num_stopped,
        }

    def _save(self) -> None:
        path = scheduler_file(self.sweep_dir)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self._state()))
        os.replace(tmp, path)  # a kill mid-write leaves the previous state whole

    def _load(self) -> None:
        try:
            saved = json.loads(scheduler_file(self.sweep_dir).read_text())
        except (OSError, ValueError):
            return  # a new sweep, or one from before this file existed
        if len(saved.get("rungs", [])) != len(self._brackets):
            return  # another scheduler shape: start afresh rather than misread it
        for b, rungs in zip(self._brackets, saved["rungs"], strict=True):
            milestones = [m for m, _ in b._rungs]
            if [m for m, _ in rungs] == milestones:
                b._rungs = [(m, {t: _num(v) for t, v in rec.items()}) for m, rec in rungs]
        self._trial_info = {
            t: self._brackets[i]
            for t, i in saved.get("brackets", {}).items()
            if 0 <= i < len(self._brackets)
        }
        stopped = saved.get("stopped") or {}
        self.stopped = {t: int(s) for t, s in stopped.items()} if isinstance(stopped, dict) else {}
        self._num_stopped = int(saved.get("num_stopped", len(self.stopped)))


def _num(v: Any) -> float | None:
    """A rung value as JSON holds it (NaN as None) and back."""
    if v is None:
        return math.nan
    v = float(v)
    return None if math.isnan(v) else v
