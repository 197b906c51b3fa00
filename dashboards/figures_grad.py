"""The gradient figure: which loss drives the projector. Per configuration, the mean over
its seeds of the unweighted ratio |∇reg| / |∇lm| on the projector's parameters (and, where
λ is neither 0 nor 1, the ratio times the λ in force) and of the cosine between the two
gradients (a moving mean: it is noisy step to step)."""

from __future__ import annotations

import numpy as np

from dashboards.data import SweepData, Trial
from dashboards.figures import COLOURS, _shown, plt
from dashboards.html import _conf_label
from trainer.metrics import GRAD_COS


def _grad_curves(t: Trial) -> tuple | None:
    """A trial's steps, unweighted |∇reg| / |∇lm|, the λ in force and cos(∇lm, ∇reg)."""
    h = t.history
    if not {"train/grad_norm_lm", "train/grad_norm_reg"} <= h.keys():
        return None
    steps, g_lm = h["train/grad_norm_lm"]
    g_reg = np.interp(steps, *h["train/grad_norm_reg"])
    lam = (
        np.interp(steps, *h["train/reg_constant"])
        if "train/reg_constant" in h
        else np.full(len(steps), t.reg_constant)
    )
    cos = np.interp(steps, *h[GRAD_COS]) if GRAD_COS in h else np.full(len(steps), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(g_lm > 0, g_reg / g_lm, np.nan)
    return steps, ratio, lam, cos


def _grad_groups(data: SweepData) -> dict[str, list[Trial]]:
    """The curves to draw: with repeats (at most 8 configurations), each configuration's
    seeds together (their mean is drawn); else the trials ``_shown`` picks, one each."""
    confs: dict[str, list[Trial]] = {}
    differing = _differing(data)
    for t in data.trials:
        if t.history:
            others = {k: v for k, v in t.params.items() if k in differing}
            confs.setdefault(_conf_label(others) or "all", []).append(t)
    if len(confs) <= 8 and any(len(ts) > 1 for ts in confs.values()):
        return dict(sorted(confs.items()))
    return {label: [t] for label, t in _shown(data).items()}


def _differing(data: SweepData) -> set[str]:
    """The parameters that differ between trials, but the seed: what a configuration is."""
    keys = {k for t in data.trials for k in t.params} - {"seed", "device"}
    return {k for k in keys if len({t.params.get(k) for t in data.trials}) > 1}


def _smooth(y: np.ndarray, width: int = 20) -> np.ndarray:
    """A centred moving average (the cosine is noisy step to step), over the points there
    are: the window shrinks at the ends instead of averaging in zeros."""
    if len(y) < width:
        return y
    kernel = np.ones(width)
    finite = np.isfinite(y)
    total = np.convolve(np.where(finite, y, 0.0), kernel, mode="same")
    count = np.convolve(finite.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore"):
        return total / count


def fig_grad_ratio(data: SweepData):
    """Which loss drives the projector: |∇reg| / |∇lm| on its parameters (solid; dashed:
    times the λ in force, the pull the reg term actually exerts) and the cosine between
    the two gradients, per configuration as the mean over its seeds."""
    fig, (ax, ax_cos) = plt.subplots(1, 2, figsize=(14, 4.5))
    n = 0
    for i, (label, trials) in enumerate(_grad_groups(data).items()):
        curves = [c for c in map(_grad_curves, trials) if c is not None]
        if not curves:
            continue
        c = COLOURS[i % len(COLOURS)]
        steps = curves[0][0]
        ratio, lam, cos = (
            np.nanmean([np.interp(steps, cv[0], cv[j]) for cv in curves], axis=0) for j in (1, 2, 3)
        )
        seeds = f" ({len(curves)} seeds)" if len(curves) > 1 else ""
        ok = np.isfinite(ratio) & (ratio > 0)
        if ok.any():
            ax.plot(steps[ok], ratio[ok], lw=1, color=c, label=label + seeds)
            n += int(ok.sum())
            weighted = ok & (lam > 0) & ~np.isclose(lam, 1.0)
            if weighted.any():
                ax.plot(steps[weighted], (lam * ratio)[weighted], lw=1, ls="--", color=c)
        if np.isfinite(cos).any():
            ax_cos.plot(steps, _smooth(cos), lw=1, color=c, label=label + seeds)
            n += len(steps)
    ax.axhline(1.0, color="black", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("|∇ reg| / |∇ lm| on the projector")
    ax.set_title("Which loss drives the projector (dashed: × λ; above 1: the reg loss)")
    ax.grid(True, which="both", alpha=0.3)
    ax_cos.axhline(0.0, color="black", lw=0.8, ls=":")
    ax_cos.set_xlabel("step")
    ax_cos.set_ylabel("cos(∇ lm, ∇ reg), 20-step moving mean")
    ax_cos.set_title("Do the two losses pull together (> 0) or apart (< 0)?")
    ax_cos.grid(True, alpha=0.3)
    if n:
        ax.legend(fontsize=7)
        ax_cos.legend(fontsize=7)
    fig.tight_layout()
    return fig, n
