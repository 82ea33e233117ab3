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
from primespark.mesh.keys import public_key_of
from primespark.mesh.plan import MeshPlan, Peer
from primespark.mesh.remote import Runner, on_each
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


def rotate_host(fleet: Fleet, planned: Planned, host: str, runner: Runner, state_dir: Path, store: SecretStore,
                log: Callable[[str], None] = lambda _: None) -> RotationReport:
    plan, keys = planned.plan, planned.keys
    if host not in plan.hosts:
        raise UserError(f"{host} is not a member of mesh {plan.mesh}", f"members: {', '.join(plan.hosts)}")
    interface = plan.spec.interface
    config = plan.hosts[host]
    peers = [p.name for p in config.peers]
    old_private = keys.private_key(host)
    old_public = config.public_key
    report = RotationReport(host, old_public, "", peers)
    clock = time.monotonic()

    def phase(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        report.phases.append((name, now - clock))
        clock = now
        log(f"{name}: done in {report.phases[-1][1]:.2f} s")

    new_private = keys.stage_next(host)
    new_public = public_key_of(new_private)
    report.new_public_key = new_public
    phase("stage")

    def add_entry(peer: str, public_key: str, with_routes: bool) -> None:
        entry = _entry_for(plan, peer, host)
        words = [f"wg set {interface} peer {public_key}"]
        stdin = None
        if entry.preshared_key:
            words.append("preshared-key /dev/stdin")
            stdin = keys.preshared_key(peer, host) + "\n"
        if entry.endpoint:
            words.append(f"endpoint {entry.endpoint}")
        if entry.keepalive:
            words.append(f"persistent-keepalive {entry.keepalive}")
        if with_routes:
            words.append(f"allowed-ips {','.join(entry.allowed_ips)}")
        runner.run(peer, " ".join(words) + f" && wg show {interface} peers | grep -qxF {shlex.quote(public_key)}",
                   stdin)

    def remove_entry(peer: str, public_key: str) -> None:
        runner.run(peer, f"wg set {interface} peer {public_key} remove")

    try:
        on_each(peers, lambda p: add_entry(p, new_public, with_routes=False))
    except UserError as exc:
        for peer in peers:
            with contextlib.suppress(UserError):
                remove_entry(peer, new_public)
        keys.discard_next(host)
        raise RotationError(f"publishing {host}'s new key failed, nothing was switched: {exc.message}",
                            "fix the peer named above and run the rotation again") from None
    phase("publish")

    def switch(private_key: str) -> None:
        runner.run(host, f"wg set {interface} private-key /dev/stdin", private_key + "\n")

    def move(peer: str, to_key: str, from_key: str) -> None:
        routes = ",".join(_entry_for(plan, peer, host).allowed_ips)
        runner.run(peer, f"wg set {interface} peer {to_key} allowed-ips {routes} peer {from_key} remove")

    switch(new_private)
    on_each(peers, lambda p: move(p, new_public, old_public))
    phase("switch+move")

    try:
        _verify(plan, host, new_public, runner)
    except UserError as exc:
        log(f"verify failed, rolling back: {exc.message}")
        switch(old_private)
        on_each(peers, lambda p: add_entry(p, old_public, with_routes=True))
        on_each(peers, lambda p: remove_entry(p, new_public))
        keys.discard_next(host)
        raise RotationError(f"{host} did not reach its peers with the new key; the old key is back: {exc.message}",
                            f"check the mesh with `spark mesh check {fleet.name}`") from None
    phase("verify")

    keys.commit_next(host)
    replanned = plan_and_save(fleet, plan.mesh, state_dir, store)
    on_each([host, *peers], lambda h: runner.run(h, write_config_script(interface),
                                                 render_host(replanned.plan, replanned.keys, h)))
    phase("commit")
    return report


def _verify(plan: MeshPlan, host: str, new_public: str, runner: Runner) -> None:
    """Every peer answers the host over the overlay and has handshaked with the host's new key."""
    interface = plan.spec.interface
    peers = [p.name for p in plan.hosts[host].peers]
    deadline = 3 * HANDSHAKE_INTERVAL_SECONDS
    addresses = " ".join(str(plan.hosts[p].address) for p in peers)
    runner.run(host, f"rc=0; pids=; for a in {addresses}; do ping -n -q -c 1 -w {deadline} $a >/dev/null & "
                     'pids="$pids $!"; done; for p in $pids; do wait $p || rc=1; done; exit $rc',
               timeout=deadline + 30)

    def handshaked(peer: str) -> None:
        out = runner.run(peer, f"wg show {interface} latest-handshakes")
        for line in out.splitlines():
            key, _, stamp = line.partition("\t")
            if key == new_public and stamp.strip() not in ("", "0"):
                return
        raise UserError(f"{peer} has no handshake with {host}'s new key")

    on_each(peers, handshaked)
