"""One small secret-store interface, two backends: Vault KV v2 (hvac) in production, 0600 files in the lab.

Fleet files hold references (`vault:<mount>/<path>#<key>` or `local:<path>`), never values; `resolve` turns
a reference into the value at run time.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Protocol

from primespark.settings import Settings, get_settings

_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]*$")


class SecretError(Exception):
    pass


class SecretStore(Protocol):
    def get(self, key: str) -> str: ...
    def put(self, key: str, value: str) -> None: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def exists(self, key: str) -> bool: ...


def _check_key(key: str) -> str:
    if not _KEY.match(key) or ".." in key.split("/"):
        raise SecretError(f"invalid secret key {key!r}: use letters, digits and ._-/ without '..'")
    return key


def atomic_write(path: Path, data: str | bytes, mode: int = 0o600) -> None:
    """Write via a temporary file in the same folder, fsync, rename: a crash leaves old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(raw)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LocalSecretStore:
    """Files of mode 0600 under a 0700 folder of the state directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        root.chmod(0o700)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def get(self, key: str) -> str:
        try:
            return self._path(key).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SecretError(f"secret {key!r} is not in the local store {self.root}") from None

    def put(self, key: str, value: str) -> None:
        path = self._path(key)
        for parent in reversed(path.relative_to(self.root).parents):
            (self.root / parent).mkdir(exist_ok=True, mode=0o700)
        atomic_write(path, value, 0o600)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        return sorted(
            str(p.relative_to(self.root)) for p in self.root.rglob("*")
            if p.is_file() and not p.name.startswith(".") and str(p.relative_to(self.root)).startswith(prefix)
        )


class VaultSecretStore:
    """Vault KV v2 through hvac; each key is one secret whose data holds `value`."""

    def __init__(self, addr: str, mount: str = "secret", prefix: str = "primespark", token: str | None = None) -> None:
        import hvac

        self.client = hvac.Client(url=addr, token=token or os.environ.get("VAULT_TOKEN"))
        self.mount = mount
        self.prefix = prefix.strip("/")

    def _path(self, key: str) -> str:
        return f"{self.prefix}/{_check_key(key)}" if self.prefix else _check_key(key)

    def get(self, key: str) -> str:
        import hvac.exceptions

        try:
            response = self.client.secrets.kv.v2.read_secret_version(
                path=self._path(key), mount_point=self.mount, raise_on_deleted_version=True
            )
        except hvac.exceptions.InvalidPath:
            raise SecretError(f"secret {key!r} is not in Vault at {self.mount}/{self._path(key)}") from None
        return str(response["data"]["data"]["value"])

    def put(self, key: str, value: str) -> None:
        self.client.secrets.kv.v2.create_or_update_secret(
            path=self._path(key), secret={"value": value}, mount_point=self.mount
        )

    def delete(self, key: str) -> None:
        self.client.secrets.kv.v2.delete_metadata_and_all_versions(path=self._path(key), mount_point=self.mount)

    def exists(self, key: str) -> bool:
        try:
            self.get(key)
        except SecretError:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        import hvac.exceptions

        found: list[str] = []

        def walk(sub: str) -> None:
            path = f"{self.prefix}/{sub}".strip("/")
            try:
                keys = self.client.secrets.kv.v2.list_secrets(path=path, mount_point=self.mount)["data"]["keys"]
            except hvac.exceptions.InvalidPath:
                return
            for key in keys:
                if key.endswith("/"):
                    walk(f"{sub}{key}")
                else:
                    found.append(f"{sub}{key}")

        walk("")
        return sorted(k for k in found if k.startswith(prefix))


def secret_store(env: str | None = None, settings: Settings | None = None) -> SecretStore:
    settings = settings or get_settings()
    if settings.secret_backend == "vault":
        if not settings.vault_addr:
            raise SecretError("secret_backend is vault but VAULT_ADDR is not set: export VAULT_ADDR and VAULT_TOKEN")
        prefix = f"{settings.vault_prefix}/{env or settings.env}"
        return VaultSecretStore(settings.vault_addr, settings.vault_mount, prefix)
    return LocalSecretStore(settings.state_dir(env) / "secrets")


def resolve(reference: str, store: SecretStore) -> str:
    """Resolve a fleet secret reference. `local:a/b` → key a/b; `vault:mount/path#key` → key path/key."""
    kind, _, rest = reference.partition(":")
    if kind == "local":
        return store.get(rest)
    if kind == "vault":
        path, _, field = rest.partition("#")
        return store.get(f"{path.split('/', 1)[-1]}/{field}")
    raise SecretError(f"{reference!r} is not a secret reference (vault:… or local:…)")
