"""Named locks across every process that talks to one Prefect server: global concurrency limits of one slot.

One writer per restic repository, one pass per sync link; the names say what is locked, so later kinds
(a tier host) never collide with these.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager

from prefect.client.orchestration import get_client
from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
from prefect.concurrency.sync import concurrency

# How long a run waits for a lock before it fails (a long backup or check may hold it that long).
LOCK_WAIT_SECONDS = 6 * 3600
# A held lock's lease, renewed every 45 s while its holder lives: when the holder dies (its worker or host did),
# the server's repossessor frees the slot within this time, rather than Prefect's default 300 s.
LOCK_LEASE_SECONDS = 60


def repository_lock(repository: str) -> str:
    """One writer at a time into a fleet repository (every client's repository in it)."""
    return f"restic-{repository}"


def drill_lock(host: str) -> str:
    """One DR drill of a host at a time (a scheduled one and one started by hand)."""
    return f"drill-{host}"


def sync_lock(job: str, source: str) -> str:
    """One pass at a time over a sync link (a job's source host): a scheduled pass, a continuous one and
    `spark sync run` never send into the same folder at once."""
    return f"sync-{job}-{source}"


def tier_lock(host: str) -> str:
    """One tier-migration writer per tier host: a pass from it or into it, a recall, a rebuild (they all
    write its tier folder, and the staging folders there are the writer's own)."""
    return f"tier-{host}"


def agent_task_lock(task_id: str) -> str:
    """One run of an agent task id at a time: a flow retry and a `spark task run` of the same id never race to
    run the command twice (the host-side lock and the commit-once rename keep it so on the host, too)."""
    return f"agent-task-{task_id}"


def ensure_locks(names: list[str]) -> None:
    """One slot per name (created, or reset to 1)."""
    with get_client(sync_client=True) as client:
        for name in names:
            client.upsert_global_concurrency_limit_by_name(name, 1)


def _one(name: str) -> AbstractContextManager[None]:
    return concurrency(name, occupy=1, timeout_seconds=LOCK_WAIT_SECONDS, strict=True,
                       lease_duration=LOCK_LEASE_SECONDS)


@contextmanager
def hold(*names: str) -> Iterator[None]:
    """Hold every named lock (made on first use), taken in sorted order so that two runs never deadlock."""
    with ExitStack() as held:
        for name in sorted(set(names)):
            try:
                held.enter_context(_one(name))
            except ConcurrencySlotAcquisitionError:
                ensure_locks([name])
                held.enter_context(_one(name))
        yield
