"""What runs on a tier host during tier migration: scans, hashes, the steps of a move, and the catalog.

Shipped as source and run with the host's own `python3 -c` (standard library, plus python3-xxhash where the host
has it, as `backup/hostside.py`): one call per step of a batch of files, a JSON request on stdin, one JSON
object out. `python3 -c SOURCE OP`.

Operations:
- `scan`: every regular file below a tier's folder (size, mtime, atime), which of them a process holds open for
  writing (/proc/*/fd and fdinfo's flags: every process's when run as root), the folders holding the pin marker,
  the folders without subfolders with how many names each holds (a move may name such a folder whole to rsync),
  whether the filesystem keeps access times (not mounted `noatime`), the bytes used, the hashes this host has.
  Skipped: the migration's own folders (`.spark-tier*`), rsync's partial folders, and the catalog's files.
- `hash`: content hashes of some files (with their size and mtime_ns, read around the hash: a file that changed
  while it was read has none).
- `check`: a batch at the destination: the staged copies flushed to disk (one syncfs), each hashed, each final
  name hashed (a large batch: half of its work in a forked second process); the hashes as two columns.
- `place`: each verified staged copy renamed to its final name (the folder made, then flushed): a name shows
  the whole file or nothing. A staged folder holding only the batch's copies goes whole, where its final folder
  is not there yet.
- `delete`: each source file removed if it is still what was copied (size and mtime_ns); else left. The tier
  folder's ledger (`.spark-tier/moved-out.json`) counts the files removed, for the backup of that folder: a fall
  in its file count that tier migration made is not a vanished volume (`backup/hostside.py` reads it).
- `restore_times`: files that stay (an abandoned move) get back the access time rsync's read changed.
- `remove`: files removed (staged copies of a replayed batch, an abandoned copy); empty staging folders too.
- `catalog`: the migration catalog (SQLite, WAL), opened where the fleet keeps it.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator

# each host-side call starts an interpreter: the modules only some steps use are imported where they are used
# (hashlib, xxhash, sqlite3, threading, contextlib), and typing not at all (mypy reads TYPE_CHECKING as typing's)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_hashes: dict[str, Callable[[], Any]] = {}


def hashes() -> dict[str, Callable[[], Any]]:
    """The content hashes this host can make, by name: sha256, and XXH3 where it has python3-xxhash."""
    if not _hashes:
        import hashlib

        _hashes["sha256"] = hashlib.sha256
        try:
            import xxhash
        except ImportError:  # a host without python3-xxhash hashes with sha256, slower
            pass
        else:
            _hashes["xxh3_128"] = xxhash.xxh3_128
    return _hashes


STAGING = ".spark-tier-incoming"  # below a destination folder: copies not yet verified and placed
OWN_PREFIX = ".spark-tier"  # the migration's own folders (staging, the catalog's folder): never scanned
LEDGER = ".spark-tier/moved-out.json"  # below a tier's folder: how many files migration moved out, ever
SKIP_DIRS = (".~tmp~",)  # rsync's partial folder (--delay-updates)
CHUNK = 1 << 20
# a check of this much work hashes it in two processes, each about half of it: a file's work is its bytes and, for
# the interpreter's own work per file (most of a small file's), PER_FILE_BYTES
PARALLEL_CHECK_BYTES = 128 * 1024**2
PER_FILE_BYTES = 64 * 1024


def hash_file(path: str, algorithm: str, size: int | None = None) -> tuple[str, int, int] | None:
    """`algorithm:hex`, size and mtime_ns of `path`; None if it is gone or changed while being read. With `size`, a
    file of another size is not read: its hash is then `size:N` (it cannot match)."""
    # non-blocking: something other than a file at the path (a FIFO) must not hold the open; it has no hash
    flags = os.O_RDONLY | os.O_NONBLOCK
    try:
        try:  # reading for a hash is not a use: leave the access time alone where we may (owner, or root)
            fd = os.open(path, flags | getattr(os, "O_NOATIME", 0))
        except PermissionError:
            fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    try:  # os.read on the descriptor: a buffered file object doubled the cost of hashing a small file
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            return None
        if size is not None and before.st_size != size:
            return f"size:{before.st_size}", before.st_size, before.st_mtime_ns
        digest = hashes()[algorithm]()
        # up to the size fstat gave, not on to an empty read (a file that grows or shrinks meanwhile has another size
        # or time below, and no hash). A small file in one read of its size: `os.read(fd, CHUNK)` makes a 1 MiB
        # buffer each time, which cost 14 µs a file against 3.5 µs (100,000 files: a second of a check's CPU);
        # a large one through one buffer (16 MiB files: 0.15 s a GiB against 0.21 s)
        left = before.st_size
        if left <= CHUNK:
            digest.update(os.read(fd, left))
        else:
            buffer = memoryview(bytearray(CHUNK))
            while left > 0 and (got := os.readv(fd, [buffer])):
                digest.update(buffer[:got])
                left -= got
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        return None
    return f"{algorithm}:{digest.hexdigest()}", after.st_size, after.st_mtime_ns


def columns(spec: dict[str, Any]) -> dict[str, Any]:
    """A request sent as columns (`migrate.as_columns`), each field's values as a list again with its paths whole:
    `roots`, the prefix a path field was sent without; `same`, a field with one value for every entry; `alias`, a
    field sent as the equal one it names."""
    count: int = spec["count"]
    out: dict[str, Any] = dict(spec["columns"])
    out.update((key, out[other]) for key, other in spec.get("alias", {}).items())
    out.update((key, [value] * count) for key, value in spec.get("same", {}).items())
    for key, prefix in spec.get("roots", {}).items():
        out[key] = [prefix + value for value in out[key]]
    return out


def absolute(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """A request's entries, a dict each with its paths whole: sent as `columns` (what the controller sends), or as
    `entries`, a dict each (`roots`: the prefix each path key was sent without)."""
    if "columns" in spec:
        fields = columns(spec)
        return [dict(zip(fields, values, strict=True)) for values in zip(*fields.values(), strict=True)]
    entries: list[dict[str, Any]] = spec["entries"]
    for key, prefix in spec.get("roots", {}).items():
        for entry in entries:
            entry[key] = prefix + entry[key]
    return entries


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_folders(folder: str, like: str) -> None:
    """Make `folder` and its missing parents, owned as `like` is (the staged copy: the account that writes this
    tree). Made by root, a sync job sharing the tree could not write into them."""
    missing = []
    while not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    if not missing:
        return
    owner = os.stat(like)  # FileNotFoundError: no staged copy (the caller tells placed from missing)
    for path in reversed(missing):
        try:
            os.mkdir(path)
        except FileExistsError:
            if not os.path.isdir(path):
                raise  # a file has the folder's name: never chowned, never replaced
            continue  # made meanwhile by another writer: left as it made it
        if os.geteuid() == 0:
            os.chown(path, owner.st_uid, owner.st_gid)


def _open_for_writing(root: str) -> set[str]:
    """Paths below `root` that some process holds open for writing (what /proc lets this user see)."""
    prefix = root.rstrip("/") + "/"
    found: set[str] = set()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if not target.startswith(prefix):
                continue
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                    flags = next((int(line.split()[1], 8) for line in info if line.startswith("flags:")), 0)
            except (OSError, ValueError):
                flags = os.O_WRONLY  # it is open and we cannot tell how: take it as being written
            if flags & (os.O_WRONLY | os.O_RDWR):
                found.add(target[len(prefix):])
    return found


def _atime_kept(root: str) -> bool:
    """Whether the filesystem holding `root` updates access times (not mounted noatime)."""
    best, options = "", ""
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                parts = line.split()
                if len(parts) >= 4:
                    point = parts[1].replace("\\040", " ")
                    if (root == point or root.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                        best, options = point, parts[3]
    except OSError:
        return False
    return "noatime" not in options.split(",")


def _walk(root: str) -> Iterator[tuple[str, bool, list[os.DirEntry[str]]]]:
    """Each folder from `root` down, as `os.walk` top-down would give it (depth first, in name order, not through
    links, a folder it cannot read passed over): its path, whether it has a subfolder, and its other entries in name
    order. The migration's own folders and rsync's partial ones are not entered. Its own walk because it keeps each
    entry's path and type from the listing (os.walk's names cost a join and a stat each again: a third of a scan)."""
    below = [root]
    while below:
        folder = below.pop()
        try:
            with os.scandir(folder) as listing:
                found = sorted(listing, key=lambda entry: entry.name)
        except OSError:
            continue
        subfolders: list[os.DirEntry[str]] = []
        others: list[os.DirEntry[str]] = []
        for entry in found:
            try:
                is_folder = entry.is_dir()
            except OSError:
                is_folder = False
            (subfolders if is_folder else others).append(entry)
        yield folder, bool(subfolders), others
        below.extend(entry.path for entry in reversed(subfolders) if not entry.is_symlink()
                     and not entry.name.startswith(OWN_PREFIX) and entry.name not in SKIP_DIRS)


def scan(spec: dict[str, Any]) -> dict[str, Any]:
    root = spec["root"].rstrip("/") or "/"
    marker = spec.get("marker", "")
    skip_paths = set(spec.get("skip", []))
    algorithm = spec.get("hash")
    listed = spec.get("files", True)
    files: list[list[Any]] = []
    markers: list[str] = []
    leaves: dict[str, int] = {}  # folders without subfolders (the tier's own root aside): how many names each holds
    used = 0
    for folder, has_subfolders, names in _walk(root):
        rel_dir = os.path.relpath(folder, root)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        if listed and not has_subfolders and rel_dir:
            leaves[rel_dir.rstrip("/")] = len(names)
        if marker and any(entry.name == marker for entry in names):
            markers.append(rel_dir.rstrip("/"))
        for entry in names:
            path = entry.path
            if skip_paths and (path in skip_paths or any(path.startswith(p + "-") for p in skip_paths)):
                continue  # the catalog and its -wal/-shm files
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            used += st.st_size
            if listed:
                row: list[Any] = [rel_dir + entry.name, st.st_size, st.st_mtime_ns, st.st_atime_ns]
                if algorithm:
                    found = hash_file(path, algorithm)
                    row.append(found[0] if found else None)
                files.append(row)
    return {"root": root, "exists": os.path.isdir(root), "files": files, "used": used, "markers": markers,
            "leaves": leaves,
            "open": sorted(_open_for_writing(root)) if listed else [], "atime_kept": _atime_kept(root),
            "hashes": sorted(hashes()), "now": time.time()}


def hash_op(spec: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for path in spec["paths"]:
        found = hash_file(path, spec["algorithm"])
        out[path] = list(found) if found else None
    return {"hashes": out}


def _flush_filesystem(path: str) -> None:
    """Everything written to the filesystem holding `path` reaches the disk: one syncfs(2) for a whole batch of
    copies (one journal commit, where an fsync per small file costs one each); os.sync() where libc lacks it."""
    import ctypes

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if getattr(libc, "syncfs", None) is None or libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _check_rows(entries: list[dict[str, Any]], algorithm: str) -> list[list[str | None]]:
    """Each entry's staged copy and final name, as two columns: its hash, `size:N` when its size is not the expected
    one (it cannot match, so it is not read), or None when it is not there."""
    out: list[list[str | None]] = [[], []]
    folders: dict[str, bool] = {}  # whether each folder is there: a new tree's files are not asked for one by one
    for entry in entries:
        size = entry["size"]
        for key, column in zip(("staging", "final"), out, strict=True):
            path = entry[key]
            folder = path.rpartition("/")[0]  # os.path.dirname's own work, three times over, for 100,000 paths
            if folder not in folders:
                folders[folder] = os.path.isdir(folder)
            found = hash_file(path, algorithm, size) if folders[folder] else None  # opened once: no stat before
            column.append(found[0] if found else None)
    return out


def _check_rows_in_child(entries: list[dict[str, Any]], algorithm: str) -> Callable[[], list[list[str | None]]]:
    """`_check_rows` in a forked process (a second core hashes half the copies: most of a check of many small files
    is this interpreter's own work per file); returns the call that waits for its rows."""
    readable, writable = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its rows as JSON into the pipe, and nothing else of this process runs on
        status = 1
        try:
            os.close(readable)
            with open(writable, "wb") as pipe:
                pipe.write(json.dumps(_check_rows(entries, algorithm)).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(writable)

    def rows() -> list[list[str | None]]:
        with open(readable, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise RuntimeError(f"the check's second hashing process failed (wait status {status})")
        found: list[list[str | None]] = json.loads(data)
        return found

    return rows


def _halfway(entries: list[dict[str, Any]]) -> int:
    """Where to cut `entries` so that each part holds about half the check's work; all of them (no second process)
    when the whole is less than PARALLEL_CHECK_BYTES."""
    weights = [entry["size"] + PER_FILE_BYTES for entry in entries]
    total = sum(weights)
    if total < PARALLEL_CHECK_BYTES or len(entries) < 2:
        return len(entries)
    so_far = 0
    for index, weight in enumerate(weights):
        if so_far + weight / 2 >= total / 2:
            return max(1, index)
        so_far += weight
    return len(entries) - 1


def check(spec: dict[str, Any]) -> dict[str, Any]:
    """For each entry, in two columns: the staged copy's hash (`staging`, after the copies are flushed to disk) and
    the final name's hash (`final`), each None if absent; a file whose size differs from the expected one is not
    read (it cannot match). With `place` ({"keep": folders}), each staged copy whose hash is the entry's `expect` is
    then placed as `place` does (a third column says whether: `placed`): the verification and the rename in one
    call, in that order."""
    algorithm = spec["algorithm"]
    entries = absolute(spec)
    staging_root: str = spec.get("staging_root") or ""
    # many entries: the second half hashed by a child, forked before the flush's thread starts (a fork copies only
    # the thread that calls it)
    half = _halfway(entries) if (os.cpu_count() or 1) > 1 else len(entries)
    second_half = _check_rows_in_child(entries[half:], algorithm) if half < len(entries) else None
    # the flush waits on the disk, the hashes read the page cache: both at once, and nothing is answered before the
    # flush has returned (a copy's pages are the same whether read before or after their writeback)
    failed: list[BaseException] = []

    def flush_noting_failure() -> None:
        try:
            _flush_filesystem(staging_root)
        except BaseException as exc:  # raised in the caller's thread once it joins
            failed.append(exc)

    import threading

    flush = threading.Thread(target=flush_noting_failure, daemon=True) \
        if os.path.isdir(staging_root) else None
    if flush is not None:
        flush.start()
    staged, final = _check_rows(entries[:half], algorithm)
    if second_half is not None:
        more_staged, more_final = second_half()
        staged += more_staged
        final += more_final
    if flush is not None:
        flush.join()
        if failed:
            raise failed[0]
    out: dict[str, list[Any]] = {"staging": staged, "final": final}
    if "place" in spec:  # flushed, and each copy equal to the hash it was expected to have: renamed into place
        equal = [i for i, (entry, found) in enumerate(zip(entries, staged, strict=True))
                 if entry.get("expect") and found == entry["expect"]]
        placed = place({"keep": spec["place"]["keep"], "entries": [entries[i] for i in equal]})["entries"]
        out["placed"] = [False] * len(entries)
        for index, outcome in zip(equal, placed, strict=True):
            out["placed"][index] = outcome == "placed"
    return out


def _place_folder(staged: str, final: str, entries: list[dict[str, Any]]) -> bool:
    """Rename the staged folder `staged` whole to `final` when it holds exactly `entries`' copies (nothing else: no
    file of another batch, no temporary a killed copy left, no subfolder) and `final` is not there yet; a folder
    of a hundred files is then one rename, not a hundred. False, and nothing renamed, when it does not qualify."""
    if os.path.basename(staged) == STAGING or os.path.lexists(final):
        return False
    names = {e["staging"].rpartition("/")[2] for e in entries}
    if len(names) != len(entries) or any(e["final"].rpartition("/")[2] not in names for e in entries):
        return False
    try:
        if set(os.listdir(staged)) != names:
            return False
        for entry in entries:
            if entry.get("atime_ns"):
                os.utime(entry["staging"], ns=(entry["atime_ns"], entry["mtime_ns"]))
        _make_folders(os.path.dirname(final), staged)
        os.rename(staged, final)  # fails if `final` appeared meanwhile with files in it: then file by file
    except OSError:
        return False
    return True


def place(spec: dict[str, Any]) -> dict[str, Any]:
    """Rename each staged copy to its final name; one already placed (no staged copy, the final there) is done.
    A staged folder that holds only this batch's copies, whose final folder is not there yet, goes whole."""
    entries = absolute(spec)
    out: list[str | None] = [None] * len(entries)
    touched: set[str] = set()
    made: set[str] = set()  # folders known to exist: one makedirs per folder, not per file
    by_folder: dict[tuple[str, str], list[int]] = {}
    for index, entry in enumerate(entries):
        by_folder.setdefault((entry["staging"].rpartition("/")[0], entry["final"].rpartition("/")[0]), []).append(index)
    keep = set(spec.get("keep", []))  # folders a copy still running may write in: never renamed whole
    for (staged, final), indices in by_folder.items():
        if staged not in keep and _place_folder(staged, final, [entries[i] for i in indices]):
            for index in indices:
                out[index] = "placed"
            touched.add(os.path.dirname(final))
            made.add(final)
    for index, entry in enumerate(entries):
        if out[index] is not None:
            continue
        staging, final = entry["staging"], entry["final"]
        folder = os.path.dirname(final)
        try:
            if folder not in made:
                _make_folders(folder, staging)
                made.add(folder)
            if entry.get("atime_ns"):  # the file's last use travels with it (the lower tier's policy reads it)
                os.utime(staging, ns=(entry["atime_ns"], entry["mtime_ns"]))
            os.replace(staging, final)
        except FileNotFoundError:  # no staged copy: placed before (a replay), or gone
            if os.path.exists(staging):
                raise  # the copy is there and its folder is not: a real failure, not a finished entry
            out[index] = "placed" if os.path.exists(final) else "missing"
            continue
        touched.add(folder)
        out[index] = "placed"
    for folder in touched:
        _fsync_dir(folder)
    return {"entries": out}


def delete(spec: dict[str, Any]) -> dict[str, Any]:
    out = []
    touched: set[str] = set()
    for entry in absolute(spec):
        path = entry["path"]
        try:
            st = os.stat(path)
        except FileNotFoundError:
            out.append("missing")
            continue
        if (st.st_size, st.st_mtime_ns) != (entry["size"], entry["mtime_ns"]):
            out.append("changed")
            continue
        os.unlink(path)
        touched.add(path.rpartition("/")[0])
        out.append("deleted")
    for folder in touched:
        _fsync_dir(folder)
    if spec.get("root") and out.count("deleted"):
        count_moved_out(spec["root"], out.count("deleted"))
    return {"entries": out}


def count_moved_out(root: str, files: int) -> None:
    """Adds `files` to the tier folder's ledger, atomically (temporary, fsync, rename). Written after the deletes
    are flushed: a crash between the two undercounts, so a backup's shrink check stays the stricter one."""
    path = os.path.join(root, LEDGER)
    try:
        with open(path, encoding="utf-8") as handle:
            ledger = json.load(handle)
    except (FileNotFoundError, ValueError):
        ledger = {"files": 0}
    ledger = {"files": int(ledger.get("files", 0)) + files, "updated": time.time()}
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(ledger, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_dir(os.path.dirname(path))


def restore_times(spec: dict[str, Any]) -> dict[str, Any]:
    """Give files that stay (an abandoned move) back the access time they had before rsync read them, so that a
    failed move does not make them look used; a file that changed meanwhile is left alone."""
    restored = 0
    for entry in spec["entries"]:
        try:
            st = os.stat(entry["path"])
        except FileNotFoundError:
            continue
        if (st.st_size, st.st_mtime_ns) == (entry["size"], entry["mtime_ns"]) and entry["atime_ns"]:
            os.utime(entry["path"], ns=(entry["atime_ns"], entry["mtime_ns"]))
            restored += 1
    return {"restored": restored}


def remove(spec: dict[str, Any]) -> dict[str, Any]:
    import contextlib

    removed = 0
    for path in spec.get("paths", []):
        try:
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            pass
    for root in spec.get("staging_roots", []):  # what a killed copy left: rsync's partial files, empty folders
        if not os.path.isdir(root):
            continue
        for folder, dirs, names in os.walk(root, topdown=False):
            for name in names:
                if spec.get("all"):
                    os.unlink(os.path.join(folder, name))
                    removed += 1
            for name in dirs:
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(folder, name))
        with contextlib.suppress(OSError):
            os.rmdir(root)
    return {"removed": removed}


# --- the catalog ------------------------------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    origin_host TEXT NOT NULL, origin_path TEXT NOT NULL,
    tier TEXT NOT NULL, host TEXT NOT NULL, path TEXT NOT NULL,
    size INTEGER NOT NULL, hash TEXT NOT NULL, moved_at REAL NOT NULL,
    PRIMARY KEY (origin_host, origin_path)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS files_by_path ON files (origin_path);
CREATE INDEX IF NOT EXISTS files_by_place ON files (host, path);
"""
COLUMNS = ("origin_host", "origin_path", "tier", "host", "path", "size", "hash", "moved_at")
SELECT = "SELECT origin_host, origin_path, tier, host, path, size, hash, moved_at FROM files"
INSERT = ("INSERT OR REPLACE INTO files (origin_host, origin_path, tier, host, path, size, hash, moved_at) "
          "VALUES (?,?,?,?,?,?,?,?)")


class Catalog:
    """Original host and path → where the file is now. WAL, and synchronous=FULL: a commit that returned is on
    disk before the source is deleted."""

    def __init__(self, path: str) -> None:
        import sqlite3

        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def commit(self, rows: list[tuple[Any, ...]] | list[list[Any]]) -> int:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(INSERT, rows)
        return len(rows)

    def drop(self, keys: list[list[str]]) -> int:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("DELETE FROM files WHERE origin_host = ? AND origin_path = ?",
                                [tuple(k) for k in keys])
        return len(keys)

    def where(self, path: str, host: str | None = None) -> list[list[Any]]:
        """Entries of an original path (on `host`, or any), or of a file's present place."""
        if host is not None:
            rows = self.db.execute(SELECT + " WHERE origin_host = ? AND origin_path = ?",
                                   (host, path)).fetchall()
            rows += self.db.execute(SELECT + " WHERE host = ? AND path = ?", (host, path)).fetchall()
        else:
            rows = self.db.execute(SELECT + " WHERE origin_path = ?", (path,)).fetchall()
        return [list(r) for r in dict.fromkeys(rows)]

    def ls(self, host: str, folder: str = "", limit: int = 100_000) -> list[list[Any]]:
        """Entries whose original place is on `host`, below `folder` (a range scan of the primary key)."""
        args: tuple[str | int, ...]
        if not folder or folder == "/":
            query, args = SELECT + " WHERE origin_host = ? ORDER BY origin_path LIMIT ?", \
                (host, limit)
        else:
            low = folder.rstrip("/") + "/"
            high = folder.rstrip("/") + "0"  # the character after "/"
            query = (SELECT + " WHERE origin_host = ? AND origin_path >= ? AND origin_path < ? "
                     "ORDER BY origin_path LIMIT ?")
            args = (host, low, high, limit)
        return [list(r) for r in self.db.execute(query, args).fetchall()]

    def latest(self, hosts: list[str]) -> list[list[Any]]:
        """The entry moved last whose original place is on one of `hosts` (none: an empty list)."""
        marks = ",".join("?" * len(hosts))
        return [list(r) for r in self.db.execute(
            SELECT + f" WHERE origin_host IN ({marks}) ORDER BY moved_at DESC LIMIT 1", tuple(hosts))]

    def all(self) -> list[list[Any]]:
        return [list(r) for r in self.db.execute(SELECT + " ORDER BY origin_host, origin_path")]

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM files").fetchone()[0])

    def replace_all(self, rows: list[list[Any]]) -> int:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("DELETE FROM files")
            self.db.executemany(INSERT,
                                [tuple(r) for r in rows])
        return len(rows)


def catalog(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["op"] != "commit" and spec["op"] != "replace_all" and not os.path.exists(spec["db"]):
        if spec["op"] in ("where", "ls", "all", "latest"):
            return {"rows": [], "missing": True}
        if spec["op"] == "count":
            return {"count": 0, "missing": True}
    book = Catalog(spec["db"])
    try:
        op = spec["op"]
        if op == "commit":  # its rows as columns (`migrate.as_columns`) of the catalog's COLUMNS
            fields = columns(spec)
            return {"count": book.commit(list(zip(*(fields[name] for name in COLUMNS), strict=True)))}
        if op == "drop":
            return {"count": book.drop(spec["keys"])}
        if op == "where":
            return {"rows": book.where(spec["path"], spec.get("host"))}
        if op == "ls":
            return {"rows": book.ls(spec["host"], spec.get("folder", ""))}
        if op == "all":
            return {"rows": book.all()}
        if op == "latest":
            return {"rows": book.latest(spec["hosts"])}
        if op == "count":
            return {"count": book.count()}
        if op == "replace_all":
            return {"count": book.replace_all(spec["rows"])}
        raise ValueError(f"unknown catalog operation {op!r}")
    finally:
        book.close()


OPS = {"scan": scan, "hash": hash_op, "check": check, "place": place, "delete": delete, "remove": remove,
       "restore_times": restore_times, "catalog": catalog}


def main() -> None:
    # a short-lived process whose rows, entries and lists form no cycles: the cyclic collector's walks of them (a
    # tenth of a scan of 100,000 files) buy nothing, reference counting frees what goes
    import gc

    gc.disable()
    op = sys.argv[1]
    spec = json.loads(sys.stdin.read() or "{}")
    sys.stdout.write(json.dumps(OPS[op](spec), separators=(",", ":")))  # one write: json.dump writes per token


if __name__ == "__main__":
    main()
