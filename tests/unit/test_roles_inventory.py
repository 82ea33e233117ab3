"""What the roles read from the inventory: management networks, backup accounts, repositories, operators."""

from __future__ import annotations

from pathlib import Path

import pytest

from primespark.fleet import load_fleet
from primespark.inventory import build_inventory


@pytest.fixture
def hostvars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    from primespark.settings import get_settings

    state = tmp_path / "state"
    (state / "ssh").mkdir(parents=True)
    (state / "ssh" / "id_ed25519.pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample spark@lab\n")
    monkeypatch.setenv("SPARK_STATE_DIR", str(state))
    get_settings.cache_clear()
    yield build_inventory(load_fleet("lab"))["_meta"]["hostvars"]
    get_settings.cache_clear()


def test_management_networks_are_the_site_lan_and_the_overlay(hostvars: dict) -> None:
    assert hostvars["pi-1"]["spark_mgmt_networks"] == ["172.30.1.0/24", "10.99.0.0/24"]
    assert hostvars["core-1"]["spark_mgmt_networks"] == ["172.30.2.0/24", "10.99.0.0/24"]


def test_each_backup_client_gets_its_own_chrooted_account_on_the_nas(hostvars: dict) -> None:
    nas = hostvars["nas-1"]
    assert nas["spark_restic_repositories"] == [{"name": "nas-primary", "path": "/srv/restic/primary"}]
    accounts = {a["client"]: a for a in nas["spark_backup_accounts"]}
    assert set(accounts) == {"pi-1", "pi-2", "nas-1"}, "the fleet's plans on nas-primary"
    assert accounts["pi-1"]["user"] == "backup-pi-1"
    assert accounts["pi-1"]["chroot"] == "/srv/restic/primary/pi-1"
    assert hostvars["pi-1"]["spark_backup_target"] == accounts["pi-1"]
    assert hostvars["pi-3"]["spark_backup_target"] is None, "pi-3 has no backup plan"
    assert hostvars["pi-1"]["spark_backup_accounts"] == []


def test_the_ssh_user_is_an_operator_with_the_environment_key(hostvars: dict) -> None:
    operators = hostvars["pi-2"]["spark_operators"]
    assert operators[0]["name"] == "spark"
    assert operators[0]["keys"] == ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample spark@lab"]


def test_monitoring_and_time_come_from_the_fleet(hostvars: dict) -> None:
    pi = hostvars["pi-1"]
    assert pi["spark_node_exporter_port"] == 9100
    assert pi["spark_tls"] == {"folder": "/etc/ssl/primespark", "group": "primespark-tls", "gid": 8443,
                               "web_config": "/etc/ssl/primespark/web.yml"}, "the lab has a CA"
    # the lab's Prometheus and Alertmanager are Debian's, on ops-1: they serve only TLS too
    assert hostvars["ops-1"]["spark_monitoring"]["tls"] is True
    assert pi["spark_textfile_dir"] == "/var/lib/prometheus/node-exporter"
    assert pi["spark_ntp_servers"] == [], "the lab shares the machine's clock"
    assert pi["spark_tier_watermarks"] == {"hot": {"low": 0.7, "high": 0.85}}
    assert hostvars["pi-2"]["spark_power"]["governor"] == "ondemand"
    assert hostvars["core-1"]["spark_power"] is None


def test_a_recall_tier_gets_one_account_its_lower_tiers_push_into(hostvars: dict) -> None:
    """The lab's hot tier has `recall: true`: nas-1 (warm) and ops-1 (cold) may push a recalled file back into each
    Pi's recall folder, through one write-only account that refuses deletions; nothing pushes the other way."""
    recall = [a for a in hostvars["pi-1"]["spark_sync_accounts"] if a["job"] == "tier-recall-hot"]
    assert recall == [{"job": "tier-recall-hot", "user": "sync-tier-recall-hot", "mode": "copy", "traverse": True,
                       "roots": [{"source": "nas-1", "path": "/srv/hot/.spark-tier-recall"},
                                 {"source": "ops-1", "path": "/srv/hot/.spark-tier-recall"}]}]
    pushes = [p for p in hostvars["nas-1"]["spark_sync_pushes"] if p["job"] == "tier-recall-hot"]
    assert [(p["destination"], p["source_path"], p["path"]) for p in pushes] == [
        (pi, "/srv/warm", "/srv/hot/.spark-tier-recall") for pi in ("pi-1", "pi-2", "pi-3")]
    assert not [a for a in hostvars["nas-1"]["spark_sync_accounts"] if a["job"].startswith("tier-recall")]
    assert not [p for p in hostvars["pi-1"]["spark_sync_pushes"] if p["job"].startswith("tier-recall")]


def test_the_cold_tier_gets_the_account_a_warm_to_cold_pass_pushes_into(hostvars: dict) -> None:
    """No sync job carries nas-1's warm tier to ops-1's cold tier: the pass's own write-only account there, confined
    to nas-1's folder. Hot → warm goes through the hot-to-nas job's account: no second route into the NAS."""
    moves = [a for a in hostvars["ops-1"]["spark_sync_accounts"] if a["job"].startswith("tier-move-")]
    assert moves == [{"job": "tier-move-cold", "user": "sync-tier-move-cold", "mode": "copy", "traverse": False,
                      "roots": [{"source": "nas-1", "path": "/srv/cold/nas-1"}]}]
    pushes = [p for p in hostvars["nas-1"]["spark_sync_pushes"] if p["job"] == "tier-move-cold"]
    assert pushes == [{"job": "tier-move-cold", "source_path": "/srv/warm", "destination": "ops-1",
                       "path": "/srv/cold/nas-1"}]
    assert not [a for a in hostvars["nas-1"]["spark_sync_accounts"] if a["job"].startswith("tier-move-")]
