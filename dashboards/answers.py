"""The note's questions, answered from a sweep's records with comparisons paired by seed.

Where the trials hold out questions (``probe_questions``), delay one (``delayed_questions``)
and record both losses' gradients, the report answers, each as a mean difference over seeds
with its 95% t-interval (``dashboards.paired``) and "cannot tell" where it holds 0:

a. Does training discard the held-out factor? ``val/probe_retained`` at the end minus at
   step 0 (the untrained projector), within each trial.
b. Does λ > 0 keep more of it, and at what cost? λ > 0 against the same configuration at
   λ = 0: retained (val and test), accuracy on the questions trained from the start.
c. Does λ > 0 help the delayed question? Its accuracy and NLL at the first evaluation after
   it joins and at the end, against λ = 0.
d. Which loss drives the projector? ``|∇ reg| / |∇ lm|`` and ``train/grad_cos``, mean over
   the first and the last fifth of the steps, and late minus early within each trial.
e. Does a wider k keep more? Each k against the smallest k at the same λ.
p. Trained to the plateau? ``val/accuracy`` and ``val/probe_retained`` at the end minus at
   the last evaluation at or before 4/5 of the steps, within each trial.

``answer_rows`` gives the rows (also written as ``answers.json`` beside the report, the data
behind a findings page); ``answers_table`` the HTML section.
"""

from __future__ import annotations

import ast
import contextlib
import statistics
from typing import Any

import numpy as np

from dashboards.data import SweepData, Trial, _histories
from dashboards.paired import PairedDifference, _float, _key, paired_difference

RETAINED = "val/probe_retained"
TEST_RETAINED = "test/probe_retained"
G_LM, G_REG, G_COS = "train/grad_norm_lm", "train/grad_norm_reg", "train/grad_cos"


def _slug(question: str) -> str:
    from trainer.metrics import question_slug  # the trainer's own naming of a question

    return question_slug(question)


def _counted(data: SweepData) -> list[Trial]:
    """Ended trials whose figures count (as the report's other tables count them)."""
    return [t for t in data.trials if t.counts]


def _delayed(data: SweepData) -> dict[str, int]:
    """The delayed questions and the step each joins: the spec's, or (sweeps read back from
    their exported data) the trials' own parameter."""
    if data.spec:
        return dict(getattr(data.spec.base_config(), "delayed_questions", {}) or {})
    for t in data.trials:
        with contextlib.suppress(ValueError, SyntaxError, TypeError):
            found = ast.literal_eval(t.params.get("delayed_questions", "None"))
            if isinstance(found, dict):
                return found
    return {}


def _trained_questions(data: SweepData, trials: list[Trial]) -> list[str]:
    """Slugs of the questions trained from step 0 (not delayed; held-out ones have no
    accuracy of their own)."""
    late = {_slug(q) for q in _delayed(data)}
    prefix = "val/accuracy_by_question/"
    slugs = {k[len(prefix) :] for t in trials for k in t.metrics if k.startswith(prefix)}
    return sorted(slugs - late)


def _at(t: Trial, key: str, step: str | int) -> float | None:
    """``key`` at step 0 (``"start"``), at its last point (``"end"``), at the first point
    after ``step`` (an int), or its mean over the first / last fifth (``"early"``/``"late"``)."""
    if key not in t.history:
        return t.metrics.get(key) if step == "end" else None
    steps, values = t.history[key]
    if step == "start":
        return float(values[0]) if steps[0] == 0 else None
    if step == "end":
        return float(values[-1])
    if isinstance(step, int):
        after = np.nonzero(steps > step)[0]
        return float(values[after[0]]) if len(after) else None
    fifth = max(1, round(steps[-1] / 5))
    keep = steps <= fifth if step == "early" else steps > steps[-1] - fifth
    return float(np.nanmean(values[keep])) if keep.any() else None


def _last_fifth(t: Trial, key: str) -> float | None:
    """The change of ``key`` from the last evaluation at or before 4/5 of the steps to the
    end: near 0 on a plateau."""
    if key not in t.history:
        return None
    steps, values = t.history[key]
    before = np.nonzero(steps <= 0.8 * steps[-1])[0]
    return float(values[-1] - values[before[-1]]) if len(before) and len(steps) > 1 else None


def _ratio(t: Trial, part: str) -> float | None:
    """Mean ``|∇ reg| / |∇ lm|`` (unweighted) over the early or late fifth."""
    if not {G_LM, G_REG} <= t.history.keys():
        return None
    steps, g_lm = t.history[G_LM]
    g_reg = np.interp(steps, *t.history[G_REG])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = g_reg / g_lm
    fifth = max(1, round(steps[-1] / 5))
    keep = (steps <= fifth if part == "early" else steps > steps[-1] - fifth) & np.isfinite(ratio)
    return float(np.mean(ratio[keep])) if keep.any() else None


def _derived(data: SweepData, t: Trial, trained: list[str]) -> dict[str, float]:
    """The per-trial quantities the answers compare."""
    out: dict[str, float | None] = {
        "retained@0": _at(t, RETAINED, "start"),
        "retained@end": _at(t, RETAINED, "end"),
        "accuracy@end": _at(t, "val/accuracy", "end"),
        "test retained": t.metrics.get(TEST_RETAINED),
        "test accuracy": t.metrics.get("test/accuracy"),
        "grad ratio early": _ratio(t, "early"),
        "grad ratio late": _ratio(t, "late"),
        "grad cos early": _at(t, G_COS, "early"),
        "grad cos late": _at(t, G_COS, "late"),
    }
    accs = [t.metrics.get(f"val/accuracy_by_question/{s}") for s in trained]
    if accs and None not in accs:
        out["trained accuracy"] = statistics.fmean(accs)
    for q, joins in _delayed(data).items():
        s = _slug(q)
        for name, key in (
            ("accuracy", "val/accuracy_by_question/"),
            ("NLL", "val/loss_lm_by_question/"),
        ):
            out[f"delayed {name} after join"] = _at(t, key + s, joins)
            out[f"delayed {name}@end"] = _at(t, key + s, "end")
    for name, key in (("accuracy", "val/accuracy"), ("retained", RETAINED)):
        out[f"{name} change over the last fifth"] = _last_fifth(t, key)
    if out["retained@0"] is not None and out["retained@end"] is not None:
        out["retained end - start"] = out["retained@end"] - out["retained@0"]
    for g in ("grad ratio", "grad cos"):
        if out[f"{g} early"] is not None and out[f"{g} late"] is not None:
            out[f"{g} late - early"] = out[f"{g} late"] - out[f"{g} early"]
    return {k: v for k, v in out.items() if v is not None and np.isfinite(v)}


def _configs(data: SweepData, trials: list[Trial]) -> dict[tuple, dict[str, Any]]:
    trained = _trained_questions(data, trials)
    confs: dict[tuple, dict[str, Any]] = {}
    for t in trials:
        params = t.searched(data.spec)
        c = confs.setdefault(_key(params), {"params": params, "values": {}})
        for name, v in _derived(data, t, trained).items():
            c["values"].setdefault(name, {})[t.seed] = v
    return confs


def _label(params: dict) -> str:
    return ", ".join(
        f"{'λ' if k == 'reg_constant' else 'k' if k == 'token_expansion' else k} = {v}"
        for k, v in params.items()
    )


def _verdict(d: PairedDifference) -> str:
    """'higher' / 'lower' (the first side, or the end) where the interval excludes 0."""
    v = d.verdict()
    if v == "cannot tell":
        if d.no_spread:
            return f"cannot tell (all {d.n} differences equal: no interval)"
        return f"cannot tell (rules out |effect| > {d.rules_out():.3g})"
    return {"better": "higher", "worse": "lower"}.get(v, v)


def _row(question, what, at, key, d: PairedDifference, **extra) -> dict[str, Any]:
    return {
        "question": question,
        "comparison": what,
        "at": at,
        "quantity": key,
        "n": d.n,
        "mean": d.mean,
        "low": d.low,
        "high": d.high,
        "verdict": _verdict(d),
        **extra,
    }


def _paired_row(question, what, at, key, a: dict | None, b: dict | None) -> dict | None:
    """``a`` against ``b`` (seed -> value), paired by seed, as a row with both sides' means
    over the shared seeds ("to" and "from"); None when no seed pairs."""
    d = paired_difference(a, b) if a and b else None
    if d is None:
        return None
    start = statistics.fmean(b[x] for x in d.seeds)
    end = statistics.fmean(a[x] for x in d.seeds)
    return _row(question, what, at, key, d, start=start, end=end)


def _within(c: dict, key: str) -> PairedDifference | None:
    """A within-trial difference's mean and interval over seeds (paired against 0)."""
    vals = c["values"].get(key)
    return paired_difference(vals, {s: 0.0 for s in vals}) if vals else None


def answer_rows(data: SweepData) -> list[dict[str, Any]]:
    """Every answer the sweep's records allow; empty when it has nothing to answer."""
    trials = _counted(data)
    if not trials or (data.client is None and not any(t.history for t in trials)):
        return []
    keys = ["val/accuracy", RETAINED, G_LM, G_REG, G_COS]
    for q in _delayed(data):
        keys += [f"val/accuracy_by_question/{_slug(q)}", f"val/loss_lm_by_question/{_slug(q)}"]
    if data.client is not None:
        hist = _histories(data.client, [t.run_id for t in trials], tuple(keys), 2000)
        for t in trials:
            t.history = {**hist[t.run_id], **t.history}
    confs = _configs(data, trials)
    rows: list[dict[str, Any]] = []
    for c in confs.values():
        at = _label(c["params"])
        for key, q in (("retained end - start", "a"), ("grad ratio late - early", "d")):
            d = _within(c, key)
            if d is not None:
                rows.append(
                    _row(
                        q,
                        "late vs early (within trial)"
                        if q == "d"
                        else "end vs step 0 (within trial)",
                        at,
                        key,
                        d,
                        start=_mean(
                            c, key.replace(" late - early", " early") if q == "d" else "retained@0"
                        ),
                        end=_mean(
                            c, key.replace(" late - early", " late") if q == "d" else "retained@end"
                        ),
                    )
                )
        for key in ("accuracy change over the last fifth", "retained change over the last fifth"):
            d = _within(c, key)
            if d is not None:
                rows.append(_row("p", "end vs 4/5 of the steps (within trial)", at, key, d))
        d = _within(c, "grad cos late - early")
        if d is not None:
            rows.append(
                _row(
                    "d",
                    "late vs early (within trial)",
                    at,
                    "grad cos late - early",
                    d,
                    start=_mean(c, "grad cos early"),
                    end=_mean(c, "grad cos late"),
                )
            )
    twins = (
        (
            "b",
            "reg_constant",
            0.0,
            ["retained@end", "test retained", "trained accuracy", "test accuracy"],
        ),
        (
            "c",
            "reg_constant",
            0.0,
            [
                "delayed accuracy after join",
                "delayed NLL after join",
                "delayed accuracy@end",
                "delayed NLL@end",
            ],
        ),
        (
            "e",
            "token_expansion",
            None,
            ["retained@end", "test retained", "trained accuracy", "test accuracy"],
        ),
    )
    for q, field, ref, names in twins:
        rows += _versus(confs, q, field, ref, names)
    return rows


def _mean(c: dict, key: str) -> float | None:
    vals = c["values"].get(key)
    return statistics.fmean(vals.values()) if vals else None


def _versus(confs, q: str, field: str, ref, names: list[str]) -> list[dict[str, Any]]:
    """Each configuration against its twin with ``field`` at ``ref`` (None: the smallest
    value the sweep ran), the rest equal; paired by seed."""
    values = sorted({_float(c["params"].get(field)) for c in confs.values()} - {None})
    if len(values) < 2:
        return []
    ref = values[0] if ref is None else ref
    out = []
    for c in confs.values():
        v = _float(c["params"].get(field))
        if v is None or v == ref:
            continue
        twin = confs.get(_key(c["params"] | {field: type(c["params"][field])(ref)}))
        if twin is None:
            twin = confs.get(_key(c["params"] | {field: ref}))
        if twin is None:
            continue
        others = {k: x for k, x in c["params"].items() if k != field}
        name = "λ" if field == "reg_constant" else "k" if field == "token_expansion" else field
        what = f"{name} = {c['params'][field]} vs {name} = {ref:g}"
        for key in names:
            a, b = c["values"].get(key), twin["values"].get(key)
            row = _paired_row(q, what, _label(others), key, a, b)
            if row is not None:
                out.append(row)
    return out


QUESTIONS = {
    "p": "Are the curves flat at the end (trained to the plateau)?",
    "a": "Does training discard the held-out factor?",
    "b": "Does λ > 0 keep more of it, at what cost?",
    "c": "Does λ > 0 help the delayed question?",
    "d": "Which loss drives the projector?",
    "e": "Does a wider k keep more?",
}


HEADER = ["question", "comparison", "at", "quantity", "from", "to", "difference [95%]", "seeds"]


def _cells(rows: list[dict[str, Any]]) -> list[list[str]]:
    """One row of text cells per answer, the verdict last (the HTML and Markdown tables')."""

    def num(x):
        return "" if x is None else f"{x:+.4f}" if isinstance(x, float) else str(x)

    def level(x):
        return "" if x is None else f"{x:.4f}"

    return [
        [
            r["question"],
            r["comparison"],
            r["at"],
            r["quantity"],
            level(r.get("start")),
            level(r.get("end")),
            f"{num(r['mean'])} [{num(r['low'])}, {num(r['high'])}]"
            if r["low"] is not None
            else f"{num(r['mean'])} (no interval)",
            str(r["n"]),
            r["verdict"],
        ]
        for r in rows
    ]


def answers_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (``answers.md`` beside the report), to quote in notes."""
    lines = ["| " + " | ".join([*HEADER, "verdict"]) + " |", "|---" * (len(HEADER) + 1) + "|"]
    for cells in _cells(rows):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def answers_table(rows: list[dict[str, Any]]) -> str:
    """The rows as the report's section (empty string when there are none)."""
    if not rows:
        return ""
    from dashboards.html import _table

    body = [[f"{c[0]}. {QUESTIONS[c[0]]}", *c[1:]] for c in _cells(rows)]
    return (
        '<h2 id="answers">The note\'s questions, paired by seed</h2><p>Each difference is the '
        "mean over seeds with its 95% t-interval: within a trial (end minus step 0; late "
        "minus early fifth of the steps) or between two configurations that differ in one "
        "field only, seed s against seed s. 'cannot tell' where the interval holds 0, with "
        "the largest effect it leaves possible. 'from' and 'to' are the seed means of the "
        "two sides (reference first). The rows are in answers.json (and answers.md) beside "
        "this page.</p>" + _table([*HEADER, "verdict"], body)
    )
