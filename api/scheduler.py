"""The scheduler: reconciles drivers and starts queued sweeps, every second or when poked.

What one pass does (mark dead drivers' sweeps interrupted, start queued sweeps up to
``SWEEPER_MAX_RUNNING_SWEEPS``) is :meth:`api.launcher.Launcher.reconcile`; this module
only decides when it runs, and rides out a database outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from api.db import db_error_text, db_unavailable
from api.launcher import Launcher

log = logging.getLogger("sweeper.api")


class Scheduler:
    """Runs ``launcher.reconcile`` every ``interval_s`` seconds, and at once when woken."""

    def __init__(self, launcher: Launcher, interval_s: float, enabled: bool = True):
        self.launcher, self.interval_s, self.enabled = launcher, interval_s, enabled
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def wake(self) -> None:
        """Wake the loop; call it from the event loop (async routes)."""
        self._wake.set()

    def poke(self) -> None:
        """Wake the loop; safe from the threadpool that runs sync routes."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """For the app's lifespan: the loop runs (when enabled) while the app serves."""
        self._loop = asyncio.get_running_loop()
        task = asyncio.create_task(self.run()) if self.enabled else None
        yield
        if task:
            task.cancel()

    async def run(self) -> None:
        down_since: float | None = None  # the database outage the scheduler is riding out
        while True:
            try:
                await asyncio.to_thread(self.launcher.reconcile)
                if down_since is not None:
                    log.warning(
                        "scheduler: database back after %.1f s", time.monotonic() - down_since
                    )
                    down_since = None
            except Exception as e:
                if not db_unavailable(e):
                    log.exception("reconcile failed")
                elif down_since is None:  # once per outage; it retries every interval
                    down_since = time.monotonic()
                    log.warning("scheduler: database unavailable (%s); retrying", db_error_text(e))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            self._wake.clear()
