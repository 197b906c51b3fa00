"""Fault-injection tests: the real service (``tests.api.conftest``) with faults put in its way."""

from __future__ import annotations

from tests.api.conftest import api_spec, pg_url, service, sqlite_url

__all__ = ["api_spec", "pg_url", "service", "sqlite_url"]  # fixtures shared with tests/api
