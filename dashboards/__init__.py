"""Per-sweep research reports (HTML + PNG) built from MLflow, and Grafana dashboards."""
