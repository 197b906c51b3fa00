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

from trainer import metrics as M
from trainer.batches import QuestionGroups, normalise
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.config import TrainerConfig
from trainer.data import Dataset, load_dataset
from trainer.evaluate import Evaluator
from trainer.model import (
    LossBalance,
    Projector,
    PromptCache,
    ReconHead,
    answer_logits_for,
    lm_loss,
    load_lm,
    reg_loss,
)
from trainer.probe import Probe, linear_probe_accuracy  # noqa: F401  (re-exported)

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


def train(
    cfg: TrainerConfig,
    report: Report | None = None,
    checkpoint_dir: str | Path | None = None,
) -> TrainResult:
    """Train the projector and reconstruction head against a frozen LM.

    Args:
        cfg: the run's config.
        report: called as ``report(step, metrics)`` once per step, with the train metrics
            and, on eval steps, the validation metrics too (step 0: the evaluation before
            any update, when ``eval_at_start``).
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
    known = set(data.questions())
    probe = Probe(data, cfg.probe_questions, known)
    joins = _delays(cfg, known)
    train_groups = QuestionGroups(probe.asked(data.examples["train"]), prompts, device)

    def autocast():
        if amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp)

    answer_logits = answer_logits_for(cfg.lm_path, cfg.prompt_layout)

    def evaluator(split: str, cap: int | None) -> Evaluator:
        examples = probe.asked(data.examples.get(split, []))[:cap]
        return Evaluator(
            split,
            QuestionGroups(examples, prompts, device),
            lm=lm,
            prompts=prompts,
            answer_logits=answer_logits,
            probe=probe,
            choices=data.choices,
            batch_size=cfg.batch_size,
            autocast=autocast,
        )

    validate = evaluator("val", cfg.eval_examples)

    # Seed s fixes the initialisation (here) and the batch order (QuestionGroups.sample):
    # every configuration run with seed s starts from the same weights where shapes agree
    # and sees the same batches, so configurations compare paired by seed.
    torch.manual_seed(cfg.seed)
    projector = Projector(
        data.dim,
        lm_dim,
        cfg.token_expansion,
        cfg.projector_width_for(lm_dim),
        kind=cfg.projector,
        experts=cfg.projector_experts,
        layers=cfg.qformer_layers,
        patches=data.patches,
    ).to(device)
    head = ReconHead(lm_dim, cfg.token_expansion, data.dim, cfg.recon_head).to(device)
    balance = LossBalance(cfg.reg_balance).to(device)
    proj_params = list(projector.parameters())
    params = proj_params + list(head.parameters())
    groups = [{"params": params}]
    if list(balance.parameters()):  # the learned weights: their own lr, no decay
        groups.append(
            {
                "params": list(balance.parameters()),
                "lr": cfg.balance_lr or cfg.lr,
                "weight_decay": 0.0,
            }
        )
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = _scheduler(opt, cfg)

    start, ckpt = 0, None
    if checkpoint_dir is not None:
        ckpt = Path(checkpoint_dir)
        start = load_checkpoint(ckpt, projector, head, opt, sched, cfg, balance) or 0

    def evaluate() -> dict[str, float]:
        return validate(projector, head, emb, patches, device)

    history: list[tuple[int, dict[str, float]]] = []
    metrics: dict[str, float] = {}
    if start >= cfg.max_steps or (start == 0 and cfg.eval_at_start):
        # a resumed finished run reports where it is; a fresh one, its untrained floor
        metrics = evaluate()
        if start >= cfg.max_steps and cfg.test_at_end:
            metrics.update(evaluator("test", None)(projector, head, emb, patches, device))
        if start == 0:
            history.append((0, metrics))
        if report is not None:
            report(start, metrics)
    for step in range(start + 1, cfg.max_steps + 1):
        lam = cfg.reg_weight(step)
        ae = cfg.in_ae_stage(step)  # reconstruction alone: the LM is not run
        batch = train_groups.sample(cfg.seed, step, cfg.batch_size, emb, patches, joins)
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
            # Each loss's own gradient on the projector, so a user sees which one dominates
            # and whether they pull apart: the reg gradient first (its graph is small),
            # then the LM's by backward().
            g_reg = torch.autograd.grad(loss_reg, params, retain_graph=True, allow_unused=True)
            aux = projector.aux_loss
            g_aux = (
                torch.autograd.grad(aux, params, retain_graph=True, allow_unused=True)
                if aux is not None and cfg.moe_aux_weight
                else None
            )
            loss_lm.backward()
            g_lm = [p.grad for p in proj_params]
            grad_norm_lm = _norm(g_lm)
            grad_norm_reg = _norm(g_reg[: len(proj_params)])
            grad_cos = _cosine(g_lm, g_reg[: len(proj_params)])
            w_lm, w_reg = balance.weights(loss_lm, loss_reg)
            a = lam * w_reg
            for i, (p, g) in enumerate(zip(params, g_reg, strict=True)):
                if p.grad is not None and w_lm != 1.0:
                    p.grad.mul_(w_lm)
                # At λ = 0 the head still learns to reconstruct (from tokens the projector
                # is not pushed to keep reconstructible: the projector's part is dropped),
                # so val/loss_reg measures what the tokens hold at every λ.
                c = a if (a > 0 or i < len(proj_params)) else 1.0
                if g is not None and c:
                    p.grad = c * g if p.grad is None else p.grad.add_(g, alpha=c)
            balance.backward(loss_lm, loss_reg, lam)
            for p, g in zip(params, g_aux or (), strict=False):
                if g is not None:
                    w = cfg.moe_aux_weight
                    p.grad = w * g if p.grad is None else p.grad.add_(g, alpha=w)
        if cfg.grad_clip and (ae or a > 0):
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        elif cfg.grad_clip:  # λ = 0: the head is its own model; its gradient must not
            torch.nn.utils.clip_grad_norm_(proj_params, cfg.grad_clip)  # scale the projector's
            torch.nn.utils.clip_grad_norm_(params[len(proj_params) :], cfg.grad_clip)
        opt.step()
        sched.step()

        metrics = {
            M.LOSS_REG: loss_reg.item(),
            M.REG_CONSTANT: lam,
            M.GRAD_NORM_REG: grad_norm_reg,
            M.LR: sched.get_last_lr()[0],
            M.PROJ_TOKEN_NORM: tokens.detach().float().norm(dim=-1).mean().item(),
            M.LM_TOKEN_NORM: lm_token_norm,
        }
        if ae:  # the autoencoder stage's objective is the reconstruction loss alone
            metrics[M.LOSS_TOTAL] = loss_reg.item()
        else:
            metrics[M.LOSS_LM] = loss_lm.item()
            metrics[M.LOSS_TOTAL] = w_lm * loss_lm.item() + lam * w_reg * loss_reg.item()
            metrics[M.GRAD_NORM_LM] = grad_norm_lm
            if grad_cos is not None:
                metrics[M.GRAD_COS] = grad_cos
            if projector.aux_loss is not None:
                metrics[M.MOE_AUX_LOSS] = projector.aux_loss.item()
            if cfg.reg_balance != "none":
                metrics[M.BALANCE_LM], metrics[M.BALANCE_REG] = w_lm, w_reg
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            metrics.update(evaluate())
        if step == cfg.max_steps and cfg.test_at_end:
            metrics.update(evaluator("test", None)(projector, head, emb, patches, device))
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


def _delays(cfg: TrainerConfig, known: set[str]) -> dict[str, int]:
    """``delayed_questions``, checked against the dataset's questions."""
    for q in cfg.delayed_questions:
        if q not in known:
            raise ValueError(
                f"delayed_questions: {q!r} is not a question of this dataset; it has "
                + ", ".join(repr(x) for x in sorted(known))
            )
    if cfg.delayed_questions and known - set(cfg.probe_questions) <= set(cfg.delayed_questions):
        raise ValueError("delayed_questions: leave some question to train from step 1")
    return dict(cfg.delayed_questions)


def _cosine(a: list, b) -> float | None:
    """Cosine between two gradients given as per-parameter lists (None where unused)."""
    dot = na = nb = 0.0
    for x, y in zip(a, b, strict=True):
        if x is not None:
            na += x.detach().float().pow(2).sum().item()
        if y is not None:
            nb += y.detach().float().pow(2).sum().item()
        if x is not None and y is not None:
            dot += (x.detach().float() * y.detach().float()).sum().item()
    if na == 0.0 or nb == 0.0:
        return None
    return dot / math.sqrt(na * nb)


def _norm(grads) -> float:
    gs = [g.detach().float().norm() for g in grads if g is not None]
    return torch.stack(gs).norm().item() if gs else 0.0


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainerConfig):
    from transformers import get_scheduler

    names = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
    warmup = math.ceil(cfg.warmup_ratio * cfg.max_steps)
    return get_scheduler(names[cfg.lr_schedule], opt, warmup, cfg.max_steps)
