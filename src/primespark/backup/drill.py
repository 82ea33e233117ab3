"""The DR drill: restore a host's newest snapshot on another host, verify it, and judge it against RTO/RPO.

A drill is `plan_drill` (what to restore where), `restore` (the restore, hashed and compared, on the scratch
host), `judge` (service checks, RTO and RPO against the targets) and `clean_up`; `run_drill` runs them in turn
and the `dr_drill` flow runs each as a task. Neither raises for a failed drill: the report says what failed
and why; the flow publishes it and then fails the run. Only operator mistakes raise (no plan, scratch = source).
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from primespark.backup import jobs
from primespark.backup.repositories import backup_of, folders_on, long_step, offsite_of, plan_of, restic_for
from primespark.backup.session import RestoreRun, restore_and_compare
from primespark.context import FleetContext
from primespark.errors import StepFailed, UserError
from primespark.hosts import Completed, Runner
from primespark.restic import CheckFailed
from primespark.secrets import atomic_write

HISTORY_KEEP = 200
logger = logging.getLogger(__name__)


@dataclass
class ServiceCheck:
    service: str
    kind: str
    status: str  # passed | failed | skipped
    detail: str


@dataclass
class DrillReport:
    host: str
    scratch_host: str
    started: str
    repository: str
    snapshot: str | None = None
    snapshot_time: str | None = None
    rpo_seconds: float | None = None
    rto_seconds: float | None = None
    rpo_target_seconds: float = 0.0
    rto_target_seconds: float = 0.0
    restore_verified_by_restic: bool = False
    files_matched: int = 0
    files_mismatched: list[str] = field(default_factory=list)
    files_missing: list[str] = field(default_factory=list)
    files_unexpected: list[str] = field(default_factory=list)
    files_changed_during_backup: int = 0
    restore_errors: list[str] = field(default_factory=list)
    services: list[ServiceCheck] = field(default_factory=list)
    repository_check: str | None = None  # passed | FAILED | None (not run)
    check_problems: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    cleanup_problems: list[str] = field(default_factory=list)  # beside the verdict, never instead of it
    notes: list[str] = field(default_factory=list)
    restored_to: str | None = None
    finished: str | None = None

    @property
    def passed(self) -> bool:
        return not self.failures

    def history_row(self) -> dict[str, object]:
        return {
            "started": self.started,
            "host": self.host,
            "scratch": self.scratch_host,
            "repository": self.repository,
            "snapshot": (self.snapshot or "-")[:8],
            "result": "pass" if self.passed else "FAIL",
            "rpo_h": None if self.rpo_seconds is None else round(self.rpo_seconds / 3600, 2),
            "rto_min": None if self.rto_seconds is None else round(self.rto_seconds / 60, 2),
            "files": self.files_matched,
            "reason": "; ".join(self.failures)[:300],
        }


def _fmt(seconds: float | None, unit: float, suffix: str) -> str:
    return "n/a" if seconds is None else f"{seconds / unit:.2f} {suffix}"


def render_markdown(report: DrillReport) -> str:
    verdict = "PASSED" if report.passed else "FAILED"
    lines = [
        f"# DR drill {verdict}: {report.host} → {report.scratch_host}",
        "",
        f"- started: {report.started}, finished: {report.finished}",
        f"- repository: `{report.repository}`, snapshot: `{report.snapshot or 'none'}` taken {report.snapshot_time}",
        f"- restored to: `{report.restored_to}` on {report.scratch_host} (not the source host)",
        "",
        "| measure | value | target | result |",
        "|---|---|---|---|",
        f"| RPO (snapshot age) | {_fmt(report.rpo_seconds, 3600, 'h')} | "
        f"{_fmt(report.rpo_target_seconds, 3600, 'h')} | "
        f"{'ok' if report.rpo_seconds is not None and report.rpo_seconds <= report.rpo_target_seconds else 'MISS'} |",
        f"| RTO (start → verified restore) | {_fmt(report.rto_seconds, 60, 'min')} | "
        f"{_fmt(report.rto_target_seconds, 60, 'min')} | "
        f"{'ok' if report.rto_seconds is not None and report.rto_seconds <= report.rto_target_seconds else 'MISS'} |",
        "",
        "## Verification",
        f"- `restic restore --verify`: {'passed' if report.restore_verified_by_restic else 'failed'}",
        f"- content hashes against the source as of the snapshot: {report.files_matched} files equal, "
        f"{len(report.files_mismatched)} differ, {len(report.files_missing)} missing, "
        f"{len(report.files_unexpected)} unexpected ({report.files_changed_during_backup} changed while the "
        "backup ran, not compared)",
    ]
    check = {None: "not run", "passed": "passed", "FAILED": "FAILED"}[report.repository_check]
    lines.append(f"- `restic check` of the repository (index and every snapshot's trees): {check}")
    for title, items in (("Restore errors", report.restore_errors), ("Files that differ", report.files_mismatched),
                         ("Files missing", report.files_missing), ("Unexpected files", report.files_unexpected),
                         ("Repository damage found by restic check", report.check_problems)):
        if items:
            lines += ["", f"### {title}", *[f"- `{item}`" for item in items[:50]]]
            if len(items) > 50:
                lines.append(f"- … and {len(items) - 50} more")
    lines += ["", "## Service checks"]
    if report.services:
        lines += ["| service | kind | result | detail |", "|---|---|---|---|"]
        lines += [f"| {c.service} | {c.kind} | {c.status} | {c.detail} |" for c in report.services]
    else:
        lines.append("- the fleet defines no service on this host")
    if report.failures:
        lines += ["", "## Why the drill failed", *[f"- {f}" for f in report.failures]]
    if report.cleanup_problems:
        lines += ["", "## Clean-up (does not change the verdict)", *[f"- {p}" for p in report.cleanup_problems]]
    if report.notes:
        lines += ["", "## Notes", *[f"- {n}" for n in report.notes]]
    return "\n".join(lines) + "\n"


# --- history ----------------------------------------------------------------------------------------------


def history_path(state_dir: Path) -> Path:
    return state_dir / "drills" / "history.json"


class HistoryUnreadable(UserError):
    pass


def load_history(state_dir: Path) -> list[dict[str, object]]:
    """The drill history, oldest first; a file that is not a JSON list is an error, never read as empty."""
    path = history_path(state_dir)
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise HistoryUnreadable(f"the drill history {path} cannot be read: {exc}",
                                "the next drill keeps it aside (renamed with a .corrupt-<time> suffix) and starts "
                                "a new one; or restore it from a backup") from None
    if not isinstance(rows, list):
        raise HistoryUnreadable(f"the drill history {path} is not a list of drills",
                                "the next drill keeps it aside and starts a new one")
    return rows


def keep_aside(path: Path) -> Path:
    """Rename a file that cannot be read out of the way, keeping it for a look: `<name>.corrupt-<UTC time>`."""
    aside = path.with_name(f"{path.name}.corrupt-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}")
    path.rename(aside)
    return aside


def append_history(state_dir: Path, report: DrillReport) -> list[dict[str, object]]:
    """The report's row appended to the history, and the whole report as `last-<host>.json` (both atomic). A
    history that cannot be read is kept aside and a new one started, said in the report's notes."""
    try:
        rows = load_history(state_dir)
    except HistoryUnreadable as exc:
        aside = keep_aside(history_path(state_dir))
        report.notes.append(f"{exc.message}: kept aside as {aside.name}, a new history starts with this drill")
        rows = []
    rows = [*rows, report.history_row()][-HISTORY_KEEP:]
    atomic_write(history_path(state_dir), json.dumps(rows, indent=1), 0o600)
    atomic_write(history_path(state_dir).parent / f"last-{report.host}.json", json.dumps(asdict(report), indent=1),
                 0o600)
    return rows


# --- the drill --------------------------------------------------------------------------------------------

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def drill_source(ctx: FleetContext, host: str, repository: str | None) -> str:
    """The repository a drill of `host` restores from: its plan's own, or one of that one's offsite copies."""
    plan = plan_of(ctx, host)
    copies = [plan.repository, *offsite_of(ctx, plan.repository)]
    if repository is not None and repository not in copies:
        raise UserError(f"{host}'s backups are not in repository {repository!r}",
                        f"use --repository with one of: {', '.join(copies)}")
    return repository or plan.repository


@dataclass
class Drill:
    """One drill under way: the report it fills in, and where it restores."""

    host: str
    source: str  # the repository restored from
    scratch: str  # the host restored onto
    target: str  # the folder restored into, on the scratch host
    clock: float  # time.monotonic() at the start, for the RTO
    started: datetime
    report: DrillReport


def plan_drill(ctx: FleetContext, host: str, repository: str | None = None, now: Clock = utc_now) -> Drill:
    """`repository`: the plan's (the default) or one of its offsite copies, which carry the same snapshots
    with their manifests: a drill from there shows the copy the NAS's loss would leave is whole."""
    source = drill_source(ctx, host, repository)
    backup = backup_of(ctx.fleet)
    scratch = backup.drill.scratch_host
    if scratch == host:
        raise UserError(f"the drill for {host} would restore onto {host} itself",
                        "set backup.drill.scratch_host to another host")
    started = now()
    target = f"{folders_on(ctx, scratch).scratch}/{host}-{started.strftime('%Y%m%dT%H%M%S')}"
    report = DrillReport(host, scratch, started.isoformat(timespec="seconds"), source,
                         rpo_target_seconds=backup.targets.rpo_hours * 3600,
                         rto_target_seconds=backup.targets.rto_minutes * 60, restored_to=target)
    return Drill(host, source, scratch, target, time.monotonic(), started, report)


def restore(ctx: FleetContext, drill: Drill) -> RestoreRun | None:
    """Restore the host's newest snapshot on the scratch host with `--verify`, hashing and comparing it with
    its manifest; None when there is no snapshot."""
    # the repository this environment made, never another one in its place; never made here
    if jobs.open_repository(ctx, drill.source, drill.host, create=False, via=drill.scratch) is None:
        return None
    client = restic_for(ctx, drill.source, drill.host, via=drill.scratch)
    probes = [p for s in ctx.fleet.services_on(drill.host).values() for p in s.backup_paths]
    manifest_dir = folders_on(ctx, drill.host).manifest_dir(plan_of(ctx, drill.host).repository)
    timeout = long_step(ctx, jobs.load_state(ctx, drill.host).get("size_bytes"))
    try:
        return restore_and_compare(client, drill.host, drill.target, probes, manifest_dir, timeout=timeout)
    except StepFailed as exc:
        if "snapshot for criteria not found" in exc.stderr or "no snapshot found" in exc.stderr:
            return None
        raise


def judge(ctx: FleetContext, drill: Drill, run: RestoreRun | None) -> DrillReport:
    """The verdict on a restore: content, service checks, RPO and RTO against the fleet's targets."""
    report = drill.report
    if run is None:
        report.failures.append(f"no snapshot of {drill.host} in {drill.source}")
        return report
    report.snapshot, report.snapshot_time = run.snapshot_short_id, _iso(run.snapshot_time)
    if run.snapshot_time is not None:
        report.rpo_seconds = (drill.started - run.snapshot_time).total_seconds()
    if run.restore_error is None:
        report.restore_verified_by_restic = True
    else:
        report.restore_errors = run.restore_error.problems
        report.failures.append(f"restore of {run.snapshot_short_id} failed: "
                               f"{'; '.join(run.restore_error.problems[:3])}")
    _judge_content(report, run)
    report.services = _service_checks(ctx, drill.host, drill.target, run.present)
    report.failures += [f"service check {c.service}: {c.detail}" for c in report.services if c.status == "failed"]
    report.rto_seconds = time.monotonic() - drill.clock
    targets = backup_of(ctx.fleet).targets
    if report.rpo_seconds is not None and report.rpo_seconds > report.rpo_target_seconds:
        report.failures.append(f"RPO breach: the newest snapshot is {report.rpo_seconds / 3600:.2f} h old, "
                               f"the target is {targets.rpo_hours} h")
    if report.rto_seconds > report.rto_target_seconds:
        report.failures.append(f"RTO breach: the verified restore took {report.rto_seconds / 60:.2f} min, "
                               f"the target is {targets.rto_minutes} min")
    return report


def _judge_content(report: DrillReport, run: RestoreRun) -> None:
    result = run.comparison
    if result is None:
        report.failures.append(run.manifest_problem or f"no content manifest for {run.snapshot_short_id}")
        return
    report.files_matched = result.matched
    report.files_mismatched, report.files_missing = result.mismatched, result.missing
    report.files_unexpected = result.unexpected
    report.files_changed_during_backup = len(result.changed_during_backup)
    if result.ok and result.matched == 0:  # "0 files equal" is no evidence that anything comes back
        report.failures.append(f"nothing to verify: snapshot {run.snapshot_short_id} holds none of {report.host}'s "
                               "files")
    elif not result.ok:
        report.failures.append(
            f"restored content differs from the source at snapshot time: {len(result.mismatched)} "
            f"differ, {len(result.missing)} missing, {len(result.unexpected)} unexpected "
            f"(first: {(result.mismatched + result.missing + result.unexpected)[0]})")


def check_repository(ctx: FleetContext, drill: Drill) -> DrillReport:
    """A structural `restic check` (the index and every snapshot's trees, no pack data read) of the repository
    restored from: damage there fails the drill and is in its report, though this snapshot came back whole.
    restic takes its exclusive lock for it: the flow holds the repository's writer lock around this step."""
    report = drill.report
    client = restic_for(ctx, drill.source, drill.host, via=drill.scratch)
    try:
        client.check(timeout=long_step(ctx, jobs.load_state(ctx, drill.host).get("size_bytes")))
        report.repository_check = "passed"
    except CheckFailed as exc:
        report.repository_check = "FAILED"
        report.check_problems = exc.problems
        report.failures.append(f"restic check found damage in {drill.source}'s repository of {drill.host}: "
                               + "; ".join(exc.problems[:3]))
    return report


def failed_step(report: DrillReport, exc: Exception) -> None:
    """A step that raised: its reason goes in the report, whatever it was (a bug is said to be one)."""
    if isinstance(exc, UserError):
        report.failures.append(str(exc))
    else:
        logger.error("a drill step of %s failed unexpectedly", report.host, exc_info=exc)
        report.failures.append(f"the drill stopped on an unexpected error ({type(exc).__name__}: {exc}): a bug, "
                               "see the run's log")


def sweep(ctx: FleetContext, drill: Drill) -> None:
    """Remove what killed drills left on the scratch host: this host's restored copies older than this drill, any
    host's older than a drill may run (so a drill of another host running now keeps its copy)."""
    cutoff = drill.started - timedelta(seconds=long_step(ctx, None))
    try:
        proc = ctx.hosts.runner(drill.scratch).run(
            ["sh", "-c", _SWEEP, "sh", drill.target.rsplit("/", 1)[0], drill.host, _stamp(drill.started),
             _stamp(cutoff)], timeout=backup_of(ctx.fleet).timeouts.command_seconds)
        if proc.returncode != 0 or proc.stderr.strip():
            drill.report.cleanup_problems.append(f"sweeping earlier drills' copies on {drill.scratch}: "
                                                 f"{proc.stderr.strip()[-300:] or f'exit {proc.returncode}'}")
    except StepFailed as exc:
        drill.report.cleanup_problems.append(f"sweeping earlier drills' copies on {drill.scratch}: {exc}")


def clean_up(ctx: FleetContext, drill: Drill) -> None:
    """Remove the restored copy; a failure (the scratch host unreachable, …) is reported beside the verdict."""
    try:
        proc = remove_in_background(ctx.hosts.runner(drill.scratch), drill.target,
                                    backup_of(ctx.fleet).timeouts.command_seconds)
        if proc.returncode != 0:
            drill.report.cleanup_problems.append(
                f"the restored copy {drill.target} on {drill.scratch} was not removed: "
                f"{proc.stderr.strip()[-300:] or f'exit {proc.returncode}'}")
    except Exception as exc:  # reported, never instead of the verdict
        drill.report.cleanup_problems.append(f"the restored copy {drill.target} on {drill.scratch} was not "
                                             f"removed: {exc}")


def finish(drill: Drill, now: Clock = utc_now) -> DrillReport:
    drill.report.finished = now().isoformat(timespec="seconds")
    return drill.report


def run_drill(
    ctx: FleetContext,
    host: str,
    *,
    now: Clock = utc_now,
    keep_restore: bool = False,
    repository: str | None = None,
) -> DrillReport:
    """A whole drill of `host`, without Prefect (the `dr_drill` flow runs the same steps as tasks)."""
    drill = plan_drill(ctx, host, repository, now)
    sweep(ctx, drill)
    try:
        run = restore(ctx, drill)
        drill.report = judge(ctx, drill, run)
        if run is not None:
            check_repository(ctx, drill)
    except Exception as exc:  # every drill ends with a report
        failed_step(drill.report, exc)
    finally:
        if not keep_restore:
            clean_up(ctx, drill)
    return finish(drill, now)


# The restored copy is renamed at once (nothing reads it any more) and deleted by a process of its own, so
# the report does not wait for it; `setsid` keeps sudo's pty from taking it down, `nice` keeps it from taking
# the CPU from the report's publishing (and the scratch host's services), and each clean-up also sweeps what an
# earlier one left (a host that rebooted meanwhile).
_REMOVE = ('mv -- "$1" "$1.removing" && setsid -f nice -n 19 rm -rf --one-file-system -- "${1%/*}"/*.removing '
           "</dev/null >/dev/null 2>&1")
# Restored copies are `<host>-<UTC time>` (YYYYmmddTHHMMSS sorts as it counts): `$3` bounds this host's, `$4`
# every other host's. Renamed `*.removing` at once, then removed in the background as above.
_SWEEP = """
cd "$1" 2>/dev/null || exit 0
for entry in *-[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]T[0-9][0-9][0-9][0-9][0-9][0-9]; do
  [ -d "$entry" ] || continue
  if [ "${entry%-*}" = "$2" ]; then limit=$3; else limit=$4; fi
  if expr "${entry##*-}" "<" "$limit" >/dev/null; then mv -- "$entry" "$entry.removing"; fi
done
set -- *.removing
[ -e "$1" ] && setsid -f nice -n 19 rm -rf --one-file-system -- "$@" </dev/null >/dev/null 2>&1
exit 0
"""


def _stamp(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y%m%dT%H%M%S")


def remove_in_background(runner: Runner, target: str, timeout: float = 120) -> Completed:
    return runner.run(["sh", "-c", _REMOVE, "sh", target], timeout=timeout)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds")


def _service_checks(ctx: FleetContext, host: str, target: str, restored: dict[str, bool]) -> list[ServiceCheck]:
    checks = []
    runner = ctx.hosts.runner(backup_of(ctx.fleet).drill.scratch_host)
    for name, service in sorted(ctx.fleet.services_on(host).items()):
        for path in service.backup_paths:
            present = restored.get(path, False)
            checks.append(ServiceCheck(name, "data", "passed" if present else "failed",
                                       f"{path}: {'restored' if present else 'no files in the snapshot'}"))
        if service.restore_check:
            # replace, not str.format: the command is the operator's shell, braces and all (`awk '{print $1}'`)
            command = service.restore_check.replace("{root}", shlex.quote(target))
            try:
                proc = runner.run(["sh", "-c", command], timeout=600)
                status = "passed" if proc.returncode == 0 else "failed"
                detail = f"`{service.restore_check}` exit {proc.returncode} {proc.stderr.strip()[-200:]}".strip()
            except StepFailed as exc:
                status, detail = "failed", f"`{service.restore_check}` did not run: {exc.message}"
            checks.append(ServiceCheck(name, "restore_check", status, detail))
        elif service.check != "none":
            checks.append(ServiceCheck(name, service.check, "skipped",
                                       f"a {service.check} check needs the running service; drills do not start "
                                       "services (set restore_check to test the restored data)"))
    return checks
