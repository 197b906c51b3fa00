"""`sweeper train` as a user runs it: a real subprocess, a real MLflow store."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

SWEEPER = [sys.executable, "-m", "sweeper"]


def run(args, cwd, env=None, timeout=300):
    return subprocess.run(
        [*SWEEPER, *args],
        cwd=cwd,
        env=os.environ | (env or {}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def config(tmp_path, tiny_dataset):
    def write(text: str = "") -> Path:
        p = tmp_path / "tiny.yaml"
        p.write_text(
            f"model: tiny-llama\ndataset: {tiny_dataset}\nbatch_size: 16\nmax_steps: 12\n"
            f"eval_every: 6\nlr: 0.01\ndevice: cpu\n{text}"
        )
        return p

    return write


def test_train_logs_a_finished_run_to_mlflow(tmp_path, config):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run(
        [
            "train",
            str(config("reg_constant: 0.5\ntoken_expansion: 2\n")),
            "--mlflow",
            "--experiment",
            "cli-test",
        ],
        tmp_path,
        {"MLFLOW_TRACKING_URI": uri},
    )
    assert proc.returncode == 0, proc.stderr
    assert "val/accuracy" in proc.stdout and "mlflow ui" in proc.stdout
    assert (tmp_path / "runs" / "tiny" / "checkpoint" / "weights.safetensors").is_file()

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cli-test")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.status == "FINISHED"
    assert r.data.params["reg_constant"] == "0.5" and r.data.params["token_expansion"] == "2"
    for key in ("train/loss_lm", "train/loss_reg", "train/grad_norm_lm", "train/grad_norm_reg"):
        steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
        assert steps == list(range(1, 13)), key
    val = [m.step for m in client.get_metric_history(r.info.run_id, "val/accuracy")]
    assert val == [0, 6, 12]  # step 0: the untrained projector's evaluation
    arts = {a.path for a in client.list_artifacts(r.info.run_id, "checkpoint")}
    assert "checkpoint/weights.safetensors" in arts


def test_train_with_an_autoencoder_stage_logs_the_lm_loss_only_after_it(tmp_path, config):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config("reg_schedule: ae_stage\nreg_schedule_steps: 5\n")
    proc = run(["train", str(cfg), "--mlflow"], tmp_path, {"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr
    client = MlflowClient(uri)
    (r,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert r.data.params["reg_schedule"] == "ae_stage"
    lm = [m.step for m in client.get_metric_history(r.info.run_id, "train/loss_lm")]
    reg = [m.step for m in client.get_metric_history(r.info.run_id, "train/loss_reg")]
    assert lm == list(range(6, 13)) and reg == list(range(1, 13))


def test_interrupted_train_resumes_from_its_checkpoint(tmp_path, config):
    cfg = config("max_steps: 800\neval_every: 400\ncheckpoint_every: 20\n")
    proc = subprocess.Popen(
        [*SWEEPER, "train", str(cfg)],
        cwd=tmp_path,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    ckpt = tmp_path / "runs" / "tiny" / "checkpoint" / "state.json"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, errs = proc.communicate(timeout=60)
    assert proc.returncode == 130, errs
    assert "run the same command to resume" in errs and "Traceback" not in errs
    proc = run(["train", str(cfg)], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "resuming from the checkpoint" in proc.stdout and "step 800" in proc.stdout
    changed = run(["train", str(cfg), "--set", "reg_constant=0.5"], tmp_path)
    assert changed.returncode == 1
    assert "start afresh elsewhere (sweeper train --fresh or --output)" in changed.stderr


@pytest.mark.parametrize(
    ("extra", "args", "message"),
    [
        ("colour: red\n", [], "colour: unknown field"),
        ("reg_constant: -1\n", [], "reg_constant: Input should be greater than or equal to 0"),
        ("token_expansion: 0\n", [], "token_expansion: Input should be greater than or equal to 1"),
        ("", ["--set", "dataset=/no/such/dir"], "dataset '/no/such/dir' is not a builtin alias"),
        ("", ["--set", "model=./no-model"], "model path './no-model' is not a directory"),
        ("", ["--set", "reg_constant"], "--set expects FIELD=VALUE"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, config, extra, args, message):
    proc = run(["train", str(config(extra)), *args], tmp_path)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len([line for line in proc.stderr.splitlines() if line.startswith("error:")]) == 1


def test_missing_config_file(tmp_path):
    proc = run(["train", "nope.yaml"], tmp_path)
    assert proc.returncode == 1 and "config file not found: nope.yaml" in proc.stderr


def test_trial_table_shows_every_searched_field_and_the_probe():
    from rich.console import Console

    from sweeper.cli.display import trials_table

    row = {
        "id": "t1",
        "status": "finished",
        "params": {"projector": "qformer", "reg_constant": 0.1},
        "reg_constant": 0.1,
        "token_expansion": 1,
        "seed": 0,
        "step": 120,
        "metrics": {"val/accuracy": 0.823, "val/probe_accuracy": 0.888},
    }
    console = Console(width=200, record=True)
    console.print(trials_table({"trials": {"t1": row}}))
    text = console.export_text()
    head = next(line for line in text.splitlines() if "trial" in line)
    assert head.index("k") < head.index("projector") < head.index("seed")
    assert "probe acc" in head and "qformer" in text and "0.888" in text
    plain = dict(row, params={"reg_constant": 0.1}, metrics={"val/accuracy": 0.8})
    console.print(trials_table({"trials": {"t1": plain}}))
    assert "probe acc" not in console.export_text() and "projector" not in console.export_text()


def test_a_log_file_gets_the_whole_trial_table_of_a_five_field_sweep():
    from rich.console import Console

    from sweeper.cli import display as cli

    params = {
        "reg_schedule": "cosine_decay",
        "projector": "mlp_residual",
        "reg_balance": "running_mean",
        "reg_constant": 4.7351,
        "token_expansion": 4,
    }
    metrics = {"val/accuracy": 0.81, "val/probe_accuracy": 0.9, "train/loss_lm": 0.1}
    row = {"id": "6dd4a06b", "status": "finished", "params": params, "reg_constant": 4.7351}
    row |= {"token_expansion": 4, "seed": 0, "step": 120, "metrics": metrics}
    console = Console(width=cli.LOG_WIDTH, record=True)  # what a log file gets
    console.print(cli.trials_table({"trials": {"t1": row}}))
    text = console.export_text()
    assert "…" not in text, text  # nothing cut
    for cell in ("probe acc", "cosine_decay", "running_mean", "mlp_residual", "4.735", "0.900"):
        assert cell in text, text


def test_without_a_terminal_each_trial_start_and_end_is_a_line(monkeypatch):
    """A sweep run into a log file (CI, nohup) shows its progress as it goes, not only a
    table at the end: one line per trial state change, with the count ended of the total."""
    from rich.console import Console

    from sweeper.cli import display as cli

    out = Console(width=300, record=True, force_terminal=False)
    monkeypatch.setattr(cli, "console", out)

    def row(tid, status, **kw):
        params = {"projector": "qformer", "reg_constant": 0.1}
        return {"id": tid, "status": status, "params": params, "seed": 0, **kw}

    def state(**trials):
        return {"id": "s1", "status": "running", "trials": trials}

    old = {"t0": row("t0", "finished", step=120, metrics={"val/accuracy": 0.5})}
    with cli._Display(state(**old), total=3) as shown:  # t0 is not announced again
        shown.update(state(**old, t1=row("t1", "running")))
        shown.update(state(**old, t1=row("t1", "running", step=40)))  # no change: no line
        done = row("t1", "finished", step=120, metrics={"val/accuracy": 0.81234})
        done["metrics"]["val/probe_accuracy"] = 0.9
        shown.update(state(**old, t1=done))
        oom = "Traceback ...\nRuntimeError: [enforce fail at alloc_cpu.cpp:114] [/x] out of memory"
        failed = row("t2", "failed", error=oom)
        shown.update(state(**old, t1=done, t2=failed))
    text = out.export_text()
    lines = [ln for ln in text.splitlines() if "| trial " in ln]
    assert len(lines) == 3, lines
    assert "1/3 ended | trial t1 running: projector=qformer, λ=0.1, seed 0" in lines[0]
    assert "2/3 ended (under 1 min left at this pace) | trial t1 finished" in lines[1]
    assert "step 120, val acc 0.812, probe acc 0.900" in lines[1]
    assert "3/3 ended | trial t2 failed" in lines[2]  # the error as it is, not read as markup
    assert lines[2].endswith("RuntimeError: [enforce fail at alloc_cpu.cpp:114] [/x] out of memory")
    assert "t0" not in "\n".join(lines)
    # and the whole table once at the end, as the live view leaves it
    table = text[text.index(lines[-1]) + len(lines[-1]) :]
    assert "sweep s1: running (1 failed, 2 finished)" in table and "0.812" in table


def test_the_time_left_is_the_pace_of_the_trials_ended_while_shown():
    """A resumed sweep: 10 of 32 ended before; 2 more end in 20 min (2 at a time), so the
    20 left take about 3 h 20 min at that pace; nothing is said before one has ended."""
    from sweeper.cli import display as cli

    ended = {f"t{i}": {"status": "finished"} for i in range(10)}
    shown = cli._Display({"trials": ended}, total=32)
    assert shown.left(10, 600) == ""
    assert shown.left(12, 1200) == " (about 3 h 20 min left at this pace)"
    assert shown.left(31, 1200) == " (about 1 min left at this pace)"
    assert shown.left(32 - 1, 5) == " (under 1 min left at this pace)"
    # the first of 2 parallel trials to end (the other still running) is no pace yet
    assert shown.left(11, 600, running=2) == ""
    assert shown.left(12, 1200, running=2) == " (about 3 h 20 min left at this pace)"
    assert shown.left(32, 1200) == ""
    assert cli._Display({"trials": {}}).left(1, 60) == ""  # no total known


def test_no_time_left_from_the_first_of_two_parallel_trials(monkeypatch):
    """As a k = 4 sweep showed it: 2 trials run; the first ends before the next starts,
    so only one shows as running. One end among two at once is no pace yet."""
    from rich.console import Console

    from sweeper.cli import display as cli

    out = Console(record=True, width=200, force_terminal=False)
    monkeypatch.setattr(cli, "console", out)

    def row(tid, status):
        return {"id": tid, "status": status, "params": {"reg_constant": 1.0}, "seed": 0}

    def state(a, b):
        return {"id": "s", "status": "running", "trials": {"a": row("a", a), "b": row("b", b)}}

    with cli._Display({"id": "s", "status": "running", "trials": {}}, total=12) as shown:
        shown.update(state("running", "running"))
        shown.update(state("finished", "running"))
        shown.update(state("finished", "finished"))
    lines = [ln for ln in out.export_text().splitlines() if "| trial " in ln]
    assert "1/12 ended | trial a finished" in lines[2], lines
    assert "2/12 ended (" in lines[3] and "left at this pace) | trial b finished" in lines[3]
    # followed (or resumed) while both already run: the first update is already an end
    shown = cli._Display(state("running", "running"), total=12)
    shown.update(state("finished", "running"))
    assert "1/12 ended | trial a finished" in out.export_text().splitlines()[-1]


def test_a_line_for_a_trial_without_figures_or_with_an_empty_error():
    from sweeper.cli import display as cli

    shown = cli._Display({"trials": {}})
    row = {"id": "t1", "status": "finished", "params": {}, "metrics": {"val/accuracy": None}}
    assert shown.line("t1", row, 1).endswith("trial t1 finished: , seed ")
    row = {"status": "failed", "error": "  \n ", "metrics": None}
    assert shown.line("t2", row, 1).endswith("trial t2 failed: , seed ")


def test_following_a_remote_sweep_does_not_announce_its_past_again(monkeypatch):
    """The event stream replays a sweep's history: a trial that has ended is not announced
    again, and its row is not set back to what an older event said."""
    from rich.console import Console

    from sweeper.cli import display as cli

    out = Console(width=300, record=True, force_terminal=False)
    monkeypatch.setattr(cli, "console", out)

    def trial(tid, status, acc=None):
        metrics = {} if acc is None else {"val/accuracy": acc}
        return {
            "id": tid,
            "status": status,
            "params": {"reg_constant": 0.1},
            "seed": 0,
            "step": 100,
            "metrics": metrics,
        }

    class Client:
        url = "http://svc"

        def get(self, sweep_id):
            spec = {"budget": {"trials": 3}, "repeats": 1}
            return {"id": sweep_id, "status": "running", "spec": spec, "best": None}

        def trials(self, sweep_id):
            return [trial("a", "finished", 0.8), trial("b", "running")]

        def events(self, sweep_id, after=0):
            yield "trial_started", trial("a", "running")  # the past, replayed
            yield "trial_finished", trial("a", "finished", 0.8)
            yield "trial_started", trial("b", "running")
            yield "trial_finished", trial("b", "finished", 0.7)  # new
            yield "sweep", {"status": "succeeded", "best": None}

    state = cli._watch(Client(), "s1")
    lines = [ln for ln in out.export_text().splitlines() if "| trial " in ln]
    assert len(lines) == 1, lines
    assert "2/3 ended (under 1 min left at this pace) | trial b finished" in lines[0]
    assert state["status"] == "running"  # _watch returns the REST state, read again


def test_cancel_of_an_interrupted_local_sweep_cancels_its_paused_trials(sweep_env, tiny_spec):
    from typer.testing import CliRunner

    from sweeper.cli import app
    from sweeper.spec import SweepSpec
    from sweeper.store import SweepRecord

    rec = SweepRecord.create(SweepSpec.model_validate(tiny_spec()))
    rows = {t: {"id": t, "status": s} for t, s in (("a", "finished"), ("b", "paused"))}
    rec.update(status="interrupted", trials=rows, pid=None)
    res = CliRunner().invoke(app, ["cancel", rec.id])
    assert res.exit_code == 0 and "cancelled" in res.output, res.output
    state = rec.read()
    assert state["status"] == "cancelled"
    assert {t: r["status"] for t, r in state["trials"].items()} == {
        "a": "finished",
        "b": "cancelled",
    }
