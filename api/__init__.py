"""The sweep service (FastAPI). Not built yet: see the open issue for the service."""
