"""Running restic on fleet hosts over SSH.

Flows reach hosts with plain OpenSSH and the same host, user, port, key and known_hosts that the Ansible
inventory uses, not with ansible-runner: restic needs its password on stdin (ansible-runner would record
module arguments in its artifact folder) and the backup's JSON summary back unchanged.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from primespark.restic import Completed, HostUnreachable, ResticNotInstalled, ResticTimeout

_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


class SshRunner:
    """Runs a command on one host. Secrets travel as the first lines of stdin, read into the environment of
    that one command by the remote shell: never in argv (visible in `ps`), never in a file."""

    remote = True

    def __init__(
        self,
        name: str,
        address: str,
        user: str,
        port: int = 22,
        key_file: Path | None = None,
        known_hosts: Path | None = None,
    ) -> None:
        self.name = name
        self.address = address
        self.user = user
        self.port = port
        self.key_file = key_file
        self.known_hosts = known_hosts
        self.become = user != "root"

    def ssh_argv(self) -> list[str]:
        argv = ["ssh", "-p", str(self.port), "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
                "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=3", "-o", "LogLevel=ERROR"]
        if self.key_file is not None:
            argv += ["-i", str(self.key_file), "-o", "IdentitiesOnly=yes"]
        if self.known_hosts is not None:
            argv += ["-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes"]
        return [*argv, f"{self.user}@{self.address}"]

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
    ) -> Completed:
        env = dict(env or {})
        reads = ""
        secrets = b""
        for key in sorted(env):
            if not _ENV_NAME.match(key) or "\n" in env[key]:
                raise ValueError(f"cannot pass {key} to {self.name}: names are A-Z_ and values one line")
            reads += f"IFS= read -r {key} && export {key} && "
            secrets += env[key].encode() + b"\n"
        remote = shlex.join(["sh", "-c", reads + "exec " + shlex.join(argv)])
        if self.become:
            remote = "sudo -n " + remote
        try:
            proc = subprocess.run(
                [*self.ssh_argv(), remote], input=secrets + (stdin or b""), capture_output=True,
                timeout=timeout, check=False,
            )
        except subprocess.TimeoutExpired:
            raise ResticTimeout(f"{argv[0]} on {self.name} did not finish in {timeout} s") from None
        stderr = proc.stderr.decode(errors="replace")
        if proc.returncode == 255 and not proc.stdout:
            raise HostUnreachable(f"cannot reach {self.name} ({self.user}@{self.address}:{self.port}) over SSH: "
                                  f"{stderr.strip()}", returncode=255, stderr=stderr)
        if proc.returncode == 127 and "not found" in stderr:
            raise ResticNotInstalled(f"{argv[0]!r} is not installed on {self.name}: {stderr.strip()}")
        return Completed(tuple(argv), proc.returncode, proc.stdout, stderr)

    def pid_alive(self, pid: int) -> bool:
        proc = self.run(["test", "-d", f"/proc/{int(pid)}"], timeout=60)
        if proc.returncode not in (0, 1):
            raise HostUnreachable(f"cannot tell whether pid {pid} runs on {self.name}: {proc.stderr.strip()}")
        return proc.returncode == 0
