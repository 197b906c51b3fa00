"""The service client against a scripted transport: what it waits out and what it does not."""

import httpx
import pytest

from sweeper.client import ServiceError, SweeperClient


def _scripted(answers: list[httpx.Response]):
    seen: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        return answers.pop(0)

    return httpx.MockTransport(handle), seen


def _away() -> httpx.Response:
    return httpx.Response(503, headers={"retry-after": "0"}, json={"detail": "database away"})


def test_a_read_waits_out_a_database_outage():
    transport, seen = _scripted([_away(), _away(), httpx.Response(200, json={"id": "s"})])
    client = SweeperClient("http://svc", transport=transport)
    assert client.get("s") == {"id": "s"} and seen == ["GET"] * 3


def test_a_read_gives_up_after_retry_s_and_a_write_is_never_repeated():
    transport, seen = _scripted([_away() for _ in range(3)])
    client = SweeperClient("http://svc", transport=transport, retry_s=0.0)
    with pytest.raises(ServiceError) as e:
        client.get("s")
    assert e.value.status == 503 and seen == ["GET"]
    with pytest.raises(ServiceError) as e:
        client.cancel("s")
    assert e.value.status == 503 and seen == ["GET", "POST"]
