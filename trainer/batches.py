"""Embeddings as the projector reads them, and examples grouped by question into batches."""

from __future__ import annotations

import numpy as np
import torch

from trainer.model import Batch, PromptCache


def normalise(emb: np.ndarray, train_rows: np.ndarray, how: str) -> np.ndarray:
    """Standardise with train statistics, or scale to unit norm (see TrainerConfig).

    Patch embeddings ``[n, P, D]`` are standardised with the statistics of every train
    image's patches, and each patch scaled on its own under ``l2``.
    """
    if how == "standardize":
        train = emb[train_rows].reshape(-1, emb.shape[-1])
        mu, sd = train.mean(0), train.std(0)
        return (emb - mu) / np.maximum(sd, 1e-6)
    if how == "l2":
        return emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    return emb


class QuestionGroups:
    """A split's examples grouped by question, answers tokenised and padded once."""

    def __init__(self, examples: list[dict], prompts: PromptCache, device: torch.device):
        by_q: dict[str, list[dict]] = {}
        for ex in examples:
            by_q.setdefault(ex["question"], []).append(ex)
        self.groups = []
        for q, exs in by_q.items():
            ids = [prompts.answer_ids(ex["answer"]) for ex in exs]
            a = max(len(x) for x in ids)
            padded = torch.zeros(len(ids), a, dtype=torch.long)
            for i, x in enumerate(ids):
                padded[i, : len(x)] = torch.tensor(x)
            lengths = torch.tensor([len(x) for x in ids])
            mask = torch.arange(a)[None] < lengths[:, None]
            images = torch.tensor([ex["image"] for ex in exs])
            answers = [ex["answer"] for ex in exs]
            self.groups.append((q, images, padded.to(device), mask.to(device), answers))
        self.sizes = np.array([len(g[1]) for g in self.groups], dtype=np.float64)

    def batch(
        self, g: int, rows: torch.Tensor, emb: torch.Tensor, patches: torch.Tensor | None = None
    ) -> tuple[Batch, torch.Tensor]:
        q, images, ids, mask, answers = self.groups[g]
        img = images[rows]
        ids_b, mask_b = ids[rows], mask[rows]
        a = int(mask_b.sum(1).max())  # trim padding no example in this batch needs
        b = Batch(q, emb[img], ids_b[:, :a], mask_b[:, :a], [answers[i] for i in rows.tolist()])
        if patches is not None:
            b.patches = patches[img]
        return b, img

    def sample(
        self,
        seed: int,
        step: int,
        batch_size: int,
        emb: torch.Tensor,
        patches: torch.Tensor | None = None,
        joins: dict[str, int] | None = None,
    ) -> Batch:
        """The batch of a step is a pure function of (seed, step): resume replays it exactly,
        and every configuration run with the same seed sees the same batches.

        One question per batch, so all items share the cached prefix (and a length). A
        question in ``joins`` (``delayed_questions``) is drawn only from its step on.
        """
        rng = np.random.default_rng([seed, step])
        weights = self.sizes.copy()
        for g, group in enumerate(self.groups):
            if joins and step < joins.get(group[0], 0):
                weights[g] = 0.0
        g = int(rng.choice(len(self.groups), p=weights / weights.sum()))
        n = len(self.groups[g][1])
        rows = torch.from_numpy(rng.choice(n, size=min(batch_size, n), replace=False))
        return self.batch(g, rows, emb, patches)[0]
