"""Prefect pieces shared by the flows: the per-repository writer slot, retry policy, metrics folder."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
from prefect.concurrency.sync import concurrency
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from primespark.backup.policy import BackupContext, limit_name
from primespark.restic import ResticError

WRITER_WAIT_SECONDS = 6 * 3600


def ensure_writer_limits(repositories: list[str]) -> None:
    """One slot per fleet repository (created or reset to 1): two writers never share a repository."""
    with get_client(sync_client=True) as client:
        for repository in repositories:
            client.upsert_global_concurrency_limit_by_name(limit_name(repository), 1)


@contextmanager
def writer_slot(repository: str) -> Iterator[None]:
    """The repository's one writer slot; the limit is made on first use (a lease frees it if this process dies)."""

    def slot() -> AbstractContextManager[None]:
        return concurrency(limit_name(repository), occupy=1, timeout_seconds=WRITER_WAIT_SECONDS, strict=True)

    with ExitStack() as held:
        try:
            held.enter_context(slot())
        except ConcurrencySlotAcquisitionError:
            ensure_writer_limits([repository])
            held.enter_context(slot())
        yield


@contextmanager
def in_process_runs() -> Iterator[None]:
    """For flows run inside this process (`spark backup now`, `spark drill run`, benchmarks): no flow heartbeats.
    They feed Prefect's zombie detection for runs that a worker starts; here the caller watches the run itself,
    and Prefect 3.9 stops the heartbeat thread by waiting out its current 1 s sleep, up to a second per run."""
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
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
