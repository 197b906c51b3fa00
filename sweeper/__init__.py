"""Sweeps over the trainer: spec, search, driver, MLflow glue and the `sweeper` CLI."""
