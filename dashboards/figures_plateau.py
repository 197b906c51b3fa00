"""The plateau figure: did the trials train to the plateau before their end points were
compared? Per configuration (the trials that count, grouped as the answers group them), the
validation accuracy and the retained fraction of the held-out questions at each evaluation,
as the mean over the seeds that reported it with the 95% t-interval of that mean (a band,
where 2+ seeds did), the second half again on its own scale with the last fifth shaded:
the span the answers' "p" rows measure (end vs 4/5 of the steps)."""

from __future__ import annotations

import numpy as np

from dashboards.answers import _counted, _label
from dashboards.data import SweepData, Trial
from dashboards.figures import COLOURS, plt
from dashboards.paired import _key
from dashboards.stats import _interval
from trainer.metrics import ACCURACY, PROBE_RETAINED

# (metric, y label, from halfway: the second half alone, where a plateau is read)
PANELS = (
    (ACCURACY, "validation accuracy", False),
    (ACCURACY, "validation accuracy, second half", True),
    (PROBE_RETAINED, "retained fraction of the held-out questions (validation)", False),
)
MAX_CONFIGURATIONS = 10  # beyond it, those with the most seeds (the legend stays readable)


def _groups(data: SweepData) -> dict[str, list[Trial]]:
    """The trials that count, by configuration (their searched fields), labelled as the
    answers label them; at most ``MAX_CONFIGURATIONS``, those with the most seeds."""
    confs: dict[tuple, tuple[str, list[Trial]]] = {}
    for t in _counted(data):
        params = t.searched(data.spec)
        confs.setdefault(_key(params), (_label(params) or "all", []))[1].append(t)
    ranked = sorted(confs.values(), key=lambda c: -len(c[1]))[:MAX_CONFIGURATIONS]
    return dict(sorted(ranked))


def _seed_band(trials: list[Trial], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Every step any trial reported ``key`` at, the mean there over the seeds that did,
    the half-width of its 95% t-interval (NaN where fewer than 2 finite values), and how
    many trials drew the curve (0: none)."""
    curves = [t.history[key] for t in trials if key in t.history and len(t.history[key][0])]
    if not curves:
        return np.array([]), np.array([]), np.array([]), 0
    steps = np.unique(np.concatenate([s for s, _ in curves]))
    mean, half = np.full(len(steps), np.nan), np.full(len(steps), np.nan)
    for i, step in enumerate(steps):
        vals = [float(v[s == step][0]) for s, v in curves if (s == step).any()]
        vals = [x for x in vals if np.isfinite(x)]
        if vals:
            mean[i], h = _interval(vals)
            half[i] = h if len(vals) > 1 else np.nan
    return steps, mean, half, len(curves)


def fig_plateau(data: SweepData):
    """Validation accuracy and retained fraction over training, per configuration: seed
    mean (line) and its 95% interval (band), the last fifth of the steps shaded (each
    configuration's own last fifth, dotted, where they end at different steps)."""
    fig, axes = plt.subplots(1, len(PANELS), figsize=(18, 4.5))
    n, ends, groups = 0, {}, _groups(data)
    for ax, (key, ylabel, zoom) in zip(axes, PANELS, strict=True):
        for i, (label, trials) in enumerate(groups.items()):
            steps, mean, half, seeds = _seed_band(trials, key)
            if not seeds:
                continue
            if zoom:
                kept = steps >= steps[-1] / 2
                steps, mean, half = steps[kept], mean[kept], half[kept]
            c = COLOURS[i % len(COLOURS)]
            suffix = f" ({seeds} seeds)" if seeds > 1 else ""
            ax.plot(steps, mean, lw=1.2, marker=".", color=c, label=label + suffix)
            ax.fill_between(steps, mean - half, mean + half, color=c, alpha=0.15, lw=0)
            n += 0 if zoom else int(np.isfinite(mean).sum())
            ends[label] = (float(steps[-1]), c)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    if n:
        same = len({end for end, _ in ends.values()}) == 1
        for ax in axes:
            for end, c in ends.values():
                if same:
                    ax.axvspan(0.8 * end, end, color="grey", alpha=0.12, lw=0)
                    break
                ax.axvline(0.8 * end, color=c, lw=0.8, ls=":")
            if ax.get_lines():
                ax.legend(fontsize=7)
    axes[0].set_title("Trained to the plateau? (band: 95% interval of the seed mean)")
    axes[1].set_title("The second half (shaded: the last fifth, the plateau check)")
    axes[2].set_title("Held-out: 1 = the raw embedding's probe, 0 = chance")
    fig.tight_layout()
    return fig, n
