"""Orchestration overhead and parallel efficiency of a sweep.

Four ways to run the same N trials (same spec, random sampler and seed, so the same
configurations; same per-trial resources: one CPU thread each):

* ``plain``: plain Optuna in this process, trials back to back (``study.ask``,
  ``trainer.train``, ``study.tell``), the model loaded once;
* ``plain x2``: the same configurations in two plain worker processes at once (no Ray, no
  MLflow): what this machine itself gives two concurrent trials;
* ``sweep x1``: ``run_sweep`` with ``max_concurrent: 1`` (Ray Tune trials, MLflow parent
  and child runs, checkpoints, state file);
* ``sweep x2``: the same with ``max_concurrent: 2`` on 2 cores.

Overhead per trial = (sweep x1 - plain) / N. Parallel efficiency = plain / (2 * sweep x2)
(the headline). Beside it, the machine's own ceiling plain / (2 * plain x2), and the share
of that ceiling the sweep keeps, plain x2 / sweep x2.
Ray starts once before any timing. Each mode runs ``--repeats`` times; medians are reported.

    python bench/sweep_overhead.py                     # smollm2-135m + digits, ~30 s trials
    python bench/sweep_overhead.py --model tiny-llama --dataset DIR --steps 300   # smoke

Last line: ``parallel_efficiency: X``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import optuna
import torch

from sweeper.driver import init_ray, prepare_sources, run_sweep
from sweeper.search import make_sampler
from sweeper.spec import SweepSpec
from sweeper.store import SweepRecord
from trainer import train


def make_spec(args, concurrency: int) -> SweepSpec:
    return SweepSpec.model_validate(
        {
            "name": "bench",
            "trainer": {
                "model": args.model,
                "dataset": args.dataset,
                "max_steps": args.steps,
                "eval_every": args.steps,
                "eval_examples": 64,
                "batch_size": 32,
                "device": "cpu",
            },
            "search": {
                "sampler": "random",
                "seed": 0,
                "space": {
                    "reg_constant": {"type": "float", "low": 1e-3, "high": 10.0, "log": True},
                    "token_expansion": {"type": "categorical", "choices": [1, 2]},
                },
            },
            "budget": {"trials": args.trials, "max_concurrent": concurrency},
            "resources": {"cpu": 1},
        }
    )


def plain(spec: SweepSpec) -> float:
    """Plain Optuna, back to back, one thread: the baseline."""
    torch.set_num_threads(1)
    dists = {k: p.distribution() for k, p in spec.search.space.items()}
    study = optuna.create_study(direction="maximize", sampler=make_sampler(spec))
    t0 = time.perf_counter()
    for _ in range(spec.budget.trials or 1):
        trial = study.ask(dists)
        result = train(spec.trainer_config(trial.params))
        study.tell(trial, result.metrics[spec.objective.metric])
    return time.perf_counter() - t0


def _one(args: tuple[dict, dict]) -> float:
    spec_dict, params = args
    torch.set_num_threads(1)
    spec = SweepSpec.model_validate(spec_dict)
    return train(spec.trainer_config(params)).metrics[spec.objective.metric]


def plain_parallel(spec: SweepSpec) -> float:
    """The same configurations in two plain processes at once (the random sampler's
    proposals do not depend on results, so they can be drawn up front)."""
    import multiprocessing as mp

    dists = {k: p.distribution() for k, p in spec.search.space.items()}
    study = optuna.create_study(direction="maximize", sampler=make_sampler(spec))
    configs = [study.ask(dists).params for _ in range(spec.budget.trials or 1)]
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        pool.map(_one, [(spec.model_dump(), {}) for _ in range(2)])  # load model and data
        t0 = time.perf_counter()
        list(pool.imap_unordered(_one, [(spec.model_dump(), c) for c in configs]))
        return time.perf_counter() - t0


def sweep(spec: SweepSpec) -> float:
    rec = SweepRecord.create(spec)
    t0 = time.perf_counter()
    state = run_sweep(rec)
    elapsed = time.perf_counter() - t0
    assert state["status"] == "succeeded", state
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--steps", type=int, default=40, help="steps per trial (~30 s on smollm2)")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="sweep-bench-")
    os.environ["SWEEPER_HOME"] = os.path.join(work, "sweeps")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prepare_sources(make_spec(args, 1))
    init_ray()

    times: dict[str, list[float]] = {"plain": [], "plain x2": [], "sweep x1": [], "sweep x2": []}
    for r in range(args.repeats):
        times["plain"].append(plain(make_spec(args, 1)))
        times["plain x2"].append(plain_parallel(make_spec(args, 2)))
        times["sweep x1"].append(sweep(make_spec(args, 1)))
        times["sweep x2"].append(sweep(make_spec(args, 2)))
        print(
            f"repeat {r + 1}/{args.repeats}: "
            + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()),
            flush=True,
        )

    med = {k: statistics.median(v) for k, v in times.items()}
    n = args.trials
    print(
        f"\nmachine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}"
    )
    print(f"model {args.model}, {n} trials x {args.steps} steps, median of {args.repeats}")
    for k, v in med.items():
        print(f"{k:9s}: {v:7.1f} s  ({v / n:.1f} s per trial)")
    print(f"mean trial length (plain): {med['plain'] / n:.1f} s")
    print(f"overhead per trial: {(med['sweep x1'] - med['plain']) / n:.2f} s")
    print(f"machine ceiling, plain / (2 * plain x2): {med['plain'] / (2 * med['plain x2']):.2f}")
    print(f"share of the ceiling the sweep keeps: {med['plain x2'] / med['sweep x2']:.2f}")
    print(f"parallel_efficiency: {med['plain'] / (2 * med['sweep x2']):.2f}")


if __name__ == "__main__":
    main()
