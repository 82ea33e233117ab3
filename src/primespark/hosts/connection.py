"""How a fleet host is reached over SSH: derived once from the fleet and the environment's state directory.

The operator's key and the hosts' known keys live in `<state dir>/ssh/` (the lab makes them; in production the
operator puts them there). Ansible's inventory, the flows' runners, `spark lab ssh`, preflight and the Pulumi
program all take their SSH settings from here, so no two of them can disagree.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from primespark.fleet.model import Fleet

# ssh options shared by every connection: no prompt, host keys checked against our known_hosts, a dead
# connection ended by ssh itself within 40 s (3 keepalives unanswered, 10 s apart, after 10 s of silence; a watched
# stream, hosts.Liveness, notices a silent host sooner; a shared connection has a shorter keepalive, below).
_BATCH = ["-o", "BatchMode=yes"]
_QUIET = ["-o", "LogLevel=ERROR"]
SERVER_ALIVE_INTERVAL = 10
SERVER_ALIVE_COUNT_MAX = 3
_KEEPALIVE = ["-o", f"ServerAliveInterval={SERVER_ALIVE_INTERVAL}",
              "-o", f"ServerAliveCountMax={SERVER_ALIVE_COUNT_MAX}"]
# A runner's commands share one connection per host (OpenSSH's ControlMaster, as Ansible does): a login
# is a key exchange and an authentication (0.3 s on an idle 2-core machine, over a second for eight at once), a
# command on a shared connection one round trip. The connection stays this long after its last command. A peer that
# goes silent under it leaves new commands waiting on it: until a command's timeout (SshRunner.run then ends the
# connection), until the host is found lost (SshRunner.drop_shared), or until the shared keepalive below ends it.
SHARED_PERSIST_SECONDS = 60
# 5 s x 3: a silent peer ends the shared connection in 20 s (measured; 40 at 10 x 3), outlasting a 15 s WireGuard stall
SHARED_ALIVE_INTERVAL = 5
SHARED_ALIVE_COUNT_MAX = 3
_SHARED_KEEPALIVE = ["-o", f"ServerAliveInterval={SHARED_ALIVE_INTERVAL}",
                     "-o", f"ServerAliveCountMax={SHARED_ALIVE_COUNT_MAX}"]
_NOT_SHARED = ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
# A unix socket's path has at most 107 bytes; ssh adds a 17-byte suffix while it creates one, %C is 40.
_SHARED_DIR_MAX = 107 - 17 - 41


@dataclass(frozen=True)
class SshFiles:
    """The operator's key pair and the known_hosts file of one environment."""

    folder: Path

    @classmethod
    def of(cls, state_dir: Path) -> SshFiles:
        return cls(state_dir / "ssh")

    @property
    def key(self) -> Path:
        return self.folder / "id_ed25519"

    @property
    def public_key(self) -> Path:
        return self.folder / "id_ed25519.pub"

    @property
    def known_hosts(self) -> Path:
        return self.folder / "known_hosts"

    def key_if_present(self) -> Path | None:
        return self.key if self.key.is_file() else None

    def known_hosts_if_present(self) -> Path | None:
        return self.known_hosts if self.known_hosts.is_file() else None

    def shared_dir(self) -> Path | None:
        """Where the sockets of this environment's shared connections live: a folder of this user's, 0700, in the
        temporary folder (the state folder may be too deep for a socket's path), one per set of host keys (a host
        re-created with a new key never gets a connection to its predecessor). None when it cannot be had safely
        (someone else's folder, or too long a path): every command then logs in by itself."""
        known = self.known_hosts_if_present()
        digest = hashlib.sha256(known.read_bytes() if known is not None else b"").hexdigest()[:10]
        top = Path(tempfile.gettempdir()) / f"spark-ssh-{os.geteuid()}"
        folder = top / digest
        if len(str(folder)) > _SHARED_DIR_MAX:
            return None
        try:
            top.mkdir(mode=0o700, exist_ok=True)
            found = os.lstat(top)
            if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.geteuid() or found.st_mode & 0o077:
                return None
            folder.mkdir(mode=0o700, exist_ok=True)
        except OSError:
            return None
        return folder

    def public_keys(self) -> list[str]:
        """The operator's public key line, where there is one (authorised on hosts and VMs)."""
        return [self.public_key.read_text(encoding="utf-8").strip()] if self.public_key.is_file() else []

    def ansible_vars(self) -> dict[str, Any]:
        """The same settings as Ansible host variables."""
        out: dict[str, Any] = {}
        if key := self.key_if_present():
            out["ansible_ssh_private_key_file"] = str(key)
        if known := self.known_hosts_if_present():
            out["ansible_ssh_common_args"] = f"-o UserKnownHostsFile={known}"
        return out


@dataclass(frozen=True)
class Connection:
    """One host as SSH reaches it. `become`: commands run under `sudo -n` (the fleet user is not root).
    `shared_dir`: where its shared connection's socket lives (SshFiles.shared_dir); None: none is shared."""

    name: str
    address: str
    user: str
    port: int = 22
    key_file: Path | None = None
    known_hosts: Path | None = None
    shared_dir: Path | None = None

    @property
    def become(self) -> bool:
        return self.user != "root"

    @property
    def login(self) -> str:
        return f"{self.user}@{self.address}"

    def ssh_argv(self, *, batch: bool = True, connect_timeout: int = 10, shared: bool = False) -> list[str]:
        """`ssh … user@address`, to which the remote command is appended. `shared`: over the host's shared
        connection (made by the first such command) where it has one; otherwise always a connection of its own,
        whatever the user's ssh_config says (a probe must be a fresh connection)."""
        argv = ["ssh", "-p", str(self.port), "-o", f"ConnectTimeout={connect_timeout}", *_QUIET]
        if shared and self.shared_dir is not None:
            argv += [*_SHARED_KEEPALIVE, *self._shared_options()]
        else:
            argv += [*_KEEPALIVE, *_NOT_SHARED]
        if batch:
            argv += _BATCH
        if self.key_file is not None:
            argv += ["-i", str(self.key_file), "-o", "IdentitiesOnly=yes"]
        if self.known_hosts is not None:
            argv += ["-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes"]
        return [*argv, self.login]

    def _shared_options(self) -> list[str]:
        return ["-o", "ControlMaster=auto", "-o", f"ControlPath={self.shared_dir}/%C",
                "-o", f"ControlPersist={SHARED_PERSIST_SECONDS}"]

    def close_shared_argv(self) -> list[str] | None:
        """`ssh -O exit …`: ends the host's shared connection (and every command on it); None: it has none."""
        if self.shared_dir is None:
            return None
        return ["ssh", "-p", str(self.port), *_QUIET, *self._shared_options(), "-O", "exit", self.login]


def connection(fleet: Fleet, name: str, files: SshFiles, *, require_files: bool = False) -> Connection:
    """`name` as the fleet says to reach it. The key and known_hosts are used where they exist, or always
    (`require_files`: the lab, which makes them, where a missing file is a bug rather than a choice)."""
    host = fleet.hosts[name]
    key = files.key if require_files else files.key_if_present()
    known = files.known_hosts if require_files else files.known_hosts_if_present()
    return Connection(name, str(host.ssh_address), host.ssh.user, host.ssh.port, key, known)
