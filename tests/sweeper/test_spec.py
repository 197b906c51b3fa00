from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from sweeper.cli import app
from sweeper.search import make_sampler, make_searcher, startup_trials
from sweeper.spec import SweepSpec, format_spec_errors
from tests.sweeper.conftest import write_spec

SPACE = "search.space"


def _errors(spec: dict) -> list[str]:
    with pytest.raises(ValidationError) as e:
        SweepSpec.model_validate(spec)
    return format_spec_errors(e.value)


@pytest.mark.parametrize(
    ("change", "line"),
    [
        ({"colour": "red"}, "colour: unknown field"),
        (
            {"search": {"space": {"reg_constant": {"type": "float", "low": 2, "high": 1}}}},
            f"{SPACE}.reg_constant: `low <= high` must hold, but got (low=2.0, high=1.0).",
        ),
        (
            {
                "search": {
                    "space": {"reg_constant": {"type": "float", "low": 0, "high": 1, "log": True}}
                }
            },
            f"{SPACE}.reg_constant: `low > 0` must hold for `log=True`",
        ),
        (
            {"search": {"space": {"token_expansion": {"type": "categorical", "choices": []}}}},
            f"{SPACE}.token_expansion: The `choices` must contain one or more elements.",
        ),
        (
            {"search": {"space": {"warp": {"type": "float", "low": 0, "high": 1}}}},
            f"{SPACE}.warp: not a trainer field",
        ),
        ({"budget": {"max_concurrent": 0}}, "budget.max_concurrent: Input should be greater"),
        (
            {"search": {"space": {"reg_constant": {"type": "float", "low": -1, "high": 1}}}},
            f"{SPACE}.reg_constant: -1.0 is not valid: Input should be greater than or equal to 0",
        ),
        ({"trainer": {"reg_constant": 0.1, "colour": 1}}, "trainer.colour: unknown field"),
        ({"objective": {"metric": "val/acc"}}, "objective.metric: 'val/acc' is not a metric"),
        ({"name": "Big Name"}, "name: must be lower-case letters, digits and '-'"),
    ],
)
def test_bad_spec_names_the_field(tiny_spec, change, line):
    spec = tiny_spec()
    for key, value in change.items():
        spec[key] = value
    errors = _errors(spec)
    assert len(errors) == 1, errors
    assert errors[0].startswith(line), errors


def test_cli_prints_one_line_per_problem(tmp_path, tiny_spec):
    spec = tiny_spec(budget={"max_concurrent": 0})
    spec["colour"] = "red"
    result = CliRunner().invoke(app, ["submit", str(write_spec(tmp_path / "s.yaml", spec))])
    assert result.exit_code == 1
    lines = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 2 and "Traceback" not in result.output
    assert any("budget.max_concurrent" in x for x in lines)
    assert any("colour: unknown field" in x for x in lines)


def test_defaults_and_derived_fields(tiny_spec):
    spec = SweepSpec.model_validate(tiny_spec())
    assert spec.experiment == "tiny" and spec.objective.metric == "val/accuracy"
    cfg = spec.trainer_config({"reg_constant": 0.5, "token_expansion": 4}, repeat=2)
    assert (cfg.reg_constant, cfg.token_expansion, cfg.seed) == (0.5, 4, 2)


def test_grid_needs_choices_and_sizes_the_budget(tiny_spec):
    errors = _errors(tiny_spec(search={"sampler": "grid"}))
    assert errors[0].startswith(f"{SPACE}.reg_constant: the grid sampler needs categorical")
    grid = tiny_spec(
        search={
            "sampler": "grid",
            "space": {
                "reg_constant": {"type": "categorical", "choices": [0.0, 1.0]},
                "token_expansion": {"type": "categorical", "choices": [1, 2, 4]},
            },
        },
        budget={"trials": None},
    )
    assert SweepSpec.model_validate(grid).budget.trials == 6


@pytest.mark.parametrize(
    ("sampler", "options", "line"),
    [
        ("tpe", {"n_startup": 3}, "n_startup: not an option of Optuna's TPESampler that a spec"),
        ("tpe", {"n_startup_trials": "five"}, "n_startup_trials: Input should be a valid integer"),
        ("tpe", {"n_startup_trials": 2.5}, "n_startup_trials: Input should be a valid integer"),
        ("tpe", {"n_ei_candidates": 0}, "n_ei_candidates: Input should be greater than or equal"),
        ("tpe", {"gamma": 0.1}, "gamma: not an option of Optuna's TPESampler that a spec can"),
        ("tpe", {"prior_weight": 2.0}, "prior_weight: not an option"),  # deprecated in Optuna 5
        ("tpe", {"seed": 3}, "seed: set by search.seed, not here"),
        ("tpe", {"group": True, "multivariate": False}, "`group`` option can only be enabled"),
        ("random", {"n_startup_trials": 3}, "n_startup_trials: not an option of Optuna's Random"),
        ("cmaes", {"popsize": 0}, "popsize: Input should be greater than or equal to 1"),
        ("cmaes", {"x0": {"reg_constant": 1}}, "x0: not an option"),  # deprecated in Optuna 5
        ("qmc", {"qmc_type": "lattice"}, "qmc_type: Input should be 'sobol' or 'halton'"),
    ],
)
def test_bad_sampler_options_name_the_option(tiny_spec, sampler, options, line):
    errors = _errors(tiny_spec(search={"sampler": sampler, "sampler_options": options}))
    # Optuna's own constructor errors name the options only, not which one
    path = "search.sampler_options" + ("" if "group" in options else ".")
    assert len(errors) == 1 and errors[0].startswith(path), errors
    assert line in errors[0], errors


def test_sampler_defaults_follow_the_budget_and_options_override_them(tiny_spec):
    # Ax's rule: 2 x dimensions, at most a fifth of the budget, at least 5.
    assert [startup_trials(d, n) for d, n in [(2, 16), (2, 100), (5, 100), (8, None)]] == [
        5,
        5,
        10,
        16,
    ]

    def sampler(**changes):
        return make_sampler(SweepSpec.model_validate(tiny_spec(**changes)))

    assert sampler(budget={"trials": 100})._n_startup_trials == 5
    mine = sampler(
        search={"sampler_options": {"n_startup_trials": 2, "constant_liar": "false"}},
        budget={"trials": 100},
    )
    assert (mine._n_startup_trials, mine._constant_liar) == (2, False)
    gp = sampler(search={"sampler": "gp"}, budget={"trials": 100})
    assert gp._n_startup_trials == 5
    qmc = sampler(search={"sampler": "qmc", "sampler_options": {"qmc_type": "halton"}})
    assert qmc._qmc_type == "halton"
    cma = sampler(search={"sampler": "cmaes", "sampler_options": {"popsize": "8"}})
    assert cma._popsize == 8


def test_sampler_options_survive_the_stored_round_trip(tiny_spec):
    """The spec is stored as JSON/YAML and validated again on resume: the same options."""
    spec = SweepSpec.model_validate(
        tiny_spec(search={"sampler_options": {"n_startup_trials": "3", "multivariate": "no"}})
    )
    assert spec.search.sampler_options == {"n_startup_trials": 3, "multivariate": False}
    again = SweepSpec.model_validate(yaml.safe_load(yaml.safe_dump(spec.model_dump(mode="json"))))
    assert again.search.sampler_options == spec.search.sampler_options


def _first(spec: SweepSpec, n: int) -> list[dict]:
    searcher = make_searcher(spec)
    return [searcher.suggest(f"t{i}") for i in range(n)]


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "gp", "qmc"])
def test_same_spec_and_seed_propose_the_same_first_configurations(tiny_spec, sampler):
    spec = SweepSpec.model_validate(tiny_spec(search={"sampler": sampler}))
    first = _first(spec, 4)
    assert first == _first(spec, 4)
    assert all(1e-3 <= c["reg_constant"] <= 10 and c["token_expansion"] in (1, 2, 4) for c in first)
    other = SweepSpec.model_validate(tiny_spec(search={"sampler": sampler, "seed": 1}))
    assert _first(other, 4) != first


def test_warm_start_points_come_first(tiny_spec):
    spec = SweepSpec.model_validate(
        tiny_spec(search={"points": [{"reg_constant": 0.001, "token_expansion": 1}]})
    )
    assert _first(spec, 1)[0] == {"reg_constant": 0.001, "token_expansion": 1}


def test_baseline_outside_a_log_range_runs_first_and_optuna_never_sees_it(tiny_spec):
    spec = SweepSpec.model_validate(
        tiny_spec(search={"points": [{"reg_constant": 0.0, "token_expansion": 1}]})
    )
    searcher = make_searcher(spec)
    assert searcher.suggest("t0") == {"reg_constant": 0.0, "token_expansion": 1}
    searcher.on_trial_complete("t0", {"val/accuracy": 0.9})
    nxt = searcher.suggest("t1")
    assert nxt["reg_constant"] > 0
    searcher.on_trial_complete("t1", {"val/accuracy": 0.5})
    study = searcher.searcher._ot_study
    assert [t.params["reg_constant"] for t in study.trials] == [nxt["reg_constant"]]


def test_points_must_be_valid_trainer_values(tiny_spec):
    errors = _errors(tiny_spec(search={"points": [{"reg_constant": -1.0, "token_expansion": 1}]}))
    assert errors[0].startswith("search.points.0.reg_constant: Input should be greater")
    errors = _errors(tiny_spec(search={"points": [{"lr": 0.1}]}))
    assert errors[0].startswith("search.points.0.lr: not a key of search.space")


@pytest.mark.parametrize(
    ("search", "budget", "line"),
    [
        ({"space": {}}, None, f"{SPACE}: name at least one trainer field to search"),
        (
            {"points": [{"reg_constant": 0.1}]},
            None,
            "search.points.0.token_expansion: missing (a point gives every key",
        ),
        (
            {"space": {"token_expansion": {"type": "float", "low": 1, "high": 8}}},
            None,
            f"{SPACE}.token_expansion: the trainer field is an integer",
        ),
        (
            {
                "sampler": "grid",
                "space": {"token_expansion": {"type": "categorical", "choices": [1, 2]}},
            },
            {"trials": 3},
            "budget.trials: 3 is more than the grid's 2 points",
        ),
        (  # found by the API fuzzer: Optuna's decimal arithmetic gave up (was a 500)
            {"space": {"reg_constant": {"type": "float", "low": 0, "high": 1, "step": 8e-118}}},
            None,
            f"{SPACE}.reg_constant: Optuna cannot divide the range 0.0..1.0",
        ),
    ],
)
def test_specs_that_would_break_the_driver_are_refused(tiny_spec, search, budget, line):
    spec = tiny_spec(search=search, **({"budget": budget} if budget else {}))
    if search.get("space") == {}:
        spec["search"]["space"] = {}
    errors = _errors(spec)
    assert errors[0].startswith(line), errors


def test_grid_with_a_baseline_runs_the_whole_grid_and_the_baseline(tiny_spec):
    spec = SweepSpec.model_validate(
        tiny_spec(
            search={
                "sampler": "grid",
                "space": {"reg_constant": {"type": "categorical", "choices": [0.1, 1.0]}},
                "points": [{"reg_constant": 0.0}],
            },
            budget={"trials": None},
        )
    )
    assert spec.budget.trials == 3
    searcher = make_searcher(spec)
    got = [searcher.suggest(f"t{i}")["reg_constant"] for i in range(3)]
    assert got[0] == 0.0 and sorted(got[1:]) == [0.1, 1.0]


EXAMPLES = Path(__file__).parents[2] / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_is_valid(path):
    from trainer.config import TrainerConfig

    data = yaml.safe_load(path.read_text())
    if "trainer" in data:  # a sweep spec
        spec = SweepSpec.model_validate(data)
        for point in spec.search.points:  # each warm-start point makes a valid trainer config
            spec.trainer_config(point)
    else:  # a `sweeper train` config
        TrainerConfig.model_validate(data)


@pytest.mark.parametrize(
    ("objective", "sampler", "line"),
    [
        (
            [{"metric": "val/accuracy"}, {"metric": "val/accuracy", "mode": "min"}],
            "tpe",
            "objective.1.metric: val/accuracy is listed twice",
        ),
        (
            [{"metric": "val/accuracy"}, {"metric": "val/loss_reg", "mode": "min"}],
            "cmaes",
            "search.sampler: cmaes optimises a single objective",
        ),
        ([], "tpe", "objective: name at least one metric"),
        ([{"metric": "val/nope"}], "tpe", "objective.0.metric: "),
    ],
)
def test_bad_multi_objective_specs_are_refused(tiny_spec, objective, sampler, line):
    search = tiny_spec()["search"] | {"sampler": sampler}
    errors = _errors(tiny_spec(objective=objective, search=search))
    assert any(e.startswith(line) for e in errors), errors


def test_multi_objective_searcher_gets_every_metric_and_the_seed_means():
    spec = SweepSpec.model_validate(
        {
            "name": "mo",
            "trainer": {"model": "tiny-llama"},
            "search": {"space": {"reg_constant": {"type": "float", "low": 0.01, "high": 1}}},
            "objective": [
                {"metric": "val/accuracy", "mode": "max"},
                {"metric": "val/loss_reg", "mode": "min"},
            ],
            "repeats": 2,
        }
    )
    assert spec.multi_objective and spec.primary.metric == "val/accuracy"
    searcher = make_searcher(spec)
    inner = searcher.searcher
    assert inner.metric == ["val/accuracy", "val/loss_reg"]
    searcher.suggest("a"), searcher.suggest("b")  # the two seeds of one configuration
    searcher.on_trial_complete("a", {"val/accuracy": 0.5, "val/loss_reg": 0.2})
    searcher.on_trial_complete("b", {"val/accuracy": 0.7, "val/loss_reg": float("nan")})
    told = inner._ot_study.trials[0]
    assert told.values == pytest.approx([0.6, 0.2])  # mean per objective, NaN skipped


def _lambda_spec(*objectives: tuple[str, str]) -> SweepSpec:
    """A sweep over λ alone with these (metric, mode) objectives."""
    return SweepSpec.model_validate(
        {
            "name": "mo",
            "search": {"space": {"reg_constant": {"type": "float", "low": 0.01, "high": 1}}},
            "objective": [{"metric": m, "mode": mode} for m, mode in objectives],
        }
    )


def test_pareto_set_keeps_exactly_the_non_dominated_configurations():
    from sweeper.ranking import pareto_set

    spec = _lambda_spec(("val/accuracy", "max"), ("val/loss_reg", "min"))
    table = {  # λ: (accuracy, loss_reg), "a" and "b" are two seeds of λ = 0.1
        "a": (0.1, 0.8, 0.5),
        "b": (0.1, 0.6, 0.3),  # λ = 0.1 means (0.7, 0.4): on the front
        "c": (0.2, 0.9, 0.6),  # best accuracy: on the front
        "d": (0.3, 0.6, 0.45),  # beaten by λ = 0.1 on both
        "e": (0.4, 0.5, 0.1),  # lowest reg loss: on the front
        "f": (0.5, 0.7, 0.4),  # ties λ = 0.1 exactly: neither beats the other
    }
    rows = {
        tid: {
            "id": tid,
            "status": "finished",
            "params": {"reg_constant": lam},
            "metrics": {"val/accuracy": acc, "val/loss_reg": reg},
        }
        for tid, (lam, acc, reg) in table.items()
    }
    rows["g"] = {
        "id": "g",
        "status": "failed",
        "params": {"reg_constant": 0.9},
        "metrics": {"val/accuracy": 1.0, "val/loss_reg": 0.0},
    }
    front = pareto_set(spec, rows)
    assert [c["params"]["reg_constant"] for c in front] == [0.2, 0.1, 0.5, 0.4]
    assert front[1]["values"] == pytest.approx({"val/accuracy": 0.7, "val/loss_reg": 0.4})
    assert front[1]["seeds"] == 2 and front[1]["trial_ids"] == ["a", "b"]


def test_a_seed_a_cancel_cut_short_does_not_count_in_best_or_pareto():
    from sweeper.ranking import best_configuration

    spec = _lambda_spec(("val/accuracy", "max"), ("val/probe_accuracy", "max"))
    table = {  # id: (λ, status, accuracy, probe)
        "a1": (0.1, "finished", 0.80, 0.90),
        "a2": (0.1, "finished", 0.82, 0.90),
        "a3": (0.1, "cancelled", 0.40, 0.60),  # a cancel killed it at step 40
        "b1": (0.5, "finished", 0.79, 0.85),
        "b2": (0.5, "stopped", 0.77, 0.85),  # ASHA stopped it: it counts
    }
    rows = {
        tid: {
            "id": tid,
            "status": status,
            "params": {"reg_constant": lam},
            "metrics": {"val/accuracy": acc, "val/probe_accuracy": probe},
        }
        for tid, (lam, status, acc, probe) in table.items()
    }
    best = best_configuration(spec, rows)
    assert best["params"] == {"reg_constant": 0.1} and best["seeds"] == 2
    assert best["value"] == pytest.approx(0.81) and best["trial_ids"] == ["a1", "a2"]
    # λ = 0.1 beats λ = 0.5 on both objectives once its cut seed is out
    assert [c["params"]["reg_constant"] for c in best["pareto"]] == [0.1]


def test_the_time_budget_counts_running_time_only_and_marks_its_end(tmp_path, monkeypatch):
    """The sweep's stopper keeps the time budget (not Tune) so that its end leaves a mark:
    a trial it stops is "time_budget", one a Ctrl-C stops is "interrupted"."""
    import pickle

    from sweeper import stopper as driver

    clock = [1000.0]
    monkeypatch.setattr(driver.time, "time", lambda: clock[0])
    stopper = driver.CancelStopper(str(tmp_path / "cancel"), time_budget_s=10)
    assert not stopper.stop_all()  # the first check starts the clock
    clock[0] += 6
    assert not stopper.stop_all()
    # Pickled with Tune's state at an interrupt; the time it lay stopped does not count.
    stopper = pickle.loads(pickle.dumps(stopper))
    clock[0] += 3600
    assert not stopper.stop_all() and not (tmp_path / "budget_spent").exists()
    clock[0] += 3
    assert not stopper.stop_all()
    clock[0] += 1.5
    assert stopper.stop_all() and (tmp_path / "budget_spent").exists()
    # A trial's result is not stopped by the budget (the experiment's end settles it as
    # "time_budget"); only a cancel stops it there.
    assert not stopper("t1", {})
    (tmp_path / "cancel").touch()
    assert driver.CancelStopper(str(tmp_path / "cancel"))("t1", {})
    (tmp_path / "cancel").unlink()
    # A driver that died after marking the budget, before Tune saved it: restored with
    # budget left, the mark is gone.
    saved = pickle.dumps(driver.CancelStopper(str(tmp_path / "cancel"), time_budget_s=10))
    pickle.loads(saved)
    assert not (tmp_path / "budget_spent").exists()
    # A stopper pickled by a version without a budget of its own restores and runs.
    old = driver.CancelStopper.__new__(driver.CancelStopper)
    old.__dict__.update(cancel_file=str(tmp_path / "cancel"), _checked=5e9, _cancelled=False)
    restored = pickle.loads(pickle.dumps(old))
    (tmp_path / "cancel").touch()
    assert restored.stop_all()  # the old monotonic reading does not hide the cancel
    # no budget: only the cancel file stops it
    free = driver.CancelStopper(str(tmp_path / "other" / "cancel"))
    clock[0] += 1e6
    assert not free.stop_all()


# ---- hostile input (issue 17): the CLI reads through the same parse_spec as the API ----
def test_the_cli_parser_refuses_what_the_service_cannot_store(tmp_path, tiny_spec):
    import json

    from sweeper.spec_parse import SpecError, load_spec

    spec = tiny_spec()
    cases = {
        "surrogate.json": (json.dumps(spec)[:-1] + ', "experiment": "a\\ud800b"}', "encoding"),
        "bomb.yaml": (
            yaml.safe_dump(spec)
            + f"note: &a {'x' * 10_000}\nmore:\n"
            + "".join(f"- [{', '.join(['*a'] * 500)}]\n" for _ in range(4)),
            "too_large",
        ),
        "loop.yaml": (yaml.safe_dump(spec) + "x: &a [*a]\n", "recursive"),
    }
    for name, (text, type_) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(SpecError) as e:
            load_spec(tmp_path / name)
        assert [i["type"] for i in e.value.items] == [type_], name


@pytest.mark.parametrize(
    "sections, path",
    [
        ({"budget": {"trials": 10**6}}, "budget.trials"),
        ({"repeats": 1000}, "repeats"),
        ({"trainer": {"max_steps": 10**8}}, "trainer.max_steps"),
        ({"experiment": "a/b"}, "experiment"),
    ],
)
def test_spec_bounds_name_their_field(tiny_spec, sections, path):
    with pytest.raises(ValidationError) as e:
        SweepSpec.model_validate(tiny_spec(**sections))
    assert format_spec_errors(e.value)[0].startswith(f"{path}: ")


def test_every_documented_train_and_val_metric_can_be_an_objective_and_test_cannot(tiny_spec):
    """docs/trainer.md's metric table and the objective's check name the same metrics."""
    import re

    from trainer.metrics import is_metric

    doc = (Path(__file__).parents[2] / "docs" / "trainer.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| `")]
    names = {
        n for row in rows for n in re.findall(r"`((?:train|val)/[a-z_]+(?:/<question>)?)`", row)
    }
    names = {n.replace("<question>", "what_digit_is_this") for n in names}
    assert {"train/balance_lm", "train/moe_aux_loss", "val/probe_chance"} <= names
    assert [n for n in names if not is_metric(n)] == []
    errors = _errors(tiny_spec(objective={"metric": "test/accuracy"}))
    assert any(e.startswith("objective.metric: ") for e in errors), errors
