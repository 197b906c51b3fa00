"""The report's figures (matplotlib): metrics against λ per k, curves, Pareto set, variants."""

from __future__ import annotations

import io
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np

from dashboards.data import SweepData, Trial
from dashboards.html import _conf_label
from dashboards.stats import _best_per_k, _interval, _pareto, configurations
from dashboards.tables import _variant_fields, variant_rows
from trainer.metrics import (
    GRAD_COS,
    GRAD_NORM_LM,
    GRAD_NORM_REG,
    LOSS_LM,
    LOSS_REG,
    PROBE_RETAINED,
    REG_CONSTANT,
)

CURVE_KEYS = (LOSS_LM, LOSS_REG, REG_CONSTANT, GRAD_NORM_LM, GRAD_NORM_REG, GRAD_COS)
COLOURS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


class _Skip(Exception):
    """A figure with nothing to show yet; the report says why instead."""


class _NotApplicable(Exception):
    """A figure this kind of sweep does not have (a Pareto front of one objective)."""


def _vs_lambda(ax, data: SweepData, key: str, ylabel: str) -> int:
    """Mean ± 95% interval of ``key`` against λ (log), a line per k; λ = 0 as a dashed line."""
    drawn = 0
    for i, (k, rows) in enumerate(configurations(data, key).items()):
        colour = COLOURS[i % len(COLOURS)]
        pos = [r for r in rows if r["lam"] > 0]
        if pos:
            ax.errorbar(
                [r["lam"] for r in pos],
                [r["mean"] for r in pos],
                yerr=[r["half"] for r in pos],
                marker="o",
                capsize=3,
                color=colour,
                label=f"k = {k}",
            )
            drawn += len(pos)
        for r in rows:
            if r["lam"] == 0:
                ax.axhline(
                    r["mean"],
                    ls="--",
                    color=colour,
                    alpha=0.8,
                    label=f"λ = 0 baseline, k = {k} (n={r['n']})",
                )
                if r["half"]:
                    ax.axhspan(
                        r["mean"] - r["half"], r["mean"] + r["half"], color=colour, alpha=0.1
                    )
                drawn += 1
    if any(r["lam"] > 0 for rows in configurations(data, key).values() for r in rows):
        ax.set_xscale("log")
    ax.set_xlabel("reg constant λ")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    return drawn


def fig_accuracy(data: SweepData):
    key = data.metric if data.metric.startswith("val/") else "val/accuracy"
    fig, ax = plt.subplots(figsize=(8, 5))
    n = _vs_lambda(ax, data, key, key)
    ax.set_title(
        f"{key} vs reg constant, per token-expansion factor k (mean over seeds, 95% interval)",
        fontsize=10,
    )
    return fig, n


def fig_final_losses(data: SweepData):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    n = 0
    for ax, key in zip(axes, ("loss_lm", "loss_reg"), strict=True):
        src = (
            f"val/{key}" if any(f"val/{key}" in t.metrics for t in data.trials) else f"train/{key}"
        )
        n += _vs_lambda(ax, data, src, f"final {src}")
        ax.set_title(f"final {src} vs λ")
    fig.tight_layout()
    return fig, n


def _shown(data: SweepData) -> dict[str, Trial]:
    """The trials whose curves are drawn: all of them up to 12, else the best per k."""
    if len(data.trials) <= 12:
        return {
            f"{t.trial_id} k={t.token_expansion} λ={t.reg_constant:.3g}": t for t in data.trials
        }
    return {
        f"best k={k}: {t.trial_id} λ={t.reg_constant:.3g}": t for k, t in _best_per_k(data).items()
    }


def fig_curves(data: SweepData):
    shown = _shown(data)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    n = 0
    for i, (label, t) in enumerate(shown.items()):
        c = COLOURS[i % len(COLOURS)]
        for ax, key in zip(
            axes, ("train/loss_lm", "train/loss_reg", "train/reg_constant"), strict=True
        ):
            if key in t.history:
                steps, values = t.history[key]
                ax.plot(steps, values, color=c, lw=1, label=label)
                n += len(steps)
    for ax, title in zip(axes, ("train/loss_lm", "train/loss_reg", "λ in force"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    if shown:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig, n


def fig_retained(data: SweepData):
    """What the probe kept of the held-out questions, (probe − chance) / (ceiling − chance):
    its seed mean vs λ per k, and each λ's paired difference from λ = 0 at the same k."""
    if not any(PROBE_RETAINED in t.metrics for t in data.trials):
        raise _NotApplicable
    from dashboards.paired import baseline_rows

    fig, (ax, ax_d) = plt.subplots(1, 2, figsize=(14, 5))
    n = _vs_lambda(ax, data, PROBE_RETAINED, "retained (1: all the raw embedding holds)")
    ax.set_title("Retained vs λ per k (seed means, 95% t-interval)", fontsize=10)
    by_k: dict[int, list] = {}
    for r in baseline_rows(data, [PROBE_RETAINED]):
        by_k.setdefault(r["k"], []).append(r)
    for i, (k, rows) in enumerate(sorted(by_k.items())):
        rows.sort(key=lambda r: r["lam"])
        # no interval (no spread) is drawn as none: NaN, not a zero-width bar
        ax_d.errorbar(
            [r["lam"] * 1.04**i for r in rows],  # dodged, so the k's intervals don't overlap
            [r["diff"].mean for r in rows],
            yerr=[np.nan if r["diff"].half is None else r["diff"].half for r in rows],
            marker="o",
            capsize=3,
            color=COLOURS[i % len(COLOURS)],
            label=f"k = {k} (n = {min(r['diff'].n for r in rows)} seeds)",
        )
        n += len(rows)
    ax_d.axhline(0.0, color="black", lw=0.8)
    if by_k:
        ax_d.set_xscale("log")
        # ticks at the λ run, and room either side: with one λ the dodge alone spans 4%,
        # and matplotlib would label that span as 1.005×10^0, 1.01×10^0, ...
        lams = sorted({r["lam"] for rows in by_k.values() for r in rows})
        ax_d.set_xlim(lams[0] / 2, lams[-1] * 2 * 1.04 ** len(by_k))
        ax_d.set_xticks(lams, [f"{lam:g}" for lam in lams])
        ax_d.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax_d.legend(fontsize=8)
    ax_d.set_xlabel("reg constant λ")
    ax_d.set_ylabel("retained(λ) − retained(0), same seed")
    ax_d.set_title("Paired difference from λ = 0 (95% t-interval)", fontsize=10)
    ax_d.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig, n


def fig_pareto(data: SweepData):
    """Multi-objective sweeps: each configuration on the first two objectives (seed means,
    95% intervals), the Pareto set (no configuration better on every objective) marked."""
    objs = data.spec.objectives if data.spec else []
    if len(objs) < 2:
        raise _NotApplicable
    keys = [o.metric for o in objs]
    confs, front = _pareto(data)
    if not confs:
        raise _Skip(f"no configuration has reported {', '.join(keys)} yet")
    fig, ax = plt.subplots(figsize=(8, 5.5))
    x, y = keys[0], keys[1]
    for i, c in enumerate(confs):
        (mx, hx), (my, hy) = _interval(c[x]), _interval(c[y])
        on = i in front
        ax.errorbar(
            mx,
            my,
            xerr=hx,
            yerr=hy,
            fmt="o" if on else ".",
            color=COLOURS[0] if on else "grey",
            alpha=1.0 if on else 0.6,
            capsize=2,
        )
        if on:
            ax.annotate(
                _conf_label(c["params"]),
                (mx, my),
                fontsize=7,
                xytext=(4, 4),
                textcoords="offset points",
            )
    pts = sorted((statistics.fmean(confs[i][x]), statistics.fmean(confs[i][y])) for i in front)
    ax.plot(*zip(*pts, strict=True), color=COLOURS[0], lw=1, ls="--", label="Pareto set")
    ax.set_xlabel(f"{x} ({objs[0].mode})")
    ax.set_ylabel(f"{y} ({objs[1].mode})")
    extra = f"; also {', '.join(keys[2:])}" if len(keys) > 2 else ""
    ax.set_title(f"Pareto set: {len(front)} of {len(confs)} configurations{extra}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig, len(confs)


def fig_variants(data: SweepData):
    """Each variant at its best configuration against the default's best, with intervals."""
    if not _variant_fields(data):
        raise _NotApplicable
    rows = variant_rows(data)
    fields = list(dict.fromkeys(r["field"] for r in rows))
    if not fields:
        raise _Skip("no configuration of a default value has reported yet")
    fig, axes = plt.subplots(1, len(fields), figsize=(5.5 * len(fields), 4), squeeze=False)
    for ax, field in zip(axes[0], fields, strict=True):
        mine = [r for r in rows if r["field"] == field]
        ys = np.arange(len(mine))
        for y, r in zip(ys, mine, strict=True):
            ref = r["value"] == r["reference"]
            ax.errorbar(
                r["mean"],
                y,
                xerr=r["half"],
                fmt="s" if ref else "o",
                capsize=3,
                color="black" if ref else COLOURS[1],
            )
            if ref:
                ax.axvline(r["mean"], color="black", lw=0.8, ls=":")
        labels = [f"{r['value']}\n({r['config']})" for r in mine]
        ax.set_yticks(ys, labels, fontsize=7)
        ax.set_xlabel(f"{data.metric} (best configuration, mean ± 95%)")
        ax.set_title(f"{field}: vs {mine[0]['reference']}", fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return fig, len(rows)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def fig_compare(sweeps: list[SweepData]):
    """Several sweeps' accuracy vs λ overlaid: a line per sweep and k, λ = 0 as a line."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    markers, points = "osD^v<>p*h", 0
    for i, data in enumerate(sweeps):
        for j, (k, rows) in enumerate(configurations(data, "val/accuracy").items()):
            pos = [r for r in rows if r["lam"] > 0]
            colour, marker = COLOURS[j % len(COLOURS)], markers[i % len(markers)]
            label = f"{data.sweep_id}, k = {k}"
            if pos:
                ax.errorbar(
                    [r["lam"] for r in pos],
                    [r["mean"] for r in pos],
                    yerr=[r["half"] for r in pos],
                    marker=marker,
                    capsize=3,
                    color=colour,
                    ls=("-", "--", ":", "-.")[i % 4],
                    label=label,
                )
                points += len(pos)
            for r in rows:
                if r["lam"] == 0:
                    ax.axhline(r["mean"], color=colour, ls=":", alpha=0.7, label=f"{label}, λ = 0")
                    points += 1
    ax.set_xscale("log")
    ax.set_xlabel("reg constant λ")
    ax.set_ylabel("val/accuracy")
    ax.set_title("val/accuracy vs λ across sweeps (mean over seeds, 95% interval)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if points:
        ax.legend(fontsize=7)
    return fig, points


def fig_paired(rows: list[dict]):
    """The between-configuration differences (b, c, e) as intervals around 0, one panel per
    quantity; returns (figure, points drawn)."""
    shown = [r for r in rows if r["question"] in "bce"]
    quantities = list(dict.fromkeys(r["quantity"] for r in shown))
    if not quantities:
        return None, 0
    fig, axes = plt.subplots(
        len(quantities), 1, figsize=(9, 1.1 + 0.45 * len(shown)), squeeze=False
    )
    for ax, qty in zip(axes[:, 0], quantities, strict=True):
        mine = [r for r in shown if r["quantity"] == qty]
        ys = np.arange(len(mine))
        colours = ["tab:gray" if r["verdict"].startswith("cannot") else "tab:blue" for r in mine]
        for y, r, c in zip(ys, mine, colours, strict=True):
            if r["low"] is None:  # no interval (too few seeds, or no spread): a hollow mark
                ax.scatter([r["mean"]], [y], facecolors="none", edgecolors=c, zorder=3, s=30)
                continue
            err = [[r["mean"] - r["low"]], [r["high"] - r["mean"]]]
            ax.errorbar([r["mean"]], [y], xerr=err, fmt="none", ecolor=c, capsize=3)
            ax.scatter([r["mean"]], [y], c=[c], zorder=3, s=18)
        ax.axvline(0, color="black", lw=0.8, ls=":")
        ax.set_yticks(
            ys, [f"{r['question']}: {r['comparison']} ({r['at']})" for r in mine], fontsize=7
        )
        ax.set_title(
            f"{qty}: paired difference, 95% interval (grey: cannot tell; hollow: no interval)",
            fontsize=9,
        )
        ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return fig, len(shown)
