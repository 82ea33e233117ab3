"""Running a flow in this process (`spark backup now`, `spark drill run`, benchmarks) rather than on a worker."""

from __future__ import annotations

import logging
import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from primespark.errors import UserError
from primespark.fleet import Fleet


def _expected(exc: BaseException | None) -> bool:
    """A UserError, or an error raised because of one (a flow's BackupFailed from a sealed secret store)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


class _NoTracebackForUserErrors(logging.Filter):
    """The command reports an expected failure (a sealed secret store, an unreachable host) in a line or two;
    Prefect's console log would print its traceback too. The run's log in the Prefect UI keeps it: Prefect's
    API handler sits on the run loggers and has the record before the console handler on the root logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and _expected(record.exc_info[1]):
            record.exc_info = None
            record.exc_text = None
        return True


@contextmanager
def in_process_runs() -> Iterator[None]:
    """No flow heartbeats: they feed Prefect's zombie detection for runs that a worker starts; here the caller
    watches the run itself, and Prefect 3.9 stops the heartbeat thread by waiting out its current 1 s sleep,
    up to a second per run. No tracebacks on the console for expected failures."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()
    quiet = _NoTracebackForUserErrors()
    consoles = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    for handler in consoles:
        handler.addFilter(quiet)
    try:
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield
    finally:
        for handler in consoles:
            handler.removeFilter(quiet)


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


def run_here(flow: Any, *args: Any, **kwargs: Any) -> Any:
    """Run `flow` in this process; its result, or a UserError with the run's reason (the flow's own, with its
    fix, when it failed on one)."""
    with in_process_runs():
        state = flow(*args, return_state=True, **kwargs)
    if not state.is_completed():
        reason = state.result(raise_on_failure=False)
        if isinstance(reason, UserError):
            raise reason
        raise UserError(str(reason), "see the run in the Prefect UI for each step")
    return state.result()
