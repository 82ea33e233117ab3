"""The fleet's deployments as Prefect objects: `spark flows deploy --env ENV` creates them on the work pools of the
fleet's server (`primespark.orchestration.deploy`); `spark flows serve --env ENV` serves them from this machine
for a fleet without an orchestration section (a laptop-only setup).

Which deployments exist and where each runs is `primespark.orchestration.placement`'s answer: `backup-<host>`
per plan (the plan's cron), `dr-drill-<host>` per plan (the drill schedule), `maintenance-<repository>` per
repository (the check schedule), all in the fleet's time zone. On a pool, each names its flow by module path
(`flows.backup.backup`): the workers have this project installed, nothing is pulled at run time. `probe-<site>`
(unscheduled) says where a site's flows run and which of its hosts they reach.
Per sync job (the source's site runs it): `sync-<job>` (a full pass; on the job's schedule, if it has one),
`sync-check-<job>` (the full checksum compare, on its check_schedule) and, for a continuous job,
`sync-watch-<job>` (no schedule: one long run that watches the sources; `spark sync watch` runs the same flow in
the foreground).
Per tier boundary: `tier-<tier>-<next>` (a migration pass; on the upper tier's schedule, if it has one).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from prefect import Flow
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron

from flows.agent_task import agent_task
from flows.backup import backup
from flows.dr_drill import dr_drill
from flows.maintenance import maintenance
from flows.probe import probe
from flows.sync import sync, sync_check, sync_watch
from flows.tiers import tier
from primespark.fleet import Fleet
from primespark.orchestration.placement import Planned, planned_deployments

FLOWS: dict[str, Flow[Any, Any]] = {"agent-task": agent_task, "backup": backup, "dr-drill": dr_drill,
                                    "maintenance": maintenance, "probe": probe, "sync": sync,
                                    "sync-check": sync_check, "sync-watch": sync_watch, "tier": tier}
OWNER_TAG = "primespark"
# What a worker starts per run: Prefect's engine, forked by the worker's warm server (primespark.orchestration.
# warmstart: Prefect imported once, not per run), or started cold where there is none; `python` is found on the PATH
# the prefect_worker role gives the worker (its venv's bin first). Without a command, Prefect 3.9's process worker
# starts a workspace supervisor that imports Prefect, resolves pull steps (ours have none: the project is installed)
# and only then execs the engine, which imports Prefect again: about 2 s more per run on a Pi-sized host.
ENGINE_COMMAND = "python -m primespark.orchestration.warmstart run prefect.engine"


def fleet_tag(env: str) -> str:
    """Every deployment of one environment carries it: `spark flows deploy` removes those the fleet lost."""
    return f"fleet:{env}"


def crash_retries_tag(retries: int) -> str:
    """The deployment's retry policy for crashed runs (its worker died), read by the rescheduling automation."""
    return f"crash-retries:{retries}"


# A continuous sync job's watch run is meant to run for ever: after each crash (its worker or host restarted) a new
# run of its deployment starts (the restarting automation), however many crashes it has had. Rescheduling the
# crashed run itself, as for other deployments, stops after `crash_retries` crashes over the run's whole life.
RESTART_TAG = "restart-on-crash"


def crash_retries(fleet: Fleet, planned: Planned) -> int:
    spec = fleet.orchestration
    if spec is None or planned.flow == "sync-watch":  # restarted by a new run instead (RESTART_TAG)
        return 0
    placed = spec.deployments.get(planned.name)
    return placed.crash_retries if placed is not None and placed.crash_retries is not None else spec.crash_retries


def _made(deployment: object) -> RunnerDeployment:
    """`to_deployment` is async-or-sync; called from sync code it returns the deployment itself."""
    assert isinstance(deployment, RunnerDeployment), deployment
    return deployment


def fingerprint(spec: dict[str, Any]) -> str:
    """The deployment's version: equal fingerprints mean nothing to update."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_deployments(fleet: Fleet, env: str, transport: str = "ssh", on_pools: bool | None = None
                      ) -> list[RunnerDeployment]:
    """The fleet's deployments; on its work pools when it has an orchestration section (`on_pools` overrides)."""
    on_pools = fleet.orchestration is not None if on_pools is None else on_pools
    out = []
    for planned in planned_deployments(fleet, env, transport):
        tags = [*planned.tags, OWNER_TAG, fleet_tag(env)]
        if on_pools:
            tags.append(crash_retries_tag(crash_retries(fleet, planned)))
            if planned.flow == "sync-watch":
                tags.append(RESTART_TAG)
        schedules = [Cron(planned.schedule, timezone=fleet.timezone)] if planned.schedule else []
        spec: dict[str, Any] = {
            "name": planned.name, "schedules": schedules,
            "parameters": planned.parameters, "tags": tags, "concurrency_limit": planned.concurrency_limit,
            "description": planned.description, "paused": planned.paused(fleet)}
        if on_pools:
            spec.update(work_pool_name=planned.pool(fleet), work_queue_name=planned.flow,
                        entrypoint_type=EntrypointType.MODULE_PATH, job_variables={"command": ENGINE_COMMAND})
        plain = {k: v for k, v in spec.items() if k != "schedules"}  # a Cron object's text is not stable
        spec["version"] = fingerprint({**plain, "schedule": planned.schedule, "timezone": fleet.timezone,
                                       "flow": planned.flow})
        out.append(_made(FLOWS[planned.flow].to_deployment(**spec)))
    return out
