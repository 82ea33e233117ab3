"""`spark preview | up | destroy`: the Pulumi Automation API with a local file backend and the policy pack."""

from __future__ import annotations

import hashlib
import secrets as pysecrets
import shutil
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from primespark.errors import UserError
from primespark.fleet import Fleet
from primespark.secrets import atomic_write, store_for
from primespark.settings import get_settings, settings_for

PASSPHRASE_KEY = "pulumi/passphrase"
INSTALL_HINT = ("install the Pulumi CLI (curl -fsSL https://get.pulumi.com | sh, or see "
                "https://www.pulumi.com/docs/iac/download-install/) and put it on PATH; "
                "`spark plan ENV` works without it")


def require_cli() -> str:
    found = shutil.which("pulumi")
    if found is None:
        raise UserError("the `pulumi` CLI is not installed: preview, up and destroy drive it", INSTALL_HINT)
    return found


def backend_url(env: str) -> str:
    folder = get_settings().state_dir(env) / "pulumi"
    folder.mkdir(mode=0o700, exist_ok=True)
    return f"file://{folder}"


def _passphrase(env: str) -> str:
    """The file backend encrypts stack secrets with a passphrase: made once, kept in the secret store."""
    from primespark.fleet import load_fleet

    store = store_for(load_fleet(env), env, settings_for(env))
    if not store.exists(PASSPHRASE_KEY):
        store.put(PASSPHRASE_KEY, pysecrets.token_urlsafe(32))
    return store.get(PASSPHRASE_KEY)


def ensure_images(fleet: Fleet, cache: Path) -> None:
    """Download each base image once and keep it only if its sha256 matches the fleet (copy, verify, rename)."""
    for name, image in fleet.images.items():
        target = cache / f"{image.sha256}.qcow2"
        if target.is_file():
            continue
        cache.mkdir(parents=True, exist_ok=True)
        partial = cache / f".{image.sha256}.part"
        digest = hashlib.sha256()
        with urllib.request.urlopen(image.url) as response, partial.open("wb") as out:  # noqa: S310 fleet URL
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != image.sha256:
            partial.unlink(missing_ok=True)
            raise UserError(f"image {name}: {image.url} has sha256 {digest.hexdigest()}, the fleet pins {image.sha256}",
                            "download it yourself, check it, and put its sha256 into the fleet's images section")
        partial.rename(target)


def stack_for(env: str, on_output: Callable[[str], Any]) -> Any:
    require_cli()
    from pulumi import automation as auto

    root = get_settings().root
    workspace = auto.LocalWorkspaceOptions(
        work_dir=str(root),
        env_vars={"PULUMI_BACKEND_URL": backend_url(env), "PULUMI_CONFIG_PASSPHRASE": _passphrase(env),
                  "PULUMI_SKIP_UPDATE_CHECK": "true"},
    )
    try:
        return auto.create_or_select_stack(stack_name=env, work_dir=str(root), opts=workspace)
    except auto.errors.CommandError as exc:
        raise UserError(f"pulumi could not open stack {env}: {str(exc).strip()[-400:]}",
                        f"check Pulumi.{env}.yaml and the backend in {backend_url(env)}") from None


def stack_resources(env: str) -> list[tuple[str, str]]:
    """(type, name) of every resource the stack holds (its providers and the stack itself aside)."""
    deployment = stack_for(env, print).export_stack().deployment or {}
    out = []
    for resource in deployment.get("resources") or []:
        kind = str(resource.get("type", ""))
        if kind == "pulumi:pulumi:Stack" or kind.startswith("pulumi:providers:"):
            continue
        out.append((kind, str(resource.get("urn", "")).rsplit("::", 1)[-1]))
    return out


def run(action: str, env: str, on_output: Callable[[str], Any] = print) -> Any:
    from pulumi import automation as auto

    stack = stack_for(env, on_output)
    packs = [str(get_settings().root / "policies")]
    try:
        if action == "preview":
            return stack.preview(policy_packs=packs, on_output=on_output)
        if action == "up":
            return stack.up(policy_packs=packs, on_output=on_output)
        if action == "destroy":
            return stack.destroy(on_output=on_output)
    except auto.errors.CommandError as exc:
        raise UserError(f"pulumi {action} {env} failed (see the output above)", "fix what it names and re-run") \
            from exc
    raise ValueError(action)


def write_outputs(env: str, outputs: dict[str, Any]) -> Path:
    """Stack outputs as JSON under the state dir, where the Ansible inventory and the flows read them."""
    import json

    path = get_settings().state_dir(env) / "stack-outputs.json"
    atomic_write(path, json.dumps(outputs, indent=2, sort_keys=True) + "\n", mode=0o600)
    return path
