"""Running a flow in this process (`spark backup now`, `spark drill run`, benchmarks) rather than on a worker."""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from primespark.context import FleetContext
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


class RunStillWanted:
    """Whether the server still wants the flow run this thread runs, asked every `every` seconds in a thread of its
    own (a slow server never holds up the run): no once it holds the run Cancelling (cancelled from the UI, which
    a run started outside a worker would not otherwise hear of) or in a final state (Crashed by the heartbeat
    automation while this process had lost touch with it, and a replacement may be starting). A server that does
    not answer stops nothing. For runs meant to go on until stopped (a continuous job's watch)."""

    def __init__(self, every: float) -> None:
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        self.run_id = context.flow_run.id if context is not None and context.flow_run is not None else None
        self.every = every
        self.unwanted: str | None = None  # the state's name, once the run is not wanted
        self._closed = threading.Event()
        # in the run's context: the settings it was started with (the server's URL) are the ones asked
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._ask,),
                                        name="run-still-wanted", daemon=True)
        if self.run_id is not None:
            self._thread.start()

    def _ask(self) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.objects import StateType

        while not self._closed.wait(self.every):
            try:
                with get_client(sync_client=True) as client:
                    state = client.read_flow_run(self.run_id).state  # type: ignore[arg-type]
            except Exception as exc:  # unreachable, refused, timed out: the run goes on, and it is asked again later
                logging.getLogger(__name__).debug("could not ask the server about run %s: %s", self.run_id, exc)
                continue
            if state is not None and (state.is_final() or state.type == StateType.CANCELLING):
                self.unwanted = state.name
                return

    def close(self) -> None:
        self._closed.set()

    def final_state(self, result: Any) -> Any:
        """What the flow returns: `result`, or once the run was not wanted a Cancelled state (the run ends
        Cancelled: a run started here has no worker to mark it so, and a run the server marked Crashed must not
        turn Completed behind its replacement)."""
        if self.unwanted is None:
            return result
        from prefect.states import Cancelled

        return Cancelled(message=f"stopped: the server held it {self.unwanted}", data=result)


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


def require_prefect(fleet: Fleet) -> None:
    """The Prefect server that runs will report to answers, or a clear error saying where it was looked for. No
    server configured: Prefect starts a throwaway one for the run itself."""
    from prefect.settings import PREFECT_API_URL

    from primespark.orchestration.api import check_health, refresh_prefect_settings

    # The environment first: Prefect read its settings when it was imported, perhaps before the variable was set.
    url = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if not url:
        return
    source = "PREFECT_API_URL in the environment" if "PREFECT_API_URL" in os.environ else "the Prefect profile"
    lab = f"start the lab's with `spark lab up --env {fleet.name}`" if fleet.lab is not None else "start it"
    check_health(url.rstrip("/"), source, f"{lab}, or unset PREFECT_API_URL to run with a throwaway local server")
    if "PREFECT_API_URL" in os.environ:
        refresh_prefect_settings()


def record_runs(ctx: FleetContext) -> str:
    """Point this process's runs at the fleet's Prefect server (the lab's loopback one for a fleet without an
    orchestration section); where they are recorded, to tell the operator. A configured server that does not
    answer stops the run with the reason: the repositories' writer locks live on that server, and a run recorded
    elsewhere would neither hold them nor show in the UI."""
    if ctx.fleet.orchestration is None:
        use_lab_prefect(ctx.fleet)
        require_prefect(ctx.fleet)
        return os.environ.get("PREFECT_API_URL", "a temporary local Prefect API")
    from primespark.orchestration.api import use_fleet_prefect

    return use_fleet_prefect(ctx)


def run_here(flow: Any, *args: Any, **kwargs: Any) -> Any:
    """Run `flow` in this process; its result, or a UserError with the run's reason (the flow's own, with its
    fix, when it failed on one)."""
    with in_process_runs():
        state = flow(*args, return_state=True, **kwargs)
    if state.is_cancelled():  # from the Prefect UI, say: the run's own message says what stopped
        raise UserError(f"the run was cancelled ({state.message or 'no reason given'})",
                        "see the run in the Prefect UI")
    if not state.is_completed():
        reason = state.result(raise_on_failure=False)
        if isinstance(reason, UserError):  # an expected failure: its own message and fix
            raise reason
        raise UserError(str(reason), "see the run in the Prefect UI for each step")
    return state.result()
