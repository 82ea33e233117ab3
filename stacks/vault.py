"""`VaultSecrets`: the fleet's service secrets, per-host ACL policies and AppRoles, applied through hvac."""

from __future__ import annotations

from typing import Any

import pulumi
from pulumi.dynamic import Resource

from primespark.cloud.vault import VaultSecretsProvider, vault_spec
from primespark.fleet.model import Fleet


class VaultSecretsResource(Resource, module="vault", name="Secrets"):
    values: pulumi.Output[dict[str, dict[str, str]]]

    def __init__(self, name: str, props: dict[str, Any], opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(VaultSecretsProvider(), name, {**props, "values": None}, opts)


class VaultSecrets(pulumi.ComponentResource):
    def __init__(self, fleet: Fleet, mount: str, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("primespark:cloud:VaultSecrets", "vault", {"fleet": fleet.name, "mount": mount}, opts)
        spec = vault_spec(fleet, mount)
        self.roles = sorted(spec["roles"])
        self.secrets = VaultSecretsResource(
            "vault-secrets", {"fleet": fleet.name, **spec},
            # The generated values are Pulumi secrets: encrypted in the state, masked in any display.
            pulumi.ResourceOptions(parent=self, additional_secret_outputs=["values"]))
        self.register_outputs({"roles": self.roles})
