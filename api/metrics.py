"""``GET /metrics``: Prometheus metrics read from the database at scrape time.

Computed from the rows, not from counters in this process, so the figures survive an API
restart and count what the drivers did.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import CollectorRegistry
from sqlalchemy import func, select

from api.db import Database, Sweep, TrialRow
from sweeper.states import STATES, TRIAL_STATES

BUCKETS = (10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)


class _Collector:
    def __init__(self, db: Database):
        self.db = db

    def collect(self):
        with self.db.session() as s:
            sweeps = dict(
                s.execute(select(Sweep.status, func.count()).group_by(Sweep.status)).all()
            )
            trials = dict(
                s.execute(select(TrialRow.status, func.count()).group_by(TrialRow.status)).all()
            )
            spans = s.execute(
                select(TrialRow.started, TrialRow.ended).where(
                    TrialRow.ended.is_not(None), TrialRow.started.is_not(None)
                )
            ).all()
        g = GaugeMetricFamily("sweeper_sweeps", "Sweeps by state.", labels=["state"])
        for st in STATES:
            g.add_metric([st], sweeps.get(st, 0))
        yield g
        g = GaugeMetricFamily("sweeper_trials", "Trials by state, all sweeps.", labels=["state"])
        for st in sorted(set(TRIAL_STATES) | set(trials)):
            g.add_metric([st], trials.get(st, 0))
        yield g
        durations = sorted(max(0.0, e - b) for b, e in spans)
        buckets, i = [], 0
        for le in BUCKETS:
            while i < len(durations) and durations[i] <= le:
                i += 1
            buckets.append((str(float(le)), i))
        buckets.append(("+Inf", len(durations)))
        h = HistogramMetricFamily(
            "sweeper_trial_duration_seconds", "Wall time of ended trials (start to end)."
        )
        h.add_metric([], buckets, sum_value=sum(durations))
        yield h
        yield GaugeMetricFamily(
            "sweeper_scrape_timestamp_seconds", "When these figures were read.", value=time.time()
        )


def render_metrics(db: Database) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(db))
    return generate_latest(registry), CONTENT_TYPE_LATEST
