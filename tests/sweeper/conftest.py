"""Sweep fixtures: one real Ray on 2 CPUs for the session, a fresh MLflow store per test."""

from __future__ import annotations

import pytest
import yaml


@pytest.fixture(scope="session")
def ray_session(_private_cache):
    import ray

    # Workers inherit this environment (the private model cache, no hub).
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def sweep_env(tmp_path, monkeypatch):
    """SWEEPER_HOME and an MLflow sqlite store in this test's folder; returns the URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("SWEEPER_HOME", str(tmp_path / "sweeps"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


@pytest.fixture
def tiny_spec(tiny_dataset):
    """Factory of spec dicts on the tiny model; keyword sections are merged in."""

    def make(**sections) -> dict:
        spec = {
            "name": "tiny",
            "trainer": {
                "model": "tiny-llama",
                "dataset": tiny_dataset,
                "max_steps": 20,
                "eval_every": 10,
                "batch_size": 16,
                "lr": 0.01,
                "device": "cpu",
            },
            "search": {
                "sampler": "tpe",
                "seed": 0,
                "space": {
                    "reg_constant": {"type": "float", "low": 1e-3, "high": 10.0, "log": True},
                    "token_expansion": {"type": "categorical", "choices": [1, 2, 4]},
                },
            },
            "budget": {"trials": 4, "max_concurrent": 2},
        }
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(spec.get(key), dict):
                spec[key] = spec[key] | value
            else:
                spec[key] = value
        return spec

    return make


def write_spec(path, spec: dict):
    path.write_text(yaml.safe_dump(spec))
    return path
