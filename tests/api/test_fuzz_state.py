"""Fuzz that finds the hostile-input classes by itself (issue 17): unicode edge cases in
every free-text field with a read-back of whatever was accepted, arbitrary Authorization
headers, and a stateful run of create, cancel, resume and a driver's death.

In-process (Starlette's TestClient, ``start_scheduler=False``): no driver starts, so the
state machine plays the launcher's part (a queued sweep's driver dies: ``interrupted``).
Seeded and bounded, like tests/api/test_fuzz.py.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from api.main import create_app
from tests.api.test_fuzz import TOKEN, make_settings, make_spec

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Text that breaks naive code: lone surrogates (not encodable as UTF-8), control
# characters, NUL, separators, right-to-left marks, non-characters, astral code points.
NASTY = st.text(
    alphabet=st.one_of(
        st.characters(codec=None),  # any code point, surrogates included
        st.sampled_from(["\x00", "\n", "\r", "\x1b", "\u202e", "\ufeff", "\uffff", "/", "."]),
    ),
    max_size=40,
)

# Where a string can go in a spec: (path into the spec dict, how it is put there).
PLACES = st.sampled_from(
    [
        ("name",),
        ("experiment",),
        ("trainer", "dataset"),
        ("trainer", "model"),
        ("trainer", "probe_questions"),
        ("search", "sampler"),
        ("search", "space", "token_expansion", "choices"),
        ("search", "space", "<key>"),
        ("objective", "metric"),
        ("<top key>",),
    ]
)


def _put(spec: dict, place: tuple[str, ...], text: str) -> dict:
    """The spec with ``text`` at ``place`` (a list where the field is a list; a key where
    the place names one)."""
    spec = json.loads(json.dumps(spec))
    if place == ("<top key>",):
        spec[text] = 1
        return spec
    if place[-1] == "<key>":
        spec["search"]["space"][text] = {"type": "categorical", "choices": [1, 2]}
        return spec
    if place[-1] == "choices":
        spec["search"]["space"]["token_expansion"] = {"type": "categorical", "choices": [text]}
        return spec
    node = spec
    for key in place[:-1]:
        node = node.setdefault(key, {})
    node[place[-1]] = [text] if place[-1] == "probe_questions" else text
    return spec


@pytest.fixture
def client(tmp_path):
    app = create_app(make_settings(tmp_path, api_token=TOKEN), start_scheduler=False)
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield c


@SETTINGS
@given(place=PLACES, text=NASTY, as_yaml=st.booleans())
def test_any_text_anywhere_is_4xx_or_stored_and_read_back(client, tmp_path, place, text, as_yaml):
    spec = _put(make_spec(tmp_path), place, text)
    if as_yaml:  # YAML's double-quoted escapes carry surrogates and controls too
        body = json.dumps(spec).encode()  # JSON is YAML: the same escapes
        r = client.post("/sweeps", content=body, headers={"Content-Type": "application/yaml"})
    else:
        r = client.post(
            "/sweeps",
            content=json.dumps(spec).encode(),
            headers={"Content-Type": "application/json"},
        )
    assert r.status_code in (201, 422), (place, text, r.status_code, r.text[:500])
    if r.status_code == 422:
        items = r.json()["detail"]
        assert items and all(isinstance(i["path"], str) for i in items), r.text
        return
    sid = r.json()["id"]
    got = client.get(f"/sweeps/{sid}")
    assert got.status_code == 200, got.text
    assert got.json()["spec"] == r.json()["spec"]  # stored is what was answered
    listed = client.get("/sweeps", params={"limit": 500})
    assert listed.status_code == 200 and sid in {s["id"] for s in listed.json()["items"]}
    trials = client.get(f"/sweeps/{sid}/trials")
    assert trials.status_code == 200, trials.text


@settings(max_examples=80, deadline=None, derandomize=True, database=None)
@given(
    value=st.binary(max_size=60).filter(lambda b: b"\r" not in b and b"\n" not in b),
    prefix=st.sampled_from([b"", b"Bearer ", b"bearer ", b"Basic ", b"Bearer  "]),
)
def test_any_authorization_header_is_401_never_500(value, prefix, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    app = create_app(make_settings(tmp, api_token=TOKEN), start_scheduler=False)
    client = TestClient(app)
    header = (prefix + value).strip(b" \t")
    for method, path in (("GET", "/sweeps"), ("POST", "/sweeps/x/cancel"), ("GET", "/metrics")):
        r = client.request(method, path, headers=[(b"authorization", header)])
        want = 200 if header == f"Bearer {TOKEN}".encode() else 401
        if want == 200 and path.endswith("/cancel"):
            want = 404
        assert r.status_code == want, (header, method, path, r.status_code, r.text[:300])


class SweepLifecycle(RuleBasedStateMachine):
    """Create, cancel, resume, a driver's death; the API must agree with a model of it."""

    sweeps = Bundle("sweeps")

    def __init__(self):
        super().__init__()
        import tempfile
        from pathlib import Path

        self._tmp = tempfile.TemporaryDirectory()
        tmp = Path(self._tmp.name)
        self.spec = make_spec(tmp)
        app = create_app(make_settings(tmp, api_token=TOKEN), start_scheduler=False)
        self.client = TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"})
        self.db = app.state.db
        self.model: dict[str, str] = {}

    def teardown(self):
        self.client.close()
        self._tmp.cleanup()

    @initialize(target=sweeps)
    def first(self):
        return self.create()

    @rule(target=sweeps)
    def create(self):
        r = self.client.post("/sweeps", json=self.spec)
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        self.model[sid] = "queued"
        return sid

    @rule(sid=sweeps)
    def cancel(self, sid):
        r = self.client.post(f"/sweeps/{sid}/cancel")
        if self.model[sid] in ("queued", "interrupted"):
            assert r.status_code == 202, r.text
            self.model[sid] = "cancelled"
        else:
            assert r.status_code == 409, r.text

    @rule(sid=sweeps)
    def resume(self, sid):
        r = self.client.post(f"/sweeps/{sid}/resume")
        if self.model[sid] in ("interrupted", "failed"):
            assert r.status_code == 202, r.text
            self.model[sid] = "queued"
        else:
            assert r.status_code == 409, r.text

    @rule(sid=sweeps)
    def driver_dies(self, sid):
        """What the launcher does when a running sweep's driver is gone."""
        from api.db import Sweep

        if self.model[sid] != "queued":
            return
        with self.db.session() as s:
            s.get(Sweep, sid).status = "interrupted"
        self.model[sid] = "interrupted"

    @invariant()
    def the_api_agrees_with_the_model(self):
        listed = self.client.get("/sweeps", params={"limit": 500})
        assert listed.status_code == 200
        got = {s["id"]: s["status"] for s in listed.json()["items"]}
        assert got == self.model
        for sid, status in self.model.items():
            one = self.client.get(f"/sweeps/{sid}")
            assert one.status_code == 200 and one.json()["status"] == status


SweepLifecycle.TestCase.settings = settings(
    max_examples=15, stateful_step_count=12, deadline=None, derandomize=True, database=None
)
test_create_cancel_resume_lifecycle = SweepLifecycle.TestCase
