"""Where an agent task runs: a pure function of the fleet, live host facts, what is already placed and the time.

Hard constraints first (a host failing any is excluded, with every reason it fails), then a score among the
rest, best first:

1. bytes of the task's data already on the host (no transfer at all),
2. bytes of it on the host's site (a LAN transfer, not a WAN one),
3. spread: fewest tasks already placed on the host,
4. the edge over the cloud, when the task prefers it (`prefer_edge`),
5. most CPUs free after what is already placed there, to the tenth the reasons show: a 1-minute load read a
   second apart differs in its last digits, and that noise must not move a task from one host to the next,
6. the host's name, so that equal inputs always give the same host.

Nothing here reads a clock, a host or a file: the caller passes `now` and the facts (`primespark.agents.facts`
reads them from the hosts' node exporters), so every scenario is a table row in the tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, time
from functools import lru_cache
from typing import Literal
from zoneinfo import ZoneInfo

from primespark.errors import UserError
from primespark.fleet.model import TIER_ORDER, Fleet, Host, HostKind, SiteKind, TaskSpec


@dataclass(frozen=True)
class HostFacts:
    """What a host can take now, as read from it (node exporter, the UPS guard's metrics, its markers)."""

    cpus_free: float  # CPUs minus the 1-minute load (node_load1), before what is placed and not started yet
    memory_free_mb: int  # node_memory_MemAvailable_bytes, in MiB
    on_mains: bool | None = True  # None: the host's UPS signal does not say (a low-battery line only)
    battery_percent: float | None = None  # the UPS battery's charge, where the UPS reports it
    battery_low: bool = False  # the UPS guard's low-battery verdict (at or below shutdown_battery_percent)
    drained: bool = False  # takes no new tasks
    paused: bool = False  # the host's /run/spark/quiet marker: spark-power (quiet hours) or spark-ups-guard (low power)
    worker_ready: bool = True  # the work pool of the host's site has a worker online
    data_bytes: Mapping[str, int] = field(default_factory=dict)  # path on this host → bytes under it


@dataclass(frozen=True)
class Unavailable:
    """A host whose facts could not be read: it is excluded, never guessed at."""

    reason: str


Facts = Mapping[str, HostFacts | Unavailable]


@dataclass(frozen=True)
class Placed:
    """A task placed on a host that its facts do not show yet (placed and not started, or started within the last
    minute, before node_load1 holds it): its share is taken off the facts. A task running for longer is in the load
    already; counting it here too would count it twice."""

    host: str
    cpus: float
    memory_mb: int


Verdict = Literal["chosen", "eligible", "excluded"]


@dataclass(frozen=True)
class Candidate:
    host: str
    verdict: Verdict
    reason: str

    def __str__(self) -> str:
        return f"{self.host}: {self.verdict}, {self.reason}"


@dataclass(frozen=True)
class Decision:
    """The chosen host (None: no host can run the task now) and every candidate's verdict and reason: the chosen
    one first, then the eligible ones in rank order, then the excluded ones by name."""

    task: str
    host: str | None
    candidates: tuple[Candidate, ...]

    def reasons(self) -> list[str]:
        return [str(c) for c in self.candidates]


class NoEligibleHost(UserError):
    """No host can run the task now; the message names each candidate's reason."""

    def __init__(self, where: str, decision: Decision) -> None:
        listed = "; ".join(decision.reasons()) or "the fleet has no host that runs tasks"
        super().__init__(f"{where}: no host can run it now: {listed}",
                         "wait for a host to be eligible (quiet hours end, capacity frees up), undrain one, or "
                         "loosen the task's needs")
        self.decision = decision


class NoEligibleHostInTime(NoEligibleHost):
    """No host could take the task within the wait (`again`: it was placed again after its host was lost): the
    message says how long it waited and names each candidate's reason at the end."""

    def __init__(self, where: str, decision: Decision, waited: float, task_id: str, again: bool = False) -> None:
        listed = "; ".join(decision.reasons()) or "the fleet has no host that runs tasks"
        if again:
            fix = ("bring the lost host back or make another host eligible (quiet hours end, capacity frees up, "
                   f"undrain one), then run it again with the same id (--id {task_id}): a run the lost host finished "
                   "meanwhile is committed then, not run twice")
        else:
            fix = ("make a host eligible (quiet hours end, capacity frees up, undrain one) and run it again, or give "
                   "it longer to wait (--wait SECONDS; the flow's wait_seconds)")
        UserError.__init__(self, f"{where}: no host could run it{' again' if again else ''} within {waited:.0f} s of "
                           f"waiting: {listed}", fix)
        self.decision = decision


# --- data: where copies of what a task reads are kept -------------------------------------------------------------

def _inside(path: str, folder: str) -> bool:
    from primespark.data.layout import inside

    return inside(path, folder)


def data_places(fleet: Fleet, ref: str) -> list[tuple[str, str]]:
    """Where copies of a data reference are kept, as (host, path): `host:/path` on that host and where tier
    migration and sync jobs keep its copies; a tier path `/path` on every host of its tier. From the fleet alone
    (whether a copy is there yet, the facts' bytes say)."""
    from primespark.data.layout import links, tier_folder, tier_of

    host, _, path = ref.rpartition(":")
    if not host:  # a tier path: every host of the tier that holds it
        for tier_name in TIER_ORDER:
            tier = fleet.tiers.get(tier_name)
            if tier is not None and _inside(path, tier.path):
                return [(h, path) for h in tier.hosts]
        return []
    places = [(host, path)]
    own = tier_of(fleet, host, path)
    if own is not None:
        # tier migration (and sync jobs into a tier) keep it at <tier path>/<host>/<path below its tier>, one tier
        # down at a time: the cold tier keeps the warm host's copy (<cold>/nas-1/pi-1/...), as migrate.origin_of reads
        upper = [(host, path)]
        for lower in TIER_ORDER[TIER_ORDER.index(own) + 1:]:
            if lower in fleet.tiers:
                upper = [(h, tier_folder(fleet, lower, u_host, u_path))
                         for u_host, u_path in upper for h in fleet.tiers[lower].hosts]
                places += upper
    for link in links(fleet):  # a sync job's copy outside the tiers
        if link.source == host and _inside(path, link.source_path):
            below = path[len(link.source_path.rstrip("/")):]
            places.append((link.destination, link.destination_path.rstrip("/") + below))
    return list(dict.fromkeys(places))


# --- hard constraints ---------------------------------------------------------------------------------------------

def static_exclusions(host: Host, task: TaskSpec) -> list[str]:
    """Why the host can never run the task, from the fleet alone (the fleet checks use it too)."""
    reasons = []
    if host.kind is HostKind.kvm_host:
        reasons.append("a KVM host runs VMs, not tasks")
    if task.arch and host.arch not in task.arch:
        reasons.append(f"architecture {host.arch.value}, the task needs {' or '.join(a.value for a in task.arch)}")
    for key, value in sorted(task.labels.items()):
        if host.labels.get(key) != value:
            reasons.append(f"no label {key}={value}")
    if task.image is not None and not host.container_runtime:
        reasons.append("no container runtime (the task runs in an image)")
    if task.cpus > host.cpus:
        reasons.append(f"{host.cpus} CPUs in all, the task needs {task.cpus:g}")
    if task.memory_mb > host.memory_mb:
        reasons.append(f"{host.memory_mb} MiB of memory in all, the task needs {task.memory_mb}")
    return reasons


def may_take_later(fleet: Fleet, task: TaskSpec, keep_off: Mapping[str, str] | None = None) -> list[str]:
    """The hosts that may take the task later though none can now: every exclusion of theirs can pass (quiet hours,
    battery, drained, busy, facts unreadable, pool not ready), none is the fleet's own (`static_exclusions`), and
    the caller does not keep them off. Empty: waiting cannot help."""
    return [name for name in candidate_hosts(fleet)
            if name not in (keep_off or {}) and not static_exclusions(fleet.hosts[name], task)]


@lru_cache(maxsize=1024)  # a fleet has a few distinct windows; parsing them per host per decision adds up
def _parse_hhmm(value: str) -> time:
    return time.fromisoformat(value)


def quiet_until(host: Host, local: time) -> str | None:
    """The end of the host's quiet hours if `local` (the fleet's time zone) is inside them. A window that crosses
    midnight (23:00-06:00) is the complement of end..start, as roles/edge/files/spark-power reads it."""
    if host.power is None or host.power.quiet_hours is None:
        return None
    start, end = (_parse_hhmm(t) for t in host.power.quiet_hours)
    inside = start <= local < end if start < end else (local >= start or local < end)
    return host.power.quiet_hours[1] if inside else None


def _power_exclusions(host: Host, facts: HostFacts, task: TaskSpec) -> list[str]:
    if facts.battery_low:
        return ["battery low (the UPS guard's signal)"]
    if facts.on_mains is not False:
        return []
    # on battery: the task's threshold, and never at or below where the guard halts the host
    shutdown = host.power.shutdown_battery_percent if host.power is not None else 0
    needed = max(task.power.min_battery_percent, shutdown + 1)
    if facts.battery_percent is None:
        return [f"on battery, its charge unknown (the task needs {needed}%)"]
    if facts.battery_percent < needed:
        return [f"on battery at {facts.battery_percent:.0f}%, the task needs {needed}%"]
    return []


@dataclass(frozen=True)
class _Load:
    cpus: float = 0.0
    memory_mb: int = 0
    tasks: int = 0


def _loads(placed: Iterable[Placed]) -> dict[str, _Load]:
    loads: dict[str, _Load] = {}
    # summed in one order whatever the queue's: float sums in another order could differ in the last bit
    for p in sorted(placed, key=lambda p: (p.host, p.cpus, p.memory_mb)):
        had = loads.get(p.host, _Load())
        loads[p.host] = _Load(had.cpus + p.cpus, had.memory_mb + p.memory_mb, had.tasks + 1)
    return loads


def _live_exclusions(fleet: Fleet, name: str, facts: HostFacts, load: _Load, task: TaskSpec,
                     local: time) -> list[str]:
    host = fleet.hosts[name]
    reasons = []
    if facts.drained:
        reasons.append("drained")
    if not facts.worker_ready:
        reasons.append(f"the {host.site} site's worker is not ready")
    until = quiet_until(host, local)
    if not task.power.run_in_quiet_hours and until is not None:
        reasons.append(f"quiet hours until {until}")
    elif facts.paused and until is None:
        # the marker outside the fleet's quiet hours: spark-ups-guard pauses the host before a halt
        reasons.append("the host pauses agent tasks (/run/spark/quiet), outside its quiet hours")
    reasons += _power_exclusions(host, facts, task)
    cpus, memory = facts.cpus_free - load.cpus, facts.memory_free_mb - load.memory_mb
    if cpus < task.cpus:
        reasons.append(f"{max(cpus, 0):.1f} CPUs free, the task needs {task.cpus:g}")
    if memory < task.memory_mb:
        reasons.append(f"{max(memory, 0)} MiB free, the task needs {task.memory_mb}")
    return reasons


# --- the score ----------------------------------------------------------------------------------------------------

def size(value: float) -> str:
    """Bytes in decimal units, as people say them: 1.2 GB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _data_bytes(fleet: Fleet, task: TaskSpec, facts: Facts) -> tuple[dict[str, int], dict[str, int]]:
    """Bytes of the task's data on each host, and on each host's site besides what the host holds itself, from the
    facts (a host whose facts are unavailable counts none). A copy counts once: a site holding a reference on two
    hosts (a Pi's file and its tier copy on the NAS) holds its bytes once."""
    local: dict[str, int] = {}
    site_extra: dict[str, int] = {}
    for ref in task.data:
        on_host: dict[str, int] = {}
        for host, path in data_places(fleet, ref):
            found = facts.get(host)
            if isinstance(found, HostFacts) and (count := found.data_bytes.get(path, 0)):
                on_host[host] = on_host.get(host, 0) + count
        best_on_site: dict[str, int] = {}
        for host, count in on_host.items():
            site = fleet.hosts[host].site
            best_on_site[site] = max(best_on_site.get(site, 0), count)
            local[host] = local.get(host, 0) + count
        for name, host_spec in fleet.hosts.items():
            extra = best_on_site.get(host_spec.site, 0) - on_host.get(name, 0)
            if extra > 0:
                site_extra[name] = site_extra.get(name, 0) + extra
    return local, site_extra


@dataclass(frozen=True)
class _Ranked:
    key: tuple[int, int, int, int, float, str]
    reason: str


def _rank(fleet: Fleet, name: str, facts: HostFacts, load: _Load, task: TaskSpec, local_bytes: int,
          site_bytes: int) -> _Ranked:
    host = fleet.hosts[name]
    edge = fleet.sites[host.site].kind is SiteKind.edge
    cpus = facts.cpus_free - load.cpus
    parts = []
    if local_bytes:
        parts.append(f"{size(local_bytes)} of its data local")
    if site_bytes:
        parts.append(f"{size(site_bytes)} of its data on site {host.site}")
    if task.data and not local_bytes and not site_bytes:
        parts.append("none of its data on its site")
    if load.tasks:
        parts.append(f"{load.tasks} task{'s' if load.tasks != 1 else ''} placed there")
    parts.append(f"{cpus:.1f} CPUs free")
    key = (-local_bytes, -site_bytes, load.tasks, 0 if (edge or not task.prefer_edge) else 1, -round(cpus, 1), name)
    return _Ranked(key, ", ".join(parts))


def candidate_hosts(fleet: Fleet) -> list[str]:
    """The hosts a task may be placed on: every host of the fleet (a KVM host is listed, and excluded, so that
    the table shows every host)."""
    return sorted(fleet.hosts)


def place(fleet: Fleet, task: TaskSpec, facts: Facts, placed: Iterable[Placed], now: datetime,
          name: str = "task", keep_off: Mapping[str, str] | None = None) -> Decision:
    """The host `task` runs on, and why, for every host of the fleet. `now` must carry its time zone; quiet hours
    are read in the fleet's. `keep_off`: hosts the caller keeps off, and why (a host lost mid-task in this run),
    whatever their facts say. Deterministic: equal inputs give equal decisions (ties go to the host's name)."""
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime (quiet hours are in the fleet's time zone)")
    clock = now.astimezone(ZoneInfo(fleet.timezone)).time()
    loads = _loads(placed)
    local, on_site = _data_bytes(fleet, task, facts) if task.data else ({}, {})
    excluded: list[Candidate] = []
    ranked: list[tuple[_Ranked, str]] = []
    for host_name in candidate_hosts(fleet):
        host = fleet.hosts[host_name]
        reasons = static_exclusions(host, task)
        if not reasons and keep_off and host_name in keep_off:
            reasons.append(keep_off[host_name])  # its facts are not asked: they may well say it is fine
        found = facts.get(host_name, Unavailable("none given"))
        # a host the fleet already rules out needs no live facts (they are not read for it)
        if isinstance(found, Unavailable):
            if not reasons:
                reasons.append(f"facts unavailable: {found.reason}")
        elif not reasons:
            reasons = _live_exclusions(fleet, host_name, found, loads.get(host_name, _Load()), task, clock)
        if reasons:
            excluded.append(Candidate(host_name, "excluded", "; ".join(reasons)))
            continue
        assert isinstance(found, HostFacts)
        ranked.append((_rank(fleet, host_name, found, loads.get(host_name, _Load()), task, local.get(host_name, 0),
                             on_site.get(host_name, 0)), host_name))
    ranked.sort(key=lambda r: r[0].key)
    chosen = ranked[0][1] if ranked else None
    eligible = [Candidate(h, "chosen" if h == chosen else "eligible", r.reason) for r, h in ranked]
    return Decision(name, chosen, (*eligible, *excluded))


def fits_after(fleet: Fleet, task: TaskSpec, facts: Facts, placed: Iterable[Placed], now: datetime, host: str,
               name: str = "task", keep_off: Mapping[str, str] | None = None) -> str | None:
    """Whether `host`, chosen for `task` on `facts`, still takes it with `placed` (the tasks placed by now, those
    placed since the decision included) taken off its facts: None if so, else why not."""
    candidate = next(c for c in place(fleet, task, facts, placed, now, name, keep_off).candidates if c.host == host)
    return candidate.reason if candidate.verdict == "excluded" else None
