"""Prefect flows: one module per flow; `deployments.py` serves them on the fleet's schedules."""
