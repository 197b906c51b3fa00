"""Sweeps run here (or on --server): submit, resume, cancel, status, list."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from sweeper.cli.common import _fail
from sweeper.cli.display import _Display, _print_outcome, _summary, _watch, console, trials_table
from sweeper.cli.remote import Server, _client, _remote, _remote_state
from sweeper.states import TRIAL_UNFINISHED


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
    from sweeper.spec_parse import SpecError, load_spec

    try:
        return load_spec(path)
    except SpecError as e:
        _fail(e.lines(f"{path}: "))


def _open_or_fail(sweep_id: str):
    from sweeper.store import SweepRecord

    try:
        return SweepRecord.open(sweep_id)
    except KeyError as e:
        _fail([str(e.args[0])])


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
