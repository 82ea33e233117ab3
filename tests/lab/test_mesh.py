"""End to end: the wireguard role on the lab, the full overlay matrix across the NAT, `spark mesh check`, and a
key rotation under a continuous ping.

The lab's edge hosts sit behind a NAT router and reach the cloud only over the WAN; cloud hosts cannot open a
connection to the edge. So an edge↔cloud pair that answers proves the planned keepalive and endpoints work
through the NAT, over the WAN.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from primespark.fleet.model import HostKind
from primespark.inventory import managed_hosts
from primespark.mesh.netns import ContinuousPing
from primespark.mesh.plan import load_state
from primespark.mesh.rotate import HANDSHAKE_INTERVAL_SECONDS

pytestmark = [pytest.mark.lab, pytest.mark.bare_lab]  # the role's first run: no host has the mesh yet
PING_SECONDS = 40

REPO = Path(__file__).resolve().parents[2]
SPARK = str(Path(sys.executable).parent / "spark")
PLAYBOOK = """\
- name: WireGuard mesh only
  hosts: edge:cloud
  become: true
  roles:
    - wireguard
"""


@pytest.fixture(scope="module")
def mesh(lab, tmp_path_factory):
    playbook = tmp_path_factory.mktemp("mesh") / "mesh.yml"
    playbook.write_text(PLAYBOOK)
    members = [h for h in lab.fleet.hosts if lab.fleet.in_mesh("fleet", h) and h in managed_hosts(lab.fleet)]
    before = {h: lab.exec(h, "test -e /etc/wireguard/wg0.conf").returncode == 0 for h in members}
    first = lab.playbook(playbook)
    state = load_state(lab.state_dir, "fleet")
    assert state is not None
    # this run is the one that copied the configs, private keys and all: none was there before it
    assert before and not any(before.values()), before
    return playbook, state, first


def test_role_is_idempotent_and_writes_private_configs(lab, mesh):
    playbook, state, first = mesh
    # The run that copied the configs (with the private keys) kept the keys out of Ansible's output.
    private_keys = [lab.exec(h, "sed -n 's/^PrivateKey *= *//p' /etc/wireguard/wg0.conf").stdout.strip()
                    for h in state.hosts]
    assert all(private_keys) and not [k for k in private_keys if k in first.output]
    assert "PrivateKey" not in first.output
    second = lab.playbook(playbook)
    assert second.hosts == set(state.hosts)
    assert second.changed_tasks == [] and all(c["changed"] == 0 for c in second.stats.values())
    for host in state.hosts:
        mode = lab.exec(host, "stat -c %a /etc/wireguard/wg0.conf")
        assert mode.stdout.strip() == "600"
        assert lab.exec(host, "wg show wg0 public-key").stdout.strip() == state.hosts[host].public_key


def test_every_host_reaches_every_overlay_address_across_the_nat(lab, mesh):
    _, state, _ = mesh
    failures = []
    for host in state.hosts:
        others = [str(s.address) for h, s in state.hosts.items() if h != host]
        script = ("for a in " + " ".join(others) + "; do (ping -n -q -c 1 -w 15 $a >/dev/null && echo ok $a "
                  "|| echo down $a) & done; wait")
        out = lab.exec(host, script, timeout=120).stdout.split("\n")
        failures += [f"{host} -> {line.split()[1]}" for line in out if line.startswith("down")]
        assert sum(line.startswith("ok") for line in out) + sum(line.startswith("down") for line in out) == len(others)
    assert failures == []
    # The cloud learnt each edge host's endpoint from its keepalives: the edge router's WAN address.
    router = str(lab.fleet.sites["edge"].public_address)
    endpoints = lab.exec("core-1", "wg show wg0 endpoints").stdout
    edge_keys = [s.public_key for h, s in state.hosts.items() if lab.fleet.behind_nat(h)]
    for line in endpoints.splitlines():
        key, _, endpoint = line.partition("\t")
        if key in edge_keys:
            assert endpoint.startswith(router + ":"), f"edge peer seen at {endpoint}, not via the NAT router"


def test_spark_mesh_check_exits_zero_and_writes_metrics(lab, mesh, tmp_path):
    metrics = tmp_path / "mesh.prom"
    done = subprocess.run([SPARK, "mesh", "check", "--env", "lab", "--textfile", str(metrics)], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    families = {f.name: f for f in text_string_to_metric_families(metrics.read_text())}
    members = len(mesh[1].hosts)
    assert len(families["spark_mesh_pair_up"].samples) == members * (members - 1)
    assert all(s.value == 1 for s in families["spark_mesh_pair_up"].samples)
    assert families["spark_mesh_pairs_down"].samples[0].value == 0


def test_rotation_under_a_continuous_ping(lab, mesh):
    _, state, _ = mesh
    edge = next(h for h in state.hosts if lab.fleet.behind_nat(h))
    cloud = next(h for h in state.hosts if lab.fleet.hosts[h].kind is HostKind.vm)
    old_key = state.hosts[cloud].public_key
    argv = ["docker", "exec", lab.container(edge), "sh", "-c",
            ContinuousPing.command(str(state.hosts[cloud].address), deadline=PING_SECONDS)]
    ping = ContinuousPing(argv, deadline=PING_SECONDS)
    started = time.monotonic()
    try:
        time.sleep(1)
        rotated = subprocess.run([SPARK, "mesh", "rotate", cloud, "--env", "lab"], capture_output=True, text=True,
                                 timeout=300, cwd=REPO)
        rotation_ended = time.monotonic() - started
    finally:
        sent, received, gap, _, _ = ping.stop()
    assert rotation_ended < PING_SECONDS - 2, "the ping ended before the rotation did; raise PING_SECONDS"
    print(f"rotation: longest silence {gap:.2f} s, {sent - received} of {sent} pings lost")
    assert rotated.returncode == 0, rotated.stdout[-3000:] + rotated.stderr[-2000:]
    assert gap <= HANDSHAKE_INTERVAL_SECONDS, f"longest silence {gap:.2f} s ({sent - received} of {sent} lost)"
    new_key = load_state(lab.state_dir, "fleet").hosts[cloud].public_key
    assert new_key != old_key
    assert lab.exec(cloud, "wg show wg0 public-key").stdout.strip() == new_key
    check = subprocess.run([SPARK, "mesh", "check", "--env", "lab"], capture_output=True, text=True, timeout=300,
                           cwd=REPO)
    assert check.returncode == 0, check.stdout[-3000:]
