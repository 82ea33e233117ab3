"""Rules that relate several parts of the fleet. Each yields a located `Problem`; all are reported together.

Every problem has a code, so a consumer that reports the same rule in its own terms can take it over
(`spark plan` leaves `kvm-capacity` to the policy pack, which checks it on the resource graph).
"""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from itertools import combinations
from typing import TYPE_CHECKING

from primespark.fleet.errors import Path, Problem
from primespark.fleet.model import (
    TIER_ORDER,
    Fleet,
    Host,
    HostKind,
    SecretBackend,
    ServiceKind,
    TaskSpec,
    TierName,
    Topology,
    VaultAuth,
)

if TYPE_CHECKING:
    from primespark.data.layout import Link


def cross_check(fleet: Fleet) -> list[Problem]:
    problems: list[Problem] = []
    for rule in (_sites, _addresses, _vms, _kvm_capacity, _services, _meshes, _tiers, _backup, _sync, _secrets,
                 _monitoring, _orchestration, task_problems):
        problems.extend(rule(fleet))
    return problems


def _p(path: Path, message: str, fix: str, code: str) -> Problem:
    return Problem(path, message, fix, code)


def _networks(fleet: Fleet) -> Iterator[tuple[Path, IPv4Network]]:
    for name, site in fleet.sites.items():
        yield ("sites", name, "lan"), site.lan
    for name, mesh in fleet.meshes.items():
        yield ("meshes", name, "overlay"), mesh.overlay
    if fleet.lab is not None:
        yield ("lab", "wan"), fleet.lab.wan


def _sites(fleet: Fleet) -> Iterator[Problem]:
    for (path_a, net_a), (path_b, net_b) in combinations(_networks(fleet), 2):
        if net_a.overlaps(net_b):
            yield _p(path_b, f"{net_b} overlaps {net_a} ({'.'.join(map(str, path_a))})",
                     "give each LAN, overlay and WAN a range of its own", "cidr-overlap")
    for name, site in fleet.sites.items():
        if site.behind_nat and site.public_address is None and fleet.lab is not None:
            yield _p(("sites", name, "public_address"), "a site behind NAT in the lab needs its router's WAN address",
                     f"add an address inside lab.wan ({fleet.lab.wan})", "missing-public-address")


def _addresses(fleet: Fleet) -> Iterator[Problem]:
    seen: dict[IPv4Address, Path] = {}
    for name, site in fleet.sites.items():
        if site.public_address is not None:
            seen[site.public_address] = ("sites", name, "public_address")
    for name, host in fleet.hosts.items():
        host_site = fleet.sites.get(host.site)
        if host_site is None:
            yield _p(("hosts", name, "site"), f"no site named {host.site!r}",
                     f"use one of: {', '.join(fleet.sites)}", "unknown-site")
        elif host.address not in host_site.lan:
            yield _p(("hosts", name, "address"), f"{host.address} is outside site {host.site}'s LAN {host_site.lan}",
                     f"pick an address inside {host_site.lan}, or change hosts.{name}.site", "address-outside-site")
        elif host.address in (host_site.lan.network_address, host_site.lan.broadcast_address, host_site.gateway):
            yield _p(("hosts", name, "address"),
                     f"{host.address} is the network, broadcast or gateway address of {host_site.lan}",
                     f"pick a host address from {host_site.gateway + 1} upward", "reserved-address")
        for field, address in (("address", host.address), ("public_address", host.public_address)):
            if address is None:
                continue
            if address in seen:
                other = ".".join(map(str, seen[address]))
                yield _p(("hosts", name, field), f"{address} is already used by {other}",
                         "give every host an address of its own", "duplicate-address")
            else:
                seen[address] = ("hosts", name, field)
        if host.public_address is not None and fleet.lab is not None and host.public_address not in fleet.lab.wan:
            yield _p(("hosts", name, "public_address"), f"{host.public_address} is outside lab.wan {fleet.lab.wan}",
                     f"pick an address inside {fleet.lab.wan}", "address-outside-site")


def _vms(fleet: Fleet) -> Iterator[Problem]:
    for name, host in fleet.hosts.items():
        if host.vm is None:
            continue
        kvm = fleet.hosts.get(host.vm.kvm_host)
        if kvm is None or kvm.kind is not HostKind.kvm_host:
            kvm_hosts = ", ".join(fleet.hosts_of(HostKind.kvm_host)) or "none defined"
            yield _p(("hosts", name, "vm", "kvm_host"), f"{host.vm.kvm_host!r} is not a host of kind kvm_host",
                     f"use one of: {kvm_hosts}", "unknown-kvm-host")
        elif kvm.site != host.site:
            yield _p(("hosts", name, "site"), f"the VM is in site {host.site} but its KVM host is in {kvm.site}",
                     f"set site: {kvm.site}", "vm-site")
        else:
            for field, unit in (("cpus", ""), ("memory_mb", " MiB"), ("disk_gb", " GB")):
                if getattr(host, field) > getattr(kvm, field):
                    yield _p(("hosts", name, field),
                             f"{getattr(host, field)}{unit} is more than its KVM host {host.vm.kvm_host} has "
                             f"({getattr(kvm, field)}{unit})", f"lower {field} or grow the KVM host", "vm-too-big")
        if host.vm.image not in fleet.images:
            yield _p(("hosts", name, "vm", "image"), f"no base image named {host.vm.image!r}",
                     f"use one of: {', '.join(fleet.images) or 'none (add an images: section)'}", "unknown-image")


def _kvm_capacity(fleet: Fleet) -> Iterator[Problem]:
    for kvm_name, kvm in fleet.hosts_of(HostKind.kvm_host).items():
        vms = fleet.vms_on(kvm_name)
        for field, unit in (("cpus", " vCPUs"), ("memory_mb", " MiB"), ("disk_gb", " GB")):
            total = sum(getattr(vm, field) for vm in vms.values())
            if total > getattr(kvm, field):
                yield _p(("hosts", kvm_name, field),
                         f"its VMs ({', '.join(vms)}) need {total}{unit} in all, the host has {getattr(kvm, field)}",
                         f"grow the KVM host's {field} or shrink or move a VM", "kvm-capacity")


def _services(fleet: Fleet) -> Iterator[Problem]:
    # Imported here: the catalog imports the fleet model, and the fleet package must import without the cloud side.
    from primespark.cloud.catalog import RECIPES

    kinds_without_image = {kind for kind, recipe in RECIPES.items() if recipe.image is None}
    ports: dict[tuple[str, int], str] = {}
    for name, service in fleet.services.items():
        if service.host not in fleet.hosts:
            yield _p(("services", name, "host"), f"no host named {service.host!r}",
                     f"place it on one of: {', '.join(fleet.hosts)}", "unknown-host")
            continue
        if fleet.hosts[service.host].kind is HostKind.kvm_host:
            yield _p(("services", name, "host"), f"{service.host} is a KVM host; services run on its VMs",
                     "place the service on a VM", "service-on-kvm-host")
        key = (service.host, service.port)
        if key in ports:
            yield _p(("services", name, "port"), f"port {service.port} on {service.host} is taken by {ports[key]}",
                     "choose another port", "port-conflict")
        ports[key] = name
        if service.port == fleet.hosts[service.host].ssh.port:
            yield _p(("services", name, "port"), f"port {service.port} is the host's SSH port",
                     "choose another port", "port-conflict")
        if service.image is None and service.kind in kinds_without_image:
            yield _p(("services", name, "image"), f"a service of kind {service.kind.value} has no default image",
                     "add `image:` with the image you build for it, pinned by a version tag or digest",
                     "missing-image")


def _meshes(fleet: Fleet) -> Iterator[Problem]:
    # Per host, which mesh already holds a listen port or an interface name; clashes are grouped per mesh pair.
    taken: dict[tuple[str, str, object], str] = {}
    clashes: dict[tuple[str, str, str, object], list[str]] = {}
    for mesh_name, mesh in fleet.meshes.items():
        members = fleet.mesh_members(mesh_name)
        for i, member in enumerate(members):
            if member not in fleet.hosts:
                yield _p(("meshes", mesh_name, "members", i), f"no host named {member!r}",
                         "list existing hosts only", "unknown-host")
        if len(set(members)) != len(members):
            yield _p(("meshes", mesh_name, "members"), "a host is listed twice", "list each host once",
                     "duplicate-member")
        capacity = mesh.overlay.num_addresses - 2
        if len(members) > capacity:
            yield _p(("meshes", mesh_name, "overlay"),
                     f"{mesh.overlay} holds {capacity} hosts but the mesh has {len(members)}",
                     f"use a larger overlay, e.g. /{_prefix_for(len(members))}", "overlay-too-small")
        if mesh.topology is Topology.hub_and_spoke and mesh.hub is not None:
            yield from _hub(fleet, mesh_name, mesh.hub, members)
        for member in members:
            for field, value in (("listen_port", mesh.listen_port), ("interface", mesh.interface)):
                other = taken.setdefault((member, field, value), mesh_name)
                if other != mesh_name:
                    clashes.setdefault((mesh_name, other, field, value), []).append(member)
    for (mesh_name, other, clash, shared), hosts in clashes.items():
        what = clash.replace("_", " ")
        yield _p(("meshes", mesh_name, clash),
                 f"meshes {other} and {mesh_name} share the {what} {shared} on {', '.join(hosts)}",
                 f"give mesh {mesh_name} its own {what}", "mesh-conflict")


def _hub(fleet: Fleet, mesh_name: str, hub_name: str, members: list[str]) -> Iterator[Problem]:
    hub = fleet.hosts.get(hub_name)
    if hub is None or hub_name not in members:
        yield _p(("meshes", mesh_name, "hub"), f"{hub_name!r} is not a member of the mesh",
                 "choose a member host with a public address", "unknown-hub")
    elif fleet.behind_nat(hub_name):
        yield _p(("meshes", mesh_name, "hub"), f"{hub_name} sits behind NAT; spokes cannot reach it",
                 "choose a host in a site that is not behind NAT", "hub-behind-nat")
    elif hub.public_address is None:
        yield _p(("meshes", mesh_name, "hub"), f"the hub {hub_name} has no endpoint (no public_address)",
                 f"give hosts.{hub_name} a public_address, or choose another hub", "hub-without-endpoint")


def _prefix_for(count: int) -> int:
    prefix = 30
    while (2 ** (32 - prefix)) - 2 < count:
        prefix -= 1
    return prefix


def _tiers(fleet: Fleet) -> Iterator[Problem]:
    previous: tuple[str, int | None] | None = None
    tier_of: dict[str, str] = {}  # a host holds one tier: data migrates between hosts, not within one
    for tier_name in TIER_ORDER:
        tier = fleet.tiers.get(tier_name)
        if tier is None:
            continue
        for i, host in enumerate(tier.hosts):
            if host not in fleet.hosts:
                yield _p(("tiers", tier_name.value, "hosts", i), f"no host named {host!r}",
                         f"use one of: {', '.join(fleet.hosts)}", "unknown-host")
            other = tier_of.setdefault(host, tier_name.value)
            if other != tier_name.value:
                yield _p(("tiers", tier_name.value, "hosts", i), f"{host} is already in the {other} tier",
                         f"put {host} in one tier only (remove it from tiers.{other}.hosts or from here)",
                         "host-in-two-tiers")
        if previous is not None:
            prev_name, prev_age = previous
            if prev_age is None:
                yield _p(("tiers", prev_name, "max_age_days"),
                         f"tier {prev_name} keeps data forever, so nothing would reach {tier_name.value}",
                         f"set tiers.{prev_name}.max_age_days", "tier-order")
            elif tier.max_age_days is not None and tier.max_age_days <= prev_age:
                yield _p(("tiers", tier_name.value, "max_age_days"),
                         f"{tier.max_age_days} days is not more than the {prev_name} tier's {prev_age}",
                         "age thresholds must grow from hot to warm to cold", "tier-order")
        previous = (tier_name.value, tier.max_age_days)
        yield from _tier_catalog(tier_name, tier.catalog, tier.path)
    yield from _tier_routes(fleet)


def _tier_routes(fleet: Fleet) -> Iterator[Problem]:
    """The tiers' routes between hosts: a pass's own (move_links) and, with `recall: true`, the lower tiers' route
    back (there must be a lower tier); each needs a way across sites."""
    from primespark.data.layout import MOVE_JOB_PREFIX, RECALL_JOB_PREFIX, move_links, recall_links

    present = [t for t in TIER_ORDER if t in fleet.tiers]
    if present and fleet.tiers[present[-1]].recall:
        yield _p(("tiers", present[-1].value, "recall"), f"nothing moves below the {present[-1].value} tier, so "
                 "nothing comes back to it", f"remove recall from tiers.{present[-1].value}", "tier-recall")
    reported: set[tuple[str, str]] = set()
    for link in move_links(fleet) + recall_links(fleet):
        source, target = fleet.hosts.get(link.source), fleet.hosts.get(link.destination)
        if source is None or target is None or source.site == target.site or (link.source, link.job) in reported:
            continue
        if not any(fleet.in_mesh(m, link.source) and fleet.in_mesh(m, link.destination) for m in fleet.meshes):
            reported.add((link.source, link.job))
            if link.job.startswith(RECALL_JOB_PREFIX):
                tier = link.job.removeprefix(RECALL_JOB_PREFIX)
                yield _p(("tiers", tier, "recall"), f"{link.source} (site {source.site}) would push recalled files "
                         f"to {link.destination} (site {target.site}), and no mesh holds both",
                         "add both hosts to a mesh (`meshes:`), or remove recall", "recall-no-route")
            else:
                tier = link.job.removeprefix(MOVE_JOB_PREFIX)
                yield _p(("tiers", tier, "hosts"), f"a tier pass would move {link.source}'s files (site "
                         f"{source.site}) to {link.destination} (site {target.site}), and they share no mesh",
                         "add both hosts to a mesh (`meshes:`), or a sync job that carries them there",
                         "tier-no-route")


def _tier_catalog(tier_name: TierName, catalog: str | None, tier_path: str) -> Iterator[Problem]:
    """The migration catalog lives in the warm tier (backed up with it, and on the host every move passes)."""
    from primespark.data.layout import inside

    if catalog is None:
        return
    where = ("tiers", tier_name.value, "catalog")
    if tier_name is not TierName.warm:
        yield _p(where, f"the catalog is kept by the warm tier, not the {tier_name.value} tier",
                 "move `catalog:` to tiers.warm (or drop it: its default is <warm path>/.spark-tier/catalog.sqlite)",
                 "tier-catalog-not-warm")
    elif not inside(catalog, tier_path) or catalog.rstrip("/") == tier_path.rstrip("/"):
        yield _p(where, f"the catalog {catalog} is outside the warm tier's path {tier_path}, so the warm tier's "
                 "backup would not hold it", f"put it below {tier_path} (e.g. {tier_path.rstrip('/')}/.spark-tier/"
                 "catalog.sqlite)", "tier-catalog-outside")


def _backup(fleet: Fleet) -> Iterator[Problem]:
    backup = fleet.backup
    if backup is None:
        return
    for name, repo in backup.repositories.items():
        if repo.host not in fleet.hosts:
            yield _p(("backup", "repositories", name, "host"), f"no host named {repo.host!r}",
                     f"store it on one of: {', '.join(fleet.hosts)}", "unknown-host")
        if repo.copy_from is not None and (repo.copy_from == name or repo.copy_from not in backup.repositories):
            yield _p(("backup", "repositories", name, "copy_from"), f"{repo.copy_from!r} is not another repository",
                     f"use one of: {', '.join(r for r in backup.repositories if r != name)}", "unknown-repository")
    for host, plan in backup.plans.items():
        if host not in fleet.hosts:
            yield _p(("backup", "plans", host), f"no host named {host!r}", "key plans by existing host names",
                     "unknown-host")
        if plan.repository not in backup.repositories:
            yield _p(("backup", "plans", host, "repository"), f"no repository named {plan.repository!r}",
                     f"use one of: {', '.join(backup.repositories)}", "unknown-repository")
    if backup.drill.scratch_host not in fleet.hosts:
        yield _p(("backup", "drill", "scratch_host"), f"no host named {backup.drill.scratch_host!r}",
                 f"use one of: {', '.join(fleet.hosts)}", "unknown-host")


def _secrets(fleet: Fleet) -> Iterator[Problem]:
    spec = fleet.secrets
    if spec.backend is SecretBackend.local:
        for path, reference in fleet.secret_references().items():
            if reference.startswith("vault:"):
                yield _p(path, "a vault: reference, but the fleet keeps its secrets in the local store",
                         "add `secrets: {backend: vault, address: https://<vault>:8200}` to the fleet file, "
                         "or write `local:<name>`", "vault-reference-without-vault")
        if spec.address is not None or spec.auth is not VaultAuth.token:
            yield _p(("secrets", "backend"), "Vault settings are given, but the backend is local",
                     "set `secrets.backend: vault`, or remove the Vault settings", "vault-settings-unused")
        return
    if spec.auth is VaultAuth.lab:
        if fleet.lab is None:
            yield _p(("secrets", "auth"), "`auth: lab` uses the lab's own OpenBao, but the fleet has no lab section",
                     "use `auth: token` or `auth: approle` with the server's address, or add a `lab:` section",
                     "lab-vault-without-lab")
        if spec.address is not None:
            yield _p(("secrets", "address"), "the lab's OpenBao listens on loopback at lab.openbao_port",
                     "remove secrets.address (set lab.openbao_port to move it)", "lab-vault-address")
    elif spec.address is None:
        yield _p(("secrets", "address"), "the Vault backend needs the server's address",
                 "add `address: https://<vault>:8200` under secrets", "vault-without-address")
    if spec.auth is VaultAuth.approle and spec.role_id is None:
        yield _p(("secrets", "role_id"), "AppRole login needs a role_id",
                 "add `role_id: <the role's id>` under secrets (the secret-id comes from VAULT_SECRET_ID or "
                 "secrets.secret_id_file)", "approle-without-role")
    if fleet.lab is not None and fleet.lab.prefect_port in (fleet.lab.openbao_port, fleet.lab.openbao_port + 1):
        yield _p(("lab", "openbao_port"), f"the lab's Prefect server has port {fleet.lab.prefect_port}; OpenBao "
                 f"takes {fleet.lab.openbao_port} and {fleet.lab.openbao_port + 1}",
                 "give OpenBao two free ports of its own", "lab-port-conflict")


def _monitoring(fleet: Fleet) -> Iterator[Problem]:
    # Imported here: the monitoring package imports the fleet model.
    from primespark.monitoring.alerts import ALERT_NAMES
    from primespark.monitoring.scrape import monitored_hosts, reaches

    spec = fleet.monitoring
    for severity, names in spec.routes.items():
        for i, name in enumerate(names):
            if name not in spec.receivers:
                yield _p(("monitoring", "routes", severity.value, i), f"no receiver named {name!r}",
                         f"use one of: {', '.join(spec.receivers) or 'none (add monitoring.receivers)'}",
                         "unknown-receiver")
    kinds = {svc.kind for svc in fleet.services.values()}
    if spec.receivers and ServiceKind.alertmanager not in kinds:
        yield _p(("monitoring", "receivers"), "receivers are set but no alertmanager service delivers to them",
                 "add a service of kind alertmanager (e.g. on the prometheus host, port 9093)", "no-alertmanager")
    for name in spec.alert_for:
        if name not in ALERT_NAMES:
            yield _p(("monitoring", "alert_for", name), f"no alert named {name!r}",
                     f"use one of: {', '.join(sorted(ALERT_NAMES))}", "unknown-alert")
    for name, svc in fleet.services.items():
        if svc.kind is ServiceKind.alertmanager and ServiceKind.prometheus not in kinds:
            yield _p(("services", name, "kind"), "an alertmanager needs a prometheus service to send it alerts",
                     "add a service of kind prometheus", "no-prometheus")
        if svc.kind is not ServiceKind.prometheus or svc.host not in fleet.hosts:
            continue
        unreachable = [h for h in monitored_hosts(fleet) if not reaches(fleet, svc.host, h)]
        if unreachable:
            shown = ", ".join(unreachable[:5]) + (f" and {len(unreachable) - 5} more" if len(unreachable) > 5 else "")
            yield _p(("services", name, "host"),
                     f"Prometheus on {svc.host} cannot reach {shown}: not on its site and in no mesh with it",
                     f"add {svc.host} and those hosts to one mesh (meshes.<name>.members), or place prometheus "
                     "on a host that shares a mesh with every site", "prometheus-unreachable")


def _orchestration(fleet: Fleet) -> Iterator[Problem]:
    spec = fleet.orchestration
    if spec is None:
        return
    server = spec.server.host
    if server not in fleet.hosts:
        yield _p(("orchestration", "server", "host"), f"no host named {server!r}",
                 f"run the server on one of: {', '.join(fleet.hosts)}", "unknown-host")
    for site, worker in spec.workers.items():
        where = ("orchestration", "workers", site, "host")
        if site not in fleet.sites:
            yield _p(("orchestration", "workers", site), f"no site named {site!r}",
                     f"key workers by site: {', '.join(fleet.sites)}", "unknown-site")
        elif worker.host not in fleet.hosts:
            yield _p(where, f"no host named {worker.host!r}", f"use a host of site {site}", "unknown-host")
        elif fleet.hosts[worker.host].site != site:
            at_home = [h for h, host in fleet.hosts.items() if host.site == site]
            yield _p(where, f"{worker.host} is in site {fleet.hosts[worker.host].site}, not {site}: a worker runs "
                     "the flows of its own site's hosts", f"use a host of site {site} ({', '.join(at_home)})",
                     "worker-site")
        elif server in fleet.hosts:
            yield from _reaches_server(fleet, site, worker.host, server)
    yield from _placements(fleet)


def _reaches_server(fleet: Fleet, site: str, worker: str, server: str) -> Iterator[Problem]:
    """A worker on the server's site reaches it on the LAN; any other over a WireGuard mesh they share."""
    if fleet.hosts[server].site == site:
        return
    if not any(fleet.in_mesh(m, server) and fleet.in_mesh(m, worker) for m in fleet.meshes):
        yield _p(("orchestration", "server", "host"),
                 f"{server} has no mesh address that the {site} worker {worker} reaches: they share no WireGuard "
                 "mesh, and a worker in another site reaches the server over the mesh",
                 f"put {server} and {worker} in one mesh (meshes.<name>.members), or run the server elsewhere",
                 "server-unreachable")


def _placements(fleet: Fleet) -> Iterator[Problem]:
    from primespark.orchestration.placement import planned_deployments, pools

    assert fleet.orchestration is not None
    planned = planned_deployments(fleet, fleet.name)
    known = {d.name: d for d in planned}
    available = pools(fleet)
    for name, placed in fleet.orchestration.deployments.items():
        if name not in known:
            yield _p(("orchestration", "deployments", name), f"the fleet has no deployment named {name!r}",
                     f"use one of: {', '.join(sorted(known)) or 'none (no backup plans)'}", "unknown-deployment")
        elif placed.pool is not None and placed.pool not in available:
            yield _p(("orchestration", "deployments", name, "pool"), f"no work pool named {placed.pool!r}",
                     f"use one of: {', '.join(available) or 'none (add orchestration.workers)'}", "unknown-pool")
        elif placed.crash_retries is not None and known[name].flow == "sync-watch":
            yield _p(("orchestration", "deployments", name, "crash_retries"),
                     f"{name} is a continuous job's watch: a new run replaces it after every crash, so "
                     "crash_retries does not apply", "remove crash_retries from this deployment",
                     "watch-crash-retries")
    for deployment in planned:
        if len(deployment.sites(fleet)) > 1:
            yield _p(deployment.origin, f"{deployment.name} runs commands on hosts of sites "
                     f"{' and '.join(deployment.sites(fleet))}; one site's worker reaches its own hosts only",
                     "keep the hosts of one deployment in one site", "deployment-spans-sites")
        pool = deployment.pool(fleet)
        if pool not in available and deployment.name not in fleet.orchestration.deployments:
            site = deployment.site(fleet)
            yield _p(deployment.origin, f"site {site} has no worker, so nothing runs {deployment.name}",
                     f"add `orchestration.workers.{site}: <a host of {site}>`", "site-without-worker")
    yield from _shared_secret_paths(fleet)


def _shared_secret_paths(fleet: Fleet) -> Iterator[Problem]:
    """A worker's Vault policy grants whole secrets: two repositories whose passwords share one Vault secret
    can only be held by the same workers."""
    from primespark.orchestration.placement import pools, worker_repositories

    if fleet.backup is None:
        return
    holders: dict[str, set[str]] = {}
    for site in pools(fleet).values():
        for repository in worker_repositories(fleet, site):
            holders.setdefault(repository, set()).add(site)
    by_path: dict[str, list[str]] = {}
    for name, repo in fleet.backup.repositories.items():
        if repo.password.startswith("vault:"):
            by_path.setdefault(repo.password.partition("#")[0], []).append(name)
    for path, names in by_path.items():
        for other in names[1:]:
            if holders.get(other, set()) != holders.get(names[0], set()):
                yield _p(("backup", "repositories", other, "password"),
                         f"the password shares the Vault secret {path.removeprefix('vault:')} with {names[0]}'s, "
                         "but different workers hold them: a worker's policy grants a whole secret",
                         f"give each repository its own secret, e.g. `{path}/{other}#password`", "shared-secret-path")


def _owned_folders(fleet: Fleet, host: str) -> Iterator[tuple[str, str]]:
    """Folders on `host` that belong to something other than a sync job: (folder, what owns it)."""
    if fleet.backup is not None:
        for name, repo in fleet.backup.repositories.items():
            if repo.host == host:
                yield repo.path, f"restic repository {name}"
        yield fleet.backup.client_dir, "the backup client's keys (backup.client_dir)"
    if fleet.sync is not None:
        yield fleet.sync.client_dir, "the sync keys (sync.client_dir)"


def _sync_destination(fleet: Fleet, link: Link) -> Iterator[Problem]:
    """A link's destination against the tiers, backups and the route from its source."""
    from primespark.data.layout import overlap, tier_folder
    where = ("sync", "jobs", link.job, "destination")
    if link.local and overlap(link.source_path, link.destination_path):
        yield _p(where, f"source and destination overlap on {link.source} ({link.source_path} and "
                 f"{link.destination_path}): each pass would copy into what it reads",
                 "choose a destination outside the source folder (and the source outside it)", "sync-overlap")
    for tier_name in TIER_ORDER:
        tier = fleet.tiers.get(tier_name)
        if tier is None or link.destination not in tier.hosts or not overlap(link.destination_path, tier.path):
            continue
        if tier_name is TierName.hot:
            yield _p(where, f"{link.destination_path} on {link.destination} is in the hot tier ({tier.path}), which "
                     "agents write and tier migration empties", "sync into a folder outside the hot tier",
                     "sync-destination-owned")
            continue
        expected = tier_folder(fleet, tier_name, link.source, link.source_path)
        if link.destination_path != expected:
            yield _p(where, f"{link.destination_path} on {link.destination} is in the {tier_name.value} tier "
                     f"({tier.path}), where tier migration keeps {link.source}'s {link.source_path} at {expected}",
                     f"write to {expected} (for a host pattern: {tier.path.rstrip('/')}/{{host}}/…), so that sync "
                     "and tier migration share one copy", "sync-destination-owned")
    for folder, owner in _owned_folders(fleet, link.destination):
        if overlap(link.destination_path, folder):
            yield _p(where, f"{link.destination_path} on {link.destination} overlaps {folder}, which belongs to "
                     f"{owner}", "choose a destination of its own", "sync-destination-owned")
    source_site, target_site = fleet.hosts[link.source].site, fleet.hosts[link.destination].site
    if source_site != target_site and not any(
            fleet.in_mesh(m, link.source) and fleet.in_mesh(m, link.destination) for m in fleet.meshes):
        yield _p(where, f"{link.source} (site {source_site}) reaches {link.destination} (site {target_site}) only "
                 "over the WireGuard mesh, and no mesh holds both", "add both hosts to a mesh (`meshes:`)",
                 "sync-no-route")


def _sync(fleet: Fleet) -> Iterator[Problem]:
    # Imported here: the layout is built on the fleet model, and the fleet package loads before it.
    from primespark.data.layout import HOST_PLACEHOLDER, RESERVED_JOB_PREFIXES, links, overlap, source_hosts

    if fleet.sync is None:
        return
    written: list[Link] = []  # every link checked so far
    reported: set[tuple[str, str]] = set()  # job pairs already said to share a destination
    for name, job in fleet.sync.jobs.items():
        base = ("sync", "jobs", name)
        reserved = next((prefix for prefix in RESERVED_JOB_PREFIXES if name.startswith(prefix)), None)
        if reserved is not None:
            yield _p(base, f"{reserved}* names the accounts of tier passes and recalls (sync-{reserved}<tier>)",
                     "give the job another name", "sync-reserved-name")
        sources = source_hosts(fleet, job)
        if not sources:
            yield _p((*base, "source"), f"no host matches {job.source_pattern!r}",
                     f"name a host or a pattern matching some of: {', '.join(fleet.hosts)}", "unknown-host")
        if job.destination_host not in fleet.hosts:
            yield _p((*base, "destination"), f"no host named {job.destination_host!r}",
                     f"use one of: {', '.join(fleet.hosts)}", "unknown-host")
            continue
        if len(sources) > 1 and HOST_PLACEHOLDER not in job.destination_path:
            yield _p((*base, "destination"), f"the source matches {len(sources)} hosts ({', '.join(sources)}) and "
                     f"all of them would write {job.destination}", f"add {HOST_PLACEHOLDER} to the destination "
                     f"path, e.g. {job.destination_host}:{job.destination_path.rstrip('/')}/{HOST_PLACEHOLDER}",
                     "sync-destination-conflict")
        sites = sorted({fleet.hosts[h].site for h in sources})
        if len(sites) > 1:
            yield _p((*base, "source"), f"the source's hosts are on {len(sites)} sites ({', '.join(sites)}): a job "
                     "runs on the worker of its sources' site", "split it into one job per site", "sync-sites")
        for link in links(fleet, name):
            yield from _sync_destination(fleet, link)
            for other in written:
                if (other.job != link.job and (other.job, link.job) not in reported
                        and other.destination == link.destination
                        and overlap(other.destination_path, link.destination_path)):
                    reported.add((other.job, link.job))
                    yield _p((*base, "destination"), f"{link.destination}:{link.destination_path} is also written by "
                             f"sync job {other.job} ({other.destination}:{other.destination_path})",
                             "give each job a destination of its own: two writers undo each other's work",
                             "sync-destination-conflict")
            written.append(link)


def task_problems(fleet: Fleet) -> Iterator[Problem]:
    """A task template names hosts that exist, reads data the fleet places somewhere, and fits some host: one
    that no host can ever run would wait in the queue forever."""
    from primespark.agents.placement import data_places, static_exclusions

    for name, task in fleet.tasks.items():
        base = ("tasks", name)
        for i, ref in enumerate(task.data):
            host, _, path = ref.rpartition(":")
            if host and host not in fleet.hosts:
                yield _p((*base, "data", i), f"no host named {host!r}", f"use one of: {', '.join(fleet.hosts)}",
                         "unknown-host")
            elif not host and not data_places(fleet, ref):
                tiers = ", ".join(f"{t.value} {spec.path}" for t, spec in fleet.tiers.items()) or "none"
                yield _p((*base, "data", i), f"{path} is in no tier, so no host is known to hold it",
                         f"write `HOST:{path}`, or a path below a tier's path (tiers: {tiers})", "task-data-unplaced")
        runners = {n: h for n, h in fleet.hosts.items() if h.kind is not HostKind.kvm_host}
        own = [f for f in (_task_arch(name, task, runners), _task_labels(name, task, runners),
                           _task_image(name, task, runners)) if f is not None]
        yield from own
        if own:
            continue
        fits = {n: static_exclusions(h, task) for n, h in runners.items()}
        if runners and all(fits.values()):
            shown = "; ".join(f"{n}: {', '.join(r)}" for n, r in list(fits.items())[:5])
            more = f" and {len(fits) - 5} more" if len(fits) > 5 else ""
            yield _p(base, f"no host can ever run it: {shown}{more}",
                     "ask for less (cpus, memory_mb) or fewer constraints (arch, labels)", "task-unplaceable")


def _task_arch(name: str, task: TaskSpec, runners: dict[str, Host]) -> Problem | None:
    have = sorted({h.arch.value for h in runners.values()})
    if task.arch and not any(h.arch in task.arch for h in runners.values()):
        return _p(("tasks", name, "arch"), f"no host is {' or '.join(a.value for a in task.arch)}",
                  f"the fleet's hosts are {', '.join(have)}", "task-arch")
    return None


def _task_labels(name: str, task: TaskSpec, runners: dict[str, Host]) -> Problem | None:
    for key, value in sorted(task.labels.items()):
        if not any(h.labels.get(key) == value for h in runners.values()):
            seen = sorted({f"{key}={h.labels[key]}" for h in runners.values() if key in h.labels})
            return _p(("tasks", name, "labels", key), f"no host has the label {key}={value}",
                      f"use a label hosts carry ({', '.join(seen) or f'none has {key}'}), or label a host",
                      "unknown-label")
    return None


def _task_image(name: str, task: TaskSpec, runners: dict[str, Host]) -> Problem | None:
    if task.image is not None and not any(h.container_runtime for h in runners.values()):
        return _p(("tasks", name, "image"), "no host has a container runtime to run the image",
                  "set `container_runtime: true` on the hosts that run it, or drop `image:`", "task-image")
    return None
