"""The packages' layering (docs/architecture.md): trainer <- dashboards <- sweeper <- api.

Built from the import graph grimp reads from the source (function-level imports count),
so an import hidden in a function breaks it as much as one at the top.
"""

from __future__ import annotations

from pathlib import Path

import grimp
import pytest

PACKAGES = ("trainer", "dashboards", "sweeper", "api")
# The one arrow up: `sweeper serve` starts the service.
SERVE = "sweeper.cli.serve"
MAX_LINES = 450
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, include_external_packages=False, cache_dir=None)


def _package(module: str) -> str:
    return module.split(".")[0]


def _edges(graph: grimp.ImportGraph) -> list[tuple[str, str]]:
    return [
        (m, dep)
        for m in sorted(graph.modules)
        for dep in sorted(graph.find_modules_directly_imported_by(m))
        if _package(dep) in PACKAGES
    ]


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or a self-import."""
    nodes = sorted(graph.modules)
    succ = {
        m: sorted(d for d in graph.find_modules_directly_imported_by(m) if d in graph.modules)
        for m in nodes
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(succ[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(succ[w])))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1 or v in succ[v]:
                        out.append(sorted(comp))
    return out


def test_no_import_cycle_between_modules(graph):
    assert _cycles(graph) == []


def test_trainer_imports_none_of_the_others(graph):
    bad = [
        (m, d) for m, d in _edges(graph) if _package(m) == "trainer" and _package(d) != "trainer"
    ]
    assert bad == []


def test_dashboards_import_only_the_trainer(graph):
    bad = [
        (m, d)
        for m, d in _edges(graph)
        if _package(m) == "dashboards" and _package(d) not in ("dashboards", "trainer")
    ]
    assert bad == []


def test_the_sweeper_imports_the_api_only_to_serve_it(graph):
    bad = [
        (m, d)
        for m, d in _edges(graph)
        if _package(m) == "sweeper" and _package(d) == "api" and m != SERVE
    ]
    assert bad == []


def test_no_source_module_is_too_long():
    long = {
        str(p.relative_to(ROOT)): n
        for pkg in PACKAGES
        for p in sorted((ROOT / pkg).rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}
