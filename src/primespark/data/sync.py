"""Sync jobs: the steps of one pass over one link (a source host of a job), their guards, state and reports.

A pass is: `probe` the source folder → `transfer` (guarded: a missing, unmounted or, for a mirror, emptied
source transfers nothing and deletes nothing) → for a mirror's full pass, `delete` (at most `max_delete`, else
nothing, and the list is published) → `verify` what was sent (each copy's size and XXH3-128, read back at the
destination) → `flush` the destination's filesystem (a job's `fsync: pass`; done by the verification where it
can) → `record` the link's state. The flows (`flows/sync.py`) wrap each step in a task and hold the link's lock;
nothing here takes a lock.

Transport: the source host runs rsync and pushes through the job's account on the destination (`sync-<job>`,
its forced command rrsync restricted to the link's folder, behind the sync role's gate, which also lets the key
flush that folder's filesystem and hash the files in it; `-no-del` for a copy): on the same site to the
destination's LAN address, across sites to its overlay address in the saved mesh plan. The key (one per source
host) and the destination's host keys come from the secret store and the operator's known_hosts, installed by
the `sync` role (`host_material`).
"""

from __future__ import annotations

import fcntl
import json
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from datetime import time as clock
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from primespark.agents.execute import HOT_TIER_STAGING
from primespark.context import FleetContext
from primespark.data import tierside, transfer
from primespark.data.layout import RECALL_DIR, Link, links, overlap, transport_links
from primespark.data.transfer import Item, Route, TransferPlan, TransferReport
from primespark.errors import UserError
from primespark.fleet.model import Fleet, FsyncMode, Sync, SyncJob, SyncMode, TierName
from primespark.hosts import SshFiles
from primespark.secrets import atomic_write, ssh_key_pair

CLIENT_KEY = "id_ed25519"
KNOWN_HOSTS = "known_hosts"
LIST_LIMIT = 200  # paths listed in a report or an artifact; the count says how many there were


def account_for(job: str) -> str:
    """The job's account on its destinations."""
    return f"sync-{job}"


def key_secret(host: str) -> str:
    """The source host's sync key in the secret store."""
    return f"sync/ssh/{host}"


def job_of(fleet: Fleet, job: str) -> SyncJob:
    jobs = fleet.sync.jobs if fleet.sync is not None else {}
    if job not in jobs:
        raise UserError(f"no sync job named {job!r} in fleet {fleet.name}",
                        f"use one of: {', '.join(jobs)}" if jobs else "add a `sync:` section with jobs to the fleet")
    return jobs[job]


def links_of(fleet: Fleet, job: str, source: str | None = None) -> list[Link]:
    """The job's links, or the one from `source`."""
    job_of(fleet, job)
    found = links(fleet, job)
    if source is not None:
        found = [link for link in found if link.source == source]
        if not found:
            raise UserError(f"{source!r} is not a source of sync job {job}",
                            f"use one of: {', '.join(link.source for link in links(fleet, job))}")
    return found


class SyncRefused(UserError):
    """A pass that would be unsafe: nothing was transferred or deleted (`deletions` lists what a mirror held back)."""

    def __init__(self, link: Link, reason: str, fix: str, deletions: list[str] | None = None,
                 deletion_count: int = 0) -> None:
        super().__init__(f"sync {link.name} refused: {reason}", fix)
        self.link = link
        self.reason = reason
        self.deletions = deletions or []
        self.deletion_count = deletion_count or len(self.deletions)


class SyncPaused(UserError):
    """The link's bandwidth timetable or its source's quiet hours say no transfer now."""

    def __init__(self, link: Link, window: Window) -> None:
        until = window.until.strftime("%H:%M") if window.until else "further notice"
        super().__init__(f"sync {link.name} is paused until {until} ({window.reason})")
        self.window = window


class VerificationFailed(UserError):
    def __init__(self, link: Link, differing: list[str]) -> None:
        shown = ", ".join(differing[:5]) + (" …" if len(differing) > 5 else "")
        super().__init__(f"sync {link.name}: {len(differing)} file(s) differ at the destination after the transfer "
                         f"and a second, checksummed one: {shown}",
                         "check the destination's disk (a file that changes under a synced name?)")
        self.differing = differing


# --- routes ----------------------------------------------------------------------------------------------------


def address_of(ctx: FleetContext, link: Link) -> str:
    """How the source reaches the destination: its LAN address on the same site, else its overlay address in the
    saved plan of a mesh that holds both."""
    fleet = ctx.fleet
    source, target = fleet.hosts[link.source], fleet.hosts[link.destination]
    if source.site == target.site:
        return str(target.address)
    from primespark.mesh.plan import load_state

    for mesh in fleet.meshes:
        if fleet.in_mesh(mesh, link.source) and fleet.in_mesh(mesh, link.destination):
            state = load_state(ctx.state_dir, mesh)
            if state is None or link.destination not in state.hosts:
                raise UserError(f"{link.name} crosses sites over mesh {mesh}, which has no saved plan with "
                                f"{link.destination} in it", f"run `spark mesh plan --env {ctx.env}` and apply it")
            return str(state.address_of(link.destination))
    raise UserError(f"{link.source} and {link.destination} are on different sites and share no mesh",
                    "add both to a mesh (the fleet check says so too)")


def client_dir(fleet: Fleet) -> str:
    """Where a pushing host keeps its sync key: the fleet's `sync.client_dir`, or its default in a fleet whose only
    pushes are recalls."""
    folder = fleet.sync.client_dir if fleet.sync is not None else str(Sync.model_fields["client_dir"].default)
    return folder.rstrip("/")


def route_for(ctx: FleetContext, link: Link) -> tuple[Route, str]:
    """The route and rsync's destination argument. Local transport, or source and destination on one host: the
    folder itself; else the account's root (`/`) over SSH."""
    if ctx.transport == "local" or link.local:
        return transfer.local_route(), link.destination_path
    port = ctx.fleet.hosts[link.destination].ssh.port
    folder = client_dir(ctx.fleet)
    return transfer.ssh_route(account_for(link.job), address_of(ctx, link), port, f"{folder}/{CLIENT_KEY}",
                              f"{folder}/{KNOWN_HOSTS}", shared_dir=folder), "/"


def held_back(fleet: Fleet, link: Link) -> tuple[str, ...]:
    """What no job sends from the link's source, as patterns anchored at the transfer's root: agent tasks' staging
    folder on a hot-tier host (a task may still write there; its host commits the result by a rename into
    `tasks/`, which is then sent), a tier folder's ledger of files moved out (that folder's own record, for
    its own backups: a copy elsewhere would count for nothing), its recall folder (copies on their way back,
    renamed into place once verified: sent then), and tier migration's staging folders, at any depth (copies not
    yet verified: sent once placed; a mirror that sent them would then delete a whole batch at its destination)."""
    root = link.source_path.rstrip("/")
    held = []
    for name, tier in fleet.tiers.items():
        if link.source not in tier.hosts:
            continue
        if overlap(link.source_path, tier.path):
            held.append(f"{tierside.STAGING}/")  # unanchored: below `<tier path>/<host>/`, or the source itself
        own = [tierside.LEDGER, f"{RECALL_DIR}/"] + ([f"{HOT_TIER_STAGING}/"] if name is TierName.hot else [])
        for rel in own:
            path = f"{tier.path.rstrip('/')}/{rel}"
            if path.startswith(root + "/"):
                held.append(path.removeprefix(root))
    return tuple(dict.fromkeys(held))


def plan_for(ctx: FleetContext, link: Link, **options: Any) -> TransferPlan:
    """A transfer of the link with its job's filters; `options` are TransferPlan fields."""
    spec = job_of(ctx.fleet, link.job)
    route, destination = route_for(ctx, link)
    return TransferPlan(link.source_path, destination, route, include=tuple(spec.include),
                        exclude=tuple(spec.exclude), held_back=held_back(ctx.fleet, link),
                        fsync=spec.fsync is FsyncMode.file, **options)


# --- bandwidth windows -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    rate: str  # `off`, `pause`, or a rate such as `2M`
    until: datetime | None  # when the next window starts; None: never
    reason: str

    @property
    def paused(self) -> bool:
        return self.rate == "pause"

    @property
    def bwlimit_kib(self) -> int | None:
        return None if self.paused else transfer.rate_kib(self.rate)


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


def _next(local: datetime, minute: int) -> datetime:
    """The next wall-clock time `minute` (minutes after midnight) strictly after `local`."""
    day = local.date()
    for offset in range(2):
        candidate = datetime.combine(day + timedelta(days=offset), clock(minute // 60, minute % 60),
                                     tzinfo=local.tzinfo)
        if candidate > local:
            return candidate
    raise AssertionError("unreachable")


def window_at(fleet: Fleet, job: SyncJob, source_host: str, now: datetime) -> Window:
    """The rate in force at `now` (the fleet's time zone) and until when: the timetable entry at or before now
    (the last one of the day before midnight's first), paused during the source's quiet hours if the job says so."""
    local = now.astimezone(ZoneInfo(fleet.timezone))
    minute = local.hour * 60 + local.minute
    rate, until, reason = "off", None, "no bandwidth limit"
    if job.bandwidth:
        table = sorted((_minutes(t), r, t) for t, r in job.bandwidth.items())
        current = [e for e in table if e[0] <= minute] or [table[-1]]
        rate, start = current[-1][1], current[-1][2]
        later = [e for e in table if e[0] > minute] or [table[0]]
        if len(table) > 1:
            until = _next(local, later[0][0])
        reason = f"bandwidth timetable: {rate} from {start}"
    power = fleet.hosts[source_host].power
    if job.pause_in_quiet_hours and power is not None and power.quiet_hours is not None:
        start_q, end_q = (_minutes(t) for t in power.quiet_hours)
        quiet = start_q <= minute < end_q if start_q < end_q else (minute >= start_q or minute < end_q)
        if quiet:
            return Window("pause", _next(local, end_q), f"quiet hours of {source_host} "
                          f"({power.quiet_hours[0]} to {power.quiet_hours[1]})")
        boundary = _next(local, start_q)
        until = boundary if until is None or boundary < until else until
    return Window(rate, until, reason)


def longest_pause_seconds(fleet: Fleet, job: SyncJob, source_host: str) -> float:
    """The longest stretch of a day in which the link transfers nothing (its timetable's `pause` windows and, if
    the job says so, its source's quiet hours), midnight crossed: what its lag alert allows beyond its mode's own
    limit. `window_at` judges each stretch between the times where the rate can change."""
    power = fleet.hosts[source_host].power
    quiet = power.quiet_hours if job.pause_in_quiet_hours and power is not None and power.quiet_hours else ()
    edges = sorted({0, *(_minutes(t) for t in (*job.bandwidth, *quiet))})
    day = datetime(2025, 1, 15, tzinfo=ZoneInfo(fleet.timezone))  # no clock change on that day in any zone
    stretches = [(end - start, window_at(fleet, job, source_host, day + timedelta(minutes=start)).paused)
                 for start, end in zip(edges, [*edges[1:], 24 * 60], strict=True)]
    if all(paused for _, paused in stretches):
        return 24 * 3600.0
    longest = run = 0
    for minutes, paused in stretches + stretches:  # twice round: a window from 23:00 to 06:30 is one stretch
        run = run + minutes if paused else 0
        longest = max(longest, run)
    return longest * 60.0


# --- the link's state (the state directory of whoever runs the flow: a worker, or the operator's machine) -------


@dataclass
class LinkState:
    last_status: str = "never"  # succeeded, failed, refused, paused
    last_outcome: str | None = None  # of the last pass that ran (succeeded, failed, refused): a pause leaves it
    last_run: float | None = None
    last_success: float | None = None
    source_files: int | None = None  # regular files in the source at the last full pass
    source_bytes: int | None = None
    mount: bool | None = None  # whether the source folder was a mount point at the last success
    lag_seconds: float | None = None  # the last pass's largest delay, change to arrival
    files_sent: int = 0
    bytes_sent: int = 0
    deleted: int = 0
    differing: int = 0
    errors_total: int = 0
    refusals_total: int = 0
    reason: str = ""
    last_check: float | None = None
    check_differing: int | None = None
    check_missing: int | None = None
    # `fsync: pass`: a pass that may have copied is under way or died before its flush; the destination's boot id
    # when it started (copies made under that boot are safe once flushed); every file to be compared by content
    # (the destination restarted before a pass's copies were flushed)
    unflushed: bool = False
    destination_boot: str | None = None
    recheck: bool = False

    @property
    def succeeded(self) -> bool:
        """The last pass that ran succeeded: what `primespark_sync_success` says. A paused pass ran nothing, so a
        pause (quiet hours, a `pause` window) neither fails the link nor clears its failure."""
        return (self.last_outcome or self.last_status) == "succeeded"


def state_file(ctx: FleetContext, link: Link) -> Path:
    return ctx.state_dir / "sync" / link.job / f"{link.source}.json"


def load_state(ctx: FleetContext, link: Link) -> LinkState:
    path = state_file(ctx, link)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return LinkState()
    except (OSError, ValueError) as exc:
        raise UserError(f"the sync state {path} cannot be read: {exc}",
                        "restore it, or remove it (the next mirror pass then cannot tell an emptied source)") from exc
    known = {f for f in LinkState.__dataclass_fields__}
    return LinkState(**{k: v for k, v in data.items() if k in known})


def save_state(ctx: FleetContext, link: Link, state: LinkState) -> None:
    atomic_write(state_file(ctx, link), json.dumps(asdict(state), indent=1), 0o600)


# --- step 1: probe the source ----------------------------------------------------------------------------------

PROBE = r"""
import json, os, sys
root = sys.argv[1]
out = {"exists": os.path.lexists(root), "dir": os.path.isdir(root), "mount": False, "empty": True}
if out["dir"]:
    out["mount"] = os.path.ismount(root)
    with os.scandir(root) as entries:
        out["empty"] = next(iter(entries), None) is None
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Probe:
    exists: bool
    is_dir: bool
    mount: bool
    empty: bool


def probe(ctx: FleetContext, link: Link) -> Probe:
    """What the source folder looks like: there, a folder, a mount point, empty."""
    runner = ctx.hosts.runner(link.source)
    done = runner.run([runner.python, "-c", PROBE, link.source_path], timeout=60)
    try:
        out = json.loads(done.text)
    except ValueError:
        out = None
    if done.returncode != 0 or not isinstance(out, dict):
        raise transfer.TransferFailed(f"cannot look at {link.source}:{link.source_path}: "
                                      f"{done.stderr.strip()[-300:]}", "check that the host is up",
                                      returncode=done.returncode, stderr=done.stderr)
    return Probe(bool(out["exists"]), bool(out["dir"]), bool(out["mount"]), bool(out["empty"]))


def guard(link: Link, found: Probe, state: LinkState, accept_empty: bool = False) -> None:
    """Refuse a pass whose source is missing, no longer mounted, or (a mirror's) empty where the last pass saw
    files: each is how a source looks when its disk is gone, and a mirror would then delete everything."""
    where = f"{link.source}:{link.source_path}"
    if not found.exists:
        raise SyncRefused(link, f"the source {where} is missing", "mount or restore the source folder; nothing "
                          "was copied or deleted")
    if not found.is_dir:
        raise SyncRefused(link, f"the source {where} is not a folder", "put the source folder back")
    if state.mount and not found.mount:
        raise SyncRefused(link, f"the source {where} was a mount point at the last pass and is not now: its volume "
                          "looks unmounted", f"mount it again on {link.source}")
    if link.mode is SyncMode.mirror and found.empty and (state.source_files or 0) > 0 and not accept_empty:
        raise SyncRefused(link, f"the source {where} is empty, where the last pass saw {state.source_files} files: "
                          "an unmounted or replaced folder looks like this, and a mirror would delete everything",
                          f"if it really was emptied, run `spark sync run {link.job} --source {link.source} "
                          "--accept-empty-source`")


# --- step 2: transfer ------------------------------------------------------------------------------------------


def transfer_link(ctx: FleetContext, link: Link, found: Probe, *, files: list[str] | None = None,
                  dry_run: bool = False, bwlimit: str | None = None, accept_empty: bool = False,
                  checksum: bool = False, now: datetime | None = None,
                  progress: Callable[[transfer.Progress], None] | None = None) -> TransferReport:
    """Send what the destination lacks: the whole tree, or only `files` (paths below the source, from the
    watcher). A mirror's full pass asks rsync to delete nothing yet (`--max-delete=0`): it counts what it would
    delete, and `delete_link` decides. A dry run lists what would change, deletions included. A bandwidth window
    that closes mid-transfer stops it there; it resumes at once in the next window (or raises SyncPaused).
    `progress` hears how far a long transfer is (`transfer.PROGRESS_SECONDS`)."""
    state = load_state(ctx, link)
    guard(link, found, state, accept_empty)
    spec = job_of(ctx.fleet, link.job)
    if not dry_run and spec.fsync is FsyncMode.pass_ and settle(ctx, link, state):
        files, checksum = None, True
    full_mirror = link.mode is SyncMode.mirror and files is None
    options: dict[str, Any] = {"dry_run": dry_run, "checksum": checksum,
                               "files": None if files is None else tuple(files)}
    if full_mirror:
        options.update(delete=True, max_delete=None if dry_run else 0)
    deadline = time.monotonic() + spec.timeout_minutes * 60
    report: TransferReport | None = None
    while True:
        window = window_at(ctx.fleet, spec, link.source, now or datetime.now(UTC))
        rate = bwlimit or window.rate
        if rate == "pause" and not dry_run:
            if report is not None:
                return report
            raise SyncPaused(link, window)
        plan = plan_for(ctx, link, bwlimit_kib=None if rate == "pause" else transfer.rate_kib(rate),
                        stop_at=None if bwlimit or dry_run else window.until, **options)
        left = deadline - time.monotonic()
        if left <= 0:
            raise transfer.TransferFailed(f"sync {link.name} did not finish in {spec.timeout_minutes} minutes",
                                          "raise the job's timeout_minutes, or its bandwidth", transient=True)
        done = transfer.run(ctx.hosts.runner(link.source), plan, timeout=left + 60,
                            accept=(transfer.MAX_DELETE_REACHED,) if full_mirror else (), progress=progress)
        report = done if report is None else report + done
        if not done.stopped_early:
            return report


# --- durability: one flush per pass (`fsync: pass`) -------------------------------------------------------------

def flush_destination(ctx: FleetContext, link: Link) -> str:
    """Flush the filesystem that holds the link's destination folder (syncfs: one journal commit for everything a
    pass wrote, where `--fsync` costs one per file) and return the destination's boot id. From the source host
    through the job's account, whose gate runs this one request besides rrsync: the worker of the source's site
    need not reach the destination as an administrator (a cloud VM, from the edge)."""
    route, _ = route_for(ctx, link)
    return transfer.flush(ctx.hosts.runner(link.source), route, link.destination_path,
                          timeout=job_of(ctx.fleet, link.job).timeout_minutes * 60)


def settle(ctx: FleetContext, link: Link, state: LinkState) -> bool:
    """Before a pass that may copy: mark the link unflushed, and say whether this pass must compare every file by
    content. A pass that copied and never flushed (killed, or its flush failed) left its copies to the
    destination's kernel, which writes them back within seconds; the flush here makes sure. But if the
    destination has started again since (another boot id), some may be lost: empty or partly written under their
    final names with the right size and time, which rsync's quick check would take for good copies. The boot id
    taken here is what the pass's own flush compares with."""
    boot = flush_destination(ctx, link)
    if state.unflushed and boot != state.destination_boot:
        state.recheck = True
    state.destination_boot = boot
    state.unflushed = True
    save_state(ctx, link, state)
    return state.recheck


def flush_pass(ctx: FleetContext, link: Link, report: TransferReport | None,
               deleted: TransferReport | None = None, flushed_boot: str | None = None) -> None:
    """After a pass (`fsync: pass`): flush the destination, unless the pass changed nothing there or its
    verification flushed it after the pass's last write (`flushed_boot`, the boot id it gave), and clear the
    link's marks. A boot id other than the one the pass started under means the destination restarted during
    the pass: the pass fails, and the next one compares every file by content."""
    if job_of(ctx.fleet, link.job).fsync is not FsyncMode.pass_:
        return
    state = load_state(ctx, link)
    if (report is not None and report.sent) or (deleted is not None and deleted.deleted):
        boot = flushed_boot or flush_destination(ctx, link)
        if boot != state.destination_boot:
            state.recheck = True
            save_state(ctx, link, state)
            raise transfer.TransferFailed(
                f"sync {link.name}: {link.destination} restarted during the pass, so its copies may not have "
                "reached its disk", "nothing to do: the next pass compares every file by content and sends what "
                "was lost")
    state.unflushed = False
    if report is not None and report.plan.checksum and report.plan.files is None:
        state.recheck = False  # this pass compared every file by content, and its copies are on disk
    save_state(ctx, link, state)


# --- step 3: a mirror's deletions ------------------------------------------------------------------------------


def delete_link(ctx: FleetContext, link: Link, transferred: TransferReport, accept_empty: bool = False) -> \
        TransferReport | None:
    """Delete at the destination what the source no longer has, when the full pass counted some: all of them, or
    none when there are more than the job's max_delete (SyncRefused with the list) or the source has no files
    where the last pass saw some."""
    held = transferred.deletions_held_back
    if link.mode is not SyncMode.mirror or held == 0:
        return None
    state = load_state(ctx, link)
    if transferred.source_files == 0 and (state.source_files or 0) > 0 and not accept_empty:
        raise SyncRefused(link, f"the source has no files, where the last pass saw {state.source_files}; "
                          f"{held} deletions held back", f"if it really was emptied, run `spark sync run {link.job} "
                          f"--source {link.source} --accept-empty-source`", deletion_count=held)
    limit = job_of(ctx.fleet, link.job).deletion_limit
    runner = ctx.hosts.runner(link.source)
    if held > limit:
        listing = transfer.run(runner, plan_for(ctx, link, delete=True, deletions_only=True, dry_run=True),
                               timeout=3600)
        raise SyncRefused(link, f"the mirror would delete {held} files at {link.destination}, more than its "
                          f"max_delete ({limit}); nothing was deleted",
                          "if the source really lost these files, raise the job's max_delete for one run or "
                          "delete them at the destination by hand; the list is in the run's artifacts",
                          deletions=listing.deleted, deletion_count=held)
    # rsync's own --max-delete still bounds it, should the source lose more files meanwhile
    return transfer.run(runner, plan_for(ctx, link, delete=True, deletions_only=True, max_delete=limit),
                        timeout=3600, accept=(transfer.MAX_DELETE_REACHED,))


# --- step 4: verify what was sent ------------------------------------------------------------------------------


@dataclass
class Verification:
    checked: int = 0
    bytes: int = 0
    differing: list[str] = field(default_factory=list)  # same size and time, other content: a bad copy
    changed_since: list[str] = field(default_factory=list)  # the source changed after it was sent
    boot: str | None = None  # the destination's boot id once it had flushed what was verified (`fsync: pass`)

    @property
    def ok(self) -> bool:
        return not self.differing


def verify_link(ctx: FleetContext, link: Link, sent: list[Item]) -> Verification:
    """Size and XXH3-128 of every file sent, read back at the destination, against the sum rsync took of each source
    as it sent it (one read of each copy, over the account's gate). Where that cannot be had (a local destination,
    one without python3-xxhash, a file rsync gave no sum for): rsync's checksum compare, which reads both ends and
    also tells a source that changed since it was sent."""
    latest = {item.path: item for item in sent}  # a file sent twice (a transfer resumed in the next window): the last
    result = Verification(len(latest), sum(item.size for item in sent))
    route, _ = route_for(ctx, link)
    by_rsync = sorted(latest)
    if route.remote:
        summed = [path for path in by_rsync if latest[path].checksum]
        spec = job_of(ctx.fleet, link.job)
        # `fsync: pass`: the destination flushes its filesystem while it hashes (the pass's flush, at no extra wait)
        read = transfer.hash_copies(ctx.hosts.runner(link.source), route, summed, timeout=spec.timeout_minutes * 60,
                                    flush=spec.fsync is FsyncMode.pass_) if summed else None
        if read is not None:
            result.differing = [path for path, copy in zip(summed, read.copies, strict=True)
                                if copy != (latest[path].size, latest[path].checksum)]
            result.boot = read.boot
            by_rsync = [path for path in by_rsync if not latest[path].checksum]
    if by_rsync:
        plan = plan_for(ctx, link, checksum=True, dry_run=True, files=tuple(by_rsync))
        found = transfer.run(ctx.hosts.runner(link.source), plan, timeout=3600)
        for item in found.sent:
            (result.differing if item.content_differs else result.changed_since).append(item.path)
    return result


def resend(ctx: FleetContext, link: Link, files: list[str]) -> TransferReport:
    """Send `files` again, compared by content (what a failed verification or check found)."""
    plan = plan_for(ctx, link, checksum=True, files=tuple(files))
    return transfer.run(ctx.hosts.runner(link.source), plan, timeout=3600)


# --- the full check (like rclone check) -----------------------------------------------------------------------


@dataclass
class CheckResult:
    link: str
    source_files: int
    matched: int
    missing: list[str]  # at the source, not at the destination
    differing: list[str]  # same size and time, other content
    stale: list[str]  # the source's copy is newer or of another size (the next pass sends it)
    extra: list[str] | None  # at the destination, not at the source (mirrors; None: a copy keeps extras)
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.missing and not self.differing and not self.extra


def check_link(ctx: FleetContext, link: Link) -> CheckResult:
    """Every file compared by size and XXH3-128 at both ends; nothing changes."""
    mirror = link.mode is SyncMode.mirror
    found = transfer.run(ctx.hosts.runner(link.source),
                         plan_for(ctx, link, checksum=True, dry_run=True, delete=mirror), timeout=6 * 3600)
    missing = [i.path for i in found.sent if i.new]
    differing = [i.path for i in found.sent if i.content_differs]
    stale = [i.path for i in found.sent if not i.new and not i.content_differs]
    matched = max(0, found.source_files - len(missing) - len(differing) - len(stale))
    return CheckResult(link.name, found.source_files, matched, missing, differing, stale,
                       found.deleted if mirror else None, found.seconds)


# --- step 5: what a pass did, recorded ------------------------------------------------------------------------


@dataclass
class PassResult:
    """One pass over one link, as reports and metrics show it."""

    job: str
    source: str
    destination: str
    kind: str  # full, changes, dry-run
    status: str  # succeeded, refused, paused, failed
    started: float
    finished: float
    files_sent: int = 0
    bytes_sent: int = 0
    literal_bytes: int = 0  # file data sent as is (the rest matched what the destination had)
    transfer_seconds: float = 0.0  # rsync's own run time (the pass adds its probe, verification, bookkeeping)
    deleted: int = 0
    skipped: int = 0
    source_files: int | None = None
    verified: int = 0
    differing: int = 0
    changed_since: int = 0
    lag_p50: float | None = None
    lag_max: float | None = None
    reason: str = ""
    sent: list[str] = field(default_factory=list)  # up to LIST_LIMIT
    deletions: list[str] = field(default_factory=list)  # deleted, or (refused/dry run) that would be
    deletion_count: int = 0

    @property
    def link(self) -> str:
        return f"{self.job}/{self.source}"


def lags(sent: list[Item], finished: float, changed_at: dict[str, float] | None = None) -> list[float]:
    """Change-to-arrival delay of each file sent: from when the watcher saw it change, else its mtime."""
    out = []
    for item in sent:
        when = (changed_at or {}).get(item.path)
        if when is None and item.mtime is not None:
            when = item.mtime.timestamp()
        if when is not None:
            out.append(max(0.0, finished - when))
    return out


def pass_result(link: Link, kind: str, started: float, report: TransferReport | None,
                deleted: TransferReport | None = None, verification: Verification | None = None,
                changed_at: dict[str, float] | None = None) -> PassResult:
    finished = time.time()
    result = PassResult(link.job, link.source, link.destination, kind, "succeeded", started, finished)
    if report is not None:
        sent = report.sent
        delays = lags(sent, finished, changed_at)
        result = replace(result, files_sent=len(sent), bytes_sent=report.bytes_sent,
                         literal_bytes=report.literal_bytes, transfer_seconds=report.seconds, skipped=report.skipped,
                         source_files=report.source_files if report.plan.files is None else None,
                         lag_p50=statistics.median(delays) if delays else None,
                         lag_max=max(delays) if delays else None, sent=[i.path for i in sent[:LIST_LIMIT]])
        if kind == "dry-run":
            result.deletions = report.deleted[:LIST_LIMIT]
            result.deletion_count = len(report.deleted)
    if deleted is not None:
        result.deleted = len(deleted.deleted)
        result.deletions = deleted.deleted[:LIST_LIMIT]
        result.deletion_count = result.deleted
        result.bytes_sent += deleted.bytes_sent
    if verification is not None:
        result.verified = verification.checked
        result.differing = len(verification.differing)
        result.changed_since = len(verification.changed_since)
    return result


def refused_result(link: Link, kind: str, started: float, refusal: SyncRefused) -> PassResult:
    return PassResult(link.job, link.source, link.destination, kind, "refused", started, time.time(),
                      reason=str(refusal), deletions=refusal.deletions[:LIST_LIMIT],
                      deletion_count=refusal.deletion_count)


def record(ctx: FleetContext, link: Link, result: PassResult, found: Probe | None = None) -> LinkState:
    """The link's state after a pass (not after a dry run): what the guards of the next pass compare with."""
    state = load_state(ctx, link)
    state.last_run = result.finished
    state.last_status = result.status
    state.reason = result.reason
    if result.status != "paused":
        state.last_outcome = result.status
    if result.status == "succeeded":
        state.last_success = result.finished
        state.files_sent, state.bytes_sent, state.deleted = result.files_sent, result.bytes_sent, result.deleted
        state.differing = result.differing
        state.lag_seconds = result.lag_max if result.lag_max is not None else 0.0
        if result.source_files is not None:
            state.source_files = result.source_files
        if found is not None:
            state.mount = found.mount
    elif result.status == "refused":
        state.refusals_total += 1
    elif result.status == "failed":
        state.errors_total += 1
    save_state(ctx, link, state)
    return state


def record_check(ctx: FleetContext, link: Link, result: CheckResult) -> LinkState:
    state = load_state(ctx, link)
    state.last_check = time.time()
    state.check_differing = len(result.differing)
    state.check_missing = len(result.missing)
    save_state(ctx, link, state)
    return state


# --- reports (the flows publish them; the CLI prints the same) -----------------------------------------------


def progress_line(link: Link, so_far: transfer.Progress) -> str:
    """A long transfer's line in the run's log (the Prefect UI, the console of `spark sync run`)."""
    return f"{link.name}: {so_far.text}"


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} s"


def render_passes(job: str, results: list[PassResult]) -> str:
    """The report artifact of a run: one row per link, then what was refused or deleted."""
    lines = [f"# sync {job}", "",
             "| link | pass | status | files sent | bytes sent | deleted | skipped | verified | differing | "
             "lag p50 | lag max | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r.source} → {r.destination} | {r.kind} | {r.status} | {r.files_sent} | "
                     f"{transfer.human_size(r.bytes_sent)} | {r.deleted} | {r.skipped} | {r.verified} | "
                     f"{r.differing} | "
                     f"{_seconds(r.lag_p50)} | {_seconds(r.lag_max)} | {r.finished - r.started:.1f} |")
    for r in results:
        if r.reason:
            lines += ["", f"**{r.link}**: {r.reason}"]
        if r.deletions:
            what = "would delete" if r.status != "succeeded" or r.kind == "dry-run" else "deleted"
            lines += ["", f"**{r.link}** {what} {r.deletion_count} files"
                      + (f" (the first {len(r.deletions)})" if r.deletion_count > len(r.deletions) else "") + ":",
                      *(f"- `{path}`" for path in r.deletions)]
    return "\n".join(lines) + "\n"


def render_check(job: str, results: list[CheckResult]) -> str:
    lines = [f"# sync check {job}", "", "| link | files | matched | missing | differing | stale | extra | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        extra = "—" if r.extra is None else str(len(r.extra))
        lines.append(f"| {r.link} | {r.source_files} | {r.matched} | {len(r.missing)} | {len(r.differing)} | "
                     f"{len(r.stale)} | {extra} | {r.seconds:.1f} |")
    for r in results:
        for label, paths in (("missing at the destination", r.missing), ("differing", r.differing),
                             ("only at the destination", r.extra or [])):
            if paths:
                lines += ["", f"**{r.link}** {label} ({len(paths)}):", *(f"- `{p}`" for p in paths[:LIST_LIMIT])]
    return "\n".join(lines) + "\n"


# --- status ----------------------------------------------------------------------------------------------------


@dataclass
class LinkStatus:
    job: str
    source: str
    destination: str
    mode: str
    continuous: bool
    last_success: float | None
    last_status: str
    pending_files: int | None = None
    pending_bytes: int | None = None
    pending_deletions: int | None = None
    lag_seconds: float | None = None  # the oldest change not yet at the destination (0: nothing pending)
    error: str = ""


def status_of(ctx: FleetContext, link: Link, now: float | None = None) -> LinkStatus:
    """The link's state and what a pass would send now (a dry run): pending files and the age of the oldest."""
    spec = job_of(ctx.fleet, link.job)
    state = load_state(ctx, link)
    row = LinkStatus(link.job, link.source, link.destination, link.mode.value, spec.continuous, state.last_success,
                     state.last_status)
    try:
        found = transfer.run(ctx.hosts.runner(link.source),
                             plan_for(ctx, link, dry_run=True, delete=link.mode is SyncMode.mirror), timeout=600)
    except UserError as exc:
        row.error = exc.message
        return row
    pending = found.sent
    row.pending_files = len(pending)
    row.pending_bytes = sum(i.size for i in pending)
    row.pending_deletions = len(found.deleted)
    oldest = min((i.mtime.timestamp() for i in pending if i.mtime is not None), default=None)
    row.lag_seconds = 0.0 if oldest is None else max(0.0, (now or time.time()) - oldest)
    return row


# --- what the sync role installs -------------------------------------------------------------------------------


def client_key(ctx: FleetContext, host: str) -> tuple[str, str]:
    """The source host's sync key pair (private OpenSSH PEM, public line), made once into the secret store."""
    return ssh_key_pair(f"local:{key_secret(host)}", ctx.secrets, f"sync-{host}@{ctx.fleet.name}")


def known_host_keys(files: SshFiles, names: list[str]) -> list[str]:
    """`keytype key` of the first of `names` that the operator's known_hosts knows (hashed entries too)."""
    if not files.known_hosts.is_file():
        return []
    for name in names:
        done = subprocess.run(["ssh-keygen", "-F", name, "-f", str(files.known_hosts)], capture_output=True,
                              text=True, check=False)
        keys = [" ".join(line.split()[1:3]) for line in done.stdout.splitlines()
                if line.strip() and not line.startswith("#") and len(line.split()) >= 3]
        if keys:
            return keys
    return []


def host_material(env: str, host: str) -> dict[str, object]:
    """What the `sync` role installs on `host`: as a source, its private key and the host keys of the
    destinations it pushes to (as it addresses them); as a destination, the public key of each source host that
    pushes to it. Keys are made in the secret store on first use."""
    ctx = FleetContext.load(env, "ssh")
    # Ansible looks this up for many hosts at once, in parallel processes: make each key exactly once.
    with open(ctx.state_dir / ".sync-material.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _host_material(ctx, host)


def _host_material(ctx: FleetContext, host: str) -> dict[str, object]:
    remote = [link for link in transport_links(ctx.fleet) if not link.local]
    pushes = [link for link in remote if link.source == host]
    inbound = [link for link in remote if link.destination == host]
    files = SshFiles.of(ctx.state_dir)
    known: list[str] = []
    for link in pushes:
        target = ctx.fleet.hosts[link.destination]
        address = address_of(ctx, link)
        keys = known_host_keys(files, [link.destination, str(target.ssh_address), str(target.address)])
        if not keys:
            raise UserError(f"the operator's known_hosts ({files.known_hosts}) has no key of {link.destination}",
                            f"connect to {link.destination} once (or run `spark lab up` in the lab) so that its "
                            "key is known, then run the role again")
        name = address if target.ssh.port == 22 else f"[{address}]:{target.ssh.port}"
        known += [f"{name} {key}" for key in keys]
    private = client_key(ctx, host)[0] if pushes else None
    public = {link.source: client_key(ctx, link.source)[1] for link in inbound}
    return {"private_key": private, "known_hosts": sorted(set(known)), "public_keys": public}
