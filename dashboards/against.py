"""Two designs compared on the same seeds: does training longer (or any one trainer field
changed) move the end points, and does it move the answers?

``sweeper answers NEW... --against OLD...`` pools each side as ``sweeper answers`` does
(each side one design), names the trainer fields in which the two designs differ (none: a
rerun of one design, whose comparison measures the run-to-run spread), and for
every configuration (λ, k) both ran, paired by seed (seed s: the same initialisation and
batch order on both sides):

- the end points, new minus old: validation and test accuracy, accuracy on the questions
  trained from the start, the retained fraction (validation and test), the delayed
  question's accuracy;
- the answers themselves: b's and e's per-seed differences (λ > 0 minus λ = 0, k minus the
  smallest k both sides ran; test accuracy and retained, the trained questions' accuracy,
  validation retained) on the new side minus the same seed's on the old side. "Cannot
  tell" there says the two designs give the same answer to within the interval.
"""

from __future__ import annotations

from typing import Any

from dashboards.answers import _configs, _counted, _label, _paired_row
from dashboards.data import ReportError, SweepData
from dashboards.export import PER_TRIAL
from dashboards.paired import _float, _key

END_POINTS = [
    "accuracy@end",
    "test accuracy",
    "trained accuracy",
    "retained@end",
    "test retained",
    "delayed accuracy@end",
]
# The answers whose per-seed differences are compared between the designs, on these
# measures: (question, field, reference; None: the smallest value both sides ran)
ANSWER_MEASURES = ["test accuracy", "test retained", "trained accuracy", "retained@end"]
ANSWERS = (("b", "reg_constant", 0.0), ("e", "token_expansion", None))


def design_difference(new: SweepData, old: SweepData) -> dict[str, tuple[str, str]]:
    """The trainer fields (λ, k, seed and device aside) in which the two pools differ:
    name -> (new value, old value); empty for two runs of one design (a rerun, say on
    another machine: the comparison then measures the run-to-run spread)."""

    def fixed(data: SweepData) -> dict[str, str]:
        trials = _counted(data)
        if not trials:
            raise ReportError(f"{data.sweep_id}: no ended trials to compare")
        return {k: v for k, v in trials[0].params.items() if k not in PER_TRIAL}

    a, b = fixed(new), fixed(old)
    diff = {k: (a.get(k, "(unset)"), b.get(k, "(unset)")) for k in sorted(a.keys() | b.keys())}
    return {k: v for k, v in diff.items() if v[0] != v[1]}


def _per_seed_answer(confs, c, field, ref, key) -> dict | None:
    """seed -> c's value minus its twin's (``field`` at ``ref``), the seeds both ran."""
    twin = confs.get(_key(c["params"] | {field: ref}))
    if twin is None:
        return None
    a, b = c["values"].get(key) or {}, twin["values"].get(key) or {}
    return {s: a[s] - b[s] for s in a if s in b} or None


def against_rows(new: SweepData, old: SweepData) -> list[dict[str, Any]]:
    """The rows (as ``answers.answer_rows``'): question "v" for the end points, "b" and "e"
    for the answers, each new minus old, paired by seed."""
    diff = design_difference(new, old)
    what = ", ".join(f"{k} = {a} vs {b}" for k, (a, b) in diff.items()) or "rerun vs run"
    new_c = _configs(new, _counted(new))
    old_c = _configs(old, _counted(old))
    rows: list[dict[str, Any] | None] = []
    for key, c in new_c.items():
        o = old_c.get(key)
        if o is None:
            continue
        for name in END_POINTS:
            a, b = c["values"].get(name), o["values"].get(name)
            rows.append(_paired_row("v", what, _label(c["params"]), name, a, b))
    for q, field, ref in ANSWERS:

        def values_ran(confs, field=field):
            return {_float(c["params"].get(field)) for c in confs.values()} - {None}

        values = sorted(values_ran(new_c) & values_ran(old_c))
        if len(values) < 2:
            continue
        ref = values[0] if ref is None else ref
        sym = "λ" if field == "reg_constant" else "k"
        for key, c in new_c.items():
            if _float(c["params"].get(field)) in (None, ref) or key not in old_c:
                continue
            at = _label({k: x for k, x in c["params"].items() if k != field})
            answer = f"{what}: ({sym} = {c['params'][field]}) - ({sym} = {ref:g})"
            for name in ANSWER_MEASURES:
                a = _per_seed_answer(new_c, c, field, ref, name)
                b = _per_seed_answer(old_c, old_c[key], field, ref, name)
                rows.append(_paired_row(q, answer, at, name, a, b))
    rows = [r for r in rows if r is not None]
    if not rows:

        def ran(data: SweepData) -> str:
            confs = sorted({(t.reg_constant, t.token_expansion) for t in _counted(data)})
            seeds = sorted({t.seed for t in _counted(data)}, key=str)
            return f"(λ, k) {confs}, seeds {seeds}"

        raise ReportError(
            f"nothing to compare: no configuration and seed with the same measures ran on "
            f"both sides ({new.sweep_id}: {ran(new)}; {old.sweep_id}: {ran(old)})"
        )
    return rows
