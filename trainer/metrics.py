"""The metric names the trainer reports: one definition, read by the sweeper, the report
and the benches (MLflow and Tune keys alike; ``/`` groups them in the MLflow UI)."""

from __future__ import annotations

import re

# Every step.
LOSS_LM = "train/loss_lm"
LOSS_REG = "train/loss_reg"
LOSS_TOTAL = "train/loss_total"
REG_CONSTANT = "train/reg_constant"  # the λ in force that step
GRAD_NORM_LM = "train/grad_norm_lm"  # each loss's gradient norm on the projector
GRAD_NORM_REG = "train/grad_norm_reg"
GRAD_COS = "train/grad_cos"  # cosine between the two losses' gradients on the projector
LR = "train/lr"
PROJ_TOKEN_NORM = "train/proj_token_norm"
LM_TOKEN_NORM = "train/lm_token_norm"
# Only with some trainer fields: reg_balance other than none, the moe projector.
BALANCE_LM = "train/balance_lm"
BALANCE_REG = "train/balance_reg"
MOE_AUX_LOSS = "train/moe_aux_loss"

# On evaluation steps (step 0 included).
ACCURACY = "val/accuracy"
ACCURACY_CHOICE = "val/accuracy_choice"
VAL_LOSS_LM = "val/loss_lm"
VAL_LOSS_REG = "val/loss_reg"
PROBE_ACCURACY = "val/probe_accuracy"
PROBE_CEILING = "val/probe_ceiling"
PROBE_RETAINED = "val/probe_retained"
PROBE_CHANCE = "val/probe_chance"

TRAIN_METRICS = (
    LOSS_LM,
    LOSS_REG,
    LOSS_TOTAL,
    REG_CONSTANT,
    GRAD_NORM_LM,
    GRAD_NORM_REG,
    GRAD_COS,
    LR,
    PROJ_TOKEN_NORM,
    LM_TOKEN_NORM,
)
OPTIONAL_TRAIN_METRICS = (BALANCE_LM, BALANCE_REG, MOE_AUX_LOSS)
VAL_METRICS = (
    ACCURACY,
    ACCURACY_CHOICE,
    VAL_LOSS_LM,
    VAL_LOSS_REG,
    PROBE_ACCURACY,
    PROBE_CEILING,
    PROBE_RETAINED,
    PROBE_CHANCE,
)
# Families with a per-question suffix: ``<prefix><question_slug(q)>``.
BY_QUESTION_PREFIXES = (
    "val/accuracy_by_question/",
    "val/loss_lm_by_question/",
    "val/probe_accuracy/",
    "val/probe_ceiling/",
    "val/probe_retained/",
)


def question_slug(text: str) -> str:
    """A question as a metric-name suffix: ``val/accuracy_by_question/<slug>``."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40]


def is_metric(name: str) -> bool:
    """Whether the trainer reports a metric of this name on the train or validation split
    (an objective must be one: ``test/`` metrics are for the final claim, never for choosing)."""
    return (
        name in TRAIN_METRICS
        or name in OPTIONAL_TRAIN_METRICS
        or name in VAL_METRICS
        or any(name.startswith(p) and len(name) > len(p) for p in BY_QUESTION_PREFIXES)
    )
