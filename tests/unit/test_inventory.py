"""The Ansible inventory derived from the fleet, through our builder and through Ansible's own plugin loader."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from primespark.fleet import load_fleet
from primespark.inventory import build_inventory

BIN = Path(sys.executable).parent


@pytest.fixture()
def isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from primespark.settings import get_settings

    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path / "state"))
    get_settings.cache_clear()
    yield tmp_path / "state"
    get_settings.cache_clear()


def test_groups_follow_sites_kinds_and_services(isolated_state: Path) -> None:
    inventory = build_inventory(load_fleet("lab"))
    assert inventory["pis"]["hosts"] == ["pi-1", "pi-2", "pi-3"]
    assert inventory["nas"]["hosts"] == ["nas-1"]
    assert inventory["vms"]["hosts"] == ["analytics-1", "core-1", "ops-1", "stream-1"]
    assert inventory["edge"]["hosts"] == ["nas-1", "pi-1", "pi-2", "pi-3"]
    assert inventory["kafka"]["hosts"] == ["stream-1"]
    assert "kvm-1" not in inventory["_meta"]["hostvars"], "the lab's KVM host is the machine itself"
    core = inventory["_meta"]["hostvars"]["core-1"]
    assert core["ansible_host"] == "172.30.2.11"
    assert {"name": "redis", "kind": "redis", "port": 6379} in core["spark_services"]
    assert core["spark_meshes"]["fleet"]["listen_port"] == 51820


def test_homelab_keeps_its_kvm_host_and_uses_public_ssh_addresses(isolated_state: Path) -> None:
    inventory = build_inventory(load_fleet("homelab"))
    assert inventory["kvm_hosts"]["hosts"] == ["kvm-1"]
    assert inventory["_meta"]["hostvars"]["ops-1"]["ansible_host"] == "203.0.113.24"
    assert inventory["_meta"]["hostvars"]["pi-1"]["spark_power"]["governor"] == "ondemand"
    assert inventory["_meta"]["hostvars"]["pi-1"]["spark_tiers"] == {"hot": {"path": "/srv/hot", "capacity_gb": 100}}


def test_state_directory_keys_reach_ansible(isolated_state: Path) -> None:
    ssh = isolated_state / "ssh"
    ssh.mkdir(parents=True)
    (ssh / "id_ed25519").write_text("not a real key")
    (ssh / "known_hosts").write_text("")
    hostvars = build_inventory(load_fleet("lab"))["_meta"]["hostvars"]["pi-1"]
    assert hostvars["ansible_ssh_private_key_file"] == str(ssh / "id_ed25519")
    assert str(ssh / "known_hosts") in hostvars["ansible_ssh_common_args"]


def test_ansible_reads_the_fleet_through_the_plugin(repo: Path, isolated_state: Path) -> None:
    graph = subprocess.run([str(BIN / "ansible-inventory"), "-i", "inventory/lab.fleet.yml", "--graph"],
                           cwd=repo, capture_output=True, text=True, timeout=120)
    assert graph.returncode == 0, graph.stderr
    for group in ("@edge:", "@cloud:", "@pis:", "@nas:", "@vms:", "@kafka:", "@timescaledb:", "@grafana:"):
        assert group in graph.stdout
    listed = subprocess.run([str(BIN / "ansible-inventory"), "-i", "inventory/homelab.fleet.yml", "--host", "pi-2"],
                            cwd=repo, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["spark_address"] == "192.0.2.12"


def test_the_plugin_reports_a_bad_fleet_clearly(repo: Path, tmp_path: Path, isolated_state: Path) -> None:
    bad = (repo / "tests/fixtures/fleet/invalid/address-outside-site.yaml").read_text()
    (tmp_path / "bad.yaml").write_text(bad)
    (tmp_path / "bad.fleet.yml").write_text("plugin: fleet\nfleet: bad.yaml\n")
    done = subprocess.run([str(BIN / "ansible-inventory"), "-i", str(tmp_path / "bad.fleet.yml"), "--list"],
                          cwd=repo, capture_output=True, text=True, timeout=120)
    assert "is outside site edge's LAN" in done.stderr


def test_every_repository_host_gets_the_backup_accounts_it_serves(isolated_state: Path) -> None:
    inventory = build_inventory(load_fleet("lab"))
    assert inventory["backup_repositories"]["hosts"] == ["nas-1", "ops-1"]
    hostvars = inventory["_meta"]["hostvars"]
    offsite = {(a["client"], a["repository"], a["chroot"]) for a in hostvars["ops-1"]["spark_backup_accounts"]}
    assert offsite == {(c, "offsite", f"/srv/restic/offsite/{c}") for c in ("pi-1", "pi-2", "nas-1")}
    assert {a["repository"] for a in hostvars["nas-1"]["spark_backup_accounts"]} == {"nas-primary"}
    assert hostvars["pi-1"]["spark_backup_target"]["repository"] == "nas-primary", "the primary comes first"
