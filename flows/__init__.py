"""Prefect flows, one module per flow: parameters → FleetContext → one task per core step → publish.
`deployments.py` makes their deployments on the fleet's schedules."""
