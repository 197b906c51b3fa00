"""The data behind a report, as CSV beside it: one row per trial (``trials.csv``) and the
metric histories the report read (``histories.csv``, long format), so a findings page can
commit them and anyone can recompute its figures without the MLflow store: ``read_data``
reads them back, ``pool`` joins several sweeps of one design (``sweeper answers``)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from dashboards.data import ReportError, SweepData, Trial


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


# Trainer fields that may differ between trials of one design: the configuration (λ, k),
# the seed, and the device asked for. (Which machine a trial ran on is not recorded: a
# pool of sweeps from two machines carries their run-to-run spread, docs/findings.md.)
PER_TRIAL = {"reg_constant", "token_expansion", "seed", "device"}


def read_data(folder: str | Path) -> SweepData:
    """A sweep back from what :func:`write_data` wrote (``trials.csv``, ``histories.csv``),
    for the answers without the MLflow store. Values carry write_data's 6 digits."""
    folder = Path(folder)
    path = folder / "trials.csv"
    if not path.is_file():
        raise ReportError(f"{folder}: no trials.csv (write it with `sweeper report ID -o DIR`)")
    try:
        trials = _read_trials(path)
        points = _read_points(folder / "histories.csv")
        for t in trials.values():  # the fields pairing reads, as numbers
            _ = t.reg_constant, t.token_expansion, t.seed
    except (ValueError, KeyError, TypeError, csv.Error) as e:
        raise ReportError(f"{folder}: not the data `sweeper report` writes ({e!r})") from None
    for (tid, key), pts in points.items():
        if tid in trials:
            pts.sort()
            trials[tid].history[key] = (
                np.array([s for s, _ in pts]),
                np.array([v for _, v in pts], dtype=float),
            )
    return SweepData(
        folder.name, "", "", "FINISHED", "", None, list(trials.values()), sources=(str(folder),)
    )


def _read_trials(path: Path) -> dict[str, Trial]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    fixed = {"trial_id", "run_id", "status", "stopped_by"}
    names = set(rows[0]) - fixed if rows else set()
    metric_names = {n for n in names if "/" in n}
    return {
        r["trial_id"]: Trial(
            run_id=r["run_id"],
            trial_id=r["trial_id"],
            status=r["status"],
            params={k: r[k] for k in names - metric_names if r[k] != ""},
            metrics={k: float(r[k]) for k in metric_names if r[k] != ""},
            stopped_by=r["stopped_by"] or None,
        )
        for r in rows
    }


def _read_points(path: Path) -> dict[tuple[str, str], list[tuple[int, float]]]:
    points: dict[tuple[str, str], list[tuple[int, float]]] = {}
    if path.is_file():
        with path.open(newline="") as f:
            for p in csv.DictReader(f):
                value = float(p["value"]) if p["value"] != "" else float("nan")
                points.setdefault((p["trial_id"], p["key"]), []).append((int(p["step"]), value))
    return points


def pool(sweeps: list[SweepData]) -> SweepData:
    """One or several sweeps of one design as one: every trial must agree on every trainer
    field but λ, k, the seed and the device (so configurations differ in λ and k only, and
    seed s is the same initialisation and batch order in each), and no configuration may
    have the same seed twice among the trials that count."""
    first: tuple[str, str, dict[str, str]] | None = None
    seen: dict[tuple, str] = {}
    for data in sweeps:
        for t in data.trials:
            fixed = {k: v for k, v in t.params.items() if k not in PER_TRIAL}
            if first is None:
                first = (data.sweep_id, t.trial_id, fixed)
            elif fixed != first[2]:
                ref = first[2]
                k = min(k for k in fixed.keys() | ref.keys() if fixed.get(k) != ref.get(k))
                raise ReportError(
                    f"{data.sweep_id} trial {t.trial_id} has {k} = {fixed.get(k, '(unset)')}, "
                    f"{first[0]} trial {first[1]} {k} = {first[2].get(k, '(unset)')}: the "
                    "answers compare configurations that differ in λ and k only; these "
                    "trials cannot be paired by seed"
                )
            if t.counts:
                at = (t.reg_constant, t.token_expansion, t.seed)
                if at in seen:
                    raise ReportError(
                        f"λ = {at[0]:g}, k = {at[1]}, seed {at[2]} counts twice ({seen[at]} "
                        f"and {data.sweep_id}): pool sweeps that ran different configurations"
                    )
                seen[at] = data.sweep_id
    name = " + ".join(d.sweep_id for d in sweeps)
    trials = [t for d in sweeps for t in d.trials]
    sources = tuple(s for d in sweeps for s in d.sources)
    return SweepData(name, "", "", "FINISHED", "", None, trials, sources=sources)
