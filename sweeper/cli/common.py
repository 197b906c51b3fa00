"""What every command shares: the error console and the one-line user error."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

err = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


def _fail(lines: list[str]) -> None:
    for line in lines:
        err.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)
