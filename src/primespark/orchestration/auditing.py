"""The flows' audit hook: `@audited(targets)` under `@flow` makes each run of the flow one audited operation, on
the machine it runs on (a worker keeps its own chain under its state directory, the controller its own).

A wrapper rather than Prefect's state hooks: a destructive run (a sync mirror allowed past its deletion guard)
must refuse before it starts when its record cannot be written, and Prefect's hooks only log their exceptions.
The record carries the run's id and, on a worker, its site and deployment. A run killed outright (the worker's
host lost) leaves no record: the server's crash automation marks the run (docs/workers.md).
"""

from __future__ import annotations

import functools
import inspect
import logging
import socket
from collections.abc import Callable
from typing import Any, TypeVar

from primespark.audit.log import Operation, audit_log, operation, operator
from primespark.context import FleetContext

F = TypeVar("F", bound=Callable[..., Any])
Targets = Callable[[FleetContext, dict[str, Any]], list[str]]


def host(ctx: FleetContext, params: dict[str, Any]) -> list[str]:
    return [str(params["host"])]


def repository_clients(ctx: FleetContext, params: dict[str, Any]) -> list[str]:
    from primespark.backup.repositories import clients_of

    return clients_of(ctx, str(params["repository"]))


def site(ctx: FleetContext, params: dict[str, Any]) -> list[str]:
    from primespark.orchestration.placement import site_hosts

    return site_hosts(ctx.fleet, str(params["site"]))


def sync_links(ctx: FleetContext, params: dict[str, Any]) -> list[str]:
    from primespark.data.sync import links_of

    found = links_of(ctx.fleet, str(params["job"]), params.get("source"))
    return list(dict.fromkeys(h for link in found for h in (link.source, link.destination)))


def mirror_past_guard(params: dict[str, Any]) -> bool:
    """A sync that may delete what an emptied source no longer holds."""
    return bool(params.get("accept_empty_source")) and not params.get("dry_run")


def _runtime() -> tuple[str | None, str | None]:
    """The flow run's id and its deployment's name (None when run here without one)."""
    from prefect.context import FlowRunContext
    from prefect.runtime import deployment

    context = FlowRunContext.get()
    run = context.flow_run if context is not None else None
    if run is None:
        return None, None
    # The run in hand says whether it has a deployment: `deployment.name` alone reads the run from the server first.
    return str(run.id), (str(deployment.name) if run.deployment_id is not None else None)


def _actor(ctx: FleetContext) -> str:
    worker = ctx.settings.worker_site
    return f"worker:{worker}@{socket.gethostname()}" if worker else operator()


def _warn(line: str) -> None:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        get_run_logger().warning("%s", line)
    except MissingContextError:
        logging.getLogger(__name__).warning("%s", line)


def audited(targets: Targets | None = None, destructive: Callable[[dict[str, Any]], bool] | None = None,
            ) -> Callable[[F], F]:
    """Each call of the flow function appends one record: the flow's name, its parameters (secrets HMAC'd),
    `targets` (the hosts it acts on), outcome and duration. `destructive(params)`: refuse when no record can be
    written."""

    def wrap(fn: F) -> F:
        signature = inspect.signature(fn)
        name = fn.__name__.replace("_", "-")

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            params = dict(bound.arguments)
            try:
                ctx: FleetContext | None = FleetContext.load(str(params.get("env", "lab")), "local")
            except Exception:  # the flow loads the same fleet first thing, and fails saying why
                ctx = None
            if ctx is None:
                return fn(*args, **kwargs)
            try:
                hosts = targets(ctx, params) if targets else []
            except Exception:  # an unknown host or job: the flow refuses it with its own error
                hosts = []
            run_id, deployment = _runtime()
            op = Operation(f"flow {name}", ctx.env, hosts, params, _actor(ctx), deployment, run_id)
            with operation(lambda: audit_log(ctx), op, bool(destructive and destructive(params)), _warn):
                return fn(*args, **kwargs)

        # Prefect builds the parameters' schema from the signature: fn's, with its annotations evaluated in fn's
        # module (they are strings there, and would not resolve in this one)
        run.__signature__ = inspect.signature(fn, eval_str=True)  # type: ignore[attr-defined]
        return run  # type: ignore[return-value]  # a function with fn's signature

    return wrap
