"""The Vault secret store and `vault:` references against a real OpenBao dev server (tests/conftest.py).

Values are read back with hvac directly, so a wrong mount, path or field fails here; the error tests break a
server of their own (stopped, sealed, a revoked token, a policy without the path)."""

from __future__ import annotations

import threading

import hvac
import pytest

from primespark.secrets import (
    LocalSecretStore,
    Reference,
    SecretError,
    SecretExists,
    SecretNotFound,
    SecretStoreSealed,
    SecretStoreUnreachable,
    VaultSecretStore,
    ensure_reference,
    read_reference,
    write_reference,
)


def kv(client: hvac.Client, mount: str, path: str) -> dict:
    return client.secrets.kv.v2.read_secret_version(path=path, mount_point=mount,
                                                    raise_on_deleted_version=True)["data"]["data"]


def enable_kv2(client: hvac.Client, mount: str) -> None:
    if f"{mount}/" not in client.sys.list_mounted_secrets_engines()["data"]:
        client.sys.enable_secrets_engine("kv", path=mount, options={"version": "2"})


@pytest.fixture
def store(vault, vault_prefix) -> VaultSecretStore:
    return VaultSecretStore(vault.address, "secret", vault_prefix, token=vault.root_token)


def test_store_get_put_delete_list(vault, vault_prefix, store) -> None:
    store.put("restic/ssh/pi-1", "key-one")
    store.put("restic/ssh/pi-2", "key-two")
    store.put("mesh/home/pi-1", "wg")
    assert kv(vault.client(), "secret", f"{vault_prefix}/restic/ssh/pi-1") == {"value": "key-one"}
    assert store.get("restic/ssh/pi-2") == "key-two"
    assert store.list() == ["mesh/home/pi-1", "restic/ssh/pi-1", "restic/ssh/pi-2"]
    assert store.list("restic/") == ["restic/ssh/pi-1", "restic/ssh/pi-2"]
    assert store.exists("mesh/home/pi-1") and not store.exists("mesh/home/pi-9")
    store.delete("restic/ssh/pi-1")
    store.delete("restic/ssh/pi-1")  # already gone is fine
    assert store.list("restic/") == ["restic/ssh/pi-2"]
    with pytest.raises(SecretNotFound, match=rf"'restic/ssh/pi-1' is not in Vault .* at secret/{vault_prefix}/"):
        store.get("restic/ssh/pi-1")
    store.create("fresh", "one")
    with pytest.raises(SecretExists):
        store.create("fresh", "two")
    assert store.get("fresh") == "one"
    assert read_reference("local:restic/ssh/pi-2", store) == "key-two"  # local: names a key of the env's own store


def test_vault_reference_is_read_and_written_at_its_mount_path_and_field(vault, vault_prefix, store) -> None:
    """`vault:kv-prod/restic/passwords#nas-primary` is mount kv-prod, path restic/passwords, field nas-primary
    (the old `resolve` read `secret/<prefix>/restic/passwords/nas-primary` instead)."""
    root = vault.client()
    enable_kv2(root, "kv-prod")
    path = f"restic/passwords-{vault_prefix.rsplit('-', 1)[-1]}"
    reference = f"vault:kv-prod/{path}#nas-primary"
    write_reference(reference, "first-password", store)
    assert kv(root, "kv-prod", path) == {"nas-primary": "first-password"}
    write_reference(f"vault:kv-prod/{path}#offsite", "second-password", store)
    assert kv(root, "kv-prod", path) == {"nas-primary": "first-password", "offsite": "second-password"}
    assert read_reference(reference, store) == "first-password"
    assert read_reference(reference, store) == "first-password"
    assert store.list() == [], "nothing landed in the environment's own store"

    root.secrets.kv.v2.create_or_update_secret(path="elsewhere", secret={"x": "set-by-hand"}, mount_point="kv-prod")
    assert read_reference("vault:kv-prod/elsewhere#x", store) == "set-by-hand"
    with pytest.raises(SecretNotFound, match="kv-prod/elsewhere#y"):
        read_reference("vault:kv-prod/elsewhere#y", store)

    with pytest.raises(SecretExists, match=f"kv-prod/{path}#nas-primary"):
        write_reference(reference, "would-replace", store)
    assert read_reference(reference, store) == "first-password", "a create-only write changes nothing"
    write_reference(reference, "rotated", store, replace=True)
    assert kv(root, "kv-prod", path) == {"nas-primary": "rotated", "offsite": "second-password"}
    meta = root.secrets.kv.v2.read_secret_metadata(path=path, mount_point="kv-prod")["data"]
    assert meta["current_version"] == 3, "each write is a new KV version"


def test_ensure_reference_creates_once_and_concurrent_runs_agree(vault, vault_prefix, store) -> None:
    reference = f"vault:secret/{vault_prefix}/restic#nas-primary"
    made = iter(f"value-{n}" for n in range(100))
    lock = threading.Lock()

    def make() -> str:
        with lock:
            return next(made)

    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_reference(reference, store, make)))
               for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 6 and len(set(results)) == 1, f"every run sees one value: {results}"
    assert kv(vault.client(), "secret", f"{vault_prefix}/restic") == {"nas-primary": results[0]}
    assert ensure_reference(reference, store, make) == results[0]

    # A soft-deleted latest version counts as none: the next create is a new version, not a CAS failure.
    vault.client().secrets.kv.v2.delete_latest_version_of_secret(path=f"{vault_prefix}/restic", mount_point="secret")
    with pytest.raises(SecretNotFound):
        read_reference(reference, store)
    again = ensure_reference(reference, store, lambda: "after-delete")
    assert again == "after-delete" and read_reference(reference, store) == "after-delete"


def test_local_store_creates_only_once(tmp_path) -> None:
    local = LocalSecretStore(tmp_path / "secrets")
    assert ensure_reference("local:restic/nas-primary", local, lambda: "one") == "one"
    assert ensure_reference("local:restic/nas-primary", local, lambda: "two") == "one"
    with pytest.raises(SecretExists):
        write_reference("local:restic/nas-primary", "three", local)
    write_reference("local:restic/nas-primary", "four", local, replace=True)
    assert local.get("restic/nas-primary") == "four"
    assert sorted(p.name for p in (tmp_path / "secrets" / "restic").iterdir()) == ["nas-primary"]
    with pytest.raises(SecretError, match="is in Vault, but this environment's secret store is local"):
        read_reference("vault:secret/primespark/restic#nas-primary", local)


@pytest.mark.parametrize("text", ["vault:secret#x", "vault:secret/path", "vault:/path#x", "nope:a",
                                  "vault:secret/../x#y", "local:../etc/shadow"])
def test_malformed_references_are_refused(text) -> None:
    with pytest.raises(SecretError):
        Reference.parse(text)


def test_reference_round_trips() -> None:
    ref = Reference.parse("vault:kv-prod/restic/passwords#nas-primary")
    assert (ref.mount, ref.path, ref.field) == ("kv-prod", "restic/passwords", "nas-primary")
    assert str(ref) == "vault:kv-prod/restic/passwords#nas-primary"
    assert str(Reference.parse("local:restic/x")) == "local:restic/x"


# Errors an operator can act on -----------------------------------------------------------------------------


def test_a_missing_mount_is_not_a_missing_secret(vault, store) -> None:
    with pytest.raises(SecretError, match="no secrets engine at the mount of no-such-mount/a#b") as caught:
        ensure_reference("vault:no-such-mount/a#b", store, lambda: "never")
    assert not isinstance(caught.value, SecretNotFound)


def test_unreachable_server_is_one_clear_error(fresh_vault) -> None:
    store = VaultSecretStore(fresh_vault.address, "secret", "primespark/lab", token=fresh_vault.root_token)
    fresh_vault.stop()
    with pytest.raises(SecretError) as caught:
        store.get("restic/x")
    message = str(caught.value)
    assert message.startswith(f"secret store unreachable: no answer from Vault at {fresh_vault.address}")
    assert "secret/primespark/lab/restic/x" in message and "fix: check the address" in message
    assert isinstance(caught.value, SecretStoreUnreachable) and caught.value.transient  # a retry may pass
    with pytest.raises(SecretError, match="unreachable"):
        ensure_reference("vault:secret/a#b", store, lambda: pytest.fail("nothing is created when unreachable"))


def test_sealed_server_is_one_clear_error_and_nothing_is_created(fresh_vault) -> None:
    store = VaultSecretStore(fresh_vault.address, "secret", "primespark/lab", token=fresh_vault.root_token)
    store.put("restic/kept", "v1")
    fresh_vault.seal()
    for action in (lambda: store.get("restic/kept"), lambda: store.put("restic/kept", "v2"), store.list,
                   lambda: ensure_reference("vault:secret/a#b", store, lambda: "never")):
        with pytest.raises(SecretError, match=r"^secret store sealed: Vault at .* is sealed") as caught:
            action()
        assert isinstance(caught.value, SecretStoreSealed) and not getattr(caught.value, "transient", False)
        assert "bao operator unseal" in str(caught.value)
    fresh_vault.unseal()
    assert store.get("restic/kept") == "v1"
    assert store.list() == ["restic/kept"]


def test_revoked_token_and_denied_path_say_which(fresh_vault) -> None:
    root = fresh_vault.client()
    root.sys.create_or_update_acl_policy(
        name="restic-reader", policy='path "secret/data/primespark/lab/restic/*" { capabilities = ["read"] }')
    token = root.auth.token.create(policies=["restic-reader"], ttl="1h")["auth"]["client_token"]
    root.secrets.kv.v2.create_or_update_secret(path="primespark/lab/restic/pw", secret={"value": "v"})
    root.secrets.kv.v2.create_or_update_secret(path="primespark/lab/mesh/key", secret={"value": "k"})
    store = VaultSecretStore(fresh_vault.address, "secret", "primespark/lab", token=token)
    assert store.get("restic/pw") == "v"
    with pytest.raises(SecretError) as denied:
        store.get("mesh/key")
    assert str(denied.value).startswith(
        "permission denied (403) reading secret/primespark/lab/mesh/key#value: the token's policies "
        "(default, restic-reader) do not allow it")
    with pytest.raises(SecretError, match=r"permission denied \(403\) writing secret/primespark/lab/restic/pw"):
        store.put("restic/pw", "changed")

    root.auth.token.revoke(token)
    with pytest.raises(SecretError) as revoked:
        store.get("restic/pw")
    assert "refused the token while reading secret/primespark/lab/restic/pw#value: it is expired, revoked" \
        in str(revoked.value)

    expiring = root.auth.token.create(policies=["restic-reader"], ttl="1s")["auth"]["client_token"]
    short = VaultSecretStore(fresh_vault.address, "secret", "primespark/lab", token=expiring)
    assert short.get("restic/pw") == "v"
    with pytest.raises(SecretError, match="it is expired, revoked"):
        _poll_until_refused(short)


def _poll_until_refused(store: VaultSecretStore, seconds: float = 15.0) -> None:
    """Read until the 1 s token's expiry is enforced (Vault revokes expired tokens on its own clock)."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        store.get("restic/pw")
        time.sleep(0.2)
    raise AssertionError("the expired token was still honoured after the deadline")


def test_no_token_is_a_clear_error(vault, monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("VAULT_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.vault-token either
    with pytest.raises(SecretError, match=f"no Vault token for {vault.address}"):
        VaultSecretStore(vault.address)
