"""`spark secrets migrate --env ENV --to vault`, run as the CLI against a real OpenBao dev server: the Vault is the
one the fleet file's `secrets:` section names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import hvac
import pytest
import yaml

from primespark.fleet import load_fleet
from primespark.secrets import LocalSecretStore, VaultSecretStore, read_reference, store_for
from primespark.settings import settings_for

SPARK = Path(sys.executable).parent / "spark"
MINI = Path(__file__).resolve().parents[1] / "fixtures" / "fleet" / "valid" / "mini-full.yaml"
ENTRIES = {"restic/nas-primary": "pw-primary", "restic/ssh/pi-1": "-----BEGIN KEY-----\nabc\n",
           "mesh/home/pi-1": "wg-private-value"}


def fleet_file(tmp_path: Path, address: str, prefix: str) -> Path:
    data = yaml.safe_load(MINI.read_text())
    data["secrets"] = {"backend": "vault", "address": address, "prefix": prefix}
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def setup(tmp_path, vault, vault_prefix, monkeypatch):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)  # private, as spark makes it (the store is filled before spark runs)
    local = LocalSecretStore(state / "secrets")
    for key, value in ENTRIES.items():
        local.put(key, value)
    fleet = fleet_file(tmp_path, vault.address, vault_prefix)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SPARK_STATE_DIR": str(state),
           "VAULT_TOKEN": vault.root_token}
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # for settings_for() in this process, as the CLI sees them

    def spark(*args: str, fleet: Path = fleet, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(SPARK), "secrets", "migrate", "--env", str(fleet), *args], env={**env, **extra},
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)

    return spark, local, vault.client(), f"{vault_prefix}/mini", fleet


def stored(client: hvac.Client, path: str) -> dict:
    return client.secrets.kv.v2.read_secret_version(path=path, mount_point="secret",
                                                    raise_on_deleted_version=True)["data"]


def test_migrate_moves_verifies_and_is_idempotent(setup) -> None:
    spark, local, client, prefix, fleet = setup
    dry = spark("--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert all(key in dry.stdout for key in ENTRIES) and dry.stdout.count("would move") == 3
    with pytest.raises(hvac.exceptions.InvalidPath):
        client.secrets.kv.v2.list_secrets(path=prefix, mount_point="secret")  # a dry run writes nothing

    moved = spark()
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout.count("moved") == 3
    for key, value in ENTRIES.items():
        assert stored(client, f"{prefix}/{key}")["data"] == {"value": value}
        assert local.get(key) == value, "kept without --remove-local"
    assert not any(value in moved.stdout + moved.stderr for value in ENTRIES.values()), "values are never shown"

    again = spark()
    assert again.returncode == 0 and again.stdout.count("already there") == 3
    assert all(stored(client, f"{prefix}/{key}")["metadata"]["version"] == 1 for key in ENTRIES), "no rewrite"

    removed = spark("--remove-local")
    assert removed.returncode == 0, removed.stderr
    assert local.list() == [] and removed.stdout.count("removed") == 3
    # The environment's `local:` references now read the migrated values from Vault.
    vault_store = store_for(load_fleet(str(fleet)), "mini", settings_for("mini"))
    assert isinstance(vault_store, VaultSecretStore)
    assert read_reference("local:restic/nas-primary", vault_store) == "pw-primary"
    assert spark().stdout.count("nothing to migrate") == 1


def test_a_different_value_in_vault_is_a_conflict_never_overwritten(setup) -> None:
    spark, local, client, prefix, _ = setup
    client.secrets.kv.v2.create_or_update_secret(path=f"{prefix}/restic/nas-primary", secret={"value": "other"},
                                                 mount_point="secret")
    result = spark("--remove-local")
    assert result.returncode == 1
    assert "error: 1 entry differ in Vault and were left as they are: restic/nas-primary" in result.stderr
    assert "Traceback" not in result.stderr
    assert stored(client, f"{prefix}/restic/nas-primary")["data"] == {"value": "other"}
    assert local.list() == ["restic/nas-primary"], "the conflicting local copy stays; the others moved"


def test_an_unreachable_vault_is_one_clear_error(setup, fresh_vault, tmp_path) -> None:
    spark, local, _, _, _ = setup
    address = fresh_vault.address
    fresh_vault.stop()
    (tmp_path / "down").mkdir()
    result = spark(fleet=fleet_file(tmp_path / "down", address, "primespark"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: secret store unreachable: no answer from Vault at {address}")
    assert sorted(local.list()) == sorted(ENTRIES)


def test_a_fleet_without_vault_has_nowhere_to_migrate_to(setup, tmp_path) -> None:
    spark, local, _, _, _ = setup
    result = spark(fleet=MINI)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: the fleet 'mini' keeps its secrets in the local store, not in Vault" in result.stderr
    assert sorted(local.list()) == sorted(ENTRIES)
