"""The sweep service as the CLI's client: the --server option and one-line service errors."""

from __future__ import annotations

from typing import Annotated

import typer

from sweeper.cli.common import _fail

Server = Annotated[
    str | None,
    typer.Option(
        "--server",
        envvar="SWEEPER_SERVER",
        help="The sweep service's URL (`sweeper serve`); without it, sweeps run here.",
        show_default=False,
    ),
]


def _client(server: str):
    from sweeper.client import SweeperClient

    return SweeperClient(server)


def _remote(call):
    """Run a client call; a service error becomes the CLI's one-line error."""
    from sweeper.client import ServiceError

    try:
        return call()
    except ServiceError as e:
        _fail(e.lines)


def _remote_state(client, sweep_id: str) -> dict:
    sweep = _remote(lambda: client.get(sweep_id))
    trials = _remote(lambda: client.trials(sweep_id))
    return sweep | {"trials": {t["id"]: t for t in trials}}
