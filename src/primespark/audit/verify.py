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

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from primespark.audit.chain import GENESIS, Line, lines
from primespark.audit.checkpoints import BadCheckpoint, Checkpoint, Signer, read_checkpoints


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


def _with_next(found: Iterator[Line]) -> Iterator[tuple[Line, Line | None]]:
    current = next(found, None)
    while current is not None:
        following = next(found, None)
        yield current, following
        current = following


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


def verify_chain(path: Path, signer: Signer | None) -> ChainReport:
    """The chain at `path` and its checkpoints; `signer` checks their signatures (None: not checked, said so)."""
    report = ChainReport(path)
    try:
        checkpoints = read_checkpoints(path)
    except BadCheckpoint as exc:
        report.problem = Problem("checkpoint", 0, str(exc))
        return report
    report.checkpoints = len(checkpoints)
    for point in checkpoints:
        report.signers.add(point.signer)
        if signer is not None and (point.signer != signer.name or not signer.verify(point.payload(),
                                                                                   point.signature)):
            report.problem = Problem("checkpoint", point.line, f"checkpoint {point.line} ({point.count} records, "
                                     f"{point.time}) does not verify with {signer.name}: edited or forged")
            return report
    pinned: dict[int, list[Checkpoint]] = {}
    for point in checkpoints:
        pinned.setdefault(point.count, []).append(point)
    if not path.exists():
        if checkpoints:
            report.problem = Problem("deleted", 0, f"{path.name} is gone but {len(checkpoints)} checkpoints count "
                                     f"up to {max(p.count for p in checkpoints)} records")
        return report
    seq, prev, before_prev = 1, GENESIS, None
    for line, after in _with_next(lines(path)):
        if not (line.intact and line.seq == seq and line.prev == prev):
            report.problem = _broken(line, after, seq, prev, before_prev)
            report.records = seq - 1
            return report
        for point in pinned.get(seq, []):
            if point.head != line.hash:
                report.problem = Problem("edited", line.number, f"record {seq} (line {line.number}) is not the one "
                                         f"checkpoint {point.line} ({point.time}) pins: the chain was rewritten")
                return report
        assert line.hash is not None
        seq, prev, before_prev = seq + 1, line.hash, prev
    report.records = seq - 1
    beyond = [p for p in checkpoints if p.count > report.records]
    if beyond:
        point = max(beyond, key=lambda p: p.count)
        report.problem = Problem("truncated", report.records + 1, f"truncated: checkpoint {point.line} "
                                 f"({point.time}) counts {point.count} records, the chain holds {report.records}: "
                                 f"records {report.records + 1}-{point.count} were cut from its end")
    return report
