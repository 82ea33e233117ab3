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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

from primespark.errors import StepFailed
from primespark.hosts.connection import Connection

T = TypeVar("T")
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
# ssh's notice that a shared connection took no more sessions (sshd's MaxSessions) and that it connected by itself
# instead: not the command's.
_MUX_NOTICE = re.compile(r"^(mux_client_\w+: .*|ControlSocket .* already exists, disabling multiplexing)\r?\n",
                         re.MULTILINE)


class HostUnreachable(StepFailed):
    """The host did not answer over SSH (ssh exit 255): worth retrying."""

    transient = True


class CommandTimeout(StepFailed):
    transient = True


class HostLost(StepFailed):
    """The host stopped answering while a command ran on it: nothing came back for a while and a fresh connection
    got no answer either. Distinct from the command failing, timing out or being cancelled: what the command did
    there, and whether it goes on, is unknown. Not retried on the same host (the caller may place the work
    elsewhere)."""

    # keywords with defaults: an exception is rebuilt from its message alone when unpickled (its fields then)
    def __init__(self, message: str, fix: str = "", *, host: str = "", last_seen: float = 0.0,
                 detected: float = 0.0) -> None:
        super().__init__(message, fix)
        self.host = host
        self.last_seen = last_seen  # wall-clock time of the last line the command sent
        self.detected = detected  # wall-clock time the host was found lost


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
# A command still running past its timeout: `true` over the same shared connection must come back within this
# (0.14 s median on loopback, 2 cores), or the connection is taken for dead (its peer went silent) and ended.
SHARED_CHECK_SECONDS = 5.0
WATCH_STEP_SECONDS = 0.25  # how often a watched stream checks how long its host has been silent


@dataclass(frozen=True)
class Liveness:
    """How the host of a long streamed command is watched. The command sends a line at least every `heartbeat`
    seconds (the agent tasks' host-side script does, output or not); after `silent_after` seconds without one, the
    host is probed over a fresh connection (`true`, given `probe_timeout` seconds). No answer: the host is lost
    and the stream ends with `HostLost`. An answer: the command is slow, not lost; it is probed again after
    another `silent_after` seconds of silence."""

    heartbeat: float = 5.0
    silent_after: float = 15.0
    probe_timeout: float = 10.0

    @property
    def within(self) -> float:
        """The longest from the host going silent to `HostLost`."""
        return self.heartbeat + self.silent_after + self.probe_timeout + WATCH_STEP_SECONDS


def host_lost(host: str, where: str, last_seen: float, why: str) -> HostLost:
    detected = time.time()
    return HostLost(f"{host} ({where}) was lost mid-command: nothing from it for {detected - last_seen:.0f} s and "
                    f"{why}", "check the host's power, network and sshd; what ran there may go on, and is stopped by "
                    "the next run of the same work", host=host, last_seen=last_seen, detected=detected)


class SshRunner:
    remote = True
    python = "python3"

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.name = connection.name

    def argv(self, argv: Sequence[str], env_names: Sequence[str] = (), timeout: float | None = None,
             shared: bool = False) -> list[str]:
        """The whole ssh command line: the remote command reads `env_names` from stdin, one line each. With a
        `timeout`, coreutils `timeout` on the host ends the command (and every process of its group) itself:
        killing ssh here would leave restic running there, holding its lock. `shared`: over the host's shared
        connection (Connection.ssh_argv)."""
        reads = "".join(f"IFS= read -r {key} && export {key} && " for key in env_names)
        remote = shlex.join(["sh", "-c", reads + "exec " + shlex.join(argv)]) if reads else shlex.join(argv)
        if timeout is not None:
            remote = f"timeout -s INT -k {KILL_AFTER_SECONDS} {max(1, round(timeout))} {remote}"
        if self.connection.become:
            remote = "sudo -n " + remote
        return [*self.connection.ssh_argv(shared=shared), remote]

    def _command(self, argv: Sequence[str], env: Mapping[str, str] | None, stdin: bytes | None,
                 timeout: float | None, shared: bool) -> tuple[list[str], bytes]:
        """The ssh command line and what goes to its stdin: the environment's values (one line each), then `stdin`."""
        env = dict(env or {})
        for key, value in env.items():
            if not _ENV_NAME.match(key) or "\n" in value:
                raise ValueError(f"cannot pass {key} to {self.name}: names are A-Z_ and values one line")
        names = sorted(env)
        secrets = b"".join(env[key].encode() + b"\n" for key in names)
        return self.argv(argv, names, timeout, shared), secrets + (stdin or b"")

    def _outcome(self, argv: Sequence[str], returncode: int, stdout: bytes, stderr_bytes: bytes,
                 timeout: float | None, elapsed: float) -> Completed:
        """The command's result, or the error that says what went wrong: the host's `timeout` ended it, ssh could
        not reach the host, the command is not installed there."""
        if timeout is not None and returncode in TIMED_OUT and elapsed >= timeout:
            raise timed_out(argv, self.name, timeout)
        stderr = _MUX_NOTICE.sub("", stderr_bytes.decode(errors="replace"))
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
        """The command over the host's shared connection. Past its `timeout` the host's `timeout` is ending it, and
        ssh gets SSH_GRACE_SECONDS more; unless the shared connection does not answer (SHARED_CHECK_SECONDS): its
        peer went silent and nothing on it will come back, so the command fails with `CommandTimeout` at once and
        the connection is ended, the next command making a fresh one."""
        command, given = self._command(argv, env, stdin, timeout, shared=True)
        started = time.monotonic()
        with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) as proc:
            try:
                stdout, stderr = self._finish(proc, given, argv, timeout, started)
            except BaseException:  # timed out or interrupted: no ssh is left behind (as subprocess.run)
                proc.kill()
                proc.wait()
                raise
        return self._outcome(argv, proc.returncode, stdout, stderr, timeout, time.monotonic() - started)

    def _finish(self, proc: subprocess.Popen[bytes], given: bytes, argv: Sequence[str], timeout: float | None,
                started: float) -> tuple[bytes, bytes]:
        """What `run`'s ssh wrote, once it has ended; CommandTimeout when it has not in time (see `run`)."""
        if timeout is None:
            return proc.communicate(given)
        try:
            return proc.communicate(given, timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        if self.connection.shared_dir is not None and not self.shared_answers(SHARED_CHECK_SECONDS):
            # ssh before its master: a command whose session had not opened yet would otherwise be sent again by
            # ssh, past its timeout, over a connection of its own
            proc.kill()
            proc.wait()
            self.drop_shared()
            raise timed_out(argv, self.name, timeout)
        try:
            return proc.communicate(timeout=max(0.0, started + timeout + SSH_GRACE_SECONDS - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise timed_out(argv, self.name, timeout) from None

    def stream(
        self,
        argv: Sequence[str],
        *,
        on_line: Callable[[str], None],
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        liveness: Liveness | None = None,
    ) -> Completed:
        """`run`, with each line of the command's stdout passed to `on_line` as it arrives. With `liveness`, a
        host that goes silent and does not answer a probe ends it with `HostLost` (ssh's own keepalive, 3 of 5 s on
        a shared connection, ends a dead session too: exit 255, then the same probe; the probe has a connection of
        its own)."""
        command, given = self._command(argv, env, stdin, timeout, shared=True)
        started = time.monotonic()
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def end() -> None:
            """ssh ended, and with it the host's shared connection: its master holds the command's pipes too, and
            they close (the stream ends) only when it does. Ended so, the host is lost or stuck."""
            proc.kill()
            self.drop_shared()

        # past the host's own `timeout` and the grace, ssh itself is ended (the host's `timeout` normally was first)
        try:
            pumped = _pump(proc, given, on_line, None if timeout is None else timeout + SSH_GRACE_SECONDS, end,
                           liveness, self.probe)
        except BaseException:  # interrupted: no ssh is left behind (as subprocess.run in `run`)
            proc.kill()
            proc.wait()
            raise
        where = f"{self.connection.login}:{self.connection.port}"
        if pumped.lost is not None:
            raise host_lost(self.name, where, pumped.last_seen, pumped.lost)
        if pumped.expired:
            raise timed_out(argv, self.name, timeout)
        # 255: ssh lost its session (or the remote command was killed by a signal, the host up): a probe tells
        if pumped.returncode == 255 and pumped.stdout and liveness is not None \
                and not self.probe(liveness.probe_timeout):
            self.drop_shared()
            raise host_lost(self.name, where, pumped.last_seen, "its SSH session ended and a new connection got no "
                            f"answer within {liveness.probe_timeout:.0f} s")
        return self._outcome(argv, pumped.returncode, pumped.stdout, pumped.stderr, timeout,
                             time.monotonic() - started)

    def probe(self, timeout: float) -> bool:
        """Whether the host answers a fresh SSH connection within `timeout` (running `true`). Any exit but ssh's
        own 255 is an answer."""
        argv = [*self.connection.ssh_argv(connect_timeout=max(1, round(timeout))), "true"]
        try:
            return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                                  check=False).returncode != 255
        except subprocess.TimeoutExpired:  # connected, and then nothing (sshd frozen): no answer
            return False

    def shared_answers(self, timeout: float) -> bool:
        """Whether `true` over the host's shared connection comes back within `timeout`: one whose peer went
        silent takes new commands and answers none (until its keepalive ends it). Any exit but ssh's 255 is an
        answer; with no shared connection there, `true` makes one."""
        argv = [*self.connection.ssh_argv(shared=True), "true"]
        try:
            return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                                  check=False).returncode != 255
        except subprocess.TimeoutExpired:
            return False

    def drop_shared(self) -> None:
        """Ends the host's shared connection, if it has one: a host found lost, or a connection that no longer
        answers, would otherwise keep the next commands waiting on it until its keepalive gives up (up to 20 s).
        Commands waiting on it whose session had not opened are then sent by ssh over a connection of its own."""
        argv = self.connection.close_shared_argv()
        if argv is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=5, check=False)

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
        liveness: Liveness | None = None,
    ) -> Completed:
        """`run`, with each line of the command's stdout passed to `on_line` as it arrives; with `liveness`, a
        host that goes silent and fails its probe ends it with `HostLost` (this machine never does; a `prefix`
        standing in for a way to another host may)."""
        proc = self._start(argv, env)

        def end_group() -> None:  # its whole session goes, as in `run`
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        try:
            pumped = _pump(proc, stdin or b"", on_line, timeout, end_group, liveness, self.probe)
        except BaseException:  # interrupted: nothing of the command may run on
            end_group()
            raise
        if pumped.lost is not None:
            assert liveness is not None
            raise host_lost(self.name, "local", pumped.last_seen, pumped.lost)
        if pumped.expired:
            raise timed_out(argv, self.name, timeout)
        return Completed(tuple(argv), pumped.returncode, pumped.stdout, pumped.stderr.decode(errors="replace"))

    def probe(self, timeout: float) -> bool:
        """This machine always answers; through a `prefix` (a namespace, a stand-in host) `true` must run within
        `timeout`."""
        if not self.prefix:
            return True
        proc = subprocess.Popen([*self.prefix, "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            return proc.wait(timeout) == 0
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return False

    def pid_alive(self, pid: int) -> bool:
        return os.path.exists(f"/proc/{pid}") if not self.prefix else _pid_alive(self, pid)


@dataclass(frozen=True)
class _Pumped:
    returncode: int
    stdout: bytes
    stderr: bytes
    expired: bool  # ended past its timeout
    lost: str | None  # ended because its host was lost: why
    last_seen: float  # wall-clock time of its last line (or of its start)


class _Watch:
    """A stream's host watched (with `liveness`): silent for `silent_after` and no answer to `probe`, the stream is
    ended (`end`) and `lost` says why."""

    def __init__(self, liveness: Liveness | None, probe: Callable[[float], bool] | None,
                 end: Callable[[], None]) -> None:
        self.liveness = liveness
        self.probe = probe
        self.end = end
        self.finished = threading.Event()
        self.verdict = threading.Lock()  # lost, or finished: one of them, never both
        self.heard = time.monotonic()
        self.heard_at = time.time()
        self.lost: str | None = None

    def line(self) -> None:
        self.heard, self.heard_at = time.monotonic(), time.time()

    def finish(self) -> None:
        with self.verdict:
            self.finished.set()

    def run(self) -> None:
        liveness, probe = self.liveness, self.probe
        assert liveness is not None and probe is not None
        while not self.finished.wait(WATCH_STEP_SECONDS):
            if time.monotonic() - self.heard < liveness.silent_after:
                continue
            asked = time.monotonic()
            if probe(liveness.probe_timeout) or self.heard > asked:
                self.heard = max(self.heard, time.monotonic())  # slow, not lost: ask again after as much silence
                continue
            with self.verdict:
                if self.finished.is_set():
                    return
                self.lost = f"a new connection got no answer within {liveness.probe_timeout:.0f} s"
            self.end()
            return


def _pump(proc: subprocess.Popen[bytes], data: bytes, on_line: Callable[[str], None], timeout: float | None,
          end: Callable[[], None], liveness: Liveness | None = None,
          probe: Callable[[float], bool] | None = None) -> _Pumped:
    """Feed `data` to the command, pass each stdout line to `on_line` as it comes, collect stderr; `end` it past
    `timeout`, or when, with `liveness`, nothing came for `liveness.silent_after` seconds and `probe` fails."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    errors: list[bytes] = []
    expired = threading.Event()
    watch = _Watch(liveness, probe, end)

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
    if liveness is not None and probe is not None:
        helpers.append(threading.Thread(target=watch.run, daemon=True))
    for helper in helpers:
        helper.start()
    timer = threading.Timer(timeout, expire) if timeout is not None else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    chunks: list[bytes] = []
    try:
        with proc.stdout:
            for complete in _paced_lines(proc.stdout.fileno(), chunks):
                watch.line()
                for raw in complete:
                    on_line(raw.decode(errors="replace"))
        watch.finish()
        returncode = proc.wait()
    finally:
        watch.finished.set()
        if timer is not None:
            timer.cancel()
    for helper in helpers:
        helper.join()
    with contextlib.suppress(Exception):
        proc.stderr.close()
    return _Pumped(returncode, b"".join(chunks), b"".join(errors), expired.is_set(), watch.lost, watch.heard_at)


# A command that prints many short lines (rsync's itemized report: 100,000 of them) would wake a reader that keeps
# up once per line, each wake-up a read of one line (0.9 s of CPU per 100,000, on the cores the command needs).
# After a short read the reader waits this long, so that the next read takes what came meanwhile in one go; small
# enough that the pipe (64 KiB) does not fill at rsync's pace and a line is seen within it.
PACE_SECONDS = 0.01
PACE_BELOW_BYTES = 16 * 1024
READ_BYTES = 1 << 20


def _paced_lines(fd: int, chunks: list[bytes]) -> Iterator[list[bytes]]:
    """The complete lines (without their newline) of what `fd` gives until its end, a read at a time; each read's
    bytes are appended to `chunks`. A last line without a newline comes last."""
    pending: list[bytes] = []  # the start of a line still coming, in pieces: a long line is joined once
    while chunk := os.read(fd, READ_BYTES):
        chunks.append(chunk)
        if b"\n" in chunk:
            *complete, last = chunk.split(b"\n")
            complete[0] = b"".join([*pending, complete[0]])
            pending = [last] if last else []
            yield complete
        else:
            pending.append(chunk)
        if len(chunk) < PACE_BELOW_BYTES:
            time.sleep(PACE_SECONDS)
    if pending:
        yield [b"".join(pending)]


def stream(runner: Runner, argv: Sequence[str], *, on_line: Callable[[str], None],
           env: Mapping[str, str] | None = None, stdin: bytes | None = None,
           timeout: float | None = None, liveness: Liveness | None = None) -> Completed:
    """`runner.run`, with each line of the command's stdout passed to `on_line` as it arrives, where the runner
    can (SshRunner, LocalRunner), its host watched per `liveness` (`HostLost`); through any other runner the lines
    are passed when the command has ended, and the host is not watched."""
    method = getattr(runner, "stream", None)
    if method is not None:
        done: Completed = method(argv, on_line=on_line, env=env, stdin=stdin, timeout=timeout, liveness=liveness)
        return done
    done = runner.run(argv, env=env, stdin=stdin, timeout=timeout)
    for line in done.text.splitlines():
        on_line(line)
    return done


# Run on the host in front of a command: the command ends with the SSH session that started it. sshd gives a session
# without a terminal no SIGHUP when its client goes (a killed worker, a cut network): it only closes the command's
# pipes, and a command that writes nothing to them meanwhile (rsync in the middle of a file) would go on, writing
# on another host after the next pass's replay had cleaned up there. The guard waits for its command or for its
# stdout to have no reader (POLLERR/POLLHUP: the session is gone), then SIGINTs its process group (sshd makes
# each session command a group; rsync and restic stop cleanly on SIGINT) and SIGKILLs it after a grace. A
# SIGINT or SIGTERM to the guard (the host's `timeout` signals the whole group) only lets the command end first.
SESSION_GUARD = """
import os, select, signal, subprocess, sys
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *_: None)
child = subprocess.Popen(sys.argv[1:])
watch = select.poll()
watch.register(1, 0)
try:
    watch.register(os.pidfd_open(child.pid), select.POLLIN)
    wait = None
except (AttributeError, OSError):
    wait = 1000
while child.poll() is None:
    if any(fd == 1 for fd, _ in watch.poll(wait)):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.killpg(0, signal.SIGINT)
        try:
            child.wait(%d)
        except subprocess.TimeoutExpired:
            os.killpg(0, signal.SIGKILL)
        sys.exit(255)
sys.exit(child.returncode if child.returncode >= 0 else 128 - child.returncode)
"""


def ended_with_session(runner: Runner, argv: Sequence[str]) -> list[str]:
    """`argv` for `runner`, ended on its host when the SSH session that runs it goes (SESSION_GUARD): for commands
    that write somewhere other than back to us, which a killed caller must not leave writing. A local runner's
    commands end with their caller's kill of their group already."""
    if not runner.remote:
        return list(argv)
    return [runner.python, "-c", SESSION_GUARD % KILL_AFTER_SECONDS, *argv]


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
