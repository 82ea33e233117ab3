"""A worker's access to Vault (or OpenBao): one AppRole per site's worker, its ACL policy granting read on exactly
the secrets its pool's deployments open (`placement.worker_repositories`); a token of the edge worker gets 403
on a cloud repository's password. The role-id is the role's name (not a secret); the secret-id is made once
in the controller's store and registered with the role, so applying it again changes nothing."""

from __future__ import annotations

import secrets as pysecrets
from pathlib import Path
from typing import Any

import jinja2

from primespark.context import FleetContext
from primespark.errors import UserError
from primespark.orchestration.placement import worker_repositories
from primespark.secrets import Reference, SecretError, VaultSecretStore, ensure_reference


def role_name(fleet_name: str, site: str) -> str:
    return f"primespark-{fleet_name}-worker-{site}"


def secret_id_reference(site: str) -> str:
    return f"local:orchestration/workers/{site}/vault-secret-id"


def secret_paths(ctx: FleetContext, site: str) -> list[tuple[str, str]]:
    """(mount, path) of every KV v2 secret the site's worker reads: its repositories' passwords, where their
    references point (a `local:` one in the environment's own folder of the Vault store)."""
    backup = ctx.fleet.backup
    paths = []
    for name in worker_repositories(ctx.fleet, site):
        assert backup is not None
        ref = Reference.parse(backup.repositories[name].password)
        if ref.kind == "vault":
            paths.append((ref.mount, ref.path))
        else:
            spec = ctx.fleet.secrets
            paths.append((spec.mount, f"{spec.prefix}/{ctx.env}/{ref.path}"))
    from primespark.audit.log import KEY_REFERENCE  # its audit records HMAC secrets with the fleet's key

    spec = ctx.fleet.secrets
    paths.append((spec.mount, f"{spec.prefix}/{ctx.env}/{Reference.parse(KEY_REFERENCE).path}"))
    return sorted(set(paths))


def worker_policy(ctx: FleetContext, site: str, root: Path | None = None) -> str:
    folder = root or ctx.settings.root / "policies" / "vault"
    from primespark.audit.checkpoints import transit_key_name

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(folder),  # noqa: S701 HCL, not HTML
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.get_template("worker.hcl.j2").render(fleet=ctx.fleet.name, site=site, paths=secret_paths(ctx, site),
                                                    audit_key=transit_key_name(ctx.fleet.name))


def _vault_of(ctx: FleetContext) -> VaultSecretStore:
    store = ctx.secrets
    if not isinstance(store, VaultSecretStore):
        raise UserError(f"the {ctx.env} secret store is not Vault, so its workers get no AppRole",
                        "add `secrets: {backend: vault, address: https://<vault>:8200}` to the fleet file, and log in "
                        "with a deployer token (VAULT_TOKEN)")
    return store


def registered_secret_id(client: Any, role: str, secret_id: str) -> bool:
    import hvac.exceptions

    try:
        found = client.auth.approle.read_secret_id(role_name=role, secret_id=secret_id)
    except hvac.exceptions.InvalidPath:
        return False
    return isinstance(found, dict) and bool(found.get("data"))


def ensure_worker_access(ctx: FleetContext, site: str) -> dict[str, str]:
    """The site worker's policy and AppRole in the environment's Vault, and its credentials (role-id, secret-id)."""
    import hvac.exceptions

    store = _vault_of(ctx)
    client = store.client
    role = role_name(ctx.fleet.name, site)
    secret_id = ensure_reference(secret_id_reference(site), store, lambda: pysecrets.token_hex(18))
    from primespark.audit.checkpoints import TransitSigner, transit_key_name
    from primespark.audit.log import audit_key

    audit_key(ctx)  # made here if it is not yet: the worker's policy reads it, its store cannot make it
    TransitSigner(client, transit_key_name(ctx.fleet.name)).ensure_key()  # its checkpoints' signing key
    try:
        client.sys.create_or_update_acl_policy(name=role, policy=worker_policy(ctx, site))
        if "approle/" not in client.sys.list_auth_methods():
            client.sys.enable_auth_method(method_type="approle")
        durations = {"token_ttl": "1h", "token_max_ttl": "4h", "secret_id_ttl": "0"}  # a token per flow run
        client.auth.approle.create_or_update_approle(role_name=role, token_policies=[role], **durations)
        client.auth.approle.update_role_id(role_name=role, role_id=role)
        if not registered_secret_id(client, role, secret_id):
            client.auth.approle.create_custom_secret_id(role_name=role, secret_id=secret_id,
                                                        metadata={"site": site, "fleet": ctx.fleet.name})
    except hvac.exceptions.Forbidden:
        raise SecretError(f"Vault at {store.addr} refused to set up the {site} worker's AppRole {role}",
                          "use a token with policies/vault/deployer.hcl (it may manage primespark-* roles)") from None
    return {"addr": store.addr, "mount": store.mount, "prefix": ctx.fleet.secrets.prefix, "role_id": role,
            "secret_id": secret_id}


def approle_token(addr: str, role_id: str, secret_id: str) -> str:
    """Log in as a worker (what its flows do when they build their secret store)."""
    import hvac
    import hvac.exceptions
    import requests

    try:
        reply = hvac.Client(url=addr).auth.approle.login(role_id=role_id, secret_id=secret_id)
    except hvac.exceptions.VaultError as exc:
        raise SecretError(f"Vault at {addr} refused the AppRole login of {role_id}: {exc}",
                          "apply site.yml's prefect_worker play again (it registers the worker's secret-id)") from None
    except requests.exceptions.RequestException as exc:
        raise SecretError(f"secret store unreachable: no answer from Vault at {addr} ({type(exc).__name__})",
                          "check that the server runs and the worker reaches it") from None
    return str(reply["auth"]["client_token"])
