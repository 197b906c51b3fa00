"""The information probe: what the projected tokens still hold about questions the LM is
never trained on, on a scale from chance (nothing) to the ceiling (the raw embedding).

A linear probe (logistic regression) is fitted on the train images' features and scored on
the evaluated split's images, per held-out question:

- ``probe_accuracy``: fitted on the projected tokens (flattened);
- ``probe_ceiling``: the same probe on the normalised raw embeddings the projector reads,
  the most there is to keep (fitted once per run);
- ``probe_chance``: the majority train answer's rate on the split (the answer frequencies);
- ``probe_retained`` = (accuracy − chance) / (ceiling − chance): 1 keeps all a linear probe
  can read from the embedding, 0 keeps nothing. The step-0 evaluation is its floor (the
  untrained projector).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import torch

from trainer.metrics import question_slug

Features = Callable[[torch.Tensor], torch.Tensor]  # image rows -> [n, f]


def linear_probe_accuracy(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray
) -> float:
    """Accuracy on ``x_val`` of a logistic regression fitted on ``x_train`` (standardised)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(y_train.tolist())) < 2:
        return float(np.mean(y_val == y_train[0]))
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, C=1.0))
    clf.fit(x_train, y_train)
    return float(clf.score(x_val, y_val))


def chance_accuracy(y_train: np.ndarray, y_eval: np.ndarray) -> float:
    """Accuracy of always answering the most frequent train answer."""
    top = Counter(y_train.tolist()).most_common(1)[0][0]
    return float(np.mean(y_eval == top))


class Probe:
    """The held-out questions (``probe_questions``) and the linear probe that scores them."""

    def __init__(self, data, questions: list[str], known: set[str]):
        self.questions = list(questions)
        missing = [q for q in self.questions if q not in known]
        if missing:
            raise ValueError(
                f"probe_questions: {missing[0]!r} is not a question of this dataset; it has "
                + ", ".join(repr(q) for q in sorted(known))
            )
        if self.questions and known <= set(self.questions):
            raise ValueError("probe_questions: hold some questions out, not all of them")
        self.answers = {
            (split, q): sorted(
                {
                    (ex["image"], ex["answer"])
                    for ex in data.examples.get(split, ())
                    if ex["question"] == q
                }
            )
            for split in ("train", "val", "test")
            for q in self.questions
        }
        self._ceiling: dict[tuple[str, str], float] = {}

    def asked(self, examples: list[dict]) -> list[dict]:
        """The examples the LM trains and is evaluated on: not the held-out questions."""
        return [ex for ex in examples if ex["question"] not in self.questions]

    def _fit(self, features: Features, q: str, split: str) -> float:
        tr, ev = self.answers[("train", q)], self.answers[(split, q)]
        x_tr = features(torch.tensor([i for i, _ in tr])).float().cpu().numpy()
        x_ev = features(torch.tensor([i for i, _ in ev])).float().cpu().numpy()
        y_tr, y_ev = np.array([a for _, a in tr]), np.array([a for _, a in ev])
        return linear_probe_accuracy(x_tr, y_tr, x_ev, y_ev)

    def score(self, features: Features, raw: Features, split: str = "val") -> dict[str, float]:
        """Probe accuracy, ceiling, chance and retained fraction per question (and means),
        as ``<split>/probe_*`` metrics. ``features`` gives the projected tokens of image
        rows, ``raw`` their normalised embeddings (its probe is fitted once per split)."""
        out: dict[str, float] = {}
        per: dict[str, list[float]] = {"accuracy": [], "ceiling": [], "chance": [], "retained": []}
        for q in self.questions:
            if not self.answers[(split, q)]:
                continue
            if (split, q) not in self._ceiling:
                self._ceiling[(split, q)] = self._fit(raw, q, split)
            acc, ceiling = self._fit(features, q, split), self._ceiling[(split, q)]
            y_tr = np.array([a for _, a in self.answers[("train", q)]])
            y_ev = np.array([a for _, a in self.answers[(split, q)]])
            chance = chance_accuracy(y_tr, y_ev)
            slug = question_slug(q)
            out[f"{split}/probe_accuracy/{slug}"] = acc
            out[f"{split}/probe_ceiling/{slug}"] = ceiling
            per["accuracy"].append(acc)
            per["ceiling"].append(ceiling)
            per["chance"].append(chance)
            if ceiling > chance:  # no scale where the raw embedding is no better than chance
                retained = (acc - chance) / (ceiling - chance)
                out[f"{split}/probe_retained/{slug}"] = retained
                per["retained"].append(retained)
        for name, values in per.items():
            if values:
                out[f"{split}/probe_{name}"] = float(np.mean(values))
        return out
