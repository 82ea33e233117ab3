"""The mesh planner: from the fleet model and the saved plan to every host's WireGuard interface and peers.

Rules (each one answers a question the anchors got wrong or left open):
- Addresses are stable: a host keeps the address it was given; a new host takes the lowest address never
  handed out before; a removed host's address is retired and never reused (as innernet does).
- Endpoints only where a peer can be reached: on the same site, the peer's LAN address; elsewhere its
  public address; a host with neither (behind NAT) gets no endpoint and is reached when it calls in.
- PersistentKeepalive on the NATed side only, toward peers that have an endpoint across the NAT — the
  side that must keep the NAT mapping open (wg-meshconf #30 put it on the wrong side).
- AllowedIPs: a /32 per peer; in hub-and-spoke, spokes route the whole overlay through the hub, which forwards.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from primespark.errors import UserError
from primespark.fleet.model import Fleet, Mesh, Topology
from primespark.secrets import atomic_write

STATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class Peer:
    name: str
    public_key: str
    allowed_ips: tuple[str, ...]
    endpoint: str | None
    keepalive: int | None
    preshared_key: bool


@dataclass(frozen=True, slots=True)
class HostConfig:
    name: str
    address: IPv4Address
    public_key: str
    peers: tuple[Peer, ...]
    forward: bool

    def digest(self) -> str:
        """A fingerprint of everything but secrets: equal digests mean an unchanged config."""
        text = "\n".join(f"{p.name}|{p.public_key}|{','.join(p.allowed_ips)}|{p.endpoint}|{p.keepalive}|"
                         f"{p.preshared_key}" for p in self.peers)
        return hashlib.sha256(f"{self.address}|{self.forward}\n{text}".encode()).hexdigest()[:16]


class HostState(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: IPv4Address
    public_key: str
    digest: str = ""


class MeshState(BaseModel):
    """What is saved between runs: the allocation (current and retired addresses) and the public keys."""

    model_config = ConfigDict(extra="forbid")
    version: int = STATE_VERSION
    fleet: str
    mesh: str
    interface: str
    overlay: IPv4Network
    listen_port: int
    topology: Topology
    hub: str | None = None
    settings_digest: str = ""
    hosts: dict[str, HostState]
    retired: dict[str, str] = {}  # address → the host that had it

    def address_of(self, host: str) -> IPv4Address:
        return self.hosts[host].address


@dataclass
class MeshPlan:
    fleet: str
    mesh: str
    spec: Mesh
    hosts: dict[str, HostConfig]
    retired: dict[str, str]
    warnings: list[str] = field(default_factory=list)

    @property
    def prefixlen(self) -> int:
        return self.spec.overlay.prefixlen

    def state(self) -> MeshState:
        return MeshState(
            fleet=self.fleet, mesh=self.mesh, interface=self.spec.interface, overlay=self.spec.overlay,
            listen_port=self.spec.listen_port, topology=self.spec.topology, hub=self.spec.hub,
            settings_digest=settings_digest(self.spec),
            hosts={n: HostState(address=h.address, public_key=h.public_key, digest=h.digest())
                   for n, h in self.hosts.items()},
            retired=dict(self.retired),
        )

    def peer_pairs(self) -> list[tuple[str, str]]:
        return sorted({(min(h, p.name), max(h, p.name)) for h, c in self.hosts.items() for p in c.peers})


def settings_digest(spec: Mesh) -> str:
    """Interface-level settings: a change here (MTU, port) reaches every host."""
    return f"{spec.interface}|{spec.listen_port}|{spec.mtu}|{spec.keepalive_seconds}|{spec.preshared_keys}"


def _peers_of(name: str, members: list[str], topology: Topology, hub: str | None) -> list[str]:
    if topology is Topology.full_mesh:
        return [m for m in members if m != name]
    if name == hub:
        return [m for m in members if m != hub]
    return [hub] if hub is not None else []


def allocate(
    members: Iterable[str], overlay: IPv4Network, previous: MeshState | None
) -> tuple[dict[str, IPv4Address], dict[str, str]]:
    """Keep every known host's address, retire the addresses of hosts that left, give new hosts fresh ones."""
    members = list(members)
    keep: dict[str, IPv4Address] = {}
    retired: dict[str, str] = dict(previous.retired) if previous else {}
    if previous is not None:
        if previous.overlay != overlay:
            raise UserError(
                f"mesh {previous.mesh}: the overlay changed from {previous.overlay} to {overlay}; every host "
                "would change its address",
                f"keep overlay {previous.overlay}, or re-address on purpose: delete the saved plan and run "
                "`spark mesh plan` again",
            )
        wanted = set(members)
        for host, saved in previous.hosts.items():
            if host in wanted:
                keep[host] = saved.address
            else:
                retired[str(saved.address)] = host
    taken = {int(a) for a in keep.values()} | {int(IPv4Address(a)) for a in retired}
    first, last = int(overlay.network_address) + 1, int(overlay.broadcast_address) - 1
    candidate = first
    for host in members:
        if host in keep:
            continue
        while candidate in taken:
            candidate += 1
        if candidate > last:
            raise UserError(
                f"the overlay {overlay} has no address left for {host}: {len(keep)} in use and "
                f"{len(retired)} retired (retired addresses are never reused)",
                "give the mesh a larger overlay (meshes.<mesh>.overlay)",
            )
        keep[host] = IPv4Address(candidate)
        taken.add(candidate)
    return {h: keep[h] for h in members}, retired


def plan_mesh(
    fleet: Fleet, mesh_name: str, public_keys: Mapping[str, str], previous: MeshState | None = None
) -> MeshPlan:
    """Pure planning: no I/O. `public_keys` must hold a key for every member."""
    if mesh_name not in fleet.meshes:
        raise UserError(f"fleet {fleet.name} has no mesh {mesh_name!r}",
                        f"use one of: {', '.join(fleet.meshes) or 'none (add a meshes: section)'}")
    spec = fleet.meshes[mesh_name]
    members = fleet.mesh_members(mesh_name)
    addresses, retired = allocate(members, spec.overlay, previous)
    port = spec.listen_port
    sites = {m: fleet.hosts[m].site for m in members}
    nat = {m: fleet.behind_nat(m) for m in members}
    public = {m: fleet.hosts[m].public_address for m in members}
    lan = {m: fleet.hosts[m].address for m in members}
    whole_overlay = (str(spec.overlay),)
    hub = spec.hub if spec.topology is Topology.hub_and_spoke else None
    warnings: list[str] = []
    hosts: dict[str, HostConfig] = {}
    for name in members:
        peers = []
        for other in _peers_of(name, members, spec.topology, hub):
            same_site = sites[other] == sites[name]
            if same_site:
                endpoint = f"{lan[other]}:{port}"
            elif public[other] is not None:
                endpoint = f"{public[other]}:{port}"
            else:
                endpoint = None
            keepalive = spec.keepalive_seconds if (nat[name] and endpoint is not None and not same_site) else None
            if endpoint is None and not same_site and nat[name] and name < other:
                warnings.append(f"{name} and {other} are both behind NAT with no endpoint: they cannot reach "
                                "each other directly (use hub_and_spoke with a public hub)")
            allowed = whole_overlay if (hub is not None and other == hub) else (f"{addresses[other]}/32",)
            peers.append(Peer(other, public_keys[other], allowed, endpoint, keepalive, spec.preshared_keys))
        hosts[name] = HostConfig(name, addresses[name], public_keys[name], tuple(peers), forward=(name == hub))
    return MeshPlan(fleet.name, mesh_name, spec, hosts, retired, warnings)


# ---- the diff between the saved plan and a new one -------------------------------------------------------

@dataclass
class PlanDiff:
    added: dict[str, str] = field(default_factory=dict)  # host → address
    removed: dict[str, str] = field(default_factory=dict)  # host → retired address
    changed: dict[str, list[str]] = field(default_factory=dict)  # host → what changed
    unchanged: int = 0

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def lines(self) -> list[str]:
        out = [f"+ {h} {a}" for h, a in self.added.items()]
        out += [f"- {h} (address {a} retired)" for h, a in self.removed.items()]
        out += [f"~ {h}: {'; '.join(why)}" for h, why in self.changed.items()]
        return out


def diff_plans(previous: MeshState | None, plan: MeshPlan) -> PlanDiff:
    diff = PlanDiff()
    if previous is None:
        diff.added = {n: str(h.address) for n, h in plan.hosts.items()}
        return diff
    old_members = list(previous.hosts)
    spec_changed = previous.settings_digest != settings_digest(plan.spec)
    for name in old_members:
        if name not in plan.hosts:
            diff.removed[name] = str(previous.hosts[name].address)
    for name, host in plan.hosts.items():
        old = previous.hosts.get(name)
        if old is None:
            diff.added[name] = str(host.address)
            continue
        reasons: list[str] = []
        if old.public_key != host.public_key:
            reasons.append("new key")
        old_peers = set(_peers_of(name, old_members, previous.topology, previous.hub))
        new_peers = {p.name for p in host.peers}
        if gained := sorted(new_peers - old_peers):
            reasons.append("peers added: " + ", ".join(gained))
        if lost := sorted(old_peers - new_peers):
            reasons.append("peers removed: " + ", ".join(lost))
        if spec_changed:
            reasons.append("mesh settings")
        if not reasons and old.digest != host.digest():
            reasons.append("peer settings (endpoint, keys, keepalive or routes)")
        if reasons:
            diff.changed[name] = reasons
        else:
            diff.unchanged += 1
    return diff


# ---- the saved plan ---------------------------------------------------------------------------------------

def state_path(state_dir: Path, mesh: str) -> Path:
    return state_dir / "mesh" / f"{mesh}.json"


def load_state(state_dir: Path, mesh: str) -> MeshState | None:
    path = state_path(state_dir, mesh)
    try:
        return MeshState.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (ValidationError, ValueError) as exc:
        raise UserError(f"the saved mesh plan {path} cannot be read: {str(exc).splitlines()[0]}",
                        "restore it from a backup; deleting it re-addresses the whole mesh") from None


def save_state(state_dir: Path, state: MeshState) -> Path:
    path = state_path(state_dir, state.mesh)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, json.dumps(state.model_dump(mode="json"), indent=1, sort_keys=True) + "\n", 0o600)
    return path
