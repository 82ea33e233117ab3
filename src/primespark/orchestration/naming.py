"""Names of Prefect objects derived from the fleet, so that deployments, workers and the CLI agree."""

from __future__ import annotations


def work_pool(site: str) -> str:
    """The work pool of a site: its worker runs the flows that touch the site's hosts."""
    return f"spark-{site}"


def deployment(flow: str, subject: str) -> str:
    """`backup-pi-1`, `dr-drill-pi-1`, `maintenance-nas-primary`: the flow and what it acts on."""
    return f"{flow}-{subject}"
