"""Running one command on a fleet host: over SSH, or on this machine (tests, benchmarks, a local transport).

Flows reach hosts with plain OpenSSH rather than ansible-runner: secrets must travel on stdin (ansible-runner
records module arguments in its artifact folder) and outputs come back unchanged. A secret is passed as an
environment variable of that one command: its value travels as the first lines of stdin and the remote shell
reads it into the environment — never in argv (visible in `ps`), never in a file.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
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


class SshRunner:
    remote = True
    python = "python3"

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.name = connection.name

    def argv(self, argv: Sequence[str], env_names: Sequence[str] = ()) -> list[str]:
        """The whole ssh command line: the remote command reads `env_names` from stdin, one line each."""
        reads = "".join(f"IFS= read -r {key} && export {key} && " for key in env_names)
        remote = shlex.join(["sh", "-c", reads + "exec " + shlex.join(argv)]) if reads else shlex.join(argv)
        if self.connection.become:
            remote = "sudo -n " + remote
        return [*self.connection.ssh_argv(), remote]

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
    ) -> Completed:
        env = dict(env or {})
        for key, value in env.items():
            if not _ENV_NAME.match(key) or "\n" in value:
                raise ValueError(f"cannot pass {key} to {self.name}: names are A-Z_ and values one line")
        names = sorted(env)
        secrets = b"".join(env[key].encode() + b"\n" for key in names)
        try:
            proc = subprocess.run(self.argv(argv, names), input=secrets + (stdin or b""), capture_output=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise CommandTimeout(f"{argv[0]} on {self.name} did not finish in {timeout:.0f} s",
                                 "check that the host is up and not overloaded") from None
        stderr = proc.stderr.decode(errors="replace")
        if proc.returncode == 255 and not proc.stdout:
            raise HostUnreachable(f"cannot reach {self.name} ({self.connection.login}:{self.connection.port}) over "
                                  f"SSH: {stderr.strip()}", "check that the host is up and reachable",
                                  returncode=255, stderr=stderr)
        if proc.returncode == 127 and "not found" in stderr:
            raise CommandNotFound(f"{argv[0]!r} is not installed on {self.name}: {stderr.strip()}")
        return Completed(tuple(argv), proc.returncode, proc.stdout, stderr)

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

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
    ) -> Completed:
        base = {k: v for k, v in os.environ.items() if not k.startswith("RESTIC_")}
        try:
            proc = subprocess.run([*self.prefix, *argv], input=stdin if stdin is not None else b"",
                                  capture_output=True, env={**base, **(env or {})}, timeout=timeout, check=False)
        except FileNotFoundError:
            raise CommandNotFound(f"{argv[0]!r} is not installed on {self.name}") from None
        except subprocess.TimeoutExpired:
            raise CommandTimeout(f"{' '.join(argv[:3])} … on {self.name} did not finish in {timeout} s") from None
        return Completed(tuple(argv), proc.returncode, proc.stdout, proc.stderr.decode(errors="replace"))

    def pid_alive(self, pid: int) -> bool:
        return os.path.exists(f"/proc/{pid}") if not self.prefix else _pid_alive(self, pid)


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
