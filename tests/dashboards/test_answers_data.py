"""`sweeper answers`: the note's answers from a report's exported data (no MLflow store),
several sweeps of one design pooled; refused where the trials cannot be paired."""

import csv
import json

import pytest
from typer.testing import CliRunner

from tests.dashboards.test_answers import _sweep


@pytest.fixture
def exported(tmp_path):
    """A report of the synthetic 32-trial sweep, with its answers.json and exported data."""
    from dashboards.report import render

    render(_sweep(), tmp_path / "report")
    return tmp_path / "report"


def _answers(*folders, out):
    from sweeper.cli import app

    result = CliRunner().invoke(app, ["answers", *map(str, folders), "-o", str(out)])
    rows = json.loads((out / "answers.json").read_text()) if result.exit_code == 0 else None
    return result, rows


def _same(a, b, tol):
    assert [(r["question"], r["at"], r["quantity"], r["n"]) for r in a] == [
        (r["question"], r["at"], r["quantity"], r["n"]) for r in b
    ]
    for x, y in zip(a, b, strict=True):
        assert x["verdict"].split(" (")[0] == y["verdict"].split(" (")[0]
        for k in ("mean", "low", "high", "start", "end"):
            if x.get(k) is not None:
                assert y[k] == pytest.approx(x[k], abs=tol), (x, k)


def _split(src, dst, keep):
    """A copy of an export with only the trials ``keep`` accepts (one sweep of a split)."""
    dst.mkdir()
    ids = {r["trial_id"] for r in csv.DictReader((src / "trials.csv").open()) if keep(r)}
    for name in ("trials.csv", "histories.csv"):
        with (src / name).open(newline="") as f:
            rows = list(csv.DictReader(f))
        with (dst / name).open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(r for r in rows if r["trial_id"] in ids)
    return dst


def _edit(folder, change):
    """Rewrite ``folder/trials.csv`` after ``change(rows)``."""
    rows = list(csv.DictReader((folder / "trials.csv").open()))
    change(rows)
    with (folder / "trials.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_the_exported_data_gives_the_report_s_answers(exported, tmp_path):
    result, rows = _answers(exported, out=tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert "answers.md" in result.output and (tmp_path / "a" / "paired_differences.png").is_file()
    # the same rows as the report's, to the 6 digits the export keeps
    _same(json.loads((exported / "answers.json").read_text()), rows, tol=1e-5)
    # c too: the delayed question read from the trials' parameters
    assert {r["question"] for r in rows} == set("abcdep")


def test_two_sweeps_of_one_design_pool_into_the_whole_answer(exported, tmp_path):
    """Run as one sweep per k, the design answers e (k = 4 vs k = 1) only when pooled."""
    k1 = _split(exported, tmp_path / "k1", lambda r: r["token_expansion"] == "1")
    k4 = _split(exported, tmp_path / "k4", lambda r: r["token_expansion"] == "4")
    _, whole = _answers(exported, out=tmp_path / "whole")
    _, alone = _answers(k1, out=tmp_path / "alone")
    assert "e" not in {r["question"] for r in alone}
    result, pooled = _answers(k1, k4, out=tmp_path / "pooled")
    assert result.exit_code == 0, result.output
    key = lambda r: (r["question"], r["at"], r["quantity"])  # noqa: E731
    _same(sorted(whole, key=key), sorted(pooled, key=key), tol=1e-12)
    # the pool gets its own report: the note's figures, its sources named, and no Optuna
    # figures (exported data keeps no search space), and its CSVs read back the same
    out = tmp_path / "pooled"
    for png in (
        "probe_retained",
        "grad_norm_ratio",
        "accuracy_vs_lambda",
        "paired_differences",
        "plateau",
    ):
        assert (out / f"{png}.png").is_file(), png
    page = (out / "report.html").read_text()
    assert f"pooled from</td><td>{k1}, {k4}" in page and "Optuna" not in page
    assert "report.html" in result.output
    _, again = _answers(out, out=tmp_path / "again")
    _same(pooled, again, tol=1e-5)


def test_trials_that_cannot_be_paired_are_refused_with_the_reason(exported, tmp_path):
    result, _ = _answers(exported, out=exported)  # would overwrite its own trials.csv
    assert result.exit_code != 0 and "is one of the folders pooled" in result.output
    assert (exported / "answers.json").is_file() and (exported / "report.html").is_file()
    result, _ = _answers(exported, exported, out=tmp_path / "twice")
    assert result.exit_code != 0 and "counts twice" in result.output
    # one folder whose trials differ in a field besides λ and k: not merged into one config
    lr = _split(exported, tmp_path / "lr", lambda r: True)
    _edit(lr, lambda rows: [r.update({"batch_size": "8"}) for r in rows[::2]])
    result, _ = _answers(lr, out=tmp_path / "lr_out")
    assert result.exit_code != 0 and "batch_size = 16" in result.output
    # not the data the report writes: a clear line, no traceback
    bad = _split(exported, tmp_path / "bad", lambda r: True)
    _edit(bad, lambda rows: rows[0].update({"val/probe_retained": "n/a"}))
    result, _ = _answers(bad, out=tmp_path / "bad_out")
    assert result.exit_code != 0 and "not the data `sweeper report` writes" in result.output
    k1 = _split(exported, tmp_path / "k1", lambda r: r["token_expansion"] == "1")
    other = _split(exported, tmp_path / "k4", lambda r: r["token_expansion"] == "4")
    text = (other / "trials.csv").read_text().replace(",16,", ",32,")
    (other / "trials.csv").write_text(text)
    result, _ = _answers(k1, other, out=tmp_path / "mixed")
    assert result.exit_code != 0 and "batch_size = 32" in result.output
    assert "cannot be paired by seed" in result.output
    result, _ = _answers(tmp_path / "nothing", out=tmp_path / "none")
    assert result.exit_code != 0 and "no trials.csv" in result.output
    assert "Traceback" not in result.output


def test_a_trial_cut_short_does_not_block_its_rerun(exported, tmp_path):
    """A trial an interrupt cut short is left out of the answers, so the same seed run
    again in a second sweep pools without a clash."""
    k1 = _split(exported, tmp_path / "k1", lambda r: r["token_expansion"] == "1")
    cut = _split(exported, tmp_path / "cut", lambda r: r["trial_id"] == "t0")
    text = (cut / "trials.csv").read_text().replace("FINISHED,", "KILLED,interrupted", 1)
    (cut / "trials.csv").write_text(text)
    result, _ = _answers(k1, cut, out=tmp_path / "out")
    assert result.exit_code == 0, result.output


def test_a_crafted_csv_cannot_put_markup_in_the_report(exported, tmp_path):
    """The pool's report.html is built from CSVs anyone may have edited: cells escaped."""
    evil = _split(exported, tmp_path / "evil", lambda r: True)
    _edit(evil, lambda rows: rows[0].update({"run_id": "<script>alert(1)</script>"}))
    result, _ = _answers(evil, out=tmp_path / "out")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page


def test_another_design_on_the_same_seeds_compares_end_points_and_answers(exported, tmp_path):
    """--against: a design that differs in one trainer field (here batch_size), run on the
    same seeds, whose test retained is planted higher at λ = 1 only, by 0.02 + 0.001·seed."""
    from sweeper.cli import app

    new = _split(exported, tmp_path / "new", lambda r: True)

    def plant(rows):
        for r in rows:
            r["batch_size"] = "32"
            if r["reg_constant"] == "1.0":
                r["test/probe_retained"] = str(
                    float(r["test/probe_retained"]) + 0.02 + 0.001 * int(r["seed"])
                )

    _edit(new, plant)
    out = tmp_path / "out"
    args = ["answers", str(new), "--against", str(exported), "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "against.md" in result.output
    rows = json.loads((out / "against.json").read_text())
    assert (out / "against.md").read_text().count("\n") == len(rows) + 2
    assert {r["comparison"].split(":")[0] for r in rows} == {"batch_size = 32 vs 16"}

    def find(q, at, quantity):
        (row,) = [r for r in rows if (r["question"], r["at"], r["quantity"]) == (q, at, quantity)]
        return row

    planted = find("v", "λ = 1.0, k = 4", "test retained")
    assert planted["mean"] == pytest.approx(0.0235, abs=1e-5) and planted["verdict"] == "higher"
    assert planted["n"] == 8
    untouched = find("v", "λ = 0.0, k = 4", "test retained")
    assert untouched["mean"] == 0 and untouched["verdict"].startswith("cannot tell")
    assert find("v", "λ = 1.0, k = 1", "accuracy@end")["mean"] == 0
    # b's answer moved by the planted amount; e's (k = 4 vs 1 at one λ) did not
    assert find("b", "k = 1", "test retained")["mean"] == pytest.approx(0.0235, abs=1e-5)
    assert find("b", "k = 1", "test retained")["verdict"] == "higher"
    assert find("e", "λ = 1.0", "test retained")["mean"] == pytest.approx(0, abs=1e-5)
    # e against the smallest k both ran: an old side of k = 4 alone has no e to compare
    k4 = _split(exported, tmp_path / "k4", lambda r: r["token_expansion"] == "4")
    result = CliRunner().invoke(app, [*args[:3], str(k4), "-o", str(tmp_path / "o4")])
    assert result.exit_code == 0, result.output
    rows4 = json.loads((tmp_path / "o4" / "against.json").read_text())
    assert {r["at"] for r in rows4 if r["question"] == "v"} == {"λ = 0.0, k = 4", "λ = 1.0, k = 4"}
    assert "e" not in {r["question"] for r in rows4}
    # a rerun of one design compares too (the run-to-run spread: here none)
    result = CliRunner().invoke(app, ["answers", str(new), "--against", str(new), "-o", str(out)])
    assert result.exit_code == 0, result.output
    rerun = json.loads((out / "against.json").read_text())
    assert {r["comparison"].split(":")[0] for r in rerun} == {"rerun vs run"}
    assert all(r["mean"] == 0 for r in rerun)
    # nothing in common: refused with what each side ran, nothing written
    k1 = _split(exported, tmp_path / "k1", lambda r: r["token_expansion"] == "1")
    out1 = tmp_path / "o1"
    result = CliRunner().invoke(app, ["answers", str(k1), "--against", str(k4), "-o", str(out1)])
    assert result.exit_code != 0 and "nothing to compare" in result.output
    assert "(1.0, 4)" in result.output and not out1.exists()
    # a seed that is not a number: one clear line, no traceback
    odd = _split(exported, tmp_path / "odd", lambda r: True)
    _edit(odd, lambda rows: rows[0].update({"seed": "first"}))
    result = CliRunner().invoke(app, ["answers", str(new), "--against", str(odd), "-o", str(out)])
    assert result.exit_code != 0 and "not the data `sweeper report` writes" in result.output
    assert "Traceback" not in result.output
    # an input folder is never overwritten
    result = CliRunner().invoke(app, ["answers", str(new), "--against", str(out), "-o", str(out)])
    assert result.exit_code != 0 and "is one of the folders pooled" in result.output
