"""The operator's SSH key for the lab and the hosts' keys as seen from here (known_hosts)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from primespark.fleet.model import Host
from primespark.secrets import atomic_write


def ssh_dir(state_dir: Path) -> Path:
    path = state_dir / "ssh"
    path.mkdir(mode=0o700, exist_ok=True)
    path.chmod(0o700)
    return path


def operator_key(state_dir: Path, comment: str) -> str:
    """The public half of `<state>/ssh/id_ed25519`, made once (0600) on first use."""
    private = ssh_dir(state_dir) / "id_ed25519"
    public = private.with_suffix(".pub")
    if not private.is_file():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
        pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        atomic_write(private, pem, mode=0o600)
        atomic_write(public, pub.decode() + f" {comment}\n", mode=0o644)
    elif not public.is_file():
        key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
        pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
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
    path = ssh_dir(state_dir) / "known_hosts"
    if path.is_file() and path.read_text() == text:
        return False
    atomic_write(path, text, mode=0o644)
    return True


def ssh_argv(state_dir: Path, host: Host, *command: str, batch: bool = True, timeout: int = 5) -> list[str]:
    ssh_files = ssh_dir(state_dir)
    argv = ["ssh", "-i", str(ssh_files / "id_ed25519"),
            "-o", f"UserKnownHostsFile={ssh_files / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes",
            "-o", "IdentitiesOnly=yes", "-o", f"ConnectTimeout={timeout}", "-o", "LogLevel=ERROR",
            "-p", str(host.ssh.port)]
    if batch:
        argv += ["-o", "BatchMode=yes"]
    argv.append(f"{host.ssh.user}@{host.ssh_address}")
    if command:
        argv.append(shlex.join(command) if len(command) > 1 else command[0])
    return argv


def ssh_run(state_dir: Path, host: Host, command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ssh_argv(state_dir, host, command), capture_output=True, text=True, timeout=timeout)
