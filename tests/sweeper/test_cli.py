"""`sweeper train` as a user runs it: a real subprocess, a real MLflow store."""

import os
import subprocess
import sys
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
    assert val == [6, 12]
    arts = {a.path for a in client.list_artifacts(r.info.run_id, "checkpoint")}
    assert "checkpoint/weights.safetensors" in arts


def test_train_resumes_from_its_checkpoint(tmp_path, config):
    cfg = config()
    assert run(["train", str(cfg), "--set", "max_steps=6"], tmp_path).returncode == 0
    proc = run(["train", str(cfg)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "resuming from the checkpoint" in proc.stdout and "step 12" in proc.stdout


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
