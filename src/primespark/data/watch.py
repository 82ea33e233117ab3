"""Continuous sync, the controller's half: one watcher session per link (`watchside.py` on the source host, over
the hosts layer) and the pending changes it reports, batched.

`Watches` decides *when* a link needs a pass and *what kind*: a full pass when its watcher (re)starts — changes
made while nothing watched are found by a full reconciliation, so a restart of the source host or of the
worker loses nothing — after an inotify overflow, a deletion in a mirror, or a failed pass, and every
`rescan_seconds` (an hour, as Syncthing's rescan: what no event told of, such as a change inotify cannot see on
a network filesystem, arrives within that); otherwise a pass of only the changed files, once the source has
been quiet for `quiet_seconds` or the oldest change has waited `max_wait_seconds`. A quiet source makes no
passes but that periodic full one. The flow (`flows/sync.py: sync_watch`) runs the passes, holding the link's
lock; nothing here runs one.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from primespark.context import FleetContext
from primespark.data.layout import Link
from primespark.errors import UserError
from primespark.fleet.model import SyncMode
from primespark.hosts import LocalRunner, SshRunner

WATCHSIDE_SOURCE = (Path(__file__).parent / "watchside.py").read_text()
MAX_CHANGED_PATHS = 20_000  # more changes than this in one batch: a full pass walks the tree faster
RESCAN_SECONDS = 3600.0  # a full pass at least this often, even with no event
RETRY_SECONDS = (5, 10, 20, 40, 60)  # a watcher that died, or a pass that failed, is tried again after these
READY_TIMEOUT_SECONDS = 120


@dataclass
class Batch:
    """What a link's next pass covers: everything (`full`), or the changed paths and when each was seen."""

    full: bool
    why: str
    changed: dict[str, float] = field(default_factory=dict)


def start_watcher(ctx: FleetContext, link: Link) -> subprocess.Popen[bytes]:
    """The watcher on the link's source host, its output streaming back. Its stdin stays open: closing it (or
    this process dying) ends the watcher."""
    runner = ctx.hosts.runner(link.source)
    argv = [runner.python, "-u", "-c", WATCHSIDE_SOURCE, link.source_path]
    if isinstance(runner, SshRunner):
        command = runner.argv(argv)
    elif isinstance(runner, LocalRunner):
        command = [*runner.prefix, *argv]
    else:
        raise UserError(f"continuous sync cannot stream from {link.source} ({type(runner).__name__})",
                        "run it with the ssh or local transport")
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


class LinkWatch:
    """One link: its watcher process and what it has reported since the last pass began."""

    def __init__(self, ctx: FleetContext, link: Link, wake: threading.Event) -> None:
        self.ctx = ctx
        self.link = link
        self.wake = wake
        self.lock = threading.Lock()
        self.process: subprocess.Popen[bytes] | None = None
        self.ready = threading.Event()
        self.changed: dict[str, float] = {}
        self.first_change: float | None = None  # monotonic
        self.last_change: float | None = None
        self.last_full = time.monotonic()  # when the last full pass was taken (the first is due at once anyway)
        self.full_why = "the watcher starts: a full pass reconciles what changed while nothing watched"
        self.not_before = 0.0  # monotonic: no pass or restart before this
        self.failures = 0
        self.last_words = ""

    # --- the watcher process ---

    def start(self) -> None:
        self.ready.clear()
        self.process = start_watcher(self.ctx, self.link)
        threading.Thread(target=self._read, args=(self.process,), daemon=True,
                         name=f"watch {self.link.name}").start()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _read(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            self._event(event)
        process.wait()
        err = process.stderr.read().decode(errors="replace") if process.stderr else ""
        with self.lock:
            self.last_words = err.strip()[-300:]
            self.full_why = self.full_why or f"the watcher on {self.link.source} stopped: a full pass when it is back"
        self.wake.set()

    def _event(self, event: dict[str, Any]) -> None:
        kind = event.get("e")
        now = time.monotonic()
        with self.lock:
            if kind == "ready":
                self.ready.set()
            elif kind == "changed":
                seen = float(event.get("t") or time.time())
                for path in event.get("paths") or []:
                    self.changed.setdefault(str(path), seen)
                self.first_change = self.first_change or now
                self.last_change = now
            elif kind == "deleted" and self.link.mode is SyncMode.mirror:
                self.full_why = self.full_why or "files were deleted at the source: a mirror's full pass"
            elif kind == "rescan":
                self.full_why = self.full_why or f"the watcher lost events ({event.get('why')})"
            elif kind == "gone":
                self.full_why = self.full_why or f"the source folder is {event.get('why')}"
        self.wake.set()

    # --- batches ---

    def due(self, now: float, quiet_seconds: float, max_wait_seconds: float,
            rescan_seconds: float = RESCAN_SECONDS) -> Batch | None:
        """The next pass if one is due now, taking what it covers (changes seen later go to the pass after)."""
        with self.lock:
            if now < self.not_before:
                return None
            if not self.full_why and now - self.last_full >= rescan_seconds:
                self.full_why = f"no full pass for {rescan_seconds:.0f} s: one finds what no watch event told of"
            if self.full_why and (self.ready.is_set() or not self.alive()):
                batch = Batch(True, self.full_why, dict(self.changed))
                self.last_full = now
            elif self.changed and self.last_change is not None and self.first_change is not None and (
                    now - self.last_change >= quiet_seconds or now - self.first_change >= max_wait_seconds):
                if len(self.changed) > MAX_CHANGED_PATHS:
                    batch = Batch(True, f"{len(self.changed)} changes at once", dict(self.changed))
                    self.last_full = now
                else:
                    batch = Batch(False, f"{len(self.changed)} changed", dict(self.changed))
            else:
                return None
            self.changed.clear()
            self.full_why = ""
            self.first_change = self.last_change = None
            return batch

    def passed(self, batch: Batch, ok: bool) -> None:
        """A pass ended: a failed one's changes wait for a full pass, after a pause that grows."""
        with self.lock:
            if ok:
                self.failures = 0
                return
            self.failures += 1
            self.full_why = self.full_why or "a full pass after one that did not succeed"
            self.not_before = time.monotonic() + RETRY_SECONDS[min(self.failures, len(RETRY_SECONDS)) - 1]

    def revive(self) -> bool:
        """Restart a watcher that died (the host restarted, the link broke), after a pause that grows; True
        when it was restarted."""
        if self.alive() or time.monotonic() < self.not_before:
            return False
        with self.lock:
            self.failures += 1
            self.not_before = time.monotonic() + RETRY_SECONDS[min(self.failures, len(RETRY_SECONDS)) - 1]
            self.full_why = self.full_why or f"the watcher on {self.link.source} restarted: a full pass"
        try:
            self.start()
        except OSError as exc:
            self.last_words = str(exc)
            return False
        return True


class Watches:
    """Every link of a continuous job, watched."""

    def __init__(self, ctx: FleetContext, links: list[Link], quiet_seconds: float = 1.0,
                 max_wait_seconds: float = 5.0, rescan_seconds: float = RESCAN_SECONDS) -> None:
        self.wake = threading.Event()
        self.links = {link.name: LinkWatch(ctx, link, self.wake) for link in links}
        self.quiet_seconds = quiet_seconds
        self.max_wait_seconds = max_wait_seconds
        self.rescan_seconds = rescan_seconds

    def start(self, ready_timeout: float = READY_TIMEOUT_SECONDS) -> dict[str, bool]:
        """Start every watcher and wait (bounded) until each watches its tree or has died: which are ready."""
        for watch in self.links.values():
            watch.start()
        deadline = time.monotonic() + ready_timeout
        for watch in self.links.values():
            while not watch.ready.wait(0.2) and watch.alive() and time.monotonic() < deadline:
                pass
        return {name: watch.ready.is_set() for name, watch in self.links.items()}

    def due(self, busy: set[str]) -> list[tuple[LinkWatch, Batch]]:
        now = time.monotonic()
        out = []
        for name, watch in self.links.items():
            if name in busy:
                continue
            if not watch.alive():
                watch.revive()
            batch = watch.due(now, self.quiet_seconds, self.max_wait_seconds, self.rescan_seconds)
            if batch is not None:
                out.append((watch, batch))
        return out

    def wait(self, seconds: float) -> None:
        self.wake.wait(seconds)
        self.wake.clear()

    def stop(self) -> None:
        for watch in self.links.values():
            watch.stop()
