"""MLflow outage policy: which errors are transient, how long and how often to retry."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

_LOG = logging.getLogger("sweeper")

# Backoff between tries while MLflow is unreachable: 0.5 s, doubling, at most 5 s.
_BACKOFF_FIRST_S, _BACKOFF_MAX_S = 0.5, 5.0

# MLflow's own HTTP retries inside the driver: one quick retry (a reset connection), no
# long backoff, a request timeout in seconds. Outages are ridden out by our buffering, which
# keeps each write and tries it again later. Set explicitly in the environment, they win.
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def limit_mlflow_http_retries() -> None:
    """MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) can hold one call for
    minutes; the driver asks once and buffers instead (`MLFLOW_HTTP_DEFAULTS`)."""
    for key, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # urllib3 warns at each of its retries; while MLflow is down, ours say it once.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def mlflow_retry_s() -> float:
    """How long the driver keeps trying MLflow without getting a write through, at a sweep's
    end and for each parent-run write (``SWEEPER_MLFLOW_RETRY_S``, default 300 s)."""
    return float(os.environ.get("SWEEPER_MLFLOW_RETRY_S", "300"))


_TRANSIENT_STATUS = frozenset({408, 429})


def _answered(exc: BaseException) -> bool:
    """The server was reached and answered with an error status (not unreachable)."""
    from mlflow.exceptions import MlflowException, RestException

    return isinstance(exc, RestException) or (
        isinstance(exc, MlflowException) and "failed with error code" in exc.message
    )


def is_transient(exc: BaseException) -> bool:
    """True for an MLflow failure worth trying again: the server unreachable (connection
    refused or reset, a timeout), a 5xx, 408 or 429. False for the rest (a 400 bad request,
    a missing run): retrying those would fail the same way."""
    import requests
    from mlflow.exceptions import MlflowException, RestException

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(
            e,
            requests.exceptions.ConnectionError
            | requests.exceptions.Timeout
            | requests.exceptions.RetryError  # MLflow's own retries ran out on 5xx/429
            | ConnectionError  # refused, reset, aborted
            | TimeoutError,
        ):
            return True
        if type(e).__name__ in ("OperationalError", "DisconnectionError"):  # a SQL store away
            return True
        if isinstance(e, MlflowException) and (
            isinstance(e, RestException) or "failed with error code" in e.message
        ):  # the server answered with an error
            status = e.get_http_status_code()
            return status >= 500 or status in _TRANSIENT_STATUS
        e = e.__cause__ or e.__context__
    return False


def _short(e: BaseException) -> str:
    """One line: the error's type and start, and the OS's reason when it is buried deeper
    (MLflow wraps "[Errno 111] Connection refused" in a long urllib3 message)."""
    text = " ".join(str(e).split())
    short = f"{type(e).__name__}: {text[:160]}"
    reason = re.search(r"\[Errno -?\d+\][^'\")]*|timed out", text)
    if len(text) > 160 and reason:
        short += f" ... {reason.group(0).strip()}"
    return short


def with_retries(fn: Callable[..., Any], *args: Any, until: float | None = None, **kwargs: Any):
    """``fn(*args, **kwargs)``, tried again after transient MLflow errors (`is_transient`)
    with backoff until ``until`` (``time.monotonic()``; default: ``mlflow_retry_s()`` from
    now). Any other error, or a transient one past ``until``, is raised."""
    until = time.monotonic() + mlflow_retry_s() if until is None else until
    delay, warned = _BACKOFF_FIRST_S, False
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not is_transient(e) or time.monotonic() + delay > until:
                raise
            if not warned:
                left = max(0.0, until - time.monotonic())
                _LOG.warning(
                    "MLflow unreachable for %s (%s); retrying for up to %.0f s",
                    getattr(fn, "__name__", "a write"),
                    _short(e),
                    left,
                )
                warned = True
            time.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX_S)


# The last sweep end's MLflow write figures, by sweep id (RunWriter.stats plus "drained"):
# the driver reads them in the process the logger ran in.
WRITES: dict[str, dict[str, Any]] = {}
