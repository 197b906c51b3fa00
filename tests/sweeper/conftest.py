"""Sweep test helpers (the fixtures live in tests/conftest.py)."""

from __future__ import annotations

import yaml


def write_spec(path, spec: dict):
    path.write_text(yaml.safe_dump(spec))
    return path
