"""The Ansible inventory, derived from the fleet model: groups by site, kind and service; host vars from the model.

Used by the `fleet` inventory plugin (`inventory/<env>.fleet.yml`) and by `spark inventory ENV`.
"""

from __future__ import annotations

import re
from typing import Any

from primespark.agents.execute import results_root
from primespark.data.layout import RECALL_JOB_PREFIX, transport_links
from primespark.data.sync import client_dir
from primespark.fleet.model import Fleet, HostKind, PowerProfile, ServiceKind
from primespark.hosts import SshFiles
from primespark.monitoring import paths as monitoring_paths
from primespark.pki import HOST_TLS_FOLDER, TLS_GID, TLS_GROUP, WEB_CONFIG, native_monitoring, serves_tls
from primespark.settings import Settings, get_settings

KIND_GROUPS = {HostKind.pi: "pis", HostKind.nas: "nas", HostKind.kvm_host: "kvm_hosts", HostKind.vm: "vms"}


def group_name(name: str) -> str:
    """Ansible group names may not hold dashes."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def managed_hosts(fleet: Fleet) -> list[str]:
    """Hosts reached over SSH. In the lab the KVM host is the machine itself, so it is left out."""
    return [n for n, h in fleet.hosts.items() if not (fleet.lab is not None and h.kind is HostKind.kvm_host)]


def host_vars(fleet: Fleet, name: str) -> dict[str, Any]:
    host = fleet.hosts[name]
    tiers = {t.value: {"path": spec.path, "capacity_gb": spec.capacity_gb}
             for t, spec in fleet.tiers.items() if name in spec.hosts}
    # A Pi without a profile gets the model's defaults, so the edge role always has one.
    power = host.power or (PowerProfile() if host.kind is HostKind.pi else None)
    return {
        "ansible_host": str(host.ssh_address),
        "ansible_user": host.ssh.user,
        "ansible_port": host.ssh.port,
        "ansible_python_interpreter": "/usr/bin/python3",
        "spark_fleet": fleet.name,
        "spark_kind": host.kind.value,
        "spark_site": host.site,
        "spark_site_kind": fleet.sites[host.site].kind.value,
        "spark_behind_nat": fleet.behind_nat(name),
        "spark_arch": host.arch.value,
        "spark_cpus": host.cpus,
        "spark_memory_mb": host.memory_mb,
        "spark_disk_gb": host.disk_gb,
        "spark_address": str(host.address),
        "spark_public_address": str(host.public_address) if host.public_address else None,
        "spark_lan": str(fleet.sites[host.site].lan),
        "spark_labels": dict(host.labels),
        "spark_power": power.model_dump(mode="json") if power else None,
        "spark_container_runtime": host.container_runtime,
        # where agent tasks keep their results here: the edge role's power scripts find the running ones below it
        "spark_task_root": results_root(fleet, name),
        "spark_timezone": fleet.timezone,
        "spark_services": [{"name": s, "kind": svc.kind.value, "port": svc.port}
                           for s, svc in fleet.services_on(name).items()],
        "spark_tiers": tiers,
        "spark_meshes": {m: {"interface": spec.interface, "listen_port": spec.listen_port,
                             "overlay": str(spec.overlay)}
                         for m, spec in fleet.meshes.items() if fleet.in_mesh(m, name)},
        "spark_tier_watermarks": {t.value: {"low": spec.low_watermark, "high": spec.high_watermark}
                                  for t, spec in fleet.tiers.items() if name in spec.hosts},
        "spark_ssh_port": host.ssh.port,
        "spark_mgmt_networks": management_networks(fleet, name),
        "spark_ssh_sources": ssh_sources(fleet, name),
        "spark_operators": [{"name": n, "keys": list(op.keys), "sudo": op.sudo}
                            for n, op in fleet.operators.items()],
        "spark_node_exporter_port": fleet.monitoring.node_exporter_port,
        # The host's certificate from the fleet CA (the tls role) and the services that serve with it; None where
        # the fleet has no CA (the local secret store): there they stay plain HTTP.
        "spark_tls": ({"folder": str(HOST_TLS_FOLDER), "group": TLS_GROUP, "gid": TLS_GID,
                       "web_config": str(WEB_CONFIG)} if serves_tls(fleet) else None),
        "spark_textfile_dir": fleet.monitoring.textfile_dir,
        "spark_monitoring": monitoring_vars(fleet, name),
        # Lab containers share the machine's clock and have no way out: no time sources there.
        "spark_ntp_servers": [] if fleet.lab is not None else list(fleet.ntp_servers),
        "spark_restic_repositories": [
            {"name": r, "path": repo.path}
            for r, repo in (fleet.backup.repositories.items() if fleet.backup else ()) if repo.host == name
        ],
        "spark_backup_accounts": [a for a in backup_accounts(fleet) if a["nas"] == name],
        "spark_backup_target": next((a for a in backup_accounts(fleet) if a["client"] == name), None),
        "spark_backup_paths": backup_paths(fleet, name),
        # Sync jobs (primespark.data.sync): the accounts this host keeps as a destination, the links it pushes.
        "spark_sync_accounts": sync_accounts_on(fleet, name),
        "spark_sync_pushes": sync_pushes_from(fleet, name),
        "spark_sync_client_dir": client_dir(fleet),
        # A lab fleet's hosts are containers made for it: lab-only roles (lab_data fills the backup paths, the
        # data generator writes into the hot tier) run there only.
        "spark_lab": fleet.lab is not None,
        # the Prefect server's port, opened to the management networks (LAN and overlay) by the hardening role
        "spark_prefect_server_port": (fleet.orchestration.server.port if fleet.orchestration is not None
                                      and fleet.orchestration.server.host == name else None),
    }


def backup_paths(fleet: Fleet, name: str) -> list[str]:
    """What the host's backup plan reads: its paths and those of the services it runs (none without a plan)."""
    if fleet.backup is None or name not in fleet.backup.plans:
        return []
    services = [p for s in fleet.services_on(name).values() for p in s.backup_paths]
    return list(dict.fromkeys([*fleet.backup.plans[name].paths, *services]))


def monitoring_vars(fleet: Fleet, name: str) -> dict[str, Any]:
    """For the monitoring_server role: the Prometheus and Alertmanager this host runs (ports, or None), and how.
    `native`: Debian's packages, as in the lab (whose VMs have no compose stack); otherwise the compose stack
    runs them and the role only places the receivers' secret files where the Alertmanager container reads them."""
    ports = {svc.kind: svc.port for svc in fleet.services_on(name).values()}
    names = {svc.kind: service for service, svc in fleet.services_on(name).items()}
    native = native_monitoring(fleet)
    return {
        "native": native,
        "prometheus_port": ports.get(ServiceKind.prometheus),
        "alertmanager_port": ports.get(ServiceKind.alertmanager),
        "alertmanager_service": names.get(ServiceKind.alertmanager),
        # both serve only TLS with the host's certificate (the tls role's web config), where the fleet has a CA
        "tls": serves_tls(fleet) and native,
        "config_dir": monitoring_paths.CONFIG_DIR,
        "secrets_dir": monitoring_paths.SECRETS_DIR if native else monitoring_paths.HOST_SECRETS_DIR,
        "retention": fleet.monitoring.retention,
    }


def sync_accounts_on(fleet: Fleet, name: str) -> list[dict[str, Any]]:
    """The sync accounts `name` keeps as a destination: one per job (`sync-<job>`), each source host's key
    restricted to its link's folder (the `sync` role)."""
    out: dict[str, dict[str, Any]] = {}
    for link in transport_links(fleet):
        if link.destination == name and not link.local:
            account = out.setdefault(link.job, {"job": link.job, "user": f"sync-{link.job}", "mode": link.mode.value,
                                                "traverse": link.job.startswith(RECALL_JOB_PREFIX), "roots": []})
            account["roots"].append({"source": link.source, "path": link.destination_path})
    return list(out.values())


def sync_pushes_from(fleet: Fleet, name: str) -> list[dict[str, str]]:
    """The links `name` pushes as a source host."""
    return [{"job": link.job, "source_path": link.source_path, "destination": link.destination,
             "path": link.destination_path}
            for link in transport_links(fleet) if link.source == name and not link.local]


def management_networks(fleet: Fleet, name: str) -> list[str]:
    """Where SSH and service ports are reachable from: the host's site LAN and the overlays it is in."""
    host = fleet.hosts[name]
    overlays = [str(spec.overlay) for m, spec in fleet.meshes.items() if fleet.in_mesh(m, name)]
    return [str(fleet.sites[host.site].lan), *overlays]


def ssh_sources(fleet: Fleet, name: str) -> list[str]:
    """Where SSH is allowed from: the management networks, and for a host with a public address
    (reached from outside, as cloud VMs are) also the fleet's admin networks, or anywhere if it names none."""
    host = fleet.hosts[name]
    sources = management_networks(fleet, name)
    if host.public_address is not None or host.ssh_address not in fleet.sites[host.site].lan:
        sources += [str(n) for n in fleet.admin_networks] or ["0.0.0.0/0"]
    return sources


def backup_accounts(fleet: Fleet) -> list[dict[str, str]]:
    """One SFTP-only account per client host on the host of its plan's repository, and on the host of every
    repository that copies it (offsite): the primary account comes first.

    restic cannot share one repository between several Unix users (it creates owner-only files),
    so each client gets its own repository inside its own chroot: `<repository path>/<client>/repo`.
    The client's restic URL is `sftp:<user>@<nas address>:/repo`.
    """
    if fleet.backup is None:
        return []
    accounts = []
    for client, plan in fleet.backup.plans.items():
        copies = [r for r, repo in fleet.backup.repositories.items() if repo.copy_from == plan.repository]
        for name in (plan.repository, *copies):
            repo = fleet.backup.repositories[name]
            accounts.append({
                "client": client,
                "nas": repo.host,
                "repository": name,
                "user": f"backup-{client}"[:32],
                "chroot": f"{repo.path.rstrip('/')}/{client}",
                "path": "/repo",
            })
    return accounts


def orchestration_groups(fleet: Fleet, name: str) -> list[str]:
    """`prefect_server` and `prefect_workers`: where site.yml installs the server and the workers."""
    spec = fleet.orchestration
    if spec is None:
        return []
    return ([*(["prefect_server"] if spec.server.host == name else []),
             *(["prefect_workers"] if any(w.host == name for w in spec.workers.values()) else [])])


def ssh_files(env: str, settings: Settings | None = None) -> SshFiles:
    return SshFiles.of((settings or get_settings()).state_path(env))


def ssh_operator(user: str, files: SshFiles) -> dict[str, Any]:
    """The host's SSH user (Ansible's), with the environment's generated public key where there is one."""
    return {"name": user, "keys": files.public_keys(), "sudo": True}


def build_inventory(fleet: Fleet, env: str | None = None, settings: Settings | None = None) -> dict[str, Any]:
    """Ansible's JSON inventory format (the `--list` shape)."""
    groups: dict[str, set[str]] = {}
    hostvars: dict[str, dict[str, Any]] = {}
    files = ssh_files(env or fleet.name, settings)
    common = files.ansible_vars()
    for name in managed_hosts(fleet):
        host = fleet.hosts[name]
        hostvars[name] = {**host_vars(fleet, name), **common}
        hostvars[name]["spark_operators"] = [ssh_operator(host.ssh.user, files),
                                             *hostvars[name]["spark_operators"]]
        for group in (group_name(host.site), fleet.sites[host.site].kind.value, KIND_GROUPS[host.kind]):
            groups.setdefault(group, set()).add(name)
        for service, svc in fleet.services_on(name).items():
            groups.setdefault(group_name(service), set()).add(name)
            if svc.kind in (ServiceKind.prometheus, ServiceKind.alertmanager):
                groups.setdefault("monitoring_servers", set()).add(name)
        if fleet.backup and any(repo.host == name for repo in fleet.backup.repositories.values()):
            groups.setdefault("backup_repositories", set()).add(name)
        for group in orchestration_groups(fleet, name):
            groups.setdefault(group, set()).add(name)
    inventory: dict[str, Any] = {
        "_meta": {"hostvars": hostvars},
        "all": {"children": [*sorted(groups), "ungrouped"]},
        "ungrouped": {"hosts": []},
    }
    for group, members in sorted(groups.items()):
        inventory[group] = {"hosts": sorted(members)}
    return inventory
