"""Real WireGuard tunnels (wireguard-go) between network namespaces, configured from the planner's output.

Each host of the fleet becomes a namespace holding its LAN and public addresses on one flat underlay, with its
own /etc/wireguard. Nothing here leaves the namespaces the test creates; every process is killed at the end.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from primespark.fleet.loader import validate_data
from primespark.fleet.model import Fleet
from primespark.mesh.health import check_mesh
from primespark.mesh.netns import ContinuousPing, NetnsFabric, netns_available
from primespark.mesh.render import render_host
from primespark.mesh.rotate import HANDSHAKE_INTERVAL_SECONDS, RotationError, rotate_host, write_config_script
from primespark.mesh.service import Planned, plan_and_save
from primespark.secrets import LocalSecretStore
from primespark.settings import get_settings

REASON = netns_available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"real tunnels in namespaces: {REASON}")
UP = "WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go wg-quick up {i} >/dev/null 2>&1 || wg-quick up {i}"
SYNC = "wg-quick strip {i} > /run/wireguard/{i}.stripped && wg syncconf {i} /run/wireguard/{i}.stripped"


def lab_data() -> dict[str, Any]:
    return yaml.safe_load((get_settings().inventory_dir / "lab.yaml").read_text())


PARTIAL_MESH = frozenset({"prometheus-unreachable", "server-unreachable", "sync-no-route", "recall-no-route",
                          "tier-no-route"})


def fleet_with(data: dict[str, Any], members: list[str] | None = None, **mesh: Any) -> Fleet:
    data = copy.deepcopy(data)
    if members is not None:
        data["meshes"]["fleet"]["members"] = members
    data["meshes"]["fleet"].update(mesh)
    # These meshes leave lab hosts out on purpose; that Prometheus, the Prefect server or a sync destination could
    # then not be reached is not the subject.
    return validate_data(data, "test", skip=PARTIAL_MESH)


@pytest.fixture
def fabric():
    with NetnsFabric() as fab:
        yield fab


@pytest.fixture
def store(tmp_path: Path) -> LocalSecretStore:
    return LocalSecretStore(tmp_path / "secrets")


def add_hosts(fabric: NetnsFabric, fleet: Fleet, hosts: list[str]) -> None:
    for name in hosts:
        host = fleet.hosts[name]
        fabric.add_host(name, [a for a in (host.address, host.public_address) if a is not None])
    fabric.connect_all()


def install_config(fabric: NetnsFabric, planned: Planned, host: str) -> None:
    fabric.run(host, write_config_script(planned.plan.spec.interface), render_host(planned.plan, planned.keys, host))


def interface_identity(fabric: NetnsFabric, host: str, interface: str = "wg0") -> tuple[str, str]:
    """The interface index and the pid of the wireguard-go serving it: both change when it restarts. The process
    is looked for in the host's own network namespace only (every host here runs a wireguard-go for wg0, and so
    may any other test or user of the machine)."""
    index = fabric.run(host, f"cat /sys/class/net/{interface}/ifindex").strip()
    serving = []
    for pid in fabric.pids_in(host):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        except OSError:
            continue  # ended meanwhile
        if argv and Path(argv[0].decode()).name == "wireguard-go" and argv[-1].decode() == interface:
            serving.append(pid)
    assert len(serving) == 1, f"{host}: wireguard-go processes serving {interface} in its namespace: {serving}"
    return index, str(serving[0])


def test_full_mesh_every_pair_reaches_every_other(fabric, store, tmp_path):
    fleet = fleet_with(lab_data())
    planned = plan_and_save(fleet, "fleet", tmp_path, store)
    add_hosts(fabric, fleet, list(planned.plan.hosts))
    for host in planned.plan.hosts:
        install_config(fabric, planned, host)
        fabric.run(host, UP.format(i="wg0"))
    health = check_mesh(planned.plan, fabric, deadline_seconds=12)
    assert len(health.pairs) == 8 * 7
    assert health.healthy, [(p.source, p.target, p.status) for p in health.down]
    # Cloud hosts have no endpoint for NATed edge hosts; they were reached because the edge called in.
    core = fabric.run("core-1", "wg show wg0 endpoints")
    assert str(fleet.hosts["pi-1"].address) in core


def test_hub_and_spoke_spokes_reach_each_other_through_the_hub(fabric, store, tmp_path):
    members = ["pi-1", "pi-2", "core-1", "ops-1"]
    fleet = fleet_with(lab_data(), members, topology="hub_and_spoke", hub="core-1")
    planned = plan_and_save(fleet, "fleet", tmp_path, store)
    assert [p.name for p in planned.plan.hosts["pi-1"].peers] == ["core-1"]
    add_hosts(fabric, fleet, members)
    for host in members:
        install_config(fabric, planned, host)
        fabric.run(host, UP.format(i="wg0"))
    health = check_mesh(planned.plan, fabric, deadline_seconds=12)
    assert health.healthy, [(p.source, p.target, p.status) for p in health.down]
    via_hub = [p for p in health.pairs if not p.direct]
    assert {(p.source, p.target) for p in via_hub} >= {("pi-1", "ops-1"), ("ops-1", "pi-2")}
    # No direct tunnel between spokes: pi-1 knows only the hub.
    assert fabric.run("pi-1", "wg show wg0 peers").split() == [planned.plan.hosts["core-1"].public_key]


def test_adding_and_removing_a_host_restarts_no_interface(fabric, store, tmp_path):
    data = lab_data()
    before = fleet_with(data, ["pi-1", "core-1", "stream-1"])
    first = plan_and_save(before, "fleet", tmp_path, store)
    add_hosts(fabric, before, ["pi-1", "core-1", "stream-1", "pi-2"])
    for host in first.plan.hosts:
        install_config(fabric, first, host)
        fabric.run(host, UP.format(i="wg0"))
    fabric.run("pi-1", "ping -n -q -c 1 -w 12 10.99.0.2 >/dev/null")
    identities = {h: interface_identity(fabric, h) for h in first.plan.hosts}
    ping = ContinuousPing(fabric.argv("pi-1", ContinuousPing.command(str(first.plan.hosts["core-1"].address))))
    try:
        time.sleep(0.5)
        after = fleet_with(data, ["pi-1", "core-1", "stream-1", "pi-2"])
        second = plan_and_save(after, "fleet", tmp_path, store)
        assert second.diff.added == {"pi-2": str(second.plan.hosts["pi-2"].address)}
        for host in first.plan.hosts:
            install_config(fabric, second, host)
            fabric.run(host, SYNC.format(i="wg0"))
        install_config(fabric, second, "pi-2")
        fabric.run("pi-2", UP.format(i="wg0"))
        fabric.run("pi-2", "ping -n -q -c 1 -w 12 10.99.0.1 >/dev/null && ping -n -q -c 1 -w 12 10.99.0.3 >/dev/null")
        # Removing stream-1 again: syncconf drops the peer on the others, still without a restart.
        third = plan_and_save(fleet_with(data, ["pi-1", "core-1", "pi-2"]), "fleet", tmp_path, store)
        assert third.diff.removed == {"stream-1": str(first.plan.hosts["stream-1"].address)}
        for host in third.plan.hosts:
            install_config(fabric, third, host)
            fabric.run(host, SYNC.format(i="wg0"))
        time.sleep(1)  # ten more echoes after the change, to see the tunnel still answering
    finally:
        pinged = ping.stop()
    assert pinged.sent > 10
    assert pinged.lost == 0, f"ping lost {pinged.lost} of {pinged.sent} during the change"
    # a few echoes may be in flight when ping is stopped; more unanswered at the end is a tunnel that went down
    assert pinged.unanswered_at_end <= 5, f"the last {pinged.unanswered_at_end} of {pinged.sent} pings went unanswered"
    for host in ("pi-1", "core-1"):
        assert interface_identity(fabric, host) == identities[host], f"{host}'s interface was restarted"
        assert second.plan.hosts[host].address == first.plan.hosts[host].address
    assert first.plan.hosts["stream-1"].public_key not in fabric.run("pi-1", "wg show wg0 peers")
    assert third.plan.hosts["pi-2"].public_key in fabric.run("core-1", "wg show wg0 peers")


def test_rotation_keeps_a_continuous_ping_within_one_handshake_interval(fabric, store, tmp_path):
    members = ["pi-1", "pi-2", "core-1", "stream-1"]
    fleet = fleet_with(lab_data(), members)
    planned = plan_and_save(fleet, "fleet", tmp_path, store)
    add_hosts(fabric, fleet, members)
    for host in members:
        install_config(fabric, planned, host)
        fabric.run(host, UP.format(i="wg0"))
    assert check_mesh(planned.plan, fabric, deadline_seconds=12).healthy
    old_public = planned.plan.hosts["core-1"].public_key
    ping = ContinuousPing(fabric.argv("pi-1", ContinuousPing.command(str(planned.plan.hosts["core-1"].address))))
    try:
        time.sleep(1)
        report = rotate_host(fleet, planned, "core-1", fabric, tmp_path, store)
        time.sleep(1)
    finally:
        sent, received, gap, _, _ = ping.stop()
    print(f"rotation: longest silence {gap:.2f} s, {sent - received} of {sent} pings lost")
    assert report.new_public_key != old_public
    assert gap <= HANDSHAKE_INTERVAL_SECONDS, f"longest silence {gap:.2f} s; {sent - received} of {sent} lost"
    assert fabric.run("core-1", "wg show wg0 public-key").strip() == report.new_public_key
    for peer in ("pi-1", "pi-2", "stream-1"):
        listed = fabric.run(peer, "wg show wg0 peers")
        assert report.new_public_key in listed and old_public not in listed
        assert report.new_public_key in fabric.run(peer, "cat /etc/wireguard/wg0.conf")
    replanned = plan_and_save(fleet, "fleet", tmp_path, store)
    assert replanned.plan.hosts["core-1"].public_key == report.new_public_key
    assert replanned.diff.empty
    assert check_mesh(replanned.plan, fabric, deadline_seconds=12).healthy


def test_rotation_stops_before_switching_when_a_peer_cannot_take_the_new_key(fabric, store, tmp_path):
    members = ["pi-1", "core-1", "stream-1"]
    fleet = fleet_with(lab_data(), members)
    planned = plan_and_save(fleet, "fleet", tmp_path, store)
    add_hosts(fabric, fleet, members)
    for host in members:
        install_config(fabric, planned, host)
        fabric.run(host, UP.format(i="wg0"))
    fabric.run("stream-1", "ip link del wg0")  # this peer cannot be told about the new key
    old_public = planned.plan.hosts["core-1"].public_key
    with pytest.raises(RotationError, match="nothing was switched"):
        rotate_host(fleet, planned, "core-1", fabric, tmp_path, store)
    assert fabric.run("core-1", "wg show wg0 public-key").strip() == old_public
    assert fabric.run("pi-1", "wg show wg0 peers").split().count(old_public) == 1
    assert len(fabric.run("pi-1", "wg show wg0 peers").split()) == 2, "the new key's entry was not removed"
    replanned = plan_and_save(fleet, "fleet", tmp_path, store)
    assert replanned.diff.empty and replanned.keys.bundle("core-1").next_private_key is None


def test_a_ping_counts_a_gap_as_lost_and_the_echoes_in_flight_at_the_stop_apart():
    printed = "\n".join([
        "[10.0] 64 bytes from 10.99.0.2: icmp_seq=1 ttl=64 time=0.3 ms",
        "[10.1] 64 bytes from 10.99.0.2: icmp_seq=2 ttl=64 time=0.3 ms",
        "[10.5] 64 bytes from 10.99.0.2: icmp_seq=5 ttl=64 time=0.3 ms",
        "--- 10.99.0.2 ping statistics ---",
        "7 packets transmitted, 3 received, 57% packet loss, time 600ms",
    ])
    pinged = ContinuousPing(["printf", "%s\\n", printed], deadline=0).stop()
    assert (pinged.sent, pinged.received, pinged.lost, pinged.unanswered_at_end) == (7, 3, 2, 2)
    assert pinged.gap == pytest.approx(0.4)
