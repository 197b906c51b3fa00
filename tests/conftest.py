"""Shared fixtures: a private model/data cache, the tiny random Llama, a small dataset."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from trainer.data import DIGIT_CHOICES, digits_examples, write_dataset


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Tests never touch the user's ~/.cache/sweeper, and never reach a hub."""
    os.environ["SWEEPER_CACHE_DIR"] = str(tmp_path_factory.mktemp("sweeper-cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield


def make_dataset(out: Path, n: int = 120, dim: int = 48, seed: int = 0, noise: float = 0.3) -> Path:
    """Digit-like data: each label a prototype embedding plus noise, digits' questions."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n)
    emb = rng.normal(size=(10, dim))[labels] + noise * rng.normal(size=(n, dim))
    return write_dataset(out, emb, digits_examples(labels), {"choices": DIGIT_CHOICES})


def make_patch_dataset(out: Path, n: int = 120, dim: int = 48, patches: int = 4, seed: int = 0):
    """Digit-like data with ``patches`` embeddings per image: each patch its own prototype
    per label plus noise, so every patch carries the label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n)
    protos = rng.normal(size=(10, patches, dim))
    emb = protos[labels] + 0.3 * rng.normal(size=(n, patches, dim))
    return write_dataset(out, emb, digits_examples(labels), {"choices": DIGIT_CHOICES})


@pytest.fixture(scope="session")
def tiny_patch_dataset(tmp_path_factory) -> str:
    return str(make_patch_dataset(tmp_path_factory.mktemp("data") / "patches"))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> str:
    return str(make_dataset(tmp_path_factory.mktemp("data") / "tiny"))


@pytest.fixture
def tiny_cfg(tiny_dataset):
    """Factory of TrainerConfigs on the tiny model and data; keywords override."""
    from trainer import TrainerConfig

    def make(**kw):
        base = dict(
            model="tiny-llama",
            dataset=tiny_dataset,
            batch_size=16,
            max_steps=20,
            eval_every=10,
            lr=1e-2,
            device="cpu",
        )
        return TrainerConfig(**(base | kw))

    return make


# ---- sweeps: one real Ray on 2 CPUs for the session, a fresh MLflow store per test ----


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
