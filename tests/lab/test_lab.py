"""End to end: the lab fleet as containers — SSH, Ansible, the NAT topology, recovery, and a clean down."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from primespark.fleet.model import HostKind
from primespark.inventory import managed_hosts

pytestmark = pytest.mark.lab

LISTEN_PORT = 47123  # a throw-away listener for the NAT check, on a lab host


def edge_hosts(lab) -> list[str]:
    return [h for h in managed_hosts(lab.fleet) if lab.fleet.behind_nat(h)]


def cloud_hosts(lab) -> list[str]:
    return [h for h in managed_hosts(lab.fleet)
            if not lab.fleet.behind_nat(h) and lab.fleet.hosts[h].public_address is not None]


def test_every_managed_host_is_a_container_and_the_kvm_host_is_not(lab):
    names = subprocess.run(["docker", "ps", "--filter", f"label=primespark.lab={lab.fleet.name}",
                            "--format", "{{.Names}}"], capture_output=True, text=True, check=True).stdout.split()
    expected = {f"spark-{lab.fleet.name}-{h}" for h in managed_hosts(lab.fleet)}
    assert expected <= set(names)
    for name, host in lab.fleet.hosts.items():
        if host.kind is HostKind.kvm_host:
            assert f"spark-{lab.fleet.name}-{name}" not in names


def test_every_host_answers_over_ssh_as_its_fleet_user_with_sudo(lab):
    for name in managed_hosts(lab.fleet):
        done = lab.ssh(name, "hostname; id -un; sudo -n id -u; test -c /dev/net/tun && echo tun")
        assert done.returncode == 0, f"{name}: {done.stderr}"
        assert done.stdout.split() == [name, lab.fleet.hosts[name].ssh.user, "0", "tun"]


def test_host_keys_are_made_per_container_not_baked_into_the_image(lab):
    fingerprints = {lab.exec(h, "cat /etc/ssh/ssh_host_ed25519_key.pub").stdout.split()[1]
                    for h in managed_hosts(lab.fleet)}
    assert len(fingerprints) == len(managed_hosts(lab.fleet))
    image_keys = subprocess.run(["docker", "run", "--rm", "--entrypoint", "sh", lab.first_up.image, "-c",
                                 "ls /etc/ssh/ssh_host_* 2>/dev/null | wc -l"],
                                capture_output=True, text=True, check=True).stdout.strip()
    assert image_keys == "0"
    key = lab.state_dir / "ssh" / "id_ed25519"
    assert key.stat().st_mode & 0o777 == 0o600
    assert lab.state_dir.stat().st_mode & 0o777 == 0o700


def test_the_prefect_server_runs_on_its_fleet_host_with_its_database_there_not_on_this_machine(lab, prefect):
    """…and serves its API and UI only over TLS, with its host's certificate from the fleet CA: the controller's
    copy of the CA (the one the lab's OpenBao holds) verifies it; a plaintext request gets nothing."""
    import http.client
    import json
    import urllib.request

    from lab_cli import served_certificate

    from primespark.pki import client_context

    server = lab.fleet.orchestration.server
    address = str(lab.fleet.hosts[server.host].address)
    assert lab.prefect_api_url == f"https://{address}:{server.port}/api"
    assert prefect.ca_file is not None
    context = client_context(prefect.ca_file.read_text())
    with urllib.request.urlopen(f"{lab.prefect_api_url}/health", timeout=10, context=context) as reply:
        assert json.load(reply) is True
    found = served_certificate(lab.exec, server.host, address, server.port)  # verified there by the host's CA copy
    assert [["commonName", server.host]] in found["subject"] and ["IP Address", address] in found["subjectAltName"]
    with pytest.raises((OSError, http.client.HTTPException)):
        urllib.request.urlopen(f"http://{address}:{server.port}/api/health", timeout=10).read()
    # inventory/lab.yaml: PostgreSQL on the server's host (test_workers checks its rows), no SQLite file
    assert server.postgresql
    assert lab.exec(server.host, "ls /var/lib/primespark/prefect-server/*.db").returncode != 0
    assert lab.exec(server.host, "pg_lsclusters --no-header").stdout.split()[3] == "online"
    assert lab.lab.prefect.pid() is None, "a Prefect server on the controller's loopback"


def test_ansible_pings_every_host_through_the_fleet_inventory(lab):
    done = lab.ansible("all", "-m", "ping")
    assert done.returncode == 0, done.stdout + done.stderr
    for name in managed_hosts(lab.fleet):
        assert f"{name} | SUCCESS" in done.stdout


def test_edge_host_cannot_reach_cloud_lan_addresses(lab):
    edge = edge_hosts(lab)[0]
    targets = [(str(lab.fleet.hosts[h].address), lab.fleet.hosts[h].ssh.port) for h in cloud_hosts(lab)]
    assert targets
    opened = lab.probe(edge, targets)
    assert not any(opened.values()), f"{edge} reached cloud LAN addresses directly: {opened}"


def test_edge_host_reaches_cloud_wan_addresses_through_the_nat_router(lab):
    edge = edge_hosts(lab)[0]
    targets = [(str(lab.fleet.hosts[h].public_address), lab.fleet.hosts[h].ssh.port) for h in cloud_hosts(lab)]
    opened = lab.probe(edge, targets)
    assert all(opened.values()), f"{edge} could not reach cloud WAN addresses: {opened}"

    # The cloud host sees the router's public address, not the edge host's: the NAT really translates.
    cloud = cloud_hosts(lab)[0]
    listener = (
        "import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
        f"s.bind(('0.0.0.0', {LISTEN_PORT})); s.listen(); s.settimeout(20); c, a = s.accept(); print(a[0])"
    )
    # once site.yml has run (an earlier test module), the hardening role's firewall drops this port: open it for
    # the check, and close it after
    if lab.exec(cloud, "nft list table inet spark_filter").returncode == 0:
        done = lab.exec(cloud, ["nft", "insert", "rule", "inet", "spark_filter", "input", "tcp", "dport",
                                str(LISTEN_PORT), "accept", "comment", '"nat-check"'])
        assert done.returncode == 0, done.stderr
    server = subprocess.Popen(["docker", "exec", lab.container(cloud), "python3", "-c", listener],
                              stdout=subprocess.PIPE, text=True)
    try:
        target = str(lab.fleet.hosts[cloud].public_address)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not lab.probe(edge, [(target, LISTEN_PORT)])[(target, LISTEN_PORT)]:
            time.sleep(0.3)
        seen, _ = server.communicate(timeout=20)
    finally:
        server.kill()
        handles = lab.exec(cloud, "nft -a list chain inet spark_filter input 2>/dev/null | grep nat-check")
        for line in handles.stdout.splitlines():
            lab.exec(cloud, f"nft delete rule inet spark_filter input handle {line.rsplit(' ', 1)[1]}")
    site = lab.fleet.sites[lab.fleet.hosts[edge].site]
    assert seen.strip() == str(site.public_address)
    assert seen.strip() != str(lab.fleet.hosts[edge].address)


def test_cloud_host_cannot_open_a_connection_to_an_edge_host(lab):
    cloud = cloud_hosts(lab)[0]
    edge_site = lab.fleet.sites[lab.fleet.hosts[edge_hosts(lab)[0]].site]
    targets = [(str(lab.fleet.hosts[h].address), lab.fleet.hosts[h].ssh.port) for h in edge_hosts(lab)]
    opened = lab.probe(cloud, targets)
    assert not any(opened.values()), f"{cloud} opened connections into the edge site: {opened}"

    # Even when routing the edge LAN at the router on purpose, the router lets nothing in from the WAN.
    route = f"{edge_site.lan} via {edge_site.public_address}"
    assert lab.exec(cloud, f"ip route add {route}").returncode == 0
    try:
        opened = lab.probe(cloud, targets)
    finally:
        lab.exec(cloud, f"ip route del {route}")
    assert not any(opened.values()), f"the NAT router let {cloud} in: {opened}"


def test_cli_up_again_changes_nothing_and_status_shows_every_host_reachable(lab, repo, prefect):
    spark = str(Path(sys.executable).parent / "spark")
    # The fixture holds the lab lock; the CLI, its child, must not wait for it.
    up = subprocess.run([spark, "lab", "up"], capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    assert "already up, nothing changed" in up.stdout
    status = subprocess.run([spark, "lab", "status"], capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    rows = {line.split()[1]: line for line in status.stdout.splitlines() if line.startswith("│")}
    for name in managed_hosts(lab.fleet):
        assert "running" in rows[name] and " ok " in rows[name], rows.get(name)
    assert f"{lab.prefect_api_url.removesuffix('/api')} (healthy)" in status.stdout
    assert f"OpenBao http://127.0.0.1:{lab.fleet.lab.openbao_port} (unsealed)" in status.stdout


@pytest.mark.rebuilds_lab
def test_up_recovers_a_container_removed_by_hand_and_changes_nothing_else(lab):
    victim = edge_hosts(lab)[-1]
    subprocess.run(["docker", "rm", "-f", lab.container(victim)], check=True, capture_output=True)
    result = lab.lab.up()
    assert result.containers[lab.container(victim)] == "created"
    assert {n: s for n, s in result.containers.items() if n != lab.container(victim)} == \
        {n: "kept" for n in result.containers if n != lab.container(victim)}
    done = lab.ssh(victim, "hostname")  # a new host key: known_hosts was brought up to date
    assert done.returncode == 0 and done.stdout.strip() == victim, done.stderr

    again = lab.lab.up()
    assert not again.changed, again.containers


INNER_CONFTEST = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("spark_lab_fixture", {conftest!r})
module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
lab = module.lab
"""

INNER_TEST = """
def test_fails_on_purpose(lab):
    assert lab.ssh({host!r}, "true").returncode == 0  # the lab was really up
    raise AssertionError("failing on purpose")
"""


@pytest.mark.rebuilds_lab
def test_down_leaves_docker_as_before_also_after_a_failing_test_and_up_brings_the_lab_back(lab, tmp_path):
    lab.lab.down()
    assert lab.docker_state() == lab.baseline
    assert not lab.lab.prefect.healthy()
    assert lab.lab.openbao.state() == "not running" and lab.lab.openbao.credentials_file.is_file()

    # A pytest run whose lab test fails still takes its lab down (the fixture cleans up on failure).
    host = managed_hosts(lab.fleet)[0]
    (tmp_path / "conftest.py").write_text(INNER_CONFTEST.format(conftest=str(Path(__file__).with_name("conftest.py"))))
    (tmp_path / "test_inner.py").write_text(INNER_TEST.format(host=host))
    inner = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
                            str(tmp_path), str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert "1 failed" in inner.stdout and "failing on purpose" in inner.stdout, inner.stdout[-3000:]
    assert lab.docker_state() == lab.baseline

    result = lab.lab.up()  # the lab is shared with the tests that run after this one
    assert result.changed and not result.image_built
    assert result.openbao.started and result.openbao.unsealed and not result.openbao.initialised  # data kept
    assert lab.ssh(edge_hosts(lab)[0], "true").returncode == 0
