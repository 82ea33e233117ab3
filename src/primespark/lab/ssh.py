"""The operator's SSH key for the lab and the hosts' keys as seen from here (known_hosts): made by the lab,
in the files `primespark.hosts.SshFiles` names."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from primespark.fleet.model import Fleet, Host
from primespark.hosts import Connection, SshFiles, connection
from primespark.secrets import atomic_write


def ssh_files(state_dir: Path) -> SshFiles:
    """The lab's SSH files, their folder made (0700) on first use."""
    files = SshFiles.of(state_dir)
    files.folder.mkdir(mode=0o700, exist_ok=True)
    files.folder.chmod(0o700)
    return files


def operator_key(state_dir: Path, comment: str) -> str:
    """The public half of the operator's key, made once (0600) on first use."""
    files = ssh_files(state_dir)
    private, public = files.key, files.public_key
    if not private.is_file():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
        pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        atomic_write(private, pem, mode=0o600)
        atomic_write(public, pub.decode() + f" {comment}\n", mode=0o644)
    elif not public.is_file():
        loaded = serialization.load_ssh_private_key(private.read_bytes(), password=None)
        pub = loaded.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        atomic_write(public, pub.decode() + f" {comment}\n", mode=0o644)
    return public.read_text().strip()


def known_host_names(name: str, host: Host) -> list[str]:
    """How the host is addressed: name, SSH address, public address (bracketed with a port other than 22)."""
    names = [name, str(host.ssh_address), str(host.address)]
    if host.public_address is not None:
        names.append(str(host.public_address))
    unique = list(dict.fromkeys(names))
    if host.ssh.port != 22:
        unique = [f"[{n}]:{host.ssh.port}" for n in unique]
    return unique


def write_known_hosts(state_dir: Path, entries: dict[str, tuple[list[str], list[str]]]) -> bool:
    """entries: host -> (names, public host keys). Rewritten only when it changes; True if it did."""
    lines = [f"{','.join(names)} {key}" for _, (names, keys) in sorted(entries.items()) for key in keys]
    text = "\n".join(lines) + "\n"
    path = ssh_files(state_dir).known_hosts
    if path.is_file() and path.read_text() == text:
        return False
    atomic_write(path, text, mode=0o644)
    return True


def lab_connection(state_dir: Path, fleet: Fleet, name: str) -> Connection:
    """A lab host as SSH reaches it: always with the lab's own key and known_hosts."""
    return connection(fleet, name, ssh_files(state_dir), require_files=True)


def ssh_argv(state_dir: Path, fleet: Fleet, name: str, *command: str, batch: bool = True,
             timeout: int = 5) -> list[str]:
    argv = lab_connection(state_dir, fleet, name).ssh_argv(batch=batch, connect_timeout=timeout)
    if command:
        argv.append(shlex.join(command) if len(command) > 1 else command[0])
    return argv


def ssh_run(state_dir: Path, fleet: Fleet, name: str, command: str,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ssh_argv(state_dir, fleet, name, command), capture_output=True, text=True, timeout=timeout)
