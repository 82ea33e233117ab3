"""Prefect pieces shared by the flows: the per-repository writer slot, retry policy, metrics folder."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency

from primespark.backup.policy import BackupContext, limit_name
from primespark.restic import ResticError

WRITER_WAIT_SECONDS = 6 * 3600


def ensure_writer_limits(ctx: BackupContext) -> None:
    """One slot per fleet repository (created or reset to 1): two writers never share a repository."""
    with get_client(sync_client=True) as client:
        for repository in ctx.backup.repositories:
            client.upsert_global_concurrency_limit_by_name(limit_name(repository), 1)


@contextmanager
def writer_slot(repository: str) -> Iterator[None]:
    with concurrency(limit_name(repository), occupy=1, timeout_seconds=WRITER_WAIT_SECONDS, strict=True):
        yield


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only what can pass on a second try: an unreachable host or repository, a live lock, a timeout."""
    try:
        state.result()
    except ResticError as exc:
        return exc.transient
    except Exception:
        return False
    return False


def textfile_dir(ctx: BackupContext, override: str | None) -> Path:
    return Path(override or ctx.fleet.monitoring.textfile_dir)
