"""VaultSecrets: per-host least-privilege HCL from the fleet, and the hvac provider's idempotent create/update/delete,
against a real OpenBao dev server; the rendered policies are loaded into it and enforced.

Each test that applies the homelab spec gets a server of its own (`fresh_vault`): roles and policies are
server-wide names, and the tests assert what is left (nothing) after a delete.
"""

from __future__ import annotations

import hvac
import pytest

from primespark.cloud.catalog import readable_services, secret_path
from primespark.cloud.vault import VaultSecretsProvider, host_policy, issue_secret_id, vault_spec
from primespark.fleet import load_fleet
from primespark.secrets import SecretError, VaultSecretStore, read_reference
from primespark.settings import get_settings


@pytest.fixture
def homelab():
    return load_fleet("homelab")


def kv_paths(client: hvac.Client, mount: str = "secret", under: str = "primespark/") -> set[str]:
    """Every secret path below `under` (recursively), as the server lists them."""
    try:
        keys = client.secrets.kv.v2.list_secrets(path=under, mount_point=mount)["data"]["keys"]
    except hvac.exceptions.InvalidPath:
        return set()
    found: set[str] = set()
    for key in keys:
        found |= kv_paths(client, mount, f"{under}{key}") if key.endswith("/") else {f"{under}{key}"}
    return found


def kv_data(client: hvac.Client, path: str) -> dict[str, str]:
    return client.secrets.kv.v2.read_secret_version(path=path, mount_point="secret",
                                                    raise_on_deleted_version=True)["data"]["data"]


def kv_version(client: hvac.Client, path: str) -> int:
    return client.secrets.kv.v2.read_secret_metadata(path=path, mount_point="secret")["data"]["current_version"]


def approles(client: hvac.Client) -> set[str]:
    try:
        return set(client.auth.approle.list_roles()["data"]["keys"])
    except hvac.exceptions.InvalidPath:  # none left
        return set()


def acl_policies(client: hvac.Client) -> set[str]:
    return set(client.sys.list_acl_policies()["data"]["keys"]) - {"default", "root"}


def test_host_policy_is_least_privilege_from_the_fleet(homelab):
    hcl = host_policy(homelab, "core-1", "secret")
    assert 'path "secret/data/primespark/homelab/services/redis"' in hcl
    assert 'path "secret/data/primespark/homelab/services/timescaledb"' in hcl  # the API needs it
    assert "grafana" not in hcl and "mlflow" not in hcl and '"*"' not in hcl
    assert hcl.count('capabilities = ["read"]') == len(readable_services(homelab, "core-1")) + 1
    assert readable_services(homelab, "stream-1") == []  # Kafka has no generated secret
    spec = vault_spec(homelab, "secret")
    assert set(spec["roles"]) == {f"primespark-homelab-{h}" for h in ("core-1", "stream-1", "analytics-1", "ops-1")}


def test_create_update_delete_are_idempotent(homelab, fresh_vault):
    client = fresh_vault.client()
    provider = VaultSecretsProvider(fresh_vault.client)
    props = {"fleet": "homelab", **vault_spec(homelab, "secret")}
    created = provider.create(props)
    values = created.outs["values"]
    assert set(values) == kv_paths(client) and all(len(v) >= 32 for d in values.values() for v in d.values())
    assert all(kv_data(client, path) == data for path, data in values.items()), "what Vault holds is what came out"
    assert client.auth.approle.read_role_id("primespark-homelab-core-1")["data"]["role_id"] == \
        "primespark-homelab-core-1"
    assert client.sys.read_acl_policy("primespark-homelab-core-1")["data"]["policy"] == \
        props["roles"]["primespark-homelab-core-1"]["policy"]
    versions = {path: kv_version(client, path) for path in values}

    again = provider.update("id", props, props)  # nothing changed: the same values, no KV writes
    assert again.outs["values"] == values and {p: kv_version(client, p) for p in values} == versions
    assert provider.diff("id", props, props).changes is False
    rerun = VaultSecretsProvider(fresh_vault.client).create(props)  # a fresh run (no Pulumi state) keeps them too
    assert rerun.outs["values"] == values and {p: kv_version(client, p) for p in values} == versions

    smaller = {**props, "secrets": {k: v for k, v in props["secrets"].items() if "grafana" not in k},
               "roles": {k: v for k, v in props["roles"].items() if k != "primespark-homelab-ops-1"}}
    assert provider.diff("id", props, smaller).changes is True
    provider.update("id", props, smaller)
    assert not any("grafana" in path for path in kv_paths(client))
    assert "primespark-homelab-ops-1" not in approles(client)
    assert "primespark-homelab-ops-1" not in acl_policies(client)
    assert kv_data(client, "primespark/homelab/services/redis") == values["primespark/homelab/services/redis"]

    provider.delete("id", smaller)
    provider.delete("id", smaller)  # twice: already gone is fine
    assert kv_paths(client) == set() and approles(client) == set() and acl_policies(client) == set()


def test_secret_ids_are_issued_per_service_host(homelab, fresh_vault):
    client = fresh_vault.client()
    VaultSecretsProvider(fresh_vault.client).create({"fleet": "homelab", **vault_spec(homelab, "secret")})
    secret_id = issue_secret_id(client, homelab, "core-1")
    issued = client.auth.approle.read_secret_id("primespark-homelab-core-1", secret_id)["data"]
    assert issued["metadata"] == {"host": "core-1", "fleet": "homelab"}
    with pytest.raises(ValueError, match="no AppRole"):
        issue_secret_id(client, homelab, "pi-1")


def _login(server, fleet, host: str) -> hvac.Client:
    """What the VM does at boot: AppRole login with its role-id and a secret-id from the configuration run."""
    secret_id = issue_secret_id(server.client(), fleet, host)
    host_client = hvac.Client(url=server.address)
    token = host_client.auth.approle.login(role_id=f"primespark-{fleet.name}-{host}", secret_id=secret_id)
    assert token["auth"]["policies"] == ["default", f"primespark-{fleet.name}-{host}"]
    return host_client


def test_host_policies_are_enforced_by_the_server(homelab, fresh_vault):
    props = {"fleet": "homelab", **vault_spec(homelab, "secret")}
    values = VaultSecretsProvider(fresh_vault.client).create(props).outs["values"]
    core = _login(fresh_vault, homelab, "core-1")
    own = [secret_path(homelab, name) for name in readable_services(homelab, "core-1")]
    assert own, "core-1 runs services with secrets"
    for path in own:
        assert kv_data(core, path) == values[path]
    others = set(values) - set(own)
    assert "primespark/homelab/services/grafana" in others
    for path in others:
        with pytest.raises(hvac.exceptions.Forbidden):
            kv_data(core, path)
    with pytest.raises(hvac.exceptions.Forbidden):  # read, never write, even its own
        core.secrets.kv.v2.create_or_update_secret(path=own[0], secret={"x": "y"}, mount_point="secret")
    with pytest.raises(hvac.exceptions.Forbidden):
        core.secrets.kv.v2.list_secrets(path="primespark/", mount_point="secret")

    # Through the project's own store, the 403 names the path and the token's policies.
    store = VaultSecretStore(fresh_vault.address, "secret", "primespark/homelab", token=core.token)
    assert read_reference(f"vault:secret/{own[0]}#{next(iter(values[own[0]]))}", store) == \
        next(iter(values[own[0]].values()))
    with pytest.raises(SecretError, match=r"permission denied \(403\) reading secret/primespark/homelab/services/"
                                          r"grafana#GF_SECURITY_ADMIN_PASSWORD: the token's policies \(default, "
                                          r"primespark-homelab-core-1\) do not allow it"):
        read_reference("vault:secret/primespark/homelab/services/grafana#GF_SECURITY_ADMIN_PASSWORD", store)

    ops = _login(fresh_vault, homelab, "ops-1")
    assert kv_data(ops, "primespark/homelab/services/grafana") == values["primespark/homelab/services/grafana"]
    with pytest.raises(hvac.exceptions.Forbidden):
        kv_data(ops, "primespark/homelab/services/redis")


def test_deployer_policy_is_enough_for_spark_up_and_no_more(homelab, fresh_vault):
    root = fresh_vault.client()
    deployer_hcl = (get_settings().root / "policies" / "vault" / "deployer.hcl").read_text()
    root.sys.create_or_update_acl_policy(name="deployer", policy=deployer_hcl)
    token = root.auth.token.create(policies=["deployer"], no_default_policy=True, ttl="1h")["auth"]["client_token"]

    def deployer() -> hvac.Client:
        return fresh_vault.client(token)

    provider = VaultSecretsProvider(deployer)
    props = {"fleet": "homelab", **vault_spec(homelab, "secret")}
    values = provider.create(props).outs["values"]  # enables AppRole, writes secrets, policies and roles
    assert kv_paths(root) == set(values)
    assert approles(root) == set(props["roles"])
    assert issue_secret_id(deployer(), homelab, "core-1")  # the configuration run's step, same token
    smaller = {**props, "roles": {k: v for k, v in props["roles"].items() if k != "primespark-homelab-ops-1"}}
    provider.update("id", props, smaller)
    assert "primespark-homelab-ops-1" not in approles(root)
    provider.delete("id", smaller)
    assert kv_paths(root) == set() and acl_policies(root) == {"deployer"}

    # What it cannot: widen its own policy, write another policy, or touch secrets outside primespark/.
    with pytest.raises(hvac.exceptions.Forbidden):
        deployer().sys.create_or_update_acl_policy(name="deployer", policy='path "*" { capabilities = ["sudo"] }')
    with pytest.raises(hvac.exceptions.Forbidden):
        deployer().sys.create_or_update_acl_policy(name="admin", policy='path "*" { capabilities = ["read"] }')
    root.secrets.kv.v2.create_or_update_secret(path="other-app/db", secret={"password": "x"}, mount_point="secret")
    with pytest.raises(hvac.exceptions.Forbidden):
        kv_data(deployer(), "other-app/db")
    with pytest.raises(hvac.exceptions.Forbidden):
        deployer().sys.enable_auth_method(method_type="userpass")
