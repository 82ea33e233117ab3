"""Which deployments the fleet has, and where each runs: on the work pool of the site whose hosts it touches.

Pure data from the fleet (no Prefect import): the fleet checks, `spark flows deploy`, the roles' secret material
and the docs all ask this module, so they cannot disagree about what runs where or which secrets a worker holds.

- `backup-<host>`: restic runs on the host (its snapshot is copied offsite from there too).
- `dr-drill-<host>`: restic restores on the drill's scratch host.
- `sync-<job>`, `sync-check-<job>`, `sync-watch-<job>` (continuous jobs): rsync runs on the job's source hosts
  (it reaches the destination itself, over the LAN or the mesh), so the sources' site runs them.
- `tier-<tier>-<next tier>` (`-<site>` when the upper tier's hosts span sites): a tier migration pass over one
  boundary; rsync and the scans run on the upper tier's hosts, so their site runs it (on the tier's schedule).
- `agent-task-<site>`: an agent task (a template, or a spec typed into the UI's form) placed on the site's hosts,
  which its worker reaches; on demand.
- `maintenance-<repository>`: forget, prune and check of every client's repository, opened on the repository's
  own host (as the client's backup account, no SFTP); for a primary, also the catch-up copy to its offsite
  copies from the client hosts, when they are all in the repository's site.

A deployment opens repositories with passwords from its worker's secret store (`repositories`), except the
target of an offsite copy: that password is read on the client host, from the file the restic role put there,
so an edge worker never holds a cloud repository's password. The client repositories it opens, offsite copies
included (`opens`), are those whose records its worker gets from the controller (`backup/records.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from primespark.fleet.errors import Path
from primespark.fleet.model import Fleet
from primespark.orchestration.naming import deployment, work_pool

# The pool's queues, most urgent first: a backup never waits behind a drill on a busy worker.
QUEUES = {"backup": 1, "sync": 2, "sync-watch": 3, "maintenance": 4, "tier": 5, "sync-check": 6, "dr-drill": 7,
          "probe": 8, "agent-task": 9}


@dataclass(frozen=True)
class Planned:
    """One deployment the fleet asks for."""

    name: str
    flow: str  # backup, dr-drill, maintenance, sync, sync-check, sync-watch, probe (the flow's name; its queue)
    parameters: dict[str, Any]
    schedule: str | None  # None: run on demand only
    hosts: tuple[str, ...]  # where its commands run
    repositories: tuple[str, ...]  # opened with passwords from the worker's store
    origin: Path  # the fleet entry it comes from, for located errors
    description: str
    tags: tuple[str, ...] = field(default=())
    # the (repository, client) pairs it opens, offsite copies included: their records go to its worker
    opens: tuple[tuple[str, str], ...] = field(default=())
    # runs at once: one, but for agent tasks (each its own task; `agent_tasks` says how many)
    concurrency_limit: int | None = 1

    def site(self, fleet: Fleet) -> str:
        """The site of the hosts it touches (the first host's, when they span sites: a fleet check says so)."""
        return fleet.hosts[self.hosts[0]].site

    def sites(self, fleet: Fleet) -> list[str]:
        return list(dict.fromkeys(fleet.hosts[h].site for h in self.hosts if h in fleet.hosts))

    def pool(self, fleet: Fleet) -> str:
        """The work pool it is created on: the fleet's placement, or its site's pool."""
        placed = fleet.orchestration.deployments.get(self.name) if fleet.orchestration else None
        return placed.pool if placed is not None and placed.pool else work_pool(self.site(fleet))

    def paused(self, fleet: Fleet) -> bool:
        placed = fleet.orchestration.deployments.get(self.name) if fleet.orchestration else None
        return placed is not None and placed.paused


def _copies(fleet: Fleet, repository: str) -> list[str]:
    assert fleet.backup is not None
    return [n for n, r in fleet.backup.repositories.items() if r.copy_from == repository]


def _clients(fleet: Fleet, repository: str) -> list[str]:
    assert fleet.backup is not None
    primary = fleet.backup.repositories[repository].copy_from or repository
    return [h for h, p in fleet.backup.plans.items() if p.repository == primary]


def _worker_sites(fleet: Fleet) -> list[tuple[str, tuple[str, ...]]]:
    """Each site with a worker and any host, with the hosts its worker reaches."""
    workers = fleet.orchestration.workers if fleet.orchestration else {}
    return [(site, hosts) for site in workers if (hosts := tuple(site_hosts(fleet, site)))]


def probes(fleet: Fleet, env: str, transport: str = "ssh") -> list[Planned]:
    """`probe-<site>` for each site with a worker: run on demand, it says where the site's flows run and which
    of its hosts they reach."""
    return [Planned(deployment("probe", site), "probe", {"site": site, "env": env, "transport": transport},
                    None, hosts, (), ("orchestration", "workers", site),
                    f"where site {site}'s flows run, and which of its hosts they reach", ("probe",))
            for site, hosts in _worker_sites(fleet)]


def agent_tasks(fleet: Fleet, env: str, transport: str = "ssh") -> list[Planned]:
    """`agent-task-<site>` for each site with a worker: on demand (the UI's form, `spark task run --on-worker`),
    an agent task placed among the site's hosts. A worker's key reaches its own site's hosts only. At most one
    run fewer than the worker's limit at once (the others wait in Prefect's queue, AwaitingConcurrencySlot): a run
    may wait long for a host (quiet hours), and the site's backups, syncs and drills always find a slot."""
    workers = fleet.orchestration.workers if fleet.orchestration else {}
    return [Planned(deployment("agent-task", site), "agent-task", {"site": site, "env": env, "transport": transport},
                    None, hosts, (), ("orchestration", "workers", site),
                    f"an agent task (a template of the fleet's tasks, or a spec) on site {site}'s hosts",
                    ("agent-task",), concurrency_limit=max(1, workers[site].limit - 1))
            for site, hosts in _worker_sites(fleet)]


def syncs(fleet: Fleet, env: str, transport: str = "ssh") -> list[Planned]:
    """Per sync job: a full pass, a checksum compare when it has a check schedule, a watcher when continuous."""
    from primespark.data.layout import source_hosts

    out = []
    for name, job in fleet.sync.jobs.items() if fleet.sync else ():
        hosts = tuple(h for h in source_hosts(fleet, job) if h in fleet.hosts)
        if not hosts:
            continue
        common = {"job": name, "env": env, "transport": transport}
        what = f"{job.mode.value} {job.source} to {job.destination}"
        origin = ("sync", "jobs", name, "source")
        out.append(Planned(deployment("sync", name), "sync", common, job.schedule, hosts, (), origin,
                           f"a full pass: {what}", ("sync", name)))
        if job.check_schedule:
            out.append(Planned(deployment("sync-check", name), "sync-check", common, job.check_schedule, hosts, (),
                               origin, f"compare every file (size, XXH3-128) of {what}", ("sync", name)))
        if job.continuous:
            out.append(Planned(deployment("sync-watch", name), "sync-watch", common, None, hosts, (), origin,
                               f"continuously: {what}", ("sync", name)))
    return out


def tiers(fleet: Fleet, env: str, transport: str = "ssh") -> list[Planned]:
    """Per tier boundary (a tier with a lower one): a pass, on the pool of the site holding its source hosts."""
    from primespark.fleet.model import TIER_ORDER

    present = [t for t in TIER_ORDER if t in fleet.tiers]
    out = []
    for upper, lower in pairwise(present):
        spec = fleet.tiers[upper]
        hosts = [h for h in spec.hosts if h in fleet.hosts]
        sites = list(dict.fromkeys(fleet.hosts[h].site for h in hosts))
        for site in sites:
            mine = tuple(h for h in hosts if fleet.hosts[h].site == site)
            boundary = f"{upper.value}-{lower.value}"
            name = deployment("tier", boundary if len(sites) == 1 else f"{boundary}-{site}")
            parameters: dict[str, Any] = {"tier": upper.value, "env": env, "transport": transport}
            if len(sites) > 1:
                parameters["hosts"] = list(mine)
            out.append(Planned(name, "tier", parameters, spec.schedule, mine, (), ("tiers", upper.value, "hosts"),
                               f"tier migration {upper.value} → {lower.value} from {', '.join(mine)}",
                               ("tier", boundary)))
    return out


def planned_deployments(fleet: Fleet, env: str, transport: str = "ssh") -> list[Planned]:
    """Every deployment of the fleet, in a stable order. Entries naming hosts or repositories the fleet lacks
    are left out (the fleet's own checks report those)."""
    spec = fleet.backup
    out: list[Planned] = [*probes(fleet, env, transport), *syncs(fleet, env, transport),
                          *tiers(fleet, env, transport), *agent_tasks(fleet, env, transport)]
    if spec is None:
        return out
    scratch = spec.drill.scratch_host
    for host, plan in spec.plans.items():
        if host not in fleet.hosts or plan.repository not in spec.repositories:
            continue
        common = {"host": host, "env": env, "transport": transport}
        # the backup copies its snapshot offsite; a drill may restore from a copy (its `repository`)
        copies = tuple((r, host) for r in (plan.repository, *_copies(fleet, plan.repository)))
        out.append(Planned(
            deployment("backup", host), "backup", common, plan.schedule, (host,), (plan.repository,),
            ("backup", "plans", host), f"restic backup of {host} ({', '.join(plan.paths)}) into {plan.repository}",
            ("backup", host, plan.repository), copies))
        if scratch in fleet.hosts:
            out.append(Planned(
                deployment("dr-drill", host), "dr-drill", common, spec.drill.schedule, (scratch,),
                (plan.repository,), ("backup", "drill", "scratch_host"),
                f"restore {host}'s newest snapshot on {scratch}, verify, report", ("drill", host), copies))
    for name, repo in spec.repositories.items():
        if repo.host not in fleet.hosts:
            continue
        clients = [c for c in _clients(fleet, name) if c in fleet.hosts]
        site = fleet.hosts[repo.host].site
        # the catch-up copy runs on the clients: only where the repository's worker reaches them all
        catch_up = bool(_copies(fleet, name)) and all(fleet.hosts[c].site == site for c in clients)
        hosts = (repo.host, *(c for c in clients if catch_up and c != repo.host))
        opened = [name, *(_copies(fleet, name) if catch_up else [])]
        out.append(Planned(
            deployment("maintenance", name), "maintenance",
            {"repository": name, "env": env, "transport": transport, "offsite": catch_up, "check_copies": False,
             "on_store": True},
            spec.check.schedule, hosts, (name,), ("backup", "repositories", name, "host"),
            f"forget/prune, check --read-data-subset {spec.check.read_data_subset} on {repo.host}"
            + (", catch up the offsite copies" if catch_up else ""), ("maintenance", name),
            tuple((r, c) for r in opened for c in clients)))
    return out


def pools(fleet: Fleet) -> dict[str, str]:
    """Work pool → its site: one pool per site that has a worker."""
    workers = fleet.orchestration.workers if fleet.orchestration else {}
    return {work_pool(site): site for site in workers}


def worker_repositories(fleet: Fleet, site: str) -> list[str]:
    """The repositories whose passwords the worker of `site` holds: those its pool's deployments open."""
    pool = work_pool(site)
    found = [r for d in planned_deployments(fleet, fleet.name) if d.pool(fleet) == pool for r in d.repositories]
    return sorted(set(found))


def client_repositories(fleet: Fleet) -> list[tuple[str, str]]:
    """Every (repository, client) pair the fleet's deployments open: each plan's repository and its offsite
    copies, per client (what `spark flows deploy` initialises and records)."""
    return sorted({pair for d in planned_deployments(fleet, fleet.name) for pair in d.opens})


def worker_client_repositories(fleet: Fleet, site: str) -> list[tuple[str, str]]:
    """The (repository, client) pairs the deployments on `site`'s pool open: the records its worker holds."""
    pool = work_pool(site)
    return sorted({pair for d in planned_deployments(fleet, fleet.name) if d.pool(fleet) == pool
                   for pair in d.opens})


def site_hosts(fleet: Fleet, site: str) -> list[str]:
    """The hosts a site's worker reaches over SSH (its key is authorised there): the site's managed hosts."""
    from primespark.inventory import managed_hosts

    return [h for h in managed_hosts(fleet) if fleet.hosts[h].site == site]
