"""Bounds on a spec's numbers and on the trainer counters a spec may set (docs/service.md,
"Limits"): far past any real sweep, short of what overflowed a seed, a step counter or
Ray's resource arithmetic."""

from __future__ import annotations

from typing import Any

# Bounds on a spec's numbers (docs/service.md, "Limits"): far past any real sweep, but short
# of what overflowed a seed, a step counter or Ray's resource arithmetic (10^100 was taken).
MAX_TRIALS = 100_000
MAX_CONCURRENT = 1_000
MAX_REPEATS = 100
MAX_SEED = 2**31 - 1  # numpy's and torch's seeds, with room for repeats
MAX_FAILURES = 100
MAX_STEPS = 10_000_000
MAX_TIME_BUDGET_S = 366 * 86_400.0
MAX_CPU, MAX_GPU, MAX_MEMORY_GB = 1_024.0, 64.0, 16_384.0
MAX_CHOICES = MAX_POINTS = 1_000
# Trainer fields bounded here as well as by the trainer's own checks (which leave them open).
TRAINER_BOUNDS = {
    "max_steps": (1, MAX_STEPS),
    "batch_size": (1, 1_000_000),
    "eval_every": (1, MAX_STEPS),
    "checkpoint_every": (0, MAX_STEPS),
    "reg_schedule_steps": (0, MAX_STEPS),
    "eval_examples": (1, 100_000_000),
    "projector_hidden": (1, 2**24),  # the OOM fault test asks for 2M on purpose
    "seed": (0, MAX_SEED),
}


def out_of_bounds(values: dict[str, Any]) -> str | None:
    """``"<field>: ..."`` for the first trainer value outside :data:`TRAINER_BOUNDS`."""
    for name, (low, high) in TRAINER_BOUNDS.items():
        value = values.get(name)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and not low <= value <= high:
            return f"{name}: must be between {low:,} and {high:,}"
    return None
