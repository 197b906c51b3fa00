"""Build time of the per-sweep report (``sweeper.reports.write_report``) from MLflow.

Setup (not timed): a synthetic MLflow store with the layout ``sweeper/callbacks.py`` writes
for a finished sweep. One experiment (the spec's ``experiment``); a parent run (run name
and tag ``sweep_id``, the spec as artifact ``spec.yaml``, params sampler/trials/repeats/
objective, the best configuration via ``SweepParentRun.log_best``); ``--trials`` child runs
(tags ``mlflow.parentRunId``, ``trial_id``, ``sweep_id``; params the flattened trainer
config of ``sweeper.trials.trial_config``; every metric the trainer reports, one point per
step, the ``val/*`` ones every 50 steps). The spec is a TPE sweep over λ (log, 1e-3..10)
and k ∈ {1, 2, 4, 8} with the λ = 0, k = 1 baseline and 2 seeds per configuration. Most
runs are FINISHED; a few are KILLED part-way and 2 FAILED (with an ``error`` tag), their
curves ending at their last evaluation, as a trial's are. Curves are synthetic but shaped
like real ones: loss_lm decays; loss_reg decays faster the bigger λ; accuracy depends
smoothly on λ and k, plus noise. Everything is written with ``MlflowClient.log_batch``,
at most 1000 metrics per call (MLflow's limit, as the sweep's logger does).

The store lives in ``<tmp>/sweeper-report-speed-<trials>x<steps>/mlflow.db`` (or
``--tracking-uri``) and is built once: a later run with ``--keep`` finds it complete and
reuses it. Without ``--keep`` the folder (store and reports) is removed at the end.

Timed, ``--repeats`` times, interleaved, medians reported:

* ``naive fetch``: the baseline, what a hand-written report would do just to get the
  data: find the children, then ``MlflowClient.get_metric_history(run_id, key)`` for the
  6 train keys and 3 val keys the report plots, run by run;
* ``write_report``: ``sweeper.reports.write_report(sweep_id, out, tracking_uri)`` into
  a fresh folder each time (HTML and PNGs: fetch, tables and figures).

    python bench/report_speed.py                        # 200 trials x 500 steps, 3 repeats
    python bench/report_speed.py --trials 20 --steps 100 --repeats 1   # smoke

Last line: ``report_build_s: X`` (median seconds of one ``write_report``).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import mlflow
import numpy as np
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from sweeper.mlflow_runs import SweepParentRun
from sweeper.mlflow_writer import _MAX_BATCH as MAX_BATCH
from sweeper.spec import SweepSpec
from sweeper.trials import TRIAL_INDEX, trial_config
from trainer.config import flatten_config
from trainer.data import DIGIT_QUESTIONS
from trainer.metrics import (
    ACCURACY,
    GRAD_NORM_LM,
    GRAD_NORM_REG,
    LOSS_LM,
    LOSS_REG,
    LOSS_TOTAL,
    REG_CONSTANT,
    TRAIN_METRICS,
    VAL_LOSS_LM,
    VAL_LOSS_REG,
    question_slug,
)

TRAIN_KEYS = (LOSS_LM, LOSS_REG, LOSS_TOTAL, REG_CONSTANT, GRAD_NORM_LM, GRAD_NORM_REG)
VAL_KEYS = (ACCURACY, VAL_LOSS_LM, VAL_LOSS_REG)
REPEATS_PER_CONFIG = 2  # the spec's `repeats`: seeds per configuration
EVAL_EVERY = 50
STEP_S = 0.4  # synthetic wall time of one step, for the timestamps


def make_spec(trials: int, steps: int) -> SweepSpec:
    return SweepSpec.model_validate(
        {
            "name": "bench",
            "trainer": {
                "model": "tiny-llama",
                "dataset": "digits",
                "max_steps": steps,
                "eval_every": min(EVAL_EVERY, steps),
            },
            "search": {
                "sampler": "tpe",
                "seed": 0,
                "space": {
                    "reg_constant": {"type": "float", "low": 1e-3, "high": 10.0, "log": True},
                    "token_expansion": {"type": "categorical", "choices": [1, 2, 4, 8]},
                },
                "points": [{"reg_constant": 0.0, "token_expansion": 1}],
            },
            "budget": {"trials": math.ceil(trials / REPEATS_PER_CONFIG), "max_concurrent": 4},
            "repeats": REPEATS_PER_CONFIG,
        }
    )


def sweep_id_for(trials: int, steps: int) -> str:
    """Shaped like sweeper.store.new_id, fixed per size so a kept store is found again."""
    return f"bench-20261130-120000-{zlib.crc32(f'{trials}x{steps}'.encode()) & 0xFFFFFF:06x}"


def plan_trials(spec: SweepSpec, n: int, rng: np.random.Generator) -> list[dict]:
    """The trials a finished sweep would have: configurations, seeds, ends."""
    steps, every = spec.base_config().max_steps, spec.base_config().eval_every
    evals = [s for s in range(every, steps + 1, every)]
    configs = [(0.0, 1)]  # the baseline point first, as the sweep runs it
    while len(configs) * spec.repeats < n:
        lam = float(10 ** rng.uniform(-3, 1))
        configs.append((lam, int(rng.choice([1, 2, 4, 8]))))
    tag = f"{rng.integers(16**5):05x}"  # Ray Tune: <experiment hash>_<index>
    plan = []
    for i in range(n):
        lam, k = configs[i // spec.repeats]
        plan.append(
            {
                "trial_id": f"{tag}_{i:05d}",
                "params": {"reg_constant": lam, "token_expansion": k},
                "repeat": i % spec.repeats,
                "status": "FINISHED",
                "last_step": steps,
            }
        )
    later = np.arange(spec.repeats, n)  # keep the baseline's runs finished
    picks = rng.choice(later, size=min(len(later), 2 + max(1, n // 20)), replace=False)
    for j, i in enumerate(picks):
        mid = [s for s in evals if s < steps] or evals
        plan[i]["last_step"] = int(rng.choice(mid))
        if j < 2:
            plan[i]["status"] = "FAILED"
            bad = plan[i]["last_step"] + int(rng.integers(1, every))
            plan[i]["error"] = (
                f"FloatingPointError: non-finite loss at step {bad}: loss_lm=nan, "
                f"loss_reg={rng.uniform(0.05, 0.5):.4f}"
            )
        else:
            plan[i]["status"] = "KILLED"
    return plan


def curves(
    lam: float, k: int, cfg, last_step: int, rng: np.random.Generator
) -> tuple[list[tuple[int, dict[str, float]]], float]:
    """Per-step metrics shaped like the trainer's, up to ``last_step``; the final accuracy."""
    t = np.arange(1, last_step + 1, dtype=float)
    steps = cfg.max_steps
    # Accuracy: best near λ = 0.2, a little better with more tokens, worse for large λ.
    peak = math.exp(-(((math.log10(lam) + 0.7) / 1.1) ** 2)) if lam > 0 else 0.0
    big = max(0.0, math.log10(lam)) ** 2 if lam > 0 else 0.0
    acc_end = 0.785 + 0.035 * peak + 0.006 * math.log2(k) - 0.05 * big + rng.normal(0, 0.008)
    lm_floor = max(0.15, 0.3 + 2.0 * (0.83 - acc_end))
    lm = lm_floor + (2.4 - lm_floor) * np.exp(-t / 60.0)
    reg_floor = 0.05 + 0.6 / (1.0 + 5.0 * lam)
    reg = reg_floor + (1.0 - reg_floor) * np.exp(-t * (1.0 + 20.0 * lam) / 400.0)
    noisy_lm = lm * rng.lognormal(0, 0.12, t.size)
    noisy_reg = np.clip(reg * rng.lognormal(0, 0.05, t.size), 0, 2)
    warm = max(1, int(cfg.warmup_ratio * steps))
    lr = np.where(
        t <= warm,
        cfg.lr * t / warm,
        cfg.lr * 0.5 * (1 + np.cos(np.pi * (t - warm) / max(1, steps - warm))),
    )
    train = {
        "train/loss_lm": noisy_lm,
        "train/loss_reg": noisy_reg,
        "train/loss_total": noisy_lm + lam * noisy_reg,
        "train/reg_constant": np.full(t.size, lam),
        "train/grad_norm_lm": 1.5 * noisy_lm**0.7 * rng.lognormal(0, 0.25, t.size),
        "train/grad_norm_reg": 0.3 * noisy_reg * rng.lognormal(0, 0.2, t.size),
        "train/lr": lr,
        "train/proj_token_norm": (1 + 3 * (1 - np.exp(-t / 100))) * rng.lognormal(0, 0.02, t.size),
        "train/lm_token_norm": np.full(t.size, 0.63),
    }
    assert set(train) == set(TRAIN_METRICS)
    slugs = [question_slug(q) for q in DIGIT_QUESTIONS]
    offsets = (-0.12, 0.06, 0.06)  # the digit question is the hard one
    out, acc = [], 0.0
    for i, s in enumerate(range(1, last_step + 1)):
        m = {key: float(v[i]) for key, v in train.items()}
        if s % cfg.eval_every == 0 or s == cfg.max_steps:
            acc = 0.37 + (acc_end - 0.37) * (1 - math.exp(-s / 90)) + rng.normal(0, 0.01)
            acc = min(1.0, max(0.0, acc))
            m["val/accuracy"] = acc
            m["val/accuracy_choice"] = min(1.0, acc + 0.025)
            m["val/loss_lm"] = float(lm[i]) + 0.05 + rng.normal(0, 0.01)
            m["val/loss_reg"] = float(reg[i]) + rng.normal(0, 0.005)
            for slug, off in zip(slugs, offsets, strict=True):
                m[f"val/accuracy_by_question/{slug}"] = min(1.0, max(0.0, acc + off))
        out.append((s, m))
    return out, acc


def build_store(uri: str, work: Path, trials: int, steps: int) -> tuple[str, dict]:
    """Write the sweep into ``uri``; returns its id and what was written."""
    spec = make_spec(trials, steps)
    sweep_id = sweep_id_for(trials, steps)
    rng = np.random.default_rng(0)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(spec.experiment)
    if exp is not None:
        exp_id = exp.experiment_id
    elif uri.startswith("sqlite:"):  # keep artifacts beside the store, not in ./mlruns
        exp_id = client.create_experiment(spec.experiment, str(work / "artifacts"))
    else:
        exp_id = client.create_experiment(spec.experiment)

    t0 = int(time.time() * 1000) - 3_600_000 * 6  # the sweep ran some hours ago
    run = client.create_run(exp_id, start_time=t0, run_name=sweep_id, tags={"sweep_id": sweep_id})
    parent_id = run.info.run_id
    rec = work / sweep_id
    rec.mkdir(parents=True, exist_ok=True)
    dumped = yaml.safe_dump(spec.model_dump(mode="json"))
    SweepSpec.model_validate(yaml.safe_load(dumped))  # what sweeper.store reads back
    (rec / "spec.yaml").write_text(dumped)
    client.log_artifact(parent_id, str(rec / "spec.yaml"))
    client.log_batch(
        parent_id,
        params=[
            Param("sampler", spec.search.sampler),
            Param("trials", str(spec.budget.trials)),
            Param("repeats", str(spec.repeats)),
            Param("objective", f"{spec.objective.mode} {spec.objective.metric}"),
        ],
    )

    plan = plan_trials(spec, trials, rng)
    run_ms = int(steps * STEP_S * 1000)
    conc = spec.budget.max_concurrent
    points = batches = 0
    finals: dict[tuple, list[tuple[float, str]]] = {}
    for i, tr in enumerate(plan):
        cfg = trial_config(spec, tr["params"] | {TRIAL_INDEX: tr["repeat"]})
        start = t0 + (i // conc) * run_ms + 1000 * (i % conc)
        shown = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in tr["params"].items()
        )
        child = client.create_run(
            exp_id,
            start_time=start,
            run_name=f"{tr['trial_id']} {shown} seed={cfg.seed}",
            tags={
                "mlflow.parentRunId": parent_id,
                "trial_id": tr["trial_id"],
                "sweep_id": sweep_id,
            },
        )
        run_id = child.info.run_id
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in flatten_config(cfg).items()])
        history, acc = curves(
            tr["params"]["reg_constant"], cfg.token_expansion, cfg, tr["last_step"], rng
        )
        metrics = [
            Metric(key, value, start + int(s * STEP_S * 1000), s)
            for s, m in history
            for key, value in m.items()
        ]
        for j in range(0, len(metrics), MAX_BATCH):
            client.log_batch(run_id, metrics=metrics[j : j + MAX_BATCH])
            batches += 1
        points += len(metrics)
        if "error" in tr:
            client.set_tag(run_id, "error", tr["error"])
        end = start + int(tr["last_step"] * STEP_S * 1000)
        client.set_terminated(run_id, status=tr["status"], end_time=end)
        if tr["status"] != "FAILED":
            key = tuple(sorted((k, str(v)) for k, v in tr["params"].items()))
            finals.setdefault(key, []).append((acc, tr["trial_id"], tr["params"]))
        if (i + 1) % 20 == 0 or i + 1 == len(plan):
            print(f"  setup: {i + 1}/{len(plan)} runs written", flush=True)

    best_key = max(finals, key=lambda g: statistics.mean(a for a, _, _ in finals[g]))
    scored = finals[best_key]
    parent = SweepParentRun(client, parent_id, exp_id)
    parent.log_best(
        {
            "params": scored[0][2],
            "metric": spec.objective.metric,
            "value": statistics.mean(a for a, _, _ in scored),
            "trial_ids": [tid for _, tid, _ in scored],
        }
    )
    parent.end("FINISHED")
    counts = {s: sum(tr["status"] == s for tr in plan) for s in ("FINISHED", "KILLED", "FAILED")}
    return sweep_id, {"points": points, "batches": batches, "statuses": counts}


def find_built(uri: str, sweep_id: str, trials: int) -> bool:
    """Whether ``uri`` already holds this sweep complete (its parent closed FINISHED)."""
    client = MlflowClient(uri)
    parents = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        f"tags.sweep_id = '{sweep_id}' and tags.`mlflow.runName` = '{sweep_id}'",
    )
    for p in parents:
        children = client.search_runs(
            [p.info.experiment_id],
            f"tags.`mlflow.parentRunId` = '{p.info.run_id}'",
            max_results=50_000,
        )
        if p.info.status == "FINISHED" and len(children) == trials:
            return True
        for r in [p, *children]:  # a build that stopped part-way: out of the way
            client.delete_run(r.info.run_id)
    return False


def naive_fetch(uri: str, sweep_id: str) -> tuple[float, int, int]:
    """Seconds to fetch every child's curves key by key; runs and points fetched."""
    t = time.perf_counter()
    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    (parent,) = client.search_runs(
        exps, f"tags.sweep_id = '{sweep_id}' and tags.`mlflow.runName` = '{sweep_id}'"
    )
    children = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
        max_results=50_000,
    )
    points = 0
    for child in children:
        for key in TRAIN_KEYS + VAL_KEYS:
            points += len(client.get_metric_history(child.info.run_id, key))
    return time.perf_counter() - t, len(children), points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--trials", type=int, default=200, help="child runs in the sweep")
    ap.add_argument("--steps", type=int, default=500, help="steps per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tracking-uri", help="default: sqlite:///<tmp folder>/mlflow.db")
    ap.add_argument("--keep", action="store_true", help="keep the store (reused next run)")
    args = ap.parse_args()

    work = Path(tempfile.gettempdir()) / f"sweeper-report-speed-{args.trials}x{args.steps}"
    work.mkdir(parents=True, exist_ok=True)
    uri = args.tracking_uri or f"sqlite:///{work}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri  # anything left to MLflow's default uses it too
    sweep_id = sweep_id_for(args.trials, args.steps)
    print(f"store: {uri}, sweep {sweep_id}", flush=True)

    try:
        t = time.perf_counter()
        if find_built(uri, sweep_id, args.trials):
            print(f"setup: reused the store built earlier ({time.perf_counter() - t:.1f} s)")
        else:
            sweep_id, info = build_store(uri, work, args.trials, args.steps)
            setup_s = time.perf_counter() - t
            print(
                f"setup: {args.trials} runs x {args.steps} steps, {info['points']:,} metric "
                f"points in {info['batches']} log_batch calls, statuses {info['statuses']}: "
                f"{setup_s:.1f} s ({info['points'] / setup_s:,.0f} points/s)",
                flush=True,
            )

        t = time.perf_counter()
        try:
            from sweeper.reports import write_report
        except ImportError as e:  # not written yet: the setup and the baseline still run
            write_report = None
            print(f"sweeper.reports.write_report unavailable ({e}): baseline only")
        else:
            print(f"import sweeper.reports: {time.perf_counter() - t:.2f} s (not timed)")
        times: dict[str, list[float]] = {"naive fetch": [], "write_report": []}
        for r in range(args.repeats):
            fetch_s, n_runs, n_points = naive_fetch(uri, sweep_id)
            times["naive fetch"].append(fetch_s)
            if write_report is None:
                print(
                    f"repeat {r + 1}/{args.repeats}: naive fetch {fetch_s:.2f} s "
                    f"({n_runs} runs, {n_points:,} points)",
                    flush=True,
                )
                continue
            out = work / f"report-{r + 1}"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            html = Path(write_report(sweep_id, out, tracking_uri=uri))
            report_s = time.perf_counter() - t
            times["write_report"].append(report_s)
            pngs = len(list(out.rglob("*.png")))
            print(
                f"repeat {r + 1}/{args.repeats}: naive fetch {fetch_s:.2f} s ({n_runs} runs, "
                f"{n_points:,} points); write_report {report_s:.2f} s ({html.name}, "
                f"{html.stat().st_size / 1e3:.0f} kB, {pngs} PNGs)",
                flush=True,
            )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items() if v}
    print(
        f"\nmachine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, mlflow {mlflow.__version__}"
    )
    print(f"{args.trials} runs x {args.steps} steps, median of {args.repeats}")
    print("| what | median s | runs |")
    print("|---|---|---|")
    for k in med:
        print(f"| {k} | {med[k]:.2f} | {', '.join(f'{x:.2f}' for x in times[k])} |")
    if "write_report" not in med:
        raise SystemExit("no report_build_s: sweeper.reports.write_report is not there yet")
    print(f"report / naive fetch: {med['write_report'] / med['naive fetch']:.2f}")
    print(f"report_build_s: {med['write_report']:.2f}")


if __name__ == "__main__":
    main()
