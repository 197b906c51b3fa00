"""Steps/s of the trainer's fast LM path, in both prompt layouts, against the plain
reference path.

All run the real training loop (``trainer.train``) on the same model, data, batches and
seed; only ``lm_path`` and ``prompt_layout`` differ: ``question_first`` (the default: the
question's KV cache computed once, then the image tokens) and ``image_first`` (LLaVA's
layout: a cached fixed prefix, image, question; answer-only logits), against
``reference`` (image first, logits at every position).
A step's time is the gap between two consecutive ``report`` calls; the first steps
(warm-up) and the final step (it evaluates) are dropped. Each path runs ``--repeats``
times, interleaved, and the median step time is reported.

    python bench/trainer_speed.py                      # smollm2-135m + digits, batch 32
    python bench/trainer_speed.py --model tiny-llama   # seconds, for a smoke run

Last line: ``speedup: X`` (the default fast path's steps/s, question_first, over the
reference's); the image_first ratio is printed above it.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import time

import torch

from trainer import TrainerConfig, train


def step_times(cfg: TrainerConfig, warmup: int) -> list[float]:
    stamps: list[float] = []
    train(cfg, lambda step, m: stamps.append(time.perf_counter()))
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return gaps[warmup:-1]  # the last gap contains the final evaluation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--token-expansion", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12, help="steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="steps dropped at the start")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()

    base = dict(
        model=args.model,
        dataset=args.dataset,
        batch_size=args.batch_size,
        token_expansion=args.token_expansion,
        max_steps=args.steps,
        eval_every=args.steps,
        eval_examples=1,
        eval_at_start=False,
        device=args.device,
        precision=args.precision,
    )
    variants = {
        "image_first": dict(lm_path="fast", prompt_layout="image_first"),
        "question_first": dict(lm_path="fast", prompt_layout="question_first"),
        "reference": dict(lm_path="reference"),
    }
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.repeats):
        for path, how in variants.items():
            t = step_times(TrainerConfig(**base, **how), args.warmup)
            times[path].extend(t)
            med = statistics.median(t)
            print(f"repeat {r + 1}/{args.repeats} {path:14s}: median step {med:.3f} s")

    dev = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    print(
        f"\nmachine: {platform.node()} {platform.machine()}, {torch.get_num_threads()} threads, "
        f"device {dev}, torch {torch.__version__}"
    )
    print(
        f"model {args.model}, dataset {args.dataset}, batch {args.batch_size}, "
        f"k={args.token_expansion}, {len(times['reference'])} timed steps per path"
    )
    sps = {p: 1.0 / statistics.median(t) for p, t in times.items()}
    for p, v in sps.items():
        print(f"{p:14s}: {v:.3f} steps/s (median step {1 / v:.3f} s)")
    print(f"image_first over reference: {sps['image_first'] / sps['reference']:.2f}")
    print(f"speedup: {sps['question_first'] / sps['reference']:.2f}")


if __name__ == "__main__":
    main()
