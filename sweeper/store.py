"""Local sweep records: one folder per sweep under ``SWEEPER_HOME`` (default ``./sweeps``).

``<home>/<id>/spec.yaml`` is the spec as submitted, ``state.json`` the sweep's status,
trial table and MLflow ids (rewritten atomically by the driver), ``tune/`` Ray Tune's
experiment folder that ``resume`` restores from, ``cancel`` (when present) a request to
cancel that the driver's stopper sees within a second.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from sweeper.spec import SweepSpec

# Called with the whole state after every write (the CLI's live table, the service's
# database mirror). Module-level: Tune pickles the callbacks that write the state.
LISTENERS: list[Callable[[dict[str, Any]], None]] = []


def new_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def home() -> Path:
    return Path(os.environ.get("SWEEPER_HOME", "sweeps")).resolve()


class SweepRecord:
    """A sweep's folder: its spec and its state, read and written as whole files."""

    def __init__(self, path: Path):
        self.path = path
        self.id = path.name

    @classmethod
    def create(cls, spec: SweepSpec, sweep_id: str | None = None) -> SweepRecord:
        sweep_id = sweep_id or new_id(spec.name)
        rec = cls(home() / sweep_id)
        rec.path.mkdir(parents=True, exist_ok=True)
        (rec.path / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json")))
        now = time.time()
        rec.write(
            {
                "id": sweep_id,
                "name": spec.name,
                "status": "queued",
                "created": now,
                "updated": now,
                "trials": {},
                "best": None,
                "mlflow": {},
            }
        )
        return rec

    @classmethod
    def open(cls, sweep_id: str) -> SweepRecord:
        rec = cls(home() / sweep_id)
        if not (rec.path / "state.json").is_file():
            raise KeyError(f"no sweep {sweep_id!r} in {home()}")
        return rec

    @classmethod
    def all(cls) -> list[SweepRecord]:
        if not home().is_dir():
            return []
        recs = [cls(p) for p in home().iterdir() if (p / "state.json").is_file()]
        return sorted(recs, key=lambda r: r.read().get("created", 0))

    @property
    def tune_dir(self) -> Path:
        return self.path / "tune"

    @property
    def cancel_file(self) -> Path:
        return self.path / "cancel"

    def request_cancel(self) -> None:
        self.cancel_file.touch()

    def spec(self) -> SweepSpec:
        return SweepSpec.model_validate(yaml.safe_load((self.path / "spec.yaml").read_text()))

    def read(self) -> dict[str, Any]:
        return json.loads((self.path / "state.json").read_text())

    def write(self, state: dict[str, Any]) -> None:
        tmp = self.path / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2, default=str))
        tmp.replace(self.path / "state.json")
        for listener in LISTENERS:
            listener(state)

    def update(self, **fields: Any) -> dict[str, Any]:
        state = self.read() | fields | {"updated": time.time()}
        self.write(state)
        return state
