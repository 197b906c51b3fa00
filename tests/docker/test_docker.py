"""Static checks of the Docker deployment in docker/; no Docker engine needed.

The compose file against the Compose Specification's JSON schema (check-jsonschema's
vendored copy), the Dockerfiles through hadolint, and the stack's settings against the
code that reads them, the README's table and docker/.env.example. Each check also proves
on a known-bad input, or by what it found, that it can fail.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = (DOCKER / "Dockerfile", DOCKER / "Dockerfile.gpu")
ENV_EXAMPLE = DOCKER / ".env.example"
README = ROOT / "README.md"
OUR_SERVICES = ("api", "ray-head", "ray-worker")
CODE_DIRS = ("api", "sweeper", "trainer", "dashboards")
PREFIXES = ("SWEEPER_", "MLFLOW_", "RAY_")
COMPOSE_SCHEMA = "vendor.compose-spec"  # check-jsonschema's copy of the Compose Specification

# Variables the stack sets for our services that a library reads, not our code: (package,
# file inside it, glob allowed) where the library reads it. Checked by hand in the installed
# versions; test_library_variables_are_read_by_their_library looks for the name there again.
LIBRARY_ENV = {
    # MLflow's client: the tracking server (mlflow.environment_variables.MLFLOW_TRACKING_URI,
    # read by mlflow.tracking._tracking_service.utils).
    "MLFLOW_TRACKING_URI": ("mlflow", "environment_variables.py"),
    # Ray: token authentication on or off, read by `ray start`, ray.init and the job client
    # (ray._private.authentication.authentication_token_setup.AUTH_MODE_ENV_VAR).
    "RAY_AUTH_MODE": ("ray", "_private/authentication/authentication_token_setup.py"),
    # Ray: the token, read by its C++ AuthenticationTokenLoader, compiled into ray._raylet
    # ("Loaded authentication token from RAY_AUTH_TOKEN environment variable").
    "RAY_AUTH_TOKEN": ("ray", "_raylet*.so"),
}

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, ${VAR:+alt}, $VAR;
# $$ is a literal dollar sign.
INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


# ---- helpers ----------------------------------------------------------------------------


def tool(name: str) -> str:
    """A console script of the test extra, next to this Python first."""
    for folder in (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent):
        if (folder / name).is_file():
            return str(folder / name)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return found


def load_compose(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())  # safe_load resolves the << merge keys


def strings(node) -> list[str]:
    """Every string in a YAML tree, keys included (comments are not in the tree)."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*strings(k), *strings(v))]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def environment(service: dict) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def compose_variables(compose: dict) -> dict[str, set[tuple[str, str]]]:
    """Each variable the compose file reads from its environment: {name: {(op, arg)}}.

    A valueless ``environment`` entry (``NAME:``) is passed on from the environment too,
    and only when set; its op is ``"pass"``.
    """
    found: dict[str, set[tuple[str, str]]] = {}
    for text in strings(compose):
        for m in INTERPOLATION.finditer(text):
            if m["escaped"]:
                continue
            assert "$" not in (m["arg"] or ""), f"nested interpolation in {text!r}"
            found.setdefault(m["braced"] or m["plain"], set()).add((m["op"] or "", m["arg"] or ""))
    for service in compose["services"].values():
        for name, value in environment(service).items():
            if value is None:
                found.setdefault(name, set()).add(("pass", ""))
    return found


def interpolate(text: str) -> str:
    """``text`` as Compose reads it with none of its variables set (defaults only)."""

    def one(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        if m["op"] in (":-", "-"):
            return m["arg"]
        if m["op"] in (":?", "?"):
            return "<required>"
        return ""

    return INTERPOLATION.sub(one, text)


def env_names_read_by_code() -> set[str]:
    """Environment variables our code reads: os.environ/getenv literals, typer envvars,
    and the pydantic-settings fields of api/settings.py."""
    names: set[str] = set()

    def is_environ(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
            isinstance(node, ast.Name) and node.id == "environ"
        )

    def literals(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, ast.List | ast.Tuple):
            return [s for e in node.elts for s in literals(e)]
        return []

    for folder in CODE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call):
                    func = node.func
                    reads = (isinstance(func, ast.Attribute) and func.attr == "getenv") or (
                        isinstance(func, ast.Attribute)
                        and func.attr in ("get", "setdefault")
                        and is_environ(func.value)
                    )
                    if reads and node.args:
                        names.update(literals(node.args[0]))
                    for kw in node.keywords:
                        if kw.arg in ("envvar", "validation_alias"):
                            names.update(literals(kw.value))
                elif (
                    isinstance(node, ast.Subscript)
                    and isinstance(node.ctx, ast.Load)
                    and is_environ(node.value)
                ):
                    names.update(literals(node.slice))
                elif isinstance(node, ast.Compare) and any(is_environ(c) for c in node.comparators):
                    names.update(literals(node.left))

    from pydantic import AliasChoices

    from api.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, str):
            names.add(alias)
        elif isinstance(alias, AliasChoices):
            names.update(c for c in alias.choices if isinstance(c, str))
        else:
            names.add(f"{prefix}{field_name}".upper())
    return names


def readme_table() -> dict[str, str]:
    """The "Run on a cluster" table: {variable: its default cell}."""
    text = README.read_text()
    m = re.search(r"^## Run on a cluster\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, 'README.md has no "## Run on a cluster" section'
    table: dict[str, str] = {}
    for line in m[1].splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        for name in re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[0]):
            assert name not in table, f"{name} has two rows"
            table[name] = cells[1]
    return table


def hadolint(dockerfile: Path, workdir: Path) -> tuple[int, list[dict]]:
    """hadolint's findings at its default threshold, with no user or project config."""
    proc = subprocess.run(
        [tool("hadolint"), "--no-color", "--format", "json", str(dockerfile)],
        capture_output=True,
        text=True,
        cwd=workdir,
        env={"PATH": "/usr/bin:/bin", "HOME": str(workdir), "XDG_CONFIG_HOME": str(workdir)},
        timeout=120,
    )
    return proc.returncode, json.loads(proc.stdout or "[]")


def check_compose_schema(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", COMPOSE_SCHEMA, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


# ---- the compose file -------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification(tmp_path):
    proc = check_compose_schema(COMPOSE)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # the same check refuses a service key the specification does not have
    bad = load_compose()
    bad["services"]["api"]["healthcheck"]["intervall"] = "5s"
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(bad))
    proc = check_compose_schema(tmp_path / "compose.yaml")
    assert proc.returncode != 0 and "intervall" in proc.stdout + proc.stderr


def test_long_running_services_have_a_healthcheck_and_restart():
    services = load_compose()["services"]
    assert {*OUR_SERVICES, "postgres", "mlflow", "prometheus", "grafana"} <= set(services)
    checked = 0
    for name, service in services.items():
        if service.get("restart") == "no":  # a one-shot job
            continue
        checked += 1
        assert service.get("restart") == "unless-stopped", name
        health = service.get("healthcheck") or {}
        test = health.get("test")
        assert test and not health.get("disable") and test[0] != "NONE", f"{name}: no healthcheck"
        if isinstance(test, list) and test[:3] == ["CMD", "python", "-c"]:
            compile(test[3], f"{name} healthcheck", "exec")  # the probe is valid Python
    assert checked == len(services)

    # A service that waits for another to be healthy waits on a real healthcheck.
    for name, service in services.items():
        for dep, cond in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond.get("condition") == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name} waits on {dep}"


def test_published_ports_listen_on_localhost_by_default():
    published = []
    for name, service in load_compose()["services"].items():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                host_ip = interpolate(str(port.get("host_ip", "")))
            else:
                parts = interpolate(str(port)).split(":")
                host_ip = parts[0] if len(parts) == 3 else ""
            published.append((name, host_ip))
    assert len(published) >= 5, published  # api, mlflow, ray dashboard, prometheus, grafana
    assert all(ip == "127.0.0.1" for _, ip in published), published


def test_services_share_the_sweeps_and_cache_volumes_at_their_paths():
    compose = load_compose()
    mounts = {}
    for name in OUR_SERVICES:
        service = compose["services"][name]
        env = environment(service)
        volumes = dict(reversed(v.split(":")[:2]) for v in service["volumes"])  # target: source
        mounts[name] = (volumes[env["SWEEPER_HOME"]], volumes[env["SWEEPER_CACHE_DIR"]])
        assert env["SWEEPER_HOME"] == "/data/sweeps" and env["SWEEPER_CACHE_DIR"] == "/data/cache"
    assert len(set(mounts.values())) == 1, mounts
    assert set(mounts["api"]) <= set(compose["volumes"])

    # bind mounts (relative to docker/) name files of this repository
    binds = [
        v.split(":")[0]
        for service in compose["services"].values()
        for v in service.get("volumes", [])
        if isinstance(v, str) and v.startswith(".")
    ]
    assert "../dashboards/grafana/prometheus.yml" in binds and "./postgres-init" in binds
    for source in binds:
        assert (DOCKER / source).exists(), source


def test_builds_use_our_dockerfiles_and_their_build_args():
    built = 0
    for name, service in load_compose()["services"].items():
        build = service.get("build")
        if not build:
            continue
        built += 1
        dockerfile = (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve()
        assert dockerfile in {d.resolve() for d in DOCKERFILES}, name
        declared = set(re.findall(r"^ARG (\w+)", dockerfile.read_text(), re.M))
        assert set(build.get("args", {})) <= declared, (name, declared)
    assert built == 2  # api (CPU image) and ray-head (GPU image); others reuse them


# ---- environment variables --------------------------------------------------------------


def test_variables_set_for_our_services_are_read_by_the_code():
    read = env_names_read_by_code()
    # the collector sees each kind of read: getenv, typer envvar, settings field, alias
    assert {"SWEEPER_CACHE_DIR", "SWEEPER_SERVER", "SWEEPER_DATABASE_URL", "RAY_ADDRESS"} <= read
    assert "SWEEPER_NO_SUCH_SETTING" not in read

    services = load_compose()["services"]
    set_for_us = {
        (name, var)
        for name in OUR_SERVICES
        for var in environment(services[name])
        if var.startswith(PREFIXES)
    }
    assert len({var for _, var in set_for_us}) >= 10, set_for_us
    # passed on only when set: an empty SWEEPER_API_TOKEN is a token no client can send
    assert environment(services["api"])["SWEEPER_API_TOKEN"] is None
    unknown = sorted((n, v) for n, v in set_for_us if v not in read and v not in LIBRARY_ENV)
    assert not unknown, f"set in compose.yaml but read by nothing: {unknown}"
    # the allow-list is only for what our code does not read, and every entry is used
    assert not (set(LIBRARY_ENV) & read)
    assert set(LIBRARY_ENV) <= {var for _, var in set_for_us}


def test_library_variables_are_read_by_their_library():
    for var, (package, pattern) in LIBRARY_ENV.items():
        spec = importlib.util.find_spec(package)
        assert spec and spec.submodule_search_locations, package
        base = Path(next(iter(spec.submodule_search_locations)))
        files = sorted(base.glob(pattern))
        assert files, f"{var}: no {pattern} in {base}"
        assert any(var.encode() in f.read_bytes() for f in files), f"{var} not in {files}"


def test_readme_table_and_env_example_list_exactly_what_compose_reads():
    variables = compose_variables(load_compose())
    assert {"RAY_AUTH_TOKEN", "POSTGRES_PASSWORD", "BIND_ADDRESS", "SWEEPER_API_TOKEN"} <= set(
        variables
    )
    # one default per variable, wherever the file uses it
    for var, uses in variables.items():
        assert len(uses) == 1 or {op for op, _ in uses} <= {":?", "?"}, (var, uses)

    table = readme_table()
    assert len(table) >= 10
    assert set(table) == set(variables), (
        f"only in README: {sorted(set(table) - set(variables))}; "
        f"only in compose.yaml: {sorted(set(variables) - set(table))}"
    )
    for var, uses in variables.items():
        op, arg = sorted(uses)[0]
        cell = table[var]
        if op in (":?", "?"):
            assert cell == "required", (var, cell)
        elif op == "pass":
            assert cell == "unset", (var, cell)
        elif op in (":-", "-") and arg:
            assert f"`{arg}`" in cell, (var, arg, cell)
        elif op in (":-", "-"):
            assert cell == "empty", (var, cell)

    example = dict(re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=(.*)$", ENV_EXAMPLE.read_text(), re.M))
    assert set(example) == set(variables), set(example) ^ set(variables)
    for var, value in example.items():
        op, arg = sorted(variables[var])[0]
        if op in (":-", "-"):
            assert value == arg, (var, value, arg)
        else:  # required or passed on: no value in the example
            assert value == "", (var, value)


# ---- the Dockerfiles --------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean_with_hadolint(dockerfile, tmp_path):
    rc, findings = hadolint(dockerfile, tmp_path)
    assert rc == 0 and findings == [], json.dumps(findings, indent=1)

    # an ignored rule needs its reason on the comment line just above the pragma
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+ignore=", line):
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#") and "hadolint" not in above and len(above) > 10, (
                f"{dockerfile.name}:{i + 1}: say why the rule is ignored on the line above"
            )


def test_hadolint_reports_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\nCMD python app.py\n")
    rc, findings = hadolint(bad, tmp_path)
    codes = {f["code"] for f in findings}
    assert rc != 0 and {"DL3006", "DL3013", "DL3025"} <= codes, codes


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_conventions(dockerfile):
    text = dockerfile.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    assert args.get("PYTHON_VERSION") == "3.11" and args.get("TORCH_VERSION") == "2.13.0"
    assert "TORCH_INDEX_URL" in args
    # base images are pinned by tag
    for image in re.findall(r"^FROM (\S+)", text, re.M):
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], image)
        assert ":" in image and not image.endswith(":latest"), image
    # it runs as a non-root user, with the stack's paths
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), users
    assert re.search(r"^\s*SWEEPER_HOME=/data/sweeps\b", text, re.M)
    assert re.search(r"^\s*SWEEPER_CACHE_DIR=/data/cache\b", text, re.M)
    # the health probe is Python's urllib (no curl in the slim image) on /healthz
    health = re.search(r"^HEALTHCHECK .*?CMD (\[[^\n]*\])$", text, re.M | re.S)
    assert health, "no HEALTHCHECK in exec form"
    probe = json.loads(health[1])
    assert probe[:2] == ["python", "-c"] and "/healthz" in probe[2] and "urllib" in probe[2]
    compile(probe[2], "HEALTHCHECK", "exec")
    assert re.search(r'^CMD \["sweeper", "serve", "--host", "0.0.0.0"\]', text, re.M)
    # every COPY from the build context exists and is let through by .dockerignore
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copied = [
        src.rstrip("/")
        for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M)
        for src in line.split()[:-1]
    ]
    assert "pyproject.toml" in copied
    for src in copied:
        assert (ROOT / src).exists() and src in allowed, src
