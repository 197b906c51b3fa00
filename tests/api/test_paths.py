"""Which model/dataset values a submitted spec may name (SWEEPER_ALLOWED_PATHS)."""

from __future__ import annotations

from api.paths import path_errors
from sweeper.spec import SweepSpec


def _spec(**trainer) -> SweepSpec:
    return SweepSpec.model_validate(
        {
            "name": "p",
            "trainer": trainer,
            "search": {"space": {"reg_constant": {"type": "float", "low": 0.0, "high": 1.0}}},
        }
    )


def test_aliases_hub_ids_and_paths_under_a_root_pass(tmp_path):
    (tmp_path / "data").mkdir()
    ok = _spec(model="smollm2-135m", dataset="digits")
    assert path_errors(ok, []) == []
    assert path_errors(_spec(model="HuggingFaceTB/SmolLM2-135M-Instruct"), []) == []
    inside = _spec(model=str(tmp_path / "m"), dataset=str(tmp_path / "data"))
    assert path_errors(inside, [tmp_path]) == []


def test_escapes_are_refused_with_their_field_path(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to("/etc")
    for value in ("/etc", str(root / ".." / "other"), str(root / "link"), "~/x"):
        errs = path_errors(_spec(dataset=value), [root])
        assert [e["path"] for e in errs] == ["trainer.dataset"], value
        assert "outside the allowed paths" in errs[0]["msg"]
    assert path_errors(_spec(model="../m"), [root])[0]["path"] == "trainer.model"


def test_search_choices_and_points_are_checked_too(tmp_path):
    spec = SweepSpec.model_validate(
        {
            "name": "p",
            "search": {
                "space": {"dataset": {"type": "categorical", "choices": ["digits", "/etc"]}},
                "points": [{"dataset": "/var"}],
            },
        }
    )
    paths = [e["path"] for e in path_errors(spec, [tmp_path])]
    assert paths == ["search.space.dataset.choices.1", "search.points.0.dataset"]


def test_report_cells_are_escaped():
    from dashboards.report import _table

    page = _table(["trial", "MLflow run"], [["<script>x</script>", '<a href="u">r</a>']])
    assert "&lt;script&gt;" in page and "<script>" not in page
    assert '<a href="u">r</a>' in page  # the links the report builds itself stay links
