"""The `sweeper` command line."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from sweeper.states import TRIAL_ENDED, TRIAL_UNFINISHED

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Hyperparameter sweeps for multimodal-LLM projector regularisation research.",
)
# Pipes and CI logs get 200 columns, not rich's 80, so the trial table is not cut (a
# sweep of five searched fields with the probe needs about 160).
LOG_WIDTH = 200
console = Console(width=None if sys.stdout.isatty() else LOG_WIDTH)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


@app.callback()
def _main() -> None:
    """Hyperparameter sweeps for multimodal-LLM projector regularisation research."""


def _fail(lines: list[str]) -> None:
    for line in lines:
        err.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail([f"--set expects FIELD=VALUE, got {item!r}"])
        out[key.strip()] = yaml.safe_load(value)
    return out


@app.command()
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
        from sweeper.tracking import MlflowRun

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
        lm = f"lm {m['train/loss_lm']:.3f}" if "train/loss_lm" in m else "autoencoder stage"
        status = f"{lm}  reg {m['train/loss_reg']:.3f}"
        if "val/accuracy" in m:
            progress.console.print(
                f"step {step}: val/accuracy {m['val/accuracy']:.3f}  "
                f"val/loss_lm {m['val/loss_lm']:.3f}  val/loss_reg {m['val/loss_reg']:.3f}"
            )
        progress.update(task, completed=step, status=status)

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
        if k.startswith("val/"):
            table.add_row(k, f"{v:.4f}")
    console.print(table)
    console.print(f"checkpoint: {out / 'checkpoint'}")
    if tracker is not None:
        console.print(
            f"MLflow run {tracker.run_id} in experiment {experiment!r}: run `mlflow ui` here and "
            f"open #/experiments/{tracker.experiment_id}/runs/{tracker.run_id}"
        )


# --- sweeps ----------------------------------------------------------------------------

_TRIAL_COLUMNS = ("trial", "state", "λ", "k", "seed", "step", "lm loss", "reg loss", "val acc")


def _fmt(v, spec=".4g") -> str:
    return "" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def trials_table(state: dict, title: str | None = None) -> Table:
    """The trial table: state, λ, k, any other searched field, seed, step, both losses and
    accuracy per trial (and the probe's accuracy when the trainer reports it)."""
    rows = list(state.get("trials", {}).values())
    extra = list(
        dict.fromkeys(
            k
            for row in rows
            for k in (row.get("params") or {})
            if k not in ("reg_constant", "token_expansion")
        )
    )
    probe = any("val/probe_accuracy" in (row.get("metrics") or {}) for row in rows)
    table = Table(title=title)
    cols = [*_TRIAL_COLUMNS[:4], *extra, *_TRIAL_COLUMNS[4:], *(["probe acc"] if probe else [])]
    for col in cols:
        left = col in ("trial", "state", *extra)
        table.add_column(col, justify="left" if left else "right", no_wrap=True)
    colours = {
        "finished": "green",
        "failed": "red",
        "stopped": "yellow",
        "cancelled": "magenta",
        "running": "cyan",
    }
    for row in rows:
        m, st = row.get("metrics") or {}, row["status"]
        params = row.get("params") or {}
        table.add_row(
            row["id"],
            f"[{colours.get(st, 'white')}]{st}[/]",
            _fmt(row.get("reg_constant")),
            _fmt(row.get("token_expansion")),
            *(_fmt(params.get(k)) for k in extra),
            _fmt(row.get("seed")),
            _fmt(row.get("step")),
            _fmt(m.get("train/loss_lm"), ".3f"),
            _fmt(m.get("train/loss_reg"), ".3f"),
            _fmt(m.get("val/accuracy"), ".3f"),
            *([_fmt(m.get("val/probe_accuracy"), ".3f")] if probe else []),
        )
    return table


def _summary(state: dict) -> str:
    counts = Counter(row["status"] for row in state.get("trials", {}).values())
    parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no trials yet"
    return f"sweep {state['id']}: {state['status']} ({parts})"


class _Display:
    """The live trial table on a terminal. Without one (a log file, CI, nohup) rich would
    show the table only once, at the end, so a line is printed instead whenever a trial
    starts, ends or is retried: elapsed time, trials ended of the total, and the trial's
    configuration and figures."""

    def __init__(self, state: dict, total: int | None = None):
        self.total = total
        self.live = None
        # Trials already known (a resumed or followed sweep) are not announced again.
        self.seen = {tid: row.get("status") for tid, row in state.get("trials", {}).items()}
        self.t0 = time.monotonic()
        if console.is_terminal:
            from rich.live import Live

            self.live = Live(
                trials_table(state, title=_summary(state)), console=console, refresh_per_second=2
            )
        self.state = state

    def __enter__(self) -> _Display:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)
        else:  # the whole table once, at the end, as the live view would have left it
            console.print(trials_table(self.state, title=_summary(self.state)))

    def update(self, state: dict) -> None:
        self.state = state
        if self.live is not None:
            self.live.update(trials_table(state, title=_summary(state)))
            return
        trials = state.get("trials", {})
        ended = sum(r.get("status") in TRIAL_ENDED for r in trials.values())
        for tid, row in trials.items():
            status = row.get("status")
            if self.seen.get(tid) == status:
                continue
            self.seen[tid] = status
            # markup=False: an error's text ("[enforce fail at ...]") is printed as it is.
            text = self.line(tid, row, ended)
            console.print(text, markup=False, highlight=False, soft_wrap=True)

    def line(self, tid: str, row: dict, ended: int) -> str:
        secs = int(time.monotonic() - self.t0)
        clock = f"{secs // 3600}:{secs // 60 % 60:02d}:{secs % 60:02d}"
        of = f"{ended}/{self.total}" if self.total else str(ended)
        short = {"reg_constant": "λ", "token_expansion": "k"}
        conf = ", ".join(
            f"{short.get(k, k)}={_fmt(v)}" for k, v in (row.get("params") or {}).items()
        )
        text = f"[{clock}] {of} ended | trial {tid} {row.get('status')}: {conf}"
        text += f", seed {_fmt(row.get('seed'))}"
        m = row.get("metrics") or {}
        if (
            row.get("status") in ("finished", "stopped", "cancelled")
            and m.get("val/accuracy") is not None
        ):
            text += f" | step {_fmt(row.get('step'))}, val acc {_fmt(m['val/accuracy'], '.3f')}"
            if m.get("val/probe_accuracy") is not None:
                text += f", probe acc {_fmt(m['val/probe_accuracy'], '.3f')}"
        last = (str(row.get("error") or "").strip().splitlines() or [""])[-1]
        if last:
            text += f" | {last}"
        return text


def _print_outcome(state: dict) -> None:
    console.print(_summary(state))
    best = state.get("best")
    if best:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in best["params"].items())
        console.print(
            f"best: {best['metric']} = {best['value']:.4f} (mean of {best['seeds']} seed(s)) "
            f"at {params}"
        )
    for c in (best or {}).get("pareto") or []:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in c["params"].items())
        values = ", ".join(f"{k} = {v:.4f}" for k, v in c["values"].items())
        console.print(f"  Pareto set: {values} at {params}", highlight=False)
    if state.get("error") and state["status"] in ("failed", "interrupted"):
        console.print(f"[red]{state['error']}[/red]", highlight=False)
    ml = state.get("mlflow") or {}
    if ml.get("ui_url"):
        console.print(f"MLflow: {ml['ui_url']}")
    elif ml.get("parent_run_id"):
        console.print(
            f"MLflow: run `mlflow ui` in this folder, open "
            f"#/experiments/{ml['experiment_id']}/runs/{ml['parent_run_id']}"
        )
    if state["status"] == "interrupted":
        console.print(f"resume with: sweeper resume {state['id']}")


def _drive(rec, resume: bool) -> None:
    from sweeper import driver

    try:
        spec = rec.spec()
        total = spec.budget.trials * spec.repeats if spec.budget.trials else None
    except Exception:  # a spec that no longer validates: run_sweep records why it fails
        total = None
    with _Display(rec.read(), total) as live:

        def show(state: dict) -> None:
            live.update(state)

        driver.LISTENERS.append(show)
        try:
            state = driver.run_sweep(rec, resume=resume)
        except KeyboardInterrupt:
            state = rec.update(status="interrupted", pid=None)
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[-1]
            _fail(
                [
                    f"sweep {rec.id} failed: {type(e).__name__}: {first} "
                    f"(traceback in {rec.path / 'error.log'})"
                ]
            )
        finally:
            driver.LISTENERS.remove(show)
        live.update(state)
    console.print()
    _print_outcome(state)
    if state["status"] == "failed":
        raise typer.Exit(1)


def _load_spec_or_fail(path: Path):
    from sweeper.spec import format_spec_errors, load_spec

    try:
        return load_spec(path)
    except ValidationError as e:
        _fail(format_spec_errors(e, f"{path}: "))
    except ValueError as e:
        _fail([str(e)])


def _open_or_fail(sweep_id: str):
    from sweeper.store import SweepRecord

    try:
        return SweepRecord.open(sweep_id)
    except KeyError as e:
        _fail([str(e.args[0])])


# --- the service as a client -------------------------------------------------------------

Server = Annotated[
    str | None,
    typer.Option(
        "--server",
        envvar="SWEEPER_SERVER",
        help="The sweep service's URL (`sweeper serve`); without it, sweeps run here.",
        show_default=False,
    ),
]


def _client(server: str):
    from sweeper.client import SweeperClient

    return SweeperClient(server)


def _remote(call):
    """Run a client call; a service error becomes the CLI's one-line error."""
    from sweeper.client import ServiceError

    try:
        return call()
    except ServiceError as e:
        _fail(e.lines)


def _remote_state(client, sweep_id: str) -> dict:
    sweep = _remote(lambda: client.get(sweep_id))
    trials = _remote(lambda: client.trials(sweep_id))
    return sweep | {"trials": {t["id"]: t for t in trials}}


def _watch(client, sweep_id: str) -> dict:
    """Follow a sweep's events with the live trial table (lines, without a terminal) until
    it ends."""
    from sweeper.client import ServiceError

    state = _remote_state(client, sweep_id)
    spec = state.get("spec") or {}
    trials = (spec.get("budget") or {}).get("trials")
    total = trials * spec.get("repeats", 1) if trials else None
    try:
        with _Display(state, total) as live:
            for kind, data in client.events(sweep_id):
                if kind == "sweep":
                    state["status"] = data["status"]
                    state["best"] = data.get("best")
                elif kind.startswith("trial_"):
                    old = state["trials"].get(data["id"]) or {}
                    if old.get("status") in TRIAL_ENDED and (data.get("status") not in TRIAL_ENDED):
                        continue  # the stream replays past events: keep the newer row
                    state["trials"][data["id"]] = data
                live.update(state)
    except ServiceError as e:
        _fail(e.lines)
    except KeyboardInterrupt:
        console.print(
            f"\nstopped watching; sweep {sweep_id} goes on in the service "
            f"(sweeper status {sweep_id} --server {client.url})"
        )
        raise typer.Exit(130) from None
    return _remote_state(client, sweep_id)


@app.command()
def submit(
    spec: Annotated[Path, typer.Argument(help="Sweep spec, YAML or JSON.")],
    server: Server = None,
    watch: Annotated[
        bool, typer.Option(help="With --server: follow the sweep live until it ends.")
    ] = False,
) -> None:
    """Run a sweep here (local Ray, MLflow's default store) with a live table of trials,
    or with --server queue it in the sweep service.

    Ctrl-C pauses a local sweep; `sweeper resume ID` continues without re-running finished
    trials.
    """
    from sweeper.store import SweepRecord

    if server:
        if not spec.is_file():
            _fail([f"spec file not found: {spec}"])
        ctype = "application/json" if spec.suffix == ".json" else "application/yaml"
        client = _client(server)
        sweep = _remote(lambda: client.submit(spec.read_text(), ctype))
        console.print(f"sweep {sweep['id']}: {sweep['status']} on {client.url}")
        if not watch:
            console.print(f"follow it: sweeper status {sweep['id']} --server {client.url}")
            return
        state = _watch(client, sweep["id"])
        console.print()
        _print_outcome(state)
        if state["status"] == "failed":
            raise typer.Exit(1)
        return
    parsed = _load_spec_or_fail(spec)
    rec = SweepRecord.create(parsed)
    console.print(
        f"sweep {rec.id}: {parsed.budget.trials} configuration(s) x "
        f"{parsed.repeats} seed(s), {parsed.budget.max_concurrent} at a time"
    )
    _drive(rec, resume=False)


@app.command()
def resume(
    sweep_id: Annotated[str, typer.Argument(help="Sweep id (see `sweeper list`).")],
    server: Server = None,
) -> None:
    """Continue an interrupted sweep; finished trials are not run again."""
    if server:
        sweep = _remote(lambda: _client(server).resume(sweep_id))
        console.print(f"sweep {sweep_id}: {sweep['status']} (resumes when a slot is free)")
        return
    rec = _open_or_fail(sweep_id)
    state = rec.read()
    if state["status"] == "running" and _alive(state.get("pid")):
        _fail([f"sweep {sweep_id} is running (driver pid {state['pid']}): nothing to resume"])
    if state["status"] not in ("interrupted", "failed", "running"):
        _fail([f"sweep {sweep_id} is {state['status']}: only interrupted or failed sweeps resume"])
    _drive(rec, resume=True)


@app.command()
def cancel(
    sweep_id: Annotated[str, typer.Argument(help="Sweep id.")],
    server: Server = None,
) -> None:
    """Cancel a sweep: its trials stop within seconds and their MLflow runs end KILLED."""
    if server:
        sweep = _remote(lambda: _client(server).cancel(sweep_id))
        word = "cancelled" if sweep["status"] == "cancelled" else "cancelling"
        console.print(f"sweep {sweep_id}: {word}")
        return
    rec = _open_or_fail(sweep_id)
    state = rec.read()
    if state["status"] == "running" and _alive(state.get("pid")):
        rec.request_cancel()
        console.print(f"sweep {sweep_id}: cancelling (its driver, pid {state['pid']}, stops it)")
    elif state["status"] in ("queued", "interrupted", "running"):
        rec.request_cancel()
        rows = state.get("trials", {})
        for row in rows.values():  # no driver will continue them: cut short for good
            if row.get("status") in TRIAL_UNFINISHED:
                row["status"] = "cancelled"
        rec.update(status="cancelled", trials=rows, pid=None)
        console.print(f"sweep {sweep_id}: cancelled")
    else:
        _fail([f"sweep {sweep_id} is {state['status']}: nothing to cancel"])


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@app.command()
def status(
    sweep_id: Annotated[str, typer.Argument(help="Sweep id.")],
    server: Server = None,
    watch: Annotated[bool, typer.Option(help="With --server: follow it until it ends.")] = False,
) -> None:
    """A sweep's state, best trial and trial table."""
    if server:
        client = _client(server)
        state = _watch(client, sweep_id) if watch else _remote_state(client, sweep_id)
        if not watch:
            console.print(trials_table(state, title=_summary(state)))
        _print_outcome(state)
        return
    state = _open_or_fail(sweep_id).read()
    console.print(trials_table(state, title=_summary(state)))
    _print_outcome(state)


@app.command("list")
def list_sweeps(
    server: Server = None,
    state: Annotated[
        str | None, typer.Option("--status", help="Only sweeps in this state.")
    ] = None,
) -> None:
    """The sweeps in this folder (SWEEPER_HOME, default ./sweeps), or on --server."""
    import time

    from sweeper.store import SweepRecord, home

    table = Table()
    for col in ("id", "status", "trials", "best", "created"):
        table.add_column(col)
    if server:
        page = _remote(lambda: _client(server).list(status=state, limit=500))
        rows = [s | {"n": sum(s["trial_counts"].values())} for s in page["items"]][::-1]
        if not rows:
            console.print(f"no sweeps on {server}")
            return
    else:
        recs = SweepRecord.all()
        rows = [r.read() for r in recs]
        rows = [s | {"n": len(s.get("trials", {}))} for s in rows]
        if state:
            rows = [s for s in rows if s["status"] == state]
        if not rows:
            console.print(f"no sweeps in {home()}")
            return
    for s in rows:
        best = s.get("best")
        table.add_row(
            s["id"],
            s["status"],
            str(s["n"]),
            f"{best['metric']}={best['value']:.4f}" if best else "",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(s["created"])),
        )
    console.print(table)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (SWEEPER_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (SWEEPER_PORT).")] = None,
) -> None:
    """Run the sweep service (REST API; each sweep gets its own driver process)."""
    import logging

    import uvicorn

    from api.app import create_app
    from api.settings import Settings

    settings = Settings()
    host, port = host or settings.host, port or settings.port
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    app_ = create_app(settings)
    console.print(
        f"sweep service on http://{host}:{port} (docs at /docs); database "
        f"{settings.db_url()}; working files in {settings.home.resolve()}"
    )
    uvicorn.run(app_, host=host, port=port, log_level="info")


@app.command()
def report(
    sweep_id: Annotated[str, typer.Argument(help="Sweep id.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder to write into.")] = Path(
        "report"
    ),
    server: Server = None,
    mlflow_ui_url: Annotated[
        str | None,
        typer.Option(envvar="SWEEPER_MLFLOW_UI_URL", help="Link trials into this MLflow UI."),
    ] = None,
) -> None:
    """Write the sweep's report (report.html and a PNG per figure) from its MLflow records."""
    if server:
        _save_remote_report(_client(server), sweep_id, output)
    else:
        from dashboards.data import ReportError
        from dashboards.report import write_report

        ml = {}
        with contextlib.suppress(KeyError):  # not a sweep here: look for it in MLflow anyway
            ml = _open_or_fail_quiet(sweep_id)
        try:
            path = write_report(
                sweep_id,
                output,
                tracking_uri=ml.get("tracking_uri"),
                experiment_id=ml.get("experiment_id"),
                mlflow_ui_url=mlflow_ui_url,
            )
        except ReportError as e:
            _fail([str(e)])
        console.print(f"report: {path} (and {len(list(output.glob('*.png')))} PNGs)")


def _open_or_fail_quiet(sweep_id: str) -> dict:
    from sweeper.store import SweepRecord

    return SweepRecord.open(sweep_id).read().get("mlflow") or {}


def _save_remote_report(client, sweep_id: str, output: Path) -> None:
    import base64
    import re

    text = _remote(lambda: client.report(sweep_id))
    output.mkdir(parents=True, exist_ok=True)
    (output / "report.html").write_text(text)
    pngs = re.findall(r'<figure id="([a-z_]+)"><img [^>]*src="data:image/png;base64,([^"]+)"', text)
    for name, b64 in pngs:
        (output / f"{name}.png").write_bytes(base64.b64decode(b64))
    console.print(f"report: {output / 'report.html'} (and {len(pngs)} PNGs)")


@app.command()
def compare(
    sweep_ids: Annotated[list[str], typer.Argument(help="Two or more sweep ids.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder to write into.")] = Path(
        "compare"
    ),
) -> None:
    """Overlay several sweeps' accuracy vs λ (per k) in one page: compare.html and a PNG."""
    from dashboards.data import ReportError
    from dashboards.report import write_compare

    try:
        path = write_compare(sweep_ids, output)
    except ReportError as e:
        _fail([str(e)])
    console.print(f"comparison: {path}")
