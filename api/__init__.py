"""The sweep service: FastAPI over a database of sweeps, one driver process per sweep."""
