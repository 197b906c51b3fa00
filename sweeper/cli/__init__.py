"""The `sweeper` command line: the typer app and its command groups."""

from __future__ import annotations

import typer

from sweeper.cli.local import cancel, list_sweeps, resume, status, submit
from sweeper.cli.report import answers, compare, report
from sweeper.cli.serve import serve
from sweeper.cli.train import train

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Hyperparameter sweeps for multimodal-LLM projector regularisation research.",
)


@app.callback()
def _main() -> None:
    """Hyperparameter sweeps for multimodal-LLM projector regularisation research."""


app.command()(train)
app.command()(submit)
app.command()(resume)
app.command()(cancel)
app.command()(status)
app.command("list")(list_sweeps)
app.command()(serve)
app.command()(report)
app.command()(compare)
app.command()(answers)
