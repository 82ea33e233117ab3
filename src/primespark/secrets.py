"""One small secret-store interface, two backends: Vault KV v2 (hvac; production and the lab's OpenBao), and
0600 files for fleets without Vault.

The fleet file's `secrets:` section says which (`store_for`). Fleet files hold references, never values.
`local:<key>` names a key of the environment's own store (a 0600 file, or `<mount>/<prefix>/<env>/<key>` field
`value` when the backend is Vault); `vault:<mount>/<path>#<field>` names one field of one KV v2 secret, read and
written exactly there. `read_reference`, `write_reference` and `ensure_reference` act on a reference; a missing
secret is `SecretNotFound`, anything else (Vault unreachable, sealed, a token that is expired or not allowed) a
`SecretError` that says what to do.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from primespark.errors import UserError
from primespark.fleet.model import Fleet, SecretBackend, Secrets, VaultAuth
from primespark.settings import Settings

_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]*$")


class SecretError(UserError):
    """The secret store failed or refused: the message says where, `fix` what to do."""


class SecretNotFound(SecretError):
    """The store answered: there is no such secret (the only error that may lead to creating one)."""


class SecretExists(SecretError):
    """A create-only write found a value already in place."""


class SecretStoreSealed(SecretError):
    """Vault answered that it is sealed: nothing can be read until someone unseals it."""


class SecretStoreUnreachable(SecretError):
    """Vault did not answer, or answered that it cannot serve now: worth retrying."""

    transient = True


class SecretStore(Protocol):
    def get(self, key: str) -> str: ...
    def put(self, key: str, value: str) -> None: ...
    def create(self, key: str, value: str) -> None: ...
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
            raise SecretNotFound(f"secret {key!r} is not in the local store {self.root}") from None

    def put(self, key: str, value: str) -> None:
        atomic_write(self._parent_made(key), value, 0o600)

    def create(self, key: str, value: str) -> None:
        """Write `value` only if `key` has none: a whole file appears or SecretExists (link(2) is atomic)."""
        path = self._parent_made(key)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(value.encode())
                handle.flush()
                os.fsync(handle.fileno())
            os.link(tmp, path)
        except FileExistsError:
            raise SecretExists(f"secret {key!r} is already in the local store {self.root}") from None
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _parent_made(self, key: str) -> Path:
        path = self._path(key)
        for parent in reversed(path.relative_to(self.root).parents):
            (self.root / parent).mkdir(exist_ok=True, mode=0o700)
        return path

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        return sorted(
            str(p.relative_to(self.root)) for p in self.root.rglob("*")
            if p.is_file() and not p.name.startswith(".") and str(p.relative_to(self.root)).startswith(prefix)
        )


@dataclass(frozen=True)
class VaultHints:
    """What to tell the operator when the server is sealed or down, and the local store that an environment
    moving to Vault may still hold (a key found there but not in Vault was not moved yet: never made anew)."""

    sealed: str = "unseal it (`bao operator unseal`, or `vault operator unseal`) and run again"
    unreachable: str = "check the address and that the server runs (`bao status`)"
    unmigrated: Path | None = None
    migrate: str = "move the local store into Vault with `spark secrets migrate`"


def _errors(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    return "; ".join(str(e) for e in errors) if errors else str(exc.args[0] if exc.args else exc)


class VaultSecretStore:
    """Vault (or OpenBao) KV v2 through hvac. The environment's own keys live at `<mount>/<prefix>/<key>`,
    field `value`; `read_field`/`write_field` reach any mount, path and field (what `vault:` references name).
    Every failure is a `SecretError` naming the server, the path and what to do, never an hvac traceback."""

    def __init__(self, addr: str, mount: str = "secret", prefix: str = "primespark", token: str | None = None,
                 timeout: float = 10.0, hints: VaultHints | None = None,
                 approle: tuple[str, str] | None = None) -> None:
        import hvac

        self.addr = addr.rstrip("/")
        self.hints = hints or VaultHints()
        self.mount = mount
        self.prefix = prefix.strip("/")
        # hvac falls back to VAULT_TOKEN, then the token helper's ~/.vault-token.
        self.client = hvac.Client(url=self.addr, token=token, timeout=timeout)
        if approle is not None:
            self._login(*approle)
        if not self.client.token:
            raise SecretError(f"no Vault token for {self.addr}",
                              "export VAULT_TOKEN (or `bao login`) with a token whose policy allows the fleet's paths")

    def _login(self, role_id: str, secret_id: str) -> None:
        where = f"AppRole role {role_id}"
        try:
            self._call("logging in as", where, lambda: self.client.auth.approle.login(role_id=role_id,
                                                                                       secret_id=secret_id))
        except (SecretStoreSealed, SecretStoreUnreachable):
            raise
        except SecretError as exc:
            raise SecretError(f"Vault at {self.addr} refused the login as {where}: {exc.message}",
                              "check secrets.role_id, and issue a new secret-id if this one expired or was used up "
                              "(`bao write -f auth/approle/role/<role>/secret-id`)") from None

    def _path(self, key: str) -> str:
        return f"{self.prefix}/{_check_key(key)}" if self.prefix else _check_key(key)

    # Errors -----------------------------------------------------------------------------------------------

    def _call(self, doing: str, where: str, action: Callable[[], Any]) -> Any:
        import hvac.exceptions
        import requests

        try:
            return action()
        except hvac.exceptions.InvalidPath as exc:
            if "no handler for route" in _errors(exc):  # not "no such secret": nothing may be created here
                raise SecretError(f"Vault at {self.addr} has no secrets engine at the mount of {where}",
                                  "enable a KV v2 engine there (`bao secrets enable -version=2 -path=MOUNT kv`) "
                                  "or fix the mount in the reference") from None
            raise SecretNotFound(f"no secret at {where} in Vault {self.addr}") from None
        except hvac.exceptions.Forbidden:
            raise self._denied(doing, where) from None
        except (hvac.exceptions.VaultDown, requests.exceptions.RequestException) as exc:
            raise self.unavailable(exc, doing, where) from None
        except hvac.exceptions.InvalidRequest as exc:
            if "upgrading" in _errors(exc).lower():  # a KV engine enabled a moment ago: it serves shortly
                raise SecretStoreUnreachable(f"secret store unavailable: Vault at {self.addr} answered "
                                             f"{_errors(exc)!r} while {doing} {where}", "run again") from None
            raise SecretError(f"Vault at {self.addr} refused {doing} {where}: {_errors(exc)}",
                              "check the path and the mount (`bao secrets list`)") from None
        except hvac.exceptions.VaultError as exc:
            raise SecretError(f"Vault at {self.addr} refused {doing} {where}: {_errors(exc)}",
                              "check the path and the mount (`bao secrets list`)") from None

    def unavailable(self, exc: Exception, doing: str, where: str) -> SecretError:
        """The error for a server that is sealed, cannot serve now (hvac's VaultDown), or did not answer (a
        requests error): for callers that use `client` directly (the PKI), worded as the store's own calls."""
        import hvac.exceptions

        if isinstance(exc, hvac.exceptions.VaultDown):
            answer = f"Vault at {self.addr} answered {_errors(exc)!r} while {doing} {where}"
            if "sealed" in _errors(exc).lower():
                return SecretStoreSealed(f"secret store sealed: {answer}", self.hints.sealed)
            return SecretStoreUnreachable(f"secret store unavailable: {answer}", self.hints.unreachable)
        return SecretStoreUnreachable(f"secret store unreachable: no answer from Vault at {self.addr} while {doing} "
                                      f"{where} ({type(exc).__name__})", self.hints.unreachable)

    def _denied(self, doing: str, where: str) -> SecretError:
        """A 403 is either a token Vault no longer honours or a policy that lacks the path: ask which."""
        import hvac.exceptions
        import requests

        try:
            info = self.client.auth.token.lookup_self()["data"]
        except (hvac.exceptions.VaultError, requests.exceptions.RequestException):
            return SecretError(f"Vault at {self.addr} refused the token while {doing} {where}: it is expired, "
                               "revoked or unknown to this server",
                               "log in again (`bao login`, or a new AppRole login) and export VAULT_TOKEN")
        policies = ", ".join(info.get("policies") or []) or "none"
        return SecretError(f"permission denied (403) {doing} {where}: the token's policies ({policies}) do not "
                           "allow it", "add the path to one of the token's policies (policies/vault/ has the "
                           "project's), or use a token that has it")

    # Fields of KV v2 secrets --------------------------------------------------------------------------------

    def _current(self, mount: str, path: str, where: str) -> tuple[dict[str, Any], int]:
        """The secret's data (empty if none or deleted) and its current version (0: never written)."""
        kv = self.client.secrets.kv.v2
        for _ in range(5):
            try:  # a soft-deleted version answers with its metadata and no data
                response = self._call("reading", where, lambda: kv.read_secret_version(
                    path=path, mount_point=mount, raise_on_deleted_version=False))
            except SecretNotFound:
                try:  # a destroyed version has metadata only
                    meta = self._call("reading", where, lambda: kv.read_secret_metadata(path=path,
                                                                                         mount_point=mount))
                except SecretNotFound:
                    return {}, 0
                current = int(meta["data"]["current_version"])
                state = meta["data"]["versions"].get(str(current), {})
                if state.get("destroyed") or state.get("deletion_time"):
                    return {}, current
                continue  # a version was written between the two reads: read it
            return dict(response["data"]["data"] or {}), int(response["data"]["metadata"]["version"])
        raise SecretError(f"{where} in Vault {self.addr} kept changing while being read", "run again")

    def read_field(self, mount: str, path: str, field: str) -> str:
        where = f"{mount}/{path}#{field}"
        data, _ = self._current(mount, path, where)
        if field not in data:
            raise SecretNotFound(f"no secret at {where} in Vault {self.addr}")
        return str(data[field])

    def write_field(self, mount: str, path: str, field: str, value: str, replace: bool = True) -> None:
        """Set one field, keeping the secret's other fields, as a new version. Check-and-set on the version
        read, so a concurrent writer is never overwritten; `replace=False` refuses to change a field that has
        a value (SecretExists)."""
        import hvac.exceptions

        where = f"{mount}/{path}#{field}"
        kv = self.client.secrets.kv.v2
        for _ in range(5):
            data, version = self._current(mount, path, where)
            if field in data and not replace:
                raise SecretExists(f"{where} in Vault {self.addr} already has a value")

            def write(data: dict[str, Any] = data, version: int = version) -> bool:
                try:
                    kv.create_or_update_secret(path=path, secret={**data, field: value}, cas=version,
                                               mount_point=mount)
                except hvac.exceptions.InvalidRequest as exc:
                    if "check-and-set" in _errors(exc):
                        return False  # someone wrote in between: read again
                    raise
                return True

            if self._call("writing", where, write):
                return
        raise SecretError(f"{where} in Vault {self.addr} kept changing while being written",
                          "run again once the other writer is done")

    def delete_field(self, mount: str, path: str, field: str) -> None:
        where = f"{mount}/{path}#{field}"
        data, version = self._current(mount, path, where)
        if field not in data:
            return
        rest = {k: v for k, v in data.items() if k != field}
        kv = self.client.secrets.kv.v2
        if rest:
            self._call("writing", where, lambda: kv.create_or_update_secret(
                path=path, secret=rest, cas=version, mount_point=mount))
        else:
            self._call("deleting", where, lambda: kv.delete_metadata_and_all_versions(path=path, mount_point=mount))

    # The environment's own store (SecretStore) ----------------------------------------------------------------

    def get(self, key: str) -> str:
        try:
            return self.read_field(self.mount, self._path(key), "value")
        except SecretNotFound:
            where = f"{self.mount}/{self._path(key)}"
            leftover = self.hints.unmigrated
            if leftover is not None and (leftover / key).is_file():
                raise SecretError(f"secret {key!r} is still in the local store {leftover}, not in Vault {self.addr} "
                                  f"at {where}", self.hints.migrate) from None
            raise SecretNotFound(f"secret {key!r} is not in Vault {self.addr} at {where}") from None

    def put(self, key: str, value: str) -> None:
        path = self._path(key)
        self._call("writing", f"{self.mount}/{path}", lambda: self.client.secrets.kv.v2.create_or_update_secret(
            path=path, secret={"value": value}, mount_point=self.mount))

    def create(self, key: str, value: str) -> None:
        self.write_field(self.mount, self._path(key), "value", value, replace=False)

    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(SecretNotFound):
            self._call("deleting", f"{self.mount}/{path}", lambda: self.client.secrets.kv.v2
                       .delete_metadata_and_all_versions(path=path, mount_point=self.mount))

    def exists(self, key: str) -> bool:
        try:
            self.get(key)
        except SecretNotFound:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        found: list[str] = []
        kv = self.client.secrets.kv.v2

        def walk(sub: str) -> None:
            path = f"{self.prefix}/{sub}".strip("/")
            try:
                keys = self._call("listing", f"{self.mount}/{path}/",
                                  lambda: kv.list_secrets(path=path, mount_point=self.mount))["data"]["keys"]
            except SecretNotFound:
                return
            for key in keys:
                if key.endswith("/"):
                    walk(f"{sub}{key}")
                else:
                    found.append(f"{sub}{key}")

        walk("")
        return sorted(k for k in found if k.startswith(prefix))


# References ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """A parsed fleet secret reference: `local:<key>`, or `vault:<mount>/<path>#<field>`."""

    kind: Literal["local", "vault"]
    path: str  # local: the store key; vault: the secret's path inside its mount
    mount: str = ""
    field: str = ""

    @classmethod
    def parse(cls, text: str) -> Reference:
        kind, _, rest = text.partition(":")
        if kind == "local":
            return cls("local", _check_key(rest))
        if kind == "vault":
            location, _, field = rest.partition("#")
            mount, _, path = location.partition("/")
            if not (mount and path and field):
                raise SecretError(f"{text!r} is not a Vault reference",
                                  "write vault:<mount>/<path>#<field>, e.g. vault:secret/primespark/restic#nas-primary")
            _check_key(mount)
            _check_key(path)
            _check_key(field)
            return cls("vault", path.strip("/"), mount, field)
        raise SecretError(f"{text!r} is not a secret reference", "write vault:<mount>/<path>#<field> or local:<key>")

    def __str__(self) -> str:
        return f"vault:{self.mount}/{self.path}#{self.field}" if self.kind == "vault" else f"local:{self.path}"


def _vault_for(reference: Reference, store: SecretStore) -> VaultSecretStore | ReadOnlyStore:
    inner = store.store if isinstance(store, ReadOnlyStore) else store
    if isinstance(inner, VaultSecretStore):
        return store if isinstance(store, ReadOnlyStore) else inner  # a read-only store refuses write_field
    where = getattr(inner, "root", "")
    raise SecretError(f"{reference} is in Vault, but this environment's secret store is local ({where})",
                      "add `secrets: {backend: vault, address: https://<vault>:8200}` to the fleet file, "
                      "or use a local: reference")


def _parsed(reference: str | Reference) -> Reference:
    return reference if isinstance(reference, Reference) else Reference.parse(reference)


def read_reference(reference: str | Reference, store: SecretStore) -> str:
    """The value a reference names: a `local:` key of `store`, or exactly the mount, path and field of a
    `vault:` reference. SecretNotFound if there is none; any other SecretError if the store failed."""
    ref = _parsed(reference)
    if ref.kind == "local":
        return store.get(ref.path)
    return _vault_for(ref, store).read_field(ref.mount, ref.path, ref.field)


def write_reference(reference: str | Reference, value: str, store: SecretStore, replace: bool = False) -> None:
    """Store `value` where the reference points. By default only where there is no value yet (SecretExists
    otherwise): a secret that a repository or a host depends on is never silently replaced."""
    ref = _parsed(reference)
    if ref.kind == "local":
        (store.put if replace else store.create)(ref.path, value)
    else:
        _vault_for(ref, store).write_field(ref.mount, ref.path, ref.field, value, replace=replace)


def ensure_reference(reference: str | Reference, store: SecretStore, make: Callable[[], str]) -> str:
    """The reference's value, created with `make()` if (and only if) the store says there is none. Two runs
    at once agree on one value: the second one's create-only write fails and it reads the first one's."""
    try:
        return read_reference(reference, store)
    except SecretNotFound:
        pass
    value = make()
    try:
        write_reference(reference, value, store)
    except SecretExists:
        return read_reference(reference, store)
    return value


@dataclass(frozen=True)
class Migrated:
    key: str
    status: Literal["would move", "moved", "already there", "conflict"]
    removed_local: bool = False


def migrate(source: SecretStore, target: SecretStore, dry_run: bool = False,
            remove_local: bool = False) -> list[Migrated]:
    """Copy every key of `source` to the same key of `target`, create-only (a different value already there is a
    conflict, never overwritten), each copy verified by reading it back. With `remove_local` the source's copy
    goes, only once the target is verified to hold the same value. Safe to run again."""
    done: list[Migrated] = []
    for key in source.list():
        value = source.get(key)
        try:
            present: str | None = target.get(key)
        except SecretNotFound:
            present = None
        if present is not None and present != value:
            done.append(Migrated(key, "conflict"))
            continue
        if dry_run:
            done.append(Migrated(key, "would move" if present is None else "already there"))
            continue
        if present is None:
            # Written by someone else since we looked: judged below on what is there now.
            with contextlib.suppress(SecretExists):
                target.create(key, value)
        if target.get(key) != value:
            done.append(Migrated(key, "conflict"))
            continue
        if remove_local:
            source.delete(key)
        done.append(Migrated(key, "moved" if present is None else "already there", remove_local))
    return done


# Which store an environment uses ------------------------------------------------------------------------------


def store_for(fleet: Fleet, env: str, settings: Settings) -> SecretStore:
    """The environment's secret store, as the fleet file's `secrets:` section says: 0600 files under the state
    directory, or Vault (the lab's own OpenBao with `auth: lab`). On a site's worker (the prefect_worker role
    sets SPARK_SECRET_READ_ONLY, and with Vault its own AppRole) the store only reads."""
    store: SecretStore
    if fleet.secrets.backend is SecretBackend.vault:
        worker = settings.vault_role_id is not None
        store = worker_vault_store(fleet, env, settings) if worker else vault_store(fleet, env, settings)
    else:
        _refuse_other_settings(fleet.secrets, env, settings)
        store = LocalSecretStore(settings.state_dir(env) / "secrets")
    return ReadOnlyStore(store) if settings.secret_read_only else store


def worker_vault_store(fleet: Fleet, env: str, settings: Settings) -> VaultSecretStore:
    """A worker's Vault: the address it reaches (VAULT_ADDR from its env file, else the fleet's), logged in with
    its site's AppRole, whose policy grants exactly the secrets its deployments open."""
    spec = fleet.secrets
    address = settings.vault_addr or spec.address
    if address is None or settings.vault_role_id is None or settings.vault_secret_id_file is None:
        raise SecretError("a worker's Vault login needs VAULT_ADDR, SPARK_VAULT_ROLE_ID and "
                          "SPARK_VAULT_SECRET_ID_FILE", "apply site.yml's prefect_worker play to this host again")
    try:
        secret_id = settings.vault_secret_id_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SecretError(f"cannot read the worker's AppRole secret-id {settings.vault_secret_id_file}: "
                          f"{exc.strerror}", "apply site.yml's prefect_worker play to this host again") from None
    return VaultSecretStore(address, spec.mount, f"{spec.prefix}/{env}", approle=(settings.vault_role_id, secret_id))


def vault_store(fleet: Fleet, env: str, settings: Settings, migrating: bool = False) -> VaultSecretStore:
    """The environment's Vault, logged in as `secrets.auth` says: VAULT_TOKEN (or the token helper), an
    AppRole, or the lab's root token from the lab's state directory. Unless `migrating`, a key that the local
    store still holds and Vault does not is an error, never a key to make anew."""
    spec = fleet.secrets
    _refuse_other_settings(spec, env, settings)
    if spec.backend is not SecretBackend.vault:
        raise SecretError(f"the fleet {fleet.name!r} keeps its secrets in the local store, not in Vault",
                          "add `secrets: {backend: vault, address: https://<vault>:8200}` to the fleet file")
    prefix = f"{spec.prefix}/{env}"
    leftover = None if migrating else settings.state_path(env) / "secrets"
    if spec.auth is VaultAuth.lab:
        from primespark.lab.openbao import lab_access

        address, token = lab_access(fleet, settings.state_path(env))
        again = f"run `spark lab up --env {env}`: it starts the lab's OpenBao and unseals it"
        hints = VaultHints(sealed=again, unreachable=again, unmigrated=leftover,
                           migrate=f"`spark lab up --env {env}` moves the local store into the lab's OpenBao")
        return VaultSecretStore(address, spec.mount, prefix, token=token, hints=hints)
    assert spec.address is not None  # fleet/checks.py: vault-without-address
    hints = VaultHints(unmigrated=leftover,
                       migrate=f"move the local store first: `spark secrets migrate --env {env} --to vault`")
    approle = (spec.role_id, _secret_id(spec)) if spec.auth is VaultAuth.approle and spec.role_id else None
    return VaultSecretStore(spec.address, spec.mount, prefix, hints=hints, approle=approle)


def _secret_id(spec: Secrets) -> str:
    """The AppRole secret-id: VAULT_SECRET_ID, else the file the fleet names (which only its owner may read)."""
    if os.environ.get("VAULT_SECRET_ID"):
        return os.environ["VAULT_SECRET_ID"]
    if spec.secret_id_file is None:
        raise SecretError("AppRole login needs a secret-id and none is given",
                          "export VAULT_SECRET_ID, or set secrets.secret_id_file to a 0600 file holding it")
    path = Path(spec.secret_id_file)
    try:
        if path.stat().st_mode & 0o077:
            raise SecretError(f"the AppRole secret-id file {path} is readable by others",
                              f"`chmod 600 {path}`, and issue a new secret-id if others may have read it")
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SecretError(f"cannot read the AppRole secret-id file {path}: {exc.strerror}",
                          "check secrets.secret_id_file, or export VAULT_SECRET_ID") from None


def _refuse_other_settings(spec: Secrets, env: str, settings: Settings) -> None:
    """SPARK_SECRET_BACKEND, SPARK_VAULT_MOUNT and SPARK_VAULT_PREFIX chose the store before the fleet file
    did: one that disagrees with the fleet file would send commands to look for, and make, secrets elsewhere."""
    older: list[tuple[str, str | None, str, str]] = [
        ("SPARK_SECRET_BACKEND", settings.secret_backend, "backend", spec.backend.value)]
    if spec.backend is SecretBackend.vault:
        older += [("SPARK_VAULT_MOUNT", settings.vault_mount, "mount", spec.mount),
                  ("SPARK_VAULT_PREFIX", settings.vault_prefix, "prefix", spec.prefix)]
    for name, value, field, wanted in older:
        if value is not None and value != wanted:
            raise SecretError(f"{name}={value}, but the fleet file has secrets.{field}: {wanted}",
                              f"the fleet file says where secrets live: set secrets.{field} there, and unset {name} "
                              f"(in the environment, .env or .env.{env})")


class ReadOnlyStore:
    """A store that reads only (a worker's copy of its site's secrets): a missing secret is an error to report,
    never one to create, so a worker cannot make a repository password that the fleet does not know."""

    def __init__(self, store: SecretStore) -> None:
        self.store = store

    def __getattr__(self, name: str) -> Any:  # read_field and friends of a Vault store
        if name in ("write_field", "delete_field"):
            return self._refuse
        return getattr(self.store, name)

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise SecretError("this secret store is read-only (a worker's copy of its site's secrets)",
                          "create the secret on the controller (site.yml's prefect_worker play installs it here)")

    def get(self, key: str) -> str:
        return self.store.get(key)

    def exists(self, key: str) -> bool:
        return self.store.exists(key)

    def list(self, prefix: str = "") -> list[str]:
        return self.store.list(prefix)

    def put(self, key: str, value: str) -> None:
        self._refuse()

    def create(self, key: str, value: str) -> None:
        self._refuse()

    def delete(self, key: str) -> None:
        self._refuse()


def ssh_key_pair(reference: str, store: SecretStore, comment: str) -> tuple[str, str]:
    """An Ed25519 SSH key pair kept at `reference` (private OpenSSH PEM), made once (create-only, so concurrent
    first uses agree); the private PEM and the public line with `comment`. Restic clients, sync sources and
    workers each get theirs here."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    def new() -> str:
        return Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()).decode()

    pem = ensure_reference(reference, store, new)
    private = serialization.load_ssh_private_key(pem.encode(), password=None)
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return pem, f"{public.decode()} {comment}"
