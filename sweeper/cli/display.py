"""What the CLI shows of a sweep: the trial table, progress lines, the outcome, live views."""

from __future__ import annotations

import sys
import time
from collections import Counter

import typer
from rich.console import Console
from rich.table import Table

from sweeper.cli.common import _fail
from sweeper.cli.remote import _remote_state
from sweeper.states import TRIAL_ENDED

# Pipes and CI logs get 200 columns, not rich's 80, so the trial table is not cut (a
# sweep of five searched fields with the probe needs about 160).
LOG_WIDTH = 200
console = Console(width=None if sys.stdout.isatty() else LOG_WIDTH)

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
    starts, ends or is retried: elapsed time, trials ended of the total (and, once one has
    ended while shown, the time left at the pace so far), and the trial's configuration
    and figures."""

    def __init__(self, state: dict, total: int | None = None):
        self.total = total
        self.live = None
        # Trials already known (a resumed or followed sweep) are not announced again.
        self.seen = {tid: row.get("status") for tid, row in state.get("trials", {}).items()}
        self.ended0 = sum(s in TRIAL_ENDED for s in self.seen.values())
        # the most trials seen running at once: the sweep's parallelism
        self.peak = sum(s == "running" for s in self.seen.values())
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
        trials = state.get("trials", {})
        ended = sum(r.get("status") in TRIAL_ENDED for r in trials.values())
        running = sum(r.get("status") == "running" for r in trials.values())
        self.peak = max(self.peak, running)
        if self.live is not None:
            title = _summary(state) + self.left(ended, time.monotonic() - self.t0, running)
            self.live.update(trials_table(state, title=title))
            return
        for tid, row in trials.items():
            status = row.get("status")
            if self.seen.get(tid) == status:
                continue
            self.seen[tid] = status
            # markup=False: an error's text ("[enforce fail at ...]") is printed as it is.
            text = self.line(tid, row, ended, running)
            console.print(text, markup=False, highlight=False, soft_wrap=True)

    def line(self, tid: str, row: dict, ended: int, running: int = 0) -> str:
        secs = int(time.monotonic() - self.t0)
        clock = f"{secs // 3600}:{secs // 60 % 60:02d}:{secs % 60:02d}"
        of = f"{ended}/{self.total}" if self.total else str(ended)
        short = {"reg_constant": "λ", "token_expansion": "k"}
        conf = ", ".join(
            f"{short.get(k, k)}={_fmt(v)}" for k, v in (row.get("params") or {}).items()
        )
        of += f" ended{self.left(ended, secs, running)}"
        text = f"[{clock}] {of} | trial {tid} {row.get('status')}: {conf}"
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

    def left(self, ended: int, secs: float, running: int = 0) -> str:
        """The time the trials not yet ended would take at the pace of those that ended
        while shown (a resumed sweep's earlier ones are not counted); empty until as many
        have ended as run at once (a first end among parallel trials is no pace yet, even
        when its successor has not started and only the other one shows as running)."""
        done = ended - self.ended0
        if not self.total or done < max(1, running, self.peak) or ended >= self.total:
            return ""
        mins = round(secs / done * (self.total - ended) / 60)
        if mins < 1:
            return " (under 1 min left at this pace)"
        hours = f"{mins // 60} h " if mins >= 60 else ""
        return f" (about {hours}{mins % 60} min left at this pace)"


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
