"""`maintenance`: per fleet repository — catch up the offsite copy, forget by retention, prune, check
(`--read-data-subset`) every client repository in it, primary and offsite; fail naming what check found."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.backup import copy_offsite
from primespark.backup import jobs
from primespark.backup.repositories import backup_of, clients_of, offsite_of
from primespark.context import FleetContext, Transport
from primespark.errors import StepFailed, UserError
from primespark.monitoring.metrics import check_metrics, publish
from primespark.orchestration import auditing
from primespark.orchestration.auditing import audited
from primespark.orchestration.failures import RunFailed
from primespark.orchestration.locks import hold, repository_lock
from primespark.orchestration.retries import retrying


class MaintenanceFailed(RunFailed):
    pass


@task(name="forget-prune-check", cache_policy=NO_CACHE)
def forget_prune_check(ctx: FleetContext, repository: str, client: str, check: bool,
                       subset: str | None, on_store: bool = False) -> jobs.ClientMaintenance:
    return jobs.maintain_client(ctx, repository, client, check=check, read_data_subset=subset, on_store=on_store)


def maintenance_report(repository: str, outcomes: list[jobs.MaintenanceOutcome], copy_errors: dict[str, str]) -> str:
    lines = [line for out in outcomes for line in out.lines()]
    lines += [f"- `{repository}/{c}`: {e}" for c, e in copy_errors.items()]
    return f"# Maintenance of {repository}\n\n" + "\n".join(lines) + "\n"


def failure_reasons(repository: str, outcomes: list[jobs.MaintenanceOutcome], copy_errors: dict[str, str]) -> list[str]:
    failed = [o for o in outcomes if not o.ok]
    reasons = [f"{o.repository}/{c}: {'; '.join(p)}" for o in failed for c, p in o.problems.items()]
    reasons += [f"{o.repository}/{c}: {e}" for o in failed for c, e in o.errors.items()]
    return reasons + [f"{repository}/{c}: {e}" for c, e in copy_errors.items()]


@flow(name="maintenance", flow_run_name="maintenance-{repository}", log_prints=True)
@audited(auditing.repository_clients)
def maintenance(
    repository: str,
    env: str = "lab",
    transport: Transport = "ssh",
    check: bool = True,
    read_data_subset: str | None = None,
    offsite: bool = True,
    textfile: str | None = None,
    retries: int = 3,
    retry_delay_seconds: float = 30.0,
    check_copies: bool = True,
    on_store: bool = False,
) -> dict[str, Any]:
    """`offsite`: catch up the offsite copies first; `check_copies`: maintain them too (a deployment leaves that
    to each copy's own); `on_store`: open each repository on its own host rather than from the clients."""
    logger = get_run_logger()
    ctx = FleetContext.load(env, transport)
    repositories = backup_of(ctx.fleet).repositories
    if repository not in repositories:
        raise UserError(f"no repository {repository!r} in the fleet", f"use one of: {', '.join(repositories)}")
    offsites = offsite_of(ctx, repository) if offsite else []
    copy_errors: dict[str, str] = {}
    for client in clients_of(ctx, repository) if offsites else []:
        for target in offsites:
            try:
                with hold(repository_lock(target)):
                    copy_offsite.with_options(**retrying(retries, retry_delay_seconds))(
                        ctx, repository, target, client, [])
            except Exception as exc:
                copy_errors[client] = f"offsite copy failed: {exc}"
    outcomes = []
    for name in [repository, *(offsites if check_copies else [])]:
        clients = []
        for client in clients_of(ctx, name):
            with hold(repository_lock(name)):
                clients.append(forget_prune_check(ctx, name, client, check, read_data_subset, on_store))
        outcomes.append(jobs.MaintenanceOutcome.of(name, clients))
    finished = time.time()
    if check:
        for out in outcomes:
            # on the repository's host, whose node exporter serves them
            host = repositories[out.repository].host
            try:
                publish(ctx.hosts, ctx.fleet, host, f"maintenance_{out.repository}",
                        check_metrics(out.repository, out.checked, finished), textfile)
            except StepFailed as exc:
                logger.warning("check metrics of %s not published: %s", out.repository, exc)
    report = maintenance_report(repository, outcomes, copy_errors)
    create_markdown_artifact(report, key=f"maintenance-{repository}", description=f"maintenance of {repository}")
    logger.info(report)
    if reasons := failure_reasons(repository, outcomes, copy_errors):
        raise MaintenanceFailed("maintenance found problems: " + " | ".join(reasons))
    return {"repository": repository, "checked": {o.repository: o.checked for o in outcomes}}
