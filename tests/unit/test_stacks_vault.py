"""VaultSecrets: per-host least-privilege HCL from the fleet, and the hvac provider's idempotent create/update/delete.

There is no Vault server here, so the provider runs against `MemoryVault`, an in-memory stand-in for the few
hvac calls it makes (KV v2 read/write/delete, ACL policies, AppRole). It checks our logic, not Vault's.
"""

from __future__ import annotations

import hvac
import pytest

from primespark.cloud.catalog import readable_services
from primespark.cloud.vault import VaultSecretsProvider, host_policy, issue_secret_id, vault_spec
from primespark.fleet import load_fleet


class MemoryVault:
    def __init__(self) -> None:
        self.kv: dict[str, dict[str, str]] = {}
        self.policies: dict[str, str] = {}
        self.roles: dict[str, dict] = {}
        self.auth: dict[str, dict] = {"token/": {}}
        self.writes = 0
        self.issued: list = []
        outer = self

        class KV:
            def read_secret_version(self, path, mount_point, raise_on_deleted_version):
                if path not in outer.kv:
                    raise hvac.exceptions.InvalidPath(f"no secret at {path}")
                return {"data": {"data": dict(outer.kv[path])}}

            def create_or_update_secret(self, path, secret, mount_point):
                outer.writes += 1
                outer.kv[path] = dict(secret)

            def delete_metadata_and_all_versions(self, path, mount_point):
                if path not in outer.kv:
                    raise hvac.exceptions.InvalidPath(path)
                del outer.kv[path]

        class Sys:
            def list_auth_methods(self):
                return dict(outer.auth)

            def enable_auth_method(self, method_type):
                outer.auth[f"{method_type}/"] = {}

            def create_or_update_policy(self, name, policy):
                outer.policies[name] = policy

            def delete_policy(self, name):
                if name not in outer.policies:
                    raise hvac.exceptions.InvalidPath(name)
                del outer.policies[name]

        class AppRole:
            def create_or_update_approle(self, role_name, **kwargs):
                outer.roles.setdefault(role_name, {}).update(kwargs)

            def update_role_id(self, role_name, role_id):
                outer.roles[role_name]["role_id"] = role_id

            def generate_secret_id(self, role_name, metadata=None):
                outer.issued.append((role_name, metadata))
                return {"data": {"secret_id": f"sid-{len(outer.issued)}", "secret_id_accessor": "acc"}}

            def delete_role(self, role_name):
                if role_name not in outer.roles:
                    raise hvac.exceptions.InvalidPath(role_name)
                del outer.roles[role_name]

        self.secrets = type("S", (), {"kv": type("K", (), {"v2": KV()})()})()
        self.sys = Sys()
        self.auth_api = AppRole()
        self.auth_ns = type("A", (), {"approle": self.auth_api})()

    def client(self):
        return type("Client", (), {"secrets": self.secrets, "sys": self.sys, "auth": self.auth_ns})()


@pytest.fixture
def homelab():
    return load_fleet("homelab")


def test_host_policy_is_least_privilege_from_the_fleet(homelab):
    hcl = host_policy(homelab, "core-1", "secret")
    assert 'path "secret/data/primespark/homelab/services/redis"' in hcl
    assert 'path "secret/data/primespark/homelab/services/timescaledb"' in hcl  # the API needs it
    assert "grafana" not in hcl and "mlflow" not in hcl and '"*"' not in hcl
    assert hcl.count('capabilities = ["read"]') == len(readable_services(homelab, "core-1")) + 1
    assert readable_services(homelab, "stream-1") == []  # Kafka has no generated secret
    spec = vault_spec(homelab, "secret")
    assert set(spec["roles"]) == {f"primespark-homelab-{h}" for h in ("core-1", "stream-1", "analytics-1", "ops-1")}


def test_create_update_delete_are_idempotent(homelab):
    vault = MemoryVault()
    provider = VaultSecretsProvider(vault.client)
    props = {"fleet": "homelab", **vault_spec(homelab, "secret")}
    created = provider.create(props)
    values = created.outs["values"]
    assert set(values) == set(vault.kv) and all(len(v) >= 32 for d in values.values() for v in d.values())
    assert vault.roles["primespark-homelab-core-1"]["role_id"] == "primespark-homelab-core-1"
    assert vault.policies["primespark-homelab-core-1"] == props["roles"]["primespark-homelab-core-1"]["policy"]
    writes = vault.writes

    again = provider.update("id", props, props)  # nothing changed: the same values, no KV writes
    assert again.outs["values"] == values and vault.writes == writes
    assert provider.diff("id", props, props).changes is False

    smaller = {**props, "secrets": {k: v for k, v in props["secrets"].items() if "grafana" not in k},
               "roles": {k: v for k, v in props["roles"].items() if k != "primespark-homelab-ops-1"}}
    assert provider.diff("id", props, smaller).changes is True
    provider.update("id", props, smaller)
    assert not any("grafana" in path for path in vault.kv)
    assert "primespark-homelab-ops-1" not in vault.roles and "primespark-homelab-ops-1" not in vault.policies
    assert vault.kv["primespark/homelab/services/redis"] == values["primespark/homelab/services/redis"]

    provider.delete("id", smaller)
    provider.delete("id", smaller)  # twice: already gone is fine
    assert vault.kv == {} and vault.roles == {} and vault.policies == {}


def test_secret_ids_are_issued_per_service_host(homelab):
    vault = MemoryVault()
    assert issue_secret_id(vault.client(), homelab, "core-1") == "sid-1"
    assert vault.issued == [("primespark-homelab-core-1", {"host": "core-1", "fleet": "homelab"})]
    with pytest.raises(ValueError, match="no AppRole"):
        issue_secret_id(vault.client(), homelab, "pi-1")
