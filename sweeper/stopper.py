"""The sweep's Tune stopper: the cancel file and the time budget (with its end mark)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ray.tune.stopper import Stopper

from sweeper.trials import budget_file


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
