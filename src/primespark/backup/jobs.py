"""Backup, offsite copy and maintenance steps, independent of Prefect: the flows wrap each in a task and hold
the repository's lock around it; nothing here takes a lock."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from primespark.backup import manifest, records
from primespark.backup.manifest import BACKUP_TAG, MANIFEST_TAG, run_of, run_tag
from primespark.backup.repositories import (
    backup_of,
    clear_stale_locks,
    clients_of,
    folders_on,
    long_step,
    plan_of,
    repository_folder,
    restic_for,
    restic_on_store,
    start_over_command,
)
from primespark.backup.session import ACCEPT_HINT, BackupRefused, BackupRun, backup_with_manifest
from primespark.context import FleetContext
from primespark.errors import StepFailed
from primespark.restic import CheckFailed, RepositoryLocked, RepositoryNotFound, ResticClient
from primespark.secrets import atomic_write

T = TypeVar("T")


def records_delivered_by(ctx: FleetContext) -> str | None:
    """On a site's worker (the role sets SPARK_WORKER_SITE): the command that delivers its records from the
    controller. A worker makes no repository: one it has no record of is refused (`records`)."""
    return f"spark flows deploy --env {ctx.env}" if ctx.settings.worker_site is not None else None


def open_repository(ctx: FleetContext, repository: str, client: str, *, create: bool,
                    via: str | None = None, restic: ResticClient | None = None) -> records.Opened | None:
    """`client`'s repository in `repository`, checked against this environment's record of it (see `records`):
    made only on its first use (`create`) from the controller, never again once recorded, never on a worker; None
    when it was never made. `restic`: opened another way than from `via` (a worker's, on the repository's own
    host)."""
    restic = restic or restic_for(ctx, repository, client, via=via, create=create)
    return records.open_repository(ctx.state_dir, restic, repository, client, create=create,
                                   where=repository_folder(ctx, repository, client),
                                   start_over=start_over_command(ctx, repository, client),
                                   delivered=records_delivered_by(ctx))


def start_over(ctx: FleetContext, repository: str, clients: list[str]) -> dict[str, records.Opened]:
    """`spark backup init`: forget what was recorded of each client's repository, then make it where there is none
    (or record the one that is there). Never deletes a repository."""
    opened = {}
    for client in clients:
        records.forget(ctx.state_dir, repository, client)
        made = open_repository(ctx, repository, client, create=True)
        assert made is not None  # create=True
        opened[client] = made
    return opened


def prepare(ctx: FleetContext, repository: str, client: str) -> dict[str, object]:
    """Create the repository (and its password) on first use; remove locks left by dead processes."""
    opened = open_repository(ctx, repository, client, create=True)
    assert opened is not None  # create=True
    locks = clear_stale_locks(ctx, repository, client)
    return {"created": opened.created, "stale_locks_removed": [lock.id[:8] for lock in locks.removed],
            "live_locks": [lock.id[:8] for lock in locks.kept_alive],
            "unresolved_locks": [f"{lock.id[:8]} by pid {lock.pid} on {lock.hostname}" for lock in locks.unresolved]}


@dataclass
class Fixed(Generic[T]):
    value: T | None = None
    created: bool = False
    stale_locks_removed: list[str] = field(default_factory=list)


def with_repository_fixes(ctx: FleetContext, repository: str, client: str, action: Callable[[], T]) -> Fixed[T]:
    """Run `action` (one restic write) on the client's repository, checked first against its record (made on its
    first use only); clear stale locks if restic finds it locked, then try again."""
    opened = open_repository(ctx, repository, client, create=True)
    fixed: Fixed[T] = Fixed(created=opened is not None and opened.created)
    for _ in range(3):
        try:
            fixed.value = action()
            return fixed
        except RepositoryNotFound:
            # gone since it was checked (a volume unmounted mid-run): said as such, never made again
            open_repository(ctx, repository, client, create=False)
            raise
        except RepositoryLocked:
            cleared = clear_stale_locks(ctx, repository, client).removed
            if not cleared:
                raise  # a live writer: transient, the task retries later
            fixed.stale_locks_removed += [lock.id[:8] for lock in cleared]
    return Fixed(action(), fixed.created, fixed.stale_locks_removed)


@dataclass
class HostBackup:
    run: BackupRun
    started: float
    finished: float
    created_repository: bool = False
    stale_locks_removed: list[str] = field(default_factory=list)


def shrink_problem(files: int, previous: int | None, max_shrink: float, tiered: int = 0) -> str | None:
    """Why a snapshot of `files` files (the last accepted one had `previous`, and tier migration has moved
    `tiered` files out of its paths since) does not look like the host's data."""
    if files == 0:
        return "the snapshot holds no files (the plan's paths are empty)"
    expected = (previous or 0) - tiered  # what moved to a lower tier did not vanish: the catalog has it
    if previous and files < expected * (1 - max_shrink):
        moved = f", after the {tiered} that tier migration moved to a lower tier" if tiered else ""
        return (f"its file count fell from {previous} to {files}{moved} ({1 - files / expected:.0%} fewer), more "
                f"than backup.max_shrink ({max_shrink:.0%}) allows")
    return None


def tiered_since(run: BackupRun, last: dict[str, Any]) -> int:
    """Files tier migration moved out of the plan's paths since the last accepted backup (0 when either count is
    unknown: a backup from before the ledger, or no tier folder)."""
    before = last.get("tiered_out")
    if run.tiered_out is None or before is None:
        return 0
    return max(0, run.tiered_out - int(before))


def backup_host(
    ctx: FleetContext, host: str, time_override: datetime | None = None, clear_stale_locks_first: bool = False,
    accept_shrink: bool = False, run_id: str | None = None,
) -> HostBackup:
    """One restic backup of the host's plan with its manifest, in one session on the host. `clear_stale_locks_first`
    (after a run that did not finish) costs restic starts.

    An empty backup is not a success: a plan path that is not there, a snapshot without files, or one whose file
    count fell by more than `backup.max_shrink` against the last accepted backup fails with the reason (the
    snapshot is forgotten again, so drills and retention keep to the last good one), unless `accept_shrink`.
    With a `run_id` (the flow run's), a snapshot an earlier attempt of that run saved is kept, not made twice."""
    plan = plan_of(ctx, host)
    restic = restic_for(ctx, plan.repository, host, create=True)
    folders = folders_on(ctx, host)
    last = load_state(ctx, host)
    removed = []
    if clear_stale_locks_first and open_repository(ctx, plan.repository, host, create=False) is not None:
        report = clear_stale_locks(ctx, plan.repository, host)
        removed = [lock.id[:8] for lock in report.removed]
        if run_id and report.kept_alive:
            # the flow holds the repository's lock: a live writer is the earlier attempt's restic, left running
            # when its worker died; its snapshot decides whether this attempt backs up at all
            wait_for_writers(restic, [lock.id for lock in report.kept_alive], host,
                             long_step(ctx, last.get("size_bytes")))
    started = time.time()
    done = with_repository_fixes(ctx, plan.repository, host, lambda: backup_with_manifest(
        restic, plan.paths, host=host, excludes=plan.excludes, time=time_override,
        cache=folders.cache_file(plan.repository), manifest_dir=folders.manifest_dir(plan.repository),
        accept_missing=accept_shrink, timeout=long_step(ctx, last.get("size_bytes")), run_id=run_id))
    run = done.value
    assert run is not None
    problem = shrink_problem(run.files, last.get("files"), backup_of(ctx.fleet).max_shrink, tiered_since(run, last))
    if problem and not accept_shrink:
        restic.forget_ids([i for i in (run.summary.snapshot_id, run.separate_manifest) if i])
        raise BackupRefused(f"backup of {host} refused: {problem}; its snapshot {(run.summary.snapshot_id or '')[:8]} "
                            "was forgotten again", f"check the host's data and that its volumes are mounted; "
                            f"{ACCEPT_HINT}")
    return HostBackup(run, started, time.time(), done.created, removed + done.stale_locks_removed)


WRITER_POLL_SECONDS = 2.0


def wait_for_writers(restic: ResticClient, lock_ids: list[str], host: str, timeout: float) -> None:
    """Until the locks `lock_ids` (live writers) are gone from the repository, or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while set(lock_ids) & {lock.id for lock in restic.locks()}:
        if time.monotonic() > deadline:
            raise StepFailed(f"an earlier backup of {host} still writes into its repository after {timeout:.0f} s",
                             f"see what restic runs on {host} (ps -C restic); the next run waits for it again")
        time.sleep(WRITER_POLL_SECONDS)


def store_pending_manifest(ctx: FleetContext, host: str, run: BackupRun) -> str | None:
    """Store the manifest whose first store failed (the data snapshot is already safe); its snapshot id."""
    if run.manifest_pending is None:
        return run.manifest_snapshot
    restic = restic_for(ctx, plan_of(ctx, host).repository, host)
    run.manifest_snapshot = manifest.store_manifest(restic, run.manifest_pending, run.run_id, host)
    run.manifest_pending = None
    return run.manifest_snapshot


def copy_offsite(ctx: FleetContext, repository: str, offsite: str, client: str,
                 snapshot_ids: list[str] | None = None) -> None:
    """`restic copy` from the primary into one offsite repository; it runs on the client host, which holds the
    SFTP key for both. Without ids it copies every snapshot the offsite copy lacks (idempotent)."""
    source = restic_for(ctx, repository, client)
    target = restic_for(ctx, offsite, client, create=True)
    timeout = long_step(ctx, load_state(ctx, client).get("size_bytes"))
    with_repository_fixes(ctx, offsite, client, lambda: target.copy(source, snapshot_ids or [], timeout=timeout))


# --- the last run of each host (the state directory) --------------------------------------------------------


def state_file(ctx: FleetContext, host: str) -> Path:
    return ctx.state_dir / "backup" / f"{host}.json"


def load_state(ctx: FleetContext, host: str) -> dict[str, Any]:
    path = state_file(ctx, host)
    try:
        return dict(json.loads(path.read_text())) if path.is_file() else {}
    except (ValueError, OSError):
        return {}


def save_state(ctx: FleetContext, host: str, state: dict[str, Any]) -> None:
    atomic_write(state_file(ctx, host), json.dumps(state), 0o600)


# --- maintenance ----------------------------------------------------------------------------------------------


@dataclass
class ClientMaintenance:
    client: str
    forgotten: int = 0
    orphan_manifests: int = 0
    checked: bool | None = None  # None: not checked
    problems: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class MaintenanceOutcome:
    repository: str
    forgotten: dict[str, int] = field(default_factory=dict)
    orphan_manifests: dict[str, int] = field(default_factory=dict)
    checked: dict[str, bool] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, repository: str, clients: list[ClientMaintenance]) -> MaintenanceOutcome:
        outcome = cls(repository)
        for done in clients:
            if done.error is not None:
                outcome.errors[done.client] = done.error
                continue
            outcome.forgotten[done.client] = done.forgotten
            outcome.orphan_manifests[done.client] = done.orphan_manifests
            if done.checked is not None:
                outcome.checked[done.client] = done.checked
            if done.problems:
                outcome.problems[done.client] = done.problems
        return outcome

    @property
    def ok(self) -> bool:
        return not self.errors and all(self.checked.values())

    def lines(self) -> list[str]:
        """One line per client, for the report."""
        out = []
        for client in sorted({*self.checked, *self.errors, *self.forgotten}):
            if client in self.errors:
                verdict = "error: " + self.errors[client]
            elif client not in self.checked:
                verdict = "not checked"
            else:
                verdict = "check passed" if self.checked[client] else "CHECK FAILED: " + "; ".join(
                    self.problems.get(client, []))
            out.append(f"- `{self.repository}/{client}`: forgot {self.forgotten.get(client, 0)} snapshots, "
                       f"{self.orphan_manifests.get(client, 0)} orphan manifests; {verdict}")
        return out


def forget_and_prune(ctx: FleetContext, restic: ResticClient, timeout: float | None = None) -> tuple[int, int]:
    """Retention on data snapshots, then drop manifests whose snapshot is gone, then one prune."""
    keep = backup_of(ctx.fleet).retention.model_dump(exclude_none=True)
    removed = restic.forget(keep, prune=False, tags=[BACKUP_TAG]).removed
    snapshots = restic.snapshots()
    alive = {run_tag(run) for s in snapshots if BACKUP_TAG in s.tags and (run := run_of(s))}
    orphans = [s.id for s in snapshots if MANIFEST_TAG in s.tags and not alive.intersection(s.tags)]
    restic.forget_ids(orphans)
    restic.prune(timeout=timeout)
    return len(removed), len(orphans)


def maintain_client(ctx: FleetContext, repository: str, client: str, *, check: bool = True,
                    read_data_subset: str | None = None, on_store: bool = False) -> ClientMaintenance:
    """forget + prune + check of one client's repository inside a fleet repository, from the client host or
    (`on_store`) on the repository's own host."""
    done = ClientMaintenance(client)
    try:
        restic = restic_on_store(ctx, repository, client) if on_store else restic_for(ctx, repository, client)
        if open_repository(ctx, repository, client, create=False, restic=restic) is None:
            done.error = f"no repository for {client} yet (no backup has run)"
            return done
        clear_stale_locks(ctx, repository, client, on_store=on_store)
        timeout = long_step(ctx, load_state(ctx, client).get("size_bytes"))
        done.forgotten, done.orphan_manifests = forget_and_prune(ctx, restic, timeout)
        if check:
            try:
                restic.check(read_data_subset=read_data_subset or backup_of(ctx.fleet).check.read_data_subset,
                             timeout=timeout)
                done.checked = True
            except CheckFailed as exc:
                done.checked, done.problems = False, exc.problems
    except StepFailed as exc:
        done.error = str(exc)
    return done


def maintain(ctx: FleetContext, repository: str, *, check: bool = True,
             read_data_subset: str | None = None) -> MaintenanceOutcome:
    """Every client repository inside one fleet repository, one after the other."""
    return MaintenanceOutcome.of(repository, [
        maintain_client(ctx, repository, client, check=check, read_data_subset=read_data_subset)
        for client in clients_of(ctx, repository)])
