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
