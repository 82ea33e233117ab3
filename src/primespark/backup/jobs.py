"""Backup, offsite copy and maintenance steps, independent of Prefect (the flows call these from tasks)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from primespark.backup.manifest import BackupRun, backup_with_manifest, run_of, run_tag, store_manifest
from primespark.backup.policy import BACKUP_TAG, MANIFEST_TAG, BackupContext
from primespark.restic import CheckFailed, RepositoryLocked, RepositoryNotFound, ResticClient, ResticError
from primespark.secrets import atomic_write

WriterSlot = Callable[[str], AbstractContextManager[object]]
T = TypeVar("T")


def no_slot(_: str) -> AbstractContextManager[object]:
    return nullcontext()


def prepare(ctx: BackupContext, repository: str, client: str) -> dict[str, object]:
    """Create the repository (and its password) on first use; remove locks left by dead processes."""
    restic = ctx.client(repository, client, create=True)
    created = False
    try:  # listing locks also proves the repository exists: one restic start saved on every run
        locks = ctx.clear_stale_locks(repository, client)
    except RepositoryNotFound:
        created = restic.init()
        locks = ctx.clear_stale_locks(repository, client)
    return {"created": created, "stale_locks_removed": [lock.id[:8] for lock in locks.removed],
            "live_locks": [lock.id[:8] for lock in locks.kept_alive],
            "unresolved_locks": [f"{lock.id[:8]} by pid {lock.pid} on {lock.hostname}" for lock in locks.unresolved]}


def with_repository_fixes(ctx: BackupContext, repository: str, client: str, action: Callable[[], T]) -> Fixed[T]:
    """Run `action` (one restic write); create the repository if restic finds none, and clear stale locks if
    it finds the repository locked, then try again. The usual run costs no extra restic start."""
    fixed: Fixed[T] = Fixed()
    for _ in range(3):
        try:
            fixed.value = action()
            return fixed
        except RepositoryNotFound:
            if fixed.created:
                raise
            ctx.client(repository, client, create=True).init()
            fixed.created = True
        except RepositoryLocked:
            cleared = ctx.clear_stale_locks(repository, client).removed
            if not cleared:
                raise  # a live writer: transient, the task retries later
            fixed.stale_locks_removed += [lock.id[:8] for lock in cleared]
    return Fixed(action(), fixed.created, fixed.stale_locks_removed)


@dataclass
class Fixed(Generic[T]):
    value: T | None = None
    created: bool = False
    stale_locks_removed: list[str] = field(default_factory=list)


@dataclass
class HostBackup:
    run: BackupRun
    started: float
    finished: float
    created_repository: bool = False
    stale_locks_removed: list[str] = field(default_factory=list)


def backup_host(
    ctx: BackupContext, host: str, time_override: datetime | None = None, clear_stale_locks: bool = False,
) -> HostBackup:
    """One restic backup of the host's plan with its manifest, in one session on the host; the caller holds
    the repository's writer slot. `clear_stale_locks` first (after a run that did not finish) costs restic starts."""
    plan = ctx.plan(host)
    restic = ctx.client(plan.repository, host, create=True)
    cache = ctx.transport.cache_file(host, plan.repository)
    manifest_dir = ctx.transport.manifest_dir(host, plan.repository)
    removed = []
    if clear_stale_locks:
        with suppress(RepositoryNotFound):  # none yet: the backup creates it
            removed = [lock.id[:8] for lock in ctx.clear_stale_locks(plan.repository, host).removed]
    started = time.time()
    done = with_repository_fixes(ctx, plan.repository, host, lambda: backup_with_manifest(
        restic, plan.paths, host=host, excludes=plan.excludes, time=time_override, cache=cache,
        manifest_dir=manifest_dir))
    assert done.value is not None
    return HostBackup(done.value, started, time.time(), done.created, removed + done.stale_locks_removed)


def store_pending_manifest(ctx: BackupContext, host: str, run: BackupRun) -> str | None:
    plan = ctx.plan(host)
    return store_manifest(ctx.client(plan.repository, host), run, host)


def copy_offsite(
    ctx: BackupContext, repository: str, client: str, snapshot_ids: list[str] | None = None,
    slot: WriterSlot = no_slot,
) -> list[str]:
    """`restic copy` from the primary into each offsite repository; it runs on the client host, which holds
    the SFTP key for both. Without ids it copies every snapshot the offsite copy lacks (idempotent)."""
    done = []
    source = ctx.client(repository, client)
    for offsite in ctx.offsite_of(repository):
        target = ctx.client(offsite, client, via=client, create=True)
        with slot(offsite):
            with_repository_fixes(ctx, offsite, client, lambda target=target: target.copy(source, snapshot_ids or []))
        done.append(offsite)
    return done


def state_file(ctx: BackupContext, host: str) -> Path:
    return ctx.settings.state_dir(ctx.env) / "backup" / f"{host}.json"


def load_state(ctx: BackupContext, host: str) -> dict[str, Any]:
    path = state_file(ctx, host)
    try:
        return dict(json.loads(path.read_text())) if path.is_file() else {}
    except (ValueError, OSError):
        return {}


def save_state(ctx: BackupContext, host: str, state: dict[str, Any]) -> None:
    atomic_write(state_file(ctx, host), json.dumps(state), 0o600)


@dataclass
class MaintenanceOutcome:
    repository: str
    forgotten: dict[str, int] = field(default_factory=dict)
    orphan_manifests: dict[str, int] = field(default_factory=dict)
    checked: dict[str, bool] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors and all(self.checked.values())


def clients_of(ctx: BackupContext, repository: str) -> list[str]:
    primary = ctx.backup.repositories[repository].copy_from or repository
    return [h for h, p in ctx.backup.plans.items() if p.repository == primary]


def forget_and_prune(ctx: BackupContext, restic: ResticClient) -> tuple[int, int]:
    """Retention on data snapshots, then drop manifests whose snapshot is gone, then one prune."""
    keep = ctx.backup.retention.model_dump(exclude_none=True)
    removed = restic.forget(keep, prune=False, tags=[BACKUP_TAG]).removed
    snapshots = restic.snapshots()
    alive = {run_tag(run) for s in snapshots if BACKUP_TAG in s.tags and (run := run_of(s))}
    orphans = [s.id for s in snapshots if MANIFEST_TAG in s.tags and not alive.intersection(s.tags)]
    restic.forget_ids(orphans)
    restic.prune()
    return len(removed), len(orphans)


def maintain(
    ctx: BackupContext, repository: str, *, check: bool = True, read_data_subset: str | None = None,
    slot: WriterSlot = no_slot,
) -> MaintenanceOutcome:
    """forget + prune + check for every client repository inside one fleet repository."""
    outcome = MaintenanceOutcome(repository)
    subset = read_data_subset or ctx.backup.check.read_data_subset
    for client in clients_of(ctx, repository):
        try:
            restic = ctx.client(repository, client)
            if not restic.exists():
                outcome.errors[client] = f"no repository for {client} yet (no backup has run)"
                continue
            ctx.clear_stale_locks(repository, client)
            with slot(repository):
                outcome.forgotten[client], outcome.orphan_manifests[client] = forget_and_prune(ctx, restic)
                if check:
                    try:
                        restic.check(read_data_subset=subset)
                        outcome.checked[client] = True
                    except CheckFailed as exc:
                        outcome.checked[client] = False
                        outcome.problems[client] = exc.problems
        except ResticError as exc:
            outcome.errors[client] = str(exc)
    return outcome
