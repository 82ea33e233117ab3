"""`--on-worker`: a deployment's run submitted to its work pool (as the UI's Run button does), then followed to
its end: which worker took it (its host and pid), the state it ended in, its result."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from primespark.errors import UserError

POLL_SECONDS = 1.0


@dataclass
class WorkerRun:
    deployment: str
    flow_run_id: UUID
    flow_run_name: str
    pool: str | None
    worker_host: str | None  # the worker that took it (`worker_of`)
    state: str
    message: str

    @property
    def completed(self) -> bool:
        return self.state == "Completed"


def submit(flow: str, deployment: str, parameters: dict[str, Any] | None = None) -> Any:
    """A new run of `<flow>/<deployment>` on its pool; the flow run (not waited for). A pool without a worker
    online is refused: the run would wait for one, and so would the operator."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            pool = client.read_deployment_by_name(f"{flow}/{deployment}").work_pool_name
            status = client.read_work_pool(pool).status if pool else None
    except ObjectNotFound:
        raise UserError(f"no deployment {flow}/{deployment} on the Prefect server",
                        "create the fleet's deployments first: `spark flows deploy --env ENV`") from None
    if pool is None or status is None or status.value != "READY":
        raise UserError(f"work pool {pool} has no worker online ({status.value if status else 'no pool'}), so "
                        f"nothing would run {deployment}", "start its worker (site.yml's prefect_worker play); "
                        "`spark flows status` shows each pool")
    return run_deployment(f"{flow}/{deployment}", parameters=parameters or {}, timeout=0, as_subflow=False)


WORKER_LABEL = "prefect.worker.name"  # the label a Prefect worker gives each run it takes


def worker_of(run: Any) -> str | None:
    """The worker that took a flow run: its name, which is its host's (the prefect_worker role names it so).
    Prefect 3's process worker records only a pid as the run's infrastructure pid, not the host."""
    name = (run.labels or {}).get(WORKER_LABEL)
    return str(name) if name else None


def follow(flow_run_id: UUID, deployment: str, said: Callable[[str], None] = lambda _: None,
           timeout: float | None = None) -> WorkerRun:
    """Wait for the run's end (polling the API), saying when a worker takes it."""
    from prefect.client.orchestration import get_client

    deadline = None if timeout is None else time.monotonic() + timeout
    announced = False
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            host = worker_of(run)
            if host and not announced:
                said(f"{run.name} runs on the worker at {host} (pool {run.work_pool_name})")
                announced = True
            state = run.state
            if state is not None and state.is_final():
                return WorkerRun(deployment, run.id, run.name, run.work_pool_name, host,
                                 state.name or str(state.type.value), state.message or "")
            if deadline is not None and time.monotonic() > deadline:
                return WorkerRun(deployment, run.id, run.name, run.work_pool_name, host,
                                 (state.name if state else None) or "unknown", "still running when the wait ended")
            time.sleep(POLL_SECONDS)


# Prefect's worker ends a run Crashed with this message when it could not hand the run to its process (the API
# answered 503 while its SQLite database was locked, prefect#18934): the flow never started, so running it again
# repeats nothing.
NOT_STARTED = "Failed to submit flow run to infrastructure"
SUBMIT_ATTEMPTS = 3


def never_started(run: WorkerRun) -> bool:
    return run.state == "Crashed" and run.message.startswith(NOT_STARTED)


def run_on_worker(flow: str, deployment: str, parameters: dict[str, Any] | None = None,
                  said: Callable[[str], None] = lambda _: None) -> WorkerRun:
    """Submit the deployment's run and follow it to its end; a run the worker could not start is submitted again
    (SUBMIT_ATTEMPTS in all), saying so. Any other end, failed or not, is the answer."""
    attempt = 1
    while True:
        flow_run = submit(flow, deployment, parameters)
        said(f"submitted {flow_run.name} ({deployment}) to pool {flow_run.work_pool_name}")
        done = follow(flow_run.id, deployment, said)
        if not never_started(done) or attempt == SUBMIT_ATTEMPTS:
            return done
        said(f"{done.flow_run_name} never started ({done.message[:200]}): submitting it again")
        attempt += 1
