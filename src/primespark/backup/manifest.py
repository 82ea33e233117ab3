"""Content manifests: a hash (XXH3-128) per file of the source as restic read it, kept in the repository.

A manifest is saved inside its data snapshot (a file of a folder on the host, `MANIFEST_FILE`), so it travels
with `restic copy` and is restored with the data. When that cannot be, it goes in a snapshot of its own with
the run's tag (`primespark-run-<id>`), found again by its data snapshot's tag; retention drops it with its
data. The sessions that make and compare manifests are `session.py` (controller) and `hostside.py` (host).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from primespark.backup import hostside
from primespark.restic import ResticClient, ResticError, Snapshot

MANIFEST_FILE = hostside.MANIFEST_FILE
BACKUP_TAG = "primespark-backup"  # data snapshots
MANIFEST_TAG = "primespark-manifest"  # manifests stored apart from their data
RUN_TAG_PREFIX = "primespark-run-"  # one per backup run, on its data snapshot and on a manifest stored apart


def new_run_id() -> str:
    return secrets.token_hex(6)


def run_tag(run_id: str) -> str:
    return f"{RUN_TAG_PREFIX}{run_id}"


def run_of(snapshot: Snapshot) -> str | None:
    return next((t.removeprefix(RUN_TAG_PREFIX) for t in snapshot.tags if t.startswith(RUN_TAG_PREFIX)), None)


@dataclass
class Comparison:
    matched: int = 0
    mismatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    changed_during_backup: list[str] = field(default_factory=list)  # restic may have read another version

    @classmethod
    def of(cls, raw: dict[str, Any]) -> Comparison:
        return cls(**raw)

    @property
    def ok(self) -> bool:
        return not (self.mismatched or self.missing or self.unexpected)


def store_manifest(client: ResticClient, body: bytes, run_id: str, host: str) -> str | None:
    """A manifest in a snapshot of its own (a second try after the session's first failed); its snapshot id."""
    summary = client.backup_stdin(body, MANIFEST_FILE, tags=[MANIFEST_TAG, run_tag(run_id)], host=host)
    return summary.snapshot_id


def compare_with_separate_manifest(
    client: ResticClient, host: str, short_id: str, restored: dict[str, list[Any]], algorithm: str
) -> tuple[Comparison | None, str | None]:
    """The restored tree against the manifest that the run of snapshot `short_id` stored apart."""
    snapshots = client.snapshots(host=host)
    data = next((s for s in snapshots if s.id.startswith(short_id)), None)
    run_id = run_of(data) if data else None
    found = [s for s in snapshots if MANIFEST_TAG in s.tags and run_id and run_tag(run_id) in s.tags]
    if not found:
        return None, f"no content manifest for snapshot {short_id}: cannot compare hashes"
    try:
        manifest = json.loads(client.dump(found[-1].id, f"/{MANIFEST_FILE}"))
        if hostside.hash_of(manifest) != algorithm:
            return None, (f"the content manifest of snapshot {short_id} was hashed with {hostside.hash_of(manifest)} "
                          f"and {client.host} hashed with {algorithm}: install python3-xxhash on both")
        tree = {path: hostside.Entry(*raw) for path, raw in restored.items()}
        return Comparison.of(hostside.compare(hostside.entries(manifest["files"]), tree)), None
    except (ResticError, ValueError, KeyError, TypeError) as exc:
        return None, f"the content manifest of snapshot {short_id} cannot be read: {exc}"
