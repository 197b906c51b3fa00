"""`sweeper report`, `compare` and `answers`: a sweep's report, several sweeps overlaid, the
note's answers from exported data."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from sweeper.cli.common import _fail
from sweeper.cli.display import console
from sweeper.cli.remote import Server, _client, _remote


def report(
    sweep_id: Annotated[str, typer.Argument(help="Sweep id.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder to write into.")] = Path(
        "report"
    ),
    server: Server = None,
    mlflow_ui_url: Annotated[
        str | None,
        typer.Option(envvar="SWEEPER_MLFLOW_UI_URL", help="Link trials into this MLflow UI."),
    ] = None,
) -> None:
    """Write the sweep's report (report.html and a PNG per figure) from its MLflow records."""
    if server:
        _save_remote_report(_client(server), sweep_id, output)
    else:
        from dashboards.data import ReportError
        from sweeper.reports import write_report

        ml = {}
        with contextlib.suppress(KeyError):  # not a sweep here: look for it in MLflow anyway
            ml = _open_or_fail_quiet(sweep_id)
        try:
            path = write_report(
                sweep_id,
                output,
                tracking_uri=ml.get("tracking_uri"),
                experiment_id=ml.get("experiment_id"),
                mlflow_ui_url=mlflow_ui_url,
            )
        except ReportError as e:
            _fail([str(e)])
        console.print(f"report: {path} (and {len(list(output.glob('*.png')))} PNGs)")


def _open_or_fail_quiet(sweep_id: str) -> dict:
    from sweeper.store import SweepRecord

    return SweepRecord.open(sweep_id).read().get("mlflow") or {}


def _save_remote_report(client, sweep_id: str, output: Path) -> None:
    import base64
    import re

    text = _remote(lambda: client.report(sweep_id))
    output.mkdir(parents=True, exist_ok=True)
    (output / "report.html").write_text(text)
    pngs = re.findall(r'<figure id="([a-z_]+)"><img [^>]*src="data:image/png;base64,([^"]+)"', text)
    for name, b64 in pngs:
        (output / f"{name}.png").write_bytes(base64.b64decode(b64))
    console.print(f"report: {output / 'report.html'} (and {len(pngs)} PNGs)")


def compare(
    sweep_ids: Annotated[list[str], typer.Argument(help="Two or more sweep ids.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder to write into.")] = Path(
        "compare"
    ),
) -> None:
    """Overlay several sweeps' accuracy vs λ (per k) in one page: compare.html and a PNG."""
    from dashboards.data import ReportError
    from sweeper.reports import write_compare

    try:
        path = write_compare(sweep_ids, output)
    except ReportError as e:
        _fail([str(e)])
    console.print(f"comparison: {path}")


def answers(
    folders: Annotated[
        list[Path], typer.Argument(help="Folders `sweeper report` wrote (trials.csv, ...).")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder to write into.")] = Path(
        "answers"
    ),
    against: Annotated[
        list[Path] | None,
        typer.Option(
            "--against",
            help="Folders of another design (say, fewer steps), pooled the same way: "
            "against.md compares the end points and answers, paired by seed. Repeatable.",
        ),
    ] = None,
) -> None:
    """The note's answers (a-e, paired by seed) from reports' exported data, without the
    MLflow store; several sweeps of one design (say, one per k) are pooled, and the pool
    gets its own report (report.html, its figures, the pooled CSVs). With --against, the
    same seeds of another design too: did, say, doubling the steps move the answers?"""
    from dashboards.data import ReportError
    from dashboards.report import write_answers

    try:
        rows = write_answers(folders, output, against=against)
    except ReportError as e:
        _fail([str(e)])
    console.print(f"answers: {output / 'answers.md'} ({len(rows)} rows; and answers.json)")
    console.print(f"report of the pool: {output / 'report.html'}")
    if against:
        console.print(f"against the other design: {output / 'against.md'} (and against.json)")
