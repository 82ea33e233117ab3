"""Content manifests: sha256 per file of the source as it was at snapshot time, kept in the repository.

Right after a backup the source host hashes exactly the files the snapshot holds (`restic ls`), keeping a
file only if its size and mtime still equal the snapshot's record — so the hash is of the content restic
saved, not of a later edit. The manifest is stored as its own small snapshot (stdin, tagged with the data
snapshot's id), so it lives beside the data, travels with `restic copy`, and leaves the data untouched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from primespark.backup.policy import MANIFEST_TAG
from primespark.restic import Node, ResticClient, ResticError, Runner, Snapshot

MANIFEST_FILE = "primespark-manifest.json"

# Runs on the hosts (python3 is there for Ansible). argv[1]: "files" hashes the paths given on stdin (one JSON
# list); "tree" hashes every regular file under argv[2]. Output: {path: [sha256, size, mtime_ns]} or null.
HASH_SCRIPT = r"""
import hashlib, json, os, stat, sys
from concurrent.futures import ThreadPoolExecutor
def digest(p):
    try:
        st = os.lstat(p)
        if not stat.S_ISREG(st.st_mode):
            return None
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return [h.hexdigest(), st.st_size, st.st_mtime_ns]
    except OSError:
        return None
if sys.argv[1] == "files":
    paths = json.load(sys.stdin)
    keys = paths
else:
    root = sys.argv[2]
    paths = [os.path.join(d, n) for d, _, names in os.walk(root) for n in names]
    keys = ["/" + os.path.relpath(p, root) for p in paths]
# hashlib releases the GIL: one thread per core hashes in parallel
with ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as pool:
    out = dict(zip(keys, pool.map(digest, paths, chunksize=64)))
if sys.argv[1] != "files":
    out = {k: v for k, v in out.items() if v is not None}
json.dump(out, sys.stdout)
"""


def manifest_tag(snapshot_id: str) -> str:
    """Tags the manifest with its data snapshot (short id: restic's backup summary gives only that)."""
    return f"snapshot-{snapshot_id[:8]}"


class HashError(Exception):
    pass


def hash_files(runner: Runner, paths: list[str]) -> dict[str, list | None]:
    proc = runner.run(["python3", "-c", HASH_SCRIPT, "files"], stdin=json.dumps(paths).encode())
    if proc.returncode != 0:
        raise HashError(f"hashing files on {runner.name} failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


def hash_tree(runner: Runner, root: str) -> dict[str, list]:
    proc = runner.run(["python3", "-c", HASH_SCRIPT, "tree", root])
    if proc.returncode != 0:
        raise HashError(f"hashing {root} on {runner.name} failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


def _mtime_us(value: datetime) -> int:
    return (value - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


@dataclass
class Manifest:
    host: str
    snapshot: str
    created: str
    files: dict[str, str] = field(default_factory=dict)
    changed_since_snapshot: list[str] = field(default_factory=list)

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        return cls(**json.loads(raw))


def build_manifest(host: str, snapshot_id: str, nodes: list[Node], hashes: dict[str, list | None]) -> Manifest:
    manifest = Manifest(host, snapshot_id, datetime.now(UTC).isoformat())
    for node in nodes:
        if node.type != "file":
            continue
        got = hashes.get(node.path)
        same = (got is not None and got[1] == node.size and node.mtime is not None
                and got[2] // 1000 == _mtime_us(node.mtime))
        if same:
            manifest.files[node.path] = got[0]  # type: ignore[index]
        else:
            manifest.changed_since_snapshot.append(node.path)
    return manifest


def record_manifest(client: ResticClient, source: Runner, host: str, snapshot_id: str) -> Manifest:
    """Hash the snapshot's files on the source host and store the manifest beside the snapshot."""
    nodes = [n for n in client.ls(snapshot_id) if n.type == "file"]
    manifest = build_manifest(host, snapshot_id, nodes, hash_files(source, [n.path for n in nodes]))
    client.backup_stdin(manifest.to_json(), MANIFEST_FILE, tags=[MANIFEST_TAG, manifest_tag(snapshot_id)], host=host)
    return manifest


def load_manifest(client: ResticClient, snapshot: Snapshot) -> Manifest | None:
    """The manifest of `snapshot`; in an offsite copy it is tagged with the original snapshot's id."""
    found = client.snapshots(tags=[manifest_tag(snapshot.original or snapshot.id)])
    found = [s for s in found if MANIFEST_TAG in s.tags]
    if not found:
        return None
    try:
        return Manifest.from_json(client.dump(found[-1].id, f"/{MANIFEST_FILE}"))
    except (ResticError, ValueError, TypeError):
        return None


@dataclass
class Comparison:
    matched: int = 0
    mismatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.mismatched or self.missing or self.unexpected)


def compare(manifest: Manifest, restored: dict[str, list]) -> Comparison:
    """`restored` maps snapshot paths (as in the manifest) to [sha256, size, mtime_ns]."""
    result = Comparison()
    for path, digest in sorted(manifest.files.items()):
        got = restored.get(path)
        if got is None:
            result.missing.append(path)
        elif got[0] != digest:
            result.mismatched.append(path)
        else:
            result.matched += 1
    known = set(manifest.files) | set(manifest.changed_since_snapshot)
    result.unexpected = sorted(p for p in restored if p not in known)
    return result
