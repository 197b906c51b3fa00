"""The data behind a report, as CSV beside it: one row per trial (``trials.csv``) and the
metric histories the report read (``histories.csv``, long format), so a findings page can
commit them and anyone can recompute its figures without the MLflow store."""

from __future__ import annotations

import csv
from pathlib import Path

from dashboards.data import SweepData


def write_data(data: SweepData, out: Path) -> list[Path]:
    """Write ``trials.csv`` and, where histories were read, ``histories.csv``."""
    params = sorted({k for t in data.trials for k in t.params})
    metrics = sorted({k for t in data.trials for k in t.metrics})
    written = [out / "trials.csv"]
    with written[0].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", "run_id", "status", "stopped_by", *params, *metrics])
        for t in data.trials:
            w.writerow(
                [t.trial_id, t.run_id, t.status, t.stopped_by or ""]
                + [t.params.get(k, "") for k in params]
                + [_num(t.metrics.get(k)) for k in metrics]
            )
    if any(t.history for t in data.trials):
        written.append(out / "histories.csv")
        with written[1].open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["trial_id", "key", "step", "value"])
            for t in data.trials:
                for key in sorted(t.history):
                    steps, values = t.history[key]
                    w.writerows(
                        (t.trial_id, key, int(s), _num(v))
                        for s, v in zip(steps, values, strict=True)
                    )
    return written


def _num(v) -> str:
    return "" if v is None else f"{float(v):.6g}"
