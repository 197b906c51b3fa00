"""Datasets by name: a builtin alias, prepared once into the cache, or a dataset folder.

The folder format is :mod:`trainer.dataset_format`; the builtins are :mod:`trainer.digits`.
"""

from __future__ import annotations

from pathlib import Path

from trainer.dataset_format import SPLITS, Dataset, load_dataset_dir, write_dataset
from trainer.digits import (
    DIGIT_CHOICES,
    DIGIT_QUESTIONS,
    build_digits,
    build_digits_factors,
    build_digits_patches,
    digits_examples,
)
from trainer.sources import _publish, cache_dir

__all__ = [
    "DATASET_ALIASES",
    "DIGIT_CHOICES",
    "DIGIT_QUESTIONS",
    "SPLITS",
    "Dataset",
    "build_digits",
    "digits_examples",
    "load_dataset",
    "load_dataset_dir",
    "write_dataset",
]

DATASET_ALIASES = {
    "digits": build_digits,
    "digits-patches": build_digits_patches,
    "digits-factors": build_digits_factors,
}


def load_dataset(name: str) -> Dataset:
    """A builtin alias (prepared once into the cache) or a dataset directory."""
    if name in DATASET_ALIASES:
        path = _publish(DATASET_ALIASES[name], cache_dir() / "datasets" / name)
    else:
        path = Path(name).expanduser()
    return load_dataset_dir(path)
