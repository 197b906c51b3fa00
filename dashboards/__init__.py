"""Per-sweep reports and Grafana dashboards. Not built yet: see the open dashboards issue."""
