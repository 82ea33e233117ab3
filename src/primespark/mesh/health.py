"""Mesh health: for every pair of members, the latest handshake (from `wg show dump`) and reachability
(ping over the overlay), as a table and as Prometheus text-format metrics for node-exporter's textfile collector.

The probe runs as shell snippets on each host: pings to the other members (so that an idle pair handshakes),
then the peer lines of the dump with the preshared-key column cut out — no secret leaves a host.

It pings in two rounds. If both ends of an idle pair send their first packet at the same moment, their
handshake initiations cross: each side answers the other's and drops the answer to its own, and neither
can send until the passive-keepalive timer starts over, 15 s later (seen with wireguard-go on every
tenth bring-up in the tests). So in the first round only one end of each direct pair speaks: the end that
knows the other's endpoint, or the first by name when both know each other's. The second round covers the
other directions and the pairs routed through a hub, once the tunnels are up.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from primespark.errors import StepFailed, UserError
from primespark.fleet.model import Fleet
from primespark.hosts import HostAccess, on_each, run_on
from primespark.mesh.plan import MeshPlan
from primespark.monitoring.metrics import mesh_metrics, publish, write_mesh_metrics

# WireGuard re-handshakes every 2 minutes while traffic flows and gives a session up after 3 minutes.
STALE_HANDSHAKE_SECONDS = 180

_PINGS = """\
for a in {addresses}; do
  ( if out=$(ping -n -q -c 1 -w {deadline} "$a" 2>&1); then
      echo "ping $a ok $(echo "$out" | sed -n 's|^rtt [^=]*= [0-9.]*/\\([0-9.]*\\)/.*|\\1|p')"
    else echo "ping $a down"; fi ) &
done
wait
"""
_DUMP = """\
echo "now $(date +%s)"
wg show {interface} dump | awk -F '\\t' 'NR > 1 {{ print "peer\\t" $1 "\\t" $3 "\\t" $5 "\\t" $6 "\\t" $7 }}'
"""
_RTT = re.compile(r"^[0-9.]+$")


@dataclass
class PairHealth:
    source: str
    target: str
    direct: bool
    reachable: bool
    rtt_ms: float | None
    handshake_age: float | None  # None: not a direct peer, or never handshaked

    @property
    def status(self) -> str:
        if not self.reachable:
            return "down"
        if self.direct and (self.handshake_age is None or self.handshake_age > STALE_HANDSHAKE_SECONDS):
            return "stale"
        return "ok"


@dataclass
class MeshHealth:
    mesh: str
    pairs: list[PairHealth] = field(default_factory=list)
    unreachable_hosts: dict[str, str] = field(default_factory=dict)

    @property
    def down(self) -> list[PairHealth]:
        return [p for p in self.pairs if p.status != "ok"]

    @property
    def healthy(self) -> bool:
        return not self.down and not self.unreachable_hosts


@dataclass
class _Probe:
    pings: dict[str, float | None]  # address → rtt ms, None when down
    handshakes: dict[str, int]  # public key → unix time of the latest handshake (0: never)
    now: int


def _parse(text: str) -> _Probe:
    pings: dict[str, float | None] = {}
    handshakes: dict[str, int] = {}
    now = int(time.time())
    for line in text.splitlines():
        parts = line.split()
        if line.startswith("ping ") and len(parts) >= 3:
            rtt = parts[3] if len(parts) > 3 and _RTT.match(parts[3]) else None
            pings[parts[1]] = (float(rtt) if rtt else 0.0) if parts[2] == "ok" else None
        elif line.startswith("now ") and len(parts) == 2:
            now = int(parts[1])
        elif line.startswith("peer\t"):
            fields = line.split("\t")
            handshakes[fields[1]] = int(fields[3]) if fields[3].isdigit() else 0
    return _Probe(pings, handshakes, now)


def probe_rounds(plan: MeshPlan) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The overlay addresses each host pings in the first round (one end of each direct pair) and in the second."""
    first: dict[str, list[str]] = {name: [] for name in plan.hosts}
    second: dict[str, list[str]] = {name: [] for name in plan.hosts}
    for source, config in plan.hosts.items():
        peers = {p.name: p for p in config.peers}
        for target, target_config in plan.hosts.items():
            if target == source:
                continue
            address = str(target_config.address)
            if target not in peers:
                second[source].append(address)
                continue
            knows_target = peers[target].endpoint is not None
            back = next((p for p in target_config.peers if p.name == source), None)
            known_by_target = back is not None and back.endpoint is not None
            speaks_first = knows_target and (not known_by_target or source < target)
            (first if speaks_first else second)[source].append(address)
    return first, second


def check_mesh(plan: MeshPlan, hosts: HostAccess, deadline_seconds: int = 6) -> MeshHealth:
    interface = plan.spec.interface
    health = MeshHealth(plan.mesh)
    first, second = probe_rounds(plan)

    def probe(host: str, addresses: list[str], dump: bool) -> _Probe | None:
        script = _PINGS.format(addresses=" ".join(addresses), deadline=deadline_seconds)
        if dump:
            script += _DUMP.format(interface=interface)
        try:
            return _parse(run_on(hosts, host, script, timeout=deadline_seconds + 30))
        except UserError as exc:
            health.unreachable_hosts[host] = exc.message
            return None

    opening = on_each([h for h in plan.hosts if first[h]], lambda h: probe(h, first[h], dump=False))
    results: dict[str, _Probe] = {}
    reachable = [h for h in plan.hosts if h not in health.unreachable_hosts]
    for host, result in on_each(reachable, lambda h: probe(h, second[h], dump=True)).items():
        if result is not None:
            earlier = opening.get(host)
            if earlier is not None:
                result.pings.update(earlier.pings)
            results[host] = result
    for source, config in plan.hosts.items():
        result = results.get(source)
        peers = {p.name: p for p in config.peers}
        for target, target_config in plan.hosts.items():
            if target == source:
                continue
            direct = target in peers
            rtt = result.pings.get(str(target_config.address)) if result else None
            age = None
            if result and direct:
                latest = result.handshakes.get(peers[target].public_key, 0)
                age = float(max(0, result.now - latest)) if latest else None
            health.pairs.append(PairHealth(source, target, direct, rtt is not None, rtt, age))
    return health


def write_metrics(health: MeshHealth, path: Path) -> Path:
    """Prometheus text format, through the metric registry's writer (atomic: the collector never reads half)."""
    pairs = [(p.source, p.target, p.reachable, None if p.rtt_ms is None else p.rtt_ms / 1000, p.handshake_age)
             for p in health.pairs]
    probed = {host: host not in health.unreachable_hosts for host in {p.source for p in health.pairs}}
    return write_mesh_metrics(path, health.mesh, pairs, probed, len(health.down))


def publish_metrics(health: MeshHealth, hosts: HostAccess, fleet: Fleet) -> dict[str, str]:
    """Each member's own view (the pairs it is the source of) onto that member, where its node exporter serves
    them to Prometheus. Per host: where the file went, or why it could not be written."""
    def put(source: str) -> str:
        pairs = [(p.source, p.target, p.reachable, None if p.rtt_ms is None else p.rtt_ms / 1000, p.handshake_age)
                 for p in health.pairs if p.source == source]
        down = sum(1 for p in health.pairs if p.source == source and p.status != "ok")
        metrics = mesh_metrics(health.mesh, pairs, {source: True}, down)
        try:
            return publish(hosts, fleet, source, f"mesh_{health.mesh}", metrics)
        except StepFailed as exc:
            return f"not written: {exc.message}"

    sources = sorted({p.source for p in health.pairs} - set(health.unreachable_hosts))
    return on_each(sources, put)
