"""Running one command on a fleet host: over SSH, or on this machine (tests, benchmarks, a local transport).

Flows reach hosts with plain OpenSSH rather than ansible-runner: secrets must travel on stdin (ansible-runner
records module arguments in its artifact folder) and outputs come back unchanged. A secret is passed as an
environment variable of that one command: its value travels as the first lines of stdin and the remote shell
reads it into the environment — never in argv (visible in `ps`), never in a file.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

from primespark.errors import StepFailed
from primespark.hosts.connection import Connection

T = TypeVar("T")
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


class HostUnreachable(StepFailed):
    """The host did not answer over SSH (ssh exit 255): worth retrying."""

    transient = True


class CommandTimeout(StepFailed):
    transient = True


class CommandNotFound(StepFailed):
    pass


class CommandFailed(StepFailed):
    pass


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: str

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


class Runner(Protocol):
    """Runs one command on one host with extra environment variables (secrets among them)."""

    name: str
    remote: bool
    python: str  # the host's Python, for host-side sessions (standard library only)

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
    ) -> Completed: ...

    def pid_alive(self, pid: int) -> bool: ...


class HostAccess(Protocol):
    """Where a domain gets the runner of a host: SSH in production and the lab, this machine in tests, a network
    namespace in the mesh tests."""

    def runner(self, host: str) -> Runner: ...


# A command that outlives its timeout gets SIGINT (restic then removes its own lock), and SIGKILL this much later.
KILL_AFTER_SECONDS = 30
# The controller waits this much longer than the host's own `timeout`, which normally ends the command first.
SSH_GRACE_SECONDS = KILL_AFTER_SECONDS + 30
TIMED_OUT = (124, 137)  # coreutils `timeout`: the command timed out (137: it had to be killed)


class SshRunner:
    remote = True
    python = "python3"

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.name = connection.name

    def argv(self, argv: Sequence[str], env_names: Sequence[str] = (), timeout: float | None = None) -> list[str]:
        """The whole ssh command line: the remote command reads `env_names` from stdin, one line each. With a
        `timeout`, coreutils `timeout` on the host ends the command (and every process of its group) itself:
        killing ssh here would leave restic running there, holding its lock."""
        reads = "".join(f"IFS= read -r {key} && export {key} && " for key in env_names)
        remote = shlex.join(["sh", "-c", reads + "exec " + shlex.join(argv)]) if reads else shlex.join(argv)
        if timeout is not None:
            remote = f"timeout -s INT -k {KILL_AFTER_SECONDS} {max(1, round(timeout))} {remote}"
        if self.connection.become:
            remote = "sudo -n " + remote
        return [*self.connection.ssh_argv(), remote]

    def _command(self, argv: Sequence[str], env: Mapping[str, str] | None, stdin: bytes | None,
                 timeout: float | None) -> tuple[list[str], bytes]:
        """The ssh command line and what goes to its stdin: the environment's values (one line each), then `stdin`."""
        env = dict(env or {})
        for key, value in env.items():
            if not _ENV_NAME.match(key) or "\n" in value:
                raise ValueError(f"cannot pass {key} to {self.name}: names are A-Z_ and values one line")
        names = sorted(env)
        secrets = b"".join(env[key].encode() + b"\n" for key in names)
        return self.argv(argv, names, timeout), secrets + (stdin or b"")

    def _outcome(self, argv: Sequence[str], returncode: int, stdout: bytes, stderr_bytes: bytes,
                 timeout: float | None, elapsed: float) -> Completed:
        """The command's result, or the error that says what went wrong: the host's `timeout` ended it, ssh could
        not reach the host, the command is not installed there."""
        if timeout is not None and returncode in TIMED_OUT and elapsed >= timeout:
            raise timed_out(argv, self.name, timeout)
        stderr = stderr_bytes.decode(errors="replace")
        if returncode == 255 and not stdout:
            raise HostUnreachable(f"cannot reach {self.name} ({self.connection.login}:{self.connection.port}) over "
                                  f"SSH: {stderr.strip()}", "check that the host is up and reachable",
                                  returncode=255, stderr=stderr)
        if returncode == 127 and "not found" in stderr:
            raise CommandNotFound(f"{argv[0]!r} is not installed on {self.name}: {stderr.strip()}")
        return Completed(tuple(argv), returncode, stdout, stderr)

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
    ) -> Completed:
        command, given = self._command(argv, env, stdin, timeout)
        started = time.monotonic()
        try:
            proc = subprocess.run(command, input=given, capture_output=True,
                                  timeout=None if timeout is None else timeout + SSH_GRACE_SECONDS, check=False)
        except subprocess.TimeoutExpired:
            raise timed_out(argv, self.name, timeout) from None
        return self._outcome(argv, proc.returncode, proc.stdout, proc.stderr, timeout, time.monotonic() - started)

    def stream(
        self,
        argv: Sequence[str],
        *,
        on_line: Callable[[str], None],
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
    ) -> Completed:
        """`run`, with each line of the command's stdout passed to `on_line` as it arrives."""
        command, given = self._command(argv, env, stdin, timeout)
        started = time.monotonic()
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # past the host's own `timeout` and the grace, ssh itself is ended (the host's `timeout` normally was first)
        try:
            returncode, stdout, stderr_bytes, expired = _pump(
                proc, given, on_line, None if timeout is None else timeout + SSH_GRACE_SECONDS, proc.kill)
        except BaseException:  # interrupted: no ssh is left behind (as subprocess.run in `run`)
            proc.kill()
            proc.wait()
            raise
        if expired:
            raise timed_out(argv, self.name, timeout)
        return self._outcome(argv, returncode, stdout, stderr_bytes, timeout, time.monotonic() - started)

    def pid_alive(self, pid: int) -> bool:
        return _pid_alive(self, pid)


class LocalRunner:
    """Runs on this machine, standing in for host `name`; `prefix` wraps every command (e.g. `nsenter` into a
    network namespace). Inherited RESTIC_* variables are dropped: a host would not have the controller's."""

    remote = False

    def __init__(self, name: str = "localhost", prefix: Sequence[str] = ()) -> None:
        self.name = name
        self.prefix = list(prefix)
        # this interpreter, not whatever `python3` a shim on PATH starts (in a namespace: the host's own)
        self.python = "python3" if prefix else sys.executable

    def _start(self, argv: Sequence[str], env: Mapping[str, str] | None) -> subprocess.Popen[bytes]:
        """The command in a session of its own: on a timeout its whole process group goes (restic started by a
        host-side session included), as coreutils `timeout` does on a host."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("RESTIC_")}
        try:
            return subprocess.Popen([*self.prefix, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env={**base, **(env or {})}, start_new_session=True)
        except FileNotFoundError:
            raise CommandNotFound(f"{argv[0]!r} is not installed on {self.name}") from None

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
    ) -> Completed:
        proc = self._start(argv, env)
        with proc:
            try:
                stdout, stderr = proc.communicate(stdin if stdin is not None else b"", timeout=timeout)
            except subprocess.TimeoutExpired:
                _end_group(proc)
                raise timed_out(argv, self.name, timeout) from None
            except BaseException:  # interrupted: nothing of the command may run on
                _end_group(proc)
                raise
        return Completed(tuple(argv), proc.returncode, stdout, stderr.decode(errors="replace"))

    def stream(
        self,
        argv: Sequence[str],
        *,
        on_line: Callable[[str], None],
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
    ) -> Completed:
        """`run`, with each line of the command's stdout passed to `on_line` as it arrives."""
        proc = self._start(argv, env)

        def end_group() -> None:  # its whole session goes, as in `run`
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        try:
            returncode, stdout, stderr, expired = _pump(proc, stdin or b"", on_line, timeout, end_group)
        except BaseException:  # interrupted: nothing of the command may run on
            end_group()
            raise
        if expired:
            raise timed_out(argv, self.name, timeout)
        return Completed(tuple(argv), returncode, stdout, stderr.decode(errors="replace"))

    def pid_alive(self, pid: int) -> bool:
        return os.path.exists(f"/proc/{pid}") if not self.prefix else _pid_alive(self, pid)


def _pump(proc: subprocess.Popen[bytes], data: bytes, on_line: Callable[[str], None], timeout: float | None,
          end: Callable[[], None]) -> tuple[int, bytes, bytes, bool]:
    """Feed `data` to the command, pass each stdout line to `on_line` as it comes, collect stderr; `end` it past
    `timeout`. (returncode, stdout, stderr, whether it timed out.)"""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    errors: list[bytes] = []
    expired = threading.Event()

    def feed() -> None:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError), proc.stdin:
            proc.stdin.write(data)

    def collect() -> None:
        assert proc.stderr is not None
        errors.append(proc.stderr.read())

    def expire() -> None:
        expired.set()
        end()

    helpers = [threading.Thread(target=feed, daemon=True), threading.Thread(target=collect, daemon=True)]
    for helper in helpers:
        helper.start()
    timer = threading.Timer(timeout, expire) if timeout is not None else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    lines: list[bytes] = []
    try:
        with proc.stdout:
            for raw in proc.stdout:
                lines.append(raw)
                on_line(raw.decode(errors="replace").rstrip("\n"))
        returncode = proc.wait()
    finally:
        if timer is not None:
            timer.cancel()
    for helper in helpers:
        helper.join()
    with contextlib.suppress(Exception):
        proc.stderr.close()
    return returncode, b"".join(lines), b"".join(errors), expired.is_set()


def stream(runner: Runner, argv: Sequence[str], *, on_line: Callable[[str], None],
           env: Mapping[str, str] | None = None, stdin: bytes | None = None,
           timeout: float | None = None) -> Completed:
    """`runner.run`, with each line of the command's stdout passed to `on_line` as it arrives, where the runner
    can (SshRunner, LocalRunner); through any other runner the lines are passed when the command has ended."""
    method = getattr(runner, "stream", None)
    if method is not None:
        done: Completed = method(argv, on_line=on_line, env=env, stdin=stdin, timeout=timeout)
        return done
    done = runner.run(argv, env=env, stdin=stdin, timeout=timeout)
    for line in done.text.splitlines():
        on_line(line)
    return done


def timed_out(argv: Sequence[str], host: str, timeout: float | None) -> CommandTimeout:
    return CommandTimeout(f"`{' '.join(argv[:3])}{' …' if len(argv) > 3 else ''}` on {host} did not finish within "
                          f"{timeout or 0:.0f} s and was stopped there",
                          "check that the host is up and not overloaded; `backup.timeouts` in the fleet file sets "
                          "how long backup steps may take")


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT to the command's process group (restic removes its lock), SIGKILL if it is still there later."""
    for sig, wait in ((signal.SIGINT, KILL_AFTER_SECONDS), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.communicate(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):  # the group may outlive its leader
        os.killpg(proc.pid, signal.SIGKILL)


def _pid_alive(runner: Runner, pid: int) -> bool:
    proc = runner.run(["test", "-d", f"/proc/{int(pid)}"], timeout=60)
    if proc.returncode not in (0, 1):
        raise HostUnreachable(f"cannot tell whether pid {pid} runs on {runner.name}: {proc.stderr.strip()}")
    return proc.returncode == 0


def shell(runner: Runner, script: str, stdin: str | None = None, timeout: float = 60) -> str:
    """A shell snippet on the host; its output, or CommandFailed naming the host and the snippet's first line."""
    proc = runner.run(["sh", "-c", script], stdin=None if stdin is None else stdin.encode(), timeout=timeout)
    if proc.returncode != 0:
        first = script.strip().splitlines()[0] if script.strip() else script
        raise CommandFailed(f"{runner.name}: `{first[:120]}` failed (exit {proc.returncode}): "
                            f"{(proc.stderr or proc.text).strip()[:400]}",
                            "check the host is up and reachable, then run the command again",
                            returncode=proc.returncode, stderr=proc.stderr)
    return proc.text


def run_on(hosts: HostAccess, host: str, script: str, stdin: str | None = None, timeout: float = 60) -> str:
    """`shell` on a host of `hosts`."""
    return shell(hosts.runner(host), script, stdin, timeout)


def on_each(hosts: Iterable[str], action: Callable[[str], T], workers: int = 16) -> dict[str, T]:
    """Run `action` for every host in parallel; the first failure is raised after all have finished."""
    hosts = list(hosts)
    if not hosts:
        return {}
    with ThreadPoolExecutor(max_workers=min(workers, len(hosts))) as pool:
        futures = {h: pool.submit(action, h) for h in hosts}
    return {h: f.result() for h, f in futures.items()}
