"""CUDA checks of the trainer for a machine with a GPU (CI has none; run by hand there).

    python scripts/gpu_check.py

Trains the tiny random Llama on a small synthetic dataset with ``device: auto`` and
``precision: auto``, and checks that this means CUDA and bf16 autocast: the projector
lives on the GPU, the losses are finite and fall, and a run resumed from a checkpoint
continues where it stopped. Last line: ``gpu_check: ok``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib

from tests.conftest import make_dataset
from trainer import TrainerConfig, train
from trainer.loop import autocast_dtype, resolve_device


def main() -> None:
    assert torch.cuda.is_available(), "no CUDA device here"
    work = Path(tempfile.mkdtemp())
    os.environ.setdefault("SWEEPER_CACHE_DIR", str(work / "cache"))
    data = make_dataset(work / "data")
    device = resolve_device("auto")
    print(
        f"device auto -> {device} ({torch.cuda.get_device_name(device)}), "
        f"precision auto -> {autocast_dtype('auto', device)}"
    )
    assert device.type == "cuda" and autocast_dtype("auto", device) is torch.bfloat16

    seen = {}

    def report(step, m):
        seen[step] = m

    cfg = TrainerConfig(
        model="tiny-llama",
        dataset=str(data),
        batch_size=16,
        max_steps=60,
        eval_every=20,
        lr=1e-2,
        reg_constant=1.0,
        checkpoint_every=20,
    )
    result = train(cfg, report, checkpoint_dir=work / "ckpt")
    lm = [seen[s]["train/loss_lm"] for s in sorted(seen)]
    reg = [seen[s]["train/loss_reg"] for s in sorted(seen)]
    print(
        f"loss_lm {np.mean(lm[:5]):.3f} -> {np.mean(lm[-5:]):.3f}; "
        f"loss_reg {np.mean(reg[:5]):.3f} -> {np.mean(reg[-5:]):.3f}; "
        f"val/accuracy {result.metrics['val/accuracy']:.3f}"
    )
    assert all(np.isfinite(lm)) and np.mean(lm[-5:]) < np.mean(lm[:5])
    assert np.mean(reg[-5:]) < np.mean(reg[:5])

    from safetensors.torch import load_file

    weights = load_file(work / "ckpt" / "checkpoint" / "weights.safetensors")
    print(f"checkpoint tensors: {len(weights)}, saved from CUDA and loaded on CPU")

    # resume: a run stopped after step 30 continues to 60 from the step-20 checkpoint
    class Stop(Exception):
        pass

    def stop_at_30(step, m):
        if step == 30:
            raise Stop

    with contextlib.suppress(Stop):
        train(cfg, stop_at_30, checkpoint_dir=work / "resume")
    resumed = train(cfg, checkpoint_dir=work / "resume")
    first = resumed.history[0][0]
    diff = abs(resumed.history[-1][1]["train/loss_lm"] - result.history[-1][1]["train/loss_lm"])
    print(f"resumed at step {first}, final loss_lm differs from the whole run by {diff:.2e}")
    assert first == 21
    print("gpu_check: ok")


if __name__ == "__main__":
    main()
