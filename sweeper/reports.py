"""The sweep report, bound to the sweep spec: dashboards' builders with ``SweepSpec`` as parser."""

from __future__ import annotations

from pathlib import Path

from dashboards import data as _data
from dashboards import report as _report
from sweeper.spec import SweepSpec

# dashboards reads a parent run's spec.yaml through this (it does not import the sweeper).
READ_SPEC = SweepSpec.model_validate


def load_sweep(
    sweep_id: str, tracking_uri: str | None = None, experiment_id: str | None = None
) -> _data.SweepData:
    """One sweep's parent, spec and trials, read back from MLflow."""
    return _data.load_sweep(sweep_id, tracking_uri, experiment_id, read_spec=READ_SPEC)


def write_report(
    sweep_id: str,
    out: str | Path,
    tracking_uri: str | None = None,
    experiment_id: str | None = None,
    mlflow_ui_url: str | None = None,
    log_to_mlflow: bool = False,
) -> Path:
    """Build the report of one sweep from MLflow into ``out``; returns ``out/report.html``.

    With ``log_to_mlflow`` it is also logged to the sweep's parent run (folder ``report``).
    """
    return _report.write_report(
        sweep_id,
        out,
        tracking_uri,
        experiment_id,
        mlflow_ui_url,
        log_to_mlflow,
        read_spec=READ_SPEC,
    )


def publish(sweep_id: str, out: str | Path, *args, **kwargs) -> Path:
    """:func:`write_report`, logged to the sweep's parent run."""
    return write_report(sweep_id, out, *args, **kwargs, log_to_mlflow=True)


def write_compare(sweep_ids: list[str], out: str | Path, tracking_uri: str | None = None) -> Path:
    """Several sweeps' accuracy vs λ overlaid (a line per sweep and k): ``out/compare.html``."""
    return _report.write_compare(sweep_ids, out, tracking_uri, read_spec=READ_SPEC)
