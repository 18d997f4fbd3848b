"""Deployment artefacts: the Ray job entry point (`deploy/ray/`), and beside it the Helm chart,
the container image and the Grafana dashboards (plain files, no Python)."""
