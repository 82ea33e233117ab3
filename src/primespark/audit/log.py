"""The audit log of one machine: records of operations appended to its chain, checkpoints signed now and then.

`AuditLog.begin(operation)` opens the chain before the operation runs (a log that cannot be opened is known
before anything changes: destructive operations refuse, others warn); `Pending.finish(outcome)` appends the one
record with the outcome and duration. `operation(...)` wraps both for the two hooks (the CLI's entry point and
the flows' decorator in `primespark.orchestration.auditing`).
"""

from __future__ import annotations

import getpass
import secrets as pysecrets
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from primespark.audit.chain import ChainBroken, ChainFile
from primespark.audit.checkpoints import (
    HmacSigner,
    Signer,
    TransitSigner,
    append_checkpoint,
    last_count,
    transit_key_name,
)
from primespark.audit.redact import Redactor
from primespark.errors import UserError

if TYPE_CHECKING:
    from primespark.context import FleetContext

KEY_REFERENCE = "local:audit/hmac-key"
CHAIN = "log.jsonl"
DEFAULT_CHECKPOINT_EVERY = 100


class AuditUnavailable(UserError):
    """The audit record of an operation cannot be written."""


@dataclass(frozen=True)
class Operation:
    name: str  # `spark backup init`, `flow backup`
    env: str
    hosts: list[str]
    parameters: dict[str, Any]
    actor: str
    deployment: str | None = None
    flow_run_id: str | None = None


def operator() -> str:
    """Who runs this: the OS user at this host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class AuditLog:
    folder: Path
    redactor: Redactor
    signer: Callable[[], Signer]  # made on first checkpoint (the transit key is looked up once)
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    warnings: list[str] = field(default_factory=list)
    _signer: Signer | None = None

    @property
    def chain(self) -> Path:
        return self.folder / CHAIN

    def begin(self, operation: Operation) -> Pending:
        chain = ChainFile(self.chain)
        try:
            chain.open()
            chain.head()  # a chain whose last line is not a record cannot be continued
        except ChainBroken as exc:
            chain.close()
            raise AuditUnavailable(f"the audit log {self.chain} cannot be continued: {exc}",
                                   f"`spark audit verify` says what happened; move {self.chain.name} aside (keep it) "
                                   "and the next record starts a new chain") from None
        except OSError as exc:
            chain.close()
            raise AuditUnavailable(f"the audit log {self.chain} cannot be written: {exc.strerror or exc}",
                                   f"make {self.folder} a writable folder of the user running spark") from None
        return Pending(self, operation, chain, time.monotonic(), now_iso())

    def write(self, chain: ChainFile, body: dict[str, Any]) -> None:
        head = chain.append(body)
        if self.checkpoint_every > 0 and head.seq - last_count(self.chain) >= self.checkpoint_every:
            self.checkpoint(head.seq, head.hash)

    def checkpoint(self, count: int, head: str) -> None:
        """Sign (count, head); a signer that fails is a warning: the record itself is written."""
        try:
            if self._signer is None:
                self._signer = self.signer()
            append_checkpoint(self.chain, count, head, now_iso(), self._signer)
        except Exception as exc:  # any signer's failure: the record stands; the next record's checkpoint covers it
            said = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            self.warnings.append(f"audit checkpoint of record {count} not signed ({said}); the next record's "
                                 "checkpoint will cover it")


@dataclass
class Pending:
    log: AuditLog
    operation: Operation
    chain: ChainFile
    started: float
    time: str

    def finish(self, outcome: str, error: str | None = None) -> str | None:
        """Append the record; why its values were redacted without an HMAC (the key could not be read), if so."""
        op = self.operation
        redactor = self.log.redactor
        body: dict[str, Any] = {
            "time": self.time, "actor": op.actor, "deployment": op.deployment, "operation": op.name,
            "env": op.env, "hosts": op.hosts, "parameters": redactor.parameters(op.parameters),
            "outcome": outcome, "duration_seconds": round(time.monotonic() - self.started, 3),
            "flow_run_id": op.flow_run_id,
        }
        if error:
            body["error"] = redactor.text(error)[:2000]
        if redactor.problem:
            body["hmac_key"] = f"unavailable: {redactor.problem}"
        try:
            self.log.write(self.chain, body)
        finally:
            self.chain.close()
        return redactor.problem


def outcome_of(exc: BaseException | None) -> tuple[str, str | None]:
    if exc is None:
        return "succeeded", None
    if isinstance(exc, SystemExit):
        code = exc.code
        return ("succeeded", None) if code in (0, None) else ("failed", f"exit status {code}")
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", None
    message = exc.message if isinstance(exc, UserError) else str(exc)
    return "failed", f"{type(exc).__name__}: {message}"


@contextmanager
def operation(open_log: Callable[[], AuditLog], op: Operation, destructive: bool,
              warn: Callable[[str], None], stops_signer: bool = False) -> Iterator[None]:
    """Run the body as one audited operation. A log that cannot be opened stops a destructive operation
    before it starts (AuditUnavailable) and is a warning for any other, once it has run; a record that cannot be
    appended at the end is a warning (the operation has happened: refusing now would only hide it). Values
    redacted without an HMAC (its key unreadable) are a warning when the operation succeeded; a failed one
    reports its own error, and the record says why (`hmac_key`). `stops_signer`: the operation stops the
    checkpoints' signer itself (`spark lab down`, the lab's OpenBao): a checkpoint it then cannot sign is left to
    the next record without a warning."""
    try:
        log = open_log()
        pending = log.begin(op)
    except UserError as exc:
        if destructive:
            raise AuditUnavailable(f"refusing `{op.name}`: its audit record cannot be written ({exc.message})",
                                   exc.fix or "fix the audit log, then run again") from None
        message = f"{op.name}: no audit record was written: {exc.message}"
        try:
            yield
        except UserError:
            raise  # the command says why it failed itself, often for the same reason (its state directory)
        except SystemExit as done:  # how a CLI command ends
            if done.code in (0, None):
                warn(message)
            raise
        warn(message)
        return
    failure: BaseException | None = None
    try:
        yield
    except BaseException as exc:
        failure = exc
        raise
    finally:
        outcome, error = outcome_of(failure)
        unhashed: str | None = None
        try:
            unhashed = pending.finish(outcome, error)
        except (OSError, UserError) as exc:
            warn(f"{op.name}: its audit record was not written: {exc}")
        # A failed operation says why itself, often for the same reason (the secret store down): a warning printed
        # before that one error would bury it. The record is written all the same, redacted, saying why; a
        # checkpoint not signed is signed with a later record (its warning comes then, if it fails again).
        if outcome == "succeeded":
            if unhashed:
                warn(f"audit: secret values redacted without an HMAC: {unhashed}")
            for line in [] if stops_signer else log.warnings:
                warn(line)
        log.warnings.clear()


# Built from a fleet context ------------------------------------------------------------------------------------


def audit_key(ctx: FleetContext) -> bytes:
    """The HMAC key: made once in the fleet's secret store; a worker's read-only store only reads it."""
    from primespark.secrets import ReadOnlyStore, SecretNotFound, ensure_reference, read_reference

    if isinstance(ctx.secrets, ReadOnlyStore):
        try:
            return read_reference(KEY_REFERENCE, ctx.secrets).encode()
        except SecretNotFound:
            raise AuditUnavailable("the audit HMAC key is not installed on this worker",
                                   "apply site.yml's prefect_worker play again (it installs audit/hmac-key)") from None
    return ensure_reference(KEY_REFERENCE, ctx.secrets, lambda: pysecrets.token_hex(32)).encode()


def signer_for(ctx: FleetContext, key: Callable[[], bytes], make: bool = True) -> Signer:
    """Transit with the fleet's secrets in Vault (its store's own login), else the HMAC of the local store.
    `make`: enable the engine and make the key when missing (the writer; a verifier only reads)."""
    from primespark.fleet.model import SecretBackend
    from primespark.secrets import ReadOnlyStore, VaultSecretStore

    if ctx.fleet.secrets.backend is SecretBackend.vault:
        store = ctx.secrets
        inner = store.store if isinstance(store, ReadOnlyStore) else store
        assert isinstance(inner, VaultSecretStore)
        signer = TransitSigner(inner.client, transit_key_name(ctx.fleet.name))
        if make and not isinstance(store, ReadOnlyStore):
            signer.ensure_key()
        return signer
    return HmacSigner(key())


def audit_log(ctx: FleetContext) -> AuditLog:
    """This machine's audit log for the context's environment: `<state dir>/audit/` (a worker's own)."""
    from functools import cache

    key = cache(lambda: audit_key(ctx))
    # the fleet's interval, the same on the controller and the workers; a machine's setting overrides it
    explicit = "audit_checkpoint_every" in ctx.settings.model_fields_set
    every = ctx.settings.audit_checkpoint_every if explicit else ctx.fleet.audit.checkpoint_every
    return AuditLog(ctx.state_dir / "audit", Redactor(key), lambda: signer_for(ctx, key), every)
