"""The lab plan derived from the fleet: names, networks, addresses, routes — no Docker needed."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import pytest

from primespark.errors import UserError
from primespark.fleet import load_fleet
from primespark.fleet.model import HostKind
from primespark.lab.topology import plan_lab

REPO = Path(__file__).resolve().parents[2]
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample operator"


@pytest.fixture(scope="module")
def fleet():
    return load_fleet(str(REPO / "inventory" / "lab.yaml"))


@pytest.fixture(scope="module")
def plan(fleet):
    return plan_lab(fleet, KEY)


def test_one_container_per_managed_host_and_a_router_per_nat_site(fleet, plan):
    hosts = {s.host for s in plan.containers if s.role == "host"}
    assert hosts == {n for n, h in fleet.hosts.items() if h.kind is not HostKind.kvm_host}
    routers = [s for s in plan.containers if s.role == "router"]
    assert [r.name for r in routers] == [f"spark-{fleet.name}-router-{n}" for n, s in fleet.sites.items()
                                         if s.behind_nat]
    assert all(s.name == f"spark-{fleet.name}-{s.host}" for s in plan.containers if s.host)


def test_networks_are_the_site_lans_and_the_wan(fleet, plan):
    nets = {n.name: n.subnet for n in plan.networks}
    assert nets == {f"spark-{fleet.name}-wan": fleet.lab.wan,
                    **{f"spark-{fleet.name}-{n}": s.lan for n, s in fleet.sites.items()}}


def test_bridge_addresses_collide_with_nothing_in_the_fleet(fleet, plan):
    used = {a for s in plan.containers for a in s.addresses.values()}
    used |= {s.gateway for s in fleet.sites.values()}
    for net in plan.networks:
        assert net.gateway in net.subnet
        assert net.gateway not in used


def test_edge_hosts_sit_only_on_their_lan_and_route_through_the_router(fleet, plan):
    for name, host in fleet.hosts.items():
        if host.kind is HostKind.kvm_host or not fleet.behind_nat(name):
            continue
        spec = plan.container(name)
        assert spec.addresses == {f"spark-{fleet.name}-{host.site}": host.address}
        assert spec.default_gateway == fleet.sites[host.site].gateway


def test_router_has_the_site_gateway_and_public_address_and_masquerades_the_lan(fleet, plan):
    for site_name, site in fleet.sites.items():
        if not site.behind_nat:
            continue
        router = next(s for s in plan.containers if s.name.endswith(f"router-{site_name}"))
        assert set(router.addresses.values()) == {site.gateway, site.public_address}
        assert router.environment["SPARK_NAT_SOURCE"] == str(site.lan)
        assert router.sysctls == {"net.ipv4.ip_forward": "1"}


def test_cloud_hosts_have_their_lan_and_public_address(fleet, plan):
    wan = f"spark-{fleet.name}-wan"
    for name, host in fleet.hosts.items():
        if host.kind is not HostKind.vm:
            continue
        spec = plan.container(name)
        assert spec.addresses[wan] == host.public_address
        assert spec.addresses[f"spark-{fleet.name}-{host.site}"] == host.address
        assert spec.default_gateway in fleet.lab.wan


def test_hosts_get_the_operator_key_and_their_fleet_user(fleet, plan):
    for spec in plan.containers:
        if spec.host:
            assert spec.environment["SPARK_AUTHORIZED_KEY"] == KEY
            assert spec.environment["SPARK_USER"] == fleet.hosts[spec.host].ssh.user


def test_spec_hash_changes_with_addresses_and_image_only(fleet):
    a = plan_lab(fleet, KEY).container("pi-1")
    b = plan_lab(fleet, KEY).container("pi-1")
    assert a.spec_hash("img:1") == b.spec_hash("img:1")
    assert a.spec_hash("img:1") != a.spec_hash("img:2")
    moved = fleet.model_copy(update={"hosts": {**fleet.hosts, "pi-1": fleet.hosts["pi-1"].model_copy(
        update={"address": IPv4Address("172.30.1.99")})}})
    assert plan_lab(moved, KEY).container("pi-1").spec_hash("img:1") != a.spec_hash("img:1")


def test_a_fleet_without_a_lab_section_is_a_clear_error():
    homelab = load_fleet(str(REPO / "inventory" / "homelab.yaml"))
    with pytest.raises(UserError, match="no `lab:` section"):
        plan_lab(homelab, KEY)


def test_address_outside_its_network_is_a_clear_error(fleet):
    stray = fleet.model_copy(update={"hosts": {**fleet.hosts, "core-1": fleet.hosts["core-1"].model_copy(
        update={"public_address": IPv4Address("10.9.9.9")})}})
    with pytest.raises(UserError, match=r"10\.9\.9\.9 is outside wan"):
        plan_lab(stray, KEY)
