"""`backup`: one host's plan into its repository, one writer per repository, retried with backoff,
content manifest recorded, copied offsite, metrics written."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from primespark.backup import jobs
from primespark.backup.manifest import manifest_tag
from primespark.backup.metrics import write_backup_metrics
from primespark.backup.orchestration import ensure_writer_limits, textfile_dir, transient, writer_slot
from primespark.backup.policy import BackupContext, TransportName


class BackupFailed(Exception):
    pass


@task(name="prepare-repository", cache_policy=NO_CACHE, retry_condition_fn=transient)
def prepare_repository(ctx: BackupContext, repository: str, host: str) -> dict[str, object]:
    return jobs.prepare(ctx, repository, host)


@task(name="restic-backup", cache_policy=NO_CACHE, retry_condition_fn=transient)
def restic_backup(ctx: BackupContext, host: str, time_override: datetime | None) -> tuple[Any, float, float]:
    return jobs.backup_host(ctx, host, writer_slot, time_override)


@task(name="record-manifest", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=exponential_backoff(5),
      retry_condition_fn=transient)
def record_manifest(ctx: BackupContext, host: str, snapshot_id: str) -> jobs.Manifest:
    return jobs.manifest_for(ctx, host, snapshot_id, writer_slot)


@task(name="copy-offsite", cache_policy=NO_CACHE, retry_condition_fn=transient)
def copy_offsite(ctx: BackupContext, repository: str, host: str, snapshot_ids: list[str]) -> list[str]:
    return jobs.copy_offsite(ctx, repository, host, snapshot_ids, writer_slot)


@flow(name="backup", flow_run_name="backup-{host}", log_prints=True)
def backup(
    host: str,
    env: str = "lab",
    transport: TransportName = "ssh",
    retries: int = 3,
    retry_delay_seconds: float = 30.0,
    offsite: bool = True,
    textfile: str | None = None,
    snapshot_time: datetime | None = None,
) -> dict[str, Any]:
    """Back up `host` as the fleet's plan says. `snapshot_time` backdates the snapshot (tests of RPO)."""
    logger = get_run_logger()
    ctx = BackupContext.load(env, transport)
    plan = ctx.plan(host)
    ensure_writer_limits(ctx)
    state = jobs.load_state(ctx, host)
    started = time.time()
    retrying = {"retries": retries, "retry_delay_seconds": exponential_backoff(retry_delay_seconds)(retries),
                "retry_jitter_factor": 0.2}
    try:
        prepared = prepare_repository.with_options(**retrying)(ctx, plan.repository, host)
        logger.info("repository %s for %s: %s", plan.repository, host, prepared)
        summary, write_started, write_finished = restic_backup.with_options(**retrying)(ctx, host, snapshot_time)
        manifest = record_manifest(ctx, host, summary.snapshot_id)
        copied = []
        if offsite and ctx.offsite_of(plan.repository):
            manifests = ctx.client(plan.repository, host).snapshots(tags=[manifest_tag(summary.snapshot_id)])
            copied = copy_offsite.with_options(**retrying)(
                ctx, plan.repository, host, [summary.snapshot_id, *(m.id for m in manifests)])
    except Exception as exc:
        finished = time.time()
        write_backup_metrics(textfile_dir(ctx, textfile), host, plan.repository, success=False, finished=finished,
                             duration_seconds=finished - started, last_success=state.get("last_success"),
                             snapshot_time=state.get("snapshot_time"), size_bytes=state.get("size_bytes"),
                             added_bytes=None)
        raise BackupFailed(f"backup of {host} into {plan.repository} failed: {exc}") from exc
    finished = time.time()
    when = snapshot_time.timestamp() if snapshot_time else started
    state = {"last_success": finished, "snapshot_time": when, "size_bytes": summary.total_bytes_processed}
    jobs.save_state(ctx, host, state)
    write_backup_metrics(textfile_dir(ctx, textfile), host, plan.repository, success=True, finished=finished,
                         duration_seconds=finished - started, last_success=finished, snapshot_time=when,
                         size_bytes=summary.total_bytes_processed, added_bytes=summary.data_added)
    result = {
        "host": host, "repository": plan.repository, "snapshot": summary.snapshot_id,
        "files": summary.total_files_processed, "bytes": summary.total_bytes_processed,
        "added_bytes": summary.data_added, "manifest_files": len(manifest.files),
        "changed_during_backup": len(manifest.changed_since_snapshot), "copied_to": copied,
        "duration_seconds": round(finished - started, 2), "write_window": [write_started, write_finished],
        "stale_locks_removed": prepared["stale_locks_removed"],
    }
    create_markdown_artifact(
        "\n".join(f"- **{k}**: {v}" for k, v in result.items() if k != "write_window"), key=f"backup-{host}",
        description=f"last backup of {host}")
    return result


if __name__ == "__main__":
    import sys

    backup(sys.argv[1], *(sys.argv[2:3]))
