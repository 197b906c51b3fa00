"""`sweeper train`: one training run (no sweep), with a progress bar, optionally in MLflow."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer
import yaml
from pydantic import ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from sweeper.cli.common import _fail, err
from sweeper.cli.display import console


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail([f"--set expects FIELD=VALUE, got {item!r}"])
        out[key.strip()] = yaml.safe_load(value)
    return out


def train(
    config: Annotated[Path, typer.Argument(help="Trainer config YAML (any TrainerConfig field).")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a field: --set reg_constant=0.5")
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(help="Checkpoint folder (default runs/<config name>); resumed if present."),
    ] = None,
    fresh: Annotated[bool, typer.Option(help="Discard an existing checkpoint first.")] = False,
    mlflow: Annotated[bool, typer.Option(help="Log params, curves and weights to MLflow.")] = False,
    experiment: Annotated[str, typer.Option(help="MLflow experiment name.")] = "projector-train",
) -> None:
    """Run one training (no sweep), with a progress bar; optionally tracked in MLflow."""
    from trainer import SourceError, load_config
    from trainer import train as run_training
    from trainer.config import format_validation_error

    try:
        cfg = load_config(config, _parse_overrides(set_ or []))
    except ValidationError as e:
        _fail(format_validation_error(e, f"{config}: "))
    except ValueError as e:
        _fail([str(e)])

    out = output or Path("runs") / config.stem
    if fresh:
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
    elif (out / "checkpoint").exists():
        console.print(f"resuming from the checkpoint in {out} (use --fresh to start over)")

    tracker = None
    if mlflow:
        from sweeper.mlflow_runs import MlflowRun

        tracker = MlflowRun(experiment, run_name=config.stem)
        tracker.log_config(cfg)

    progress = Progress(
        TextColumn("[bold]train[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
    )
    task = progress.add_task("train", total=cfg.max_steps, status="loading model and data")

    def report(step: int, m: dict[str, float]) -> None:
        if tracker is not None:
            tracker(step, m)
        status = {}  # the step-0 evaluation reports val/ metrics only: the bar keeps its text
        if "train/loss_reg" in m:
            lm = f"lm {m['train/loss_lm']:.3f}" if "train/loss_lm" in m else "autoencoder stage"
            status["status"] = f"{lm}  reg {m['train/loss_reg']:.3f}"
        if "val/accuracy" in m:
            probe = (
                f"  val/probe_retained {m['val/probe_retained']:.3f}"
                if "val/probe_retained" in m
                else ""
            )
            progress.console.print(
                f"step {step}: val/accuracy {m['val/accuracy']:.3f}  "
                f"val/loss_lm {m['val/loss_lm']:.3f}  val/loss_reg {m['val/loss_reg']:.3f}{probe}"
            )
        progress.update(task, completed=step, **status)

    status = "FAILED"
    try:
        with progress:
            result = run_training(cfg, report, checkpoint_dir=out)
        status = "FINISHED"
    except SourceError as e:
        _fail([str(e)])
    except (ValueError, FloatingPointError) as e:
        _fail([str(e)])
    except KeyboardInterrupt:
        status = "KILLED"
        err.print(f"interrupted: run the same command to resume from the last checkpoint in {out}")
        raise typer.Exit(130) from None
    finally:
        if tracker is not None:
            if status == "FINISHED":
                tracker.log_artifacts(out / "checkpoint", "checkpoint")
            tracker.end(status)

    table = Table(title=f"{config.stem}: step {result.step}", show_header=False)
    for k, v in sorted(result.metrics.items()):
        if k.startswith(("val/", "test/")):
            table.add_row(k, f"{v:.4f}")
    console.print(table)
    console.print(f"checkpoint: {out / 'checkpoint'}")
    if tracker is not None:
        console.print(
            f"MLflow run {tracker.run_id} in experiment {experiment!r}: run `mlflow ui` here and "
            f"open #/experiments/{tracker.experiment_id}/runs/{tracker.run_id}"
        )
