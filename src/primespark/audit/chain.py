"""The audit chain: an append-only JSONL file, one record a line, each carrying the SHA-256 of the one before.

A line is `{"seq":N,"prev":"<sha256 of record N-1>", ...body..., "hash":"<sha256 of this line up to ,"hash">"}`:
still one JSON object (`jq` reads it), and the hash covers the exact bytes written, so verifying needs no JSON
parsing (a million records in about a second). Records are appended with O_APPEND and fsync under an flock on
the file, so concurrent writers (two commands, a command and a flow) interleave whole records and never fork
the chain.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
_HASH_TAIL = ',"hash":"'
# ,"hash":"<64 hex>"}
_SUFFIX = len(_HASH_TAIL) + 64 + 2


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode(seq: int, prev: str, body: dict[str, Any]) -> bytes:
    """One record's line (with its newline): seq and prev first, the body's keys sorted, its own hash last."""
    inner = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)[1:-1]
    head = f'{{"seq":{seq},"prev":"{prev}"' + (f",{inner}" if inner else "")
    raw = head.encode()
    return raw + f'{_HASH_TAIL}{_digest(raw)}"}}\n'.encode()


@dataclass(frozen=True)
class Head:
    """The last record of a chain: its number and hash (seq 0 and GENESIS when the chain is empty)."""

    seq: int
    hash: str


@dataclass(frozen=True)
class Line:
    """A line as written: its number in the file (from 1), its bytes, and what they claim."""

    number: int
    raw: bytes
    seq: int | None
    prev: str | None
    hash: str | None  # the hash it carries
    intact: bool  # the bytes match that hash


def parse(number: int, raw: bytes) -> Line:
    """What a line claims, without trusting it: fields read from their fixed places, the hash recomputed."""
    body = raw.rstrip(b"\n")
    seq: int | None = None
    prev: str | None = None
    carried: str | None = None
    if body.startswith(b'{"seq":') and len(body) > _SUFFIX and body[-_SUFFIX:-_SUFFIX + len(_HASH_TAIL)] == \
            _HASH_TAIL.encode() and body.endswith(b'"}'):
        comma = body.find(b",", 7)
        try:
            seq = int(body[7:comma])
        except ValueError:
            seq = None
        if body[comma:comma + 9] == b',"prev":"':
            prev = body[comma + 9:comma + 9 + 64].decode("ascii", "replace")
        carried = body[-66:-2].decode("ascii", "replace")
    intact = carried is not None and seq is not None and prev is not None and \
        _digest(body[:-_SUFFIX]) == carried and raw.endswith(b"\n")
    return Line(number, raw, seq, prev, carried, intact)


def lines(path: Path) -> Iterator[Line]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            yield parse(number, raw)


def records(path: Path) -> Iterator[dict[str, Any]]:
    """Every record as a dict (lines that are not JSON are skipped: `verify` names them)."""
    with path.open("rb") as handle:
        for raw in handle:
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


def _last_line(fd: int, size: int) -> bytes | None:
    """The file's last complete line, read backwards in growing blocks (records are small)."""
    block = 8192
    while True:
        start = max(0, size - block)
        data = os.pread(fd, size - start, start)
        cut = data.rstrip(b"\n").rfind(b"\n")
        if cut >= 0 or start == 0:
            line = data[cut + 1:] if cut >= 0 else data
            return line if line.strip() else None
        block *= 4


def head_of(fd: int) -> Head:
    size = os.fstat(fd).st_size
    if size == 0:
        return Head(0, GENESIS)
    last = _last_line(fd, size)
    if last is None:
        return Head(0, GENESIS)
    line = parse(0, last if last.endswith(b"\n") else last + b"\n")
    if line.seq is None or line.hash is None:
        raise ChainBroken(f"the last line of the audit chain is not a record ({last[:60]!r}…)")
    return Head(line.seq, line.hash)


class ChainBroken(OSError):
    """The chain's last line cannot be continued: `spark audit verify` says what happened to it."""


class ChainFile:
    """One chain file, held open from `open()` (so a log that could be opened when an operation started can
    still take its record when it ends) to `close()`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def open(self) -> ChainFile:
        made = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if made:
            self.path.parent.chmod(0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
        self.fd = fd
        return self

    def append(self, body: dict[str, Any]) -> Head:
        """Append one record after the current head (read under the lock); its seq and hash."""
        if self.fd is None:
            self.open()
        assert self.fd is not None
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            head = head_of(self.fd)
            raw = encode(head.seq + 1, head.hash, body)
            written = os.write(self.fd, raw)
            if written != len(raw):
                raise OSError(f"short write to {self.path}: {written} of {len(raw)} bytes")
            os.fsync(self.fd)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        return Head(head.seq + 1, _digest(raw.rstrip(b"\n")[:-_SUFFIX]))

    def head(self) -> Head:
        if self.fd is None:
            self.open()
        assert self.fd is not None
        fcntl.flock(self.fd, fcntl.LOCK_SH)
        try:
            return head_of(self.fd)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
