"""Running a flow in this process (`spark backup now`, `spark drill run`, benchmarks) rather than on a worker."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

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
    except OSError:
        pass


def require_prefect(fleet: Fleet) -> None:
    """The Prefect server that runs will report to answers, or a clear error saying where it was looked for (not
    forty lines of connection traceback from inside the first run). No server configured: Prefect starts a
    throwaway one for the run itself."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return
    source = "PREFECT_API_URL in the environment" if "PREFECT_API_URL" in os.environ else "the Prefect profile"
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=5) as reply:  # noqa: S310 (the operator's URL)
            if reply.status == 200:
                return
            problem = f"it answered HTTP {reply.status}"
    except OSError as exc:
        problem = str(getattr(exc, "reason", None) or exc)
    lab = (f"start the lab's with `spark lab up --env {fleet.name}`, or " if fleet.lab is not None else "start it, or ")
    raise UserError(f"the Prefect server at {url} (from {source}) is unreachable: {problem}",
                    f"{lab}unset PREFECT_API_URL to run with a throwaway local server")


def run_here(flow: Any, *args: Any, **kwargs: Any) -> Any:
    """Run `flow` in this process; its result, or a UserError with the run's reason."""
    with in_process_runs():
        state = flow(*args, return_state=True, **kwargs)
    if not state.is_completed():
        reason = state.result(raise_on_failure=False)
        if isinstance(reason, UserError):  # an expected failure: its own message and fix
            raise reason
        raise UserError(str(reason), "see the run in the Prefect UI for each step")
    return state.result()
