"""Checkpoints: a chain's record count and head hash, signed, appended to `checkpoints.jsonl` beside it.

A chain alone shows an edited, inserted, reordered or deleted record, but not records cut from its end, nor a
chain rewritten from some record on with fresh hashes. A signed checkpoint pins (count, head): with the fleet's
secrets in Vault/OpenBao, signed by its transit engine with a key the writer may sign with but never export
(policies/vault/audit.hcl); with the local store, an HMAC whose key sits in the same state directory as the log,
which proves much less (docs/audit.md).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from primespark.errors import UserError

TRANSIT_MOUNT = "transit"


class Signer(Protocol):
    name: str

    def sign(self, payload: bytes) -> str: ...
    def verify(self, payload: bytes, signature: str) -> bool: ...


class HmacSigner:
    """HMAC-SHA256 with a key derived from the audit key: anyone who can read the state directory can forge it."""

    def __init__(self, key: bytes) -> None:
        self.key = hmac.new(key, b"primespark-audit-checkpoint", hashlib.sha256).digest()
        self.name = "hmac-sha256"

    def sign(self, payload: bytes) -> str:
        return hmac.new(self.key, payload, hashlib.sha256).hexdigest()

    def verify(self, payload: bytes, signature: str) -> bool:
        return hmac.compare_digest(self.sign(payload), signature)


def transit_key_name(fleet: str) -> str:
    return f"primespark-audit-{fleet}"


class TransitSigner:
    """Signs with a non-exportable ed25519 key of Vault's (OpenBao's) transit engine; verifies there too."""

    def __init__(self, client: Any, key: str, mount: str = TRANSIT_MOUNT) -> None:
        self.client = client
        self.key = key
        self.mount = mount
        self.name = f"transit:{mount}/{key}"

    def _call(self, doing: str, action: Any) -> Any:
        import hvac.exceptions
        import requests

        try:
            return action()
        except hvac.exceptions.Forbidden:
            raise UserError(f"Vault refused {doing} with the audit key {self.mount}/{self.key}",
                            "give the writer's token policies/vault/audit.hcl") from None
        except (hvac.exceptions.VaultError, requests.exceptions.RequestException) as exc:
            raise UserError(f"Vault failed {doing} with the audit key {self.mount}/{self.key}: "
                            f"{type(exc).__name__}: {exc}", "check that Vault is up and unsealed") from None

    def ensure_key(self) -> None:
        """The transit engine and the key, made when missing (needs a token that may: the deployer's, the lab's
        root token). The key is never exportable, so not even that token can take it out of Vault."""
        import hvac.exceptions

        transit = self.client.secrets.transit

        def exists() -> bool:
            try:
                transit.read_key(name=self.key, mount_point=self.mount)
                return True
            except (hvac.exceptions.InvalidPath, hvac.exceptions.InvalidRequest):
                return False

        if self._call("reading", exists):  # a sealed or absent Vault: its error, in our words
            return
        mounts = self._call("listing engines for", lambda: self.client.sys.list_mounted_secrets_engines())
        if f"{self.mount}/" not in (mounts.get("data") or mounts):
            self._call("enabling the transit engine for", self._enable_transit)
        # creating a key that exists changes nothing: two writers at once both succeed with the first's key
        self._call("creating", lambda: transit.create_key(name=self.key, key_type="ed25519", exportable=False,
                                                                mount_point=self.mount))

    def _enable_transit(self) -> None:
        """Enable the engine, unless another writer did since the list (two workers' roles run at once)."""
        import hvac.exceptions

        try:
            self.client.sys.enable_secrets_engine("transit", path=self.mount)
        except hvac.exceptions.InvalidRequest as exc:
            mounts = self.client.sys.list_mounted_secrets_engines()
            found = (mounts.get("data") or mounts).get(f"{self.mount}/")
            if "already in use" not in str(exc) or not found or found.get("type") != "transit":
                raise

    def sign(self, payload: bytes) -> str:
        encoded = base64.b64encode(payload).decode()
        reply = self._call("signing a checkpoint", lambda: self.client.secrets.transit.sign_data(
            name=self.key, hash_input=encoded, mount_point=self.mount))
        return str(reply["data"]["signature"])

    def verify(self, payload: bytes, signature: str) -> bool:
        import hvac.exceptions

        encoded = base64.b64encode(payload).decode()
        transit = self.client.secrets.transit

        def check() -> Any:
            try:
                return transit.verify_signed_data(name=self.key, hash_input=encoded, signature=signature,
                                                  mount_point=self.mount)
            except hvac.exceptions.InvalidRequest:  # not a signature of this key's form at all
                return None

        reply = self._call("verifying a checkpoint", check)
        return reply is not None and bool(reply["data"]["valid"])


@dataclass(frozen=True)
class Checkpoint:
    chain: str  # the chain file's name, beside checkpoints.jsonl
    count: int
    head: str
    time: str
    signer: str
    signature: str
    line: int = 0  # where it is in checkpoints.jsonl (from 1)

    def payload(self) -> bytes:
        return f"primespark-audit-checkpoint:v1:{self.chain}:{self.count}:{self.head}:{self.time}".encode()

    def as_json(self) -> str:
        return json.dumps({"chain": self.chain, "count": self.count, "head": self.head, "time": self.time,
                           "signer": self.signer, "signature": self.signature}, sort_keys=True)


def checkpoints_path(chain: Path) -> Path:
    return chain.with_name(f"{chain.stem}.checkpoints.jsonl")


def append_checkpoint(chain: Path, count: int, head: str, time: str, signer: Signer) -> Checkpoint:
    unsigned = Checkpoint(chain.name, count, head, time, signer.name, "")
    signed = Checkpoint(chain.name, count, head, time, signer.name, signer.sign(unsigned.payload()))
    path = checkpoints_path(chain)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (signed.as_json() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return signed


class BadCheckpoint(ValueError):
    """A line of a checkpoints file that is not a checkpoint."""


def read_checkpoints(chain: Path) -> list[Checkpoint]:
    path = checkpoints_path(chain)
    if not path.exists():
        return []
    found = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            data = json.loads(raw)
            found.append(Checkpoint(str(data["chain"]), int(data["count"]), str(data["head"]), str(data["time"]),
                                    str(data["signer"]), str(data["signature"]), number))
        except (ValueError, KeyError, TypeError):
            raise BadCheckpoint(f"line {number} of {path} is not a checkpoint") from None
    return found


def last_count(chain: Path) -> int:
    """The record count of the chain's last checkpoint (0: none yet); reads the file's tail only."""
    try:
        with checkpoints_path(chain).open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - 4096))
            tail = handle.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]
    except FileNotFoundError:
        return 0
    try:
        return int(json.loads(tail)["count"]) if tail.strip() else 0
    except (ValueError, KeyError, TypeError):
        return 0
