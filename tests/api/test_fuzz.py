"""The REST service against its own OpenAPI schema (schemathesis), plus focused checks.

Everything runs in-process: schemathesis's ASGI transport and Starlette's TestClient call
the app directly; nothing listens on a socket. Every app here is built with
``start_scheduler=False``, so no sweep driver ever starts: submitted sweeps stay queued.
"""

from __future__ import annotations

import json

import pytest
import schemathesis
import yaml
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings

from api.main import create_app
from api.settings import Settings

TOKEN = "s3cret"

# The checks the fuzz runs (schemathesis's config: everything off, then these on).
# Left out: allow_header_conformance (Starlette answers a 405 with the Allow header of the
# one route it matched, so /sweeps says POST without GET); negative_data_rejection (pydantic
# coerces leniently on purpose, e.g. `false` to 0 or YAML's "1e-3" string to a float);
# positive_data_acceptance (a spec has rules no JSON schema states: names, paths, search
# keys that are trainer fields, so schema-valid specs may rightly get 422).
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "missing_required_header",
    "ignored_auth",
    "unsupported_method",
)
FUZZ_CONFIG = {
    "seed": 0,
    "auth": {"openapi": {"HTTPBearer": {"bearer": TOKEN}}},
    "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
}
# Small and reproducible: 25 generated cases per operation (plus schemathesis's examples and
# coverage cases), the same ones on every run.
FUZZ_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def make_settings(tmp_path, **kw) -> Settings:
    """Settings in this test's folder; explicit values, so no SWEEPER_* variable leaks in."""
    base = dict(
        home=tmp_path / "sweeps",
        database_url=f"sqlite:///{tmp_path}/db.sqlite",
        allowed_paths=str(tmp_path),
        api_token=None,
        max_body_bytes=1_000_000,
        mlflow_ui_url=None,
    )
    return Settings(**(base | kw))


def make_spec(tmp_path, **sections) -> dict:
    """A valid spec dict on the tiny model; its dataset path lies under an allowed root."""
    spec = {
        "name": "tiny",
        "trainer": {"model": "tiny-llama", "dataset": str(tmp_path / "data"), "max_steps": 20},
        "search": {
            "sampler": "tpe",
            "space": {"reg_constant": {"type": "float", "low": 1e-3, "high": 10.0, "log": True}},
        },
        "budget": {"trials": 2, "max_concurrent": 1},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = spec[key] | value
        else:
            spec[key] = value
    return spec


# ---- fuzzing -----------------------------------------------------------------------------
def _schema(tmp_path):
    app = create_app(make_settings(tmp_path, api_token=TOKEN), start_scheduler=False)
    config = schemathesis.Config.from_dict(FUZZ_CONFIG)
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=config)


@pytest.fixture
def api_schema(tmp_path):
    return _schema(tmp_path)


@pytest.fixture
def events_schema(tmp_path):
    """A fresh, empty service: every sweep id the events fuzz sends is unknown."""
    return _schema(tmp_path)


# GET /sweeps/{id}/events streams until its sweep is final, and a queued sweep never is here
# (no scheduler). So it is fuzzed on its own, against an empty database where every id is
# unknown and answers 404 (or 422 for a bad `after`) at once; the main fuzz skips it. The
# request timeout is one more guard: the ASGI transport cuts an event stream at it.
fuzz_schema = schemathesis.pytest.from_fixture("api_schema").exclude(path_regex=r"/events$")
fuzz_events_schema = schemathesis.pytest.from_fixture("events_schema").include(
    path_regex=r"/events$"
)


@fuzz_schema.parametrize()
@FUZZ_SETTINGS
def test_fuzz_api(case):
    """No 5xx, and status codes, content types, bodies and headers as the schema says."""
    case.call_and_validate(timeout=10)


@fuzz_events_schema.parametrize()
@FUZZ_SETTINGS
def test_fuzz_events_unknown_ids(case):
    case.call_and_validate(timeout=10)


# ---- focused tests -------------------------------------------------------------------------
@pytest.fixture
def client_for(tmp_path):
    """Factory of TestClients on an in-process app; keywords override the settings."""
    clients = []

    def make(**kw) -> TestClient:
        app = create_app(make_settings(tmp_path, **kw), start_scheduler=False)
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(client_for):
    return client_for()


def submit(client, spec: dict) -> dict:
    r = client.post("/sweeps", json=spec)
    assert r.status_code == 201, r.text
    return r.json()


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/sweeps/nope"),
        ("GET", "/sweeps/nope/trials"),
        ("POST", "/sweeps/nope/cancel"),
        ("POST", "/sweeps/nope/resume"),
        ("GET", "/sweeps/nope/events"),
    ],
)
def test_unknown_sweep_is_404(client, method, path):
    r = client.request(method, path)
    assert r.status_code == 404
    assert "nope" in r.json()["detail"]


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/sweeps"),
        ("POST", "/sweeps"),
        ("GET", "/sweeps/nope"),
        ("POST", "/sweeps/nope/cancel"),
        ("GET", "/sweeps/nope/events"),
        ("GET", "/metrics"),
    ],
)
def test_bearer_token(client_for, method, path):
    client = client_for(api_token=TOKEN)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        r = client.request(method, path, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json() == {"detail": "missing or wrong bearer token"}
    r = client.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code != 401


def test_healthz_needs_no_token(client_for):
    client = client_for(api_token=TOKEN)
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_body_over_limit_is_413(client_for, tmp_path):
    client = client_for(max_body_bytes=2048)
    body = json.dumps(make_spec(tmp_path, experiment="x" * 5000)).encode()
    assert len(body) > 5000
    r = client.post("/sweeps", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json() == {"detail": "request body over 2048 bytes"}

    def chunks():  # no Content-Length: the limit counts the bytes as they stream in
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    r = client.post("/sweeps", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == 413
    assert r.json() == {"detail": "request body over 2048 bytes"}
    # Under the limit still goes through, streamed or not.
    small = json.dumps(make_spec(tmp_path)).encode()
    assert len(small) < 2048
    r = client.post("/sweeps", content=iter([small]), headers={"content-type": "application/json"})
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("dataset", ["/etc", "../x"])
def test_dataset_outside_allowed_paths_is_422(client, tmp_path, dataset):
    r = client.post("/sweeps", json=make_spec(tmp_path, trainer={"dataset": dataset}))
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail[0]["path"] == "trainer.dataset"
    assert detail[0]["type"] == "path_not_allowed"
    assert client.get("/sweeps").json()["total"] == 0


@pytest.mark.parametrize(
    "sections, path",
    [
        ({"bogus": 1}, "bogus"),
        ({"trainer": {"learning_rate": 0.1}}, "trainer.learning_rate"),
        ({"budget": {"trails": 3}}, "budget.trails"),
    ],
)
def test_unknown_key_is_422_with_its_path(client, tmp_path, sections, path):
    r = client.post("/sweeps", json=make_spec(tmp_path, **sections))
    assert r.status_code == 422
    error = {"path": path, "msg": "unknown field", "type": "extra_forbidden"}
    assert r.json()["detail"][0] == error


def test_bad_sampler_option_is_422_with_its_path(client, tmp_path):
    search = make_spec(tmp_path)["search"] | {"sampler_options": {"n_startup_trials": "x"}}
    r = client.post("/sweeps", json=make_spec(tmp_path, search=search))
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail[0]["path"] == "search.sampler_options.n_startup_trials", detail
    assert "valid integer" in detail[0]["msg"]
    assert client.get("/sweeps").json()["total"] == 0


@pytest.mark.parametrize("ctype", ["application/yaml", "application/json"])
def test_submit_is_201_and_queued(client, tmp_path, ctype):
    spec = make_spec(tmp_path)
    text = yaml.safe_dump(spec) if ctype == "application/yaml" else json.dumps(spec)
    r = client.post("/sweeps", content=text, headers={"content-type": ctype})
    assert r.status_code == 201, r.text
    out = r.json()
    assert r.headers["location"] == f"/sweeps/{out['id']}"
    assert out["status"] == "queued"
    assert out["name"] == "tiny"
    assert out["spec"]["trainer"]["dataset"] == str(tmp_path / "data")
    assert out["mlflow"]["experiment"] == "tiny"
    assert client.get(f"/sweeps/{out['id']}").json()["status"] == "queued"
    assert client.get(f"/sweeps/{out['id']}/trials").json() == {"items": []}


def test_wrong_content_type_is_415(client, tmp_path):
    text = json.dumps(make_spec(tmp_path))
    r = client.post("/sweeps", content=text, headers={"content-type": "text/plain"})
    assert r.status_code == 415
    assert "text/plain" in r.json()["detail"]


def test_cancel_queued_then_again(client, tmp_path):
    sid = submit(client, make_spec(tmp_path))["id"]
    r = client.post(f"/sweeps/{sid}/cancel")
    assert r.status_code == 202
    assert r.json()["status"] == "cancelled"
    assert r.json()["cancel_requested"] is True
    r = client.post(f"/sweeps/{sid}/cancel")
    assert r.status_code == 409
    assert "cancelled" in r.json()["detail"]


def test_cancel_of_an_interrupted_sweep_cancels_its_paused_trials(client, tmp_path):
    """No driver will continue them: they are cut short for good, not left "paused"."""
    from api.db import Sweep, TrialRow

    sid = submit(client, make_spec(tmp_path))["id"]
    db = client.app.state.db
    with db.session() as s:
        s.get(Sweep, sid).status = "interrupted"
        for tid, status in (("a", "finished"), ("b", "paused"), ("c", "stopped")):
            s.add(TrialRow(sweep_id=sid, id=tid, status=status, params={}))
    r = client.post(f"/sweeps/{sid}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    items = client.get(f"/sweeps/{sid}/trials").json()["items"]
    got = {t["id"]: t["status"] for t in items}
    assert got == {"a": "finished", "b": "cancelled", "c": "stopped"}


def test_resume_only_interrupted_or_failed(client, tmp_path):
    queued = submit(client, make_spec(tmp_path))["id"]
    cancelled = submit(client, make_spec(tmp_path))["id"]
    client.post(f"/sweeps/{cancelled}/cancel")
    for sid, status in ((queued, "queued"), (cancelled, "cancelled")):
        r = client.post(f"/sweeps/{sid}/resume")
        assert r.status_code == 409
        assert f"is {status}" in r.json()["detail"]
        assert client.get(f"/sweeps/{sid}").json()["status"] == status


def test_list_filters_and_pages(client, tmp_path):
    ids = [submit(client, make_spec(tmp_path))["id"] for _ in range(4)]
    client.post(f"/sweeps/{ids[0]}/cancel")
    queued_newest_first = ids[:0:-1]

    page = client.get("/sweeps", params={"status": "queued", "limit": 2, "offset": 0}).json()
    assert (page["total"], page["limit"], page["offset"]) == (3, 2, 0)
    assert [s["id"] for s in page["items"]] == queued_newest_first[:2]
    page = client.get("/sweeps", params={"status": "queued", "limit": 2, "offset": 2}).json()
    assert (page["total"], page["limit"], page["offset"]) == (3, 2, 2)
    assert [s["id"] for s in page["items"]] == queued_newest_first[2:]
    page = client.get("/sweeps", params={"status": "queued", "offset": 10}).json()
    assert (page["total"], page["items"]) == (3, [])

    assert client.get("/sweeps").json()["total"] == 4
    cancelled = client.get("/sweeps", params={"status": "cancelled"}).json()
    assert [s["id"] for s in cancelled["items"]] == [ids[0]]
    for bad in ({"status": "bogus"}, {"limit": 0}, {"limit": 501}, {"offset": -1}):
        r = client.get("/sweeps", params=bad)
        assert r.status_code == 422
        assert r.json()["detail"][0]["path"] == f"query.{next(iter(bad))}"


def test_metrics_are_prometheus_text(client, tmp_path):
    submit(client, make_spec(tmp_path))
    submit(client, make_spec(tmp_path))
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert 'sweeper_sweeps{state="queued"} 2.0' in r.text
    assert 'sweeper_sweeps{state="running"} 0.0' in r.text
    assert "# TYPE sweeper_trial_duration_seconds histogram" in r.text


def test_openapi_schema(client):
    schema = client.get("/openapi.json").json()
    assert "SweepSpec" in schema["components"]["schemas"]
    post = schema["paths"]["/sweeps"]["post"]
    content = post["requestBody"]["content"]
    assert {"application/json", "application/yaml"} <= set(content)
    for media in content.values():
        assert media["schema"] == {"$ref": "#/components/schemas/SweepSpec"}
    assert {"201", "401", "413", "415", "422"} <= set(post["responses"])
    # Errors are documented as the app sends them: JSON ErrorBody, also for request
    # validation (not FastAPI's default {loc, msg, type}) and on the text/plain /metrics.
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            for code, response in op["responses"].items():
                if code.startswith("4"):
                    assert response["content"] == error, (method, path, code)


# ---- regressions the fuzz found ---------------------------------------------------------------
INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("ctype", ["application/json", "application/yaml"])
@pytest.mark.parametrize(
    "sections, path",
    [
        # Stored, an infinite float became null (lr: inf was queued as lr: null) ...
        ({"trainer": {"lr": INF}}, "trainer.lr"),
        # ... or answered 500, and every later GET /sweeps too.
        ({"budget": {"time_budget_s": INF}}, "budget.time_budget_s"),
        (
            {"search": {"space": {"reg_constant": {"type": "float", "low": 0.1, "high": NAN}}}},
            "search.space.reg_constant.high",
        ),
        ({"search": {"points": [{"reg_constant": -INF}]}}, "search.points.0.reg_constant"),
    ],
)
def test_non_finite_numbers_are_422(client, tmp_path, sections, path, ctype):
    spec = make_spec(tmp_path, **sections)
    # JSON's NaN/Infinity and YAML's .nan/.inf, as Python's json and PyYAML write them.
    body = yaml.safe_dump(spec) if ctype == "application/yaml" else json.dumps(spec)
    r = client.post("/sweeps", content=body, headers={"content-type": ctype})
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == [
        {"path": path, "msg": "must be a finite number", "type": "finite_number"}
    ]
    assert client.get("/sweeps").json()["total"] == 0


@pytest.mark.parametrize(
    "body, ctype",
    [
        ('{"name": 1%s}' % ("0" * 5000), "application/json"),  # over Python's 4300 digits
        ("name: 1%s" % ("0" * 5000), "application/yaml"),
        ("name: 2001-13-01", "application/yaml"),  # PyYAML raises ValueError, not YAMLError
        ("name: !!int x", "application/yaml"),
    ],
)
def test_unparsable_values_are_422_not_500(client, body, ctype):
    r = client.post("/sweeps", content=body, headers={"content-type": ctype})
    assert r.status_code == 422
    assert r.json()["detail"][0]["type"] == "parse"


def test_huge_offsets_are_422(client, tmp_path):
    r = client.get("/sweeps", params={"offset": 2**63})
    assert r.status_code == 422
    assert client.get("/sweeps", params={"offset": 2**63 - 1}).json()["items"] == []
    sid = submit(client, make_spec(tmp_path))["id"]
    client.post(f"/sweeps/{sid}/cancel")
    r = client.get(f"/sweeps/{sid}/events", params={"after": 2**63})
    assert r.status_code == 422


def test_events_of_a_final_sweep_replay_and_end(client, tmp_path):
    sid = submit(client, make_spec(tmp_path))["id"]
    client.post(f"/sweeps/{sid}/cancel")  # final, so the stream ends after the replay
    r = client.get(f"/sweeps/{sid}/events")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = _sse(r.text)
    assert [(e["event"], json.loads(e["data"])["status"]) for e in events] == [
        ("sweep", "queued"),
        ("sweep", "cancelled"),
    ]
    first = events[0]["id"]
    # Resuming after the first event replays only the rest; so does ?after.
    rest = client.get(f"/sweeps/{sid}/events", headers={"last-event-id": first})
    assert [e["id"] for e in _sse(rest.text)] == [events[1]["id"]]
    rest = client.get(f"/sweeps/{sid}/events", params={"after": first})
    assert [e["id"] for e in _sse(rest.text)] == [events[1]["id"]]
    # '²' passes str.isdigit() but not int(), and an id past 2^63 - 1 broke the stream (an
    # OverflowError; 4,300 digits a 500): Last-Event-ID is validated like ?after, a 422.
    for bad in (b"\xb2", "9" * 30, "9" * 5000):
        r = client.get(f"/sweeps/{sid}/events", headers={"last-event-id": bad})
        assert r.status_code == 422
        assert r.json()["detail"][0]["path"] == "header.last-event-id"


def _sse(text: str) -> list[dict[str, str]]:
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            events.append(fields)
    return events


# ---- found in review ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        "name: x\ntrainer: {model: !!binary L2V0Yw==}\n"  # b"/etc" as YAML bytes
        "search: {space: {reg_constant: {type: float, low: 0.0, high: 1.0}}}\n",
        "name: x\ntrainer: {model: '~nouser/x'}\n"
        "search: {space: {reg_constant: {type: float, low: 0.0, high: 1.0}}}\n",
        'name: x\ntrainer: {dataset: "a\\0b"}\n'
        "search: {space: {reg_constant: {type: float, low: 0.0, high: 1.0}}}\n",
        f"name: x\ntrainer: {{model: {'a' * 300}}}\n"
        "search: {space: {reg_constant: {type: float, low: 0.0, high: 1.0}}}\n",
    ],
    ids=["binary", "no-such-user", "nul", "too-long"],
)
def test_odd_model_and_dataset_values_are_422(client, body):
    r = client.post("/sweeps", content=body, headers={"content-type": "application/yaml"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["path"] in ("trainer.model", "trainer.dataset")


@pytest.mark.parametrize("sweep_id", ["%00", "UPPER", "a" * 200])
def test_ids_that_cannot_exist_are_404(client, sweep_id):
    assert client.get(f"/sweeps/{sweep_id}").status_code == 404
    assert client.post(f"/sweeps/{sweep_id}/cancel").status_code == 404
