"""How a command finds an environment's secret store: the fleet file's `secrets:` section, against a real OpenBao
dev server (tests/conftest.py) — VAULT_TOKEN, an AppRole login, older settings that disagree, and a local store
that was not moved into Vault yet."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from primespark.context import FleetContext
from primespark.fleet import Fleet, load_fleet
from primespark.secrets import (
    LocalSecretStore,
    SecretError,
    SecretNotFound,
    VaultSecretStore,
    ensure_reference,
    read_reference,
    store_for,
)
from primespark.settings import Settings, settings_for

MINI = Path(__file__).resolve().parents[1] / "fixtures" / "fleet" / "valid" / "mini-full.yaml"


def fleet_with(tmp_path: Path, secrets: dict | None, password: str = "local:restic/nas-primary") -> Path:
    data = yaml.safe_load(MINI.read_text())
    data["backup"]["repositories"]["nas-primary"]["password"] = password
    if secrets is not None:
        data["secrets"] = secrets
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    for name in ("SPARK_SECRET_BACKEND", "SPARK_VAULT_MOUNT", "SPARK_VAULT_PREFIX", "VAULT_SECRET_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def settings() -> Settings:
    return settings_for("mini")


def test_a_fleet_without_a_secrets_section_keeps_a_local_0600_store(tmp_path, state) -> None:
    ctx = FleetContext.load(str(fleet_with(tmp_path, None)))
    assert isinstance(ctx.secrets, LocalSecretStore) and ctx.secrets.root == state / "secrets"
    assert ensure_reference("local:restic/nas-primary", ctx.secrets, lambda: "pw") == "pw"
    assert (state / "secrets" / "restic" / "nas-primary").stat().st_mode & 0o777 == 0o600


def test_vault_with_vault_token_reads_and_writes_where_the_section_says(tmp_path, state, vault, vault_prefix,
                                                                         monkeypatch) -> None:
    monkeypatch.setenv("VAULT_TOKEN", vault.root_token)
    path = fleet_with(tmp_path, {"backend": "vault", "address": vault.address, "prefix": vault_prefix},
                      password=f"vault:secret/{vault_prefix}/passwords#nas-primary")
    ctx = FleetContext.load(str(path))
    assert isinstance(ctx.secrets, VaultSecretStore)
    assert ensure_reference("local:mesh/fleet/pi-1", ctx.secrets, lambda: "wg-key") == "wg-key"
    root = vault.client()
    stored = root.secrets.kv.v2.read_secret_version(path=f"{vault_prefix}/mini/mesh/fleet/pi-1", mount_point="secret",
                                                    raise_on_deleted_version=True)
    assert stored["data"]["data"] == {"value": "wg-key"}  # <mount>/<prefix>/<env>/<key>, field value
    password = ensure_reference(ctx.fleet.backup.repositories["nas-primary"].password, ctx.secrets, lambda: "pw")
    assert password == "pw" and not state.joinpath("secrets").exists(), "nothing lands in a local store"


def test_approle_login_with_a_secret_id_file(tmp_path, state, fresh_vault, monkeypatch) -> None:
    monkeypatch.delenv("VAULT_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.vault-token either
    root = fresh_vault.client()
    root.sys.enable_auth_method(method_type="approle")
    root.sys.create_or_update_acl_policy(name="spark", policy=(
        'path "secret/data/primespark/mini/*" { capabilities = ["create", "read", "update"] }\n'
        'path "secret/metadata/primespark/mini/*" { capabilities = ["read", "list"] }'))
    root.auth.approle.create_or_update_approle(role_name="spark", token_policies=["spark"], token_ttl="10m")
    root.auth.approle.update_role_id(role_name="spark", role_id="spark-controller")
    secret_id = root.auth.approle.generate_secret_id(role_name="spark")["data"]["secret_id"]
    secret_file = tmp_path / "secret-id"
    secret_file.write_text(secret_id + "\n")
    secret_file.chmod(0o600)
    path = fleet_with(tmp_path, {"backend": "vault", "address": fresh_vault.address, "auth": "approle",
                                 "role_id": "spark-controller", "secret_id_file": str(secret_file)})
    store = FleetContext.load(str(path)).secrets
    assert ensure_reference("local:restic/ssh/pi-1", store, lambda: "key") == "key"
    with pytest.raises(SecretError, match=r"permission denied \(403\) reading secret/primespark/other#x"):
        read_reference("vault:secret/primespark/other#x", store)  # the role's policy, not root's

    secret_file.chmod(0o644)
    with pytest.raises(SecretError, match=f"the AppRole secret-id file {secret_file} is readable by others"):
        store_for(load_fleet(str(path)), "mini", settings())
    monkeypatch.setenv("VAULT_SECRET_ID", "not-the-secret-id")  # the environment wins over the file
    with pytest.raises(SecretError, match="refused the login as AppRole role spark-controller") as refused:
        store_for(load_fleet(str(path)), "mini", settings())
    assert "secret-id" in refused.value.fix


def test_older_settings_that_disagree_with_the_fleet_are_refused(tmp_path, state, vault, monkeypatch) -> None:
    monkeypatch.setenv("VAULT_TOKEN", vault.root_token)
    fleet = load_fleet(str(fleet_with(tmp_path, {"backend": "vault", "address": vault.address})))
    monkeypatch.setenv("SPARK_VAULT_PREFIX", "elsewhere")
    with pytest.raises(SecretError, match=r"SPARK_VAULT_PREFIX=elsewhere, but the fleet file has secrets\.prefix: "
                                          r"primespark") as caught:
        store_for(fleet, "mini", settings())
    assert "unset SPARK_VAULT_PREFIX" in caught.value.fix
    monkeypatch.setenv("SPARK_VAULT_PREFIX", "primespark")  # agreeing is fine
    monkeypatch.setenv("SPARK_SECRET_BACKEND", "vault")
    assert isinstance(store_for(fleet, "mini", settings()), VaultSecretStore)


def test_a_key_still_in_the_local_store_is_never_made_anew_in_vault(tmp_path, state, vault, vault_prefix,
                                                                      monkeypatch) -> None:
    """A fleet that moved to Vault before its local store did: the key is reported, not replaced by a new one
    (a new restic password would lock the repository away; a new WireGuard key would cut the host off)."""
    monkeypatch.setenv("VAULT_TOKEN", vault.root_token)
    LocalSecretStore(state / "secrets").put("mesh/fleet/pi-1", "old-key")
    fleet: Fleet = load_fleet(str(fleet_with(tmp_path, {"backend": "vault", "address": vault.address,
                                                        "prefix": vault_prefix})))
    store = store_for(fleet, "mini", settings())
    with pytest.raises(SecretError, match=r"secret 'mesh/fleet/pi-1' is still in the local store .*, not in Vault") \
            as caught:
        ensure_reference("local:mesh/fleet/pi-1", store, lambda: pytest.fail("a new key was made"))
    assert not isinstance(caught.value, SecretNotFound)
    assert "spark secrets migrate --env mini --to vault" in caught.value.fix
    with pytest.raises(SecretNotFound):
        store.get("mesh/fleet/pi-2")  # one the local store never had is simply not there
