"""A thin, typed client over `restic --json`.

Why not resticpy (PyPI `resticpy`): its repository, password file and binary are module-global settings,
so two Prefect tasks on two repositories would race on them; it cannot pass an environment per call (the
password would have to sit in `os.environ` for the whole process); and its `check()` returns None on a
failed check instead of raising. Here every call carries its own environment (the password from the
secret store, never written to disk, never in argv, never logged), and every non-zero exit becomes a
typed exception.

Commands run through a `primespark.hosts.Runner`: on a fleet host over SSH, or on this machine. Exit codes
follow restic 0.17+ (0 ok, 1 fatal, 3 incomplete backup, 10 no repository, 11 locked, 12 wrong password).
Debian 12 ships restic 0.14, which exits 1 for all of those, so the message on stderr is matched as well.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from primespark.errors import StepFailed
from primespark.hosts import CommandNotFound, CommandTimeout, Completed, HostUnreachable, LocalRunner, Runner

# restic treats a lock as stale after 30 minutes without a refresh (it refreshes every 5 minutes).
STALE_LOCK_AGE = timedelta(minutes=30)


# --- errors -----------------------------------------------------------------------------------------------


class ResticError(StepFailed):
    """A restic command failed. `stderr` is restic's own message (it never holds the password)."""

    def __init__(self, message: str, *, returncode: int | None = None, stderr: str = "") -> None:
        super().__init__(message, returncode=returncode, stderr=stderr)

    def __str__(self) -> str:
        return self.message


class ResticNotInstalled(ResticError):
    pass


class RepositoryNotFound(ResticError):  # exit 10
    pass


class RepositoryLocked(ResticError):  # exit 11
    transient = True


class WrongPassword(ResticError):  # exit 12
    pass


class RepositoryUnreachable(ResticError):
    """The storage host did not answer (sftp/ssh failed): worth retrying."""

    transient = True


class BackupIncomplete(ResticError):  # exit 3
    def __init__(self, message: str, summary: BackupSummary | None, unreadable: list[str], **kw: Any) -> None:
        super().__init__(message, **kw)
        self.summary = summary
        self.unreadable = unreadable


class CheckFailed(ResticError):
    def __init__(self, message: str, problems: list[str], **kw: Any) -> None:
        super().__init__(message, **kw)
        self.problems = problems


class ResticTimeout(ResticError):
    """A restic step (or a host-side session) outlived its timeout and was stopped on its host. Not retried: a
    step that took longer than its work allows would likely do so again, holding its lock all the while."""

    def __init__(self, message: str, fix: str = "", **kw: Any) -> None:
        super().__init__(message, **kw)
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message}\n    fix: {self.fix}" if self.fix else self.message


class RestoreFailed(ResticError):
    def __init__(self, message: str, problems: list[str], **kw: Any) -> None:
        super().__init__(message, **kw)
        self.problems = problems


_UNREACHABLE = re.compile(
    r"ssh: connect to host|Connection refused|No route to host|Connection timed out|"
    r"Could not resolve hostname|unable to start the sftp session|connection lost|Connection reset|"
    r"Connection closed|Broken pipe|ssh command exited|subprocess ssh",
    re.IGNORECASE,
)


# restic < 0.17 says "Is there a repository at the following location?" after ANY failure to stat `config`
# (permission denied, an I/O error, a dropped SFTP session): only the cause it names tells "not there" apart.
# Local backends say "no such file or directory", the SFTP backend "file does not exist".
_NO_CONFIG = re.compile(r"unable to open config file: .*(no such file or directory|file does not exist)",
                        re.IGNORECASE)


def classify(code: int, stderr: str, what: str) -> ResticError:
    """Map an exit code (and, for restic < 0.17, the message) to a typed error."""
    stderr = stderr.strip()
    tail = "\n".join(stderr.splitlines()[-6:])
    args: dict[str, Any] = {"returncode": code, "stderr": stderr}
    if code == 10 or _NO_CONFIG.search(stderr):
        return RepositoryNotFound(f"{what}: no repository there ({tail})", **args)
    if code == 12 or "wrong password or no key found" in stderr:
        return WrongPassword(f"{what}: wrong password for the repository", **args)
    if code == 11 or "repository is already locked" in stderr:
        return RepositoryLocked(f"{what}: the repository is locked ({tail})", **args)
    if _UNREACHABLE.search(stderr):
        return RepositoryUnreachable(f"{what}: the repository's storage is unreachable ({tail})", **args)
    return ResticError(f"{what} failed with exit code {code}: {tail}", **args)


# --- parsed output ----------------------------------------------------------------------------------------


class _Parsed(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Snapshot(_Parsed):
    id: str
    short_id: str
    time: datetime
    hostname: str
    paths: list[str]
    tags: list[str] = Field(default_factory=list)
    excludes: list[str] = Field(default_factory=list)
    original: str | None = Field(default=None, description="The source snapshot's id, for a `restic copy`.")

    def age(self, now: datetime | None = None) -> timedelta:
        return (now or datetime.now(UTC)) - self.time


class BackupSummary(_Parsed):
    snapshot_id: str | None = None
    files_new: int = 0
    files_changed: int = 0
    files_unmodified: int = 0
    data_added: int = 0
    total_files_processed: int = 0
    total_bytes_processed: int = 0
    total_duration: float = 0.0


class Lock(_Parsed):
    id: str
    time: datetime
    exclusive: bool = False
    hostname: str
    pid: int

    def age(self, now: datetime | None = None) -> timedelta:
        return (now or datetime.now(UTC)) - self.time


@dataclass
class ForgetResult:
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


@dataclass
class StaleLockReport:
    removed: list[Lock] = field(default_factory=list)
    kept_alive: list[Lock] = field(default_factory=list)
    unresolved: list[Lock] = field(default_factory=list)


def _json_lines(raw: bytes) -> list[dict[str, Any]]:
    out = []
    for line in raw.decode(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


# --- the client -------------------------------------------------------------------------------------------


@dataclass
class ResticClient:
    """One repository as seen from one runner. `options` are `-o key=value` pairs (e.g. sftp.command)."""

    repository: str
    password: str = field(repr=False)
    runner: Runner = field(default_factory=LocalRunner)
    options: Mapping[str, str] = field(default_factory=dict)
    binary: str = "restic"
    timeout: float | None = None
    # Instead of `password`: a file on the host restic runs on (what the restic role installed there), for a
    # repository whose password the caller does not hold (a worker copying into another site's repository).
    password_file: str | None = None

    def command(self, *args: str, json_output: bool = True) -> list[str]:
        """The argv of one restic call on this repository (the password goes in `environment()`, never here)."""
        argv = [self.binary, "--repo", self.repository]
        for key, value in self.options.items():
            argv += ["--option", f"{key}={value}"]
        if json_output:
            argv.append("--json")
        return argv + list(args)

    def environment(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        secret = ({"RESTIC_PASSWORD_FILE": self.password_file} if self.password_file
                  else {"RESTIC_PASSWORD": self.password})
        return {**secret, **(extra or {})}

    @property
    def host(self) -> str:
        """The host restic runs on for this client."""
        return self.runner.name

    def run(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, stdin: bytes | None = None,
            timeout: float | None = None) -> Completed:
        """Any command on this client's host with the repository's credentials in its environment (restic
        itself, or the host-side session that starts restic); the password is scrubbed from what comes back."""
        try:
            proc = self.runner.run(argv, env=self.environment(env), stdin=stdin,
                                   timeout=self.timeout if timeout is None else timeout)
        except CommandNotFound:
            raise ResticNotInstalled(f"{argv[0]!r} is not installed on {self.host}") from None
        except CommandTimeout as exc:
            raise ResticTimeout(exc.message, exc.fix) from None
        return Completed(proc.argv, proc.returncode, proc.stdout, self.scrub(proc.stderr))

    def run_python(self, source: str, *args: str, stdin: bytes, timeout: float | None = None) -> Completed:
        """Python `source` (standard library only) run by the host's own interpreter, with the credentials."""
        return self.run([self.runner.python, "-c", source, *args], stdin=stdin, timeout=timeout)

    def scrub(self, text: str) -> str:
        """`text` without the password (restic never prints it; a wrapper's error might)."""
        return text.replace(self.password, "***") if self.password else text

    def failed(self, what: str, code: int, stderr: str) -> StepFailed:
        """The typed error of a restic run that exited `code`: the host unreachable over SSH, or restic's own."""
        if code == 255 and "restic" not in stderr.lower() and self.runner.remote:
            return HostUnreachable(f"{what}: cannot reach {self.host} over SSH: {stderr.strip()}",
                                   returncode=255, stderr=stderr)
        return classify(code, stderr, f"restic {what} on {self.host}")

    def _call(
        self,
        what: str,
        *args: str,
        json_output: bool = True,
        ok: Iterable[int] = (0,),
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
    ) -> Completed:
        proc = self.run(self.command(*args, json_output=json_output), env=env, stdin=stdin, timeout=timeout)
        if proc.returncode not in ok:
            raise self.failed(what, proc.returncode, proc.stderr)
        return proc

    def writer_alive(self, pid: int) -> bool:
        """Whether process `pid` (a lock's owner) still runs on this client's host."""
        return self.runner.pid_alive(pid)

    # repository ------------------------------------------------------------------------------------------

    def config_id(self) -> str | None:
        """The repository's own id (from its config), or None when there is no repository at this location."""
        try:
            # --no-lock: reading the config needs no lock, and must work beside a (stale) exclusive one
            proc = self._call("cat config", "--no-lock", "cat", "config", json_output=False)
        except RepositoryNotFound:
            return None
        try:
            return str(json.loads(proc.stdout)["id"])
        except (ValueError, KeyError, TypeError):
            raise ResticError(f"restic cat config on {self.host} printed no repository id: "
                              f"{proc.stdout[:200]!r}") from None

    def exists(self) -> bool:
        return self.config_id() is not None

    def init(self) -> bool:
        """Create the repository unless it exists. True if it was created now."""
        if self.exists():
            return False
        try:
            self._call("init", "init", json_output=False)
        except ResticError as exc:
            if "config file already exists" in exc.stderr:  # another writer won the race
                return False
            raise
        return True

    # backup ----------------------------------------------------------------------------------------------

    def backup_args(
        self,
        paths: Sequence[str],
        *,
        excludes: Sequence[str] = (),
        tags: Sequence[str] = (),
        host: str | None = None,
        time: datetime | None = None,
        verbose: bool = False,
    ) -> list[str]:
        """`verbose` makes restic name every file it saves (`-vv`), for a hasher reading its output."""
        args = ["backup", "-vv" if verbose else "--quiet"]
        for pattern in excludes:
            args += ["--exclude", pattern]
        return [*args, *self._common_backup_args(tags, host, time), "--", *paths]

    def backup_result(self, returncode: int, stderr: str, summary: BackupSummary) -> BackupSummary:
        """The summary of a finished `backup` (exit 0 or 3); exit 3 (files unreadable) raises BackupIncomplete."""
        if returncode == 3:
            unreadable = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("Warning")]
            raise BackupIncomplete(
                f"restic backup on {self.host}: some source files could not be read "
                f"(snapshot {summary.snapshot_id} is incomplete): {'; '.join(unreadable[:5])}",
                summary, unreadable, returncode=3, stderr=stderr,
            )
        return summary

    def backup_stdin(
        self, data: bytes, filename: str, *, tags: Sequence[str] = (), host: str | None = None
    ) -> BackupSummary:
        return self._summary(self._call("backup --stdin", *self.backup_stdin_args(filename, tags=tags, host=host),
                                        stdin=data))

    def backup_stdin_args(self, filename: str, *, tags: Sequence[str] = (), host: str | None = None) -> list[str]:
        return ["backup", "--quiet", "--stdin", "--stdin-filename", filename,
                *self._common_backup_args(tags, host, None)]

    @staticmethod
    def _common_backup_args(tags: Sequence[str], host: str | None, time: datetime | None) -> list[str]:
        args: list[str] = []
        for tag in tags:
            args += ["--tag", tag]
        if host:
            args += ["--host", host]
        if time is not None:
            args += ["--time", time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")]
        return args

    def _summary(self, proc: Completed) -> BackupSummary:
        for message in reversed(_json_lines(proc.stdout)):
            if message.get("message_type") == "summary":
                return BackupSummary.model_validate(message)
        raise ResticError(f"restic backup on {self.host} printed no summary", stderr=proc.stderr)

    # reading ---------------------------------------------------------------------------------------------

    def snapshots(self, *, host: str | None = None, tags: Sequence[str] = (), no_lock: bool = False) -> list[Snapshot]:
        """`no_lock`: a read that takes no lock of its own (the caller holds the repository's writer lock)."""
        args = ["--no-lock", "snapshots"] if no_lock else ["snapshots"]
        if host:
            args += ["--host", host]
        for tag in tags:
            args += ["--tag", tag]
        proc = self._call("snapshots", *args)
        found = [Snapshot.model_validate(s) for s in json.loads(proc.stdout or b"[]") or []]
        return sorted(found, key=lambda s: s.time)

    def dump(self, snapshot_id: str, path: str) -> bytes:
        return self._call("dump", "dump", snapshot_id, path, json_output=False).stdout

    # maintenance -----------------------------------------------------------------------------------------

    def forget(
        self,
        keep: Mapping[str, int],
        *,
        prune: bool = True,
        host: str | None = None,
        tags: Sequence[str] = (),
    ) -> ForgetResult:
        args = ["forget"]
        for name, count in keep.items():
            args += [f"--{name.replace('_', '-')}", str(count)]
        if not keep:
            raise ValueError("forget needs at least one keep-* rule")
        if host:
            args += ["--host", host]
        for tag in tags:
            args += ["--tag", tag]
        if prune:
            args.append("--prune")
        return self._forget_result(self._call("forget", *args))

    def forget_ids(self, snapshot_ids: Sequence[str], *, prune: bool = False) -> ForgetResult:
        if not snapshot_ids:
            return ForgetResult()
        self._call("forget", "forget", *(["--prune"] if prune else []), *snapshot_ids, json_output=False)
        return ForgetResult(removed=list(snapshot_ids))

    @staticmethod
    def _forget_result(proc: Completed) -> ForgetResult:
        result = ForgetResult()
        for line in proc.stdout.decode(errors="replace").splitlines():
            if not line.startswith("[{"):  # the JSON array, not a "[0:00] 100%" progress line
                continue
            for group in json.loads(line):
                result.kept += [s["id"] for s in group.get("keep") or []]
                result.removed += [s["id"] for s in group.get("remove") or []]
        return result

    def prune(self, timeout: float | None = None) -> None:
        self._call("prune", "prune", json_output=False, timeout=timeout)

    def check(self, read_data_subset: str | None = None, timeout: float | None = None) -> list[str]:
        """Raise CheckFailed naming each problem (pack IDs, trees) restic found; return its notes otherwise.
        Without `read_data_subset` the check is structural: the index and every snapshot's trees."""
        args = ["check"] + (["--read-data-subset", read_data_subset] if read_data_subset else [])
        try:
            proc = self._call("check", *args, json_output=False, timeout=timeout)
        except ResticError as exc:
            if type(exc) is not ResticError:
                raise
            problems = [
                ln.strip() for ln in exc.stderr.splitlines()
                if ln.strip() and not ln.startswith(("using temporary cache", "create exclusive lock"))
                and "Fatal: repository contains errors" not in ln
            ]
            raise CheckFailed(
                f"restic check on {self.host} found errors in {self.repository}: "
                + "; ".join(problems[:8]), problems, returncode=exc.returncode, stderr=exc.stderr,
            ) from None
        return [ln for ln in proc.stdout.decode(errors="replace").splitlines() if ln.strip()]

    def copy(self, source: ResticClient, snapshot_ids: Sequence[str] = (), timeout: float | None = None) -> None:
        """Copy snapshots from `source` (as reachable from this client's runner) into this repository."""
        args = ["copy", "--from-repo", source.repository]
        for key, value in source.options.items():
            if key not in self.options:
                args += ["--option", f"{key}={value}"]
        source_secret = ({"RESTIC_FROM_PASSWORD_FILE": source.password_file} if source.password_file
                         else {"RESTIC_FROM_PASSWORD": source.password})
        self._call("copy", *args, *snapshot_ids, json_output=False, env=source_secret, timeout=timeout)

    # locks -----------------------------------------------------------------------------------------------

    def locks(self) -> list[Lock]:
        proc = self._call("list locks", "--no-lock", "list", "locks", json_output=False)
        found = []
        for lock_id in proc.stdout.decode().split():
            try:
                # --no-lock: `cat` would otherwise need a lock of its own, refused while an exclusive lock stands
                raw = self._call("cat lock", "--no-lock", "cat", "lock", lock_id, json_output=False).stdout
            except ResticError as exc:
                if "no such file" in exc.stderr.lower() or "not exist" in exc.stderr.lower():
                    continue  # released while we looked
                raise
            found.append(Lock.model_validate({**json.loads(raw), "id": lock_id}))
        return found

    def unlock(self) -> None:
        """restic's own `unlock` (without --remove-all) removes only locks it considers stale."""
        self._call("unlock", "unlock", json_output=False)

    def clear_stale_locks(
        self, client_on: Callable[[str], ResticClient | None], now: datetime | None = None
    ) -> StaleLockReport:
        """Remove locks whose process is gone, never a live writer's.

        A lock is stale when restic's refresh has stopped (older than 30 min) or when its process no longer
        exists on the host that took it. We check that process on its own host (through the fleet), then run
        `restic unlock` there: restic then removes the lock itself, by the same rule, on the same evidence.
        """
        report = StaleLockReport()
        now = now or datetime.now(UTC)
        for lock in self.locks():
            if lock.age(now) > STALE_LOCK_AGE:
                self.unlock()
                report.removed.append(lock)
                continue
            owner = client_on(lock.hostname)  # this repository, as the lock's host reaches it
            if owner is None:
                report.unresolved.append(lock)
            elif owner.writer_alive(lock.pid):
                report.kept_alive.append(lock)
            else:
                owner.unlock()
                report.removed.append(lock)
        return report
