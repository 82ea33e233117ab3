"""`backup`: one host's plan into its repository with its content manifest (one session on the host), one
writer per repository, retried with backoff, copied offsite, metrics written."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from primespark.backup import jobs
from primespark.backup.repositories import offsite_of, plan_of
from primespark.backup.session import BackupRun
from primespark.context import FleetContext, Transport
from primespark.errors import StepFailed, UserError
from primespark.monitoring.metrics import Textfile, backup_metrics, publish
from primespark.orchestration import auditing
from primespark.orchestration.auditing import audited
from primespark.orchestration.failures import RunFailed, expected
from primespark.orchestration.locks import hold, repository_lock
from primespark.orchestration.retries import retrying, transient


class BackupFailed(RunFailed):
    """The backup did not complete: why, in a line, and the cause's fix (a sealed secret store: unseal it)."""


# The tasks run inside the flow's lock: taken before a task starts, the lock's request does not queue behind
# the server recording that task's own start (on SQLite that cost up to 2 s a lock).
@task(name="restic-backup", cache_policy=NO_CACHE, retry_condition_fn=transient)
def restic_backup(ctx: FleetContext, host: str, time_override: datetime | None,
                  clear_stale_locks_first: bool, accept_shrink: bool, run_id: str | None) -> jobs.HostBackup:
    return jobs.backup_host(ctx, host, time_override=time_override, clear_stale_locks_first=clear_stale_locks_first,
                            accept_shrink=accept_shrink, run_id=run_id)


@task(name="store-manifest", cache_policy=NO_CACHE, retry_condition_fn=transient)
def store_manifest(ctx: FleetContext, host: str, run: BackupRun) -> str | None:
    return jobs.store_pending_manifest(ctx, host, run)


@task(name="copy-offsite", cache_policy=NO_CACHE, retry_condition_fn=transient)
def copy_offsite(ctx: FleetContext, repository: str, offsite: str, host: str, snapshot_ids: list[str]) -> str:
    jobs.copy_offsite(ctx, repository, offsite, host, snapshot_ids)
    return offsite


def publish_metrics(ctx: FleetContext, host: str, metrics: Textfile, textfile: str | None) -> None:
    """On the host (its node exporter serves them to Prometheus); a host that cannot take them is a warning: the
    backup's own outcome stands, and a host gone quiet raises its own alert."""
    try:
        publish(ctx.hosts, ctx.fleet, host, f"backup_{host}", metrics, textfile)
    except StepFailed as exc:
        get_run_logger().warning("backup metrics of %s not published: %s", host, exc)


def backup_report(result: dict[str, Any]) -> str:
    return "\n".join(f"- **{k}**: {v}" for k, v in result.items() if k != "write_window")


@flow(name="backup", flow_run_name="backup-{host}", log_prints=True)
@audited(auditing.host)
def backup(
    host: str,
    env: str = "lab",
    transport: Transport = "ssh",
    retries: int = 3,
    retry_delay_seconds: float = 30.0,
    offsite: bool = True,
    textfile: str | None = None,
    snapshot_time: datetime | None = None,
    accept_shrink: bool = False,
) -> dict[str, Any]:
    """Back up `host` as the fleet's plan says. `snapshot_time` backdates the snapshot (tests of RPO).
    `accept_shrink`: a plan path that is not there, no files, or a fall in the file count beyond
    `backup.max_shrink` is expected this time (otherwise each fails the backup)."""
    logger = get_run_logger()
    ctx = FleetContext.load(env, transport)
    plan = plan_of(ctx, host)
    state = jobs.load_state(ctx, host)
    # a run that did not finish (failed, killed) may have left its lock: the next one clears stale locks first
    unfinished = state.get("last_status", "succeeded") != "succeeded"
    jobs.save_state(ctx, host, {**state, "last_status": "running"})
    started = time.time()
    options = retrying(retries, retry_delay_seconds)
    # the flow run's id tags its snapshot: a run rescheduled after its worker died, or a task retried after
    # restic saved, finds the snapshot it already made instead of backing up twice
    run_id = str(flow_run.id).replace("-", "") if flow_run.id else None
    try:
        with hold(repository_lock(plan.repository)):
            done = restic_backup.with_options(**options)(ctx, host, snapshot_time, unfinished, accept_shrink, run_id)
            run = done.run
            if run.earlier_attempt:
                logger.info("snapshot %s was saved by an earlier attempt of this run (its worker was lost before "
                            "the run ended): kept, not made twice", run.summary.snapshot_id)
            for problem in run.cache_problems:
                logger.warning("%s", problem)
            if run.missing_paths:
                logger.warning("backed up without %s: not there on %s (accepted)", ", ".join(run.missing_paths), host)
            if run.embed_problem:
                logger.warning("%s: the manifest went in a snapshot of its own", run.embed_problem)
            if run.manifest_pending is not None:
                logger.warning("storing the manifest beside snapshot %s failed (%s): trying again",
                               run.summary.snapshot_id, run.manifest_error)
                store_manifest.with_options(**options)(ctx, host, run)
        copied = []
        ids = [i for i in (run.summary.snapshot_id, run.separate_manifest) if i]
        for repository in offsite_of(ctx, plan.repository) if offsite else []:
            with hold(repository_lock(repository)):
                copied.append(copy_offsite.with_options(**options)(ctx, plan.repository, repository, host, ids))
    except Exception as exc:
        finished = time.time()
        jobs.save_state(ctx, host, {**state, "last_status": "failed"})
        publish_metrics(ctx, host, backup_metrics(
            host, plan.repository, success=False, finished=finished, duration_seconds=finished - started,
            last_success=state.get("last_success"), snapshot_time=state.get("snapshot_time"),
            size_bytes=state.get("size_bytes"), added_bytes=None), textfile)
        if not expected(exc):
            raise  # a bug: with its traceback
        why = exc.message if isinstance(exc, UserError) else str(exc)
        raise BackupFailed(f"backup of {host} into {plan.repository} failed: {why}", getattr(exc, "fix", "")) from exc
    finished = time.time()
    summary = run.summary
    when = snapshot_time.timestamp() if snapshot_time else done.started
    jobs.save_state(ctx, host, {"last_status": "succeeded", "last_success": finished, "snapshot_time": when,
                                "size_bytes": summary.total_bytes_processed, "files": run.files,
                                "tiered_out": run.tiered_out})
    publish_metrics(ctx, host, backup_metrics(
        host, plan.repository, success=True, finished=finished, duration_seconds=finished - started,
        last_success=finished, snapshot_time=when, size_bytes=summary.total_bytes_processed,
        added_bytes=summary.data_added), textfile)
    result = {
        "host": host, "repository": plan.repository, "snapshot": summary.snapshot_id,
        # the manifest inside the snapshot is not one of the host's files
        "files": summary.total_files_processed - run.manifest_embedded, "bytes": summary.total_bytes_processed,
        "added_bytes": summary.data_added, "manifest": run.manifest_snapshot,
        "manifest_inside_snapshot": run.manifest_embedded, "manifest_files": run.files,
        "hashed_files": run.hashed_now, "changed_during_backup": len(run.changed_during_backup),
        "copied_to": copied, "duration_seconds": round(finished - started, 2),
        "write_window": [done.started, done.finished], "created_repository": done.created_repository,
        "stale_locks_removed": done.stale_locks_removed, "earlier_attempt": run.earlier_attempt,
    }
    create_markdown_artifact(backup_report(result), key=f"backup-{host}", description=f"last backup of {host}")
    return result
