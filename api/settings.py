"""Service settings, read from ``SWEEPER_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the service reads from its environment; each has the ``SWEEPER_`` prefix."""

    model_config = SettingsConfigDict(env_prefix="SWEEPER_", extra="ignore")

    home: Path = Field(
        Path("sweeps"),
        description="Folder of the sweeps' working files (Tune state, checkpoints, logs).",
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the service database; default a SQLite file "
        "<home>/sweeper.db. PostgreSQL: postgresql+psycopg://user@host/db.",
    )
    api_token: str | None = Field(
        None,
        description="When set, every route but /healthz and the API description "
        "(/openapi.json, /docs, /redoc) needs 'Authorization: Bearer …'.",
    )
    max_running_sweeps: int = Field(
        1, ge=1, description="Sweeps whose drivers run at once; later ones wait queued."
    )
    allowed_paths: str = Field(
        "",
        description="Colon-separated folders that a spec's model/dataset paths must lie under "
        "(besides the builtin cache). Empty: only builtin aliases and hub ids.",
    )
    mlflow_ui_url: str | None = Field(
        None, description="Base URL of the MLflow UI; sweeps then carry links to their runs."
    )
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest accepted request body.")
    host: str = Field("127.0.0.1", description="Address `sweeper serve` binds to.")
    port: int = Field(8000, description="Port `sweeper serve` binds to.")
    ray_address: str | None = Field(
        None,
        validation_alias="RAY_ADDRESS",
        description="A Ray cluster's job-submission address (http://head:8265): drivers run "
        "as Ray Jobs there. Unset: each driver is a local subprocess with its own local Ray.",
    )
    reconcile_interval_s: float = Field(
        1.0, gt=0, description="How often the service checks drivers and starts queued sweeps."
    )
    mirror_flush_timeout_s: float = Field(
        3600.0,
        ge=0,
        description="How long a driver whose sweep has ended waits for an unreachable "
        "database to take the sweep's last state before it exits anyway.",
    )

    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        self.home.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{(self.home / 'sweeper.db').resolve()}"

    def roots(self) -> list[Path]:
        return [Path(p).expanduser().resolve() for p in self.allowed_paths.split(":") if p]


@lru_cache
def get_settings() -> Settings:
    return Settings()
