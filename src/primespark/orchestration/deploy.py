"""`spark flows deploy`: the fleet's work pools, queues, deployments and automations on its Prefect server, made
to match the fleet (idempotent: a second run changes nothing; what the fleet lost is removed).

- A `process` work pool per site with a worker (`spark-<site>`), and in each the queues `backup`, `maintenance`,
  `dr-drill` (in that priority: a backup never waits behind a drill).
- Every deployment of `placement.planned_deployments` on its pool, its flow named by module path (the workers
  have the project installed), with the fleet's schedules. Its version is a fingerprint of what we set, so an
  unchanged deployment is left alone.
- Two automations per fleet, Prefect's own answer to runs whose worker died (PrefectHQ/prefect#16746): a run
  of the fleet's deployments that sends no heartbeat for two intervals is marked Crashed (which ends its
  deployment's concurrency slot; its repository lock's lease runs out on its own), and a Crashed run is
  scheduled again while its run count is within the deployment's `crash-retries:N` tag.
- One global concurrency limit per repository (the writer locks), so they show in the UI before first use.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from primespark.context import FleetContext
from primespark.orchestration.placement import QUEUES, planned_deployments, pools

AUTOMATION_PREFIX = "spark"
TERMINAL_EVENTS = ("prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                   "prefect.flow-run.Crashed")


@dataclass
class DeployReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated or self.removed)

    def add(self, verdict: str, what: str) -> None:
        getattr(self, verdict).append(what)


def _canonical(data: Any) -> Any:
    """Sets dump as lists in hash order, which differs between processes: sort them."""
    if isinstance(data, dict):
        return {k: _canonical(v) for k, v in data.items()}
    if isinstance(data, list):
        items = [_canonical(v) for v in data]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True, default=str))
    return data


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(_canonical(data), sort_keys=True, default=str).encode()).hexdigest()[:16]


def ensure_pools(client: Any, ctx: FleetContext, report: DeployReport) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    for pool, site in pools(ctx.fleet).items():
        description = f"Flows of site {site}'s hosts (fleet {ctx.fleet.name}), run by its worker"
        try:
            existing = client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=pool, type="process", description=description,
                base_job_template=ProcessWorker.get_default_base_job_template()))
            report.add("created", f"work pool {pool}")
        else:
            if existing.type != "process":
                from primespark.errors import UserError

                raise UserError(f"work pool {pool} on the server is of type {existing.type}, not process",
                                f"delete it (`prefect work-pool delete {pool}`) and deploy again")
            if existing.description != description:
                client.update_work_pool(pool, WorkPoolUpdate(description=description))
                report.add("updated", f"work pool {pool}")
            else:
                report.add("unchanged", f"work pool {pool}")
        _ensure_queues(client, pool, report)


def _ensure_queues(client: Any, pool: str, report: DeployReport) -> None:
    from prefect.exceptions import ObjectNotFound

    for queue, priority in QUEUES.items():
        description = f"{queue} runs; priority {priority} (1 first)"
        try:
            existing = client.read_work_queue_by_name(queue, work_pool_name=pool)
        except ObjectNotFound:
            client.create_work_queue(queue, description=description, priority=priority, work_pool_name=pool)
            report.add("created", f"queue {pool}/{queue}")
            continue
        if existing.priority != priority or existing.description != description:
            client.update_work_queue(existing.id, priority=priority, description=description)
            report.add("updated", f"queue {pool}/{queue}")
        else:
            report.add("unchanged", f"queue {pool}/{queue}")


def ensure_deployments(client: Any, ctx: FleetContext, report: DeployReport) -> None:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags
    from prefect.exceptions import ObjectNotFound

    from flows.deployments import build_deployments, fleet_tag

    wanted = build_deployments(ctx.fleet, ctx.env, on_pools=True)
    for deployment in wanted:
        try:
            existing = client.read_deployment_by_name(deployment.full_name)
        except ObjectNotFound:
            deployment.apply()
            report.add("created", f"deployment {deployment.name}")
            continue
        same = (existing.version == deployment.version and existing.work_pool_name == deployment.work_pool_name
                and existing.paused == deployment.paused)
        if same:
            report.add("unchanged", f"deployment {deployment.name}")
        else:
            deployment.apply()
            report.add("updated", f"deployment {deployment.name}")
    names = {d.name for d in wanted}
    ours = client.read_deployments(deployment_filter=DeploymentFilter(
        tags=DeploymentFilterTags(all_=[fleet_tag(ctx.env)])))
    for stale in ours:
        if stale.name not in names:
            client.delete_deployment(stale.id)
            report.add("removed", f"deployment {stale.name}")


def automations(ctx: FleetContext) -> list[Any]:
    """The fleet's automations for runs whose worker died (what `ensure_automations` makes)."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    from flows.deployments import build_deployments, crash_retries_tag, fleet_tag

    spec = ctx.fleet.orchestration
    assert spec is not None
    ours = {"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{fleet_tag(ctx.env)}"}
    silence = 2 * spec.heartbeat_seconds
    out = [AutomationCore(
        name=f"{AUTOMATION_PREFIX} {ctx.env}: crash runs without heartbeats",
        description=f"A run of fleet {ctx.env}'s deployments that sent no heartbeat for {silence} s (two intervals) "
                    "lost its worker: marked Crashed, which frees its deployment's concurrency slot.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.heartbeat", *TERMINAL_EVENTS},
            match={"prefect.resource.id": "prefect.flow-run.*"}, match_related=ours,
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=silence)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {silence} s: its worker or its host died")])]
    policies = sorted({tag.removeprefix("crash-retries:") for d in build_deployments(ctx.fleet, ctx.env)
                       for tag in d.tags if tag.startswith("crash-retries:")}, key=int)
    for retries in (int(p) for p in policies if int(p) > 0):
        out.append(AutomationCore(
            name=f"{AUTOMATION_PREFIX} {ctx.env}: reschedule crashed runs ({crash_retries_tag(retries)})",
            description=f"A crashed run of a deployment tagged {crash_retries_tag(retries)} is scheduled again, "
                        f"up to {retries} time(s): its worker (or the next one to come back) runs it.",
            trigger=EventTrigger(
                expect={"prefect.flow-run.Crashed"},
                match={"prefect.resource.id": "prefect.flow-run.*",
                       "prefect.run-count": [str(n) for n in range(1, retries + 1)]},
                match_related={"prefect.resource.role": "tag",
                               "prefect.resource.id": f"prefect.tag.{crash_retries_tag(retries)}"},
                posture=Posture.Reactive, threshold=1, within=timedelta(0)),
            actions=[ChangeFlowRunState(state=StateType.SCHEDULED, name="AwaitingRetry",
                                        message=f"rescheduled after a crash ({crash_retries_tag(retries)})")]))
    return out


def ensure_automations(client: Any, ctx: FleetContext, report: DeployReport) -> None:
    from prefect.events.schemas.automations import AutomationCore

    from flows.deployments import fleet_tag

    prefix = f"{AUTOMATION_PREFIX} {ctx.env}:"
    wanted = {}
    for automation in automations(ctx):
        data = automation.model_dump(mode="json", exclude={"tags"})
        for trigger_field in ("id",):
            data["trigger"].pop(trigger_field, None)
        wanted[automation.name] = AutomationCore.model_validate(
            {**automation.model_dump(), "tags": [fleet_tag(ctx.env), f"spec:{_digest(data)}"]})
    existing = {a.name: a for a in client.read_automations() if a.name.startswith(prefix)}
    for name, automation in wanted.items():
        found = existing.get(name)
        if found is None:
            client.create_automation(automation)
            report.add("created", f"automation {name!r}")
        elif sorted(found.tags) != sorted(automation.tags) or not found.enabled:
            client.update_automation(found.id, automation)
            report.add("updated", f"automation {name!r}")
        else:
            report.add("unchanged", f"automation {name!r}")
    for name, stale in existing.items():
        if name not in wanted:
            client.delete_automation(stale.id)
            report.add("removed", f"automation {name!r}")


def ensure_locks(client: Any, ctx: FleetContext, report: DeployReport) -> None:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    from primespark.orchestration.locks import repository_lock

    repositories = ctx.fleet.backup.repositories if ctx.fleet.backup else {}
    for name in repositories:
        lock = repository_lock(name)
        try:
            client.read_global_concurrency_limit_by_name(lock)
            report.add("unchanged", f"lock {lock}")
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=lock, limit=1))
            report.add("created", f"lock {lock}")


def deploy(ctx: FleetContext) -> DeployReport:
    """Make the server match the fleet. The caller has pointed Prefect at the server (`api.use_fleet_prefect`)."""
    from prefect.client.orchestration import get_client

    report = DeployReport()
    with get_client(sync_client=True) as client:
        ensure_pools(client, ctx, report)
        ensure_locks(client, ctx, report)
        ensure_deployments(client, ctx, report)
        ensure_automations(client, ctx, report)
    return report


def planned_names(ctx: FleetContext) -> list[str]:
    return [d.name for d in planned_deployments(ctx.fleet, ctx.env)]
