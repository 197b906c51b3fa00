"""The dataset folder format: read, checked and written (docs/datasets.md).

A dataset directory holds:

* ``embeddings.npy``: float32 ``[n_images, dim]``, one image-encoder embedding per image,
  or ``[n_images, n_patches, dim]``, several per image (patch features: the ``qformer``
  projector attends to them; the other projectors, and the reconstruction target, use
  their mean);
* ``examples.jsonl``: one JSON object per line,
  ``{"image": <row>, "question": str, "answer": str, "split": "train"|"val"|"test"}``;
* ``meta.json`` (optional): ``{"choices": {question: [answers...]}, "encoder": str, ...}``;
  ``choices`` enables the choice-by-likelihood accuracy for those questions.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer.sources import SourceError

SPLITS = ("train", "val", "test")


@dataclass
class Dataset:
    """Embeddings plus question/answer examples, grouped by split."""

    embeddings: np.ndarray
    examples: dict[str, list[dict]]
    choices: dict[str, list[str]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[-1])

    @property
    def patches(self) -> int:
        """Embeddings per image: 1 for a pooled dataset."""
        return int(self.embeddings.shape[1]) if self.embeddings.ndim == 3 else 1

    def pooled(self) -> np.ndarray:
        """One embedding per image, ``[n, dim]``: the mean of a patch dataset's patches."""
        return self.embeddings.mean(axis=1) if self.embeddings.ndim == 3 else self.embeddings

    def questions(self) -> list[str]:
        """Distinct questions, in a fixed order (first seen in train, then val/test)."""
        seen: dict[str, None] = {}
        for split in SPLITS:
            for ex in self.examples.get(split, []):
                seen.setdefault(ex["question"], None)
        return list(seen)


def write_dataset(
    out: Path, embeddings: np.ndarray, examples: list[dict], meta: dict | None = None
) -> Path:
    """Write a dataset directory in the documented format."""
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "embeddings.npy", embeddings.astype(np.float32))
    with open(out / "examples.jsonl", "w") as f:
        for ex in examples:
            f.write(json.dumps(ex) + "\n")
    (out / "meta.json").write_text(json.dumps(meta or {}, indent=2))
    return out


def load_dataset_dir(path: Path) -> Dataset:
    """Read and check a dataset directory; every problem is one-line SourceError."""
    if not path.is_dir():
        raise SourceError(f"dataset {str(path)!r} is not a builtin alias nor an existing directory")
    emb_path, ex_path = path / "embeddings.npy", path / "examples.jsonl"
    for p in (emb_path, ex_path):
        if not p.is_file():
            raise SourceError(f"dataset {str(path)!r} has no {p.name} (see docs/datasets.md)")
    emb = np.load(emb_path)
    if emb.ndim not in (2, 3) or 0 in emb.shape:
        raise SourceError(
            f"{emb_path}: expected a [n_images, dim] or [n_images, n_patches, dim] array, "
            f"got shape {emb.shape}"
        )
    examples: dict[str, list[dict]] = defaultdict(list)
    with open(ex_path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
                img, split = int(ex["image"]), ex["split"]
                q, a = str(ex["question"]), str(ex["answer"])
            except (ValueError, KeyError, TypeError) as e:
                raise SourceError(f"{ex_path}:{lineno}: bad example ({e!r})") from None
            if split not in SPLITS:
                raise SourceError(
                    f"{ex_path}:{lineno}: split must be one of {SPLITS}, got {split!r}"
                )
            if not 0 <= img < emb.shape[0]:
                raise SourceError(
                    f"{ex_path}:{lineno}: image {img} is outside 0..{emb.shape[0] - 1}"
                )
            examples[split].append({"image": img, "question": q, "answer": a})
    for split in ("train", "val"):
        if not examples[split]:
            raise SourceError(f"dataset {str(path)!r} has no {split!r} examples")
    meta_path = path / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return Dataset(emb.astype(np.float32), dict(examples), meta.get("choices", {}), meta)
