"""Which files move down a tier, and why: the plan of one pass over a tier boundary (pure: no I/O).

The policy, per host of the upper tier (from the fleet's `tiers:`):
- a file moves when it was last used more than the tier's `max_age_days` ago ("last used": its access time where
  the filesystem keeps one and it is later than the modification time, else its modification time);
- when the host's tier folder is above its `high_watermark` (bytes in the folder over `capacity_gb`), the
  oldest-used files move too, until it would be at or below its `low_watermark`;
- never: a file some process holds open for writing, one modified in the last `min_age_minutes`, one matching
  a `pinned` glob, one in (or below) a folder holding the `pin_marker` file, one in an agent task's staging
  folder on the hot tier (`agents.execute.HOT_TIER_STAGING`: the task may still write there, and commits it by a
  rename);
- the next tier's capacity is respected: a move that would take the receiving host above its high watermark
  waits, and says so.
The order is deterministic: oldest first, then by path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from primespark.agents.execute import HOT_TIER_STAGING
from primespark.data.transfer import human_size
from primespark.fleet.model import TIER_ORDER, Tier, TierName

DAY = 86400.0
GB = 1000**3  # capacity_gb counts as the usage guard does (decimal gigabytes)
LIST_LIMIT = 200


def next_tier(tier: TierName, present: list[TierName]) -> TierName | None:
    """The next lower tier the fleet has."""
    later = [t for t in TIER_ORDER[TIER_ORDER.index(tier) + 1:] if t in present]
    return later[0] if later else None


@lru_cache(maxsize=256)
def _glob(pattern: str) -> re.Pattern[str]:
    """A path glob: `*` and `?` within one folder level, `**` across levels, `[...]` a set."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1:]:
            end = pattern.index("]", i + 1)
            out.append("[" + pattern[i + 1:end].replace("!", "^", 1) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def pinned_by_glob(path: str, globs: list[str]) -> str | None:
    """The first glob that pins `path` (relative to the tier's folder)."""
    return next((g for g in globs if _glob(g).match(path)), None)


def pinned_by_marker(path: str, markers: frozenset[str]) -> str | None:
    """The folder (relative) whose marker pins `path`: the file's own folder or any above it."""
    parts = path.split("/")[:-1]
    for depth in range(len(parts), -1, -1):
        folder = "/".join(parts[:depth])
        if folder in markers:
            return folder
    return None


@dataclass  # not frozen: a scan makes one per file, and a frozen dataclass's __init__ costs four times as much
class FileInfo:
    """One regular file below a tier folder, as the host's scan saw it."""

    path: str  # relative to the tier's folder on its host
    size: int
    mtime_ns: int
    atime_ns: int
    open_for_writing: bool = False

    @property
    def mtime(self) -> float:
        return self.mtime_ns / 1e9

    @property
    def atime(self) -> float:
        return self.atime_ns / 1e9

    def last_used(self, atime_kept: bool) -> float:
        return max(self.mtime, self.atime) if atime_kept else self.mtime


@dataclass(frozen=True)
class HostScan:
    """A tier host's folder: its files, the marked folders, the bytes it holds."""

    host: str
    tier: TierName
    root: str  # the folder scanned (the tier's path, or for a lower tier the whole tier path)
    files: tuple[FileInfo, ...]
    used: int
    markers: frozenset[str] = frozenset()
    atime_kept: bool = False
    exists: bool = True  # the tier's folder is there (a missing one on a lower tier: its disk is not mounted)
    # folders (relative) without subfolders, each with how many names it held (any kind, skipped ones too)
    leaves: dict[str, int] = field(default_factory=dict)


@dataclass  # not frozen: a plan makes one per file (see FileInfo)
class Candidate:
    host: str
    path: str  # relative to the host's scanned root
    size: int
    last_used: float
    mtime_ns: int
    reason: str
    destination: str = ""  # the receiving host of the next tier
    atime_ns: int = 0


@dataclass(frozen=True)
class Skipped:
    host: str
    path: str
    size: int
    reason: str


@dataclass
class HostUsage:
    host: str
    tier: str
    capacity: int
    before: int
    after: int  # if every planned move happens

    def ratio(self, used: int) -> float:
        return used / self.capacity if self.capacity else 0.0


@dataclass
class TierPlan:
    """One pass over a boundary: what moves (with why), what waits for room below, what stays (and why)."""

    tier: TierName
    to: TierName | None
    moves: list[Candidate] = field(default_factory=list)
    waiting: list[Candidate] = field(default_factory=list)  # would fill the next tier above its high watermark
    skipped: list[Skipped] = field(default_factory=list)
    usage: dict[str, HostUsage] = field(default_factory=dict)  # every host of both tiers
    leaves: dict[str, dict[str, int]] = field(default_factory=dict)  # each upper-tier host's scan's `leaves`

    @property
    def bytes(self) -> int:
        return sum(c.size for c in self.moves)

    def skipped_by_reason(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in [*self.skipped, *(Skipped(w.host, w.path, w.size, w.reason) for w in self.waiting)]:
            key = s.reason.split(":")[0]
            counts[key] = counts.get(key, 0) + 1
        return counts


def capacity_bytes(tier: Tier) -> int:
    return int(tier.capacity_gb * GB)


def _age(seconds: float) -> str:
    days = seconds / DAY
    return f"{days:.1f} days" if days >= 1 else f"{seconds / 3600:.1f} hours"


def _why_not(info: FileInfo, on_hot: bool, spec: Tier, markers: frozenset[str], now: float,
             globs: list[tuple[str, re.Pattern[str]]]) -> str | None:
    # a task writes files there and closes them while it runs (neither open nor fresh for long), then renames the
    # folder: moved away, its files would be missing from its result
    if on_hot and info.path.startswith(HOT_TIER_STAGING + "/"):
        return "an agent task's staging folder"
    if info.open_for_writing:
        return "open for writing"
    if now - info.mtime < spec.min_age_minutes * 60:
        return f"modified in the last {spec.min_age_minutes} minutes"
    for glob, pattern in globs:
        if pattern.match(info.path):
            return f"pinned: matches {glob!r}"
    folder = pinned_by_marker(info.path, markers) if markers else None
    if folder is not None:
        return f"pinned: {spec.pin_marker} in {folder or '.'}/"
    return None


# a move of one host's: the file, when it was last used, why it moves (the plan then picks its destination)
Move = tuple[FileInfo, float, str]


def _host_candidates(scan: HostScan, spec: Tier, now: float) -> tuple[list[Move], list[Skipped]]:
    """One upper-tier host: its moves by age, then by watermark; and what stays though it would have moved."""
    capacity = capacity_bytes(spec)
    globs = [(glob, _glob(glob)) for glob in spec.pinned]  # compiled once per host, not looked up per file
    on_hot = scan.tier is TierName.hot
    eligible: list[tuple[float, FileInfo]] = []
    held: list[tuple[FileInfo, str]] = []
    atime_kept = scan.atime_kept
    for info in scan.files:
        reason = _why_not(info, on_hot, spec, scan.markers, now, globs)
        if reason is None:  # FileInfo.last_used, without two calls per file
            eligible.append(((max(info.mtime_ns, info.atime_ns) if atime_kept else info.mtime_ns) / 1e9, info))
        else:
            held.append((info, reason))
    eligible.sort(key=lambda pair: (pair[0], pair[1].path))
    moves: list[Move] = []
    remaining = []
    older: dict[str, str] = {}  # one reason per age as written (0.1 day): files of one day share it
    for used_at, info in eligible:
        if spec.max_age_days is not None and now - used_at > spec.max_age_days * DAY:
            age = _age(now - used_at)
            reason = older.get(age) or older.setdefault(
                age, f"older than {spec.max_age_days} days (last used {age} ago)")
            moves.append((info, used_at, reason))
        else:
            remaining.append((used_at, info))
    left = scan.used - sum(info.size for info, _, _ in moves)
    skipped = [Skipped(scan.host, i.path, i.size, r) for i, r in held
               if spec.max_age_days is not None and now - i.last_used(scan.atime_kept) > spec.max_age_days * DAY]
    if scan.used > spec.high_watermark * capacity:
        why = (f"{scan.tier.value} tier above its high watermark ({scan.used / capacity:.0%} > "
               f"{spec.high_watermark:.0%}): oldest first until at most {spec.low_watermark:.0%}")
        for used_at, info in remaining:
            if left <= spec.low_watermark * capacity:
                break
            moves.append((info, used_at, why))
            left -= info.size
        if left > spec.low_watermark * capacity:
            skipped += [Skipped(scan.host, i.path, i.size, r) for i, r in held
                        if not (spec.max_age_days is not None
                                and now - i.last_used(scan.atime_kept) > spec.max_age_days * DAY)]
    return moves, skipped


def _roomiest_fit(room: list[HostUsage], size: int, high_watermark: float) -> HostUsage | None:
    """The host with the most room (the lowest ratio, then by name) that stays at or below `high_watermark` with
    `size` more; None if none does."""
    if len(room) == 1:  # one host below (a NAS): nothing to compare, asked once per file
        return room[0] if room[0].after + size <= high_watermark * room[0].capacity else None
    best: HostUsage | None = None
    best_key = (0.0, "")
    for usage in room:
        if usage.after + size <= high_watermark * usage.capacity:
            key = (usage.ratio(usage.after), usage.host)
            if best is None or key < best_key:
                best, best_key = usage, key
    return best


def plan_boundary(tiers: dict[TierName, Tier], tier: TierName, scans: list[HostScan], below: dict[str, int],
                  now: float) -> TierPlan:
    """The moves of one pass from `tier` to the next tier the fleet has. `scans`: the upper tier's hosts;
    `below`: bytes used on each host of the next tier. A move goes to the next tier's host with the most room
    that stays at or below its high watermark after it; when none does, it waits."""
    lower = next_tier(tier, list(tiers))
    plan = TierPlan(tier, lower)
    spec = tiers[tier]
    for scan in scans:
        plan.usage[scan.host] = HostUsage(scan.host, tier.value, capacity_bytes(spec), scan.used, scan.used)
        plan.leaves[scan.host] = scan.leaves
    if lower is None:
        return plan
    lower_spec = tiers[lower]
    room = {h: HostUsage(h, lower.value, capacity_bytes(lower_spec), below.get(h, 0), below.get(h, 0))
            for h in lower_spec.hosts}
    plan.usage.update(room)
    receivers = list(room.values())
    for scan in sorted(scans, key=lambda s: s.host):
        moves, skipped = _host_candidates(scan, spec, now)
        plan.skipped += skipped
        usage = plan.usage[scan.host]
        for info, used_at, reason in moves:
            target = _roomiest_fit(receivers, info.size, lower_spec.high_watermark)
            if target is None:
                roomiest = min(room.values(), key=lambda u: u.after)
                plan.waiting.append(Candidate(
                    scan.host, info.path, info.size, used_at, info.mtime_ns,
                    f"waits: {roomiest.host} would go above its high watermark "
                    f"({roomiest.ratio(roomiest.after + info.size):.0%} > {lower_spec.high_watermark:.0%})"))
                continue
            target.after += info.size
            usage.after -= info.size
            plan.moves.append(Candidate(scan.host, info.path, info.size, used_at, info.mtime_ns, reason, target.host,
                                        info.atime_ns))
    return plan


def render_plan(plan: TierPlan) -> str:
    """The plan as Markdown (the CLI's `plan` and the flow's report share it)."""
    lines = [f"# tier {plan.tier.value} → {plan.to.value if plan.to else '(none)'}", "",
             f"{len(plan.moves)} files ({human_size(plan.bytes)}) to move, {len(plan.waiting)} waiting for room, "
             f"{len(plan.skipped)} kept", "", "| host | tier | used before | after the moves |",
             "| --- | --- | --- | --- |"]
    for u in plan.usage.values():
        lines.append(f"| {u.host} | {u.tier} | {human_size(u.before)} ({u.ratio(u.before):.0%}) | "
                     f"{human_size(u.after)} ({u.ratio(u.after):.0%}) |")
    for title, rows in (("moves", plan.moves), ("waiting", plan.waiting)):
        if rows:
            lines += ["", f"## {title}", *(f"- {c.host}:`{c.path}` ({human_size(c.size)}) → {c.destination or '—'}: "
                                           f"{c.reason}"
                                           for c in rows[:LIST_LIMIT])]
    if plan.skipped:
        lines += ["", "## kept", *(f"- {s.host}:`{s.path}`: {s.reason}" for s in plan.skipped[:LIST_LIMIT])]
    return "\n".join(lines) + "\n"
