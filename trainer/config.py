"""The trainer's one typed config: every field a sweep may set, with why it exists."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class TrainerConfig(BaseModel):
    """One training run of the projector-regularisation study.

    Field names are the contract: a sweep spec's search keys, Ray Tune's config keys and
    MLflow's params all use them unchanged.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    # --- sources -----------------------------------------------------------------------
    model: str = Field(
        "smollm2-135m",
        description="Frozen causal LM: a builtin alias (smollm2-135m, tiny-llama), "
        "a local directory saved with save_pretrained, or a Hugging Face hub id.",
    )
    dataset: str = Field(
        "digits",
        description="Builtin alias (digits, digits-patches, digits-factors) or a local dataset "
        "directory (embeddings.npy + examples.jsonl, see docs/datasets.md).",
    )

    # --- the two knobs under study -----------------------------------------------------
    reg_constant: float = Field(
        0.1,
        ge=0.0,
        description="λ: weight of the reconstruction loss 1 - cos(recon, original) "
        "added to the LM loss. 0 turns the regulariser off (the loss is still measured).",
    )
    token_expansion: int = Field(
        1,
        ge=1,
        le=64,
        description="k: LLM token embeddings produced per image embedding.",
    )
    reg_schedule: Literal["constant", "warmup", "cosine_decay", "ae_stage"] = Field(
        "constant",
        description="How λ moves over training. 'constant': λ throughout. 'warmup': 0 rising "
        "linearly to λ over reg_schedule_steps. 'cosine_decay': λ at the start, decaying "
        "along a half cosine to 0 at max_steps. 'ae_stage': an autoencoder stage first: for "
        "reg_schedule_steps steps the projector and head train on the reconstruction loss "
        "alone (no LM forward, no train/loss_lm), then λ constant with the LM loss on, as "
        "BLIP-2 trains its bridge before the LLM sees it.",
    )
    reg_balance: Literal["none", "running_mean", "uncertainty"] = Field(
        "none",
        description="Weights on the two losses before λ: 'none'; 'running_mean' divides each "
        "loss by a stop-gradient running mean of itself; 'uncertainty' learns Kendall et "
        "al.'s weights ½·exp(−s) per loss. The weights are logged as train/balance_lm and "
        "train/balance_reg.",
    )
    reg_schedule_steps: int = Field(
        0,
        ge=0,
        description="Length of the 'warmup' ramp or of the 'ae_stage' (steps); 0: 10% of "
        "max_steps.",
    )

    # --- projector and reconstruction head ---------------------------------------------
    projector_hidden: int | None = Field(
        None,
        ge=1,
        description="Hidden width of the projector per token (the mlp2x_gelu's, or the "
        "qformer's query width); default the LM hidden size (LLaVA's choice).",
    )
    projector_width: Literal["per_token", "fixed"] = Field(
        "per_token",
        description="'per_token': the mlp kinds' hidden layer is projector_hidden × k wide, "
        "so more tokens widen the channel the image passes through (a fixed width is a "
        "bottleneck whatever k is). 'fixed': projector_hidden for every k (LLaVA's "
        "mlp2x_gelu at k = 1). The qformer's width is per query either way.",
    )
    projector: Literal["mlp", "mlp_residual", "moe", "qformer"] = Field(
        "mlp",
        description="'mlp': LLaVA's mlp2x_gelu. 'mlp_residual': plus a linear path carrying "
        "the embedding itself. 'moe': projector_experts mlp2x_gelu experts, top-2 routing, "
        "its load-balancing loss (weight moe_aux_weight) logged as train/moe_aux_loss. "
        "'qformer': token_expansion learned queries cross-attending to the image's patch "
        "embeddings (a patch dataset such as digits-patches; a pooled dataset gives it one "
        "patch), qformer_layers blocks wide projector_hidden. The mlp kinds project the "
        "pooled embedding (the mean of the patches).",
    )
    qformer_layers: int = Field(
        2, ge=1, le=12, description="Blocks (self-attention, cross-attention, MLP) of 'qformer'."
    )
    projector_experts: int = Field(4, ge=2, le=64, description="Experts of the 'moe' projector.")
    moe_aux_weight: float = Field(
        0.01, ge=0.0, description="Weight of the 'moe' projector's load-balancing loss."
    )
    probe_questions: list[str] = Field(
        default_factory=list,
        description="Questions held out of training and evaluation: the LM is never asked "
        "them. At each eval a linear probe (logistic regression) is fitted on the frozen "
        "projected tokens of the train images to predict their answers, and scored on "
        "the val images: val/probe_accuracy (mean over these questions) says what the "
        "projector kept that training never asked for; val/probe_ceiling is the same "
        "probe on the normalised raw embeddings, val/probe_retained = (probe - chance) / "
        "(ceiling - chance).",
    )
    delayed_questions: dict[str, int] = Field(
        default_factory=dict,
        description="{question: step}: the question joins training at that step (it is "
        "evaluated from step 0). Its accuracy and NLL after it joins "
        "(val/accuracy_by_question/<q>, val/loss_lm_by_question/<q>) say how well the "
        "projector kept what the LM needs later.",
    )
    prompt_layout: Literal["question_first", "image_first"] = Field(
        "question_first",
        description="'question_first': the question first (its KV cache computed once per "
        "question), then the image tokens and the answer: the LM reads the image already "
        "knowing the question (a query-conditioned reading), and learns fast. "
        "'image_first': a fixed prefix, the image tokens, then the question and answer, as "
        "LLaVA and the note lay it out: the faithful layout for the note's question, about "
        "6x slower per step on CPU and much slower to learn (docs/trainer.md). Both compute "
        "logits only at the answer (lm_path 'fast').",
    )
    recon_head: Literal["linear", "mlp"] = Field(
        "linear",
        description="Reconstruction head from the k projected tokens (concatenated) back "
        "to the image embedding.",
    )
    embedding_norm: Literal["standardize", "l2", "none"] = Field(
        "standardize",
        description="How image embeddings are normalised before projection and as the "
        "reconstruction target. Cosine ignores magnitude, so 'standardize' (per-dimension "
        "z-score with train-split statistics) keeps every feature's direction on an equal "
        "footing; 'l2' scales each embedding to unit norm.",
    )

    # --- optimiser and schedule (LLaVA stage-1 defaults) -------------------------------
    lr: float = Field(1e-3, gt=0.0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_ratio: float = Field(
        0.03, ge=0.0, lt=1.0, description="Fraction of max_steps of linear warm-up."
    )
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warm-up."
    )
    grad_clip: float | None = Field(
        1.0, gt=0.0, description="Clip the projector+head gradient to this norm; null: off."
    )
    batch_size: int = Field(32, ge=1, description="Examples per step.")
    max_steps: int = Field(200, ge=1, description="Optimiser steps.")

    # --- evaluation, logging, checkpoints ----------------------------------------------
    eval_every: int = Field(50, ge=1, description="Evaluate every this many steps and at the end.")
    eval_examples: int | None = Field(
        None, ge=1, description="Cap on validation examples per eval; null: the whole split."
    )
    eval_at_start: bool = Field(
        True,
        description="Evaluate at step 0, before any update: the untrained projector's "
        "accuracy and probe (the floor) are on record beside the trained ones.",
    )
    test_at_end: bool = Field(
        False,
        description="Also evaluate the test split after the last step (test/* metrics): "
        "keep it for the final claim, after choosing on val.",
    )
    checkpoint_every: int = Field(
        0, ge=0, description="Save a checkpoint every this many steps (0: only at the end)."
    )

    # --- execution ---------------------------------------------------------------------
    seed: int = Field(0, description="Seed for initialisation and data order.")
    device: str = Field(
        "auto", description="'auto' (CUDA if present, else CPU), 'cpu', 'cuda' or 'cuda:N'."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="'auto': bf16 autocast on CUDA, fp32 on CPU."
    )
    lm_path: Literal["fast", "reference"] = Field(
        "fast",
        description="'fast': the fixed prefix's KV cache computed once (the question under "
        "question_first, 'Image:' under image_first), logits only at answer tokens. "
        "'reference': image tokens first, full sequence, full logits.",
    )

    balance_lr: float | None = Field(
        None,
        gt=0.0,
        description="Learning rate of the 'uncertainty' balance's log variances (no weight "
        "decay); null: lr. Adam moves them about balance_lr per step, so at lr 1e-3 they "
        "barely move in a few hundred steps: 0.05 lets them settle.",
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', but got {v!r}")

    @model_validator(mode="after")
    def _check_schedule(self) -> TrainerConfig:
        if self.reg_schedule == "ae_stage" and self.schedule_steps() >= self.max_steps:
            raise ValueError(
                f"reg_schedule_steps: the autoencoder stage ({self.schedule_steps()} steps) "
                f"must end before max_steps ({self.max_steps}), or the LM loss never trains"
            )
        return self

    @model_validator(mode="after")
    def _check_questions(self) -> TrainerConfig:
        for q, step in self.delayed_questions.items():
            if q in self.probe_questions:
                raise ValueError(
                    f"delayed_questions: {q!r} is also in probe_questions (held out of "
                    "training): a question is either held out or delayed"
                )
            if not 1 <= step <= self.max_steps:
                raise ValueError(
                    f"delayed_questions: {q!r} joins at step {step}, but steps run "
                    f"1..{self.max_steps} (max_steps)"
                )
        return self

    def projector_width_for(self, lm_dim: int) -> int:
        """The projector's hidden width for this k (see ``projector_width``)."""
        base = self.projector_hidden or lm_dim
        if self.projector_width == "per_token" and self.projector != "qformer":
            return base * self.token_expansion
        return base

    def schedule_steps(self) -> int:
        """The λ ramp's or the autoencoder stage's length in steps."""
        return self.reg_schedule_steps or max(1, math.ceil(0.1 * self.max_steps))

    def reg_weight(self, step: int) -> float:
        """λ at ``step`` (1-based) under ``reg_schedule``."""
        lam, n = self.reg_constant, self.schedule_steps()
        if self.reg_schedule == "warmup":
            return lam * min(1.0, step / n)
        if self.reg_schedule == "cosine_decay":
            return lam * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / max(1, self.max_steps - 1)))
        return lam

    def in_ae_stage(self, step: int) -> bool:
        return self.reg_schedule == "ae_stage" and step <= self.schedule_steps()

    @field_validator("betas")
    @classmethod
    def _check_betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas must lie in [0, 1), but got {v}")
        return v


def format_validation_error(err: ValidationError, source: str = "") -> list[str]:
    """One line per problem, led by the field path, for CLI output."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{source}{path}: {msg}")
    return lines


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainerConfig:
    """Read a YAML trainer config; raises ValueError for unreadable files or bad YAML."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of trainer fields, got {type(data).__name__}")
    data.update(overrides or {})
    return TrainerConfig.model_validate(data)


def flatten_config(cfg: TrainerConfig) -> dict[str, Any]:
    """The config as flat params (tuples joined), as MLflow stores them."""
    out = {}
    for k, v in cfg.model_dump().items():
        out[k] = ",".join(str(x) for x in v) if isinstance(v, tuple | list) else v
    return out
