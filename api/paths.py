"""Where a submitted spec may point: builtin aliases, hub ids, or paths under allowed roots."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sweeper.sources import builtin_datasets, builtin_models, cache_dir
from sweeper.spec import SweepSpec

# A hub id as the hub allows them: ``org/name``, each part led by a letter or digit, no
# ``..``. Anything else that is not an alias is taken as a path and checked against the roots.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def _values(stored: dict[str, Any], field: str) -> list[tuple[str, Any]]:
    """Every value ``field`` can take in the (stored) spec, with its path in the spec."""
    out = []
    if field in stored["trainer"]:
        out.append((f"trainer.{field}", stored["trainer"][field]))
    param = stored["search"]["space"].get(field) or {}
    for i, choice in enumerate(param.get("choices") or []):
        out.append((f"search.space.{field}.choices.{i}", choice))
    for i, point in enumerate(stored["search"]["points"]):
        if field in point:
            out.append((f"search.points.{i}.{field}", point[field]))
    return out


def path_errors(spec: SweepSpec, roots: list[Path]) -> list[dict[str, str]]:
    """One ``{path, msg, type}`` per model/dataset value that names a path outside ``roots``.

    Aliases pass; for models, so does a hub id (``org/name``) that is not a local path.
    A path passes when it resolves (symlinks and ``..`` followed) under a root or the
    builtin cache. Checked on the spec as it will be stored (its JSON form), so a value
    that becomes a path only there (YAML ``!!binary`` bytes turn into text) is caught too.
    """
    stored = spec.model_dump(mode="json")
    allowed = [*roots, cache_dir().resolve()]
    errors = []
    builtins = {"model": builtin_models(), "dataset": builtin_datasets()}
    for field, aliases in builtins.items():
        for where, value in _values(stored, field):
            if not isinstance(value, str) or value in aliases:
                continue
            try:
                raw = Path(value).expanduser()
                looks_like_path = (
                    value.startswith((".", "/", "~"))
                    or ".." in Path(value).parts
                    or field == "dataset"
                    or raw.exists()
                    or not _HUB_ID.match(value)
                    or ".." in value
                )
                if not looks_like_path:
                    continue
                real = raw.resolve()
            except (RuntimeError, ValueError, OSError):  # ~nouser, NUL bytes, too long
                real = None
            if real is None or not any(real == r or real.is_relative_to(r) for r in allowed):
                shown = ":".join(str(r) for r in roots) or "none configured"
                errors.append(
                    {
                        "path": where,
                        "msg": f"{value!r} is outside the allowed paths (SWEEPER_ALLOWED_PATHS: "
                        f"{shown}); use a builtin alias or a path under those roots",
                        "type": "path_not_allowed",
                    }
                )
    return errors
