"""Evaluation of a split: exact-match accuracy, both losses, per-question accuracy and NLL,
choice accuracy, and the information probe."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from trainer.batches import QuestionGroups
from trainer.metrics import question_slug
from trainer.model import Batch, PromptCache, exact_match, lm_loss, reg_loss
from trainer.probe import Probe


class Evaluator:
    """Scores the projector, head and frozen LM on one split (``val``, or ``test`` once at
    the end). Metrics are named ``<split>/...``."""

    def __init__(
        self,
        split: str,
        groups: QuestionGroups,
        *,
        lm,
        prompts: PromptCache,
        answer_logits: Callable,
        probe: Probe,
        choices: dict[str, list[str]],
        batch_size: int,
        autocast: Callable[[], contextlib.AbstractContextManager],
    ):
        self.split, self.groups = split, groups
        self.lm, self.prompts, self.answer_logits = lm, prompts, answer_logits
        self.probe, self.choices = probe, choices
        self.batch_size, self.autocast = batch_size, autocast

    def __call__(self, projector, head, emb, patches, device) -> dict[str, float]:
        projector.eval(), head.eval()
        nll = n_tok = reg = 0.0
        hits, choice_hits, choice_n, n = [], 0, 0, 0
        per_q: dict[str, list[torch.Tensor]] = {}
        nll_q: dict[str, list[float]] = {}
        with torch.no_grad(), self.autocast():
            for g, (q, images, *_rest) in enumerate(self.groups.groups):
                for i in range(0, len(images), self.batch_size):
                    rows = torch.arange(i, min(i + self.batch_size, len(images)))
                    b, _ = self.groups.batch(g, rows, emb, patches)
                    tokens = projector(b.embeddings, b.patches)
                    reg += reg_loss(head(tokens), b.embeddings).sum().item()
                    logits = self.answer_logits(self.lm, self.prompts, b, tokens).float()
                    k = int(b.answer_mask.sum())
                    batch_nll = lm_loss(logits, b).item() * k
                    nll += batch_nll
                    n_tok += k
                    q_nll = nll_q.setdefault(q, [0.0, 0.0])
                    q_nll[0], q_nll[1] = q_nll[0] + batch_nll, q_nll[1] + k
                    hit = exact_match(logits, b)
                    hits.append(hit)
                    per_q.setdefault(q, []).append(hit)
                    got, counted = _choice_hits(logits, b, self.choices.get(q), self.prompts)
                    choice_hits, choice_n = choice_hits + got, choice_n + counted
                    n += len(rows)
            if self.probe.questions:
                out_probe = self.probe.score(
                    lambda rows: _project(projector, emb, patches, rows.to(device)).flatten(1),
                    lambda rows: emb[rows.to(device)],
                    self.split,
                )
        projector.train(), head.train()
        s = self.split
        out = {
            f"{s}/accuracy": torch.cat(hits).float().mean().item(),
            f"{s}/loss_lm": nll / n_tok,
            f"{s}/loss_reg": reg / n,
        }
        if choice_n:
            out[f"{s}/accuracy_choice"] = choice_hits / choice_n
        for q, h in per_q.items():
            slug = question_slug(q)
            out[f"{s}/accuracy_by_question/{slug}"] = torch.cat(h).float().mean().item()
            out[f"{s}/loss_lm_by_question/{slug}"] = nll_q[q][0] / nll_q[q][1]
        if self.probe.questions:
            out.update(out_probe)
        return out


def _project(projector, emb, patches, rows: torch.Tensor) -> torch.Tensor:
    return projector(emb[rows], None if patches is None else patches[rows])


def _choice_hits(logits: torch.Tensor, b: Batch, choices, prompts: PromptCache) -> tuple[int, int]:
    """Choice by likelihood: the candidate whose first answer token scores highest.

    Returns (hits, examples scored); questions without choices, or whose candidates share
    a first token (this cheap scorer can't tell them apart), are not scored.
    """
    if not choices:
        return 0, 0
    firsts = [prompts.answer_ids(c)[0] for c in choices]
    if len(set(firsts)) != len(firsts):
        return 0, 0
    pick = logits[:, 0, firsts].argmax(-1).tolist()
    return sum(choices[p] == a for p, a in zip(pick, b.answers, strict=True)), len(pick)
