"""Render cloud-init seeds (user-data, meta-data, network-config) for VMs and Pis from the fleet.

Templates live in images/ (Jinja2, StrictUndefined). Values enter the YAML as JSON strings, so a quote or a
colon in a value can never break the document.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import jinja2

from primespark.fleet.model import Fleet, Host, HostKind, PowerProfile

SECRET_ID_FILE = "/etc/primespark/vault/secret-id"


@dataclass(frozen=True)
class File:
    path: str
    content: str
    permissions: str = "0644"
    owner: str = "root:root"


@dataclass(frozen=True)
class Exposure:
    """A port a host admits, and on which network: `public`, `lan` or `mesh`."""

    port: int
    protocol: str
    network: str
    interface: str
    purpose: str

    def as_dict(self) -> dict[str, str | int]:
        return {"port": self.port, "protocol": self.protocol, "network": self.network,
                "interface": self.interface, "purpose": self.purpose}


@dataclass(frozen=True)
class User:
    name: str
    keys: list[str]
    sudo: bool
    groups: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Seed:
    user_data: str
    meta_data: str
    network_config: str


def images_dir() -> Path:
    from primespark.settings import get_settings

    return get_settings().root / "images"


@lru_cache(maxsize=4)
def _environment(root: Path) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(root), undefined=jinja2.StrictUndefined, autoescape=False,  # noqa: S701 YAML
        keep_trailing_newline=True,
    )


def render(template: str, root: Path | None = None, **context: object) -> str:
    return _environment(root or images_dir()).get_template(template).render(**context)


def mac_for(host: str, nic: str) -> str:
    """A stable, locally administered MAC (libvirt's 52:54:00 prefix) so network-config can match the NIC."""
    digest = hashlib.sha256(f"{host}/{nic}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def users_for(fleet: Fleet, host: Host, automation_keys: list[str], extra_groups: list[str]) -> list[User]:
    users = [User(host.ssh.user, list(automation_keys), True, ["sudo", *extra_groups])]
    users += [User(name, list(op.keys), op.sudo, (["sudo"] if op.sudo else []) + extra_groups)
              for name, op in fleet.operators.items() if name != host.ssh.user]
    return users


def exposure_for(fleet: Fleet, host_name: str) -> list[Exposure]:
    """What the host's firewall admits: SSH and WireGuard from the public side, services on the LAN and mesh."""
    host = fleet.hosts[host_name]
    rules: list[Exposure] = []
    meshes = {name: mesh for name, mesh in fleet.meshes.items() if host_name in fleet.mesh_members(name)}
    sides = [("lan", "lan0")] + ([("public", "pub0")] if host.public_address else [])
    for network, interface in sides:
        rules.append(Exposure(host.ssh.port, "tcp", network, interface, "ssh"))
        rules += [Exposure(mesh.listen_port, "udp", network, interface, f"wireguard {name}")
                  for name, mesh in meshes.items()]
    inner = [("lan", "lan0")] + [("mesh", mesh.interface) for mesh in meshes.values()]
    for network, interface in inner:
        rules.append(Exposure(fleet.monitoring.node_exporter_port, "tcp", network, interface, "node-exporter"))
        rules += [Exposure(svc.port, "tcp", network, interface, name)
                  for name, svc in sorted(fleet.services_on(host_name).items())]
    return rules


def _common(fleet: Fleet, host_name: str) -> dict[str, object]:
    host = fleet.hosts[host_name]
    site = fleet.sites[host.site]
    return {
        "host_name": host_name, "fqdn": f"{host_name}.{fleet.domain}", "domain": fleet.domain,
        "timezone": fleet.timezone, "ntp_servers": list(fleet.ntp_servers), "address": str(host.address),
        "lan_prefix": site.lan.prefixlen, "gateway": str(site.gateway),
        "node_exporter_port": fleet.monitoring.node_exporter_port, "textfile_dir": fleet.monitoring.textfile_dir,
        "instance_id": f"{fleet.name}-{host_name}",
    }


def role_template(role: str, root: Path | None = None) -> str:
    candidate = f"cloud-init/roles/{role}.yaml.j2"
    return candidate if ((root or images_dir()) / candidate).is_file() else "cloud-init/user-data.yaml.j2"


def vm_seed(fleet: Fleet, host_name: str, *, files: list[File], automation_keys: list[str],
            root: Path | None = None) -> Seed:
    host = fleet.hosts[host_name]
    if host.kind is not HostKind.vm:
        raise ValueError(f"{host_name} is a {host.kind.value}, not a vm")
    role = host.labels.get("role", "vm")
    has_services = bool(fleet.services_on(host_name))
    context = _common(fleet, host_name) | {
        "role": role,
        "users": users_for(fleet, host, automation_keys, ["docker"] if has_services else []),
        "services": sorted(fleet.services_on(host_name)),
        "files": files,
        "sysctl": "",
        "nftables": render("cloud-init/nftables.conf.j2", root, exposure=exposure_for(fleet, host_name)),
        "public_address": str(host.public_address) if host.public_address else "",
        "lan_mac": mac_for(host_name, "lan"), "public_mac": mac_for(host_name, "public"),
    }
    return Seed(
        user_data=render(role_template(role, root), root, **context),
        meta_data=render("cloud-init/meta-data.yaml.j2", root, **context),
        network_config=render("cloud-init/network-config.yaml.j2", root, **context),
    )


def _power_env(power: PowerProfile) -> str:
    lines = [f"GOVERNOR={power.governor.value}", f"UPS_SIGNAL={power.ups_signal}",
             f"SHUTDOWN_BATTERY_PERCENT={power.shutdown_battery_percent}"]
    if power.quiet_hours:
        lines += [f"QUIET_START={power.quiet_hours[0]}", f"QUIET_END={power.quiet_hours[1]}"]
    return "\n".join(lines) + "\n"


def pi_seed(fleet: Fleet, host_name: str, *, automation_keys: list[str], root: Path | None = None) -> Seed:
    host = fleet.hosts[host_name]
    if host.kind is not HostKind.pi:
        raise ValueError(f"{host_name} is a {host.kind.value}, not a pi")
    power = host.power or PowerProfile()
    context = _common(fleet, host_name) | {
        "users": users_for(fleet, host, automation_keys, ["docker"] if host.container_runtime else []),
        "container_runtime": host.container_runtime, "power": power, "power_env": _power_env(power),
    }
    return Seed(
        user_data=render("pi/user-data.yaml.j2", root, **context),
        meta_data=render("pi/meta-data.yaml.j2", root, **context),
        network_config=render("pi/network-config.yaml.j2", root, **context),
    )


def labels_description(host_name: str, host: Host) -> str:
    """The domain's description: the fleet labels as JSON, which the policy pack reads."""
    return json.dumps({"primespark": {"host": host_name, "labels": dict(sorted(host.labels.items()))}},
                      sort_keys=True)
