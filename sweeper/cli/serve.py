"""`sweeper serve`: the sweep service (the one place the sweeper starts the api above it)."""

from __future__ import annotations

from typing import Annotated

import typer

from sweeper.cli.display import console


def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (SWEEPER_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (SWEEPER_PORT).")] = None,
) -> None:
    """Run the sweep service (REST API; each sweep gets its own driver process)."""
    import logging

    import uvicorn

    from api.main import create_app
    from api.settings import Settings

    settings = Settings()
    host, port = host or settings.host, port or settings.port
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    app_ = create_app(settings)
    console.print(
        f"sweep service on http://{host}:{port} (docs at /docs); database "
        f"{settings.db_url()}; working files in {settings.home.resolve()}"
    )
    uvicorn.run(app_, host=host, port=port, log_level="info")
