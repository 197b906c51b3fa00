"""The report's tables and answers: the trial table, the summary, Pareto set and variants."""

from __future__ import annotations

import html
import statistics
import time
from collections import defaultdict
from typing import Any

from dashboards.data import SweepData, _typed
from dashboards.html import _conf_label, _table
from dashboards.paired import baseline_rows, paired_difference
from dashboards.stats import (
    _best_per_k,
    _by_configuration,
    _interval,
    _last,
    _pareto,
    _welch_half,
    by_seed,
)
from trainer.metrics import (
    ACCURACY,
    LOSS_LM,
    LOSS_REG,
    PROBE_RETAINED,
    VAL_LOSS_LM,
    VAL_LOSS_REG,
)

_LAM_K = ("reg_constant", "token_expansion")  # the note's two axes; other fields are variants


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
    the reference value (the field's default): the difference paired by seed (Welch's
    interval only where the two share fewer than 2 seeds).
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
        for value, c in best.items():
            row = _variant_row(field, value, ref, c, key)
            if value != ref:
                row |= _versus(c, best[ref], key, sign)
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


def _versus(conf: dict, base: dict, key: str, sign: int) -> dict[str, Any]:
    """``conf`` against ``base`` on ``key``: the mean paired difference over the seeds both
    ran and its 95% t-interval (seed s is the same initialisation and batch order in both);
    Welch's unpaired interval only where they share fewer than 2 seeds."""
    d = paired_difference(by_seed(conf, key), by_seed(base, key))
    if d is not None and d.n >= 2:
        return {
            "diff": d.mean,
            "diff_half": d.half,
            "verdict": d.verdict(sign),
            "paired": d.n,
            "no_spread": d.no_spread,
        }
    values, base_v = conf[key], base[key]
    diff = statistics.fmean(values) - statistics.fmean(base_v)
    half_d = _welch_half(values, base_v)
    if half_d is None:
        verdict = "needs 2+ seeds (that differ) on both sides"
    elif sign * diff > half_d:  # the interval of the difference excludes 0
        verdict = "better"
    elif sign * diff < -half_d:
        verdict = "worse"
    else:
        verdict = "cannot tell"
    return {"diff": diff, "diff_half": half_d, "verdict": verdict, "paired": 0}


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
                    **_versus(c, twin, key, sign),
                }
            )
    return sorted(rows, key=lambda r: (r["field"], str(r["value"]), r["config"]))


def _trial_rows(data: SweepData, mlflow_ui_url: str | None) -> tuple[list[str], list[list]]:
    # Every searched field beyond λ and k gets a column, and so does every objective.
    extra = [k for k in (data.spec.search.space if data.spec else ()) if k not in _LAM_K]
    keys = [ACCURACY, VAL_LOSS_LM, VAL_LOSS_REG, LOSS_LM, LOSS_REG]
    keys += [o.metric for o in (data.spec.objectives if data.spec else []) if o.metric not in keys]
    head = ["trial", "state", "λ", "k", *extra, "seed", "step", *keys, "MLflow run", "error"]
    rows = []
    for t in data.trials:
        link = html.escape(t.run_id)  # from MLflow, or from a CSV anyone may have edited
        if mlflow_ui_url:
            url = f"{mlflow_ui_url.rstrip('/')}/#/experiments/{data.experiment_id}/runs/{t.run_id}"
            link = f'<a href="{html.escape(url)}">{html.escape(t.run_id[:12])}</a>'
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
        ["parent run", f"{data.parent_run_id} ({data.parent_status})"]
        if not data.sources
        else ["pooled from", ", ".join(data.sources)],
        ["trials", ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none yet"],
        [
            "objective",
            ", ".join(f"{o.mode} {o.metric}" for o in data.spec.objectives)
            if data.spec
            else f"{data.mode} {data.metric}",
        ],
        ["tracking", data.tracking_uri or "(none: exported data)"],
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
    baseline = _baseline_table(data)
    if baseline:
        out.append(baseline)
    variants = variant_rows(data) if _variant_fields(data) else []
    if variants:
        rows = [
            [
                r["field"],
                str(r["value"]),
                r["config"],
                f"{r['mean']:.4f} ± {r['half']:.4f}",
                str(r["n"]),
                "" if "diff" not in r else _diff_cell(r),
                r.get("verdict", "reference"),
            ]
            for r in variants
        ]
        out.append(
            f"<h2>Does each variant beat the default?</h2><p>Each value's best configuration "
            f"by the seed mean of {html.escape(data.metric)} (its best λ and k), against the "
            "default's best; the mean difference paired by seed with its 95% t-interval. "
            "Picking the best of several configurations favours values that had more of "
            "them, and a sampler's own choices are no evidence: read the matched table.</p>"
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
                _diff_cell(r),
                r["verdict"],
            ]
            for r in matched
        ]
        out.append(
            "<h2>Matched: each variant against the default at the same other settings</h2>"
            "<p>Every configuration whose twin (the same settings, the field at its default) "
            "also ran; seed means ± 95% (seeds), the mean difference paired by seed with its "
            "95% t-interval. Unlike the best-vs-best table, nothing else differs between the "
            "two.</p>"
            + _table(
                ["field", "variant", "at", "variant mean", "default mean", "difference", "verdict"],
                rows,
            )
        )
    return out


def _baseline_table(data: SweepData) -> str:
    """Each configuration against λ = 0 at the same other settings, paired by seed: the
    objective, and what the probe retained where the trials report it."""
    keys = [data.metric]
    if any(PROBE_RETAINED in t.metrics for t in data.trials) and PROBE_RETAINED not in keys:
        keys.append(PROBE_RETAINED)
    rows = []
    for r in baseline_rows(data, keys):
        d = r["diff"]
        sign = -1 if (r["key"] == data.metric and data.mode == "min") else 1
        verdict = d.verdict(sign)
        if verdict == "cannot tell" and d.rules_out() is not None:
            verdict += f" (rules out |difference| > {d.rules_out():.3f})"
        rows.append(
            [
                r["key"],
                r["config"],
                f"{r['lam']:.4g}",
                f"{r['mean']:.4f}",
                f"{r['base_mean']:.4f}",
                d.text("+.4f"),
                verdict,
            ]
        )
    if not rows:
        return ""
    return (
        "<h2>Against λ = 0, paired by seed</h2><p>Each configuration with λ > 0 against the "
        "same configuration at λ = 0 (same k, projector and every other searched field): "
        "the mean of the per-seed differences [95% t-interval] (n seeds). Seed s is the same "
        "initialisation and batch order in both, so the seeds' own spread cancels. "
        "'cannot tell' where the interval holds 0.</p>"
        + _table(["metric", "at", "λ", "mean", "λ = 0 mean", "paired difference", "verdict"], rows)
    )


def _diff_cell(r: dict[str, Any]) -> str:
    """A difference ± its 95% half-width, and whether it was paired by seed."""
    half = "" if r["diff_half"] is None else f" ± {r['diff_half']:.4f}"
    if r.get("no_spread"):
        half = " (every seed the same difference: no interval)"
    how = f" (paired, {r['paired']} seeds)" if r.get("paired") else " (unpaired)"
    return f"{r['diff']:+.4f}{half}{how}"
