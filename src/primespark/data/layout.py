"""Where data lives, from the fleet alone (no I/O): the links of the sync jobs and the folder layout that sync
and tier migration share.

One layout below the warm and cold tiers: a source host's data sits in `<tier path>/<source host>/<path>`, where
`<path>` is the file's path below the source's own tier (a file outside any tier keeps its whole path). A sync
job into the warm tier must write exactly there, so that tier migration finds a hot file's synced copy where it
would have put it ("check the copy, commit the catalog, delete the source", not a second transfer). The fleet
checks (`fleet/checks.py`) hold every job to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from itertools import pairwise
from posixpath import relpath

from primespark.fleet.model import TIER_ORDER, Fleet, SyncJob, SyncMode, TierName

HOST_PLACEHOLDER = "{host}"


def inside(path: str, folder: str) -> bool:
    """`path` is `folder` or below it (both absolute and in their plain form)."""
    return path == folder or folder == "/" or path.startswith(folder.rstrip("/") + "/")


def overlap(a: str, b: str) -> bool:
    return inside(a, b) or inside(b, a)


def source_hosts(fleet: Fleet, job: SyncJob) -> list[str]:
    """The hosts a job's source pattern names, in the fleet's order."""
    return [name for name in fleet.hosts if fnmatchcase(name, job.source_pattern)]


@dataclass(frozen=True)
class Link:
    """One source host of a sync job and where its data goes."""

    job: str
    source: str  # the source host
    source_path: str
    destination: str  # the destination host
    destination_path: str  # `{host}` expanded
    mode: SyncMode

    @property
    def name(self) -> str:
        return f"{self.job}/{self.source}"

    @property
    def local(self) -> bool:
        """Source and destination are the same host: no transport."""
        return self.source == self.destination


def links(fleet: Fleet, job: str | None = None) -> list[Link]:
    """Every link of the fleet's sync jobs (or of one job), in the fleet's order."""
    jobs = fleet.sync.jobs if fleet.sync is not None else {}
    out = []
    for name, spec in jobs.items():
        if job is not None and name != job:
            continue
        for host in source_hosts(fleet, spec):
            out.append(Link(name, host, spec.source_path, spec.destination_host,
                            spec.destination_path.replace(HOST_PLACEHOLDER, host), spec.mode))
    return out


RECALL_DIR = ".spark-tier-recall"  # below a tier's path: recalled copies arrive here, then are renamed into place
RECALL_JOB_PREFIX = "tier-recall-"


def recall_folder(fleet: Fleet, tier: TierName) -> str:
    return f"{fleet.tiers[tier].path.rstrip('/')}/{RECALL_DIR}"


def recall_links(fleet: Fleet) -> list[Link]:
    """The routes a recall pushes through, for tiers with `recall: true`: from every host of a lower tier into
    the recall folder of every host of the tier (one account per tier, `sync-tier-recall-<tier>`; a copy: rrsync
    refuses deletions). Not sync jobs: nothing runs them but a recall."""
    out = []
    present = [t for t in TIER_ORDER if t in fleet.tiers]
    for index, name in enumerate(present):
        if not fleet.tiers[name].recall:
            continue
        for lower in present[index + 1:]:
            lower_spec = fleet.tiers[lower]
            for holder in lower_spec.hosts:
                for host in fleet.tiers[name].hosts:
                    if host != holder:
                        out.append(Link(f"{RECALL_JOB_PREFIX}{name.value}", holder, lower_spec.path, host,
                                        recall_folder(fleet, name), SyncMode.copy))
    return out


MOVE_JOB_PREFIX = "tier-move-"
RESERVED_JOB_PREFIXES = (RECALL_JOB_PREFIX, MOVE_JOB_PREFIX)  # the tiers' own accounts: no sync job is named so


def move_links(fleet: Fleet) -> list[Link]:
    """The routes a tier pass pushes through where no sync job carries them: from every host of a tier into its
    own folder (`<tier path>/<host>`) on every host of the next tier (one account per tier, `sync-tier-move-<tier>`;
    a copy: rrsync refuses deletions). A sync job that already writes there (the lab's hot-to-nas) is the route."""
    jobs = links(fleet)
    present = [t for t in TIER_ORDER if t in fleet.tiers]
    out = []
    for upper, lower in pairwise(present):
        lower_spec = fleet.tiers[lower]
        for source in fleet.tiers[upper].hosts:
            folder = f"{lower_spec.path.rstrip('/')}/{source}"
            for holder in lower_spec.hosts:
                if holder == source or any(j.source == source and j.destination == holder
                                           and inside(folder, j.destination_path) for j in jobs):
                    continue
                out.append(Link(f"{MOVE_JOB_PREFIX}{lower.value}", source, fleet.tiers[upper].path, holder, folder,
                                SyncMode.copy))
    return out


def transport_links(fleet: Fleet) -> list[Link]:
    """Every route data is pushed through between hosts: the sync jobs' links, then the tier moves' and recalls'
    routes (the sync role makes their accounts and keys alike)."""
    return links(fleet) + move_links(fleet) + recall_links(fleet)


def tier_of(fleet: Fleet, host: str, path: str) -> TierName | None:
    """The tier whose folder holds `path` on `host`, if any."""
    for name in TIER_ORDER:
        tier = fleet.tiers.get(name)
        if tier is not None and host in tier.hosts and inside(path, tier.path):
            return name
    return None


def tier_folder(fleet: Fleet, tier: TierName, source_host: str, source_path: str) -> str:
    """Where `tier` keeps the data of `source_path` on `source_host`: `<tier path>/<source host>/<path>`."""
    root = fleet.tiers[tier].path.rstrip("/")
    own = tier_of(fleet, source_host, source_path)
    below = (relpath(source_path, fleet.tiers[own].path) if own is not None else source_path.lstrip("/"))
    return f"{root}/{source_host}" + ("" if below in (".", "") else f"/{below}")
