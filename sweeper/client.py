"""A small client for the sweep service; the CLI's ``--server`` commands use it.

from sweeper.client import SweeperClient
c = SweeperClient("http://127.0.0.1:8000")
sweep = c.submit(open("examples/quickstart.yaml").read())
for kind, data in c.events(sweep["id"]):
    print(kind, data)
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import httpx


class ServiceError(Exception):
    """The service answered with an error; ``lines`` are ready to show (field paths first)."""

    def __init__(self, status: int, lines: list[str]):
        super().__init__("; ".join(lines))
        self.status, self.lines = status, lines


class SweeperClient:
    """``retry_s``: how long a read (GET) waits out a service whose database is away (503,
    with its Retry-After) before it gives up; writes are never repeated."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 30.0,
        retry_s: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ):
        self.url = url.rstrip("/")
        self.retry_s = retry_s
        token = token if token is not None else os.environ.get("SWEEPER_API_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    def _call(self, method: str, path: str, **kw) -> Any:
        deadline = time.monotonic() + self.retry_s
        while True:
            try:
                r = self.http.request(method, path, **kw)
            except httpx.HTTPError as e:
                raise ServiceError(0, [f"cannot reach the service at {self.url}: {e}"]) from None
            wait = _retry_after(r)
            if method == "GET" and wait is not None and time.monotonic() + wait < deadline:
                time.sleep(wait)
                continue
            if r.status_code >= 400:
                raise ServiceError(r.status_code, _error_lines(r))
            return r.json()

    def submit(self, spec: str | dict, content_type: str = "application/yaml") -> dict:
        """POST a spec (YAML/JSON text, or a dict); returns the queued sweep."""
        if isinstance(spec, dict):
            return self._call("POST", "/sweeps", json=spec)
        return self._call(
            "POST", "/sweeps", content=spec.encode(), headers={"content-type": content_type}
        )

    def list(self, status: str | None = None, limit: int = 50, offset: int = 0) -> dict:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = status
        return self._call("GET", "/sweeps", params=params)

    def get(self, sweep_id: str) -> dict:
        return self._call("GET", f"/sweeps/{sweep_id}")

    def trials(self, sweep_id: str) -> list[dict]:
        return self._call("GET", f"/sweeps/{sweep_id}/trials")["items"]

    def cancel(self, sweep_id: str) -> dict:
        return self._call("POST", f"/sweeps/{sweep_id}/cancel")

    def resume(self, sweep_id: str) -> dict:
        return self._call("POST", f"/sweeps/{sweep_id}/resume")

    def report(self, sweep_id: str, refresh: bool = False) -> str:
        """The sweep's report page (self-contained HTML)."""
        try:
            r = self.http.get(
                f"/sweeps/{sweep_id}/report", params={"refresh": refresh}, timeout=300
            )
        except httpx.HTTPError as e:
            raise ServiceError(0, [f"cannot reach the service at {self.url}: {e}"]) from None
        if r.status_code >= 400:
            raise ServiceError(r.status_code, _error_lines(r))
        return r.text

    def events(self, sweep_id: str, after: int = 0) -> Iterator[tuple[str, dict]]:
        """Yield ``(event, data)`` until the sweep ends; reconnects from the last id seen."""
        last, failures = after, 0
        while True:
            try:
                with self.http.stream(
                    "GET",
                    f"/sweeps/{sweep_id}/events",
                    params={"after": last},
                    timeout=httpx.Timeout(30.0, read=60.0),
                ) as r:
                    wait = _retry_after(r)
                    if wait is not None and failures < 60:  # its database is away: wait
                        r.read()
                        failures += 1
                        time.sleep(wait)
                        continue
                    if r.status_code >= 400:
                        r.read()
                        raise ServiceError(r.status_code, _error_lines(r))
                    for eid, kind, data in _parse_sse(r.iter_lines()):
                        failures = 0
                        if eid is not None:
                            last = eid
                        yield kind, data
                return  # the server ends the stream once the sweep is final
            except (httpx.TransportError, httpx.RemoteProtocolError) as e:
                failures += 1  # the service restarting: wait and reconnect
                if failures > 60:
                    raise ServiceError(0, [f"lost the service at {self.url}: {e}"]) from None
                time.sleep(1.0)


def _retry_after(r: httpx.Response) -> float | None:
    """Seconds to wait before asking again, for a 503 (the service's database is away);
    None for any other answer."""
    if r.status_code != 503:
        return None
    wait_s = r.headers.get("retry-after", "")
    return min(int(wait_s), 10) if wait_s.isdigit() else 1.0


def _parse_sse(lines: Iterator[str]) -> Iterator[tuple[int | None, str, dict]]:
    eid, kind, data = None, "message", []
    for line in lines:
        if not line:
            if data:
                yield eid, kind, json.loads("\n".join(data))
            eid, kind, data = None, "message", []
        elif line.startswith(":"):
            continue  # a keep-alive comment
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "id" and value.isdigit():
                eid = int(value)
            elif field == "event":
                kind = value
            elif field == "data":
                data.append(value)


def _error_lines(r: httpx.Response) -> list[str]:
    try:
        detail = r.json().get("detail")
    except (ValueError, AttributeError):
        return [f"HTTP {r.status_code}: {r.text[:200]}"]
    if isinstance(detail, list):
        return [
            f"{d.get('path')}: {d.get('msg')}" if d.get("path") else str(d.get("msg"))
            for d in detail
        ]
    return [f"HTTP {r.status_code}: {detail}"]
