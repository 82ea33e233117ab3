"""`spark audit verify`: every chain and every checkpoint, and the first bad record named with what happened to it.

Read in one pass with one line of lookahead, so a million records verify in about a second. What a break means:
- a line whose bytes do not match the hash it carries: **edited** (or not a record at all);
- a record whose link does not match the record before it, which itself looks whole: that one was **edited**
  (rewritten with a fresh hash);
- a line the next record skips over (the next one links to the record before it): **inserted**;
- two records in the wrong order: **reordered**;
- a gap in the numbers: **deleted**;
- fewer records than a checkpoint counts: a **truncated** tail; a record that differs from the head a checkpoint
  pins: edited (the chain rewritten from there on);
- a checkpoint whose signature does not verify: a **checkpoint** edited or forged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

from primespark.audit.chain import GENESIS, Line, parse
from primespark.audit.checkpoints import BadCheckpoint, Checkpoint, Signer, read_checkpoints

_TAIL = b',"hash":"'


@dataclass(frozen=True)
class Problem:
    kind: str  # edited, inserted, reordered, deleted, truncated, checkpoint
    line: int  # the line of the chain (or of the checkpoints file, for a checkpoint)
    message: str


@dataclass
class ChainReport:
    path: Path
    records: int = 0
    checkpoints: int = 0
    signers: set[str] = field(default_factory=set)
    problem: Problem | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def _broken(line: Line, after: Line | None, seq: int, prev: str, before_prev: str | None) -> Problem:
    """Why `line` does not continue the chain whose last good record is seq-1 with hash `prev`."""
    n = line.number
    if not line.intact:
        if after is not None and after.seq == seq and after.prev == prev:
            return Problem("inserted", n, f"line {n} was inserted: record {seq} (line {n + 1}) links to the "
                                          "record before it")
        if after is None and not line.raw.endswith(b"\n"):
            return Problem("truncated", n, f"line {n} is a partial record: the chain was cut (or a write cut "
                                           "short) in its last record")
        return Problem("edited", n, f"line {n} was edited: its bytes no longer match the hash it carries"
                                    + ("" if line.seq is not None else " (it is not a record)"))
    if after is not None and line.seq == seq + 1 and after.seq == seq:
        return Problem("reordered", n, f"lines {n} and {n + 1} are out of order: records {seq + 1} and {seq} "
                                       "swapped")
    if line.seq == seq - 1 and before_prev is not None and line.prev == before_prev:
        return Problem("inserted", n - 1, f"line {n - 1} was inserted: record {seq - 1} (line {n}) links to the "
                                          f"record before it")
    if after is not None and after.seq == seq and after.prev == prev:
        return Problem("inserted", n, f"line {n} was inserted: record {seq} (line {n + 1}) links to the "
                                      "record before it")
    if line.seq == seq:
        return Problem("edited", n - 1, f"record {seq - 1} (line {n - 1}) was edited: rewritten with a new hash, "
                                        f"record {seq} no longer links to it")
    if line.seq is not None and line.seq > seq:
        missing = f"record {seq}" if line.seq == seq + 1 else f"records {seq}-{line.seq - 1}"
        return Problem("deleted", n, f"{missing} deleted: line {n} holds record {line.seq}, after record {seq - 1}")
    return Problem("reordered", n, f"line {n} holds record {line.seq} where record {seq} belongs: records moved")


def _signed(path: Path, signer: Signer | None, report: ChainReport) -> list[Checkpoint] | None:
    """The chain's checkpoints, each signature checked; None (and the report's problem) when one is bad."""
    try:
        checkpoints = read_checkpoints(path)
    except BadCheckpoint as exc:
        report.problem = Problem("checkpoint", 0, str(exc))
        return None
    report.checkpoints = len(checkpoints)
    for point in checkpoints:
        report.signers.add(point.signer)
        if signer is not None and (point.signer != signer.name or not signer.verify(point.payload(),
                                                                                   point.signature)):
            report.problem = Problem("checkpoint", point.line, f"checkpoint {point.line} ({point.count} records, "
                                     f"{point.time}) does not verify with {signer.name}: edited or forged")
            return None
    return checkpoints


def verify_chain(path: Path, signer: Signer | None) -> ChainReport:
    """The chain at `path` and its checkpoints; `signer` checks their signatures (None: not checked)."""
    report = ChainReport(path)
    checkpoints = _signed(path, signer, report)
    if checkpoints is None:
        return report
    pinned: dict[int, list[Checkpoint]] = {}
    for point in checkpoints:
        pinned.setdefault(point.count, []).append(point)
    if not path.exists():
        if checkpoints:
            report.problem = Problem("deleted", 0, f"{path.name} is gone but {len(checkpoints)} checkpoints count "
                                     f"up to {max(p.count for p in checkpoints)} records")
        return report
    seq, prev, before_prev = 1, GENESIS.encode(), None
    tail = _TAIL
    with path.open("rb") as handle:
        for raw in handle:  # every line so far was record `seq - 1`: this is line `seq`
            # the fast path, with no objects made: what parse() checks, for the record expected here
            carried = raw[-67:-3]
            if not (raw[-76:-67] == tail and raw.endswith(b'"}\n')
                    and sha256(raw[:-76]).hexdigest().encode() == carried
                    and raw.startswith(b'{"seq":%d,"prev":"%s"' % (seq, prev))):
                after_raw = next(handle, None)
                after = parse(seq + 1, after_raw) if after_raw is not None else None
                report.problem = _broken(parse(seq, raw), after, seq, prev.decode(),
                                         before_prev.decode() if before_prev else None)
                report.records = seq - 1
                return report
            if seq in pinned and any(p.head.encode() != carried for p in pinned[seq]):
                point = next(p for p in pinned[seq] if p.head.encode() != carried)
                report.problem = Problem("edited", seq, f"record {seq} (line {seq}) is not the one checkpoint "
                                         f"{point.line} ({point.time}) pins: the chain was rewritten")
                return report
            seq, prev, before_prev = seq + 1, carried, prev
    report.records = seq - 1
    beyond = [p for p in checkpoints if p.count > report.records]
    if beyond:
        point = max(beyond, key=lambda p: p.count)
        report.problem = Problem("truncated", report.records + 1, f"truncated: checkpoint {point.line} "
                                 f"({point.time}) counts {point.count} records, the chain holds {report.records}: "
                                 f"records {report.records + 1}-{point.count} were cut from its end")
    return report
