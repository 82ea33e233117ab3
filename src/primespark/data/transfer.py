"""The transfer engine: rsync, run on the source host through `primespark.hosts`, pushing to the destination.

One engine for every mover (sync jobs now, tier migration next): plan a transfer (`TransferPlan`), run it with a
bandwidth limit, a stop time and a timeout (`run`), and read back what it sent, skipped and deleted
(`TransferReport`). Sync adds its guards and its bookkeeping around it; this module only moves bytes and
reports.

Safety that rsync gives, and how we ask for it:
- A file appears under its final name only whole: rsync writes each file under a temporary name
  (`.name.XXXXXX`) and renames it when it is complete (never `--inplace`). With `--delay-updates` the finished
  files of a run wait in `.~tmp~/` and are renamed into place at its end, in one quick sweep.
- An interrupted file resumes: `--delay-updates` keeps a killed run's partial file in `.~tmp~/`, and the next
  run uses it as the basis of a delta transfer, so it sends only what was missing. (`--partial-dir` does the
  same, but a hardened rrsync pins its directory as `/proc/self/fd/N`, where rsync cannot save a partial file;
  `--delay-updates` keeps the partial directory rsync's own, relative one.) Only files from `RESUMABLE_BYTES` up
  go that way: `--delay-updates` costs rsync about a dozen more opens per file (twice the time of a first copy
  of many small files), while a small file cut off is sent again whole at little cost. So a transfer is two
  rsync runs: every file under the size as is (`--max-size`), which also lists the larger ones; then those with
  `--delay-updates`.
- On disk: `--fsync` flushes each file before its rename (a crash never leaves an empty file under a final name
  that a size-and-time check would take for a good copy); `flush` instead flushes the destination's whole
  filesystem once (syncfs), through the account's forced command where it is remote, and gives the
  destination's boot id, by which a caller can tell a destination that restarted before its copies were on disk.
- Content is compared with XXH3-128 (`--checksum-choice=xxh128`, the backup manifests' hash) wherever a
  checksum is asked for: the full check, and the after-run verification where the destination cannot hash its
  copies itself (`hash_copies`, the account's other request: each copy read once, there).
- Every file sent is verified in flight: the receiver hashes what it writes and compares it with the sum the
  sender took as it read the file (it sends the file again on a mismatch). The report keeps that sum per file
  (`Item.checksum`): tier migration records it rather than reading each source a second time.

The command runs as `sh -c 'rsync "$@"; echo rsync-exit=$?'` so that rsync's own exit code (255 when its ssh
to the destination fails) is never taken for the runner's ssh to the source host failing.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from primespark.errors import StepFailed
from primespark.hosts import Runner, ended_with_session, stream

# rsync's temporary files (`.name.XXXXXX`): a source that is itself a sync destination holds some while a
# transfer into it runs; they are never synced, as a file being written is not.
RSYNC_TEMP_PATTERN = ".*.[A-Za-z0-9][A-Za-z0-9][A-Za-z0-9][A-Za-z0-9][A-Za-z0-9][A-Za-z0-9]"
PARTIAL_DIR = ".~tmp~"  # what --delay-updates uses; rsync excludes it from transfers and deletions
# %C: the file's XXH3-128 as the sender read it (the sum the receiver checks its copy against)
OUT_FORMAT = "%i|%l|%b|%M|%C|%n"
EXIT_MARK = "rsync-exit="
CHECKSUM = "xxh128"
CHECKSUM_AS = "xxh3_128"  # the same hash by the name python-xxhash and the hosts' hashers give it
# The flags of every transfer: recursive, symlinks as symlinks, permissions and times. No owners: the sync
# account on the destination is not root; its own tree stays writable to it. `--open-noatime`: reading a file
# to send or compare it is not a use (the tier policy ages files by access time; a checksum compare would
# otherwise make every file look used). It needs the reader to own the file or be root (else EPERM): the
# sender runs as root, the receiver as the account that owns its tree.
BASE_FLAGS = ("-rlpt", "--chmod=Du+rwx,Fu+rw", f"--checksum-choice={CHECKSUM}", f"--out-format={OUT_FORMAT}",
              "--stats", "--no-motd", "--open-noatime")
IO_TIMEOUT_SECONDS = 120  # rsync's --timeout: a connection silent this long is dead
# Files from this size go in a run of their own with `--delay-updates`, so that a cut-off one resumes; a smaller one
# is sent again whole (at most this much again, per run cut off).
RESUMABLE_BYTES = 8 * 1024 * 1024
OVER_MAX_SIZE = " is over max-size"  # rsync's note (--info=skip1) for each file --max-size leaves to the next run
PROGRESS_SECONDS = 10.0  # a transfer that runs longer says this often how far it is

# rsync's exit codes (rsync(1), EXIT VALUES)
PARTIAL_TRANSFER = 23
VANISHED = 24
MAX_DELETE_REACHED = 25
_TRANSIENT = {10: "socket I/O error", 12: "the connection broke", 14: "IPC error",
              20: "interrupted", 30: "timed out", 35: "timed out", 255: "the destination did not answer"}


class TransferFailed(StepFailed):
    """rsync failed; `transient` when the same transfer may pass when tried again (a broken connection)."""

    def __init__(self, message: str, fix: str = "", *, returncode: int | None = None, stderr: str = "",
                 transient: bool = False) -> None:
        super().__init__(message, fix, returncode=returncode, stderr=stderr)
        self.transient = transient


# --- the route to the destination ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """How the source host reaches the destination folder: over SSH to an account on the destination (whose
    forced command restricts it to the folder, so the remote path is `/`, the folder's root), or, on the same
    machine, the folder's own path."""

    target: str = ""  # `account@address`; empty: a local path
    rsh: tuple[str, ...] = ()  # the remote shell rsync runs (`ssh` with its options)

    @property
    def remote(self) -> bool:
        return bool(self.target)

    def destination(self, path: str) -> str:
        """rsync's destination argument for `path` (a local path, or the path below the account's root)."""
        if self.remote:
            return f"{self.target}:{path or '/'}"
        return path


# A pass makes several sessions to one account in a row (the flush before, rsync's runs, the read-back): they share
# one connection for a while (OpenSSH's ControlMaster, as the runners do), each a session of its own that the
# account's forced command still governs. The socket lives in the key's own folder (root's, 0700).
SHARED_PERSIST_SECONDS = 60
_SOCKET_PATH_MAX = 100  # a unix socket's path (108 bytes on Linux, with room for ssh's temporary suffix)


def ssh_route(account: str, address: str, port: int, key_file: str, known_hosts: str,
              connect_timeout: int = 10, shared_dir: str | None = None) -> Route:
    """To `account@address` with its own key and known hosts: keepalives notice a dead link within 30 s. With
    `shared_dir`, successive sessions share one connection (`%C`: one per account, address and port)."""
    rsh = ["ssh", "-p", str(port), "-i", key_file, "-o", "IdentitiesOnly=yes", "-o",
           f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
           "-o", f"ConnectTimeout={connect_timeout}", "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=3",
           "-o", "LogLevel=ERROR"]
    if shared_dir is not None and len(shared_dir) + len("/cm-") + 40 <= _SOCKET_PATH_MAX:  # %C: 40 hex digits
        rsh += ["-o", "ControlMaster=auto", "-o", f"ControlPath={shared_dir}/cm-%C",
                "-o", f"ControlPersist={SHARED_PERSIST_SECONDS}"]
    return Route(f"{account}@{address}", tuple(rsh))


def local_route() -> Route:
    return Route()


# What a sync account's key may ask besides rsync (roles/sync/files/sync-gate): syncfs of its folder, then the
# host's boot id (the gate reads the boot id from BOOT_ID too); the size and XXH3-128 of files below its folder.
FLUSH_REQUEST = "primespark-flush"
HASH_REQUEST = "primespark-hash"
HASH_FLUSH_REQUEST = "primespark-hash-flush"  # both at once: the hashes read the page cache, the flush the disk
NO_HASHER = 3  # sync-hash's exit code on a host without python3-xxhash
BOOT_ID = "/proc/sys/kernel/random/boot_id"


def flush(runner: Runner, route: Route, folder: str, *, timeout: float) -> str:
    """Flush the filesystem that holds the destination `folder` to disk, from the host that runs rsync (`runner`)
    the way rsync reaches it; return the destination's boot id (another one after every start of its kernel)."""
    if route.remote:
        request = [*route.rsh, route.target, FLUSH_REQUEST]
    else:
        # a local folder is made by the first transfer (--mkpath): until then its nearest parent's filesystem
        request = ["sh", "-c", 'd=$1; while [ ! -e "$d" ]; do d=$(dirname -- "$d"); done; sync -f -- "$d" && '
                   'cat -- "$2"', "sh", folder, BOOT_ID]
    # as with rsync: its own exit code said apart from the runner's ssh to the source host failing (255 both)
    done = runner.run(["sh", "-c", '"$@"; echo flush-exit=$?', "sh", *request], timeout=timeout)
    lines = done.text.strip().splitlines()
    code = int(lines[-1].removeprefix("flush-exit=")) if lines and lines[-1].startswith("flush-exit=") else None
    if done.returncode != 0 or code != 0 or len(lines) != 2:
        where = route.target or folder
        raise TransferFailed(f"cannot flush {where} to disk: {(done.stderr or done.text).strip()[-300:]}",
                             "check that the destination is up, and that the sync role installed its gate "
                             "(an account that answers with rrsync's refusal predates it: run the role again)",
                             returncode=code if code is not None else done.returncode, stderr=done.stderr,
                             transient=code == 255)
    return lines[0].strip()


@dataclass(frozen=True)
class ReadBack:
    """The copies as the destination read them: each one's size and XXH3-128, None where there is none; and its
    boot id once it had flushed them to disk, when asked to."""

    copies: list[tuple[int, str] | None]
    boot: str | None = None


def hash_copies(runner: Runner, route: Route, paths: Sequence[str], *, timeout: float, flush: bool = False
                ) -> ReadBack | None:
    """The size and XXH3-128 of each of `paths` (below the route's folder) as the destination reads them; with
    `flush`, its filesystem flushed meanwhile and its boot id after. None when the destination cannot hash them
    (no python3-xxhash there): nothing was flushed either."""
    request = HASH_FLUSH_REQUEST if flush else HASH_REQUEST
    # as with flush: sync-hash's own exit code told apart from the runner's ssh to the source host failing
    done = runner.run(["sh", "-c", '"$@"; echo hash-exit=$?', "sh", *route.rsh, route.target, request],
                      stdin=b"\0".join(p.encode(errors="surrogateescape") for p in paths), timeout=timeout)
    lines = done.text.splitlines()
    code = int(lines[-1].removeprefix("hash-exit=")) if lines and lines[-1].startswith("hash-exit=") else None
    if code == NO_HASHER:
        return None
    answers = len(paths) + int(flush)
    if done.returncode != 0 or code != 0 or len(lines) != answers + 1:
        raise TransferFailed(f"cannot read back the copies at {route.target}: "
                             f"{(done.stderr or done.text).strip()[-300:]}",
                             "check that the destination is up, and that the sync role installed its gate "
                             "(sync-hash beside it)", returncode=code if code is not None else done.returncode,
                             stderr=done.stderr, transient=code == 255)
    copies: list[tuple[int, str] | None] = []
    for line in lines[:len(paths)]:
        size, _, digest = line.partition(" ")
        copies.append((int(size), digest) if digest else None)
    return ReadBack(copies, lines[len(paths)].strip() if flush else None)


# --- bandwidth -------------------------------------------------------------------------------------------------

_RATE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([KMG]?)$")
_UNITS = {"": 1, "K": 1, "M": 1024, "G": 1024 * 1024}


def rate_kib(rate: str) -> int | None:
    """A timetable rate in KiB/s for rsync's --bwlimit: `2M` → 2048, `500K` or `500` → 500, `off` → None (no
    limit). `pause` is not a rate: the caller does not transfer at all."""
    if rate == "off":
        return None
    match = _RATE.match(rate)
    if match is None:
        raise ValueError(f"not a rate: {rate!r}")
    return max(1, round(float(match[1]) * _UNITS[match[2]]))


# --- the plan --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransferPlan:
    """One rsync run from `source` (a folder on the host that runs it) to `destination` (through `route`)."""

    source: str
    destination: str
    route: Route = field(default_factory=local_route)
    delete: bool = False  # remove at the destination what the source lacks (a mirror)
    max_delete: int | None = None  # with delete: rsync deletes at most this many (0: counts them, deletes none)
    deletions_only: bool = False  # with delete: transfer nothing, only delete
    files: tuple[str, ...] | None = None  # only these paths below the source; None: the whole tree
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    held_back: tuple[str, ...] = ()  # excluded before the job's includes can match (folders nobody may sync)
    bwlimit_kib: int | None = None
    stop_at: datetime | None = None  # stop gracefully then (a bandwidth window's end); the next run resumes
    checksum: bool = False  # compare content (XXH3-128) rather than size and time
    dry_run: bool = False
    fsync: bool = True
    # finished files wait in `.~tmp~/` until the run ends (a killed run's partial file stays there to resume): the
    # files from RESUMABLE_BYTES up (`run` sends the others first, without); off for a destination that is a staging
    # folder already (tier migration: its own rename places the files, its replay removes what a killed copy
    # left), where the extra rename per file cost a third of the copy
    delay_updates: bool = True
    max_size: int | None = None  # leave larger files alone, listing each (`OVER_MAX_SIZE`)

    def _writing(self) -> list[str]:
        """How the copies are written (or not, in a dry run)."""
        args = ["--delay-updates"] if self.delay_updates else []
        if self.fsync and not self.dry_run:
            args.append("--fsync")
        if self.dry_run:
            args.append("--dry-run")
        if self.max_size is not None:
            args += [f"--max-size={self.max_size}", "--info=skip1"]
        return args

    def argv(self) -> list[str]:
        """rsync's arguments (without `rsync`)."""
        args = [*BASE_FLAGS, f"--timeout={IO_TIMEOUT_SECONDS}", *self._writing()]
        if self.checksum:
            args.append("--checksum")
        if self.delete:
            args.append("--delete-during")
            if self.max_delete is not None:
                args.append(f"--max-delete={self.max_delete}")
            if self.deletions_only:
                args += ["--existing", "--ignore-existing"]
        if self.files is not None:
            # the paths come on stdin, NUL-separated; one that vanished since it was listed is no error
            args += ["--files-from=-", "--from0", "--ignore-missing-args"]
        if self.bwlimit_kib is not None:
            args.append(f"--bwlimit={self.bwlimit_kib}")
        if self.stop_at is not None:
            args.append(f"--stop-at={self.stop_at.astimezone(UTC).strftime('%Y-%m-%dT%H:%M')}")
        if self.route.rsh:
            args += ["-e", " ".join(self.route.rsh)]
        else:
            args.append("--mkpath")  # a folder on this host: made if missing (a remote one is the sync role's)
        args += [f"--exclude={p}" for p in self.held_back]  # rsync's first matching rule wins
        args += [f"--include={p}" for p in self.include]
        args += [f"--exclude={p}" for p in (*self.exclude, RSYNC_TEMP_PATTERN)]
        return [*args, self.source.rstrip("/") + "/", self.route.destination(self.destination)]

    def stdin(self) -> bytes | None:
        return None if self.files is None else b"\0".join(p.encode(errors="surrogateescape") for p in self.files)


# --- the report ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One line of rsync's itemized output (`%i|%l|%b|%M|%C|%n`)."""

    flags: str  # rsync's itemize string, e.g. `<f+++++++++`, `*deleting`
    path: str
    size: int
    wire_bytes: int  # what went over the wire for it
    modified: str  # its %M as rsync printed it (`mtime` reads it: most reports never ask, and 100,000 cost 0.3 s)
    checksum: str = ""  # a sent file's XXH3-128 (hex) as the sender read it; empty for anything else

    @property
    def mtime(self) -> datetime | None:
        return _mtime(self.modified)

    @property
    def sent(self) -> bool:
        """A regular file whose content was sent (new or changed)."""
        return self.flags[:2] in ("<f", ">f")

    @property
    def deleted(self) -> bool:
        return self.flags.startswith("*deleting")

    @property
    def new(self) -> bool:
        return self.sent and self.flags[2:3] == "+"

    @property
    def content_differs(self) -> bool:
        """Sent because its content differs while size and time agree (a checksum run's find: corruption)."""
        return self.sent and not self.new and self.flags[2] == "c" and self.flags[3] != "s" and self.flags[4] != "t"


_STAT_NAMES = {
    "Number of files": "files",
    "Number of created files": "created",
    "Number of deleted files": "deleted",
    "Number of regular files transferred": "transferred",
    "Total file size": "total_size",
    "Total transferred file size": "transferred_size",
    "Literal data": "literal",
    "Matched data": "matched",
    "Total bytes sent": "bytes_sent",
    "Total bytes received": "bytes_received",
}
_STAT_LINE = re.compile(r"^([A-Za-z ]+): ([0-9,]+)(?: bytes)?(?: \(reg: ([0-9,]+))?")
_ESCAPE = re.compile(r"\\#([0-7]{3})")
_SKIPPED_DELETES = re.compile(r"Deletions stopped due to --max-delete limit \(([0-9,]+) skipped\)")


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def _unescape(name: str) -> str:
    """rsync prints each unprintable byte of a name as `\\#ooo` (octal)."""
    if "\\#" not in name:
        return name
    out, last = bytearray(), 0
    for match in _ESCAPE.finditer(name):
        out += name[last:match.start()].encode() + bytes([int(match[1], 8)])
        last = match.end()
    out += name[last:].encode()
    return out.decode("utf-8", errors="surrogateescape")


def _mtime(text: str) -> datetime | None:
    """%M (`2026/12/04-10:54:42`), printed in UTC (the command runs with TZ=UTC). Read by position: strptime took
    more than a second per 100,000 files, on the pass's critical path."""
    try:
        if len(text) != 19 or text[4] != "/" or text[7] != "/" or text[10] != "-" or text[13] != ":" or text[16] != ":":
            return None
        return datetime(int(text[0:4]), int(text[5:7]), int(text[8:10]), int(text[11:13]), int(text[14:16]),
                        int(text[17:19]), tzinfo=UTC)
    except ValueError:
        return None


def parse_item(line: str) -> Item | None:
    """One line of rsync's itemized output as an Item; None for any other line (its stats, notes)."""
    parts = line.split("|", 5)
    if len(parts) != 6 or not parts[0] or parts[0][0] not in "<>ch.*":
        return None
    flags, size, wire, mtime, checksum, name = parts
    try:
        return Item(flags.strip(), _unescape(name), int(size or 0), int(wire or 0), mtime, checksum.strip())
    except ValueError:
        return None


def parse_items(stdout: str) -> list[Item]:
    return [item for line in stdout.splitlines() if (item := parse_item(line)) is not None]


@dataclass(frozen=True)
class Progress:
    """How far a transfer is: the files it has sent so far, their bytes, the seconds since it started."""

    files: int
    bytes: int
    seconds: float

    @property
    def text(self) -> str:
        rate = self.bytes / self.seconds if self.seconds > 0 else 0.0
        return f"{self.files} files, {human_size(self.bytes)} sent in {self.seconds:.0f} s ({human_size(int(rate))}/s)"


def human_size(value: int) -> str:
    """Bytes as a person reads them: 512 B, 1.5 KiB, 2.4 GiB, 7.3 TiB."""
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if amount < 1024 or unit == "TiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    raise AssertionError("unreachable")


class _Reading:
    """rsync's lines as they come: each item parsed while rsync runs (100,000 took 0.4 s once it had ended), and
    every PROGRESS_SECONDS the files and bytes the transfer has sent so far passed to `progress`."""

    def __init__(self, progress: Callable[[Progress], None] | None) -> None:
        self.items: list[Item] = []
        self.progress, self.every = progress, PROGRESS_SECONDS
        self.files = self.bytes = 0
        self.started = time.monotonic()
        self.due = self.started + self.every

    def following(self) -> _Reading:
        """The reading of the transfer's next run: its counts and its clock go on from this one's."""
        after = _Reading(self.progress)
        after.files, after.bytes, after.started, after.due = self.files, self.bytes, self.started, self.due
        return after

    def line(self, text: str) -> None:
        item = parse_item(text)
        if item is None:
            return
        self.items.append(item)
        if item.sent:
            self.files += 1
            self.bytes += item.size
        if self.progress is not None and time.monotonic() >= self.due:
            self.due = time.monotonic() + self.every
            self.progress(self.so_far())

    def so_far(self) -> Progress:
        return Progress(self.files, self.bytes, time.monotonic() - self.started)


def parse_oversized(stdout: str) -> list[str]:
    """The files a `--max-size` run left for the next one (`NAME is over max-size`)."""
    return [_unescape(line[:-len(OVER_MAX_SIZE)]) for line in stdout.splitlines()
            if line.endswith(OVER_MAX_SIZE) and not parse_items(line)]


def parse_stats(stdout: str) -> dict[str, int]:
    stats: dict[str, int] = {}
    for line in stdout.splitlines():
        match = _STAT_LINE.match(line.strip())
        if match and match[1] in _STAT_NAMES:
            key = _STAT_NAMES[match[1]]
            stats[key] = _number(match[2])
            if key == "files":
                stats["regular_files"] = _number(match[3]) if match[3] else 0
    return stats


@dataclass
class TransferReport:
    """What one rsync run did."""

    plan: TransferPlan
    returncode: int
    items: list[Item]
    stats: dict[str, int]
    stderr: str
    seconds: float = 0.0
    started: datetime | None = None
    oversized: list[str] = field(default_factory=list)  # what `plan.max_size` left alone

    @property
    def sent(self) -> list[Item]:
        return [i for i in self.items if i.sent]

    @property
    def deleted(self) -> list[str]:
        return [i.path for i in self.items if i.deleted]

    @property
    def files_sent(self) -> int:
        return len(self.sent)

    @property
    def bytes_sent(self) -> int:
        """Bytes that went over the wire to the destination (file data, the file list, checksums)."""
        return self.stats.get("bytes_sent", 0)

    @property
    def literal_bytes(self) -> int:
        """File data sent as is: what a resumed file still needed (the rest matched its partial copy)."""
        return self.stats.get("literal", 0)

    @property
    def source_files(self) -> int:
        """Regular files in the source (after the filters), as rsync counted them."""
        return self.stats.get("regular_files", 0)

    @property
    def skipped(self) -> int:
        """Regular files left alone because the destination already had them."""
        return max(0, self.source_files - self.stats.get("transferred", 0)) if self.plan.files is None else \
            max(0, len(self.plan.files) - self.files_sent)

    @property
    def deletions_held_back(self) -> int:
        """Deletions rsync skipped because of --max-delete (all of them with --max-delete=0)."""
        match = _SKIPPED_DELETES.search(self.stderr)
        return _number(match[1]) if match else 0

    @property
    def stopped_early(self) -> bool:
        """Stopped at `stop_at` (a bandwidth window closed): the next run resumes."""
        return self.returncode == 30 and "run-time limit exceeded" in self.stderr

    @property
    def vanished(self) -> bool:
        """Some source files disappeared while rsync read the tree (a live source): not an error."""
        return self.returncode == VANISHED

    def __add__(self, other: TransferReport) -> TransferReport:
        """Two runs of one transfer (one stopped at a window's end, one resuming): their sums."""
        return self.joined(other, other.plan, tree=other, returncode=other.returncode)

    def with_resumable(self, large: TransferReport, plan: TransferPlan) -> TransferReport:
        """This run of the files under RESUMABLE_BYTES joined with `large`'s of those it left: one report of `plan`.
        The counts of the whole tree are this run's (it listed every file)."""
        return self.joined(large, plan, tree=self, returncode=large.returncode or self.returncode)

    def joined(self, other: TransferReport, plan: TransferPlan, *, tree: TransferReport,
               returncode: int) -> TransferReport:
        """This run and `other` as one report of `plan`: what they did summed, the whole tree's counts `tree`'s."""
        whole_tree = ("files", "regular_files", "total_size")
        stats = {k: self.stats.get(k, 0) + other.stats.get(k, 0)
                 for k in {*self.stats, *other.stats} if k not in whole_tree}
        for key in whole_tree:
            stats[key] = tree.stats.get(key, self.stats.get(key, 0))
        return TransferReport(plan, returncode, [*self.items, *other.items], stats,
                              (self.stderr + other.stderr)[-20_000:], self.seconds + other.seconds, self.started)


def _failure(report: TransferReport, host: str) -> TransferFailed:
    code, stderr = report.returncode, report.stderr.strip()
    last = " ".join(line for line in stderr.splitlines()[-4:] if line.strip())[-500:]
    if "Another instance of rrsync is already accessing" in stderr:
        return TransferFailed(f"a transfer from {host} into the same folder is still running or ending",
                              "it is tried again shortly", returncode=code, stderr=stderr, transient=True)
    if "has been disabled on this server" in stderr or "rrsync error" in stderr:
        return TransferFailed(f"the destination refused the transfer from {host}: {last}",
                              "the sync account's restriction (rrsync) forbids this: re-run the sync role, or check "
                              "that a copy job is not asked to delete", returncode=code, stderr=stderr)
    if "Host key verification failed" in stderr:
        return TransferFailed(f"{host} does not know the destination's host key: {last}",
                              "re-run the sync role: it installs the destination's key from the operator's "
                              "known_hosts", returncode=code, stderr=stderr)
    if "Permission denied" in stderr and "publickey" in stderr:
        return TransferFailed(f"the destination refused {host}'s sync key: {last}",
                              "re-run the sync role on the destination (it authorises the key)", returncode=code,
                              stderr=stderr)
    if code in _TRANSIENT:
        return TransferFailed(f"rsync on {host}: {_TRANSIENT[code]} (exit {code}): {last}",
                              "it is tried again; check the link between the hosts if it persists", returncode=code,
                              stderr=stderr, transient=True)
    return TransferFailed(f"rsync on {host} failed (exit {code}): {last}",
                          "see rsync's message; fix the source or destination folder", returncode=code, stderr=stderr)


def run(runner: Runner, plan: TransferPlan, *, timeout: float | None = None,
        accept: Sequence[int] = (), progress: Callable[[Progress], None] | None = None) -> TransferReport:
    """Run `plan` on `runner`'s host. Exit codes 0 and 24 (files vanished from a live source), a stop at
    `stop_at`, and the codes in `accept` (25 when deletions were held back on purpose) return a report; any other
    failure raises TransferFailed. With `delay_updates`, in two rsync runs: the files under RESUMABLE_BYTES (and
    the deletions), then the larger ones the first listed, with `--delay-updates`. `progress` hears how far it is
    every PROGRESS_SECONDS."""
    if not plan.delay_updates or plan.dry_run or plan.deletions_only:  # nothing is written: one run says it all
        return _run_once(runner, plan, timeout, accept, _Reading(progress))
    clock = time.monotonic()
    reading = _Reading(progress)
    small = _run_once(runner, replace(plan, delay_updates=False, max_size=RESUMABLE_BYTES - 1), timeout, accept,
                      reading)
    if not small.oversized or small.stopped_early:
        return replace(small, plan=plan, oversized=[])
    left = None if timeout is None else max(1.0, timeout - (time.monotonic() - clock))
    large = _run_once(runner, replace(plan, files=tuple(small.oversized), delete=False, max_delete=None), left,
                      accept, reading.following())
    return small.with_resumable(large, plan)


def _run_once(runner: Runner, plan: TransferPlan, timeout: float | None, accept: Sequence[int],
              reading: _Reading) -> TransferReport:
    script = f'TZ=UTC rsync "$@"; echo "{EXIT_MARK}$?"'
    started = datetime.now(UTC)
    clock = time.monotonic()
    # ended with its session: a killed caller must not leave rsync writing on the destination
    done = stream(runner, ended_with_session(runner, ["sh", "-c", script, "rsync", *plan.argv()]),
                  on_line=reading.line, stdin=plan.stdin(), timeout=timeout)
    stdout = done.text
    code = done.returncode
    mark = stdout.rfind(EXIT_MARK)
    if mark >= 0:
        code = int(stdout[mark + len(EXIT_MARK):].split()[0])
        stdout = stdout[:mark]
    elif code == 0:
        code = -1  # the shell printed no exit code: it died
    report = TransferReport(plan, code, reading.items, parse_stats(stdout), done.stderr,
                            time.monotonic() - clock, started,
                            parse_oversized(stdout) if plan.max_size is not None else [])
    if code in (0, VANISHED, *accept) or report.stopped_early:
        return report
    if code == 127 or "rsync: not found" in done.stderr or "rsync: command not found" in done.stderr:
        raise TransferFailed(f"rsync is not installed on {runner.name}", "install rsync there (the sync role does)",
                             returncode=code, stderr=done.stderr)
    raise _failure(report, runner.name)


def with_files(plan: TransferPlan, files: Sequence[str]) -> TransferPlan:
    return replace(plan, files=tuple(files))
