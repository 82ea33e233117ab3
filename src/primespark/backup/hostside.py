"""What runs on a fleet host during a backup or a drill: restic beside a content hasher, in one process.

Shipped as source and run with the host's own `python3 -c` (standard library, plus python3-xxhash where the
host has it: the restic role installs it; without it files are hashed with sha256). One SSH round trip per
phase, and one restic start per phase: each start costs restic's key derivation (~0.6 s of one core).

- `backup`: starts `restic backup -vv --json` of the plan's paths plus the manifest folder, and while restic
  derives its key (one core busy, the other idle) walks the same paths as restic would (its exclude patterns,
  regular files) and hashes every file (XXH3-128) with niced worker processes; a file whose size, mtime, inode
  and ctime equal the previous run's record keeps its hash (the cache, 0600). The manifest (path -> hash, size,
  mtime_ns, inode, ctime_ns) is then renamed into the manifest folder, which restic lists after the data (it
  sorts later in the lab and the bench; where it does not, see below), so it lands in the data snapshot itself.
  restic's own list of the files it saved decides: if restic saved the manifest and exactly the files hashed,
  nothing else runs. Otherwise (restic listed the folder first, a file appeared while it ran, a file was
  written between its hash and restic's read, an exclude read otherwise, the folder cannot be written) the
  manifest of what restic saved goes in a second, separate snapshot (stdin) with the run's tag.
- `drill`: runs `restic restore latest --verify`; when restic starts verifying, the restored tree is hashed
  beside it; the restored manifest is read from the tree; then restored == manifest is judged.

Input: a JSON spec on stdin (after the environment lines the SSH runner consumes). Output: one JSON object.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import posixpath
import re
import select
import signal
import stat
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

xxhash: Any
try:
    import xxhash
except ImportError:  # a host without python3-xxhash still backs up and drills, at sha256's pace
    xxhash = None

MANIFEST_FILE = "primespark-manifest.json"
TIER_LEDGER = ".spark-tier/moved-out.json"  # data/tierside.py's LEDGER: files tier migration moved out of a tier
FORMAT = 3  # 3: the manifest names its hash; 2 (sha256, unnamed) is still read
READABLE_FORMATS = (2, 3)
# XXH3-128 runs at ~12 GB/s on a core here, sha256 (SHA-NI) at ~1.3 GB/s, and a backup has no core to spare.
# A non-cryptographic hash is enough: it finds restored bytes that differ from the source's; tampering with
# the repository is restic's MAC's to find, and the manifest itself lives inside the encrypted repository.
HASHES: dict[str, Any] = {"sha256": hashlib.sha256, **({"xxh3_128": xxhash.xxh3_128} if xxhash else {})}
PREFERRED = "xxh3_128" if xxhash else "sha256"
BUFFER = bytearray(1 << 20)
BATCH = 64  # files per job sent to a hashing process
MAX_PENDING = 256  # jobs in flight
# restic's text line naming the snapshot it restores (stable since 0.9): "restoring <Snapshot 1a2b3c4d of
# [/data] at 2026-11-26 13:02:58.37 +0000 UTC by root@pi-1> to /target"
RESTORING = re.compile(r"^restoring <Snapshot ([0-9a-f]+) of \[.*\] at (.+?) by .*> to ")


class Identity(NamedTuple):
    """What says a file is still the one that was hashed. The manifest compares size and mtime (restic
    restores both); the cache also needs inode and ctime, as restic's own change detection does, so that a
    file edited with its mtime put back is hashed again."""

    size: int
    mtime_ns: int
    inode: int
    ctime_ns: int


class Entry(NamedTuple):
    """A manifest entry: the content hash and the file's identity when hashed (a JSON list in the manifest)."""

    hash: str
    size: int
    mtime_ns: int
    inode: int
    ctime_ns: int

    @property
    def identity(self) -> Identity:
        return Identity(self.size, self.mtime_ns, self.inode, self.ctime_ns)

    @property
    def version(self) -> tuple[int, int]:
        """Size and mtime: what a restore gives back, so what tells two versions of a file apart."""
        return self.size, self.mtime_ns


def entries(files: dict[str, Any]) -> dict[str, Entry | None]:
    """A manifest's `files` as read from JSON: path -> Entry, or None for a file changed during the backup."""
    return {path: None if raw is None else Entry(*raw) for path, raw in files.items()}


def hash_of(manifest: dict[str, Any]) -> str:
    return str(manifest.get("hash", "sha256"))


def digest(path: str, algorithm: str = PREFERRED) -> Entry | None:
    """The entry of a regular file; None if it is not one or changed while being read."""
    # O_NOFOLLOW: a symlink is not followed; O_NONBLOCK: a FIFO does not block the open; O_NOATIME: hashing is
    # not a use (the tier policy ages files by access time; restic reads the same way), refused unless root or owner
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        try:
            fd = os.open(path, flags | getattr(os, "O_NOATIME", 0))
        except PermissionError:
            fd = os.open(path, flags)
    except OSError:
        return None
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            return None
        sha = HASHES[algorithm]()
        view = memoryview(BUFFER)  # one buffer per process: no allocation per file (most files are small)
        while count := os.readv(fd, [view]):
            sha.update(view[:count])
        after = os.fstat(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    if identity(before) != identity(after):
        return None
    return Entry(sha.hexdigest(), *identity(after))


def digests(paths: list[str], algorithm: str = PREFERRED) -> list[Entry | None]:
    return [digest(p, algorithm) for p in paths]


def identity(st: os.stat_result) -> Identity:
    return Identity(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def hashers(niceness: int = 0) -> Any:
    """Worker processes, made before restic starts so they hold none of its pipes. Processes, not threads:
    thousands of small files make the hash bound by Python's per-file work under the GIL (measured on 15k
    files: two threads 1.85 s, one 1.25 s, two processes 0.58 s)."""
    return multiprocessing.get_context("fork").Pool(max(2, os.cpu_count() or 1), initializer=os.nice,
                                                    initargs=(niceness,))


def hash_tree(root: str, workers: Any, algorithm: str = PREFERRED) -> dict[str, Entry]:
    """Every regular file under `root`, keyed as restic names it in the snapshot ("/" + path below root)."""
    paths = [os.path.join(d, n) for d, _, names in os.walk(root) for n in names]
    batches = [(paths[i:i + BATCH], algorithm) for i in range(0, len(paths), BATCH)]
    hashes = [h for batch in workers.starmap(digests, batches) for h in batch]
    return {"/" + os.path.relpath(p, root): h for p, h in zip(paths, hashes, strict=True) if h is not None}


def compare(files: dict[str, Entry | None], restored: dict[str, Entry]) -> dict[str, Any]:
    """Restored tree against the manifest. A file the source changed while restic read it (its size or mtime
    differs from what restic restored) is counted, not compared: its hash is of another version."""
    result: dict[str, Any] = {"matched": 0, "mismatched": [], "missing": [], "unexpected": [],
                              "changed_during_backup": []}
    for path, entry in sorted(files.items()):
        got = restored.get(path)
        if got is None:
            result["missing"].append(path)
        elif entry is None or got.version != entry.version:
            result["changed_during_backup"].append(path)
        elif got.hash != entry.hash:
            result["mismatched"].append(path)
        else:
            result["matched"] += 1
    result["unexpected"] = sorted(p for p in restored if p not in files)
    return result


class Drain(threading.Thread):
    """Reads a pipe to the end in the background (a full stderr pipe would stall restic)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(daemon=True)
        self.stream, self.data = stream, b""
        self.start()

    def run(self) -> None:
        self.data = self.stream.read()

    def text(self) -> str:
        self.join()
        return self.data.decode(errors="replace")


STARTED: list[subprocess.Popen[bytes]] = []  # the restic processes of this session, ended if the controller goes
CONTROLLER_GONE = 75  # this session's exit code when its controller went away and it ended its restic
END_GRACE_SECONDS = 30.0  # restic, interrupted, removes its lock and exits; past this it is killed
ANSWER = threading.Lock()  # the session ends once: by its answer, or (held to the exit) by its controller's loss


def start(argv: list[str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    STARTED.append(proc)
    return proc


def end_started(grace: float = END_GRACE_SECONDS) -> None:
    """SIGINT to every restic this session started (restic saves no snapshot, removes its lock), SIGKILL to any
    still there after `grace`."""
    running = [proc for proc in STARTED if proc.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGINT)
    for proc in running:
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()


def watch_controller(out_fd: int, on_gone: Any) -> threading.Thread | None:
    """Call `on_gone` once the reader of `out_fd` (a pipe or socket: the controller's SSH session, or its own
    pipe) has closed it. Without a pty, sshd ends no process when its client dies: a worker killed mid-backup
    would leave this session and its restic running on the host, saving a snapshot beside the rescheduled run's
    and writing while the repository's lock is free. None where `out_fd` is a file or a terminal (no reader to lose)."""
    mode = os.fstat(out_fd).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return None

    def wait() -> None:
        poller = select.poll()
        poller.register(out_fd, 0)  # no event asked: only POLLERR (a pipe's reader closed) or POLLHUP (a socket's)
        while not poller.poll():
            pass
        on_gone()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def controller_gone() -> None:
    ANSWER.acquire()  # the phase, its restic interrupted, must not go on to answer (or to store a manifest)
    end_started()
    os._exit(CONTROLLER_GONE)


def json_lines(lines: Iterable[bytes]) -> Iterable[dict[str, Any]]:
    for line in lines:
        if line.startswith(b"{"):
            try:
                yield json.loads(line)
            except ValueError:
                continue


# --- backup: which files restic saves ------------------------------------------------------------------


class Excludes:
    """restic's `--exclude` patterns, matched as restic 0.14+ matches them (internal/filter): the pattern and
    the absolute path split at "/"; a pattern starting with "/" must match from the root, any other matches at
    any depth; each part is a Go `filepath.Match` glob; "**" stands for any number of parts. A pattern this
    cannot read makes `unknown` true: then restic's own list decides (see `backup`)."""

    def __init__(self, patterns: list[str]) -> None:
        self.unknown = False
        self.patterns = []
        for pattern in filter(None, patterns):  # restic skips empty patterns
            clean = posixpath.normpath(pattern)
            clean = "/" + clean.lstrip("/") if clean.startswith("/") else clean  # as Go's Clean: "//a" is "/a"
            try:
                self.patterns.append([p if p == "**" else _part(p) for p in clean.split("/")])
            except (ValueError, IndexError, re.error):
                self.unknown = True

    def __call__(self, path: str, parent_checked: bool = False) -> bool:
        """`parent_checked`: the folder holding `path` was matched already (and was not excluded), so only the
        placings that end at the last part are new."""
        if not self.patterns:  # most plans: no split per file
            return False
        parts = path.split("/")
        return any(_match(pattern, parts, parent_checked) for pattern in self.patterns)


def _part(glob: str) -> str | re.Pattern[str]:
    """A Go filepath.Match glob as a regex (a plain string when it has no special characters)."""
    if not any(c in glob for c in "\\[]*?"):
        return glob
    out, i = [], 0
    while i < len(glob):
        c = glob[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\":
            i += 1
            out.append(re.escape(glob[i]))  # a trailing backslash: IndexError, a ValueError
        elif c == "[":
            items: list[str] = []
            j, negate = i + 1, glob[i + 1:i + 2] == "^"
            j += negate
            while glob[j] != "]" or not items:  # an unclosed class: IndexError
                lo, j = _class_char(glob, j)
                if glob[j] == "-":
                    hi, j = _class_char(glob, j + 1)
                    items.append(f"{re.escape(lo)}-{re.escape(hi)}")
                else:
                    items.append(re.escape(lo))
            out.append(f"[{'^/' if negate else ''}{''.join(items)}]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z", re.S)


_STAR = _part("*")


def _class_char(glob: str, j: int) -> tuple[str, int]:
    if glob[j] in "-]":
        raise ValueError("bad pattern")  # as Go's filepath.Match says
    return (glob[j + 1], j + 2) if glob[j] == "\\" else (glob[j], j + 1)


def _match(pattern: list[str | re.Pattern[str]], parts: list[str], at_end: bool = False) -> bool:
    if "**" in pattern:  # tried as zero, one, two, ... single-part wildcards, as restic does
        pos = pattern.index("**")
        return any(_match(pattern[:pos] + [_STAR] * n + pattern[pos + 1:], parts, at_end)
                   for n in range(len(parts) - len(pattern) + 2))
    if len(pattern) > len(parts):
        return False
    last = len(parts) - len(pattern)
    anchored = bool(pattern) and pattern[0] == ""  # "/..." matches from the root only
    offsets = [0] if anchored else range(last, -1, -1)
    if at_end:
        offsets = [last] if not anchored or last == 0 else []
    return any(all(p == s if isinstance(p, str) else p.match(s) for p, s in zip(pattern, parts[offset:], strict=False))
               for offset in offsets)


def saved_files(paths: list[str], excludes: Excludes, skip: str | None) -> Iterator[str]:
    """The regular files `restic backup` saves from `paths`, in its order: restic does not follow symlinks,
    and names neither them nor special files in its list; an excluded folder is skipped whole; a target inside
    another is walked once, as restic saves it once."""
    targets = sorted({posixpath.normpath(p) for p in paths})
    for target in [t for t in targets if not any(t.startswith(o.rstrip("/") + "/") for o in targets if o != t)]:
        if excludes(target):
            continue
        try:
            mode = os.lstat(target).st_mode
        except OSError:
            continue
        if stat.S_ISREG(mode):
            yield target
        elif not stat.S_ISDIR(mode) or target == skip:
            continue
        folders = [target]
        while folders:
            folder = folders.pop()
            try:
                with os.scandir(folder) as listing:
                    entries = sorted(listing, key=lambda e: e.name)
            except OSError:
                continue
            below = []
            for entry in entries:
                if entry.path == skip or excludes(entry.path, parent_checked=True):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    below.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    yield entry.path
            folders.extend(reversed(below))


# --- backup -----------------------------------------------------------------------------------------------


def load_cache(path: str | None) -> dict[str, Entry | None]:
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            data = json.load(f)
        return entries(data["files"]) if data.get("format") == FORMAT and hash_of(data) == PREFERRED else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def write_private(path: str, body: bytes, staging: str | None = None) -> None:
    """Atomically, 0600 (a manifest names every file of the host), written in `staging` (same file system)
    and renamed into place. No fsync: after a crash a torn cache reads as empty and is rebuilt."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = os.path.join(staging or os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(body)
    os.replace(tmp, path)


def empty_manifest_folder(folder: str) -> str:
    """The folder the manifest is renamed into, made (0700) and emptied: restic must find in it this run's
    manifest or nothing. Returns the manifest's path; raises OSError when the folder cannot be had."""
    os.makedirs(folder, mode=0o700, exist_ok=True)
    for name in os.listdir(folder):
        os.unlink(os.path.join(folder, name))
    return os.path.join(folder, MANIFEST_FILE)


def unchanged(path: str, cache: dict[str, Entry | None]) -> Entry | None:
    """The last run's entry for `path` if the file is still exactly that one (size, mtime, inode, ctime)."""
    known = cache.get(path)
    if known is None:
        return None
    try:
        return known if identity(os.lstat(path)) == known.identity else None
    except OSError:
        return None


class Saved(threading.Thread):
    """restic's `-vv --json` output, read as it comes: the files it saved, its summary, and for each file it
    read (new or modified) the file's identity right after restic reported it saved: equal to the identity
    it had when hashed, the file did not change in between (any write moves ctime), so restic read what was
    hashed."""

    def __init__(self, stream: Any) -> None:
        super().__init__(daemon=True)
        self.stream, self.files = stream, set[str]()
        self.summary: dict[str, Any] | None = None
        self.read_as: dict[str, Identity | None] = {}
        self.start()

    def run(self) -> None:
        for message in json_lines(self.stream):
            kind = message.get("message_type")
            if kind == "verbose_status" and not str(message.get("item", "/")).endswith("/"):
                item = message["item"]
                self.files.add(item)
                if message.get("action") != "unchanged":  # unchanged: restic kept the parent's content
                    try:
                        self.read_as[item] = identity(os.lstat(item))
                    except OSError:
                        self.read_as[item] = None
            elif kind == "summary":
                self.summary = message

    def changed_since_hashed(self, files: dict[str, Entry | None]) -> list[str]:
        return [p for p, now in self.read_as.items()
                if (entry := files.get(p)) is not None and entry.identity != now]


def hash_files(paths: Iterable[str], cache: dict[str, Entry | None],
               workers: Any) -> tuple[dict[str, Entry | None], int]:
    """path -> its entry (None: changed while read), and how many files were hashed now."""
    files: dict[str, Entry | None] = {}
    batch: list[str] = []
    pending: deque[tuple[list[str], Any]] = deque()
    hashed = 0

    def collect(keep: int) -> None:
        while len(pending) > keep:  # bounded memory on a host with a million files
            done, result = pending.popleft()
            files.update(zip(done, result.get(), strict=True))

    for path in paths:
        known = unchanged(path, cache)
        if known is not None:
            files[path] = known
            continue
        hashed += 1
        files[path] = None  # its place in the walk's order; the hash fills it in
        batch.append(path)
        if len(batch) == BATCH:
            pending.append((batch, workers.apply_async(digests, (batch,))))
            batch = []
            collect(MAX_PENDING)
    if batch:
        pending.append((batch, workers.apply_async(digests, (batch,))))
    collect(0)
    return files, hashed


def write_cache(path: str | None, body: bytes, problems: list[str]) -> None:
    """The cache is disposable (a missing one costs a rehash): a failure to write it is a warning."""
    if not path:
        return
    try:
        write_private(path, body)
    except OSError as exc:
        problem = f"the manifest cache {path} cannot be written ({exc.strerror}): every file is hashed again next time"
        if problem not in problems:
            problems.append(problem)


def tiered_out(paths: list[str]) -> int | None:
    """How many files tier migration has moved out (ever) of the tier folders holding `paths`: each path's own
    ledger or its nearest parent's, each ledger counted once. None where no path lies in a tier's folder.
    A ledger above a path counts files moved from beside it too: a fall that size passes the shrink check."""
    ledgers = set()
    for path in paths:
        folder = os.path.abspath(path)
        while True:
            if os.path.isfile(os.path.join(folder, TIER_LEDGER)):
                ledgers.add(os.path.join(folder, TIER_LEDGER))
                break
            if folder == os.path.dirname(folder):
                break
            folder = os.path.dirname(folder)
    if not ledgers:
        return None
    total = 0
    for ledger in ledgers:
        try:
            with open(ledger, encoding="utf-8") as handle:
                total += int(json.load(handle).get("files", 0))
        except (OSError, ValueError, AttributeError):
            return None  # unreadable: no discount, the stricter check
    return total


def backup(spec: dict[str, Any]) -> dict[str, Any]:
    paths = list(spec["paths"])
    # A plan path that is not there (a volume that did not mount) would make an empty or shrunk snapshot that
    # looks like a success: refused unless the run was told it is expected; then the paths that are there.
    missing = [p for p in paths if not os.path.lexists(p)]
    if missing and (not spec.get("accept_missing") or len(missing) == len(paths)):
        return {"missing": missing}
    data_argv = list(spec["data"])
    if missing:  # the argv ends with `--` and the paths
        data_argv = data_argv[:len(data_argv) - len(paths)] + [p for p in paths if p not in missing]
        paths = [p for p in paths if p not in missing]
    folder = spec.get("manifest_dir")
    problem = None
    try:
        manifest_path = empty_manifest_folder(folder) if folder else None
    except OSError as exc:
        manifest_path, problem = None, f"the manifest folder {folder} cannot be used: {exc.strerror}"
    cache = load_cache(spec.get("cache"))
    cache_problems: list[str] = []
    excludes = Excludes(spec.get("excludes", []))
    # niced: restic's key derivation keeps its core, the hash takes the one it leaves idle
    with hashers(19) as workers:
        data = start(data_argv + ([folder] if manifest_path else []))
        data_err, saved = Drain(data.stderr), Saved(data.stdout)
        files, hashed = hash_files(saved_files(paths, excludes, folder), cache, workers)
        # the walk's order is restic's: the same files give the same bytes, which restic stores once
        manifest = {"format": FORMAT, "hash": PREFERRED, "host": spec["host"], "run": spec["run"], "files": files}
        body = json.dumps(manifest).encode()
        if manifest_path and folder:
            write_private(manifest_path, body, staging=os.path.dirname(folder))
        write_cache(spec.get("cache"), body, cache_problems)  # while restic runs
        returncode = data.wait()
        saved.join()
        restic_files = {p for p in saved.files if folder is None or not p.startswith(folder + "/")}
        changed = saved.changed_since_hashed(files)
        embedded = (manifest_path in saved.files and not excludes.unknown and not changed
                    and restic_files == files.keys())
        if not embedded:  # the manifest of what restic saved: files it saved that the walk did not see, hashed now
            files = {p: files[p] if p in files else digest(p) for p in restic_files}
            files.update(dict.fromkeys(changed))  # restic may have read another version: counted, not compared
            write_cache(spec.get("cache"), json.dumps({**manifest, "files": files}).encode(), cache_problems)
    result: dict[str, Any] = {"returncode": returncode, "summary": saved.summary, "stderr": data_err.text(),
                              "files": len(files),
                              "changed_during_backup": sorted(p for p, h in files.items() if h is None),
                              "hashed_now": hashed, "embedded": embedded, "embed_problem": problem,
                              "missing": missing, "cache_problems": cache_problems, "tiered_out": tiered_out(paths)}
    snapshot = (saved.summary or {}).get("snapshot_id")
    if embedded or not spec.get("manifest") or returncode not in (0, 3) or not snapshot:
        return result
    body = json.dumps({**manifest, "snapshot": snapshot, "files": files}, sort_keys=True).encode()
    stored = subprocess.run(spec["manifest"], input=body, capture_output=True)
    result["manifest"] = {"returncode": stored.returncode, "stderr": stored.stderr.decode(errors="replace"),
                          "summary": next((m for m in json_lines(stored.stdout.splitlines())
                                           if m.get("message_type") == "summary"), None)}
    if stored.returncode != 0:
        result["manifest"]["body"] = body.decode()  # the controller stores it again with retries
    return result


# --- drill ------------------------------------------------------------------------------------------------


def drill(spec: dict[str, Any]) -> dict[str, Any]:
    target = spec["target"]
    os.makedirs(target, mode=0o700, exist_ok=True)
    with hashers() as workers, ThreadPoolExecutor(1) as background:
        restore = start(spec["restore"])
        restore_err = Drain(restore.stderr)
        restoring: str | None = None
        hashing: Future[dict[str, Entry]] | None = None
        assert restore.stdout is not None  # stdout=PIPE
        for raw in restore.stdout:
            line = raw.decode(errors="replace")
            if restoring is None and RESTORING.match(line):
                restoring = line.strip()
            elif line.startswith("verifying files in") and hashing is None:
                # restic's verify re-reads the restored tree; the hash reads it beside it, from the page cache
                hashing = background.submit(hash_tree, target, workers)
        returncode = restore.wait()
        restored = hashing.result() if hashing is not None else hash_tree(target, workers)
    prefixes = {p: p.rstrip("/") + "/" for p in spec.get("probes", [])}
    result: dict[str, Any] = {"returncode": returncode, "stderr": restore_err.text(), "restoring": restoring,
                              "verified": hashing is not None, "restored_files": len(restored),
                              "present": {p: any(k.startswith(pre) for k in restored) for p, pre in prefixes.items()}}
    manifest, algorithm = None, PREFERRED
    if folder := spec.get("manifest_dir"):  # the manifest restored with the data, itself not compared
        restored = {k: v for k, v in restored.items() if not k.startswith(folder + "/")}
        try:
            with open(target + os.path.join(folder, MANIFEST_FILE), "rb") as f:
                manifest = json.load(f)
        except (OSError, ValueError):
            manifest = None
    if isinstance(manifest, dict) and manifest.get("format") in READABLE_FORMATS:
        result["manifest"] = {k: v for k, v in manifest.items() if k != "files"}
        algorithm = hash_of(manifest)
        if algorithm not in HASHES:
            result["hash_problem"] = (f"the manifest was hashed with {algorithm}, which this host's Python lacks: "
                                      "install python3-xxhash (the restic role does)")
            return result
        if algorithm != PREFERRED:  # made where xxhash was missing, or before: hashed again its way
            with hashers() as workers:
                restored = {k: v for k, v in hash_tree(target, workers, algorithm).items() if k in restored}
        comparison = compare(entries(manifest["files"]), restored)
        result["comparison"] = comparison
        if not (comparison["mismatched"] or comparison["missing"] or comparison["unexpected"]):
            return result
    # no manifest inside the snapshot, or one that disagrees: the controller looks for a separate one
    result["restored"], result["hash"] = restored, algorithm
    return result


def main() -> None:
    spec = json.load(sys.stdin)
    watch_controller(sys.stdout.fileno(), controller_gone)
    phases = {"backup": backup, "drill": drill}
    try:
        out = phases[sys.argv[1]](spec)
    except FileNotFoundError as exc:  # restic itself is missing: said as such, not as a traceback
        out = {"not_installed": exc.filename}
    with ANSWER:
        json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
