"""The controller's half of a host-side session (`hostside.py`): one SSH call per backup or drill, which
starts restic on the host beside the content hasher, and reads back one JSON object.

- A backup saves the manifest inside the data snapshot; where restic's own list of what it saved disagrees
  with the manifest it holds, the manifest of what restic saved goes in a second, small snapshot (stdin)
  with the run's tag (see `manifest.py`).
- A drill restores with `--verify`, hashes the restored tree while restic verifies it, reads the restored
  manifest and compares; a manifest stored apart decides where the one inside disagrees or is missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from primespark.backup import hostside
from primespark.backup.manifest import (
    BACKUP_TAG,
    MANIFEST_FILE,
    MANIFEST_TAG,
    Comparison,
    compare_with_separate_manifest,
    new_run_id,
    run_tag,
)
from primespark.errors import StepFailed
from primespark.restic import BackupSummary, ResticClient, ResticError, ResticNotInstalled, RestoreFailed

HOSTSIDE_SOURCE = Path(hostside.__file__).read_text()


class SessionFailed(ResticError):
    """The host-side session itself failed (not restic): no Python on the host, a crash, garbled output."""


class BackupRefused(StepFailed):
    """The backup would not hold the host's data (a plan path missing, no files, a fall in the file count
    beyond backup.max_shrink): failed with the reason, unless the run was told it is expected."""


ACCEPT_HINT = "if this is expected, run the backup again with --accept-shrink (the flow's accept_shrink)"


def run_session(client: ResticClient, phase: str, spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """One host-side session with the repository's credentials in its environment (never in argv)."""
    proc = client.run_python(HOSTSIDE_SOURCE, phase, stdin=json.dumps(spec).encode(), timeout=timeout)
    try:
        out = json.loads(proc.stdout)
    except ValueError:
        out = None
    if isinstance(out, dict) and "not_installed" in out:
        raise ResticNotInstalled(f"{out['not_installed']!r} is not installed on {client.host}")
    if proc.returncode != 0 or not isinstance(out, dict):
        raise SessionFailed(f"the {phase} session on {client.host} failed (exit {proc.returncode}): "
                            f"{proc.stderr.strip()[-500:]}", returncode=proc.returncode, stderr=proc.stderr)
    if "stderr" in out:
        out["stderr"] = client.scrub(str(out["stderr"]))
    return out


# --- backup -----------------------------------------------------------------------------------------------


@dataclass
class BackupRun:
    summary: BackupSummary
    run_id: str
    files: int
    hashed_now: int
    changed_during_backup: list[str]  # written while restic read them: in the manifest, not compared by drills
    manifest_snapshot: str | None  # the data snapshot itself when the manifest is inside it
    manifest_pending: bytes | None = field(default=None, repr=False)  # to store again when the first try failed
    manifest_error: str | None = None
    manifest_embedded: bool = False
    embed_problem: str | None = None  # why the manifest folder could not be used
    missing_paths: list[str] = field(default_factory=list)  # plan paths not there (the run accepted it)
    cache_problems: list[str] = field(default_factory=list)  # the manifest cache could not be written: warnings
    earlier_attempt: bool = False  # saved by an earlier attempt of the same run, kept rather than made twice
    tiered_out: int | None = None  # files tier migration ever moved out of the paths' tier folders (its ledgers)

    @property
    def separate_manifest(self) -> str | None:
        """The manifest's own snapshot, when it is not inside the data snapshot (copied offsite beside it)."""
        return None if self.manifest_embedded else self.manifest_snapshot


def backup_with_manifest(
    client: ResticClient, paths: list[str], *, host: str, excludes: list[str] | None = None,
    time: datetime | None = None, cache: str | None = None, manifest_dir: str | None = None,
    accept_missing: bool = False, timeout: float | None = None, run_id: str | None = None,
) -> BackupRun:
    """restic backup of `paths` with its content manifest, in one session on the client's host. A path that
    is not there refuses the backup (`BackupRefused`) unless `accept_missing`; `timeout` ends the session.
    `run_id` (a flow run's id) makes the backup once per run: a snapshot an earlier attempt saved is returned."""
    if run_id and (earlier := earlier_attempt(client, host, run_id, manifest_dir)) is not None:
        return earlier
    run_id = run_id or new_run_id()
    tags = [BACKUP_TAG, run_tag(run_id)]
    data = client.command(*client.backup_args(paths, excludes=excludes or [], tags=tags, host=host, time=time,
                                              verbose=True))
    separate = client.command(*client.backup_stdin_args(MANIFEST_FILE, tags=[MANIFEST_TAG, run_tag(run_id)],
                                                        host=host))
    out = run_session(client, "backup", {"data": data, "manifest": separate, "host": host, "run": run_id,
                                         "cache": cache, "manifest_dir": manifest_dir, "paths": paths,
                                         "excludes": excludes or [], "accept_missing": accept_missing},
                      timeout=timeout)
    if "returncode" not in out:  # refused before restic started
        missing = list(out.get("missing") or [])
        every = " (none of its paths is there)" if len(missing) == len(paths) else ""
        raise BackupRefused(f"backup of {host} refused: the plan path{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(missing)} {'are' if len(missing) > 1 else 'is'} not there on "
                            f"{client.host}{every}",
                            "check that the volume is mounted and the path is right (backup.plans."
                            f"{host}.paths, services' backup_paths); {ACCEPT_HINT}"
                            + (" — with no path there, nothing can be backed up" if every else ""))
    returncode, stderr = int(out["returncode"]), str(out["stderr"])
    if returncode not in (0, 3):
        raise client.failed("backup", returncode, stderr)
    if not out.get("summary"):
        raise ResticError(f"restic backup on {client.host} printed no summary", stderr=stderr)
    summary = BackupSummary.model_validate(out["summary"])
    done = BackupRun(summary, run_id, out["files"], out["hashed_now"], out["changed_during_backup"], None,
                     manifest_embedded=bool(out.get("embedded")), embed_problem=out.get("embed_problem"),
                     missing_paths=list(out.get("missing") or []), cache_problems=list(out.get("cache_problems") or []),
                     tiered_out=out.get("tiered_out"))
    if done.manifest_embedded:
        done.manifest_snapshot = summary.snapshot_id
    else:
        stored = out.get("manifest") or {}
        done.manifest_snapshot = (stored.get("summary") or {}).get("snapshot_id")
        if stored.get("returncode") != 0:
            done.manifest_pending = str(stored.get("body", "")).encode()
            done.manifest_error = client.scrub(str(stored.get("stderr", ""))).strip()[-300:]
    client.backup_result(returncode, stderr, summary)  # exit 3 raises BackupIncomplete, after the manifest is stored
    return done


def earlier_attempt(client: ResticClient, host: str, run_id: str, manifest_dir: str | None) -> BackupRun | None:
    """The snapshot an earlier attempt of run `run_id` saved: a worker killed after restic saved it and before
    the run ended leaves it, and the rescheduled run must not back up twice. Its counts come from its manifest;
    one whose manifest cannot be read is forgotten (with its run's other snapshots) and the backup made again."""
    # a listing with no lock of its own: the flow holds the repository's writer lock already
    tagged = client.snapshots(host=host, tags=[run_tag(run_id)], no_lock=True)
    data = [s for s in tagged if BACKUP_TAG in s.tags]
    if not data:
        return None
    snapshot, apart = data[-1], [s for s in tagged if MANIFEST_TAG in s.tags]
    # short ids, as restic's backup summary gives them
    sources = ([(snapshot.short_id, f"{manifest_dir.rstrip('/')}/{MANIFEST_FILE}", True)] if manifest_dir else []) + \
        [(s.short_id, f"/{MANIFEST_FILE}", False) for s in apart[-1:]]
    for source, path, embedded in sources:
        try:
            files = hostside.entries(json.loads(client.dump(source, path))["files"])
        except (ResticError, ValueError, KeyError, TypeError, AttributeError):
            continue
        size = sum(entry.size for entry in files.values() if entry is not None)
        summary = BackupSummary(snapshot_id=snapshot.short_id, total_files_processed=len(files) + embedded,
                                total_bytes_processed=size)
        return BackupRun(summary, run_id, len(files), 0, [], source, manifest_embedded=embedded, earlier_attempt=True)
    client.forget_ids([s.id for s in tagged])
    return None


# --- drill ------------------------------------------------------------------------------------------------


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
    timeout: float | None = None,
) -> RestoreRun:
    """Restore the newest backup of `host` into `target` with `--verify`, hash it, compare with its manifest
    (the one restored from `manifest_dir`, or else the one its run stored apart)."""
    restore = client.command("restore", "latest", "--host", host, "--tag", BACKUP_TAG, "--target", target,
                             "--verify", json_output=False)
    out = run_session(client, "drill", {"restore": restore, "target": target, "probes": probes or [],
                                        "manifest_dir": manifest_dir}, timeout=timeout)
    parsed = parse_restoring(out.get("restoring"))
    error = None
    if out["returncode"] != 0:
        stderr = str(out["stderr"])
        typed = client.failed("restore", int(out["returncode"]), stderr)
        if type(typed) is not ResticError or parsed is None:
            # unreachable repository, wrong password, lock: not a verdict on the backup; or nothing was
            # restored (no snapshot, …): the drill reports the reason
            raise typed
        problems = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith("Fatal: There")]
        error = RestoreFailed(f"restic restore of {parsed[0]} on {client.host} failed: " + "; ".join(problems[:8]),
                              problems, returncode=typed.returncode, stderr=stderr)
    if parsed is None:
        raise ResticError(f"restic restore on {client.host} did not say which snapshot it restored: "
                          f"{out.get('restoring')!r}")
    run = RestoreRun(parsed[0], parsed[1], out["restored_files"], error, None, None, out.get("present", {}))
    inside = Comparison.of(out["comparison"]) if "comparison" in out else None
    if "hash_problem" in out:
        run.manifest_problem = f"{out['hash_problem']} (on {client.host})"
    elif inside is not None and inside.ok:
        run.comparison = inside
    else:  # none inside the snapshot, or it disagrees: a manifest stored apart by the same run decides
        apart, problem = compare_with_separate_manifest(client, host, parsed[0], out["restored"], out["hash"])
        run.comparison = apart or inside
        run.manifest_problem = None if run.comparison else problem
    return run
