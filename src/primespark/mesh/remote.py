"""Running shell snippets on mesh hosts: over SSH (the fleet's SSH settings, as Ansible uses them) or in a
network namespace (tests). Rotation and health checks only need `run`."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

from primespark.errors import UserError
from primespark.fleet.model import Fleet
from primespark.inventory import connection_vars
from primespark.settings import Settings

T = TypeVar("T")


class RemoteError(UserError):
    pass


class Runner(Protocol):
    def run(self, host: str, script: str, stdin: str | None = None, timeout: float = 60) -> str: ...


def completed(host: str, proc: subprocess.CompletedProcess[str], script: str) -> str:
    if proc.returncode != 0:
        first = script.strip().splitlines()[0] if script.strip() else script
        raise RemoteError(f"{host}: `{first[:120]}` failed (exit {proc.returncode}): "
                          f"{(proc.stderr or proc.stdout).strip()[:400]}",
                          "check the host is up and reachable, then run the command again")
    return proc.stdout


class SshRunner:
    """ssh with the environment's key and known-hosts file; `sudo -n` for a non-root user."""

    def __init__(self, fleet: Fleet, env: str, settings: Settings | None = None) -> None:
        self.fleet = fleet
        self.extra = connection_vars(env, settings)

    def argv(self, host: str, script: str) -> list[str]:
        spec = self.fleet.hosts[host]
        argv = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-p", str(spec.ssh.port)]
        if key := self.extra.get("ansible_ssh_private_key_file"):
            argv += ["-i", key]
        if common := self.extra.get("ansible_ssh_common_args"):
            argv += shlex.split(common)
        remote = f"sh -c {shlex.quote(script)}"
        if spec.ssh.user != "root":
            remote = f"sudo -n {remote}"
        return [*argv, f"{spec.ssh.user}@{spec.ssh_address}", remote]

    def run(self, host: str, script: str, stdin: str | None = None, timeout: float = 60) -> str:
        try:
            proc = subprocess.run(self.argv(host, script), input=stdin, capture_output=True, text=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise RemoteError(f"{host}: no answer within {timeout:.0f} s over SSH",
                              "check the host is up and reachable") from None
        return completed(host, proc, script)


def on_each(hosts: Iterable[str], action: Callable[[str], T], workers: int = 16) -> dict[str, T]:
    """Run `action` for every host in parallel; the first failure is raised after all have finished."""
    hosts = list(hosts)
    if not hosts:
        return {}
    with ThreadPoolExecutor(max_workers=min(workers, len(hosts))) as pool:
        futures = {h: pool.submit(action, h) for h in hosts}
    return {h: f.result() for h, f in futures.items()}
