"""The trainer's builtin model and dataset names and its cache folder, for the service above.

``api/`` reaches the trainer only through ``sweeper``; this is what its path check needs.
"""

from __future__ import annotations

from trainer.data import DATASET_ALIASES
from trainer.sources import MODEL_ALIASES, cache_dir

__all__ = ["builtin_datasets", "builtin_models", "cache_dir"]


def builtin_models() -> frozenset[str]:
    """The model aliases the trainer prepares itself (``smollm2-135m``, ``tiny-llama``, ...)."""
    return frozenset(MODEL_ALIASES)


def builtin_datasets() -> frozenset[str]:
    """The builtin dataset aliases (``digits``, ``digits-factors``, ...)."""
    return frozenset(DATASET_ALIASES)
