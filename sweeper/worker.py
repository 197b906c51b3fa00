"""The Tune trainable: one trial's trainer run inside a Ray worker, under a memory cap."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune import Checkpoint

from sweeper.spec import SweepSpec
from sweeper.trials import trial_config
from trainer.config import TrainerConfig


def run_trial(config: dict[str, Any], spec: SweepSpec) -> None:
    """One Tune trial: one trainer run, reported to Tune at each evaluation.

    Each report carries the evaluation's metrics (what ASHA and Optuna judge) and
    ``history``, the per-step train metrics since the last report, which the driver's
    MLflow logger writes as curves. A checkpoint goes with every report, so a restored
    or retried trial continues from its last evaluation; one restored at its end (the
    driver was stopped as it finished) only reports its final evaluation again.
    """
    import torch

    cfg = trial_config(spec, config)
    torch.set_num_threads(max(1, int(spec.resources.cpu)))
    limit = spec.resources.memory_gb
    cap = limit if not spec.resources.gpu else None  # CUDA maps far more than it uses
    try:
        with memory_cap(cap), tempfile.TemporaryDirectory(prefix="sweeper-trial-") as tmp:
            _run_trial(cfg, Path(tmp))
    except (MemoryError, RuntimeError) as e:
        oom = _out_of_memory(e, limit)
        if oom is e:
            raise
        raise oom from e


class TrialOutOfMemory(RuntimeError):
    """The trial ran out of memory: its ``resources.memory_gb`` cap, the host's or the GPU's."""


def _out_of_memory(e: BaseException, limit_gb: float | None) -> BaseException:
    """A clear reason for an allocation failure; any other error is returned as it is."""
    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    gpu = type(e).__name__ == "OutOfMemoryError"  # torch.cuda.OutOfMemoryError
    cpu = isinstance(e, MemoryError) or "can't allocate memory" in text
    if gpu:
        return TrialOutOfMemory(
            f"out of GPU memory ({text}); lower batch_size or token_expansion, "
            "or give each trial more of a GPU (resources.gpu)"
        )
    if cpu:
        cap = f"its cap resources.memory_gb={limit_gb:g}" if limit_gb else "the host's memory"
        return TrialOutOfMemory(f"out of memory: the trial needed more than {cap} ({text})")
    return e


@contextlib.contextmanager
def memory_cap(limit_gb: float | None):
    """Cap the trial's memory growth at ``limit_gb`` over what its worker holds now.

    The cap is an address-space limit (``RLIMIT_AS``) on the worker process, so an
    allocation past it fails at once (``MemoryError``, or torch's "can't allocate
    memory") instead of the host swapping or the kernel's OOM killer picking a victim.
    It is lifted again when the trial ends: Tune reuses worker processes.
    """
    if not limit_gb:
        yield
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * resource.getpagesize()
    cap = size + int(limit_gb * 2**30)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _run_trial(cfg: TrainerConfig, work: Path) -> None:
    from trainer import train

    restored = tune.get_checkpoint()
    if restored is not None:
        restored.to_directory(str(work / "checkpoint"))
    history: list[tuple[int, dict[str, float]]] = []
    first: list[int] = []  # the first step this process trains: a resumed trial's is past 1

    def report(step: int, metrics: dict[str, float]) -> None:
        first[:] = first or [step]
        history.append((step, {k: v for k, v in metrics.items() if k.startswith("train/")}))
        if not any(k.startswith("val/") for k in metrics):
            return
        ckpt = None
        if (work / "checkpoint").is_dir():
            ckpt = Checkpoint.from_directory(str(work / "checkpoint"))
        node = ray.get_runtime_context().get_node_id()
        tune.report(
            {
                "step": step,
                **metrics,
                "history": list(history),
                "node_id": node,
                "resumed_from_step": max(0, first[0] - 1),  # step 0: a fresh start
            },
            checkpoint=ckpt,
        )
        history.clear()

    train(cfg, report, checkpoint_dir=work)
