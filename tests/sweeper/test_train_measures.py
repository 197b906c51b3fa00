"""Issue 16's "done when", as a user runs it: `sweeper train --mlflow` on their own dataset
folder with an independent factor held out logs the probe's ceiling and retained fraction
and the gradient cosine, and the ceiling is what a linear probe on the raw embedding gets."""

import os
import subprocess
import sys

import numpy as np
import pytest
from mlflow import MlflowClient

from tests.trainer.test_measures import TINT, make_factor_dataset
from trainer.batches import normalise
from trainer.data import load_dataset
from trainer.probe import linear_probe_accuracy


def test_train_logs_the_probe_scale_and_grad_cos_on_a_user_folder(tmp_path):
    folder = make_factor_dataset(tmp_path / "my-dataset")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model: tiny-llama\ndataset: {folder}\nbatch_size: 16\nmax_steps: 12\neval_every: 6\n"
        f"lr: 0.01\ndevice: cpu\nreg_constant: 0.5\nprobe_questions: ['{TINT}']\n"
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run(
        [sys.executable, "-m", "sweeper", "train", str(cfg), "--mlflow"],
        cwd=tmp_path,
        env=os.environ | {"MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    client = MlflowClient(uri)
    (r,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    hist = {
        k: {m.step: m.value for m in client.get_metric_history(r.info.run_id, k)}
        for k in ("val/probe_ceiling", "val/probe_retained", "val/probe_accuracy", "train/grad_cos")
    }
    assert sorted(hist["val/probe_retained"]) == [0, 6, 12]  # step 0: the untrained floor
    assert sorted(hist["train/grad_cos"]) == list(range(1, 13))
    assert all(-1.0 <= v <= 1.0 for v in hist["train/grad_cos"].values())

    data = load_dataset(str(folder))
    train_rows = np.unique([ex["image"] for ex in data.examples["train"]])
    emb = normalise(data.pooled(), train_rows, "standardize")
    by = {
        s: sorted({(x["image"], x["answer"]) for x in data.examples[s] if x["question"] == TINT})
        for s in ("train", "val")
    }
    ceiling = linear_probe_accuracy(
        emb[[i for i, _ in by["train"]]],
        np.array([a for _, a in by["train"]]),
        emb[[i for i, _ in by["val"]]],
        np.array([a for _, a in by["val"]]),
    )
    assert sorted(hist["val/probe_ceiling"]) == [0, 6, 12]
    assert all(v == pytest.approx(ceiling) for v in hist["val/probe_ceiling"].values())
    assert r.data.params["probe_questions"] == TINT


@pytest.mark.parametrize("field", ["probe_questions", "delayed_questions"])
def test_a_sweep_refuses_a_question_its_dataset_lacks_before_any_trial(tiny_dataset, field):
    from sweeper.driver import prepare_sources
    from sweeper.spec import SweepSpec

    value = ["Is it a cat?"] if field == "probe_questions" else {"Is it a cat?": 5}
    spec = SweepSpec.model_validate(
        {
            "name": "typo",
            "trainer": {"model": "tiny-llama", "dataset": tiny_dataset, field: value},
            "search": {"space": {"reg_constant": {"type": "float", "low": 0.1, "high": 1.0}}},
        }
    )
    with pytest.raises(ValueError, match=rf"trainer\.{field}: 'Is it a cat\?' is not a question"):
        prepare_sources(spec)


@pytest.mark.usefixtures("ray_session")
def test_a_sweep_with_test_at_end_records_the_test_split_in_mlflow(sweep_env, tiny_spec):
    """The trainer scores the test split once at the end; the sweep must keep it (it was
    computed, reported to Tune and then dropped: only val/ metrics were logged)."""
    from sweeper.driver import run_sweep
    from sweeper.spec import SweepSpec
    from sweeper.store import SweepRecord

    spec = tiny_spec(trainer={"max_steps": 10, "eval_every": 5, "test_at_end": True})
    state = run_sweep(
        SweepRecord.create(SweepSpec.model_validate(spec | {"budget": {"trials": 2}}))
    )
    assert state["status"] == "succeeded"
    client = MlflowClient()
    runs = client.search_runs(
        [state["mlflow"]["experiment_id"]],
        f"tags.mlflow.parentRunId = '{state['mlflow']['parent_run_id']}'",
    )
    assert len(runs) == 2
    for r in runs:
        hist = client.get_metric_history(r.info.run_id, "test/accuracy")
        assert [m.step for m in hist] == [10], r.info.run_id  # once, at the last step
        assert 0.0 <= hist[0].value <= 1.0
    for row in state["trials"].values():
        assert "test/accuracy" in row["metrics"]
