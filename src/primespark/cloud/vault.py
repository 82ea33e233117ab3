"""The `VaultSecrets` Pulumi dynamic provider: applies a fleet's Vault spec (`cloud/vault_spec.py`: KV v2
secrets per service, one ACL policy and one AppRole per host that runs services) with hvac; create, update and
delete are idempotent."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from pulumi.dynamic import CreateResult, DiffResult, ResourceProvider, UpdateResult

from primespark.cloud.vault_spec import (
    apply_spec,
    delete_role,
    generate_values,
    host_policy,
    issue_secret_id,
    policies_dir,
    vault_spec,
)

__all__ = ["PKI_TYPE_TOKEN", "TYPE_TOKEN", "FleetPkiProvider", "VaultSecretsProvider", "generate_values",
           "host_policy", "issue_secret_id", "policies_dir", "vault_spec"]

TYPE_TOKEN = "pulumi-python:dynamic/vault:Secrets"


def _client() -> Any:
    import hvac

    address, token = os.environ.get("VAULT_ADDR"), os.environ.get("VAULT_TOKEN")
    if not address or not token:
        raise RuntimeError("VaultSecrets needs VAULT_ADDR and VAULT_TOKEN in the environment of `spark up` "
                           "(a token with policies/vault/deployer.hcl)")
    return hvac.Client(url=address, token=token)


class VaultSecretsProvider(ResourceProvider):
    """hvac against the Vault in VAULT_ADDR. `client_factory` lets tests pass a client of their own."""

    def __init__(self, client_factory: Any = None) -> None:
        self.client_factory = client_factory

    def _vault(self) -> Any:
        return (self.client_factory or _client)()

    def _apply(self, spec: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
        return {**spec, "values": apply_spec(self._vault(), spec, old)}

    def create(self, props: dict[str, Any]) -> CreateResult:
        outputs = self._apply(_spec(props), None)
        return CreateResult(id_=f"primespark-vault-{props['fleet']}", outs={**props, **outputs})

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        changed = _spec(olds) != _spec(news) or olds.get("fleet") != news.get("fleet")
        return DiffResult(changes=changed, replaces=["fleet"] if olds.get("fleet") != news.get("fleet") else [])

    def update(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        return UpdateResult(outs={**news, **self._apply(_spec(news), _spec(olds))})

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        import hvac

        client = self._vault()
        spec = _spec(props)
        for path in spec["secrets"]:
            with contextlib.suppress(hvac.exceptions.InvalidPath):
                client.secrets.kv.v2.delete_metadata_and_all_versions(path=path, mount_point=spec["mount"])
        for role in spec["roles"]:
            delete_role(client, role)


def _spec(props: dict[str, Any]) -> dict[str, Any]:
    return {"mount": props["mount"], "secrets": props["secrets"], "roles": props["roles"]}


PKI_TYPE_TOKEN = "pulumi-python:dynamic/vault:Pki"


class FleetPkiProvider(ResourceProvider):
    """The fleet CA (primespark.pki) in the Vault of VAULT_ADDR: the plan's mount, CA (made once, never rotated by
    an update), hosts' PKI roles, policies and AppRoles. The same `apply_pki` as `spark lab up`."""

    def __init__(self, client_factory: Any = None) -> None:
        self.client_factory = client_factory

    def _apply(self, props: dict[str, Any]) -> dict[str, Any]:
        from primespark.pki import PkiPlan, apply_pki, ca_certificate

        client = (self.client_factory or _client)()
        plan = PkiPlan.from_props(props["plan"])
        apply_pki(client, plan)
        return {**props, "ca": ca_certificate(client, plan.mount)}  # the CA certificate: public

    def create(self, props: dict[str, Any]) -> CreateResult:
        return CreateResult(id_=f"primespark-pki-{props['fleet']}", outs=self._apply(props))

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        moved = olds.get("fleet") != news.get("fleet")
        return DiffResult(changes=moved or olds.get("plan") != news.get("plan"), replaces=["fleet"] if moved else [])

    def update(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        return UpdateResult(outs=self._apply(news))

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        from primespark.pki import PkiPlan, delete_pki

        delete_pki((self.client_factory or _client)(), PkiPlan.from_props(props["plan"]))
