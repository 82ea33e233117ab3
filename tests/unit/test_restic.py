"""The restic client against real restic and local repositories in tmp dirs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from restic_testing import ResticTestClient as ResticClient
from restic_testing import parse_version

from primespark.hosts import Completed, Connection, LocalRunner, SshRunner
from primespark.restic import (
    BackupIncomplete,
    CheckFailed,
    RepositoryLocked,
    RepositoryNotFound,
    RepositoryUnreachable,
    ResticNotInstalled,
    RestoreFailed,
    WrongPassword,
    classify,
)

PASSWORD = "correct horse battery staple"


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha\n")
    (src / "sub" / "b.bin").write_bytes(os.urandom(200_000))
    (src / "skip.tmp").write_text("temporary")
    return src


@pytest.fixture
def repo(tmp_path: Path) -> ResticClient:
    client = ResticClient(str(tmp_path / "repo"), PASSWORD)
    client.init()
    return client


def corrupt_largest_pack(repo_dir: Path) -> str:
    packs = sorted((p for p in (repo_dir / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    pack = packs[-1]
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pack.write_bytes(bytes(data))
    return pack.name


def test_init_is_idempotent(tmp_path: Path) -> None:
    client = ResticClient(str(tmp_path / "r"), PASSWORD)
    assert client.exists() is False
    assert client.init() is True
    assert client.init() is False
    assert (tmp_path / "r" / "config").is_file()


def test_backup_summary_snapshots_ls_stats(repo: ResticClient, source: Path) -> None:
    summary = repo.backup([str(source)], excludes=["*.tmp"], tags=["t1"], host="pi-9")
    assert summary.snapshot_id and summary.files_new == 2
    assert summary.total_bytes_processed == 6 + 200_000
    snaps = repo.snapshots(host="pi-9")
    assert [s.short_id for s in snaps] == [summary.snapshot_id[:8]]
    assert snaps[0].tags == ["t1"] and snaps[0].excludes == ["*.tmp"]
    files = {n.path for n in repo.ls(snaps[0].id) if n.type == "file"}
    assert files == {f"{source}/a.txt", f"{source}/sub/b.bin"}
    assert repo.stats(snaps[0].id).total_size == 200_006
    assert repo.dump(snaps[0].id, f"{source}/a.txt") == b"alpha\n"


def test_backdated_snapshot_keeps_its_time(repo: ResticClient, source: Path) -> None:
    old = datetime.now(UTC) - timedelta(hours=50)
    repo.backup([str(source)], time=old)
    assert abs(repo.snapshots()[-1].age() - timedelta(hours=50)) < timedelta(minutes=1)


def test_exit_3_is_an_incomplete_backup() -> None:
    """restic exits 3 when it could not read some source files (root reads everything, so replay that exit)."""
    summary = b'{"message_type":"summary","files_new":1,"snapshot_id":"abcd1234"}\n'

    class Exit3(LocalRunner):
        def run(self, argv, *, env=None, stdin=None, timeout=None):  # type: ignore[no-untyped-def]
            return Completed(tuple(argv), 3, summary, "error: open /srv/x: permission denied\n")

    with pytest.raises(BackupIncomplete) as err:
        ResticClient("unused", PASSWORD, Exit3()).backup(["/srv"])
    assert err.value.returncode == 3 and err.value.summary is not None
    assert err.value.summary.snapshot_id == "abcd1234"
    assert "permission denied" in str(err.value)


def test_errors_are_typed(tmp_path: Path, repo: ResticClient) -> None:
    with pytest.raises(RepositoryNotFound):
        ResticClient(str(tmp_path / "nothing"), PASSWORD).snapshots()
    with pytest.raises(WrongPassword):
        ResticClient(repo.repository, "not the password").snapshots()
    assert classify(11, "x", "w").__class__ is RepositoryLocked
    assert classify(10, "", "w").__class__ is RepositoryNotFound
    unreachable = classify(1, "ssh: connect to host 10.0.0.1 port 22: No route", "w")
    assert isinstance(unreachable, RepositoryUnreachable) and unreachable.transient


def test_password_goes_per_call_never_into_os_environ_or_argv(repo: ResticClient, source: Path) -> None:
    seen: list[tuple[tuple[str, ...], dict[str, str]]] = []

    class Spy(LocalRunner):
        def run(self, argv, *, env=None, stdin=None, timeout=None):  # type: ignore[no-untyped-def]
            seen.append((tuple(argv), dict(env or {})))
            return super().run(argv, env=env, stdin=stdin, timeout=timeout)

    os.environ["RESTIC_PASSWORD"] = "a stale global that must not be used"
    try:
        client = ResticClient(repo.repository, PASSWORD, Spy())
        client.backup([str(source)])
    finally:
        del os.environ["RESTIC_PASSWORD"]
    assert "RESTIC_PASSWORD" not in os.environ
    assert all(PASSWORD not in " ".join(argv) for argv, _ in seen)
    assert all(env["RESTIC_PASSWORD"] == PASSWORD for _, env in seen)


def test_check_names_the_corrupted_pack_and_restore_names_the_file(
    tmp_path: Path, repo: ResticClient, source: Path
) -> None:
    (source / "big.bin").write_bytes(os.urandom(6_000_000))
    repo.backup([str(source)])
    repo.check(read_data_subset="100%")  # clean before
    pack = corrupt_largest_pack(Path(repo.repository))
    with pytest.raises(CheckFailed) as err:
        repo.check(read_data_subset="100%")
    assert any(pack in problem for problem in err.value.problems), err.value.problems
    with pytest.raises(RestoreFailed) as restore_err:
        repo.restore("latest", str(tmp_path / "out"), verify=True)
    named = [p for p in restore_err.value.problems if "ciphertext verification failed" in p]
    assert named and all(str(source) in p for p in named), restore_err.value.problems


def test_restore_verify_round_trip(tmp_path: Path, repo: ResticClient, source: Path) -> None:
    repo.backup([str(source)], excludes=["*.tmp"])
    repo.restore("latest", str(tmp_path / "out"), verify=True)
    restored = tmp_path / "out" / str(source).lstrip("/")
    assert (restored / "sub" / "b.bin").read_bytes() == (source / "sub" / "b.bin").read_bytes()
    assert not (restored / "skip.tmp").exists()


def test_forget_with_retention_and_copy_offsite(tmp_path: Path, repo: ResticClient, source: Path) -> None:
    for i in range(3):
        (source / "a.txt").write_text(f"v{i}")
        repo.backup([str(source)], tags=["primespark-backup"])
    result = repo.forget({"keep_last": 2}, prune=True)
    assert len(result.kept) == 2 and len(result.removed) == 1
    assert len(repo.snapshots()) == 2
    offsite = ResticClient(str(tmp_path / "offsite"), "another password")
    offsite.init()
    offsite.copy(repo)
    offsite.copy(repo)  # idempotent: restic copies only what is missing
    assert len(offsite.snapshots()) == 2
    offsite.check()


def hold_lock(repo: ResticClient) -> subprocess.Popen[bytes]:
    """A real restic writer that holds its lock until we end it: `backup --stdin` from a pipe left open."""
    env = {**os.environ, "RESTIC_PASSWORD": PASSWORD}
    proc = subprocess.Popen(["restic", "--repo", repo.repository, "backup", "--stdin"], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock_dir = Path(repo.repository) / "locks"
    deadline = time.monotonic() + 30
    while not any(lock_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(lock_dir.iterdir()), "the writer took no lock"
    return proc


def test_stale_lock_of_a_killed_backup_is_removed_but_a_live_one_is_kept(repo: ResticClient) -> None:
    proc = hold_lock(repo)
    assert [lock.pid for lock in repo.locks()] == [proc.pid]
    report = repo.clear_stale_locks(lambda hostname: repo)
    assert [lock.pid for lock in report.kept_alive] == [proc.pid] and not report.removed
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(repo.locks()) == 1  # left behind by the killed process
    with pytest.raises(RepositoryLocked):
        repo.check()
    report = repo.clear_stale_locks(lambda hostname: repo)
    assert [lock.pid for lock in report.removed] == [proc.pid]
    assert repo.locks() == []
    repo.check()



def test_a_rerun_waits_for_the_earlier_attempts_live_writer(repo: ResticClient) -> None:
    """A backup's rerun waits until the writer its dead worker left running is gone (then its snapshot decides),
    and fails, naming the host, when the writer outlives the wait."""
    import threading

    from primespark.backup.jobs import wait_for_writers
    from primespark.errors import StepFailed

    proc = hold_lock(repo)
    (lock,) = repo.locks()
    with pytest.raises(StepFailed, match="an earlier backup of pi-2 still writes into its repository after 0 s"):
        wait_for_writers(repo, [lock.id], "pi-2", 0)
    waited = threading.Thread(target=wait_for_writers, args=(repo, [lock.id], "pi-2", 120))
    waited.start()
    assert waited.is_alive()
    assert proc.stdin is not None
    proc.stdin.write(b"the last bytes of the earlier attempt\n")
    proc.stdin.close()  # the writer saves its snapshot and lets go of its lock
    assert proc.wait(timeout=60) == 0
    waited.join(timeout=60)
    assert not waited.is_alive() and repo.locks() == [] and len(repo.snapshots()) == 1

def test_lock_of_an_unknown_host_is_left_alone(repo: ResticClient) -> None:
    proc = hold_lock(repo)
    try:
        report = repo.clear_stale_locks(lambda hostname: None)
        assert len(report.unresolved) == 1 and not report.removed
        assert len(repo.locks()) == 1
    finally:
        proc.kill()
        proc.wait()


def test_version() -> None:
    assert parse_version("restic 0.14.0 compiled with go1.19.8 on linux/amd64") == (0, 14, 0)
    assert ResticClient("unused", "x").version() >= (0, 14, 0)


def test_ssh_runner_passes_secrets_on_stdin_not_argv(tmp_path: Path, repo: ResticClient, source: Path) -> None:
    """A stand-in `ssh` that runs the remote command here: the quoting and the stdin protocol are real."""
    fake = tmp_path / "bin" / "ssh"
    fake.parent.mkdir()
    log = tmp_path / "argv.log"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\nfor last; do :; done\nexec sh -c "$last"\n')
    fake.chmod(0o755)
    old_path = os.environ["PATH"]
    os.environ["PATH"] = f"{fake.parent}:{old_path}"
    try:
        runner = SshRunner(Connection("pi-9", "192.0.2.1", "root"))
        remote = ResticClient(repo.repository, PASSWORD, runner)
        summary = remote.backup([str(source)], host="pi-9")
        assert remote.snapshots(host="pi-9")[0].short_id == summary.snapshot_id[:8]
        remote.backup_stdin(b"stdin payload\n", "note.txt", host="pi-9")
        snap = remote.snapshots(host="pi-9")[-1]
        assert remote.dump(snap.id, "/note.txt") == b"stdin payload\n"
        assert runner.pid_alive(os.getpid()) and not runner.pid_alive(2**22 + 7)
    finally:
        os.environ["PATH"] = old_path
    assert "root@192.0.2.1" in log.read_text()
    assert PASSWORD not in log.read_text()


def test_the_snapshot_restic_restores_is_read_from_its_own_line() -> None:
    from primespark.backup.session import parse_restoring

    short, when = parse_restoring("restoring <Snapshot 32005ca4 of [/tmp/kt/ds /b] at 2026-11-26 13:02:58.372297218 "
                                  "+0000 UTC by root@vm> to /tmp/kt/r1\n")  # type: ignore[misc]
    assert short == "32005ca4" and when.isoformat() == "2026-11-26T13:02:58.372297+00:00"
    assert parse_restoring("restoring <Snapshot 1a2b3c4d of [/x] at 2026-01-02 03:04:05 +0100 CET by a@b> to /t")[1] \
        .isoformat() == "2026-01-02T03:04:05+01:00"  # type: ignore[index]
    assert parse_restoring("Fatal: no snapshot found") is None


def test_a_host_without_restic_gets_a_clear_error_from_the_backup_session(tmp_path: Path) -> None:
    from primespark.backup.session import backup_with_manifest

    client = ResticClient(str(tmp_path / "repo"), "pw", binary="restic-not-here")
    with pytest.raises(ResticNotInstalled, match="'restic-not-here' is not installed on localhost"):
        backup_with_manifest(client, [str(tmp_path)], host="pi-1")


SFTP_SERVER = "/usr/lib/openssh/sftp-server"


def test_restic_0_14_no_repository_is_told_from_other_failures_to_open_config(tmp_path: Path) -> None:
    """restic < 0.17 prints "Is there a repository at the following location?" after ANY failure to stat the
    config: only a config that is not there means "no repository"; a refused or failed stat is another error."""
    missing = ResticClient(str(tmp_path / "nothing"), PASSWORD)
    with pytest.raises(RepositoryNotFound):
        missing.snapshots()
    assert missing.config_id() is None
    if os.access(SFTP_SERVER, os.X_OK):  # the same over SFTP, whose "not there" is worded otherwise
        over_sftp = ResticClient(f"sftp:x@nas:{tmp_path}/nothing", PASSWORD, options={"sftp.command": SFTP_SERVER})
        assert over_sftp.config_id() is None
    # what restic 0.14 (cmd/restic/global.go) prints when the stat itself fails
    for cause in ("Lstat: permission denied", "stat /mnt/nas/repo/config: input/output error",
                  "Lstat: connection lost"):
        stderr = (f"Fatal: unable to open config file: {cause}\nIs there a repository at the following location?\n"
                  "sftp:backup-pi-1@nas-1:/repo")
        error = classify(1, stderr, "restic snapshots on pi-1")
        assert not isinstance(error, RepositoryNotFound), cause
    assert isinstance(classify(1, "Fatal: unable to open config file: Lstat: connection lost\nIs there a repository "
                                  "at the following location?\nx", "w"), RepositoryUnreachable)


def test_a_repository_has_an_id_of_its_own(tmp_path: Path, repo: ResticClient) -> None:
    other = ResticClient(str(tmp_path / "other"), PASSWORD)
    other.init()
    assert repo.config_id() and other.config_id() and repo.config_id() != other.config_id()
    assert len(repo.config_id() or "") == 64


def test_a_command_past_its_timeout_is_stopped_with_its_whole_process_group(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A timed-out command's children go too (a host-side session's restic): nothing keeps running, holding a
    lock, after the step has failed. The background child here ignores SIGINT (as `&` makes it): it takes the
    SIGKILL that follows, 2 s later here rather than the runner's 30 s."""
    from primespark.hosts import CommandTimeout, runner

    kill_after = 2
    monkeypatch.setattr(runner, "KILL_AFTER_SECONDS", kill_after)

    pid_file = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(CommandTimeout, match="did not finish within 1 s"):
        LocalRunner("pi-9").run(["sh", "-c", f"sleep 300 & echo $! > {pid_file}; wait"], timeout=1)
    assert time.monotonic() - started < 1 + kill_after + 10  # the SIGKILL came after kill_after, not 30 s
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists(), "the command's child outlived its timeout"


def test_a_restic_step_past_its_timeout_is_a_clear_failure_not_retried(tmp_path: Path) -> None:
    from primespark.restic import ResticTimeout

    hung = tmp_path / "hung-sftp"
    hung.write_text("#!/bin/sh\nexec sleep 300\n")
    hung.chmod(0o755)
    client = ResticClient(f"sftp:x@nas:{tmp_path}/repo", PASSWORD, options={"sftp.command": str(hung)}, timeout=2)
    with pytest.raises(ResticTimeout) as stopped:
        client.snapshots()
    assert not stopped.value.transient and "did not finish within 2 s" in str(stopped.value)
