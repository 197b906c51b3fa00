"""Search efficiency: trial-steps each search strategy spends to come near the best.

The research sweep's space (``examples/reg-vs-expansion.yaml``: λ log-uniform over four
decades, k in {1, 2, 4, 8}) on the digits task, searched by tpe, random and grid, each
with and without ASHA, over several search seeds.

Two phases:

1. **The table** (once, cached): every configuration of a λ grid × k is trained for real
   (``trainer.train``, the frozen LM, digits) and its validation accuracy at each
   evaluation is stored in ``$SWEEPER_CACHE_DIR/bench/``. An interrupted fill continues
   where it stopped; a rerun with the same settings costs nothing. ``--train-seeds N``
   trains N seeds of each configuration of ``--expansions``; a configuration's accuracy
   is the mean of the seeds the table holds for it.
2. **The searches**: each strategy runs as a real Ray Tune sweep with the product's own
   searcher (``sweeper.search.make_searcher``: OptunaSearch with the spec's sampler) and
   ASHA (``sweeper.driver.make_scheduler``), one trial at a time, where a trial replays
   its configuration's cached curve instead of training. λ is searched log-uniformly over
   [10^-3.5, 10^1.5] and a proposal is answered by the nearest λ of the table in log
   space (each table value owns an equal slice of the range); grid walks the table itself.
   Where the table holds several seeds of a configuration, the exact λ proposed picks the
   one replayed: two proposals in one slice are two trainings, as in a real sweep, and
   may see different seeds (seed-to-seed spread is the noise a real search works against).

A sweep's cost is the steps its trials ran (an ASHA-stopped trial counts the steps it ran
before the stop). For each sweep we record the steps spent until a trial first ended
within ``--tolerance`` (default 1 accuracy point) of the best configuration's (seed-mean)
final accuracy in the table; a sweep that never gets there counts as not reached. Figures
are medians over the search seeds.

    python bench/search_efficiency.py                       # smollm2-135m + digits
    python bench/search_efficiency.py --model tiny-llama --dataset DIR --steps 20  # smoke

Last line: ``tpe_asha_vs_random: X``, the median steps TPE + ASHA needed over the median
steps random search without early stopping needed (target: at most 0.5). A sweep that
never reached the target counts, on the TPE + ASHA side, as needing infinitely many steps
and, on the random side, as needing only the steps it spent (it needed more): so the
figure is an upper bound on the true ratio whenever some random sweep missed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
EXPANSIONS = (1, 2, 4, 8)  # --expansions chooses among them
STRATEGIES = [(s, a) for s in ("tpe", "random", "grid") for a in (False, True)]


# --- phase 1: the table -----------------------------------------------------------------


def table_settings(args) -> dict:
    return {
        "model": args.model,
        "dataset": args.dataset,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "eval_examples": args.eval_examples,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }


def table_path(settings: dict) -> Path:
    """The cache of trained configurations: one file per training setting, so the grid can
    grow (more k, more λ) without retraining what is there."""
    from trainer.sources import cache_dir

    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "bench" / f"search-efficiency-{key}.json"


def _train_one(settings: dict, lam: float, k: int, seed: int) -> dict:
    import torch

    from trainer import TrainerConfig, train

    torch.set_num_threads(1)
    cfg = TrainerConfig(
        model=settings["model"],
        dataset=settings["dataset"],
        reg_constant=lam,
        token_expansion=k,
        max_steps=settings["steps"],
        eval_every=settings["eval_every"],
        eval_examples=settings["eval_examples"],
        batch_size=settings["batch_size"],
        seed=seed,
    )
    curve: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    train(
        cfg,
        lambda step, m: curve.append((step, m["val/accuracy"])) if "val/accuracy" in m else None,
    )
    return {
        "reg_constant": lam,
        "token_expansion": k,
        "seed": seed,
        "curve": curve,
        "seconds": time.perf_counter() - t0,
    }


def run_seed(run: dict, settings: dict) -> int:
    """The training seed of a table run (runs from before seeds were recorded: the table's)."""
    return run.get("seed", settings["seed"])


def fill_table(
    settings: dict,
    workers: int,
    expansions: tuple[int, ...],
    path: Path | None = None,
    train_seeds: int = 1,
) -> dict:
    path = path or table_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = json.loads(path.read_text()) if path.exists() else {"settings": settings, "runs": []}
    if table["settings"] != settings:
        raise SystemExit(
            f"{path}: its table was trained with {table['settings']}, not {settings}; "
            "name another --table file"
        )
    done = {(r["reg_constant"], r["token_expansion"], run_seed(r, settings)) for r in table["runs"]}
    seeds = range(settings["seed"], settings["seed"] + train_seeds)
    todo = [
        (lam, k, seed)
        for seed in seeds
        for k in expansions
        for lam in LAMBDAS
        if (lam, k, seed) not in done
    ]
    if todo:
        print(f"table: training {len(todo)} configurations into {path}", flush=True)
        # Load the shared model/data once here, so the workers find them prepared.
        from trainer.data import load_dataset
        from trainer.sources import resolve_model

        resolve_model(settings["model"]), load_dataset(settings["dataset"])
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_train_one, settings, *job) for job in todo]
            for fut in as_completed(futures):
                run = fut.result()
                table["runs"].append(run)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(table))
                os.replace(tmp, path)
                print(
                    f"  λ={run['reg_constant']:g} k={run['token_expansion']} seed {run['seed']}: "
                    "final accuracy "
                    f"{run['curve'][-1][1]:.3f} ({run['seconds']:.0f} s; "
                    f"{len(table['runs']) - len(done)}/{len(todo)})",
                    flush=True,
                )
    else:
        print(f"table: every run asked for is cached in {path}")
    table["runs"] = [r for r in table["runs"] if r["token_expansion"] in expansions]
    return table


# --- phase 2: the searches --------------------------------------------------------------


def snap(lam: float) -> float:
    """The table's λ nearest to ``lam`` in log space."""
    return min(LAMBDAS, key=lambda x: abs(math.log10(x) - math.log10(lam)))


def bench_spec(
    sampler: str,
    asha: bool,
    seed: int,
    trials: int,
    settings: dict,
    grace: int,
    expansions: tuple[int, ...],
):
    from sweeper.spec import SweepSpec

    lo, hi = math.log10(LAMBDAS[0]) - 0.5, math.log10(LAMBDAS[-1]) + 0.5
    lam = (
        {"type": "categorical", "choices": list(LAMBDAS)}
        if sampler == "grid"
        else {"type": "float", "low": 10**lo, "high": 10**hi, "log": True}
    )
    return SweepSpec.model_validate(
        {
            "name": f"bench-{sampler}",
            "trainer": {"max_steps": settings["steps"], "eval_every": settings["eval_every"]},
            "search": {
                "sampler": sampler,
                "seed": seed,
                "space": {
                    "reg_constant": lam,
                    "token_expansion": {"type": "categorical", "choices": list(expansions)},
                },
            },
            "objective": {"metric": "val/accuracy", "mode": "max"},
            "budget": {"trials": trials, "max_concurrent": 1},
            "early_stopping": {"type": "asha", "grace_period": grace, "reduction_factor": 2}
            if asha
            else None,
        }
    )


def pick_seed(config: dict, n: int) -> int:
    """Which of a configuration's ``n`` trained seeds a proposal replays: fixed by the exact
    λ proposed, so a search replays the same way every time, while two proposals in one λ
    slice (two trainings in a real sweep) may see different seeds."""
    return zlib.crc32(repr(float(config["reg_constant"])).encode()) % n


def replay(config: dict, curves: dict) -> None:
    from ray import tune

    runs = curves[(snap(config["reg_constant"]), int(config["token_expansion"]))]
    curve = runs[pick_seed(config, len(runs))]
    started = time.time_ns()  # trials run one at a time: this orders them
    for step, acc in curve:
        tune.report({"step": step, "val/accuracy": acc, "started_ns": started})


def run_search(spec, curves: dict) -> list[tuple[int, float]]:
    """One sweep over the table: (steps run, last accuracy) per trial, in start order."""
    from ray import tune
    from ray.tune import RunConfig, TuneConfig

    from sweeper.driver import make_scheduler
    from sweeper.search import make_searcher

    tuner = tune.Tuner(
        tune.with_parameters(replay, curves=curves),
        tune_config=TuneConfig(
            metric=spec.objective.metric,
            mode=spec.objective.mode,
            search_alg=make_searcher(spec),
            scheduler=make_scheduler(spec),
            num_samples=spec.budget.trials,
            max_concurrent_trials=1,
            reuse_actors=True,
        ),
        run_config=RunConfig(verbose=0, storage_path=os.environ["BENCH_TUNE_DIR"]),
    )
    grid = tuner.fit()
    results = sorted(grid, key=lambda r: r.metrics["started_ns"])
    return [(r.metrics["step"], r.metrics["val/accuracy"]) for r in results]


def steps_to_reach(trials: list[tuple[int, float]], target: float) -> int | None:
    spent = 0
    for steps, acc in trials:
        spent += steps
        if acc >= target:
            return spent
    return None


def tpe_asha_vs_random(
    figures: dict, tpe: list[int] | None = None, rnd: list[int] | None = None
) -> tuple[float, float]:
    """The headline ratio, and random search's median need (over the search seeds ``tpe``
    and ``rnd`` pick, default all). Conservative both ways (see the module docstring): an
    upper bound on the true ratio."""
    t_seeds, r_seeds = figures["tpe + asha"]["per_seed"], figures["random"]["per_seed"]
    tpe_need = statistics.median(
        math.inf if t_seeds[i]["steps_to_target"] is None else t_seeds[i]["steps_to_target"]
        for i in (tpe if tpe is not None else range(len(t_seeds)))
    )
    random_need = statistics.median(
        r_seeds[i]["steps_to_target"] or r_seeds[i]["steps_total"]
        for i in (rnd if rnd is not None else range(len(r_seeds)))
    )
    return tpe_need / random_need, random_need


def bootstrap(figures: dict, n: int = 4000) -> tuple[float, float, float]:
    """95% percentile interval of the ratio over search seeds resampled with replacement,
    and the share of resamples at or below 0.5. Resampled in pairs: search seed i of tpe
    starts from the same seeded random draws as seed i of random search (Optuna's startup
    trials), so the two sweeps of one seed are not independent."""
    import random

    rng = random.Random(0)
    seeds = range(len(figures["random"]["per_seed"]))
    ratios = []
    for _ in range(n):
        pick = rng.choices(seeds, k=len(seeds))
        ratios.append(tpe_asha_vs_random(figures, pick, pick)[0])
    ratios.sort()
    return ratios[int(0.025 * n)], ratios[int(0.975 * n) - 1], sum(r <= 0.5 for r in ratios) / n


def plot(figures: dict, out: Path, n_configs: int, tolerance: float) -> None:
    """Steps to the target per strategy: each search seed a dot, the median a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = list(figures)
    ceiling = max(p["steps_total"] for f in figures.values() for p in f["per_seed"])
    for i, name in enumerate(names):
        f = figures[name]
        med = f["median_steps_to_target"]
        ax.bar(
            i,
            med if math.isfinite(med) else ceiling,
            color="C1" if "asha" in name else "C0",
            alpha=0.5 if math.isfinite(med) else 0.15,
        )
        for j, p in enumerate(f["per_seed"]):
            y = p["steps_to_target"]
            x = i + (j - len(f["per_seed"]) / 2) * 0.7 / len(f["per_seed"])
            ax.plot(x, ceiling if y is None else y, "x" if y is None else "o", color="black", ms=4)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("trial-steps until within tolerance of the best")
    ax.set_title(
        f"Steps each search spends to come within {tolerance * 100:g} accuracy point(s) of the "
        f"best of {n_configs} configurations\n(bar: median over search seeds; x: not reached)",
        fontsize=9,
    )
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--steps", type=int, default=100, help="steps per trial")
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--eval-examples", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0, help="training seed of the table")
    ap.add_argument("--workers", type=int, default=2, help="table-filling processes")
    ap.add_argument(
        "--expansions",
        type=int,
        nargs="+",
        default=list(EXPANSIONS),
        choices=EXPANSIONS,
        help="the k of the table and the search space",
    )
    ap.add_argument(
        "--table",
        type=Path,
        default=None,
        help="the table's file (default: the cache); name one in the repository to keep it",
    )
    ap.add_argument(
        "--train-seeds",
        type=int,
        default=1,
        help="training seeds per configuration to train into the table (--seed, --seed+1, ...)",
    )
    ap.add_argument("--fill-only", action="store_true", help="train the table, search nothing")
    ap.add_argument(
        "--replay-seeds",
        type=int,
        default=None,
        help="search over the first N training seeds of each configuration (default: all)",
    )
    ap.add_argument("--search-seeds", type=int, default=5)
    ap.add_argument("--trials", type=int, default=24, help="trials per tpe/random sweep")
    ap.add_argument("--grace", type=int, default=None, help="ASHA grace period (steps)")
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--plot", type=Path, default=None, help="write a PNG of the figures here")
    args = ap.parse_args()
    for name in ("train_seeds", "replay_seeds"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")

    settings = table_settings(args)
    expansions = tuple(sorted(args.expansions))
    table = fill_table(settings, args.workers, expansions, args.table, args.train_seeds)
    if args.fill_only:
        return
    curves: dict[tuple[float, int], list] = {}
    for r in sorted(table["runs"], key=lambda r: run_seed(r, settings)):
        runs = curves.setdefault((r["reg_constant"], r["token_expansion"]), [])
        if args.replay_seeds is None or len(runs) < args.replay_seeds:
            runs.append(r["curve"])
    # A configuration's accuracy: the mean final accuracy of its trained seeds.
    final = {c: statistics.fmean(run[-1][1] for run in runs) for c, runs in curves.items()}
    best = max(final.values())
    target = best - args.tolerance
    near = sorted(c for c, acc in final.items() if acc >= target)
    n_seeds = sorted({len(runs) for runs in curves.values()})
    print(f"\ntraining seeds per configuration: {'/'.join(map(str, n_seeds))}")
    print(f"best (seed-mean) final accuracy in the table: {best:.4f}; target {target:.4f}")
    print(f"configurations within tolerance: {near} of {len(curves)}")
    lucky = sorted(
        (lam, k, i)
        for (lam, k), runs in curves.items()
        for i, run in enumerate(runs)
        if run[-1][1] >= target and (lam, k) not in near
    )
    if lucky:  # a trial is judged by what it scored, as a sweep would judge it
        print(f"single runs that reach it in configurations that do not (λ, k, seed): {lucky}")
    print("\nλ \\ k  " + "  ".join(f"{k:>6}" for k in expansions))
    for lam in LAMBDAS:
        row = "  ".join(f"{final[(lam, k)]:6.3f}" for k in expansions)
        print(f"{lam:<7g}{row}")

    import tempfile

    import ray

    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    grace = args.grace or args.eval_every
    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-se-") as tmp:
        os.environ["BENCH_TUNE_DIR"] = tmp
        for sampler, asha in STRATEGIES:
            name = f"{sampler}{' + asha' if asha else ''}"
            trials = len(curves) if sampler == "grid" else args.trials
            per_seed = []
            for seed in range(args.search_seeds):
                spec = bench_spec(sampler, asha, seed, trials, settings, grace, expansions)
                ran = run_search(spec, curves)
                per_seed.append(
                    {
                        "steps_to_target": steps_to_reach(ran, target),
                        "steps_total": sum(s for s, _ in ran),
                        "trials": len(ran),
                    }
                )
            reached = [p["steps_to_target"] for p in per_seed if p["steps_to_target"] is not None]
            # A sweep that never reached the target counts as needing more than it spent.
            ranked = sorted(
                p["steps_to_target"] if p["steps_to_target"] is not None else math.inf
                for p in per_seed
            )
            med = statistics.median(ranked)
            figures[name] = {
                "median_steps_to_target": med,
                "reached": f"{len(reached)}/{len(per_seed)}",
                "median_steps_total": statistics.median(p["steps_total"] for p in per_seed),
                "per_seed": per_seed,
            }
            print(
                f"{name:<14} median steps to target {med:>8} (reached {len(reached)}/"
                f"{len(per_seed)}), median steps spent {figures[name]['median_steps_total']}",
                flush=True,
            )
    ray.shutdown()
    print(
        f"\nmachine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, python "
        f"{sys.version.split()[0]}"
    )
    ratio, random_needed = tpe_asha_vs_random(figures)
    low, high, at_most_half = bootstrap(figures)
    print(
        f"random search needed at least {random_needed:g} steps (median, a sweep that missed "
        "counted at the steps it spent)"
    )
    print(
        f"bootstrap over search seeds: 95% interval {low:.2f}-{high:.2f}; "
        f"{at_most_half:.1%} of resamples at or below 0.5"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "settings": settings,
                    "best": best,
                    "target": target,
                    "near": near,
                    "figures": figures,
                    "ratio": ratio,
                    "ratio_95": [low, high],
                    "resamples_at_most_half": at_most_half,
                },
                indent=2,
            )
        )
    if args.plot:
        plot(figures, args.plot, len(curves), args.tolerance)
    print(f"tpe_asha_vs_random: {ratio:.2f}")


if __name__ == "__main__":
    main()
