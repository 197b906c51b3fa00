"""One training run: ``train(cfg, report)``. Reads top to bottom, nanoGPT-style."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.config import TrainerConfig
from trainer.data import Dataset, load_dataset
from trainer.metrics import question_slug
from trainer.model import (
    Batch,
    LossBalance,
    Projector,
    PromptCache,
    ReconHead,
    answer_logits_fast,
    answer_logits_reference,
    exact_match,
    lm_loss,
    load_lm,
    reg_loss,
)

Report = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    """What a finished run leaves: its last step, last metrics and checkpoint."""

    step: int
    metrics: dict[str, float]
    checkpoint: Path | None = None
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    """'auto' means CUDA when present; an explicit CUDA request without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but CUDA is not available here")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA under 'auto'; fp32 (no autocast) on CPU."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


# Sweeps run many trials in one worker: the frozen LM and the cached embeddings are loaded
# once per process, not once per trial (they are never modified).
@functools.lru_cache(maxsize=2)
def shared_lm(model: str, device: str):
    return load_lm(model, torch.device(device))


@functools.lru_cache(maxsize=2)
def shared_dataset(name: str) -> Dataset:
    return load_dataset(name)


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
    ) -> Batch:
        """The batch of a step is a pure function of (seed, step): resume replays it exactly.

        One question per batch, so all items share the cached prefix (and a length).
        """
        rng = np.random.default_rng([seed, step])
        g = int(rng.choice(len(self.groups), p=self.sizes / self.sizes.sum()))
        n = len(self.groups[g][1])
        rows = torch.from_numpy(rng.choice(n, size=min(batch_size, n), replace=False))
        return self.batch(g, rows, emb, patches)[0]


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


class Probe:
    """The held-out questions (``probe_questions``) and the linear probe that scores them."""

    def __init__(self, data, questions: list[str]):
        self.questions = list(questions)
        known = set(data.questions())
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
                {(ex["image"], ex["answer"]) for ex in data.examples[split] if ex["question"] == q}
            )
            for split in ("train", "val")
            for q in self.questions
        }

    def asked(self, examples: list[dict]) -> list[dict]:
        """The examples the LM trains and is evaluated on: not the held-out questions."""
        return [ex for ex in examples if ex["question"] not in self.questions]

    def score(self, features) -> dict[str, float]:
        """``features(image rows) -> [n, f]`` tensor; the probe's val accuracy per question."""
        out = {}
        for q in self.questions:
            (tr, va) = (self.answers[("train", q)], self.answers[("val", q)])
            x_tr = features(torch.tensor([i for i, _ in tr])).float().cpu().numpy()
            x_va = features(torch.tensor([i for i, _ in va])).float().cpu().numpy()
            y_tr, y_va = np.array([a for _, a in tr]), np.array([a for _, a in va])
            out[f"val/probe_accuracy/{question_slug(q)}"] = linear_probe_accuracy(
                x_tr, y_tr, x_va, y_va
            )
        out["val/probe_accuracy"] = float(np.mean(list(out.values())))
        return out


def train(
    cfg: TrainerConfig,
    report: Report | None = None,
    checkpoint_dir: str | Path | None = None,
) -> TrainResult:
    """Train the projector and reconstruction head against a frozen LM.

    Args:
        cfg: the run's config.
        report: called as ``report(step, metrics)`` once per step, with the train metrics
            and, on eval steps, the validation metrics too.
        checkpoint_dir: where checkpoints go; a checkpoint already there is resumed.

    Returns:
        The last step's metrics and the checkpoint written, if any.
    """
    device = resolve_device(cfg.device)
    amp = autocast_dtype(cfg.precision, device)
    data = shared_dataset(cfg.dataset)
    lm, tok = shared_lm(cfg.model, str(device))
    prompts = PromptCache(lm, tok, device)
    lm_dim = lm.get_input_embeddings().embedding_dim
    lm_token_norm = lm.get_input_embeddings().weight.norm(dim=-1).mean().item()

    train_rows = np.unique([ex["image"] for ex in data.examples["train"]])
    emb = torch.from_numpy(normalise(data.pooled(), train_rows, cfg.embedding_norm)).float()
    emb = emb.to(device)
    patches = None  # a patch dataset's patches, for the qformer projector
    if data.patches > 1 and cfg.projector == "qformer":
        patches = normalise(data.embeddings, train_rows, cfg.embedding_norm)
        patches = torch.from_numpy(patches).float().to(device)
    probe = Probe(data, cfg.probe_questions)
    train_groups = QuestionGroups(probe.asked(data.examples["train"]), prompts, device)
    val_examples = probe.asked(data.examples["val"])[: cfg.eval_examples]
    val_groups = QuestionGroups(val_examples, prompts, device)

    torch.manual_seed(cfg.seed)
    projector = Projector(
        data.dim,
        lm_dim,
        cfg.token_expansion,
        cfg.projector_hidden,
        kind=cfg.projector,
        experts=cfg.projector_experts,
        layers=cfg.qformer_layers,
        patches=data.patches,
    ).to(device)
    head = ReconHead(lm_dim, cfg.token_expansion, data.dim, cfg.recon_head).to(device)
    balance = LossBalance(cfg.reg_balance).to(device)
    proj_params = list(projector.parameters())
    params = proj_params + list(head.parameters())
    opt = torch.optim.AdamW(
        params + list(balance.parameters()),
        lr=cfg.lr,
        betas=cfg.betas,
        weight_decay=cfg.weight_decay,
    )
    sched = _scheduler(opt, cfg)
    answer_logits = answer_logits_fast if cfg.lm_path == "fast" else answer_logits_reference

    start, ckpt = 0, None
    if checkpoint_dir is not None:
        ckpt = Path(checkpoint_dir)
        start = load_checkpoint(ckpt, projector, head, opt, sched, cfg, balance) or 0

    def autocast():
        if amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp)

    def project(rows: torch.Tensor) -> torch.Tensor:
        """The projected tokens of these images."""
        return projector(emb[rows], None if patches is None else patches[rows])

    def evaluate() -> dict[str, float]:
        projector.eval(), head.eval()
        nll = n_tok = reg = 0.0
        hits, choice_hits, choice_n, n = [], 0, 0, 0
        per_q: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad(), autocast():
            for g, (q, images, *_rest) in enumerate(val_groups.groups):
                for i in range(0, len(images), cfg.batch_size):
                    rows = torch.arange(i, min(i + cfg.batch_size, len(images)))
                    b, _ = val_groups.batch(g, rows, emb, patches)
                    tokens = projector(b.embeddings, b.patches)
                    reg += reg_loss(head(tokens), b.embeddings).sum().item()
                    logits = answer_logits(lm, prompts, b, tokens).float()
                    k = int(b.answer_mask.sum())
                    nll += lm_loss(logits, b).item() * k
                    n_tok += k
                    hit = exact_match(logits, b)
                    hits.append(hit)
                    per_q.setdefault(q, []).append(hit)
                    got, counted = _choice_hits(logits, b, data.choices.get(q), prompts)
                    choice_hits, choice_n = choice_hits + got, choice_n + counted
                    n += len(rows)
        if probe.questions:
            with torch.no_grad():
                out_probe = probe.score(lambda rows: project(rows.to(device)).flatten(1))
        projector.train(), head.train()
        acc = torch.cat(hits).float().mean().item()
        out = {"val/accuracy": acc, "val/loss_lm": nll / n_tok, "val/loss_reg": reg / n}
        if choice_n:
            out["val/accuracy_choice"] = choice_hits / choice_n
        for q, h in per_q.items():
            out[f"val/accuracy_by_question/{question_slug(q)}"] = torch.cat(h).float().mean().item()
        if probe.questions:
            out.update(out_probe)
        return out

    history: list[tuple[int, dict[str, float]]] = []
    metrics: dict[str, float] = {}
    if start >= cfg.max_steps:  # resumed a finished run: nothing to train, report where it is
        metrics = evaluate()
        if report is not None:
            report(start, metrics)
    for step in range(start + 1, cfg.max_steps + 1):
        lam = cfg.reg_weight(step)
        ae = cfg.in_ae_stage(step)  # reconstruction alone: the LM is not run
        batch = train_groups.sample(cfg.seed, step, cfg.batch_size, emb, patches)
        with autocast():
            tokens = projector(batch.embeddings, batch.patches)
            loss_reg = reg_loss(head(tokens), batch.embeddings).mean()
            loss_lm = None if ae else lm_loss(answer_logits(lm, prompts, batch, tokens), batch)
        if not (torch.isfinite(loss_reg) and (ae or torch.isfinite(loss_lm))):
            raise FloatingPointError(
                f"non-finite loss at step {step}: "
                f"loss_lm={None if ae else loss_lm.item()}, loss_reg={loss_reg.item()}"
            )
        opt.zero_grad(set_to_none=True)
        if ae:
            loss_reg.backward()
            grad_norm_reg = _norm([p.grad for p in proj_params])
        else:
            # Each loss's own gradient on the projector, so a user sees which one dominates:
            # the reg gradient first (its graph is small), then the LM's by backward().
            g_reg = torch.autograd.grad(loss_reg, params, retain_graph=True, allow_unused=True)
            aux = projector.aux_loss
            g_aux = (
                torch.autograd.grad(aux, params, retain_graph=True, allow_unused=True)
                if aux is not None and cfg.moe_aux_weight
                else None
            )
            loss_lm.backward()
            grad_norm_lm = _norm([p.grad for p in proj_params])
            grad_norm_reg = _norm(g_reg[: len(proj_params)])
            w_lm, w_reg = balance.weights(loss_lm, loss_reg)
            for p, g in zip(params, g_reg, strict=True):
                if p.grad is not None and w_lm != 1.0:
                    p.grad.mul_(w_lm)
                if g is not None:
                    a = lam * w_reg
                    p.grad = a * g if p.grad is None else p.grad.add_(g, alpha=a)
            balance.backward(loss_lm, loss_reg, lam)
            for p, g in zip(params, g_aux or (), strict=False):
                if g is not None:
                    w = cfg.moe_aux_weight
                    p.grad = w * g if p.grad is None else p.grad.add_(g, alpha=w)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()

        metrics = {
            "train/loss_reg": loss_reg.item(),
            "train/reg_constant": lam,
            "train/grad_norm_reg": grad_norm_reg,
            "train/lr": sched.get_last_lr()[0],
            "train/proj_token_norm": tokens.detach().float().norm(dim=-1).mean().item(),
            "train/lm_token_norm": lm_token_norm,
        }
        if ae:  # the autoencoder stage's objective is the reconstruction loss alone
            metrics["train/loss_total"] = loss_reg.item()
        else:
            metrics["train/loss_lm"] = loss_lm.item()
            metrics["train/loss_total"] = w_lm * loss_lm.item() + lam * w_reg * loss_reg.item()
            metrics["train/grad_norm_lm"] = grad_norm_lm
            if projector.aux_loss is not None:
                metrics["train/moe_aux_loss"] = projector.aux_loss.item()
            if cfg.reg_balance != "none":
                metrics["train/balance_lm"], metrics["train/balance_reg"] = w_lm, w_reg
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            metrics.update(evaluate())
        if ckpt is not None and (
            step == cfg.max_steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
        ):
            save_checkpoint(ckpt, step, projector, head, opt, sched, cfg, balance)
        history.append((step, metrics))
        if report is not None:
            report(step, metrics)
    return TrainResult(
        step=max(start, cfg.max_steps), metrics=metrics, checkpoint=ckpt, history=history
    )


def _norm(grads) -> float:
    gs = [g.detach().float().norm() for g in grads if g is not None]
    return torch.stack(gs).norm().item() if gs else 0.0


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


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainerConfig):
    from transformers import get_scheduler

    names = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
    warmup = math.ceil(cfg.warmup_ratio * cfg.max_steps)
    return get_scheduler(names[cfg.lr_schedule], opt, warmup, cfg.max_steps)
