"""A ``POST /sweeps`` body to a validated :class:`SweepSpec`, or the 422 error items.

Parsing, the non-finite check and validation are the sweeper's one ``parse_spec``; what is
here is what only an HTTP body needs: its bytes and its content type.
"""

from __future__ import annotations

from fastapi import HTTPException

from sweeper.spec import SweepSpec
from sweeper.spec_parse import SpecError, parse_spec

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


class InvalidSpec(Exception):
    """The body is no valid spec; ``items`` are its ``{path, msg, type}`` errors."""

    def __init__(self, items: list[dict[str, str]]):
        super().__init__(items)
        self.items = items


def read_spec(body: bytes, content_type: str) -> SweepSpec:
    """Parse and validate a request body; raises :class:`InvalidSpec`, or a 415."""
    ctype = content_type.split(";")[0].strip()
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise InvalidSpec([{"path": "", "msg": "body is not UTF-8", "type": "encoding"}]) from None
    if ctype in YAML_TYPES:
        fmt = "yaml"
    elif ctype in ("application/json", "") or ctype.endswith("+json"):
        fmt = "json"
    else:
        raise HTTPException(
            415, f"content type {ctype!r}: send application/json or application/yaml"
        )
    try:
        return parse_spec(text, fmt)
    except SpecError as e:
        raise InvalidSpec(e.items) from None
