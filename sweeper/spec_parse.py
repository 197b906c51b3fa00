"""The one way from text to a :class:`SweepSpec`, for the CLI and the API alike: parse
(YAML or JSON), refuse what cannot be stored (non-finite numbers, text that is no UTF-8, a
spec too large once YAML's aliases are expanded, lists or mappings too long), validate;
every failure one :class:`SpecError` whose ``items`` are ``{path, msg, type}``, the path
dotted from the spec's root."""

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
    problem = storable(data)
    if problem is not None:
        raise SpecError([problem])
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


# What a spec may hold before it is validated (docs/service.md, "Limits"): its size as
# JSON once YAML's aliases are expanded, any one list's or mapping's length, its nesting.
MAX_SPEC_JSON_BYTES = 1_000_000
MAX_ITEMS = 1_000
MAX_DEPTH = 20
MAX_INT_BITS = 13_000  # about 3,900 decimal digits, under Python's 4,300 for str()


def storable(data: Any) -> dict[str, str] | None:
    """The first reason ``data`` (parsed JSON/YAML) cannot be stored, as an error item.

    No integer has over 4,000 digits; every string (keys too) encodes as UTF-8 (a JSON
    ``"\\ud800"`` is a lone surrogate: stored, it made every later response that carried
    it a 500); every list and mapping holds at most :data:`MAX_ITEMS`, nested at most
    :data:`MAX_DEPTH` deep; and the spec's JSON, every YAML alias expanded, is at most
    :data:`MAX_SPEC_JSON_BYTES` (an 18 KB body of 2,000 aliases of one 10 KB anchor
    stored 20 MB). The size is summed per container once (memoised by identity), so an
    alias bomb costs its text, not its expansion; a recursive alias is refused.
    """
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(value: Any, where: str, depth: int) -> int:
        if isinstance(value, str):
            try:
                return len(value.encode()) + 2
            except UnicodeEncodeError:
                raise _Bad(
                    where,
                    "is not valid text (a lone surrogate?): it must encode as UTF-8",
                    "encoding",
                ) from None
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            # YAML's 0x/0b forms escape Python's 4,300-digit limit (str() of them raised);
            # smaller numbers meet each field's own bound in validation.
            raise _Bad(where, "an integer of over 4,000 digits", "too_large_number")
        if not isinstance(value, dict | list):
            return len(str(value))
        key = id(value)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise _Bad(where, "refers to itself (a recursive YAML alias)", "recursive")
        if depth > MAX_DEPTH:
            raise _Bad(where, f"nested more than {MAX_DEPTH} deep", "too_deep")
        if len(value) > MAX_ITEMS:
            kind = "items" if isinstance(value, list) else "keys"
            raise _Bad(where, f"has {len(value)} {kind}; at most {MAX_ITEMS}", "too_long")
        open_.add(key)
        total = 2
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in items:
            at = f"{where}.{k}" if where else str(k)
            if isinstance(value, dict):
                total += size(k if isinstance(k, str) else str(k), at, depth) + 2
            total += size(v, at, depth + 1) + 1
            if total > MAX_SPEC_JSON_BYTES:
                raise _Bad(
                    "",
                    f"the spec is over {MAX_SPEC_JSON_BYTES:,} bytes as JSON (YAML aliases "
                    "expanded)",
                    "too_large",
                )
        open_.discard(key)
        sizes[key] = total
        return total

    try:
        size(data, "", 0)
    except _Bad as e:  # the path may hold the very key that cannot be encoded
        path = e.path.encode("utf-8", "backslashreplace").decode()
        return {"path": path, "msg": e.msg, "type": e.type}
    return None


class _Bad(Exception):
    def __init__(self, path: str, msg: str, type_: str):
        self.path, self.msg, self.type = path, msg, type_
