"""The Grafana dashboards and provisioning under dashboards/grafana/.

Every panel query must name metrics that exist: ``sweeper_*`` names are checked against what
the real app's ``GET /metrics`` exports, ``ray_*`` names against a scrape of Ray's own
metrics endpoint kept in ray_metric_names.txt. Any other metric name is an error.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "dashboards" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").rglob("*.json"))
RAY_NAMES_FILE = Path(__file__).with_name("ray_metric_names.txt")
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}

# PromQL functions and aggregation operators (Prometheus 3): a name followed by "(".
FUNCTIONS = frozenset(
    """
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes
    clamp clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year
    days_in_month deg delta deriv double_exponential_smoothing exp floor histogram_avg
    histogram_count histogram_fraction histogram_quantile histogram_stddev histogram_stdvar
    histogram_sum holt_winters hour idelta increase irate label_join label_replace
    last_over_time ln log10 log2 mad_over_time max_over_time min_over_time minute month pi
    predict_linear present_over_time quantile_over_time rad rate resets round scalar sgn sin
    sinh sort sort_by_label sort_by_label_desc sort_desc sqrt stddev_over_time
    stdvar_over_time sum_over_time tan tanh time timestamp vector year
    sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk
    limit_ratio
    """.split()
)
KEYWORDS = frozenset({"and", "or", "unless", "atan2", "bool", "inf", "nan", "offset"})
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_CLAUSE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_NUMBER = re.compile(
    r"(?<![\w:.])(?:0[xX][0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)"
)
_IDENT = re.compile(r"[A-Za-z_:][\w:]*")
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)\s*\{([^{}]*)\}")
_MATCHER = re.compile(r'\s*([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:\\.|[^"\\])*)"\s*(?:,|$)')


def parse_expr(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, unknown function names) in a PromQL expression.

    Strings, label matchers ``{...}``, ranges ``[...]``, ``by``/``without``/``on``/
    ``ignoring``/``group_*`` label lists, Grafana variables, ``offset`` durations and
    numbers are dropped; of the identifiers left, one followed by ``(`` is a function call
    and the rest are metric names (sample names: a histogram's are ``_bucket``, ``_sum`` and
    ``_count``).
    """
    s = _STRING.sub('""', expr)
    s = re.sub(r"\{[^{}]*\}", " ", s)
    s = re.sub(r"\[[^\[\]]*\]", " ", s)
    s = _CLAUSE.sub(" ", s)
    s = re.sub(r"\$\{[^}]*\}|\$\w+", " ", s)
    s = re.sub(r"\boffset\s+-?\w+", " ", s)
    s = re.sub(r"@\s*(?:start|end)\s*\(\s*\)", " ", s)
    s = _NUMBER.sub(" ", s)
    names, unknown_functions = set(), set()
    for m in _IDENT.finditer(s):
        word = m.group()
        if s[m.end() :].lstrip().startswith("("):
            if word not in FUNCTIONS:
                unknown_functions.add(word)
        elif word.lower() not in KEYWORDS:
            names.add(word)
    return names, unknown_functions


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """Each ``name{label op "value", ...}`` in ``expr`` with its matchers."""
    out = []
    for m in _SELECTOR.finditer(expr):
        body, pos, matchers = m.group(2), 0, []
        while body[pos:].strip():
            x = _MATCHER.match(body, pos)
            assert x, f"cannot parse the matchers of {m.group(0)!r}"
            matchers.append(x.group(1, 2, 3))
            pos = x.end()
        out.append((m.group(1), matchers))
    return out


def ray_names() -> set[str]:
    lines = RAY_NAMES_FILE.read_text().splitlines()
    return {ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def all_panels(dash: dict) -> list[dict]:
    """Panels at the top level and inside (collapsed) rows."""
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def queries(dash: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel."""
    return [
        (p.get("title", ""), t["expr"])
        for p in all_panels(dash)
        for t in p.get("targets", [])
        if "expr" in t
    ]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, dict[str, set[str]]]:
    """Sample names the real app's GET /metrics exports, each with its labels' values."""
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from api.main import create_app
    from api.settings import Settings

    tmp = tmp_path_factory.mktemp("metrics")
    settings = Settings(home=tmp / "sweeps", database_url=f"sqlite:///{tmp}/db.sqlite")
    with TestClient(create_app(settings, start_scheduler=False)) as client:
        r = client.get("/metrics")
    assert r.status_code == 200, r.text
    out: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            labels = out.setdefault(sample.name, {})
            for k, v in sample.labels.items():
                labels.setdefault(k, set()).add(v)
    return out


def unknown_names(names: set[str], exported: set[str], ray: set[str]) -> set[str]:
    """Names that neither the service nor Ray exports."""
    return {
        n
        for n in names
        if not (n.startswith("sweeper_") and n in exported)
        and not (n.startswith("ray_") and n in ray)
    }


def test_there_is_a_dashboard():
    assert any(p.name == "sweeper.json" for p in DASHBOARDS), DASHBOARDS


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_well_formed(path):
    dash = load(path)
    assert dash.get("uid") and dash.get("title") and dash.get("panels")
    assert isinstance(dash.get("schemaVersion"), int) and dash["schemaVersion"] >= 36
    assert dash.get("id") is None, "provisioned dashboards carry no database id"
    assert "__inputs" not in dash and "${DS_" not in path.read_text(), "no import-time inputs"
    panels = all_panels(dash)
    ids = [p.get("id") for p in panels]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids)), ids
    for p in panels:
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p.get("title"), p["id"]
        assert p.get("datasource") == DATASOURCE, p["title"]
        targets = p.get("targets", [])
        assert any(t.get("expr", "").strip() for t in targets), p["title"]
        ref_ids = [t.get("refId") for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]
        for t in targets:
            assert t.get("datasource", DATASOURCE) == DATASOURCE, p["title"]


def test_the_sweeper_dashboard():
    dash = load(GRAFANA / "dashboards" / "sweeper.json")
    assert dash["uid"] == "projector-sweeper"
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert "Ray" in rows
    kinds = {p["type"] for p in all_panels(dash)}
    assert {"stat", "timeseries"} <= kinds
    failed = [p for p in all_panels(dash) if p["title"] == "Failed trials"]
    assert failed and failed[0]["type"] == "stat"
    steps = failed[0]["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert any(s["color"] == "red" and s["value"] == 1 for s in steps)


def test_every_query_names_an_exported_metric(exported):
    ray = ray_names()
    used: set[str] = set()
    for path in DASHBOARDS:
        for title, expr in queries(load(path)):
            names, functions = parse_expr(expr)
            assert names, f"{path.name}: {title!r}: no metric in {expr!r}"
            assert not functions, f"{path.name}: {title!r}: unknown functions {functions}"
            bad = unknown_names(names, set(exported), ray)
            assert not bad, f"{path.name}: {title!r}: {sorted(bad)} not exported ({expr!r})"
            used |= names
    sweeper = {n for n in used if n.startswith("sweeper_")}
    assert len(sweeper) >= 5, sweeper  # the extractor finds names at all
    assert len({n for n in used if n.startswith("ray_")}) >= 5, used
    # the panels: sweeps by state, trials, trial durations
    assert {
        "sweeper_sweeps",
        "sweeper_trials",
        "sweeper_trial_duration_seconds_bucket",
        "sweeper_trial_duration_seconds_sum",
        "sweeper_trial_duration_seconds_count",
    } <= sweeper


def test_sweeper_label_matchers_exist(exported):
    """``sweeper_trials{state="runing"}`` parses and names a real metric, yet shows nothing."""
    seen = 0
    for path in DASHBOARDS:
        for title, expr in queries(load(path)):
            for name, matchers in selectors(expr):
                if not name.startswith("sweeper_"):
                    continue
                labels = exported.get(name, {})
                for label, op, value in matchers:
                    seen += 1
                    where = f"{path.name}: {title!r}: {name}{{{label}{op}{value!r}}}"
                    assert label in labels, f"{where}: no label {label!r}"
                    if op == "=":
                        assert value in labels[label], f"{where}: no such value"
                    elif op == "=~" and re.fullmatch(r"\w+(\|\w+)*", value):
                        missing = set(value.split("|")) - labels[label]
                        assert not missing, f"{where}: no values {missing}"
    assert seen >= 5


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (state) (sweeper_sweeps{state="running"})', {"sweeper_sweeps"}),
        (
            "histogram_quantile(0.99, sum by (le) (rate(sweeper_trial_duration_seconds_bucket"
            "[$__rate_interval])))",
            {"sweeper_trial_duration_seconds_bucket"},
        ),
        (
            "sum(a_sum) / on() group_left(x) sum without (le, job) (b_count offset 5m) > 1e3",
            {"a_sum", "b_count"},
        ),
        ("time() - max(sweeper_scrape_timestamp_seconds)", {"sweeper_scrape_timestamp_seconds"}),
        (
            'clamp_min(sum(ray_tasks{State!~"FINISHED|FAILED", Name="f(x)"}) by (State), 0)',
            {"ray_tasks"},
        ),
        ("sum(increase(ray_finished_jobs_total[5m:1m])) or vector(0)", {"ray_finished_jobs_total"}),
        ("up == bool 1 and ignoring(job) foo:bar", {"up", "foo:bar"}),
    ],
)
def test_parse_expr(expr, names):
    assert parse_expr(expr) == (names, set())


def test_wrong_names_are_caught(exported):
    ray = ray_names()
    names, functions = parse_expr(
        "histogram_quantil(0.5, rate(sweeper_trial_duration_seconds[5m]))"
        " + sweeper_trials_total + ray_node_gpu_utilization + up + ray_tasks"
    )
    assert functions == {"histogram_quantil"}
    assert unknown_names(names, set(exported), ray) == {
        "sweeper_trial_duration_seconds",  # a histogram is queried by _bucket/_sum/_count
        "sweeper_trials_total",
        "ray_node_gpu_utilization",
        "up",
    }


def test_ray_names_fixture():
    header = "".join(ln for ln in RAY_NAMES_FILE.read_text().splitlines() if ln.startswith("#"))
    assert re.search(r"Ray \d+\.\d+\.\d+", header) and re.search(r"\d{4}-\d{2}-\d{2}", header)
    names = ray_names()
    assert len(names) > 50 and all(re.fullmatch(r"ray_\w+", n) for n in names), names
    assert {"ray_node_cpu_utilization", "ray_tasks", "ray_actors", "ray_resources"} <= names


def _mounts() -> dict[str, str]:
    """README's compose volumes, ``- ../SRC:DST[:ro]``, as {SRC from the repo root: DST}."""
    out = {}
    for line in (GRAFANA / "README.md").read_text().splitlines():
        m = re.fullmatch(r"\s*-\s*(\.\./)?(\S+?):(/\S+?)(?::ro)?\s*", line)
        if m:
            out[m.group(2)] = m.group(3)
    return out


def test_provisioning():
    mounts = _mounts()
    assert mounts == {
        "dashboards/grafana/prometheus.yml": "/etc/prometheus/prometheus.yml",
        "dashboards/grafana/provisioning": "/etc/grafana/provisioning",
        "dashboards/grafana/dashboards": "/var/lib/grafana/dashboards",
    }
    for src in mounts:
        assert (ROOT / src).exists(), src

    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())
    assert ds["apiVersion"] == 1
    (prom,) = ds["datasources"]
    assert {k: prom[k] for k in ("type", "uid")} == DATASOURCE
    assert prom["url"] == "http://prometheus:9090" and prom["isDefault"] is True

    prov = yaml.safe_load((GRAFANA / "provisioning/dashboards/sweeper.yaml").read_text())
    assert prov["apiVersion"] == 1
    (provider,) = prov["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == mounts["dashboards/grafana/dashboards"]
    # the provisioning folder holds these two files where Grafana looks for them
    assert Path(mounts["dashboards/grafana/provisioning"]) == Path("/etc/grafana/provisioning")


def test_prometheus_scrape_config():
    cfg = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert set(jobs) == {"sweeper-api", "ray"}
    api = jobs["sweeper-api"]
    assert api.get("metrics_path", "/metrics") == "/metrics"
    assert [t for sc in api["static_configs"] for t in sc["targets"]] == ["api:8000"]
    assert [t for sc in jobs["ray"]["static_configs"] for t in sc["targets"]] == ["ray-head:8080"]
    text = (GRAFANA / "prometheus.yml").read_text()
    assert "SWEEPER_API_TOKEN" in text and "credentials_file" in text
