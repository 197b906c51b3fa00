"""The per-sweep research report: one self-contained HTML file plus a PNG per figure.

Figures (matplotlib, drawn headless): accuracy vs λ per token-expansion factor (mean over
seeds, 95% t-interval, the λ = 0 baseline marked); final LM and reg losses vs λ; both loss
curves over steps with the λ in force; the gradient-norm ratio λ·|∇reg| / |∇lm| that says
which loss drives the projector; Optuna's optimisation history, parameter importances
and parallel coordinates (a study rebuilt from the MLflow records); for a multi-objective
sweep its Pareto set; for a sweep over projector variants (or any categorical field) each
value at its best configuration against the default's, with Welch intervals; and a
sortable table of trials. The HTML embeds the PNGs and a few lines of its own script: no
CDN, no network.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import statistics
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from scipy import stats

from dashboards.data import SweepData, Trial, _typed, load_sweep
from sweeper.spec import pareto_front

CURVE_KEYS = (
    "train/loss_lm",
    "train/loss_reg",
    "train/reg_constant",
    "train/grad_norm_lm",
    "train/grad_norm_reg",
)
_LAM_K = ("reg_constant", "token_expansion")  # the note's two axes; other fields are variants
COLOURS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _last(t: Trial, key: str) -> float | None:
    h = t.history.get(key)
    if h is not None and len(h[1]):
        return float(h[1][-1])
    v = t.metrics.get(key)
    return None if v is None or not math.isfinite(v) else float(v)


def _interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (0 for a single seed)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    sem = statistics.stdev(values) / math.sqrt(len(values))
    return mean, float(stats.t.ppf(0.975, len(values) - 1) * sem)


def configurations(data: SweepData, key: str) -> dict[int, list[dict[str, Any]]]:
    """Per k: one row per configuration (λ, mean, half-width, n seeds), sorted by λ."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    lam_k: dict[tuple, tuple[float, int]] = {}
    for t in data.trials:
        value = _last(t, key)
        if t.status == "FAILED" or t.cut_short or value is None:
            continue
        conf = tuple(sorted((k, str(v)) for k, v in t.searched(data.spec).items()))
        conf = (*conf, ("reg_constant", str(t.reg_constant)), ("k", t.token_expansion))
        groups[conf].append(value)
        lam_k[conf] = (t.reg_constant, t.token_expansion)
    out: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for conf, values in groups.items():
        lam, k = lam_k[conf]
        mean, half = _interval(values)
        out[k].append({"lam": lam, "mean": mean, "half": half, "n": len(values)})
    for rows in out.values():
        rows.sort(key=lambda r: r["lam"])
    return dict(sorted(out.items()))


# ---- figures ---------------------------------------------------------------------------
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


def _best_per_k(data: SweepData) -> dict[int, Trial]:
    best: dict[int, Trial] = {}
    sign = 1 if data.mode == "max" else -1
    for t in data.trials:
        v = _last(t, data.metric)
        if v is None or t.status == "FAILED" or t.cut_short:
            continue
        cur = best.get(t.token_expansion)
        if cur is None or sign * v > sign * (_last(cur, data.metric) or -math.inf * sign):
            best[t.token_expansion] = t
    return dict(sorted(best.items()))


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


def fig_grad_ratio(data: SweepData):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    n = 0
    for i, (label, t) in enumerate(_shown(data).items()):
        h = t.history
        if not {"train/grad_norm_lm", "train/grad_norm_reg"} <= h.keys():
            continue
        steps, g_lm = h["train/grad_norm_lm"]
        s_reg, g_reg = h["train/grad_norm_reg"]
        if "train/reg_constant" in h:
            lam = np.interp(steps, *h["train/reg_constant"])
        else:
            lam = np.full(len(steps), t.reg_constant)
        g_reg = np.interp(steps, s_reg, g_reg)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = lam * g_reg / g_lm
        ok = np.isfinite(ratio) & (ratio > 0)
        if ok.any():
            ax.plot(steps[ok], ratio[ok], lw=1, color=COLOURS[i % len(COLOURS)], label=label)
            n += int(ok.sum())
    ax.axhline(1.0, color="black", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("λ · |∇ reg| / |∇ lm|")
    ax.set_title("Which loss drives the projector (above 1: the reg loss)")
    ax.grid(True, which="both", alpha=0.3)
    if n:
        ax.legend(fontsize=7)
    return fig, n


def study(data: SweepData):
    """An in-memory Optuna study of the sweep's trials, for Optuna's own plots."""
    import optuna

    if data.spec is None:
        return None
    dists = {k: p.distribution() for k, p in data.spec.search.space.items()}
    st = optuna.create_study(direction="maximize" if data.mode == "max" else "minimize")
    for t in data.trials:
        params = t.searched(data.spec)
        if any(v is None for v in params.values()):
            continue
        if not all(_inside(dists[k], v) for k, v in params.items()):
            continue  # a baseline outside the space (λ = 0 beside a log range)
        value = _last(t, data.metric)
        if t.cut_short:
            continue  # half-trained by a cancel: not a measurement of its configuration
        if t.status == "FAILED":
            state, value = optuna.trial.TrialState.FAIL, None
        elif value is None:
            continue
        else:
            state = optuna.trial.TrialState.COMPLETE
        st.add_trial(
            optuna.trial.create_trial(params=params, distributions=dists, value=value, state=state)
        )
    return st


def _inside(dist, value) -> bool:
    try:
        return bool(dist._contains(dist.to_internal_repr(value)))
    except (ValueError, TypeError):
        return False


def fig_optuna(data: SweepData, kind: str):
    import optuna
    from optuna.visualization import matplotlib as ovm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = study(data)
    complete = [] if st is None else st.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    plot = {
        "history": ovm.plot_optimization_history,
        "importances": ovm.plot_param_importances,
        "parallel": ovm.plot_parallel_coordinate,
    }[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if len(complete) < 2:
            raise _Skip(
                f"needs at least 2 completed trials inside the search space (has {len(complete)})"
            )
        try:
            ax = plot(st)
        except (ValueError, RuntimeError) as e:
            raise _Skip(str(e).splitlines()[0]) from None
    ax = np.atleast_1d(ax).ravel()[0]
    fig = ax.figure
    fig.set_size_inches(8, 4.5)
    fig.tight_layout()
    return fig, len(complete)


class _Skip(Exception):
    """A figure with nothing to show yet; the report says why instead."""


class _NotApplicable(Exception):
    """A figure this kind of sweep does not have (a Pareto front of one objective)."""


def _by_configuration(data: SweepData, keys: list[str]) -> list[dict[str, Any]]:
    """Non-failed trials grouped by searched configuration: each key's seed values."""
    groups: dict[tuple, dict[str, Any]] = {}
    for t in data.trials:
        values = [_last(t, k) for k in keys]
        # A running trial's values are half-trained: only ended trials count, KILLED ones
        # only if ASHA or the time budget stopped them (not a cancel), as the driver counts.
        if t.status in ("FAILED", "RUNNING") or t.cut_short or any(v is None for v in values):
            continue
        conf = t.searched(data.spec)
        key = tuple(sorted((k, str(v)) for k, v in conf.items()))
        g = groups.setdefault(key, {"params": conf, **{k: [] for k in keys}})
        for k, v in zip(keys, values, strict=True):
            g[k].append(v)
    return list(groups.values())


def _conf_label(params: dict[str, Any]) -> str:
    short = {"reg_constant": "λ", "token_expansion": "k"}
    return ", ".join(f"{short.get(k, k)}={_fmt(v)}" for k, v in params.items())


def _pareto(data: SweepData) -> tuple[list[dict[str, Any]], list[int]]:
    """Configurations with every objective reported, and the indices of their Pareto set
    (seed means; none beaten on every objective by another)."""
    objs = data.spec.objectives
    confs = _by_configuration(data, [o.metric for o in objs])
    means = [[statistics.fmean(c[o.metric]) for o in objs] for c in confs]
    return confs, pareto_front(means, [o.mode for o in objs])


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


# The default of each trainer field a sweep may search as a variant: the reference the
# variants are compared with.
def _variant_fields(data: SweepData) -> dict[str, Any]:
    if data.spec is None:
        return {}
    base = data.spec.base_config()  # parsed: weight_decay 0 is 0.0, as MLflow holds it
    out = {}
    for name, p in data.spec.search.space.items():
        if name in _LAM_K or not hasattr(p, "choices"):
            continue
        ref = getattr(base, name)
        if ref in p.choices and len(p.choices) > 1:
            out[name] = _typed(str(ref))  # as a trial's param reads back (None: "None")
    return out


def variant_rows(data: SweepData) -> list[dict[str, Any]]:
    """For each searched categorical field (projector, reg_schedule, ...): each value's best
    configuration (by the seed mean of the objective: "at its best λ") against the best of
    the reference value (the field's default), with Welch's 95% interval of the difference.
    """
    key = data.metric
    sign = 1 if data.mode == "max" else -1
    confs = _by_configuration(data, [key])
    rows = []
    for field, ref in _variant_fields(data).items():
        best: dict[Any, dict] = {}
        # Each value's best among its configurations with 2+ seeds where it has any: one
        # lucky seed does not stand for a value that has fully seeded configurations.
        seeded = {c["params"].get(field) for c in confs if len(c[key]) >= 2}
        for c in confs:
            v = c["params"].get(field)
            if v in seeded and len(c[key]) < 2:
                continue
            if v not in best or sign * statistics.fmean(c[key]) > sign * statistics.fmean(
                best[v][key]
            ):
                best[v] = c
        if ref not in best:
            continue
        base = best[ref][key]
        for value, c in best.items():
            row = _variant_row(field, value, ref, c, key)
            if value != ref:
                row |= _versus(c[key], base, sign)
            rows.append(row)
    return rows


def _variant_row(field: str, value: Any, ref: Any, conf: dict, key: str) -> dict[str, Any]:
    """One configuration of a variant: its other settings and its seed mean ± 95%."""
    mean, half = _interval(conf[key])
    others = {k: v for k, v in conf["params"].items() if k != field}
    return {
        "field": field,
        "value": value,
        "reference": ref,
        "config": _conf_label(others),
        "mean": mean,
        "half": half,
        "n": len(conf[key]),
    }


def _versus(values: list[float], base: list[float], sign: int) -> dict[str, Any]:
    """The difference of the means, Welch's 95% half-width, and what they say."""
    diff = statistics.fmean(values) - statistics.fmean(base)
    half_d = _welch_half(values, base)
    if half_d is None:
        verdict = "needs 2+ seeds (that differ) on both sides"
    elif sign * diff > half_d:  # the interval of the difference excludes 0
        verdict = "better"
    elif sign * diff < -half_d:
        verdict = "worse"
    else:
        verdict = "no clear difference"
    return {"diff": diff, "diff_half": half_d, "verdict": verdict}


def matched_rows(data: SweepData) -> list[dict[str, Any]]:
    """Each variant configuration whose twin, the same configuration with the field at its
    default, also ran: the two compared at the same other settings (a one-factor-at-a-time
    design, e.g. ``examples/open-questions-matched.yaml``), which the best-vs-best view
    cannot do when the best configurations differ in other fields too."""
    key = data.metric
    sign = 1 if data.mode == "max" else -1
    confs = _by_configuration(data, [key])
    by_params = {tuple(sorted((k, str(v)) for k, v in c["params"].items())): c for c in confs}
    rows = []
    for field, ref in _variant_fields(data).items():
        for c in confs:
            value = c["params"].get(field)
            if value == ref:
                continue
            twin = by_params.get(
                tuple(sorted((k, str(ref if k == field else v)) for k, v in c["params"].items()))
            )
            if twin is None:
                continue
            ref_mean, ref_half = _interval(twin[key])
            rows.append(
                _variant_row(field, value, ref, c, key)
                | {
                    "ref_mean": ref_mean,
                    "ref_half": ref_half,
                    "ref_n": len(twin[key]),
                    **_versus(c[key], twin[key], sign),
                }
            )
    return sorted(rows, key=lambda r: (r["field"], str(r["value"]), r["config"]))


def _welch_half(a: list[float], b: list[float]) -> float | None:
    """Half-width of Welch's 95% interval for mean(a) - mean(b); None under 2 seeds."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:  # identical seeds on both sides: no spread to judge a difference by
        return None
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return float(stats.t.ppf(0.975, dof) * se)


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


FIGURES: list[tuple[str, str, Callable]] = [
    ("accuracy_vs_lambda", "Accuracy vs reg constant", fig_accuracy),
    ("final_losses_vs_lambda", "Final LM and reg losses vs reg constant", fig_final_losses),
    ("loss_curves", "Loss curves over steps, with the λ in force", fig_curves),
    ("grad_norm_ratio", "Gradient-norm ratio λ·|∇reg| / |∇lm|", fig_grad_ratio),
    ("optuna_history", "Optuna: optimisation history", lambda d: fig_optuna(d, "history")),
    ("optuna_importances", "Optuna: parameter importances", lambda d: fig_optuna(d, "importances")),
    ("optuna_parallel", "Optuna: parallel coordinates", lambda d: fig_optuna(d, "parallel")),
    ("pareto", "Pareto set of the objectives", fig_pareto),
    ("variants", "Variants vs the default, each at its best configuration", fig_variants),
]


# ---- the page --------------------------------------------------------------------------
def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _trial_rows(data: SweepData, mlflow_ui_url: str | None) -> tuple[list[str], list[list]]:
    # Every searched field beyond λ and k gets a column, and so does every objective.
    extra = [k for k in (data.spec.search.space if data.spec else ()) if k not in _LAM_K]
    keys = ["val/accuracy", "val/loss_lm", "val/loss_reg", "train/loss_lm", "train/loss_reg"]
    keys += [o.metric for o in (data.spec.objectives if data.spec else []) if o.metric not in keys]
    head = ["trial", "state", "λ", "k", *extra, "seed", "step", *keys, "MLflow run", "error"]
    rows = []
    for t in data.trials:
        link = t.run_id
        if mlflow_ui_url:
            url = f"{mlflow_ui_url.rstrip('/')}/#/experiments/{data.experiment_id}/runs/{t.run_id}"
            link = f'<a href="{html.escape(url)}">{t.run_id[:12]}</a>'
        rows.append(
            [
                t.trial_id,
                # KILLED says by what: scheduler (ASHA), time_budget, cancel, interrupted
                f"{t.status} ({t.stopped_by})"
                if t.status == "KILLED" and t.stopped_by
                else t.status,
                t.reg_constant,
                t.token_expansion,
                *(_typed(t.params.get(k)) for k in extra),
                t.seed,
                t.step,
                *(_last(t, k) for k in keys),
                link,
                t.error or "",
            ]
        )
    return head, rows


_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach((th, i) => {
  th.addEventListener('click', () => {
    const body = th.closest('table').tBodies[0];
    const asc = th.dataset.dir !== 'asc';
    th.closest('tr').querySelectorAll('th').forEach(h => delete h.dataset.dir);
    th.dataset.dir = asc ? 'asc' : 'desc';
    const key = tr => {
      const c = tr.cells[i];
      const v = c.dataset.v !== undefined ? c.dataset.v : c.textContent;
      const n = parseFloat(v);
      return isNaN(n) ? v : n;
    };
    [...body.rows].sort((a, b) => {
      const x = key(a), y = key(b);
      const r = (typeof x === typeof y) ? (x < y ? -1 : x > y ? 1 : 0)
                                        : (typeof x === 'number' ? -1 : 1);
      return asc ? r : -r;
    }).forEach(tr => body.appendChild(tr));
  });
});
"""

# Marks how many figures the browser decoded (a headless check reads it from the DOM).
_LOADED = """
window.addEventListener('load', () => {
  const ok = [...document.images].filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.figuresLoaded = ok;
});
"""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
.skip { color: #777; font-style: italic; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
th { background: #f3f3f3; cursor: pointer; user-select: none; }
th[data-dir=asc]::after { content: " ▲"; } th[data-dir=desc]::after { content: " ▼"; }
td.FAILED { color: #b00; } td.RUNNING { color: #06c; } td.KILLED { color: #a60; }
.summary td, .summary th { text-align: left; }
"""


def _table(head: list[str], rows: list[list], cls: str = "sortable") -> str:
    out = [f'<table class="{cls}"><thead><tr>']
    out += [f"<th>{html.escape(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>")
        for h, v in zip(head, row, strict=True):
            attr = f' class="{html.escape(str(v).split()[0])}"' if h == "state" else ""
            if isinstance(v, float | int) and not isinstance(v, bool):
                attr += f' data-v="{v}"'
            # Every cell is escaped but the links this module builds itself.
            cell = v if h == "MLflow run" else html.escape(_fmt(v))
            out.append(f"<td{attr}>{cell}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _summary(data: SweepData) -> list[list[str]]:
    counts: dict[str, int] = defaultdict(int)
    for t in data.trials:
        counts[t.status] += 1
    best = _best_per_k(data)
    top = None
    if best:
        pick = max if data.mode == "max" else min
        top = pick(best.values(), key=lambda t: _last(t, data.metric))
    rows = [
        ["sweep", data.sweep_id],
        ["parent run", f"{data.parent_run_id} ({data.parent_status})"],
        ["trials", ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none yet"],
        [
            "objective",
            ", ".join(f"{o.mode} {o.metric}" for o in data.spec.objectives)
            if data.spec
            else f"{data.mode} {data.metric}",
        ],
        ["tracking", data.tracking_uri],
        ["built", time.strftime("%Y-%m-%d %H:%M:%S %Z")],
    ]
    if top is not None:
        rows.insert(
            4,
            [
                "best trial",
                f"{top.trial_id}: {data.metric} = "
                f"{_last(top, data.metric):.4f} at λ = {top.reg_constant:.4g}, "
                f"k = {top.token_expansion}",
            ],
        )
    return rows


def _answer_tables(data: SweepData) -> list[str]:
    """The Pareto set and the variant comparison as tables, where the sweep has them."""
    out = []
    objs = data.spec.objectives if data.spec else []
    if len(objs) > 1:
        keys = [o.metric for o in objs]
        confs, front = _pareto(data)
        if not front:
            out.append(
                '<h2>Pareto set</h2><p class="skip">Not yet: no ended trial has reported '
                f"{html.escape(', '.join(keys))}.</p>"
            )
        else:
            rows = []
            for i in front:
                cells = [_conf_label(confs[i]["params"])]
                for k in keys:
                    mean, half = _interval(confs[i][k])
                    cells.append(f"{mean:.4f} ± {half:.4f}" if half else f"{mean:.4f}")
                rows.append([*cells, str(len(confs[i][keys[0]]))])
            out.append(
                "<h2>Pareto set</h2><p>Configurations no other one beats on every objective "
                "(seed means, ± the 95% interval).</p>"
                + _table(["configuration", *[f"{o.mode} {o.metric}" for o in objs], "seeds"], rows)
            )
    variants = variant_rows(data) if _variant_fields(data) else []
    if variants:
        rows = [
            [
                r["field"],
                str(r["value"]),
                r["config"],
                f"{r['mean']:.4f} ± {r['half']:.4f}",
                str(r["n"]),
                ""
                if "diff" not in r
                else f"{r['diff']:+.4f}"
                + ("" if r["diff_half"] is None else f" ± {r['diff_half']:.4f}"),
                r.get("verdict", "reference"),
            ]
            for r in variants
        ]
        out.append(
            f"<h2>Does each variant beat the default?</h2><p>Each value's best configuration "
            f"by the seed mean of {html.escape(data.metric)} (its best λ and k), against the "
            "default's best; the difference with Welch's 95% interval. Picking the best of "
            "several configurations favours values that had more of them.</p>"
            + _table(["field", "value", "at", data.metric, "seeds", "vs default", "verdict"], rows)
        )
    matched = matched_rows(data) if _variant_fields(data) else []
    if matched:
        rows = [
            [
                r["field"],
                f"{r['value']} vs {r['reference']}",
                r["config"],
                f"{r['mean']:.4f} ± {r['half']:.4f} ({r['n']})",
                f"{r['ref_mean']:.4f} ± {r['ref_half']:.4f} ({r['ref_n']})",
                f"{r['diff']:+.4f}"
                + ("" if r["diff_half"] is None else f" ± {r['diff_half']:.4f}"),
                r["verdict"],
            ]
            for r in matched
        ]
        out.append(
            "<h2>Matched: each variant against the default at the same other settings</h2>"
            "<p>Every configuration whose twin (the same settings, the field at its default) "
            "also ran; seed means ± 95% (seeds), the difference with Welch's 95% interval. "
            "Unlike the best-vs-best table, nothing else differs between the two.</p>"
            + _table(
                ["field", "variant", "at", "variant mean", "default mean", "difference", "verdict"],
                rows,
            )
        )
    return out


def render(data: SweepData, out: Path, mlflow_ui_url: str | None = None) -> Path:
    """Write ``out/report.html`` and one PNG per figure; returns the HTML path."""
    out.mkdir(parents=True, exist_ok=True)
    data.load_histories(list(_shown(data).values()), CURVE_KEYS)  # only the drawn curves
    sections, figures = [], {}
    for name, title, build in FIGURES:
        try:
            fig, points = build(data)
        except _NotApplicable:
            continue
        except _Skip as e:
            sections.append(
                f'<h2>{html.escape(title)}</h2><p class="skip">Not yet: {html.escape(str(e))}</p>'
            )
            continue
        if not points:
            plt.close(fig)
            sections.append(f'<h2>{html.escape(title)}</h2><p class="skip">No data yet.</p>')
            continue
        png = _png(fig)
        (out / f"{name}.png").write_bytes(png)
        figures[name] = points
        b64 = base64.b64encode(png).decode()
        sections.append(
            f'<h2>{html.escape(title)}</h2><figure id="{name}">'
            f'<img alt="{html.escape(title)}" src="data:image/png;base64,{b64}"></figure>'
        )
    sections += _answer_tables(data)
    head, rows = _trial_rows(data, mlflow_ui_url)
    failed = [t for t in data.trials if t.status == "FAILED"]
    failed_html = ""
    if failed:
        items = "".join(
            f"<li>{html.escape(t.trial_id)} (λ = {t.reg_constant:.4g}, "
            f"k = {t.token_expansion}): {html.escape(t.error or 'failed')}</li>"
            for t in failed
        )
        failed_html = f"<h2>Failed trials</h2><ul>{items}</ul>"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Sweep report: {html.escape(data.sweep_id)}</title>
<style>{_STYLE}</style></head>
<body>
<h1>Sweep report: {html.escape(data.sweep_id)}</h1>
{_table(["", ""], _summary(data), cls="summary")}
{"".join(sections)}
{failed_html}
<h2>Trials</h2>
<p>Click a column to sort.</p>
{_table(head, rows)}
<script>{_SCRIPT}{_LOADED}</script>
<script type="application/json" id="figures">{json.dumps(figures)}</script>
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path


def write_report(
    sweep_id: str,
    out: str | Path,
    tracking_uri: str | None = None,
    experiment_id: str | None = None,
    mlflow_ui_url: str | None = None,
    log_to_mlflow: bool = False,
) -> Path:
    """Build the report of one sweep from MLflow into ``out``; returns ``out/report.html``.

    With ``log_to_mlflow`` it is also logged to the sweep's parent run (folder ``report``).
    """
    data = load_sweep(sweep_id, tracking_uri, experiment_id)
    path = render(data, Path(out), mlflow_ui_url)
    if log_to_mlflow:
        data.client.log_artifacts(data.parent_run_id, str(path.parent), "report")
    return path


def publish(sweep_id: str, out: str | Path, *args, **kwargs) -> Path:
    """:func:`write_report`, logged to the sweep's parent run."""
    return write_report(sweep_id, out, *args, **kwargs, log_to_mlflow=True)


def write_compare(sweep_ids: list[str], out: str | Path, tracking_uri: str | None = None) -> Path:
    """Several sweeps' accuracy vs λ overlaid (a line per sweep and k): ``out/compare.html``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sweeps = [load_sweep(s, tracking_uri) for s in sweep_ids]
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
    png = _png(fig)
    (out / "compare_accuracy_vs_lambda.png").write_bytes(png)
    rows = []
    for data in sweeps:
        for k, confs in configurations(data, "val/accuracy").items():
            for r in confs:
                rows.append([data.sweep_id, k, r["lam"], r["mean"], r["half"], r["n"]])
    head = ["sweep", "k", "λ", "val/accuracy", "± 95%", "seeds"]
    b64 = base64.b64encode(png).decode()
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sweep comparison</title>
<style>{_STYLE}</style></head><body>
<h1>Sweep comparison: {html.escape(", ".join(sweep_ids))}</h1>
<figure id="compare"><img alt="accuracy vs λ" src="data:image/png;base64,{b64}"></figure>
<h2>Configurations</h2><p>Click a column to sort.</p>
{_table(head, rows)}
<script>{_SCRIPT}</script>
<script type="application/json" id="figures">{json.dumps({"compare": points})}</script>
</body></html>
"""
    path = out / "compare.html"
    path.write_text(page)
    return path
