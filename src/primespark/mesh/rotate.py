"""Replace one host's WireGuard key with no loss beyond one handshake interval.

WireGuard names a peer by its public key and routes by AllowedIPs, and one overlay address can belong to
only one peer entry at a time. So the new key cannot simply replace the old one on the peers; the order is:

1. stage   — make the new key and store it beside the old one (a crash from here on loses nothing).
2. publish — on every peer, add the new public key as an *extra* peer entry with no AllowedIPs (same PSK,
             endpoint, keepalive). The old entry still carries the traffic; the new one can already
             complete a handshake. Check that every peer lists it; if any fails, remove it again and stop.
3. switch  — on the host, `wg set <if> private-key`: from now on it handshakes with the new key, and each
             peer matches that handshake to the entry added in step 2.
4. move    — on every peer at once, in one `wg set` each: give the new entry the host's AllowedIPs (which
             takes them from the old entry) and remove the old entry. Between 3 and 4 packets to and from
             the host are dropped; that window is a few SSH round trips, below one handshake interval (5 s).
5. verify  — ping every peer from the host over the overlay and require a handshake with the new key on
             every peer. On failure, roll back: old key on the host, old entry back on the peers.
6. commit  — the new key becomes the host's key in the store, the saved plan gets the new public key,
             and the configs on the host and its peers are rewritten (so a restart keeps the new key).
"""

from __future__ import annotations

import contextlib
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from primespark.errors import UserError
from primespark.fleet.model import Fleet
from primespark.hosts import HostAccess, on_each, run_on
from primespark.mesh.keys import MeshKeys, public_key_of
from primespark.mesh.plan import MeshPlan, Peer
from primespark.mesh.render import render_host
from primespark.mesh.service import Planned, plan_and_save
from primespark.secrets import SecretStore

HANDSHAKE_INTERVAL_SECONDS = 5  # WireGuard's REKEY_TIMEOUT: a lost handshake is retried after this long


class RotationError(UserError):
    pass


@dataclass
class RotationReport:
    host: str
    old_public_key: str
    new_public_key: str
    peers: list[str]
    phases: list[tuple[str, float]] = field(default_factory=list)


def _entry_for(plan: MeshPlan, peer: str, host: str) -> Peer:
    return next(p for p in plan.hosts[peer].peers if p.name == host)


def write_config_script(interface: str) -> str:
    path = f"/etc/wireguard/{interface}.conf"
    return (f"umask 077 && mkdir -p /etc/wireguard && cat > {path}.spark-new && "
            f"mv {path}.spark-new {path}")


@dataclass
class _Peers:
    """The `wg set` steps of a rotation on the host's peers and on the host itself."""

    plan: MeshPlan
    keys: MeshKeys
    hosts: HostAccess
    host: str

    @property
    def interface(self) -> str:
        return self.plan.spec.interface

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.plan.hosts[self.host].peers]

    def add_entry(self, peer: str, public_key: str, with_routes: bool) -> None:
        entry = _entry_for(self.plan, peer, self.host)
        words = [f"wg set {self.interface} peer {public_key}"]
        stdin = None
        if entry.preshared_key:
            words.append("preshared-key /dev/stdin")
            stdin = self.keys.preshared_key(peer, self.host) + "\n"
        if entry.endpoint:
            words.append(f"endpoint {entry.endpoint}")
        if entry.keepalive:
            words.append(f"persistent-keepalive {entry.keepalive}")
        if with_routes:
            words.append(f"allowed-ips {','.join(entry.allowed_ips)}")
        run_on(self.hosts, peer,
               " ".join(words) + f" && wg show {self.interface} peers | grep -qxF {shlex.quote(public_key)}", stdin)

    def remove_entry(self, peer: str, public_key: str) -> None:
        run_on(self.hosts, peer, f"wg set {self.interface} peer {public_key} remove")

    def switch(self, private_key: str) -> None:
        run_on(self.hosts, self.host, f"wg set {self.interface} private-key /dev/stdin", private_key + "\n")

    def move(self, peer: str, to_key: str, from_key: str) -> None:
        routes = ",".join(_entry_for(self.plan, peer, self.host).allowed_ips)
        run_on(self.hosts, peer, f"wg set {self.interface} peer {to_key} allowed-ips {routes} peer {from_key} remove")

    def publish(self, public_key: str) -> None:
        """The new key as an extra entry on every peer; on any failure, removed again everywhere."""
        try:
            on_each(self.names, lambda p: self.add_entry(p, public_key, with_routes=False))
        except UserError:
            for peer in self.names:
                with contextlib.suppress(UserError):
                    self.remove_entry(peer, public_key)
            raise

    def roll_back(self, old_private: str, old_public: str, new_public: str) -> None:
        self.switch(old_private)
        on_each(self.names, lambda p: self.add_entry(p, old_public, with_routes=True))
        on_each(self.names, lambda p: self.remove_entry(p, new_public))


def rotate_host(fleet: Fleet, planned: Planned, host: str, hosts: HostAccess, state_dir: Path, store: SecretStore,
                log: Callable[[str], None] = lambda _: None) -> RotationReport:
    plan, keys = planned.plan, planned.keys
    if host not in plan.hosts:
        raise UserError(f"{host} is not a member of mesh {plan.mesh}", f"members: {', '.join(plan.hosts)}")
    on = _Peers(plan, keys, hosts, host)
    old_private = keys.private_key(host)
    old_public = plan.hosts[host].public_key
    report = RotationReport(host, old_public, "", on.names)
    clock = time.monotonic()

    def phase(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        report.phases.append((name, now - clock))
        clock = now
        log(f"{name}: done in {report.phases[-1][1]:.2f} s")

    new_private = keys.stage_next(host)
    new_public = report.new_public_key = public_key_of(new_private)
    phase("stage")
    try:
        on.publish(new_public)
    except UserError as exc:
        keys.discard_next(host)
        raise RotationError(f"publishing {host}'s new key failed, nothing was switched: {exc.message}",
                            "fix the peer named above and run the rotation again") from None
    phase("publish")
    on.switch(new_private)
    on_each(on.names, lambda p: on.move(p, new_public, old_public))
    phase("switch+move")
    try:
        _verify(plan, host, new_public, hosts)
    except UserError as exc:
        log(f"verify failed, rolling back: {exc.message}")
        on.roll_back(old_private, old_public, new_public)
        keys.discard_next(host)
        raise RotationError(f"{host} did not reach its peers with the new key; the old key is back: {exc.message}",
                            f"check the mesh with `spark mesh check --env {fleet.name}`") from None
    phase("verify")
    keys.commit_next(host)
    replanned = plan_and_save(fleet, plan.mesh, state_dir, store)
    on_each([host, *on.names], lambda h: run_on(hosts, h, write_config_script(on.interface),
                                                render_host(replanned.plan, replanned.keys, h)))
    phase("commit")
    return report


def _verify(plan: MeshPlan, host: str, new_public: str, hosts: HostAccess) -> None:
    """Every peer answers the host over the overlay and has handshaked with the host's new key."""
    interface = plan.spec.interface
    peers = [p.name for p in plan.hosts[host].peers]
    deadline = 3 * HANDSHAKE_INTERVAL_SECONDS
    addresses = " ".join(str(plan.hosts[p].address) for p in peers)
    run_on(hosts, host, f"rc=0; pids=; for a in {addresses}; do ping -n -q -c 1 -w {deadline} $a >/dev/null & "
                     'pids="$pids $!"; done; for p in $pids; do wait $p || rc=1; done; exit $rc',
               timeout=deadline + 30)

    def handshaked(peer: str) -> None:
        out = run_on(hosts, peer, f"wg show {interface} latest-handshakes")
        for line in out.splitlines():
            key, _, stamp = line.partition("\t")
            if key == new_public and stamp.strip() not in ("", "0"):
                return
        raise UserError(f"{peer} has no handshake with {host}'s new key")

    on_each(peers, handshaked)
