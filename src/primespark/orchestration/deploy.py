"""`spark flows deploy`: the fleet's work pools, queues, deployments and automations on its Prefect server, made
to match the fleet (idempotent: a second run changes nothing; what the fleet lost is removed).

- A `process` work pool per site with a worker (`spark-<site>`), and in each the queues `backup`, `maintenance`,
  `dr-drill` (in that priority: a backup never waits behind a drill).
- Every deployment of `placement.planned_deployments` on its pool, its flow named by module path (the workers
  have the project installed), with the fleet's schedules. Its version is a fingerprint of what we set, so an
  unchanged deployment is left alone.
- Automations, Prefect's own answer to runs whose worker died (PrefectHQ/prefect#16746): a run of the fleet's
  deployments that sends no heartbeat for two intervals is marked Crashed (which ends its deployment's
  concurrency slot; its repository lock's lease runs out on its own), and a Crashed run is scheduled again while
  its run count is within the deployment's `crash-retries:N` tag; a crashed watch run of a continuous sync job
  (tagged `restart-on-crash`) is replaced by a new run of its deployment, after every crash.
- One global concurrency limit per repository (the writer locks), so they show in the UI before first use.
- A run of each continuous sync job's `sync-watch-<job>`, unless one has not ended (`--no-watch`: none). A
  running watch keeps the parameters it started with: after changing the job, cancel its run and deploy again.

Before any of that (`prepare_workers`), the workers get what they open: a worker makes no restic repository (a
worker set up while the NAS volume was not mounted would make an empty one), so deploy is the deliberate act that
does. It adopts the records a worker kept from before, opens every client repository of the backup plans and
their offsite copies from here — made on first use and recorded, as `spark backup now` does — and writes each
worker's records file (its site's records only, 0600, atomically; only when it changed), and the saved mesh
plans (the addresses a cross-site flow dials).
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from primespark.backup import records
from primespark.context import FleetContext
from primespark.errors import UserError
from primespark.hosts import CommandFailed
from primespark.hosts.runner import run_on
from primespark.orchestration.placement import QUEUES, client_repositories, planned_deployments, pools

AUTOMATION_PREFIX = "spark"
RESTART_AFTER_SECONDS = 30  # a crashed watch run's replacement starts this much later (a crash loop stays slow)
TERMINAL_EVENTS = ("prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                   "prefect.flow-run.Crashed")


@dataclass
class DeployReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # left for another time, with the reason
    started: list[str] = field(default_factory=list)  # continuous sync jobs' watch runs

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated or self.removed or self.started)

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
    from prefect.events.actions import ChangeFlowRunState, RunDeployment
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    from flows.deployments import RESTART_TAG, build_deployments, crash_retries_tag, fleet_tag

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
    deployments = build_deployments(ctx.fleet, ctx.env)
    policies = sorted({tag.removeprefix("crash-retries:") for d in deployments
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
    if any(RESTART_TAG in d.tags for d in deployments):
        out.append(AutomationCore(
            name=f"{AUTOMATION_PREFIX} {ctx.env}: restart crashed watch runs",
            description=f"A crashed run of a deployment tagged {RESTART_TAG} (a continuous sync job's watch) is "
                        f"replaced by a new run of its deployment {RESTART_AFTER_SECONDS} s later, after every "
                        "crash: a continuous job keeps running through any number of worker or host restarts.",
            trigger=EventTrigger(
                expect={"prefect.flow-run.Crashed"}, match={"prefect.resource.id": "prefect.flow-run.*"},
                match_related={"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{RESTART_TAG}"},
                posture=Posture.Reactive, threshold=1, within=timedelta(0)),
            # the deployment's own parameters; later, so that a run that crashes at once does not loop at speed
            actions=[RunDeployment(source="inferred", schedule_after=timedelta(seconds=RESTART_AFTER_SECONDS))]))
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


# --- the workers' repository records --------------------------------------------------------------------------


def worker_records_file(ctx: FleetContext, host: str) -> str:
    from primespark.orchestration.material import worker_state_dir

    return f"{worker_state_dir(ctx, host)}/{records.RECORDS_FILE}"


def read_worker_file(ctx: FleetContext, host: str, relative: str) -> str | None:
    """A file of the worker's state directory on `host` as it is, None when there is none."""
    from primespark.orchestration.material import worker_state_dir

    path = shlex.quote(f"{worker_state_dir(ctx, host)}/{relative}")
    head, _, text = run_on(ctx.hosts, host, f"if [ -f {path} ]; then echo present; cat {path}; else echo absent; fi"
                           ).partition("\n")
    return text if head == "present" else None


def read_worker_records(ctx: FleetContext, host: str) -> str | None:
    """The worker's records file on `host` as it is, None when it has none."""
    return read_worker_file(ctx, host, records.RECORDS_FILE)


NO_WORKER = 3  # the exit status of the write when the host has no worker's state directory


def write_worker_file(ctx: FleetContext, host: str, relative: str, text: str) -> bool:
    """Replace a file of the worker's state directory on `host` (0600, root; renamed into place: a flow run reading
    it sees the old or the new one). False when no worker is installed there yet (its role makes the directory)."""
    from primespark.orchestration.material import worker_state_dir

    state = worker_state_dir(ctx, host)
    path = f"{state}/{relative}"
    folder = shlex.quote(path.rsplit("/", 1)[0])
    script = (f"set -e; [ -d {shlex.quote(state)} ] || exit {NO_WORKER}; mkdir -p -m 700 {folder}; "
              f't=$(mktemp {folder}/.spark.XXXXXX); cat > "$t"; chmod 600 "$t"; mv -f "$t" {shlex.quote(path)}')
    try:
        run_on(ctx.hosts, host, script, stdin=text)
    except CommandFailed as exc:
        if exc.returncode == NO_WORKER:
            return False
        raise
    return True


def write_worker_records(ctx: FleetContext, host: str, text: str) -> bool:
    """Replace the worker's records file on `host` (see `write_worker_file`)."""
    return write_worker_file(ctx, host, records.RECORDS_FILE, text)


def adopt_worker_records(ctx: FleetContext, report: DeployReport) -> dict[str, str | None]:
    """Records a worker made itself (before workers got the controller's, a worker made repositories on their first
    use) are adopted here first: the step after must not make again, from here, a repository a worker made while
    its volume is not mounted. A file that cannot be read stops the deploy. Each worker host's file as it was."""
    spec = ctx.fleet.orchestration
    assert spec is not None
    wanted = {records.key(r, c) for r, c in client_repositories(ctx.fleet)}
    present: dict[str, str | None] = {}
    for worker in dict.fromkeys(w.host for w in spec.workers.values()):
        text = present[worker] = read_worker_records(ctx, worker)
        if text is None:
            continue
        theirs = records.parse(text, f"{worker_records_file(ctx, worker)} on {worker}",
                               f"restore it on {worker}, or remove it there if this machine's records "
                               f"({records.records_path(ctx.state_dir)}) name its repositories; then deploy again")
        for added in records.adopt(ctx.state_dir, {k: r for k, r in theirs.items() if k in wanted}):
            report.add("created", f"record of repository {added} (kept by {worker}'s worker)")
    return present


def ensure_repositories(ctx: FleetContext, report: DeployReport) -> list[str]:
    """Every client repository the fleet's deployments open (each plan's repository and its offsite copies),
    opened from here and checked against the records: made on its first use and recorded (the workers make
    none). What could not be opened (a repository missing or replaced, a host unreachable) is returned, one line
    each with its fix; the others go on."""
    from primespark.backup.jobs import open_repository
    from primespark.hosts.runner import on_each

    pairs = {records.key(r, c): (r, c) for r, c in client_repositories(ctx.fleet)}

    def open_one(name: str) -> tuple[str, str]:  # (verdict, what), or ("problem", why)
        repository, client = pairs[name]
        before = records.find(ctx.state_dir, repository, client)
        try:
            opened = open_repository(ctx, repository, client, create=True)
        except UserError as exc:
            return "problem", f"{name}: {exc}"
        assert opened is not None  # create=True
        if opened.created:
            return "created", f"repository {name} (initialised, id {opened.id[:8]})"
        if before is None:
            return "created", f"record of repository {name} (found there, id {opened.id[:8]})"
        return "unchanged", f"repository {name}"

    problems = []
    for verdict, what in on_each(pairs, open_one).values():  # in the pairs' order, whichever finished first
        if verdict == "problem":
            problems.append(what)
        else:
            report.add(verdict, what)
    return problems


def deliver_worker_records(ctx: FleetContext, report: DeployReport, present: dict[str, str | None]) -> None:
    """Each worker's records file, written where it differs from `present` (what the worker holds)."""
    from primespark.orchestration.material import worker_records

    spec = ctx.fleet.orchestration
    assert spec is not None
    for site, worker in spec.workers.items():
        text = worker_records(ctx, site)
        what = f"repository records of {worker.host}'s worker ({site})"
        if present.get(worker.host) == text:
            report.add("unchanged", what)
        elif write_worker_records(ctx, worker.host, text):
            report.add("created" if present.get(worker.host) is None else "updated", what)
        else:
            report.skipped.append(f"{what}: no worker installed there yet (site.yml's prefect_worker play installs "
                                  "it with them)")


def deliver_mesh_plans(ctx: FleetContext, report: DeployReport) -> None:
    """Each worker gets this machine's saved plan of every mesh (addresses and public keys, no secret): a flow that
    crosses sites (a sync job from the edge to the cloud) reaches the other end at its mesh address, which only
    the plan holds. After `spark mesh plan` adds or removes a host, deploy again."""
    from primespark.mesh.plan import state_path

    spec = ctx.fleet.orchestration
    assert spec is not None
    for mesh in ctx.fleet.meshes:
        try:
            text = state_path(ctx.state_dir, mesh).read_text(encoding="utf-8")
        except FileNotFoundError:
            continue  # not planned yet: the cross-site flows say so on the worker, with the fix
        for worker in dict.fromkeys(w.host for w in spec.workers.values()):
            relative, what = f"mesh/{mesh}.json", f"mesh plan {mesh} of {worker}'s worker"
            present = read_worker_file(ctx, worker, relative)
            if present == text:
                report.add("unchanged", what)
            elif write_worker_file(ctx, worker, relative, text):
                report.add("created" if present is None else "updated", what)
            else:
                report.skipped.append(f"{what}: no worker installed there yet")


def prepare_workers(ctx: FleetContext, report: DeployReport) -> list[str]:
    """Before the deployments: adopt the workers' own records, open (first use: make) every repository from here,
    deliver each worker its site's records and the mesh plans. Returns the repositories that could not be opened
    (see `ensure_repositories`): their deployments fail on the workers, closed, until fixed."""
    present = adopt_worker_records(ctx, report)
    problems = ensure_repositories(ctx, report)
    deliver_worker_records(ctx, report, present)
    deliver_mesh_plans(ctx, report)
    return problems


# A watch run that has not ended: Scheduled (AwaitingRetry after a crash too), Pending, Running, Paused, Cancelling.
UNFINISHED = ("SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING")


def _unfinished_runs(client: Any, deployment_id: Any, limit: int | None = None) -> list[Any]:
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    return list(client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType(t) for t in UNFINISHED]))), limit=limit))


def _watch_deployments(client: Any, ctx: FleetContext) -> list[Any]:
    """The continuous sync jobs' `sync-watch-<job>` deployments on the server; one not deployed yet has no runs
    (a lab configured by site.yml alone, before `spark flows deploy`)."""
    from prefect.exceptions import ObjectNotFound

    found = []
    for planned in planned_deployments(ctx.fleet, ctx.env):
        if planned.flow == "sync-watch":
            try:
                found.append(client.read_deployment_by_name(f"{planned.flow}/{planned.name}"))
            except ObjectNotFound:
                continue
    return found


def ensure_watch_runs(client: Any, ctx: FleetContext, report: DeployReport) -> None:
    """One run of each continuous sync job's `sync-watch-<job>` deployment: started unless one has not ended yet
    (queued while its worker is away, or rescheduled after a crash: the automations' AwaitingRetry). A continuous
    job is continuous from its first deploy on, not once someone presses Run."""
    for deployment in _watch_deployments(client, ctx):
        running = _unfinished_runs(client, deployment.id, limit=1)
        if running:
            report.add("unchanged", f"watch run {running[0].name} ({running[0].state_type.value.lower()})")
        else:
            run = client.create_flow_run_from_deployment(deployment.id)
            report.add("started", f"watch run of {deployment.name} ({run.name})")


STOP_WATCHES_SECONDS = 120.0  # a worker kills a cancelled run's process within its polling interval


def stop_watch_runs(client: Any, ctx: FleetContext, timeout: float = STOP_WATCHES_SECONDS) -> list[str]:
    """End every run of the continuous jobs' watches that has not ended, and wait until none is left: one a worker
    has taken is set Cancelling (the worker stops its process; the run sees it too, `RunStillWanted`), one still
    queued is Cancelled. The names of the deployments whose runs were stopped. For work that must have the
    fleet's links to itself: a benchmark, a maintenance window."""
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled, Cancelling

    stopped = []
    for deployment in _watch_deployments(client, ctx):
        runs = _unfinished_runs(client, deployment.id)
        for run in runs:
            if run.state_type in (StateType.PENDING, StateType.RUNNING, StateType.PAUSED):
                client.set_flow_run_state(run.id, Cancelling(), force=True)
            elif run.state_type != StateType.CANCELLING:
                client.set_flow_run_state(run.id, Cancelled(message="its watch was stopped"), force=True)
        if runs:
            stopped.append(deployment)
    deadline = time.monotonic() + timeout
    while left := [r.name for d in stopped for r in _unfinished_runs(client, d.id)]:
        if time.monotonic() >= deadline:
            raise UserError(f"the watch run(s) {', '.join(left)} did not stop within {timeout:.0f} s",
                            "check that their worker is online (`spark flows status`); a run without one stays "
                            "Cancelling until it is set Cancelled in the Prefect UI")
        time.sleep(0.5)
    return [d.name for d in stopped]


@contextmanager
def watches_stopped(ctx: FleetContext) -> Iterator[list[str]]:
    """The continuous jobs' watch runs stopped (`stop_watch_runs`) for the body, and those stopped started again
    after it, also when it fails. The caller has pointed Prefect at the server (`api.use_fleet_prefect`)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        stopped = stop_watch_runs(client, ctx)
    try:
        yield stopped
    finally:
        if stopped:
            with get_client(sync_client=True) as client:
                ensure_watch_runs(client, ctx, DeployReport())


def deploy(ctx: FleetContext, report: DeployReport | None = None, start_watches: bool = True) -> DeployReport:
    """Make the server match the fleet. The caller has pointed Prefect at the server (`api.use_fleet_prefect`)."""
    from prefect.client.orchestration import get_client

    report = report if report is not None else DeployReport()
    with get_client(sync_client=True) as client:
        ensure_pools(client, ctx, report)
        ensure_locks(client, ctx, report)
        ensure_deployments(client, ctx, report)
        ensure_automations(client, ctx, report)
        if start_watches:
            ensure_watch_runs(client, ctx, report)
    return report


def planned_names(ctx: FleetContext) -> list[str]:
    return [d.name for d in planned_deployments(ctx.fleet, ctx.env)]
