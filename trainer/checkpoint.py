"""Checkpoints: projector + head weights (safetensors), optimiser and schedule state."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer.config import TrainerConfig

WEIGHTS = "weights.safetensors"
# Fields that may change when a run resumes: they decide how it runs, not what it learns.
_RUNTIME_FIELDS = {
    "device",
    "precision",
    "eval_every",
    "eval_examples",
    "checkpoint_every",
    "eval_at_start",
    "test_at_end",
}


def save_checkpoint(
    directory: Path, step: int, projector, head, opt, sched, cfg: TrainerConfig, balance=None
):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ".checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {f"projector.{k}": v.contiguous() for k, v in projector.state_dict().items()}
    tensors |= {f"head.{k}": v.contiguous() for k, v in head.state_dict().items()}
    if balance is not None:
        tensors |= {f"balance.{k}": v.contiguous() for k, v in balance.state_dict().items()}
    save_file(tensors, tmp / WEIGHTS, metadata={"step": str(step)})
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp / "optim.pt")
    (tmp / "state.json").write_text(
        json.dumps({"step": step, "config": cfg.model_dump()}, indent=2)
    )
    final = directory / "checkpoint"
    old = directory / ".checkpoint.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    directory: Path, projector, head, opt, sched, cfg: TrainerConfig, balance=None
) -> int | None:
    """Restore into the given objects; returns the checkpoint's step, or None if there is none."""
    path = directory / "checkpoint"
    if not (path / "state.json").is_file():
        path = directory / ".checkpoint.old"  # a crash between the two renames of a save
        if not (path / "state.json").is_file():
            return None
    state = json.loads((path / "state.json").read_text())
    saved = TrainerConfig.model_validate(state["config"]).model_dump()
    for f, value in cfg.model_dump().items():
        if f not in _RUNTIME_FIELDS and saved.get(f) != value:
            raise ValueError(
                f"checkpoint in {directory} was made with {f}={saved.get(f)!r}, "
                f"but this run has {f}={value!r}: start afresh elsewhere (sweeper train "
                "--fresh or --output)"
            )
    tensors = load_file(path / WEIGHTS)
    projector.load_state_dict(_strip(tensors, "projector."))
    head.load_state_dict(_strip(tensors, "head."))
    if balance is not None:
        balance.load_state_dict(_strip(tensors, "balance."))
    optim = torch.load(path / "optim.pt", weights_only=True)
    opt.load_state_dict(optim["optimizer"])
    sched.load_state_dict(optim["scheduler"])
    return int(state["step"])


def _strip(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
