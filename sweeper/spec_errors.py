"""A spec's validation errors as the CLI's lines and the API's 422 entries, by field path."""

from __future__ import annotations

import re

from pydantic import ValidationError


def format_spec_errors(err: ValidationError, source: str = "") -> list[str]:
    """One line per problem, led by its field path (``search.space.reg_constant: ...``)."""
    return [
        f"{source}{e['path']}: {e['msg']}" if e["path"] else f"{source}{e['msg']}"
        for e in spec_errors(err)
    ]


def spec_errors(err: ValidationError) -> list[dict[str, str]]:
    """Each problem as ``{path, msg, type}``, the path dotted from the spec's root."""
    out = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        # Discriminated unions add the tag to the path (space.x.float.low); drop it.
        loc = [p for i, p in enumerate(loc) if not (i and loc[i - 1] and p in _TAGS)]
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        # Our model validators lead their message with the path below the model's own.
        head, sep, rest = msg.partition(": ")
        if sep and re.fullmatch(r"[a-z_][a-z0-9_]*(\.[A-Za-z0-9_/-]+)*", head):
            loc, msg = [*loc, head], rest
        out.append({"path": ".".join(loc), "msg": msg, "type": e["type"]})
    return out


_TAGS = {"float", "int", "categorical", "single", "several"}
