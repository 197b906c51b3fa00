"""The per-sweep research report: one self-contained HTML file plus a PNG per figure.

Figures (matplotlib, drawn headless): accuracy vs λ per token-expansion factor (mean over
seeds, 95% t-interval, the λ = 0 baseline marked); final LM and reg losses vs λ; both loss
curves over steps with the λ in force; the gradient-norm ratio |∇reg| / |∇lm| that says
which loss drives the projector; Optuna's optimisation history, parameter importances
and parallel coordinates (a study rebuilt from the MLflow records); for a multi-objective
sweep its Pareto set; for a sweep over projector variants (or any categorical field) each
value at its best configuration against the default's, paired by seed; each configuration
against λ = 0 at the same other settings, paired by seed; and a
sortable table of trials. The HTML embeds the PNGs and a few lines of its own script: no
CDN, no network.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable
from pathlib import Path

from dashboards.against import against_rows
from dashboards.answers import answer_rows, answers_markdown, answers_table
from dashboards.data import ReadSpec, ReportError, SweepData, load_sweep
from dashboards.export import pool, read_data, write_data
from dashboards.figures import (
    CURVE_KEYS,
    _NotApplicable,
    _png,
    _shown,
    _Skip,
    fig_accuracy,
    fig_compare,
    fig_curves,
    fig_final_losses,
    fig_paired,
    fig_pareto,
    fig_retained,
    fig_variants,
    plt,
)
from dashboards.figures_grad import fig_grad_ratio
from dashboards.figures_optuna import fig_optuna
from dashboards.figures_plateau import fig_plateau
from dashboards.html import _LOADED, _SCRIPT, _STYLE, _table
from dashboards.paired import baseline_rows
from dashboards.stats import configurations
from dashboards.tables import _answer_tables, _summary, _trial_rows
from trainer.metrics import ACCURACY, PROBE_RETAINED

FIGURES: list[tuple[str, str, Callable]] = [
    ("accuracy_vs_lambda", "Accuracy vs reg constant", fig_accuracy),
    ("final_losses_vs_lambda", "Final LM and reg losses vs reg constant", fig_final_losses),
    ("loss_curves", "Loss curves over steps, with the λ in force", fig_curves),
    ("probe_retained", "What the projector kept of the held-out questions", fig_retained),
    ("grad_norm_ratio", "The two losses' gradients: norm ratio and cosine", fig_grad_ratio),
    ("optuna_history", "Optuna: optimisation history", lambda d: fig_optuna(d, "history")),
    ("optuna_importances", "Optuna: parameter importances", lambda d: fig_optuna(d, "importances")),
    ("optuna_parallel", "Optuna: parallel coordinates", lambda d: fig_optuna(d, "parallel")),
    ("pareto", "Pareto set of the objectives", fig_pareto),
    ("variants", "Variants vs the default, each at its best configuration", fig_variants),
]

# the answers' figures, drawn from every trial's validation history and the answer rows
ANSWER_FIGURES: list[tuple[str, str, Callable]] = [
    ("plateau", "Trained to the plateau?", lambda data, rows: fig_plateau(data)),
    ("paired_differences", "Paired differences", lambda data, rows: fig_paired(rows)),
]


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
    rows, pngs = _write_answers(data, out)
    for name, title, _ in ANSWER_FIGURES:
        if name in pngs:
            b64 = base64.b64encode(pngs[name]).decode()
            sections.append(
                f'<h2>{title}</h2><figure id="{name}">'
                f'<img alt="{title.lower()}" src="data:image/png;base64,{b64}"></figure>'
            )
    if rows:
        sections.append(answers_table(rows))
    write_data(data, out)  # trials.csv, histories.csv: the data behind the figures
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


def _write_answers(data: SweepData, out: Path) -> tuple[list[dict], dict[str, bytes]]:
    """answers.json, answers.md, paired_differences.png and plateau.png, where the sweep
    answers (the plateau figure is drawn here: ``answer_rows`` has read every trial's
    validation history by then, not only the few curves the figures above draw)."""
    rows = answer_rows(data)
    if not rows:
        return rows, {}
    (out / "answers.json").write_text(json.dumps(rows, indent=1))
    (out / "answers.md").write_text(answers_markdown(rows))
    pngs = {}
    for name, _, build in ANSWER_FIGURES:
        fig, n = build(data, rows)
        if n:
            pngs[name] = _png(fig)
            (out / f"{name}.png").write_bytes(pngs[name])
        else:
            plt.close(fig)
    return rows, pngs


def write_answers(
    folders: list[str | Path], out: str | Path, against: list[str | Path] | None = None
) -> list[dict]:
    """The note's answers from exported report data (``sweeper report``'s trials.csv and
    histories.csv), several sweeps of one design pooled, and the report of the pool:
    answers.json, answers.md, report.html with its figures (paired_differences.png,
    probe_retained.png, grad_norm_ratio.png, ...) and the pooled trials.csv and
    histories.csv in ``out``; returns the rows. With ``against`` (the folders of another
    design, pooled the same way): also against.json and against.md, this design's end
    points and answers minus that one's, paired by seed (``dashboards.against``)."""
    out = Path(out)
    for f in [*folders, *(against or [])]:
        if out.resolve() == Path(f).resolve():
            raise ReportError(
                f"{out}: is one of the folders pooled; its trials.csv would be overwritten by "
                "the pool's (write the answers to another folder)"
            )
    data = pool([read_data(f) for f in folders])
    if not answer_rows(data):
        raise ReportError(f"{data.sweep_id}: nothing to answer (no histories of the measures)")
    versus = against_rows(data, pool([read_data(f) for f in against])) if against else None
    render(data, out)
    if versus is not None:
        (out / "against.json").write_text(json.dumps(versus, indent=1))
        (out / "against.md").write_text(answers_markdown(versus))
    return json.loads((out / "answers.json").read_text())


def write_report(
    sweep_id: str,
    out: str | Path,
    tracking_uri: str | None = None,
    experiment_id: str | None = None,
    mlflow_ui_url: str | None = None,
    log_to_mlflow: bool = False,
    *,
    read_spec: ReadSpec,
) -> Path:
    """Build the report of one sweep from MLflow into ``out``; returns ``out/report.html``.

    With ``log_to_mlflow`` it is also logged to the sweep's parent run (folder ``report``).
    ``read_spec`` turns the parent run's ``spec.yaml`` into the spec (see ``load_sweep``).
    """
    data = load_sweep(sweep_id, tracking_uri, experiment_id, read_spec=read_spec)
    path = render(data, Path(out), mlflow_ui_url)
    if log_to_mlflow:
        data.client.log_artifacts(data.parent_run_id, str(path.parent), "report")
    return path


def publish(sweep_id: str, out: str | Path, *args, **kwargs) -> Path:
    """:func:`write_report`, logged to the sweep's parent run."""
    return write_report(sweep_id, out, *args, **kwargs, log_to_mlflow=True)


def write_compare(
    sweep_ids: list[str],
    out: str | Path,
    tracking_uri: str | None = None,
    *,
    read_spec: ReadSpec,
) -> Path:
    """Several sweeps' accuracy vs λ overlaid (a line per sweep and k), and each sweep's
    configurations against λ = 0 paired by seed: ``out/compare.html``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sweeps = [load_sweep(s, tracking_uri, read_spec=read_spec) for s in sweep_ids]
    fig, points = fig_compare(sweeps)
    png = _png(fig)
    (out / "compare_accuracy_vs_lambda.png").write_bytes(png)
    rows = []
    for data in sweeps:
        for k, confs in configurations(data, ACCURACY).items():
            for r in confs:
                rows.append([data.sweep_id, k, r["lam"], r["mean"], r["half"], r["n"]])
    head = ["sweep", "k", "λ", ACCURACY, "± 95%", "seeds"]
    paired = []
    for data in sweeps:
        keys = [ACCURACY] + (
            [PROBE_RETAINED] if any(PROBE_RETAINED in t.metrics for t in data.trials) else []
        )
        for r in baseline_rows(data, keys):
            d = r["diff"]
            paired.append(
                [data.sweep_id, r["key"], r["config"], r["lam"], d.mean, d.half, d.n, d.verdict()]
            )
    paired_head = ["sweep", "metric", "at", "λ", "vs λ = 0", "± 95%", "seeds", "verdict"]
    b64 = base64.b64encode(png).decode()
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sweep comparison</title>
<style>{_STYLE}</style></head><body>
<h1>Sweep comparison: {html.escape(", ".join(sweep_ids))}</h1>
<figure id="compare"><img alt="accuracy vs λ" src="data:image/png;base64,{b64}"></figure>
<h2>Configurations</h2><p>Click a column to sort.</p>
{_table(head, rows)}
<h2>Against λ = 0, paired by seed</h2><p>Within each sweep, each configuration against the
same configuration at λ = 0: the mean per-seed difference and its 95% t-interval.</p>
{_table(paired_head, paired)}
<script>{_SCRIPT}</script>
<script type="application/json" id="figures">{json.dumps({"compare": points})}</script>
</body></html>
"""
    path = out / "compare.html"
    path.write_text(page)
    return path
