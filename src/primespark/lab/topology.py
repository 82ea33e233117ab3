"""The lab as data: which Docker networks and containers mirror a fleet, derived from the fleet model only.

Pure functions, no Docker: `plan_lab(fleet, ...)` is what `up` makes real and what unit tests check.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from primespark.errors import UserError
from primespark.fleet.model import Fleet, SecretBackend, VaultAuth
from primespark.inventory import managed_hosts

LABEL = "primespark.lab"
SPEC_LABEL = "primespark.lab.spec"
HOST_LABEL = "primespark.lab.host"
ROLE_LABEL = "primespark.lab.role"


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    subnet: IPv4Network
    gateway: IPv4Address  # this machine's address on the bridge: how the controller reaches the hosts
    purpose: str  # "site <name>" or "wan"

    def spec_hash(self) -> str:
        return _hash({"subnet": str(self.subnet), "gateway": str(self.gateway)})


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    hostname: str
    role: str  # "host" or "router"
    host: str | None  # the fleet host, None for a router
    addresses: dict[str, IPv4Address]  # network name -> address; the first is the primary network
    default_gateway: IPv4Address
    environment: dict[str, str] = field(default_factory=dict)
    sysctls: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    # NET_ADMIN, NET_RAW: routes, nftables and WireGuard. AUDIT_CONTROL: cron's PAM session sets each job's login
    # uid; a cron that Ansible started over SSH carries that session's login uid, and changing a set one needs
    # this capability (on a real host systemd starts cron with none set): without it every cron job fails unseen.
    capabilities: tuple[str, ...] = ("NET_ADMIN", "NET_RAW", "AUDIT_CONTROL")

    def spec_hash(self, image: str) -> str:
        return _hash({
            "image": image, "hostname": self.hostname, "role": self.role,
            "addresses": {k: str(v) for k, v in self.addresses.items()},
            "gateway": str(self.default_gateway), "env": self.environment, "sysctls": self.sysctls,
            "aliases": list(self.aliases), "capabilities": list(self.capabilities),
        })


@dataclass(frozen=True)
class OpenBaoSpec:
    """The lab's OpenBao (a fleet with `secrets: {backend: vault, auth: lab}`): a server on this machine that
    listens on loopback, for commands, and on this machine's address on the LAN of every site whose hosts
    log in to read their service secrets (they hold AppRoles), as VMs do at boot in production."""

    port: int
    listen: tuple[IPv4Address, ...]  # loopback first
    mounts: tuple[str, ...]  # KV v2 engines the fleet's secrets use

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def address_on(self, listen: IPv4Address) -> str:
        """Plain HTTP on loopback; TLS on the lab's bridges (primespark.lab.openbao)."""
        return f"{'http' if listen.is_loopback else 'https'}://{listen}:{self.port}"


@dataclass(frozen=True)
class LabPlan:
    fleet: str
    networks: list[NetworkSpec]
    containers: list[ContainerSpec]
    openbao: OpenBaoSpec | None = None

    def container(self, host: str) -> ContainerSpec:
        for spec in self.containers:
            if spec.host == host:
                return spec
        raise KeyError(host)


def _hash(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def container_name(fleet: Fleet, host: str) -> str:
    return f"spark-{fleet.name}-{host}"


def router_name(fleet: Fleet, site: str) -> str:
    return f"spark-{fleet.name}-router-{site}"


def network_name(fleet: Fleet, site_or_wan: str) -> str:
    return f"spark-{fleet.name}-{site_or_wan}"


def _bridge_address(subnet: IPv4Network, taken: set[IPv4Address], where: str) -> IPv4Address:
    """This machine's address on a lab network: the highest one no host or router uses."""
    for candidate in reversed(list(subnet.hosts())):
        if candidate not in taken:
            return candidate
    raise UserError(f"{where} ({subnet}) has no free address left for this machine's bridge",
                    fix="use a larger network in the fleet file")


def plan_lab(fleet: Fleet, authorized_key: str) -> LabPlan:
    if fleet.lab is None:
        raise UserError(f"fleet {fleet.name!r} has no `lab:` section, so it cannot run as a lab",
                        fix="add `lab: {wan: <cidr>}` to the fleet file, or use the lab fleet (inventory/lab.yaml)")
    hosts = managed_hosts(fleet)
    networks = _networks(fleet, fleet.lab.wan, _taken_addresses(fleet, hosts))
    gateways = {n.name: n.gateway for n in networks}
    containers = [*_routers(fleet, hosts, gateways), *_host_containers(fleet, hosts, gateways, authorized_key)]
    return LabPlan(fleet.name, networks, containers, plan_openbao(fleet, networks))


def plan_openbao(fleet: Fleet, networks: list[NetworkSpec]) -> OpenBaoSpec | None:
    if fleet.lab is None or fleet.secrets.backend is not SecretBackend.vault or fleet.secrets.auth is not VaultAuth.lab:
        return None
    # The hosts `spark up` would give an AppRole (those that run services) and the sites' Prefect workers.
    sites = {fleet.hosts[s.host].site for s in fleet.services.values() if s.host in fleet.hosts}
    if fleet.orchestration is not None:
        sites |= {site for site, worker in fleet.orchestration.workers.items() if worker.host in fleet.hosts}
    lans = {network_name(fleet, site) for site in sites}
    listen = [IPv4Address("127.0.0.1"), *(n.gateway for n in networks if n.name in lans)]
    return OpenBaoSpec(fleet.lab.openbao_port, tuple(listen), tuple(fleet.vault_mounts()))


def _taken_addresses(fleet: Fleet, hosts: list[str]) -> dict[str, set[IPv4Address]]:
    """Per lab network, the addresses that hosts and routers use."""
    wan = network_name(fleet, "wan")
    taken: dict[str, set[IPv4Address]] = {wan: set()}
    for site_name, site in fleet.sites.items():
        taken[network_name(fleet, site_name)] = {site.gateway} if site.behind_nat else set()
        if site.behind_nat:
            if site.public_address is None:
                raise UserError(f"site {site_name!r} is behind NAT but has no public_address for its router",
                                fix=f"set sites.{site_name}.public_address to an address in lab.wan")
            taken[wan].add(site.public_address)
    for name in hosts:
        host = fleet.hosts[name]
        taken[network_name(fleet, host.site)].add(host.address)
        if host.public_address is not None and not fleet.behind_nat(name):
            taken[wan].add(host.public_address)
    return taken


def _networks(fleet: Fleet, wan_subnet: IPv4Network, taken: dict[str, set[IPv4Address]]) -> list[NetworkSpec]:
    wan = network_name(fleet, "wan")
    networks = [NetworkSpec(wan, wan_subnet, _bridge_address(wan_subnet, taken[wan], "lab.wan"), "wan")]
    for site_name, site in fleet.sites.items():
        net = network_name(fleet, site_name)
        networks.append(NetworkSpec(net, site.lan, _bridge_address(site.lan, taken[net], f"sites.{site_name}.lan"),
                                    f"site {site_name}"))
    for spec in networks:
        for addr in taken[spec.name]:
            if addr not in spec.subnet:
                raise UserError(f"address {addr} is outside {spec.purpose}'s network {spec.subnet}",
                                fix="move the address into the network, or widen the network in the fleet file")
    return networks


def _routers(fleet: Fleet, hosts: list[str], gateways: dict[str, IPv4Address]) -> list[ContainerSpec]:
    """A NAT router per site behind NAT that has hosts in the lab."""
    wan = network_name(fleet, "wan")
    routers = []
    for site_name, site in fleet.sites.items():
        if site.behind_nat and any(fleet.hosts[h].site == site_name for h in hosts):
            lan = network_name(fleet, site_name)
            assert site.public_address is not None
            routers.append(ContainerSpec(
                name=router_name(fleet, site_name), hostname=f"router-{site_name}", role="router", host=None,
                addresses={lan: site.gateway, wan: site.public_address},
                default_gateway=gateways[wan],
                environment={"SPARK_ROLE": "router", "SPARK_NAT_SOURCE": str(site.lan),
                             "SPARK_NAT_ADDRESS": str(site.public_address),
                             "SPARK_LAN_ADDRESS": str(site.gateway),
                             "SPARK_DEFAULT_GATEWAY": str(gateways[wan])},
                sysctls={"net.ipv4.ip_forward": "1"},
                aliases=(f"router-{site_name}",),
            ))
    return routers


def _host_containers(fleet: Fleet, hosts: list[str], gateways: dict[str, IPv4Address],
                     authorized_key: str) -> list[ContainerSpec]:
    wan = network_name(fleet, "wan")
    containers = []
    for name in hosts:
        host = fleet.hosts[name]
        lan = network_name(fleet, host.site)
        addresses = {lan: host.address}
        if fleet.behind_nat(name):
            gateway = fleet.sites[host.site].gateway
        elif host.public_address is not None:
            addresses[wan] = host.public_address
            gateway = gateways[wan]
        else:
            gateway = gateways[lan]
        containers.append(ContainerSpec(
            name=container_name(fleet, name), hostname=name, role="host", host=name,
            addresses=addresses, default_gateway=gateway,
            environment={"SPARK_ROLE": "host", "SPARK_USER": host.ssh.user, "SPARK_SSH_PORT": str(host.ssh.port),
                         "SPARK_AUTHORIZED_KEY": authorized_key, "SPARK_DEFAULT_GATEWAY": str(gateway),
                         "TZ": fleet.timezone},
            aliases=(name, f"{name}.{fleet.domain}"),
        ))
    return containers
