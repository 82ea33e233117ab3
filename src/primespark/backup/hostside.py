"""What runs on a fleet host during a backup or a drill: restic beside a content hasher, in one process.

Shipped as source and run with the host's own `python3 -c` (standard library, plus python3-xxhash where the
host has it: the restic role installs it; without it files are hashed with sha256). One SSH round trip per
phase, and every extra restic start overlaps the main one: each start costs restic's key derivation (~0.6 s
of one core), which would otherwise add up serially.

- `backup`: runs `restic backup -vv --json` and, at the same time, the `restic backup --stdin` that will store
  the manifest. Each file restic reports saved is hashed (XXH3-128) right away, while it is in the page cache,
  by niced worker processes; a file whose size, mtime, inode and ctime equal the previous run's record keeps
  its hash (the cache, 0600). When the data snapshot is written, the manifest (path -> hash, size,
  mtime_ns, inode, ctime_ns) goes down the waiting stdin.
- `drill`: runs `restic restore latest --verify` and `restic dump` of the newest manifest at the same time;
  when restic starts verifying, the restored tree is hashed beside it; then restored == manifest is judged.

Input: a JSON spec on stdin (after the environment lines the SSH runner consumes). Output: one JSON object.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import signal
import stat
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

try:
    import xxhash
except ImportError:  # a host without python3-xxhash still backs up and drills, at sha256's pace
    xxhash = None

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


def hash_of(manifest: dict[str, Any]) -> str:
    return str(manifest.get("hash", "sha256"))


def digest(path: str, algorithm: str = PREFERRED) -> list[Any] | None:
    """[hash, size, mtime_ns, inode, ctime_ns] of a regular file; None if it is not one or changed while
    being read. The manifest compares size and mtime (restic restores both); the cache also needs inode and
    ctime, as restic's own change detection does, so that a file edited with its mtime put back is hashed again."""
    try:
        # O_NOFOLLOW: a symlink is not followed; O_NONBLOCK: a FIFO does not block the open
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
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
    return [sha.hexdigest(), *identity(after)]


def digests(paths: list[str], algorithm: str = PREFERRED) -> list[list[Any] | None]:
    return [digest(p, algorithm) for p in paths]


def identity(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def hashers(niceness: int = 0) -> Any:
    """Worker processes, made before restic starts so they hold none of its pipes. Processes, not threads:
    thousands of small files make the hash bound by Python's per-file work under the GIL (measured on 15k
    files: two threads 1.85 s, one 1.25 s, two processes 0.58 s)."""
    return multiprocessing.get_context("fork").Pool(max(2, os.cpu_count() or 1), initializer=os.nice,
                                                    initargs=(niceness,))


def hash_tree(root: str, workers: Any, algorithm: str = PREFERRED) -> dict[str, list[Any]]:
    """Every regular file under `root`, keyed as restic names it in the snapshot ("/" + path below root)."""
    paths = [os.path.join(d, n) for d, _, names in os.walk(root) for n in names]
    batches = [(paths[i:i + BATCH], algorithm) for i in range(0, len(paths), BATCH)]
    hashes = [h for batch in workers.starmap(digests, batches) for h in batch]
    return {"/" + os.path.relpath(p, root): h for p, h in zip(paths, hashes, strict=True) if h is not None}


def compare(files: dict[str, list[Any]], restored: dict[str, list[Any]]) -> dict[str, Any]:
    """Restored tree against the manifest. A file the source changed while restic read it (its size or mtime
    differs from what restic restored) is counted, not compared: its hash is of another version."""
    result: dict[str, Any] = {"matched": 0, "mismatched": [], "missing": [], "unexpected": [], "changed": []}
    for path, entry in sorted(files.items()):
        got = restored.get(path)
        if got is None:
            result["missing"].append(path)
        elif entry is None or got[1:3] != entry[1:3]:
            result["changed"].append(path)
        elif got[0] != entry[0]:
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


def start(argv: list[str], stdin: bool = False) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Interrupt a restic that is no longer wanted: on SIGINT it removes its lock and writes nothing."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def json_lines(lines: Iterable[bytes]) -> Iterable[dict[str, Any]]:
    for line in lines:
        if line.startswith(b"{"):
            try:
                yield json.loads(line)
            except ValueError:
                continue


# --- backup -----------------------------------------------------------------------------------------------


def load_cache(path: str | None) -> dict[str, list[Any]]:
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            data = json.load(f)
        return dict(data["files"]) if data.get("format") == FORMAT and hash_of(data) == PREFERRED else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def save_cache(path: str, manifest: dict[str, Any]) -> None:
    """Atomically, 0600 (it names every file of the host). No fsync: after a crash a torn cache reads as
    empty, and the next run hashes everything again."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f)
    os.replace(tmp, path)


def unchanged(path: str, cache: dict[str, list[Any]]) -> list[Any] | None:
    """The last run's entry for `path` if the file is still exactly that one (size, mtime, inode, ctime)."""
    known = cache.get(path)
    if known is None:
        return None
    try:
        return known if identity(os.lstat(path)) == known[1:] else None
    except OSError:
        return None


def backup(spec: dict[str, Any]) -> dict[str, Any]:
    # niced: restic's own threads come first, the hash fills the time they leave idle
    with hashers(19) as workers:
        manifest_proc = start(spec["manifest"], stdin=True) if spec.get("manifest") else None
        data = start(spec["data"])
        data_err = Drain(data.stderr)
        cache = load_cache(spec.get("cache"))
        summary: dict[str, Any] | None = None
        hashed = 0
        files: dict[str, list[Any] | None] = {}
        batch: list[str] = []
        pending: deque[tuple[list[str], Any]] = deque()

        def collect(keep: int) -> None:
            while len(pending) > keep:  # bounded memory on a host with a million files
                paths, result = pending.popleft()
                files.update(zip(paths, result.get(), strict=True))

        for message in json_lines(data.stdout):  # type: ignore[arg-type]
            kind = message.get("message_type")
            if kind == "verbose_status" and not str(message.get("item", "/")).endswith("/"):
                item = message["item"]
                known = unchanged(item, cache)
                if known is not None:
                    files[item] = known
                    continue
                hashed += 1
                batch.append(item)
                if len(batch) == BATCH:
                    pending.append((batch, workers.apply_async(digests, (batch,))))
                    batch = []
                    collect(MAX_PENDING)
            elif kind == "summary":
                summary = message
        if batch:
            pending.append((batch, workers.apply_async(digests, (batch,))))
        returncode = data.wait()
        collect(0)
    result: dict[str, Any] = {"returncode": returncode, "summary": summary, "stderr": data_err.text(),
                              "files": len(files), "unhashed": sorted(p for p, h in files.items() if h is None),
                              "hashed_now": hashed}
    snapshot = (summary or {}).get("snapshot_id")
    if manifest_proc is None:
        return result
    if returncode not in (0, 3) or not snapshot:
        stop(manifest_proc)
        return result
    manifest = {"format": FORMAT, "hash": PREFERRED, "host": spec["host"], "run": spec["run"], "snapshot": snapshot,
                "files": files}
    body = json.dumps(manifest, sort_keys=True).encode()
    saving = threading.Thread(target=save_cache, args=(spec["cache"], manifest)) if spec.get("cache") else None
    if saving:
        saving.start()  # beside restic storing the manifest
    out, err = manifest_proc.communicate(body)
    stored = list(json_lines(out.splitlines()))
    result["manifest"] = {"returncode": manifest_proc.returncode, "stderr": err.decode(errors="replace"),
                          "summary": next((m for m in stored if m.get("message_type") == "summary"), None)}
    if manifest_proc.returncode != 0:
        result["manifest"]["body"] = body.decode()  # the controller stores it again with retries
    if saving:
        saving.join()
    return result


# --- drill ------------------------------------------------------------------------------------------------


def drill(spec: dict[str, Any]) -> dict[str, Any]:
    target = spec["target"]
    os.makedirs(target, mode=0o700, exist_ok=True)
    with hashers() as workers, ThreadPoolExecutor(1) as background:
        dump = start(spec["dump"])
        dump_out, dump_err = Drain(dump.stdout), Drain(dump.stderr)
        restore = start(spec["restore"])
        restore_err = Drain(restore.stderr)
        restoring: str | None = None
        hashing: Future[dict[str, list[Any]]] | None = None
        for raw in restore.stdout:  # type: ignore[union-attr]
            line = raw.decode(errors="replace")
            if restoring is None and RESTORING.match(line):
                restoring = line.strip()
            elif line.startswith("verifying files in") and hashing is None:
                # restic's verify re-reads the restored tree; the hash reads it beside it, from the page cache
                hashing = background.submit(hash_tree, target, workers)
        returncode = restore.wait()
        restored = hashing.result() if hashing is not None else hash_tree(target, workers)
        dump.wait()
    prefixes = {p: p.rstrip("/") + "/" for p in spec.get("probes", [])}
    result: dict[str, Any] = {"returncode": returncode, "stderr": restore_err.text(), "restoring": restoring,
                              "verified": hashing is not None, "restored_files": len(restored),
                              "present": {p: any(k.startswith(pre) for k in restored) for p, pre in prefixes.items()}}
    result["dump"] = {"returncode": dump.returncode, "stderr": dump_err.text()}
    match = RESTORING.match(restoring or "")
    manifest = None
    if dump.returncode == 0:
        try:
            manifest = json.loads(dump_out.data)
        except ValueError:
            result["dump"]["stderr"] += "\nthe manifest is not JSON"
    readable = manifest and manifest.get("format") in READABLE_FORMATS
    if readable and match and manifest["snapshot"].startswith(match[1]):
        result["manifest"] = {k: v for k, v in manifest.items() if k != "files"}
        algorithm = hash_of(manifest)
        if algorithm not in HASHES:
            result["hash_problem"] = (f"the manifest was hashed with {algorithm}, which this host's Python lacks: "
                                      "install python3-xxhash (the restic role does)")
            return result
        if algorithm != PREFERRED:  # made where xxhash was missing, or before: hashed again its way
            with hashers() as workers:
                restored = hash_tree(target, workers, algorithm)
        result["comparison"] = compare(manifest["files"], restored)
    else:  # not the restored snapshot's manifest (or none): the controller finds the right one
        result["restored"], result["hash"] = restored, PREFERRED
    return result


def main() -> None:
    spec = json.load(sys.stdin)
    phases = {"backup": backup, "drill": drill}
    try:
        out = phases[sys.argv[1]](spec)
    except FileNotFoundError as exc:  # restic itself is missing: said as such, not as a traceback
        out = {"not_installed": exc.filename}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
