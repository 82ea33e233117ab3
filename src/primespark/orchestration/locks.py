"""Named locks across every process that talks to one Prefect server: global concurrency limits of one slot.

One writer per restic repository, one pass per sync link; the names say what is locked, so later kinds
(a tier host) never collide with these.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import httpx
from prefect.client.orchestration import get_client
from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

# How long a run waits for a lock before it fails (a long backup or check may hold it that long), looking this often.
LOCK_WAIT_SECONDS = 6 * 3600
LOCK_POLL_SECONDS = 1.0
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


def placement_lock(host: str) -> str:
    """One agent task claiming a host at a time: the check that the host still takes it, after the tasks placed
    meanwhile, and the run's placement labels (which the next claim reads) are one step (held for a request or
    two)."""
    return f"place-{host}"


def ensure_locks(names: list[str], slots: int = 1) -> None:
    """`slots` per name (created, or reset to that)."""
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                client.upsert_global_concurrency_limit_by_name(name, slots)
            except ObjectAlreadyExists:  # another run made it between the upsert's read and its create
                client.upsert_global_concurrency_limit_by_name(name, slots)


def wanted_lock(name: str) -> str:
    """Counts the runs waiting for `name`: a burst holding it (`BurstHolder`) hands it over when this is not 0."""
    return f"want-{name}"


WANT_SLOTS = 10_000  # a counter, not a lock


def _one(name: str, *, wait: bool = True) -> AbstractContextManager[None]:
    return concurrency(name, occupy=1, timeout_seconds=LOCK_WAIT_SECONDS if wait else None,
                       max_retries=None if wait else 0, strict=True, lease_duration=LOCK_LEASE_SECONDS)


def _take(held: ExitStack, name: str, *, wait: bool = True, slots: int = 1) -> None:
    try:
        held.enter_context(_one(name, wait=wait))
    except ConcurrencySlotAcquisitionError as exc:
        if _busy(exc):
            raise
        ensure_locks([name], slots)  # made on first use
        held.enter_context(_one(name, wait=wait))


def _busy(exc: BaseException) -> bool:
    cause = exc.__cause__
    return isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 423


@contextmanager
def hold(*names: str) -> Iterator[None]:
    """Hold every named lock (made on first use), taken in sorted order so that two runs never deadlock. A lock
    that is busy is waited for with a slot of its `wanted_lock` held meanwhile (a burst holding it lets go)."""
    with ExitStack() as held:
        for name in sorted(set(names)):
            if _took(held, name):
                continue
            with ExitStack() as waiting:
                _take(waiting, wanted_lock(name), slots=WANT_SLOTS)
                deadline = time.monotonic() + LOCK_WAIT_SECONDS
                while not _took(held, name):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the lock {name} was busy for {LOCK_WAIT_SECONDS} s")
                    time.sleep(LOCK_POLL_SECONDS)
        yield


def _took(held: ExitStack, name: str) -> bool:
    """Take `name` if it is free. It is read first (cheap, and a take the server refuses is logged by Prefect as
    an ERROR); polling rather than Prefect's own wait, which sleeps as long as the lock is usually held (up to
    30 s), so a lock handed over is taken within a second."""
    if _slots_taken(name):
        return False
    try:
        _take(held, name, wait=False)
    except ConcurrencySlotAcquisitionError as exc:
        if not _busy(exc):
            raise
        return False
    return True


def _slots_taken(name: str) -> bool:
    """Whether every slot of `name` is taken (a read: never one of a SQLite server's busy answers to a write)."""
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return False
    return limit.active_slots >= limit.limit


def wanted(name: str) -> bool:
    """Whether a run waits for `name`."""
    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(wanted_lock(name)).active_slots > 0
        except ObjectNotFound:
            return False


# A burst's lock is given up once its work has paused this long, or has been held this long (then taken again: a
# backstop, should a waiting run's want not be seen; a want seen hands the lock over at once).
BURST_IDLE_SECONDS = 10.0
BURST_MAX_HOLD_SECONDS = 60.0
# A burst that let its lock go to a waiting run takes it again once no run waits (the waiter took it, or gave up:
# its want lapses with its lease), and after this at the latest.
HANDOVER_WAIT_SECONDS = 2 * LOCK_LEASE_SECONDS
HANDOVER_POLL_SECONDS = 1.0
SLOW_TAKE_SECONDS = 5.0


class BurstHolder:
    """One thread that runs the work it is given, one item at a time, holding `names` across back-to-back items:
    taken for the first item of a burst, given up once no item has come for `idle_seconds`, it has been held
    `max_hold_seconds`, or another run waits for it (`hold` says so: the burst lets it go after its item and
    takes it again once that run has it). Why not `hold` per item: each take is a request to the Prefect
    server, and a server on SQLite answers some of them 503 while other writes land, which its client retries
    after 2, 4, 8 s; a continuous sync making a pass every few seconds lost up to half a minute of lag to that."""

    def __init__(self, *names: str, idle_seconds: float = BURST_IDLE_SECONDS,
                 max_hold_seconds: float = BURST_MAX_HOLD_SECONDS, label: str = "") -> None:
        self.names = names
        self.label = label or ",".join(names)
        self.idle_seconds = idle_seconds
        self.max_hold_seconds = max_hold_seconds
        self.takes = 0  # how often the locks were taken (a burst each)
        self.handovers = 0  # how often they were let go because another run waited for them
        self._items: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...], Future[Any]] | None] = queue.Queue()
        context = contextvars.copy_context()  # the caller's, e.g. its Prefect flow run: items log to its run
        self._thread = threading.Thread(target=context.run, args=(self._loop,), daemon=True,
                                        name=f"burst {self.label}")
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._items.put((fn, args, future))
        return future

    def close(self) -> None:
        """Finish what was submitted, give the locks up and end the thread."""
        self._items.put(None)
        self._thread.join()

    def _loop(self) -> None:
        held: ExitStack | None = None
        since = last = 0.0
        try:
            while True:
                try:  # while held, a look every HANDOVER_POLL_SECONDS: idle long enough, or another run waits?
                    item = self._items.get(timeout=HANDOVER_POLL_SECONDS if held is not None else None)
                except queue.Empty:
                    if time.monotonic() - last >= self.idle_seconds:
                        _give_up(held)
                        held = None
                    elif self._wanted():
                        self._hand_over(held)
                        held = None
                    continue
                if item is None:
                    return
                fn, args, future = item
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    if held is not None and time.monotonic() - since >= self.max_hold_seconds:
                        _give_up(held)
                        held = None
                    if held is None:
                        stack = ExitStack()
                        asked = time.monotonic()
                        stack.enter_context(hold(*self.names))
                        held, since = stack, time.monotonic()
                        self.takes += 1
                        if since - asked > SLOW_TAKE_SECONDS:  # the item waited: say for what
                            logging.getLogger(__name__).warning("%s: taking %s took %.1f s", self.label,
                                                                ", ".join(self.names), since - asked)
                    future.set_result(contextvars.copy_context().run(fn, *args))
                except BaseException as exc:  # the item's failure is its caller's (a failed take too) ...
                    future.set_exception(exc)
                    _give_up(held)  # ... and the next item takes the locks afresh
                    held = None
                last = time.monotonic()
                if held is not None and self._wanted():  # another run waits: its turn before our next item
                    self._hand_over(held)
                    held = None
        finally:
            _give_up(held)

    def _hand_over(self, held: ExitStack | None) -> None:
        """Let go, and wait until the run that wanted the locks has them (or gave up) before taking them again."""
        _give_up(held)
        self.handovers += 1
        deadline = time.monotonic() + HANDOVER_WAIT_SECONDS
        while self._wanted() and time.monotonic() < deadline:
            time.sleep(HANDOVER_POLL_SECONDS)

    def _wanted(self) -> bool:
        try:
            return any(wanted(name) for name in self.names)
        except Exception:  # the server unreadable: the next take says so
            return False


def _give_up(held: ExitStack | None) -> None:
    """Release; a release the server does not take is a warning (the lease lapses within LOCK_LEASE_SECONDS),
    never the end of the thread that still has work queued."""
    if held is not None:
        try:
            held.close()
        except Exception as exc:
            logging.getLogger(__name__).warning("a lock was not released (%s); its lease lapses within %d s",
                                                exc, LOCK_LEASE_SECONDS)
