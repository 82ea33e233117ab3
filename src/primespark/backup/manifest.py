"""Content manifests: a hash (XXH3-128) per file of the source as restic read it, stored in the repository
inside the data snapshot.

The hashing runs on the host, in the same process that runs restic (`hostside`): the manifest is made while
restic derives its key, and saved by the same restic run as a file of a folder on the host (`manifest_dir`),
so it travels with `restic copy` and is restored with the data. Where restic's own list of what it saved
disagrees with the manifest it holds, the right manifest goes in a second, small snapshot (stdin) with the
run's tag (`primespark-run-<id>`), found again by its data snapshot's tag. A drill restores, hashes the
restored tree while restic verifies it, and compares.
"""

from __future__ import annotations

import json
import secrets
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from primespark.backup import hostside
from primespark.backup.policy import BACKUP_TAG, MANIFEST_TAG
from primespark.restic import (
    BackupSummary,
    Completed,
    ResticClient,
    ResticError,
    ResticNotInstalled,
    RestoreFailed,
    Snapshot,
    classify,
)

MANIFEST_FILE = hostside.MANIFEST_FILE
RUN_TAG_PREFIX = "primespark-run-"
HOSTSIDE_SOURCE = Path(hostside.__file__).read_text()


class HashError(ResticError):
    """The host-side session itself failed (not restic): no Python on the host, a crash, garbled output."""


def new_run_id() -> str:
    return secrets.token_hex(6)


def run_tag(run_id: str) -> str:
    return f"{RUN_TAG_PREFIX}{run_id}"


def run_of(snapshot: Snapshot) -> str | None:
    return next((t.removeprefix(RUN_TAG_PREFIX) for t in snapshot.tags if t.startswith(RUN_TAG_PREFIX)), None)


def run_hostside(client: ResticClient, phase: str, spec: dict[str, Any]) -> dict[str, Any]:
    """One host-side session with the repository's credentials in its environment (never in argv)."""
    runner = client.runner
    # a fleet host's own python3; here, this interpreter (not whatever `python3` a shim on PATH starts)
    python = "python3" if getattr(runner, "remote", False) else sys.executable
    proc = client.scrub(runner.run([python, "-c", HOSTSIDE_SOURCE, phase], env=client.environment(),
                                   stdin=json.dumps(spec).encode(), timeout=client.timeout))
    try:
        out = json.loads(proc.stdout)
    except ValueError:
        out = None
    if isinstance(out, dict) and "not_installed" in out:
        raise ResticNotInstalled(f"{out['not_installed']!r} is not installed on {runner.name}")
    if proc.returncode != 0 or not isinstance(out, dict):
        raise HashError(f"the {phase} session on {runner.name} failed (exit {proc.returncode}): "
                        f"{proc.stderr.strip()[-500:]}", returncode=proc.returncode, stderr=proc.stderr)
    return out


@dataclass
class BackupRun:
    summary: BackupSummary
    run_id: str
    files: int
    hashed_now: int
    unhashed: list[str]
    manifest_snapshot: str | None  # the data snapshot itself when the manifest is inside it
    manifest_pending: bytes | None = field(default=None, repr=False)  # to store again when the first try failed
    manifest_error: str | None = None
    manifest_embedded: bool = False
    embed_problem: str | None = None  # why the manifest folder could not be used

    @property
    def separate_manifest(self) -> str | None:
        """The manifest's own snapshot, when it is not inside the data snapshot (copied offsite beside it)."""
        return None if self.manifest_embedded else self.manifest_snapshot


def backup_with_manifest(
    client: ResticClient, paths: list[str], *, host: str, excludes: list[str] | None = None,
    time: datetime | None = None, cache: str | None = None, manifest_dir: str | None = None,
) -> BackupRun:
    """restic backup of `paths` with its content manifest, in one session on the client's host."""
    run_id = new_run_id()
    tags = [BACKUP_TAG, run_tag(run_id)]
    data = client.command(*client.backup_args(paths, excludes=excludes or [], tags=tags, host=host, time=time,
                                              verbose=True))
    separate = client.command(*client.backup_stdin_args(MANIFEST_FILE, tags=[MANIFEST_TAG, run_tag(run_id)],
                                                        host=host))
    out = run_hostside(client, "backup", {"data": data, "manifest": separate, "host": host, "run": run_id,
                                          "cache": cache, "manifest_dir": manifest_dir, "paths": paths,
                                          "excludes": excludes or []})
    proc = client.scrub(Completed(tuple(data), out["returncode"], b"", out["stderr"]))
    if proc.returncode not in (0, 3):
        raise classify(proc, f"restic backup on {client.runner.name}")
    if not out.get("summary"):
        raise ResticError(f"restic backup on {client.runner.name} printed no summary", stderr=proc.stderr)
    summary = BackupSummary.model_validate(out["summary"])
    done = BackupRun(summary, run_id, out["files"], out["hashed_now"], out["unhashed"], None,
                     manifest_embedded=bool(out.get("embedded")), embed_problem=out.get("embed_problem"))
    if done.manifest_embedded:
        done.manifest_snapshot = summary.snapshot_id
    else:
        stored = out.get("manifest") or {}
        done.manifest_snapshot = (stored.get("summary") or {}).get("snapshot_id")
        if stored.get("returncode") != 0:
            done.manifest_pending = str(stored.get("body", "")).encode()
            done.manifest_error = str(stored.get("stderr", "")).strip()[-300:]
    client.backup_result(proc, summary)  # exit 3 raises BackupIncomplete, after the manifest is stored
    return done


def store_manifest(client: ResticClient, run: BackupRun, host: str) -> str | None:
    """Second try at a manifest whose first store failed (the data snapshot is already safe)."""
    if run.manifest_pending is None:
        return run.manifest_snapshot
    summary = client.backup_stdin(run.manifest_pending, MANIFEST_FILE, tags=[MANIFEST_TAG, run_tag(run.run_id)],
                                  host=host)
    run.manifest_snapshot, run.manifest_pending = summary.snapshot_id, None
    return run.manifest_snapshot


@dataclass
class Comparison:
    matched: int = 0
    mismatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # changed while restic read them: not compared

    @property
    def ok(self) -> bool:
        return not (self.mismatched or self.missing or self.unexpected)


@dataclass
class RestoreRun:
    snapshot_short_id: str | None
    snapshot_time: datetime | None
    restored_files: int
    restore_error: RestoreFailed | None
    comparison: Comparison | None
    manifest_problem: str | None
    present: dict[str, bool] = field(default_factory=dict)  # probed path -> some file restored under it


def parse_restoring(line: str | None) -> tuple[str, datetime] | None:
    """restic's "restoring <Snapshot 1a2b3c4d of [...] at 2026-11-26 13:02:58.372297218 +0000 UTC by ...>"."""
    match = hostside.RESTORING.match(line or "")
    if not match:
        return None
    stamp = match[2].removesuffix(" UTC").split(" m=")[0]
    day, clock, offset = [*stamp.split(" "), "+0000"][:3]
    whole, _, fraction = clock.partition(".")
    try:
        return match[1], datetime.strptime(f"{day} {whole}.{(fraction + '000000')[:6]} {offset}",
                                           "%Y-%m-%d %H:%M:%S.%f %z")
    except ValueError:
        return None


def restore_and_compare(
    client: ResticClient, host: str, target: str, probes: list[str] | None = None, manifest_dir: str | None = None,
) -> RestoreRun:
    """Restore the newest backup of `host` into `target` with `--verify`, hash it, compare with its manifest
    (the one restored from `manifest_dir`, or else the one its run stored apart)."""
    restore = client.command("restore", "latest", "--host", host, "--tag", BACKUP_TAG, "--target", target,
                             "--verify", json_output=False)
    out = run_hostside(client, "drill", {"restore": restore, "target": target, "probes": probes or [],
                                         "manifest_dir": manifest_dir})
    parsed = parse_restoring(out.get("restoring"))
    error = None
    if out["returncode"] != 0:
        proc = client.scrub(Completed(tuple(restore), out["returncode"], b"", out["stderr"]))
        typed = classify(proc, f"restic restore on {client.runner.name}")
        if type(typed) is not ResticError:
            raise typed  # unreachable repository, wrong password, lock: not a verdict on the backup
        if parsed is None:
            raise typed  # nothing was restored (no snapshot, …): the drill reports the reason
        problems = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("Fatal: There")]
        error = RestoreFailed(f"restic restore of {parsed[0]} on {client.runner.name} failed: "
                              + "; ".join(problems[:8]), problems, returncode=proc.returncode, stderr=proc.stderr)
    if parsed is None:
        raise ResticError(f"restic restore on {client.runner.name} did not say which snapshot it restored: "
                          f"{out.get('restoring')!r}")
    run = RestoreRun(parsed[0], parsed[1], out["restored_files"], error, None, None, out.get("present", {}))
    inside = Comparison(**out["comparison"]) if "comparison" in out else None
    if "hash_problem" in out:
        run.manifest_problem = f"{out['hash_problem']} (on {client.runner.name})"
    elif inside is not None and inside.ok:
        run.comparison = inside
    else:  # none inside the snapshot, or it disagrees: a manifest stored apart by the same run decides
        apart, problem = _compare_by_run_tag(client, host, parsed[0], out["restored"], out["hash"])
        run.comparison = apart or inside
        run.manifest_problem = None if run.comparison else problem
    return run


def _compare_by_run_tag(
    client: ResticClient, host: str, short_id: str, restored: dict[str, list[Any]], algorithm: str
) -> tuple[Comparison | None, str | None]:
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
                          f"and {client.runner.name} hashed with {algorithm}: install python3-xxhash on both")
        return Comparison(**hostside.compare(manifest["files"], restored)), None
    except (ResticError, ValueError, KeyError, TypeError) as exc:
        return None, f"the content manifest of snapshot {short_id} cannot be read: {exc}"
