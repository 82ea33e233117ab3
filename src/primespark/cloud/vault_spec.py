"""What Vault holds for a fleet, as plain data, and how it is applied with hvac: KV v2 secrets per service
(generated once, kept on update), one ACL policy and one AppRole per host that runs services.

No Pulumi here: `spark up` applies it through the `VaultSecrets` dynamic provider (`cloud/vault.py`), `spark lab
up` straight into the lab's OpenBao."""

from __future__ import annotations

import contextlib
import secrets as pysecrets
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from primespark.cloud.catalog import RECIPES, readable_services, secret_path
from primespark.cloud.services import role_name
from primespark.fleet.model import Fleet

SECRET_BYTES = 24  # token_urlsafe(24): 32 characters, 192 bits


def policies_dir() -> Path:
    from primespark.settings import get_settings

    return get_settings().root / "policies" / "vault"


@lru_cache(maxsize=4)
def hcl_templates(root: Path) -> jinja2.Environment:
    """The policy templates of `root` (policies/vault): the service hosts' here, the TLS hosts' in primespark.pki."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader(root),  # noqa: S701 HCL, not HTML
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def host_policy(fleet: Fleet, host: str, mount: str, root: Path | None = None) -> str:
    env = hcl_templates(root or policies_dir())
    paths = [secret_path(fleet, name) for name in readable_services(fleet, host)]
    return env.get_template("host.hcl.j2").render(fleet=fleet.name, host=host, mount=mount, paths=paths)


def vault_spec(fleet: Fleet, mount: str) -> dict[str, Any]:
    """What Vault should hold for the fleet: JSON-friendly, so it can be a Pulumi resource's inputs."""
    services = {secret_path(fleet, name): sorted(RECIPES[svc.kind].secrets)
                for name, svc in sorted(fleet.services.items()) if RECIPES[svc.kind].secrets}
    hosts = sorted({svc.host for svc in fleet.services.values()})
    roles = {role_name(fleet, host): {"policy": host_policy(fleet, host, mount)} for host in hosts}
    return {"mount": mount, "secrets": services, "roles": roles}


def generate_values(spec: dict[str, Any],
                    existing: dict[str, dict[str, str]] | None = None) -> dict[str, dict[str, str]]:
    """A value for every secret key; keys that already have one keep it (idempotent re-runs, no rotation)."""
    existing = existing or {}
    return {path: {key: existing.get(path, {}).get(key) or pysecrets.token_urlsafe(SECRET_BYTES) for key in keys}
            for path, keys in spec["secrets"].items()}


def _read(client: Any, mount: str, path: str) -> dict[str, str]:
    import hvac

    try:
        response = client.secrets.kv.v2.read_secret_version(path=path, mount_point=mount,
                                                             raise_on_deleted_version=True)
    except hvac.exceptions.InvalidPath:
        return {}
    return dict(response["data"]["data"])


def apply_spec(client: Any, spec: dict[str, Any], old: dict[str, Any] | None = None) -> dict[str, dict[str, str]]:
    """Make Vault hold `spec` (what `old` had and `spec` lacks goes); the secrets' values, existing ones kept."""
    mount = spec["mount"]
    current = {path: _read(client, mount, path) for path in spec["secrets"]}
    values = generate_values(spec, current)
    for path, data in values.items():
        if data != current[path]:
            client.secrets.kv.v2.create_or_update_secret(path=path, secret=data, mount_point=mount)
    if "approle/" not in client.sys.list_auth_methods():
        client.sys.enable_auth_method(method_type="approle")
    for role, role_spec in spec["roles"].items():
        client.sys.create_or_update_acl_policy(name=role, policy=role_spec["policy"])
        client.auth.approle.create_or_update_approle(
            role_name=role, token_policies=[role], token_ttl="1h", token_max_ttl="4h",  # noqa: S106 durations
            secret_id_ttl="0")  # noqa: S106
        client.auth.approle.update_role_id(role_name=role, role_id=role)  # the role-id is not a secret
    if old:
        for path in set(old.get("secrets", {})) - set(spec["secrets"]):
            client.secrets.kv.v2.delete_metadata_and_all_versions(path=path, mount_point=old["mount"])
        for role in set(old.get("roles", {})) - set(spec["roles"]):
            delete_role(client, role)
    return values


def delete_role(client: Any, role: str) -> None:
    import hvac

    for delete in (lambda: client.auth.approle.delete_role(role_name=role),
                   lambda: client.sys.delete_acl_policy(name=role)):
        with contextlib.suppress(hvac.exceptions.InvalidPath):  # already gone: deleting twice is fine
            delete()


def issue_secret_id(client: Any, fleet: Fleet, host: str) -> str:
    """A fresh AppRole secret-id for `host`, for the configuration run to place at the VM's secret-id file
    (0400, over SSH). It never goes into user-data, outputs or the Pulumi state."""
    if not fleet.services_on(host):
        raise ValueError(f"{host} runs no services and has no AppRole")
    response = client.auth.approle.generate_secret_id(role_name=role_name(fleet, host),
                                                      metadata={"host": host, "fleet": fleet.name})
    return str(response["data"]["secret_id"])
