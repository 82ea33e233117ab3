"""Tier migration: the scans, the journaled move of each file, recall, and the catalog that says where files are.

The move, per file (in batches: one call per step for many files):
  journal `planned` → copy to a temporary name below the destination folder (`.spark-tier-incoming/`, through
  the transfer engine's rsync, whose sum of each source as it read it is the source's hash) → `copied` → flush
  the batch's copies to disk (one syncfs of the destination's filesystem: an fsync per small file costs a journal
  commit each) and hash each copy, compare with the source's hash → `verified` → rename into place (the folder
  flushed) → `placed` → commit the catalog entry (SQLite, synchronous) → `committed` → delete the source if it
  is still what was copied → `done`.
The steps from the copy on go chunk by chunk, the chunk before settling while rsync copies the next (`move_batch`).
A file is deleted from its tier only after its verified copy has its final name and the catalog says so; until
then it stays where it was. No name shows a partial file: copies are written below the staging folder (rsync
writes each under a temporary name of its own there too) and renamed whole.

The journal is a file in the state directory of whoever runs the pass (a site's worker, or the operator's
`spark tier run`): the batch as JSON, written atomically (temporary file, fsync, rename), then a line appended
(fsynced) after each step of the batch with what changed. Why there and
not on the source host: the steps span two hosts and the catalog, and the controller is the one process that
sees all three; its state directory takes an atomic write without a round trip. Replay does not trust the journal
alone either: it looks at the hosts (is the staged copy whole and equal? is the final name there?), so a pass
started elsewhere after a crash (whose controller has no journal) still converges: the one writer per tier host
(the flow's lock) lets it remove whatever a dead pass left below the staging folder, and a file whose copy was
placed but never committed is moved again (its copy is found equal and committed, not sent again).

Replay (at the start of every pass over a pair of hosts, and of `recall`): an entry `planned` or `copied` whose
staged copy is whole and equal goes on as verified, one whose final name already holds the equal copy (a sync
job's) as placed, else its temporary is removed and the file stays where it was (the next pass moves it);
`verified` is placed, committed, deleted; `placed` committed and deleted; `committed` deleted.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import json
import os
import posixpath
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any

from primespark.context import FleetContext
from primespark.data import tierside, transfer
from primespark.data.layout import inside, recall_folder, tier_of, transport_links
from primespark.data.tiers import FileInfo, HostScan, TierPlan, next_tier, plan_boundary
from primespark.data.transfer import Route, TransferPlan
from primespark.errors import StepFailed, UserError
from primespark.fleet.model import TIER_ORDER, Fleet, TierName
from primespark.hosts import Runner
from primespark.secrets import atomic_write

SOURCE = Path(tierside.__file__).read_text()
STAGING = tierside.STAGING
CATALOG_DEFAULT = ".spark-tier/catalog.sqlite"
BATCH_FILES = 200_000
BATCH_BYTES = 4 * 1024**3
CHUNK_FILES = 25_000  # a batch is copied in chunks of about this many files or bytes (see move_batch)
CHUNK_BYTES = 1024**3
# how far the copies may run ahead of their settling (see move_batch): at most this many chunks copied and not yet
# settled when rsync starts the next one
UNSETTLED_CHUNKS = 4
WRITEBACK_SECONDS = 1.0  # while a copy runs, how often its destination is asked to write it to disk
ORDER = ("planned", "copied", "verified", "placed", "committed", "undoing", "done", "abandoned")
FINISHED = ("done", "abandoned")


class TierStepFailed(StepFailed):
    """A host-side step of tier migration failed; `transient` when the host did not answer."""

    def __init__(self, message: str, fix: str = "", *, returncode: int | None = None, stderr: str = "",
                 transient: bool = False) -> None:
        super().__init__(message, fix, returncode=returncode, stderr=stderr)
        self.transient = transient


def as_columns(fields: dict[str, list[Any]], **roots: str) -> dict[str, Any]:
    """A request's entries as one list per field (JSON of lists: a dict per entry cost both ends most of a large
    step's time), each path field named in `roots` written below its root where every entry's path is below it, a
    field with one value for every entry sent once (`same`), and one equal to a field before it (a batch's staged
    and final paths, below their roots) sent as that field's name (`alias`). The host reads it back with
    `tierside.columns` or `tierside.absolute`."""
    count = len(next(iter(fields.values()), []))
    sent: dict[str, list[Any]] = {}
    used, same, alias = {}, {}, {}
    for key, values in fields.items():
        if key in roots:
            prefix = roots[key].rstrip("/") + "/"
            if all(value.startswith(prefix) for value in values):
                values = [value[len(prefix):] for value in values]
                used[key] = prefix
        if values and values.count(values[0]) == count:
            same[key] = values[0]
            continue
        equal = next((other for other, its in sent.items() if its == values), None)
        if equal is None:
            sent[key] = values
        else:
            alias[key] = equal
    return {"count": count, "columns": sent, "roots": used, "same": same, "alias": alias}


def _fields(entries: list[Entry], names: tuple[str, ...]) -> dict[str, list[Any]]:
    """`entries`' fields `names`, a list each (for `as_columns`)."""
    return {name: list(map(attrgetter(name), entries)) for name in names}


def side(runner: Runner, op: str, spec: dict[str, Any], timeout: float = 6 * 3600) -> dict[str, Any]:
    """Run one tier-side operation on `runner`'s host."""
    done = runner.run([runner.python, "-c", SOURCE, op], stdin=json.dumps(spec).encode(), timeout=timeout)
    try:
        out = json.loads(done.text)
    except ValueError:
        out = None
    if done.returncode != 0 or not isinstance(out, dict):
        last = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise TierStepFailed(f"tier {op} on {runner.name} failed (exit {done.returncode}): {last[0][:300]}",
                             "check the host's tier folder (is it there, writable, mounted?)",
                             returncode=done.returncode, stderr=done.stderr, transient=done.returncode == 255)
    return out


# --- where things are --------------------------------------------------------------------------------------------


def tier_names(fleet: Fleet) -> list[TierName]:
    return [t for t in TIER_ORDER if t in fleet.tiers]


def catalog_place(fleet: Fleet) -> tuple[str, str]:
    """The catalog's host and path: on the warm tier's first host, where the fleet says (or its default)."""
    warm = fleet.tiers.get(TierName.warm)
    if warm is None:
        raise UserError(f"fleet {fleet.name} has no warm tier, which keeps the migration catalog",
                        "add tiers.warm to the fleet")
    return warm.hosts[0], warm.catalog or f"{warm.path.rstrip('/')}/{CATALOG_DEFAULT}"


def destination_root(fleet: Fleet, to: TierName, source_host: str, source_tier: TierName) -> str:
    """Where the next tier keeps a host's tier folder: `<tier path>/<source host>` (the sync jobs' layout)."""
    return f"{fleet.tiers[to].path.rstrip('/')}/{source_host}"


def origin_of(fleet: Fleet, host: str, path: str) -> tuple[str, str]:
    """The original host and path of a file at `host:path`, read back from the layout: a lower tier keeps
    another host's data in `<tier path>/<that host>/<path below that host's tier>`."""
    tier = tier_of(fleet, host, path)
    if tier is None or tier is TierName.hot:
        return host, path
    root = fleet.tiers[tier].path.rstrip("/")
    first, _, rest = posixpath.relpath(path, root).partition("/")
    upper = [t for t in TIER_ORDER[:TIER_ORDER.index(tier)] if t in fleet.tiers]
    for name in upper:
        if first in fleet.tiers[name].hosts and rest:
            return origin_of(fleet, first, f"{fleet.tiers[name].path.rstrip('/')}/{rest}")
    return host, path


def route_to(ctx: FleetContext, source: str, destination: str, folder: str) -> tuple[Route, str]:
    """How `source` pushes into `folder` on `destination`: the transfer engine's local route (the local transport,
    or one host), else a sync job's account on the destination whose folder holds it."""
    if ctx.transport == "local" or source == destination:
        return transfer.local_route(), folder
    from primespark.data.sync import route_for

    for link in transport_links(ctx.fleet):
        if link.source == source and link.destination == destination and inside(folder, link.destination_path):
            below = posixpath.relpath(folder, link.destination_path)
            route, root = route_for(ctx, link)  # the account's: `/` is its folder
            return route, root if below == "." else f"/{below}"
    origin_tier = tier_of(ctx.fleet, destination, folder)
    recall = (f"; to recall, set `recall: true` on tier {origin_tier.value} and run the sync role"
              if origin_tier is not None and inside(folder, recall_folder(ctx.fleet, origin_tier)) else "")
    raise UserError(f"no sync job carries {source}'s data to {destination}:{folder}, and tier migration moves "
                    "files through a sync job's account", f"add a sync job from {source} into {folder} (or a folder "
                    f"above it) on {destination}, and run the sync role{recall}")


# --- scans -------------------------------------------------------------------------------------------------------


def scan_host(ctx: FleetContext, tier: TierName, host: str, listed: bool = True) -> tuple[HostScan, list[str]]:
    """A tier host's folder (its files, or with `listed=False` only its usage) and the hashes the host has."""
    spec = ctx.fleet.tiers[tier]
    catalog_host, catalog_path = catalog_place(ctx.fleet) if TierName.warm in ctx.fleet.tiers else ("", "")
    out = side(ctx.hosts.runner(host), "scan", {
        "root": spec.path, "marker": spec.pin_marker, "files": listed,
        "skip": [catalog_path] if host == catalog_host else []})
    opened = set(out["open"])
    files = tuple(FileInfo(p, size, mtime, atime, p in opened) for p, size, mtime, atime in out["files"])
    return HostScan(host, tier, spec.path, files, int(out["used"]), frozenset(out["markers"]),
                    bool(out["atime_kept"]), bool(out["exists"]), dict(out.get("leaves", {}))), list(out["hashes"])


def pass_hosts(ctx: FleetContext, tier: TierName, hosts: list[str] | None = None) -> list[str]:
    """The hosts a pass from `tier` scans: `hosts`, each checked to be one of the tier's, or all of them."""
    tiers = ctx.fleet.tiers
    if tier not in tiers:
        raise UserError(f"fleet {ctx.fleet.name} has no {tier.value} tier", "see `tiers:` in the fleet file")
    unknown = [h for h in hosts or [] if h not in tiers[tier].hosts]
    if unknown:
        raise UserError(f"{', '.join(unknown)} is not a host of the {tier.value} tier",
                        f"use one of: {', '.join(tiers[tier].hosts)}")
    return hosts or list(tiers[tier].hosts)


_pauses = {"count": 0, "was_enabled": False}
_pauses_lock = threading.Lock()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused (reference counting still frees every object the moment it is no
    longer used) while a pass makes and walks its hundreds of thousands of scan rows, plan entries, journal marks and
    request columns, which form no cycles: each collection walked all of them, a third of the controller's CPU in a
    pass of 100,000 files (2.1 → 1.5 s). A move collects what is young after each chunk (`collect_young`). Pauses
    nest and overlap (threads): the collector is back when the last one ends, if it was on before the first."""
    with _pauses_lock:
        if _pauses["count"] == 0:
            _pauses["was_enabled"] = gc.isenabled()
            gc.disable()
        _pauses["count"] += 1
    try:
        yield
    finally:
        with _pauses_lock:
            _pauses["count"] -= 1
            if _pauses["count"] == 0 and _pauses["was_enabled"]:
                gc.enable()


def collect_young() -> None:
    """While the collector is paused, after each chunk: the cycles made since the last chunk (a flow's Prefect
    client and its logging run beside a pass for hours) are freed, and the objects that stay (the batch's entries)
    are walked once, then no more (they go to the oldest generation, which only the collector's own runs walk)."""
    gc.collect(1)


@collector_paused()
def plan_pass(ctx: FleetContext, tier: TierName, hosts: list[str] | None = None, now: float | None = None
              ) -> tuple[TierPlan, str]:
    """The plan of a pass from `tier` (its hosts, or `hosts`), and the hash both ends have."""
    tiers = ctx.fleet.tiers
    chosen = pass_hosts(ctx, tier, hosts)
    lower = next_tier(tier, list(tiers))
    # every host scanned at once: the tier's files, and the next tier's usage (a walk of a large tier takes a while)
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="tier-scan") as pool:
        above = [pool.submit(scan_host, ctx, tier, host) for host in chosen]
        under = [] if lower is None else [(host, pool.submit(scan_host, ctx, lower, host, listed=False))
                                          for host in tiers[lower].hosts]
    scans, algorithms = [], {"sha256", "xxh3_128"}
    for future in above:
        found, hashes = future.result()
        scans.append(found)
        algorithms &= set(hashes)
    below: dict[str, int] = {}
    for host, future in under:
        found, hashes = future.result()
        if not found.exists:  # fail closed: files moved into an unmounted mount point would hide there
            raise UserError(f"the {found.tier.value} tier's folder {found.root} is missing on {host} (its disk not "
                            "mounted?): nothing was moved", "mount it, or create it if the tier is new "
                            "(the nas role does)")
        below[host] = found.used
        algorithms &= set(hashes)
    plan = plan_boundary(tiers, tier, scans, below, now or time.time())
    return plan, "xxh3_128" if "xxh3_128" in algorithms else "sha256"


# --- the journal -------------------------------------------------------------------------------------------------


@dataclass
class Entry:
    action: str  # move (down a tier) or recall (back to its original place)
    source: str  # the file's path on the source host
    rel: str  # its path below the batch's source folder (and below the staging and destination folders)
    staging: str
    final: str
    origin_host: str
    origin_path: str
    to_tier: str
    size: int
    mtime_ns: int
    hash: str | None = None
    step: str = "planned"
    note: str = ""
    atime_ns: int = 0  # the source's last access, given to the copy when it is placed


@dataclass
class Batch:
    source_host: str
    dest_host: str
    source_root: str
    dest_root: str
    algorithm: str
    entries: list[Entry] = field(default_factory=list)
    # each entry's (step, note, hash) as the journal on disk has them: a save appends only what changed
    saved: list[tuple[str, str, str | None]] | None = field(default=None, repr=False, compare=False)
    # the source's folders without subfolders and how many names each held when scanned (not journaled: only a
    # copy reads it, and a replay copies nothing)
    leaves: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    _positions: dict[int, int] = field(default_factory=dict, repr=False, compare=False)
    _found: dict[int, tuple[list[Entry], list[int]]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def staging_root(self) -> str:
        return f"{self.dest_root.rstrip('/')}/{STAGING}"

    @property
    def pending(self) -> int:
        return sum(1 for e in self.entries if e.step not in FINISHED)

    def at(self, *steps: str) -> list[Entry]:
        return [e for e in self.entries if e.step in steps]

    def positions(self, entries: list[Entry]) -> list[int]:
        """Where each of `entries` is in the batch (a chunk's, saved after each of its steps: found once; the list
        is kept with them, so that its id names no other list while they are)."""
        if len(self._positions) != len(self.entries):
            self._positions = {id(entry): index for index, entry in enumerate(self.entries)}
            self._found.clear()
        known = self._found.get(id(entries))
        if known is None or len(known[0]) != len(entries):
            known = self._found[id(entries)] = (entries, list(map(self._positions.__getitem__, map(id, entries))))
        return known[1]


def journal_path(ctx: FleetContext, source: str, dest: str) -> Path:
    return ctx.state_dir / "tiers" / "journal" / f"{source}--{dest}.json"


_MARK = attrgetter("step", "note", "hash")  # an entry's (step, note, hash): what a save records of it


def _marks(entries: list[Entry]) -> list[tuple[str, str, str | None]]:
    return list(map(_MARK, entries))


def _whole(path: Path) -> bool:
    """The journal is there and ends with a whole line (not with a save a crash cut short)."""
    try:
        with open(path, "rb") as journal:
            journal.seek(-1, os.SEEK_END)
            return journal.read(1) == b"\n"
    except OSError:  # missing, or empty (a seek before its start)
        return False


def _runs(indices: list[int]) -> list[list[int]]:
    """Consecutive indices as `[first, after_last]` pairs: a step that moves a whole batch is one pair."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and runs[-1][1] == index:
            runs[-1][1] = index + 1
        else:
            runs.append([index, index + 1])
    return runs


ENTRY_FIELDS = [f.name for f in fields(Entry)]
# an entry's paths, when each is a folder of its batch's (named here) + "/" + its `rel`: the folder written once
BELOW = {"source": "source_root", "staging": "staging_root", "final": "dest_root", "origin_path": "source_root"}
SHARED = ("action", "origin_host", "to_tier", "hash", "step", "note")  # often one value for the whole batch


def _packed(batch: Batch) -> dict[str, Any]:
    """The batch's entries as rows of the fields that differ between them, named once in `columns`; a field that
    has one value in every entry is in `same`, a path that is a folder of the batch's (`BELOW`) + "/" + `rel` in
    every entry is in `below` (with that folder + "/"). A pass's batch of 100,000 files: a fifth of the JSON, and
    a third of the time to make and write it, of a row of every field per entry."""
    entries = batch.entries
    # whole columns compared at once (list.count, list ==): a generator per field and entry took most of a save
    same = {}
    for name in SHARED if entries else ():
        values = list(map(attrgetter(name), entries))
        if values.count(values[0]) == len(values):
            same[name] = values[0]
    rels = list(map(attrgetter("rel"), entries))
    below = {}
    for name, root in BELOW.items():
        prefix = getattr(batch, root).rstrip("/") + "/"
        if list(map(attrgetter(name), entries)) == [prefix + rel for rel in rels]:
            below[name] = prefix
    columns = [name for name in ENTRY_FIELDS if name not in same and name not in below]
    row_of = itemgetter(*columns) if len(columns) > 1 else (lambda fields_of: (fields_of[columns[0]],))
    return {"columns": columns, "rows": list(map(row_of, map(vars, entries))), "same": same, "below": below}


def _unpacked(data: dict[str, Any]) -> list[Entry]:
    columns, same, below = data.pop("columns"), data.pop("same", {}), data.pop("below", {})
    entries = []
    for row in data.pop("rows"):
        values = {**same, **dict(zip(columns, row, strict=True))}
        values.update((name, prefix + values["rel"]) for name, prefix in below.items())
        entries.append(Entry(**values))
    return entries


def _write_whole(path: Path, batch: Batch) -> None:
    data = {f.name: getattr(batch, f.name) for f in fields(batch)
            if f.name not in ("entries", "saved", "leaves", "_positions", "_found")}
    atomic_write(path, json.dumps({**data, **_packed(batch)}) + "\n", 0o600)


def save_header(path: Path, batch: Batch) -> None:
    """The batch without its entries, written before any of its steps: it names the staging folder, so that a kill
    before the whole batch is written (by the next `save`, while the first chunk copies) has the replay remove what
    that copy staged; every source is still where it was."""
    _write_whole(path, Batch(batch.source_host, batch.dest_host, batch.source_root, batch.dest_root,
                             batch.algorithm))
    batch.saved = None


def save(path: Path, batch: Batch, entries: list[Entry] | None = None) -> None:
    """The journal: the whole batch once (written atomically), then one line per save with the entries whose step,
    note or hash changed (appended, fsynced). Rewriting a 100,000-entry batch after every step took longer than
    some of the steps; so did naming each entry of a step that moved them all (a line now names runs of entries
    that took the same step, and lists one by one only those whose hash changed). `entries`: the only ones a step
    changed (a chunk's: a list never changed once saved, whose positions are found once), the others not compared.
    After a save a crash cut short, the whole batch is written again."""
    if batch.saved is None or len(batch.saved) != len(batch.entries) or not _whole(path):
        _write_whole(path, batch)
        batch.saved = _marks(batch.entries)
        return
    # the marks made and compared as whole columns; only the changed ones looked at one by one
    if entries is None:
        indices: range | list[int] = range(len(batch.entries))
        marks, olds = _marks(batch.entries), batch.saved
    else:
        indices = batch.positions(entries)
        marks, olds = _marks(entries), list(map(batch.saved.__getitem__, indices))
    if marks == olds:
        return
    step_notes = {mark[:2] for mark in marks}
    if len(step_notes) == 1 and all(mark[2] == old[2] for mark, old in zip(marks, olds, strict=True)):
        # the common save: every entry at one step, no hash changed; the line names them all (one run, as a rule)
        (step, note), = step_notes
        _append(path, {"steps": [[step, note, _runs(sorted(indices))]], "set": []})
        for i, mark in zip(indices, marks, strict=True):
            batch.saved[i] = mark
        return
    changed = [(i, mark, old) for i, mark, old in zip(indices, marks, olds, strict=True) if mark != old]
    hashed: list[list[Any]] = []
    stepped: dict[tuple[str, str], list[int]] = {}
    for i, mark, old in changed:
        if mark[2] != old[2]:
            hashed.append([i, *mark])
        else:
            stepped.setdefault((mark[0], mark[1]), []).append(i)
    _append(path, {"steps": [[step, note, _runs(sorted(runs))] for (step, note), runs in stepped.items()],
                   "set": hashed})
    for i, mark, _ in changed:
        batch.saved[i] = mark


def _append(path: Path, line: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as journal:
        journal.write(json.dumps(line) + "\n")
        journal.flush()
        os.fsync(journal.fileno())


def load(path: Path) -> Batch | None:
    try:
        lines = path.read_text().splitlines()
        data = json.loads(lines[0])
        # a journal written before rows has each entry as a dict
        entries = _unpacked(data) if "rows" in data else [Entry(**e) for e in data.pop("entries")]
        for number, line in enumerate(lines[1:], 2):
            try:
                update = json.loads(line)
            except ValueError:
                if number == len(lines):
                    break  # a save cut short by a crash: its step counts as not recorded (replay looks at the hosts)
                raise
            for step, note, runs in update.get("steps", []):
                for first, after in runs:
                    if not 0 <= first < after <= len(entries):
                        raise IndexError(f"entries {first}-{after} of {len(entries)}")
                    for entry in entries[first:after]:
                        entry.step, entry.note = step, note
            for index, step, note, digest in update["set"]:
                entries[index].step, entries[index].note, entries[index].hash = step, note, digest
    except FileNotFoundError:
        return None
    except (OSError, ValueError, IndexError, KeyError, TypeError) as exc:
        raise UserError(f"the tier journal {path} cannot be read: {exc}",
                        "move it aside: the next pass then removes the copies it named below the staging folder, "
                        "and moves their files again") from exc
    batch = Batch(**data, entries=entries)
    batch.saved = _marks(batch.entries)
    return batch


def backlog(ctx: FleetContext) -> dict[str, int]:
    """Entries not finished in each journal (`source--dest`): what a replay has to do."""
    folder = ctx.state_dir / "tiers" / "journal"
    out = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        batch = load(path)
        out[path.stem] = batch.pending if batch else 0
    return out


# --- the steps ---------------------------------------------------------------------------------------------------


@dataclass
class BatchResult:
    source_host: str
    dest_host: str
    moved: int = 0
    bytes: int = 0
    already_there: int = 0  # the destination held an equal copy (a sync job's): committed, not sent again
    abandoned: dict[str, int] = field(default_factory=dict)  # why files stayed where they were
    replayed: int = 0
    example: str = ""  # one moved file's original place (`host:path`), for `spark tier where`

    def add(self, other: BatchResult) -> None:
        self.example = self.example or other.example
        self.moved += other.moved
        self.bytes += other.bytes
        self.already_there += other.already_there
        self.replayed += other.replayed
        for k, v in other.abandoned.items():
            self.abandoned[k] = self.abandoned.get(k, 0) + v


def _abandon(entry: Entry, why: str) -> None:
    entry.step, entry.note = "abandoned", why


def _hash_sources(ctx: FleetContext, batch: Batch, entries: list[Entry]) -> None:
    """The hashes of `entries`' sources, read on the source host: for the files whose copy rsync did not report (a
    final name that may hold the file already, a replayed copy, a host without XXH3)."""
    if not entries:
        return
    found = side(ctx.hosts.runner(batch.source_host), "hash",
                 {"paths": [e.source for e in entries], "algorithm": batch.algorithm})["hashes"]
    for entry in entries:
        got = found.get(entry.source)
        if got is None:
            _abandon(entry, "vanished or changed while read")
        elif (got[1], got[2]) != (entry.size, entry.mtime_ns):
            _abandon(entry, "changed since the scan")
        else:
            entry.hash = got[0]


def _hashed(value: str | None) -> bool:
    return value is not None and not value.startswith("size:")


def _check(ctx: FleetContext, batch: Batch, entries: list[Entry], replaying: bool,
           placing: frozenset[str] | None = None) -> None:
    """Each entry's staged copy (flushed, hashed) and final name against the source's hash: verified, placed (an
    equal copy has the final name already), or (after a copy, or in a replay) abandoned with its temporary
    removed. A source is read only where its hash is missing and a copy of the right size is there to compare.
    With `placing` (the folders a later copy writes in, as `_place`'s `keep`), the destination renames each copy
    it verified against a known hash into place in the same call (one call a chunk fewer; a replay after a kill
    in between finds such a copy placed by its hash)."""
    if not entries:
        return
    asked = _fields(entries, ("staging", "final", "size"))
    if placing is not None:  # what the destination places after it verified: the hash a copy must have, its times
        asked |= {"expect": list(map(attrgetter("hash"), entries)), **_fields(entries, ("atime_ns", "mtime_ns"))}
    found = side(ctx.hosts.runner(batch.dest_host), "check", {
        "algorithm": batch.algorithm, "staging_root": batch.staging_root,
        **({} if placing is None else {"place": {"keep": sorted(placing)}}),
        **as_columns(asked, staging=batch.staging_root, final=batch.dest_root)})
    staged, final = found["staging"], found["final"]
    placed = found.get("placed") or [False] * len(entries)
    _hash_sources(ctx, batch, [e for e, here, there in zip(entries, staged, final, strict=True)
                               if e.hash is None and (_hashed(here) or _hashed(there))])
    stale = []
    for entry, here, there, moved in zip(entries, staged, final, placed, strict=True):
        if entry.step == "abandoned":  # its source changed or vanished: a staged copy is no good
            if here is not None:
                stale.append(entry.staging)
        elif entry.hash is not None and here == entry.hash:
            entry.step = "placed" if moved else "verified"
        elif entry.hash is not None and there == entry.hash:
            # a copy the stopped pass's check had placed is no copy that was there before it (the report counts those)
            entry.note = "placed before the pass stopped" if replaying and entry.step == "copied" else "already there"
            entry.step = "placed"
            if here is not None:
                stale.append(entry.staging)
        elif entry.step == "copied" or replaying:
            if here is not None:
                stale.append(entry.staging)
            _abandon(entry, "interrupted copy (removed)" if replaying else "copy differs from the source")
    if stale:
        side(ctx.hosts.runner(batch.dest_host), "remove", {"paths": stale})


def _folder_there(ctx: FleetContext, host: str, folder: str) -> bool:
    """Whether `folder` is on `host`; a host that cannot tell (a failing `test`) counts as yes. One command rather than
    a check of every planned file (0.4 s for 100,000) where the next tier has no folder for the host yet."""
    return ctx.hosts.runner(host).run(["test", "!", "-e", folder], timeout=60).returncode != 0


def _write_back(runner: Runner, folder: str, copied: threading.Event) -> None:
    """Until `copied`, have the destination's filesystem start writing what the copy wrote so far: the check's flush
    then finds little left to wait for, where the kernel would otherwise hold a copy of gigabytes in memory until
    that flush (its background writeback starts at a tenth of the memory). A hint only: a call that fails (the
    staging folder not made yet) costs nothing but that overlap; the check's flush is what the protocol relies on."""
    while not copied.wait(WRITEBACK_SECONDS):
        try:
            runner.run(["sync", "-f", folder], timeout=60)
        except StepFailed:
            continue


def _of(batch: Batch, entries: list[Entry] | None, *steps: str) -> list[Entry]:
    """The entries at `steps`: of `entries` (one chunk of the batch), or of the whole batch."""
    return batch.at(*steps) if entries is None else [e for e in entries if e.step in steps]


def transfer_names(batch: Batch, todo: list[Entry]) -> tuple[str, ...]:
    """What rsync is told to copy for `todo`: a folder of the source whose every name (when scanned) is one of
    `todo` and which has no subfolder, by its name (rsync then walks it, rather than reading a list of each file:
    `--files-from` costs it a read per byte and more stats per file); every other file by its own. A name that
    appeared in such a folder since the scan is copied too, but it is no entry: never placed (the staging folder
    is emptied at the batch's end), and its source stays."""
    in_folder: dict[str, int] = {}
    for entry in todo:
        folder = posixpath.dirname(entry.rel)
        in_folder[folder] = in_folder.get(folder, 0) + 1
    whole = {folder for folder, count in in_folder.items() if folder and batch.leaves.get(folder) == count}
    if not whole:
        return tuple(e.rel for e in todo)
    return (*sorted(whole), *(e.rel for e in todo if posixpath.dirname(e.rel) not in whole))


def _copy(ctx: FleetContext, batch: Batch, entries: list[Entry] | None = None,
          progress: Callable[[transfer.Progress], None] | None = None,
          journaled: Callable[[], object] | None = None) -> None:
    """rsync the planned entries to the staging folder, then mark them copied; `journaled` returns once the journal
    holds the entries (their marks must not change while they are written)."""
    todo = _of(batch, entries, "planned")
    if not todo:
        return
    route, destination = route_to(ctx, batch.source_host, batch.dest_host, batch.staging_root)
    # a trailing slash: a folder even when it does not exist yet and one file is sent (rsync would name the
    # file after it)
    # no fsync per file: the check flushes the whole batch with one syncfs before it hashes the copies; no
    # --delay-updates: the staging folder is the copies' waiting room already (rsync still writes each file under
    # a temporary name there, and a replay removes whatever a killed copy left)
    plan = TransferPlan(batch.source_root, destination.rstrip("/") + "/", route,
                        files=transfer_names(batch, todo), fsync=False, delay_updates=False)
    copied = threading.Event()
    writeback = threading.Thread(target=_write_back, args=(ctx.hosts.runner(batch.dest_host), batch.staging_root,
                                                           copied), daemon=True)
    writeback.start()
    try:
        report = transfer.run(ctx.hosts.runner(batch.source_host), plan, timeout=6 * 3600, progress=progress)
    finally:
        copied.set()
        writeback.join()
    # the sum rsync took of each source as it read it (its receiver checked the copy against it): the source's hash,
    # without reading it a second time; the check hashes the flushed copy and compares
    sums = {item.path: item.checksum for item in report.sent if item.checksum} \
        if batch.algorithm == transfer.CHECKSUM_AS else {}
    if journaled is not None:
        journaled()
    for entry in todo:
        entry.step = "copied"
        entry.hash = f"{batch.algorithm}:{sums[entry.rel]}" if entry.rel in sums else None


def _place(ctx: FleetContext, batch: Batch, entries: list[Entry] | None = None, keep: frozenset[str] = frozenset()
           ) -> None:
    """Rename the verified copies into place; a staged folder in `keep` (a later chunk's copy writes below it) is
    never renamed whole."""
    todo = _of(batch, entries, "verified")
    if not todo:
        return
    rows = side(ctx.hosts.runner(batch.dest_host), "place",
                {"keep": sorted(keep), **as_columns(_fields(todo, ("staging", "final", "atime_ns", "mtime_ns")),
                                                    staging=batch.staging_root, final=batch.dest_root)})["entries"]
    for entry, row in zip(todo, rows, strict=True):
        if row == "placed":
            entry.step = "placed"
        else:
            _abandon(entry, "its verified copy vanished before it was placed")


def catalog_side(ctx: FleetContext, op: str, **spec: Any) -> dict[str, Any]:
    host, path = catalog_place(ctx.fleet)
    return side(ctx.hosts.runner(host), "catalog", {"db": path, "op": op, **spec}, timeout=600)


def _commit(ctx: FleetContext, batch: Batch, entries: list[Entry] | None = None) -> None:
    todo = _of(batch, entries, "placed")
    if not todo:
        return
    moves = [e for e in todo if e.action == "move"]
    recalls = [[e.origin_host, e.origin_path] for e in todo if e.action == "recall"]
    if moves:  # the catalog's rows (tierside.COLUMNS) as columns: most are one value for the whole chunk
        fields = _fields(moves, ("origin_host", "origin_path", "size", "hash"))
        catalog_side(ctx, "commit", **as_columns(
            {**fields, "tier": list(map(attrgetter("to_tier"), moves)), "host": [batch.dest_host] * len(moves),
             "path": list(map(attrgetter("final"), moves)), "moved_at": [time.time()] * len(moves)},
            origin_path=batch.source_root, path=batch.dest_root))
    if recalls:
        catalog_side(ctx, "drop", keys=recalls)
    for entry in todo:
        entry.step = "committed"


def _delete(ctx: FleetContext, batch: Batch, entries: list[Entry] | None = None) -> list[Entry]:
    """Delete each committed source that is still what was copied; those that changed meanwhile are undone."""
    todo = _of(batch, entries, "committed")
    if not todo:
        return []
    rows = side(ctx.hosts.runner(batch.source_host), "delete",
                # a pass's source root is its tier's folder, whose ledger the backups read (a recall's is not)
                {"root": batch.source_root if todo[0].action == "move" else None,
                 **as_columns({"path": list(map(attrgetter("source"), todo)),
                               **_fields(todo, ("size", "mtime_ns"))}, path=batch.source_root)})["entries"]
    changed = []
    for entry, row in zip(todo, rows, strict=True):
        if row == "changed" and entry.action == "move":
            entry.step, entry.note = "undoing", "changed while it moved: stays, its copy removed"
            changed.append(entry)
        else:
            entry.step = "done"
            if row == "changed":
                entry.note = "recalled; the lower tier's copy had changed and stays"
    return changed


def _undo(ctx: FleetContext, batch: Batch, entries: list[Entry] | None = None) -> None:
    """A source that changed while it moved keeps its place: its catalog entry goes, then its copy."""
    todo = _of(batch, entries, "undoing")
    if not todo:
        return
    catalog_side(ctx, "drop", keys=[[e.origin_host, e.origin_path] for e in todo])
    side(ctx.hosts.runner(batch.dest_host), "remove", {"paths": [e.final for e in todo]})
    for entry in todo:
        _abandon(entry, entry.note or "changed while it moved")


def _after_check(ctx: FleetContext, batch: Batch, record: Callable[[list[Entry] | None], None],
                 entries: list[Entry] | None = None, keep: frozenset[str] = frozenset()) -> None:
    """The steps after verification, each followed by `record` (the journal's save of what it changed): place,
    commit, delete (undo what changed); of `entries` (a chunk), or of the whole batch."""
    _place(ctx, batch, entries, keep)
    record(entries)
    _commit(ctx, batch, entries)
    record(entries)
    if _delete(ctx, batch, entries):
        record(entries)
        _undo(ctx, batch, entries)
    record(entries)


def finish(ctx: FleetContext, batch: Batch, journal: Path) -> None:
    """What a batch has left after verification (`_after_check`), then its end: the staging folder emptied, the
    access times of files that stayed given back, the journal removed."""
    _after_check(ctx, batch, lambda entries: save(journal, batch, entries))
    side(ctx.hosts.runner(batch.dest_host), "remove", {"staging_roots": [batch.staging_root], "all": True})
    stayed = [{"path": e.source, "size": e.size, "mtime_ns": e.mtime_ns, "atime_ns": e.atime_ns}
              for e in batch.at("abandoned") if e.atime_ns]
    if stayed:
        side(ctx.hosts.runner(batch.source_host), "restore_times", {"entries": stayed})
    journal.unlink(missing_ok=True)


def _result(batch: Batch, replayed: bool = False) -> BatchResult:
    result = BatchResult(batch.source_host, batch.dest_host)
    for entry in batch.entries:
        if entry.step == "done":
            result.example = result.example or f"{entry.origin_host}:{entry.origin_path}"
            result.moved += 1
            result.bytes += entry.size
            result.already_there += int(entry.note == "already there")
        elif entry.step == "abandoned":
            key = entry.note or "abandoned"
            result.abandoned[key] = result.abandoned.get(key, 0) + 1
    if replayed:
        result.replayed = len(batch.entries)
    return result


def replay(ctx: FleetContext, source: str, dest: str) -> BatchResult | None:
    """Finish what a killed pass between `source` and `dest` left (see the module's doc)."""
    journal = journal_path(ctx, source, dest)
    batch = load(journal)
    if batch is None:
        return None
    _check(ctx, batch, batch.at("planned", "copied"), replaying=True)
    save(journal, batch)
    finish(ctx, batch, journal)
    return _result(batch, replayed=True)


def chunks(entries: list[Entry]) -> list[list[Entry]]:
    """`entries` cut on folder boundaries (a folder's files all in one chunk, however many: rsync is told its name,
    and it is placed in one rename), in path order, each chunk about CHUNK_FILES files or CHUNK_BYTES: the pieces a
    batch is copied in. A folder of more than CHUNK_BYTES is cut by bytes (its files are few: named one by one):
    the pass ends on the settling of its last chunk, which waits for the copy before it. Chunks of smaller files go
    first: settling many small files takes longer than copying them, and large ones the other way round, so the
    small files' settling runs beside the large files' copy, and the pass ends on a chunk quick to settle."""
    by_folder: dict[str, list[Entry]] = {}
    for entry in sorted(entries, key=lambda e: e.rel):
        by_folder.setdefault(posixpath.dirname(entry.rel), []).append(entry)
    out: list[list[Entry]] = []
    current: list[Entry] = []
    size = 0
    for members in by_folder.values():
        if current and (len(current) + len(members) > CHUNK_FILES or size >= CHUNK_BYTES):
            out.append(current)
            current, size = [], 0
        if sum(e.size for e in members) <= CHUNK_BYTES:
            current += members
            size += sum(e.size for e in members)
            continue
        if current:  # the folders before it on their own: its pieces hold only its files
            out.append(current)
            current, size = [], 0
        for entry in members:
            if current and size >= CHUNK_BYTES:
                out.append(current)
                current, size = [], 0
            current.append(entry)
            size += entry.size
        out.append(current)  # its last piece on its own too (with small files after it, it would go first)
        current, size = [], 0
    out = [*out, current] if current else out
    return sorted(out, key=lambda chunk: sum(e.size for e in chunk) / len(chunk))  # stable: else path order


def _written_in(batch: Batch, chunk: list[Entry]) -> set[str]:
    """The staged folders `chunk`'s copy writes in, and every folder above them up to the staging root."""
    root = batch.staging_root.rstrip("/")
    folders: set[str] = set()
    for entry in chunk:
        folder = posixpath.dirname(entry.staging)
        while folder not in folders and len(folder) > len(root):
            folders.add(folder)
            folder = posixpath.dirname(folder)
    return folders


def _copy_and_settle(pieces: list[list[Entry]], copy: Callable[[int, list[Entry]], None],
                     settle: Callable[[list[Entry], frozenset[str]], None], keeps: list[frozenset[str]]) -> None:
    """Each chunk copied in turn in this thread and settled in order in a second one, the copies at most
    UNSETTLED_CHUNKS chunks ahead of the settling; `keeps`: each chunk's folders that later copies write in. A
    failed settling stops the copies at the next chunk; after a failure in either thread, the chunks queued for
    settling are left as they are (copied: the replay verifies them)."""
    stopped = threading.Event()

    def settle_unless_stopped(chunk: list[Entry], keep: frozenset[str]) -> None:
        if stopped.is_set():
            return
        try:
            settle(chunk, keep)
        except BaseException:
            stopped.set()
            raise

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tier-settle") as behind:
        settling: list[Future[None]] = []  # one per chunk copied
        try:
            for index, chunk in enumerate(pieces):
                for future in settling:
                    if future.done():
                        future.result()  # a chunk's settling failed: raised here, before more is copied
                if index > UNSETTLED_CHUNKS:
                    settling[index - 1 - UNSETTLED_CHUNKS].result()
                copy(index, chunk)
                # in the caller's context (its flow run's settings and run): a bare thread's Prefect logger would
                # otherwise send the progress lines to Prefect's default server, a temporary one started for them
                settling.append(behind.submit(contextvars.copy_context().run, settle_unless_stopped, chunk,
                                              keeps[index]))
            for future in settling:
                future.result()
        except BaseException:
            stopped.set()
            raise


def move_batch(ctx: FleetContext, batch: Batch, progress: Callable[[str], None] | None = None) -> BatchResult:
    """One batch through every step (the journal of its two hosts must be empty: replay it first). `progress` hears
    how far it is: after each chunk, and every `transfer.PROGRESS_SECONDS` of a long copy.

    The copy goes chunk by chunk (`chunks`); while rsync copies one chunk, the chunks before it are checked,
    placed, committed and deleted in a second thread, in order (`_copy_and_settle`; rsync keeps about one core
    busy, those steps are mostly the other core's work and the disk's). Settling many small files takes longer than
    copying them: the copies run ahead (their copies wait in the staging folder), and the settling catches up
    beside the large files' copy. Each entry still takes every step in order; the journal's saves are serialized.
    A folder a later chunk writes in is never renamed whole while that copy may be running."""
    journal = journal_path(ctx, batch.source_host, batch.dest_host)
    if journal.exists():
        raise UserError(f"the tier journal {journal} is not finished", "replay it first (every pass does)")
    saving = threading.Lock()
    pair, started = f"{batch.source_host} → {batch.dest_host}", time.monotonic()
    moved = {"files": 0, "bytes": 0}  # by the chunks settled so far

    def record(entries: list[Entry] | None = None) -> None:
        with saving:
            save(journal, batch, entries)  # a chunk's step: only its entries compared with the journal

    def settle(chunk: list[Entry], keep: frozenset[str]) -> None:
        _check(ctx, batch, _of(batch, chunk, "copied"), replaying=False, placing=keep)
        record(chunk)
        _after_check(ctx, batch, record, chunk, keep)
        done = [e for e in chunk if e.step == "done"]
        moved["files"] += len(done)
        moved["bytes"] += sum(e.size for e in done)
        if progress is not None:
            progress(f"{pair}: {moved['files']} of {len(todo)} files moved ({transfer.human_size(moved['bytes'])} "
                     f"of {transfer.human_size(todo_bytes)}) in {time.monotonic() - started:.0f} s")
        collect_young()

    def copying(index: int) -> Callable[[transfer.Progress], None] | None:
        if progress is None:
            return None
        return lambda so_far: progress(f"{pair}: copying chunk {index + 1} of {len(pieces)}: {so_far.text}")

    save_header(journal, batch)
    if _folder_there(ctx, batch.dest_host, batch.dest_root):  # else nothing can be there, staged or placed
        _check(ctx, batch, batch.at("planned"), replaying=False)  # equal copies already there (a sync job's)
    todo = batch.at("planned")  # to copy: those not already there
    todo_bytes = sum(e.size for e in todo)
    pieces = chunks(todo)
    written = [_written_in(batch, chunk) for chunk in pieces]
    # the whole batch (0.2 s for 100,000 entries) is written while rsync copies the first chunk; that copy marks its
    # entries only once it is written, and a kill before finds the header: its replay empties the staging folder
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tier-journal") as writer:
        whole = writer.submit(contextvars.copy_context().run, record)

        def copy(index: int, chunk: list[Entry]) -> None:
            _copy(ctx, batch, chunk, copying(index), journaled=whole.result)
            record(chunk)

        _copy_and_settle(pieces, copy, settle,
                         [frozenset().union(*written[index + 1:]) for index in range(len(pieces))])
    finish(ctx, batch, journal)  # the entries a sync job had copied already, and the batch's end
    return _result(batch)


def batches(ctx: FleetContext, plan: TierPlan, algorithm: str) -> Iterator[Batch]:
    """The plan's moves grouped by source and receiving host, at most BATCH_FILES files or BATCH_BYTES each."""
    assert plan.to is not None
    root = ctx.fleet.tiers[plan.tier].path.rstrip("/")
    pairs: dict[tuple[str, str], list[Any]] = {}
    for move in plan.moves:
        pairs.setdefault((move.host, move.destination), []).append(move)
    for (source, dest), moves in pairs.items():
        dest_root = destination_root(ctx.fleet, plan.to, source, plan.tier)
        leaves = plan.leaves.get(source, {})
        batch = Batch(source, dest, root, dest_root, algorithm, leaves=leaves)
        staging_root = batch.staging_root
        size = 0
        from_hot, to_tier = plan.tier is TierName.hot, plan.to.value  # once, not per file (an enum's lookup)
        for move in moves:
            path = f"{root}/{move.path}"
            # a hot tier's file is where it was made; a lower tier's layout names its origin
            origin_host, origin_path = (source, path) if from_hot else origin_of(ctx.fleet, source, path)
            batch.entries.append(Entry("move", path, move.path, f"{staging_root}/{move.path}",
                                       f"{dest_root}/{move.path}", origin_host, origin_path, to_tier,
                                       move.size, move.mtime_ns, atime_ns=move.atime_ns))
            size += move.size
            if len(batch.entries) >= BATCH_FILES or size >= BATCH_BYTES:
                yield batch
                batch, size = Batch(source, dest, root, dest_root, algorithm, leaves=leaves), 0
        if batch.entries:
            yield batch


@collector_paused()
def run_plan(ctx: FleetContext, plan: TierPlan, algorithm: str,
             step: Callable[[Batch], BatchResult] | None = None) -> list[BatchResult]:
    """Replay each pair's journal, then move the plan's batches (`step` runs one batch: a flow's task)."""
    if plan.to is None:
        return []
    out: dict[tuple[str, str], BatchResult] = {}
    pairs = {(m.host, m.destination) for m in plan.moves}
    pairs |= {(h, d) for h in plan.usage if h in ctx.fleet.tiers[plan.tier].hosts
              for d in ctx.fleet.tiers[plan.to].hosts}
    for source, dest in sorted(pairs):
        replayed = replay(ctx, source, dest)
        if replayed is not None:
            out.setdefault((source, dest), BatchResult(source, dest)).add(replayed)
    for batch in batches(ctx, plan, algorithm):
        done = (step or (lambda b: move_batch(ctx, b)))(batch)
        out.setdefault((batch.source_host, batch.dest_host), BatchResult(batch.source_host, batch.dest_host)).add(done)
    return list(out.values())


# --- recall, the catalog's questions, rebuild -------------------------------------------------------------------


def parse_place(text: str) -> tuple[str | None, str]:
    """`HOST:PATH` or `PATH`."""
    host, sep, path = text.partition(":")
    if sep and path.startswith("/"):
        return host, path
    if text.startswith("/"):
        return None, text
    raise UserError(f"{text!r} is not a path", "give an absolute path, or HOST:/PATH")


def where(ctx: FleetContext, text: str) -> list[dict[str, Any]]:
    host, path = parse_place(text)
    rows = catalog_side(ctx, "where", path=path, host=host)["rows"]
    return [dict(zip(tierside.COLUMNS, row, strict=True)) for row in rows]


def ls(ctx: FleetContext, text: str) -> list[dict[str, Any]]:
    host, _, folder = text.partition(":")
    if host not in ctx.fleet.hosts:
        raise UserError(f"no host named {host!r} in fleet {ctx.fleet.name}", "write HOST or HOST:/FOLDER")
    rows = catalog_side(ctx, "ls", host=host, folder=folder)["rows"]
    return [dict(zip(tierside.COLUMNS, row, strict=True)) for row in rows]


def latest(ctx: FleetContext, hosts: list[str]) -> dict[str, Any] | None:
    """The catalog's last move from one of `hosts` (a pass that moved nothing can still show where files went)."""
    rows = catalog_side(ctx, "latest", hosts=hosts)["rows"]
    return dict(zip(tierside.COLUMNS, rows[0], strict=True)) if rows else None


def recall(ctx: FleetContext, text: str) -> BatchResult:
    """Bring a moved file back to its original place, through the same journaled protocol."""
    found = where(ctx, text)
    if not found:
        raise UserError(f"{text} is not in the catalog: it never moved (or was recalled already)",
                        "`spark tier ls HOST:/FOLDER` lists what moved")
    if len(found) > 1:
        raise UserError(f"{text} names files of several hosts: " + ", ".join(r["origin_host"] for r in found),
                        "write HOST:/PATH")
    row = found[0]
    holder, origin = row["host"], row["origin_host"]
    replay(ctx, holder, origin)
    scan = side(ctx.hosts.runner(holder), "hash", {"paths": [row["path"]], "algorithm": row["hash"].split(":")[0]})
    got = scan["hashes"][row["path"]]
    if got is None:
        raise UserError(f"the catalog says {row['origin_path']} is at {holder}:{row['path']}, and it is not there",
                        f"run `spark tier rebuild --env {ctx.env}`")
    if got[0] != row["hash"]:
        raise UserError(f"{holder}:{row['path']} differs from what the catalog recorded ({row['hash']})",
                        "restore it from the warm tier's backup")
    source_root, rel = posixpath.split(row["path"])
    # staged in the tier's recall folder, the one place a lower tier's host may write (recall_links), then renamed
    origin_tier = tier_of(ctx.fleet, origin, row["origin_path"])
    dest_root = (recall_folder(ctx.fleet, origin_tier) if origin_tier is not None
                 else posixpath.dirname(row["origin_path"]))
    batch = Batch(holder, origin, source_root, dest_root, row["hash"].split(":")[0])
    batch.entries.append(Entry("recall", row["path"], rel, f"{batch.staging_root}/{rel}", row["origin_path"],
                               origin, row["origin_path"], TierName.hot.value, got[1], got[2]))
    return move_batch(ctx, batch)


def rebuild(ctx: FleetContext) -> int:
    """The catalog again, from the lower tiers' contents (the layout names each file's original host and path):
    every file there that came from another host's tier and is no longer at its original place gets its entry,
    with its size and hash (`moved_at` becomes the rebuild's time). A file still at its original place is a sync
    job's copy, not a moved file."""
    rows: list[list[Any]] = []
    now = time.time()
    catalog_host, catalog_path = catalog_place(ctx.fleet)
    tiers = tier_names(ctx.fleet)
    for tier in tiers[1:]:
        spec = ctx.fleet.tiers[tier]
        for host in spec.hosts:
            skip = [catalog_path] if host == catalog_host else []
            runner = ctx.hosts.runner(host)
            hashes = side(runner, "scan", {"root": spec.path, "files": False, "skip": skip})["hashes"]
            out = side(runner, "scan", {"root": spec.path, "marker": "", "files": True, "skip": skip,
                                        "hash": "xxh3_128" if "xxh3_128" in hashes else "sha256"})
            for rel, size, _mtime_ns, _atime_ns, digest in out["files"]:
                path = f"{spec.path.rstrip('/')}/{rel}"
                origin_host, origin_path = origin_of(ctx.fleet, host, path)
                if (origin_host, origin_path) != (host, path) and digest is not None:
                    rows.append([origin_host, origin_path, tier.value, host, path, size, digest, now])
    still_there: set[tuple[str, str]] = set()
    for origin_host in sorted({r[0] for r in rows}):
        origin_tier = tier_of(ctx.fleet, origin_host, next(r[1] for r in rows if r[0] == origin_host))
        if origin_tier is None:
            continue
        root = ctx.fleet.tiers[origin_tier].path.rstrip("/")
        out = side(ctx.hosts.runner(origin_host), "scan", {"root": root, "files": True, "marker": ""})
        still_there |= {(origin_host, f"{root}/{f[0]}") for f in out["files"]}
    rows = [r for r in rows if (r[0], r[1]) not in still_there]
    catalog_side(ctx, "replace_all", rows=rows)
    return len(rows)


# --- a pass: what the flow runs, reports and publishes -------------------------------------------------------------


def move_or_resume(ctx: FleetContext, batch: Batch, progress: Callable[[str], None] | None = None) -> BatchResult:
    """One batch; tried again after a failure mid-way, its journal is replayed instead (so a retry neither
    repeats a finished step nor leaves a half-done one)."""
    if journal_path(ctx, batch.source_host, batch.dest_host).exists():
        return replay(ctx, batch.source_host, batch.dest_host) or BatchResult(batch.source_host, batch.dest_host)
    return move_batch(ctx, batch, progress)


@dataclass
class HostAfter:
    tier: str
    host: str
    capacity: int
    used: int
    oldest_age: float | None  # seconds since the least recently used file left was used (upper tier only)

    @property
    def ratio(self) -> float:
        return self.used / self.capacity if self.capacity else 0.0


def usage_after(ctx: FleetContext, plan: TierPlan, now: float | None = None) -> list[HostAfter]:
    """Each host of both tiers after the pass: bytes used; on the upper tier, the oldest file's age too."""
    from primespark.data.tiers import capacity_bytes

    out = []
    now = now or time.time()
    for tier in (plan.tier, plan.to):
        if tier is None:
            continue
        upper = tier is plan.tier
        for host in [h for h in plan.usage if h in ctx.fleet.tiers[tier].hosts]:
            found, _ = scan_host(ctx, tier, host, listed=upper)
            oldest = min((f.last_used(found.atime_kept) for f in found.files), default=None)
            out.append(HostAfter(tier.value, host, capacity_bytes(ctx.fleet.tiers[tier]), found.used,
                                 None if oldest is None else max(0.0, now - oldest)))
    return out


def render_pass(plan: TierPlan, results: list[BatchResult], after: list[HostAfter]) -> str:
    """The report artifact of a pass: files and bytes moved per host, what stayed and why, usage before and
    after."""
    to = plan.to.value if plan.to else "—"
    lines = [f"# tier {plan.tier.value} → {to}", "", "| source | to | moved | bytes | already there | replayed | "
             "stayed |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        stayed = ", ".join(f"{k}: {v}" for k, v in sorted(r.abandoned.items())) or "—"
        lines.append(f"| {r.source_host} | {r.dest_host} | {r.moved} | {transfer.human_size(r.bytes)} | "
                     f"{r.already_there} | "
                     f"{r.replayed} | {stayed} |")
    lines += ["", "| host | tier | used before | used after | capacity | oldest file (days) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for a in after:
        before = plan.usage.get(a.host)
        first = f"{transfer.human_size(before.before)} ({before.ratio(before.before):.0%})" if before else "—"
        oldest = "—" if a.oldest_age is None else f"{a.oldest_age / 86400:.1f}"
        lines.append(f"| {a.host} | {a.tier} | {first} | {transfer.human_size(a.used)} ({a.ratio:.0%}) | "
                     f"{transfer.human_size(a.capacity)} | {oldest} |")
    counts = plan.skipped_by_reason()
    if counts:
        lines += ["", "## stayed, and why", *(f"- {reason}: {n}" for reason, n in sorted(counts.items()))]
        lines += [f"  - {s.host}:`{s.path}`: {s.reason}" for s in plan.skipped[:50]]
        lines += [f"  - {w.host}:`{w.path}`: {w.reason}" for w in plan.waiting[:50]]
    return "\n".join(lines) + "\n"
