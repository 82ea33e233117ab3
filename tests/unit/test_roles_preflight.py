"""spark preflight's judgement: overlapping networks, SSH failures, Python, disk and clock, each with a fix."""

from __future__ import annotations

from ipaddress import IPv4Network

import pytest

from primespark.errors import UserError
from primespark.fleet import load_fleet
from primespark.preflight import Limits, Status, check_networks, evaluate, fleet_inventory

FLEET = load_fleet("lab")
WINDOW = (1000.0, 1000.5)


def probe(python: str = "/usr/bin/python3", pyver: str = "3.11", root_free_kb: int = 50_000_000,
          clock: float = 1000.2) -> dict:
    lines = [f"time={clock}", f"python={python}", f"pyver={pyver}", f"df=/ 100000000 {root_free_kb}",
             "df=/srv/hot 100000000 50000000"]
    return {"stdout": "\r\n".join(lines) + "\r\n", "rc": 0}


def by_check(findings) -> dict:
    """One finding per check: the worst."""
    out: dict = {}
    for f in findings:
        if f.check not in out or out[f.check].status is Status.ok:
            out[f.check] = f
    return out


def test_a_healthy_host_passes_every_check() -> None:
    findings = evaluate(FLEET, "pi-1", probe(), WINDOW, Limits())
    assert {f.status for f in findings} == {Status.ok}, findings
    assert {f.check for f in findings} == {"ssh", "python", "disk", "clock"}


def test_missing_python_low_disk_and_clock_skew_each_fail_with_a_fix() -> None:
    checks = by_check(evaluate(FLEET, "pi-1", probe(python="", pyver="", root_free_kb=100_000, clock=1090.0),
                               WINDOW, Limits(min_free_gb=1, max_skew_seconds=5)))
    assert checks["python"].status is Status.fail and "apt-get install python3" in checks["python"].fix
    assert checks["disk"].status is Status.fail and "0.10 GB free" in checks["disk"].message
    assert checks["clock"].status is Status.fail and "at least 89.5 s" in checks["clock"].message


def test_old_python_fails() -> None:
    checks = by_check(evaluate(FLEET, "pi-1", probe(pyver="3.6"), WINDOW, Limits()))
    assert checks["python"].status is Status.fail and "3.6" in checks["python"].message


def test_unreachable_host_says_what_ssh_said() -> None:
    findings = evaluate(FLEET, "pi-1", {"unreachable": True, "msg": "Permission denied (publickey)."},
                        WINDOW, Limits())
    assert [(f.check, f.status) for f in findings] == [("ssh", Status.fail)]
    assert "Permission denied" in findings[0].message and "known_hosts" in findings[0].fix


def test_a_route_that_partly_overlaps_a_fleet_network_fails() -> None:
    same = [(IPv4Network("172.30.1.0/24"), "br-edge")]  # how the controller reaches the site: fine
    assert {f.status for f in check_networks(FLEET, same)} == {Status.ok}
    wider = [(IPv4Network("10.0.0.0/8"), "eth1")]
    findings = check_networks(FLEET, wider)
    assert [f.status for f in findings] == [Status.fail]
    assert "meshes.fleet.overlay 10.99.0.0/24 overlaps" in findings[0].message and "eth1" in findings[0].message


def test_an_environment_without_an_inventory_is_named_with_the_known_ones() -> None:
    with pytest.raises(UserError) as caught:
        fleet_inventory("no-such-env")
    assert "no Ansible inventory for environment 'no-such-env'" in caught.value.message
    assert "lab" in caught.value.fix and "homelab" in caught.value.fix
