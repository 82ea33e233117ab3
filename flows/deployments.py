"""Deployments on the fleet's schedules, served from this machine: `python -m flows.deployments [ENV]`.

One `backup-<host>` per plan (the plan's cron), one `maintenance-<repository>` per primary repository (the
check schedule; it also catches up the offsite copy) and one `dr-drill-<host>` per plan (the drill schedule),
all in the fleet's time zone. They show in the Prefect UI and can be run from there.

Per sync job: `sync-<job>` (a full pass; on the job's schedule, if it has one), `sync-check-<job>` (the full
checksum compare, on its check_schedule) and, for a continuous job, `sync-watch-<job>` (no schedule: one long
run that watches the sources; `spark sync watch` runs the same flow in the foreground).
"""

from __future__ import annotations

import sys

from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from flows.backup import backup
from flows.dr_drill import dr_drill
from flows.maintenance import maintenance
from flows.sync import sync, sync_check, sync_watch
from primespark.fleet import Fleet, load_fleet
from primespark.orchestration.naming import deployment


def _made(deployment: object) -> RunnerDeployment:
    """`to_deployment` is async-or-sync; called from sync code it returns the deployment itself."""
    assert isinstance(deployment, RunnerDeployment), deployment
    return deployment


def build_deployments(fleet: Fleet, env: str, transport: str = "ssh") -> list[RunnerDeployment]:
    return [*_backup_deployments(fleet, env, transport), *_sync_deployments(fleet, env, transport)]


def _sync_deployments(fleet: Fleet, env: str, transport: str) -> list[RunnerDeployment]:
    zone = fleet.timezone
    out: list[RunnerDeployment] = []
    for name, job in (fleet.sync.jobs.items() if fleet.sync else ()):
        common = {"job": name, "env": env, "transport": transport}
        what = f"{job.mode.value} {job.source} to {job.destination}"
        out.append(_made(sync.to_deployment(
            deployment("sync", name), schedules=[Cron(job.schedule, timezone=zone)] if job.schedule else [],
            parameters=common, tags=["sync", name], concurrency_limit=1, description=f"a full pass: {what}")))
        if job.check_schedule:
            out.append(_made(sync_check.to_deployment(
                deployment("sync-check", name), schedules=[Cron(job.check_schedule, timezone=zone)],
                parameters=common, tags=["sync", name], concurrency_limit=1,
                description=f"compare every file (size, XXH3-128) of {what}")))
        if job.continuous:
            out.append(_made(sync_watch.to_deployment(
                deployment("sync-watch", name), parameters=common, tags=["sync", name], concurrency_limit=1,
                description=f"continuously: {what}")))
    return out


def _backup_deployments(fleet: Fleet, env: str, transport: str) -> list[RunnerDeployment]:
    if fleet.backup is None:
        return []
    spec = fleet.backup
    zone = fleet.timezone
    out: list[RunnerDeployment] = []
    for host, plan in spec.plans.items():
        common = {"host": host, "env": env, "transport": transport}
        out.append(_made(backup.to_deployment(
            deployment("backup", host), schedules=[Cron(plan.schedule, timezone=zone)], parameters=common,
            tags=["backup", host, plan.repository], concurrency_limit=1,
            description=f"restic backup of {host} ({', '.join(plan.paths)}) into {plan.repository}")))
        out.append(_made(dr_drill.to_deployment(
            deployment("dr-drill", host), schedules=[Cron(spec.drill.schedule, timezone=zone)], parameters=common,
            tags=["drill", host], concurrency_limit=1,
            description=f"restore {host}'s newest snapshot on {spec.drill.scratch_host}, verify, report")))
    for name, repo in spec.repositories.items():
        if repo.copy_from is None:
            out.append(_made(maintenance.to_deployment(
                deployment("maintenance", name), schedules=[Cron(spec.check.schedule, timezone=zone)],
                parameters={"repository": name, "env": env, "transport": transport},
                tags=["maintenance", name], concurrency_limit=1,
                description=f"offsite copy, forget/prune, check --read-data-subset {spec.check.read_data_subset}")))
    return out


def main(argv: list[str]) -> None:
    from prefect import serve

    env = argv[0] if argv else "lab"
    serve(*build_deployments(load_fleet(env), env), limit=4)


if __name__ == "__main__":
    main(sys.argv[1:])
