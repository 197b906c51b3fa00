"""The one way from text to a :class:`SweepSpec`, for the CLI and the API alike: parse
(YAML or JSON), refuse non-finite numbers, validate; every failure one :class:`SpecError`
whose ``items`` are ``{path, msg, type}``, the path dotted from the spec's root."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sweeper.spec import SweepSpec
from sweeper.spec_errors import spec_errors


class SpecError(ValueError):
    """The text is no valid spec; ``items`` are its ``{path, msg, type}`` problems."""

    def __init__(self, items: list[dict[str, str]]):
        super().__init__(
            "; ".join(f"{i['path']}: {i['msg']}" if i["path"] else i["msg"] for i in items)
        )
        self.items = items

    def lines(self, source: str = "") -> list[str]:
        """One line per problem, led by its field path, for the CLI."""
        return [
            f"{source}{i['path']}: {i['msg']}" if i["path"] else f"{source}{i['msg']}"
            for i in self.items
        ]


def _one(path: str, msg: str, type_: str) -> SpecError:
    return SpecError([{"path": path, "msg": msg, "type": type_}])


def parse_spec(text: str, fmt: str = "yaml") -> SweepSpec:
    """Parse YAML (``fmt`` "yaml") or JSON text and validate it; raises :class:`SpecError`."""
    try:
        data = json.loads(text) if fmt == "json" else yaml.safe_load(text)
    # ValueError: besides JSONDecodeError, an integer over Python's 4300-digit limit, or
    # a YAML value PyYAML cannot build (2001-13-01, !!int x).
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _one("", f"not valid JSON/YAML: {msg}", "parse") from None
    if not isinstance(data, dict):
        raise _one("", f"a sweep spec is a mapping, got {type(data).__name__}", "type")
    where = non_finite(data)
    if where is not None:
        raise _one(where, "must be a finite number", "finite_number")
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(spec_errors(e)) from None
    except (ValueError, TypeError, RecursionError) as e:
        raise _one("", str(e), "value_error") from None


def load_spec(path: str | Path) -> SweepSpec:
    """A spec file (``.json`` as JSON, anything else as YAML); raises :class:`SpecError`."""
    p = Path(path)
    if not p.is_file():
        raise _one("", f"spec file not found: {p}", "file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise _one("", f"cannot read {p}: {e}", "file") from None
    return parse_spec(text, "json" if p.suffix == ".json" else "yaml")


def non_finite(data: Any) -> str | None:
    """The dotted path of a NaN or infinite number in parsed JSON/YAML, or None.

    Pydantic accepts them in float fields and in the free-form ``trainer``/``points``
    mappings; stored, they became null or broke every later JSON response. Each container
    is visited once, so YAML aliases (and their cycles) cost nothing extra.
    """
    seen: set[int] = set()
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return where
        if isinstance(value, dict | list) and id(value) not in seen:
            seen.add(id(value))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((v, f"{where}.{k}" if where else str(k)) for k, v in reversed(list(items)))
    return None
