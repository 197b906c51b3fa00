"""The plateau figure: did the trials train to the plateau before their end points were
compared? Per configuration, the validation accuracy and the retained fraction of the
held-out questions at every evaluation, as the mean over its seeds with the 95%
t-interval of that mean (a band), the last fifth of the steps shaded: the span the
answers' "p" rows measure (end vs 4/5 of the steps)."""

from __future__ import annotations

import numpy as np

from dashboards.data import SweepData, Trial
from dashboards.figures import COLOURS, plt
from dashboards.figures_grad import _grad_groups
from dashboards.stats import _interval
from trainer.metrics import ACCURACY, PROBE_RETAINED

# (metric, y label, from halfway: the second half alone, where a plateau is read)
PANELS = (
    (ACCURACY, "validation accuracy", False),
    (ACCURACY, "validation accuracy, second half", True),
    (PROBE_RETAINED, "retained fraction of the held-out questions (validation)", False),
)


def _seed_band(trials: list[Trial], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The evaluation steps every trial reported ``key`` at, the seed mean there and the
    half-width of its 95% t-interval, and how many trials drew it (0: none did)."""
    curves = [t.history[key] for t in trials if key in t.history and len(t.history[key][0])]
    if not curves:
        return np.array([]), np.array([]), np.array([]), 0
    steps = curves[0][0]
    for s, _ in curves[1:]:
        steps = np.intersect1d(steps, s)
    if not len(steps):
        return steps, steps, steps, 0
    at = [[float(v[np.searchsorted(s, step)]) for s, v in curves] for step in steps]
    stats = [_interval([x for x in vals if np.isfinite(x)] or [np.nan]) for vals in at]
    mean = np.array([m for m, _ in stats])
    half = np.array([h for _, h in stats])
    return steps, mean, half, len(curves)


def fig_plateau(data: SweepData):
    """Validation accuracy and retained fraction over training, per configuration: seed
    mean (line) and its 95% interval (band), the last fifth of the steps shaded."""
    fig, axes = plt.subplots(1, len(PANELS), figsize=(18, 4.5))
    n, last = 0, 0.0
    groups = _grad_groups(data)
    for ax, (key, ylabel, zoom) in zip(axes, PANELS, strict=True):
        for i, (label, trials) in enumerate(groups.items()):
            steps, mean, half, seeds = _seed_band(trials, key)
            if zoom and seeds:
                kept = steps >= steps[-1] / 2
                steps, mean, half = steps[kept], mean[kept], half[kept]
            if not seeds:
                continue
            c = COLOURS[i % len(COLOURS)]
            suffix = f" ({seeds} seeds)" if seeds > 1 else ""
            ax.plot(steps, mean, lw=1.2, marker=".", color=c, label=label + suffix)
            if seeds > 1:
                ax.fill_between(steps, mean - half, mean + half, color=c, alpha=0.15, lw=0)
            n += len(steps) if not zoom else 0
            last = max(last, float(steps[-1]))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    if n:
        for ax in axes:
            ax.axvspan(0.8 * last, last, color="grey", alpha=0.12, lw=0)
            if ax.get_lines():
                ax.legend(fontsize=7)
    axes[0].set_title("Trained to the plateau? (band: 95% interval of the seed mean)")
    axes[1].set_title("The second half (shaded: the last fifth, the plateau check)")
    axes[2].set_title("Held-out: 1 = the raw embedding's probe, 0 = chance")
    fig.tight_layout()
    return fig, n
