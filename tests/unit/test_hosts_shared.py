"""Commands share one SSH connection per host (a liveness probe has its own); more at once than sshd takes on one
connection fall back to connections of their own, unseen by the caller; a host found lost, or a shared connection
that no longer answers once a command's timeout has passed, has its shared connection ended. Against a real sshd on
loopback: `SSH_CONNECTION` on the host names the client's port, the same for every command on one connection."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sshd_testing import Sshd, loopback_sshd

from primespark.hosts import CommandTimeout, HostLost, Liveness, SshFiles, SshRunner, ended_with_session, stream
from primespark.hosts.runner import SHARED_CHECK_SECONDS

FAST = Liveness(heartbeat=0.2, silent_after=1.0, probe_timeout=2.0)
CLIENT_PORT = ["sh", "-c", 'echo "$SECRET ${SSH_CONNECTION#* }"']


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    # short: a socket's path has at most 107 bytes, and pytest's tmp_path can be deeper than that allows
    folder = Path(tempfile.mkdtemp(prefix="ps-cm-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    with loopback_sshd(tmp_path / "sshd") as server:
        yield server


def _runner(sshd: Sshd, shared_dir: Path) -> SshRunner:
    return SshRunner(dataclasses.replace(sshd.connection("pi-9"), shared_dir=shared_dir))


def _client_port(runner: SshRunner, secret: str) -> str:
    done = runner.run(CLIENT_PORT, env={"SECRET": secret}, timeout=30)
    assert done.returncode == 0, done.stderr
    told, port = done.text.split()[:2]
    assert told == secret  # the environment still travels on stdin over a shared connection
    return port


def _master_running(runner: SshRunner) -> bool:
    argv = runner.connection.close_shared_argv()
    assert argv is not None
    check = [*argv[:-3], "-O", "check", argv[-1]]
    return subprocess.run(check, capture_output=True, timeout=10, check=False).returncode == 0


def test_commands_share_one_connection_per_host(sshd: Sshd, shared_dir: Path) -> None:
    runner = _runner(sshd, shared_dir)
    first = _client_port(runner, "s3cret-1")
    assert _master_running(runner)
    assert _client_port(runner, "s3cret-2") == first
    # a new runner for the same host (the next step of a flow) finds the connection too
    assert _client_port(_runner(sshd, shared_dir), "s3cret-3") == first
    lines: list[str] = []
    stream(runner, CLIENT_PORT, on_line=lines.append, env={"SECRET": "w"}, liveness=FAST)
    assert lines[0].split()[:2] == ["w", first]  # a watched stream too
    unshared = SshRunner(sshd.connection("pi-9"))  # no folder for sockets: every command logs in by itself
    assert _client_port(unshared, "u") != first
    assert [p.is_socket() for p in shared_dir.iterdir()] == [True]  # one connection, one socket


def test_more_commands_at_once_than_sshd_takes_on_one_connection_still_run(sshd: Sshd, shared_dir: Path) -> None:
    runner = _runner(sshd, shared_dir)
    _client_port(runner, "s")
    with ThreadPoolExecutor(14) as pool:  # sshd's MaxSessions is 10
        done = list(pool.map(lambda i: runner.run(["sh", "-c", f"sleep 1; echo {i}"], timeout=30), range(14)))
    assert [d.text.strip() for d in done] == [str(i) for i in range(14)]
    assert [d.stderr for d in done] == [""] * 14  # ssh's notices of its fallback are not the command's


def test_a_host_found_lost_has_its_shared_connection_ended(sshd: Sshd, shared_dir: Path) -> None:
    runner = _runner(sshd, shared_dir)
    _client_port(runner, "s")
    assert _master_running(runner)
    frozen: list[bool] = []

    def on_line(line: str) -> None:
        if not frozen:
            sshd.freeze()
            frozen.append(True)

    with pytest.raises(HostLost):
        stream(runner, ["sh", "-c", "while :; do echo tick; sleep 0.2; done"], on_line=on_line, timeout=60,
               liveness=FAST)
    # the next command would otherwise wait on the dead connection until its keepalive gives up
    assert not _master_running(runner)


def test_a_silent_shared_connection_costs_one_timeout_and_the_next_command_connects_afresh(
        sshd: Sshd, shared_dir: Path) -> None:
    runner = _runner(sshd, shared_dir)
    old = _client_port(runner, "s")
    # the shared connection's peer goes silent (the host froze, or restarted): ssh takes new commands onto it and
    # nothing comes back until its keepalive gives up; sshd still answers new connections (the host is back)
    sshd.freeze_connection(int(old))
    timeout = 2.0
    failed: list[BaseException] = []

    def command() -> None:
        try:
            runner.run(["true"], timeout=timeout)
        except BaseException as exc:  # handed to the test's thread
            failed.append(exc)

    started = time.monotonic()
    worker = threading.Thread(target=command, daemon=True)
    worker.start()
    worker.join(timeout + SHARED_CHECK_SECONDS + 3)
    took = time.monotonic() - started
    assert not worker.is_alive(), f"the command still waits on the silent connection after {took:.1f} s"
    assert len(failed) == 1 and isinstance(failed[0], CommandTimeout), failed
    assert took >= timeout
    assert not _master_running(runner) and list(shared_dir.iterdir()) == []  # the dead connection was ended
    started = time.monotonic()
    fresh = _client_port(runner, "n")  # the old connection's peer is still silent
    assert fresh != old and time.monotonic() - started < 5
    sshd.thaw()
    assert _client_port(runner, "t") == fresh  # and the new connection is the shared one


def test_a_command_past_its_timeout_on_a_live_shared_connection_is_waited_for(sshd: Sshd, shared_dir: Path,
                                                                              tmp_path: Path) -> None:
    runner = _runner(sshd, shared_dir)
    old = _client_port(runner, "s")
    cleaned = tmp_path / "cleaned-up"
    # the host's `timeout` interrupts it after 1 s; it takes 2 s more to clean up (restic removing its lock)
    script = f"trap 'sleep 2; touch {cleaned}; exit 3' INT; while :; do sleep 0.1; done"
    with pytest.raises(CommandTimeout):
        runner.run(["sh", "-c", script], timeout=1)
    assert cleaned.exists()  # ssh was not ended before the command was
    assert _master_running(runner) and _client_port(runner, "t") == old  # the connection answered: kept


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _killed_caller(runner: SshRunner, argv: list[str], pid_file: Path) -> int:
    """The command started over the shared connection by a caller that is then killed (a worker's crash): the
    remote shell's pid, once it has said it started."""
    caller = subprocess.Popen(runner.argv(argv, shared=True), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              start_new_session=True)
    assert caller.stdout is not None and caller.stdout.readline() == b"started\n"
    os.killpg(caller.pid, signal.SIGKILL)
    caller.wait()
    return int(pid_file.read_text())


def test_a_command_ended_with_its_session_stops_when_its_caller_is_killed(sshd: Sshd, shared_dir: Path,
                                                                       tmp_path: Path) -> None:
    runner = _runner(sshd, shared_dir)
    _client_port(runner, "s")
    pids = {name: tmp_path / f"{name}.pid" for name in ("plain", "guarded")}
    wrote = {name: tmp_path / f"{name}.wrote" for name in pids}

    def writer(name: str) -> list[str]:  # silent for a while (rsync inside a big file), then it writes
        # Python, not `sh -c '…; sleep 30'`: a SIGINT that reaches dash between its echo and its fork of sleep is
        # only noted, and sleep runs its 30 s; Python stops on SIGINT from its first line on, as rsync does
        return [sys.executable, "-c", f"import os, time; open({str(pids[name])!r}, 'w').write(str(os.getpid())); "
                f"print('started', flush=True); time.sleep(30); open({str(wrote[name])!r}, 'w')"]

    plain = _killed_caller(runner, writer("plain"), pids["plain"])
    guarded = _killed_caller(runner, ended_with_session(runner, writer("guarded")), pids["guarded"])
    deadline = time.monotonic() + 10
    while _alive(guarded) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert not _alive(guarded), "the guarded command outlived its session"
        # sshd gives a session without a terminal no hangup: the plain one goes on, and would write in 30 s
        assert _alive(plain)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(plain), signal.SIGKILL)  # its session's group: sh too, if it did not exec
    assert not wrote["guarded"].exists()
    done = runner.run(ended_with_session(runner, ["sh", "-c", "cat; exit 3"]), stdin=b"through", timeout=30)
    assert (done.returncode, done.text) == (3, "through")  # stdin, stdout and the exit code pass the guard


def test_the_sockets_folder_is_this_users_and_per_set_of_host_keys(tmp_path: Path, shared_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    temp = shared_dir  # a short temporary folder
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(temp))
    files = SshFiles(tmp_path / "ssh")
    files.folder.mkdir()
    files.known_hosts.write_text("[10.0.0.1]:22 ssh-ed25519 AAAAone\n")
    first = files.shared_dir()
    assert first is not None and first.parent == temp / f"spark-ssh-{os.geteuid()}"
    assert first.stat().st_mode & 0o777 == 0o700 and first.parent.stat().st_mode & 0o777 == 0o700
    files.known_hosts.write_text("[10.0.0.1]:22 ssh-ed25519 AAAAtwo\n")  # the host was re-created
    second = files.shared_dir()
    assert second is not None and second != first
    first.parent.chmod(0o777)  # a folder others may write to: its sockets could be someone else's
    assert files.shared_dir() is None
    first.parent.chmod(0o700)
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(temp / ("deep" * 20)))
    assert files.shared_dir() is None  # a socket's path would be too long
