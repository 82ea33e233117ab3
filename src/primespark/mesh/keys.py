"""WireGuard keys: X25519 pairs and preshared keys made locally, private parts kept only in the secret store.

Layout in the store: one bundle per host, `mesh/<mesh>/<host>`, a JSON object holding the host's private key,
a staged next key during a rotation, and the preshared keys of the pairs where this host's name sorts first.
One secret per host keeps Vault round trips and local fsyncs linear in the number of hosts.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from primespark.secrets import LocalSecretStore, SecretError, SecretNotFound, SecretStore


def generate_private_key() -> str:
    return base64.b64encode(X25519PrivateKey.generate().private_bytes_raw()).decode()


def public_key_of(private_key: str) -> str:
    raw = base64.b64decode(private_key, validate=True)
    return base64.b64encode(X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()).decode()


def generate_preshared_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def pair_key(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


@dataclass
class Bundle:
    private_key: str
    psk: dict[str, str] = field(default_factory=dict)
    next_private_key: str | None = None

    def dump(self) -> str:
        data: dict[str, object] = {"private_key": self.private_key, "psk": self.psk}
        if self.next_private_key:
            data["next_private_key"] = self.next_private_key
        return json.dumps(data, sort_keys=True)

    @classmethod
    def load(cls, text: str) -> Bundle:
        data = json.loads(text)
        return cls(data["private_key"], dict(data.get("psk", {})), data.get("next_private_key"))


class MeshKeys:
    """The keys of one mesh, read from and written to a secret store; changed bundles are written on `save`."""

    def __init__(self, store: SecretStore, mesh: str) -> None:
        self.store = store
        self.mesh = mesh
        self._bundles: dict[str, Bundle] = {}
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()

    def _key(self, host: str) -> str:
        return f"mesh/{self.mesh}/{host}"

    def bundle(self, host: str) -> Bundle | None:
        if host not in self._bundles:
            if host in self._deleted:
                return None
            try:
                self._bundles[host] = Bundle.load(self.store.get(self._key(host)))
            except SecretNotFound:  # any other failure (sealed, unreachable) must not lead to a new key
                return None
            except (ValueError, KeyError) as exc:
                raise SecretError(f"the key bundle {self._key(host)!r} is damaged ({exc}); "
                                  f"delete it and run `spark mesh rotate {host}`") from None
        return self._bundles[host]

    def ensure_host(self, host: str) -> tuple[str, bool]:
        """The host's public key, generating its pair if it has none. Returns (public key, created)."""
        found = self.bundle(host)
        if found is not None:
            return public_key_of(found.private_key), False
        self._bundles[host] = Bundle(generate_private_key())
        self._deleted.discard(host)
        self._dirty.add(host)
        return public_key_of(self._bundles[host].private_key), True

    def private_key(self, host: str) -> str:
        found = self.bundle(host)
        if found is None:
            raise SecretError(f"no WireGuard key for {host} in mesh {self.mesh}: run `spark mesh plan`")
        return found.private_key

    def preshared_key(self, a: str, b: str) -> str:
        first, second = pair_key(a, b)
        found = self.bundle(first)
        if found is None or second not in found.psk:
            raise SecretError(f"no preshared key for {first}<->{second} in mesh {self.mesh}: run `spark mesh plan`")
        return found.psk[second]

    def sync_preshared_keys(self, pairs: Iterable[tuple[str, str]]) -> int:
        """Make exactly these pairs hold a preshared key (new pairs get one, gone pairs lose theirs)."""
        wanted: dict[str, set[str]] = {}
        for a, b in pairs:
            first, second = pair_key(a, b)
            wanted.setdefault(first, set()).add(second)
        created = 0
        for host in list(self._bundles):
            owned = self._bundles[host].psk
            stale = set(owned) - wanted.get(host, set())
            for peer in stale:
                del owned[peer]
                self._dirty.add(host)
        for first, seconds in wanted.items():
            found = self.bundle(first)
            if found is None:
                raise SecretError(f"no key bundle for {first} in mesh {self.mesh}")
            for second in seconds:
                if second not in found.psk:
                    found.psk[second] = generate_preshared_key()
                    self._dirty.add(first)
                    created += 1
        return created

    def forget_host(self, host: str) -> None:
        self._bundles.pop(host, None)
        self._dirty.discard(host)
        self._deleted.add(host)

    def stage_next(self, host: str) -> str:
        """Generate the host's next key and store it beside the current one (a crash mid-rotation loses nothing)."""
        found = self.bundle(host)
        if found is None:
            raise SecretError(f"no WireGuard key for {host} in mesh {self.mesh}: run `spark mesh plan`")
        found.next_private_key = found.next_private_key or generate_private_key()
        self._dirty.add(host)
        self.save()
        return found.next_private_key

    def commit_next(self, host: str) -> None:
        found = self.bundle(host)
        if found is None or not found.next_private_key:
            raise SecretError(f"{host} has no staged key to commit")
        found.private_key, found.next_private_key = found.next_private_key, None
        self._dirty.add(host)
        self.save()

    def discard_next(self, host: str) -> None:
        found = self.bundle(host)
        if found is not None and found.next_private_key:
            found.next_private_key = None
            self._dirty.add(host)
            self.save()

    def save(self) -> None:
        for host in sorted(self._deleted):
            self.store.delete(self._key(host))
        items = {self._key(host): self._bundles[host].dump() for host in sorted(self._dirty)}
        if isinstance(self.store, LocalSecretStore) and len(items) > 1:
            _put_many_local(self.store, items)
        else:
            for key, value in items.items():
                self.store.put(key, value)
        self._dirty.clear()
        self._deleted.clear()


def _put_many_local(store: LocalSecretStore, items: dict[str, str]) -> None:
    """The local store's layout and modes (0700 folders, 0600 files, replaced by rename), with one syncfs for
    the whole batch instead of an fsync per file: a thousand new hosts cost one flush, not a thousand."""
    made: set[Path] = set()
    for key, value in items.items():
        path = store._path(key)
        if path.parent not in made:
            for parent in reversed(path.relative_to(store.root).parents):
                (store.root / parent).mkdir(exist_ok=True, mode=0o700)
            made.add(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(value)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    _syncfs(store.root)


def _syncfs(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)
