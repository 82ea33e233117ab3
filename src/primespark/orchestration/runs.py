"""Running a flow in this process (`spark backup now`, `spark drill run`, benchmarks) rather than on a worker."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from primespark.context import FleetContext
from primespark.errors import UserError
from primespark.fleet import Fleet


@contextmanager
def in_process_runs() -> Iterator[None]:
    """No flow heartbeats: they feed Prefect's zombie detection for runs that a worker starts; here the caller
    watches the run itself, and Prefect 3.9 stops the heartbeat thread by waiting out its current 1 s sleep,
    up to a second per run."""
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def use_lab_prefect(fleet: Fleet) -> None:
    """In the lab, runs go to the lab's Prefect server when it is up (so they show in its UI)."""
    if "PREFECT_API_URL" in os.environ or fleet.lab is None:
        return
    url = f"http://127.0.0.1:{fleet.lab.prefect_port}/api"
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:  # noqa: S310 (loopback)
            if reply.status == 200:
                os.environ["PREFECT_API_URL"] = url
                from primespark.orchestration.api import refresh_prefect_settings

                refresh_prefect_settings()
    except OSError:
        pass


def record_runs(ctx: FleetContext) -> str:
    """Point this process's runs at the fleet's Prefect server (the lab's loopback one for a fleet without an
    orchestration section); where they are recorded, to tell the operator. A server that does not answer is not
    fatal for a run here: Prefect then records it in a temporary local API."""
    if ctx.fleet.orchestration is None:
        use_lab_prefect(ctx.fleet)
        return os.environ.get("PREFECT_API_URL", "a temporary local Prefect API")
    from primespark.orchestration.api import use_fleet_prefect

    try:
        return use_fleet_prefect(ctx)
    except UserError as exc:
        return f"a temporary local Prefect API ({exc.message})"


def run_here(flow: Any, *args: Any, **kwargs: Any) -> Any:
    """Run `flow` in this process; its result, or a UserError with the run's reason."""
    with in_process_runs():
        state = flow(*args, return_state=True, **kwargs)
    if not state.is_completed():
        raise UserError(str(state.result(raise_on_failure=False)), "see the run in the Prefect UI for each step")
    return state.result()
