"""A real OpenSSH server on loopback for runner tests: its own host key, client key and known_hosts in a folder of
the test's, run in a mount namespace of its own (sshd as root needs /run/sshd, which this machine need not have,
and the test must not make it). `freeze()` stops it and everything it started with SIGSTOP, as a host that hangs
or drops off the network; `freeze_connection(port)` only the processes serving the connection from that client
port, as a connection whose peer went silent (the host froze or restarted) while new connections are answered;
`kill()` ends them all, as a stopped container."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from primespark.hosts import Connection

SSHD = "/usr/sbin/sshd"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _tree(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _socket_inode(server_port: int, client_port: int) -> str:
    """The inode of sshd's end of the loopback TCP connection from `client_port`."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == server_port and int(fields[2].split(":")[1], 16) == client_port:
            return fields[9]
    raise AssertionError(f"no connection from port {client_port} to sshd's {server_port}")


class Sshd:
    def __init__(self, folder: Path, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.folder = folder
        self.port = port
        self.proc = proc

    def connection(self, name: str) -> Connection:
        return Connection(name, "127.0.0.1", "root", self.port, self.folder / "id_ed25519",
                          self.folder / "known_hosts")

    def _signal(self, sig: int) -> None:
        for pid in _tree(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def freeze(self) -> None:
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)

    def serving(self, client_port: int) -> list[int]:
        """The processes serving the connection from `client_port`: the listener's child that holds its socket,
        and everything below it."""
        socket_link = f"socket:[{_socket_inode(self.port, client_port)}]"
        for pid in _tree(self.proc.pid)[1:]:
            with contextlib.suppress(OSError):
                if any(os.readlink(fd) == socket_link for fd in Path(f"/proc/{pid}/fd").iterdir()):
                    while _parent(pid) != self.proc.pid:
                        pid = _parent(pid)
                    return _tree(pid)
        raise AssertionError(f"no sshd process serves the connection from port {client_port}")

    def freeze_connection(self, client_port: int) -> None:
        for pid in self.serving(client_port):
            os.kill(pid, signal.SIGSTOP)

    def kill(self) -> None:
        pids = _tree(self.proc.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()


@contextmanager
def loopback_sshd(folder: Path) -> Iterator[Sshd]:
    if not (os.path.exists(SSHD) and shutil.which("ssh-keygen") and shutil.which("unshare") and os.geteuid() == 0):
        pytest.skip("needs OpenSSH's sshd, ssh-keygen, unshare and root")
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    for name in ("host_ed25519", "id_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True)
    port = _free_port()
    host_key = (folder / "host_ed25519.pub").read_text().split()
    (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    (folder / "authorized_keys").write_text((folder / "id_ed25519.pub").read_text())
    config = folder / "sshd_config"
    config.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {folder / "host_ed25519"}
AuthorizedKeysFile {folder / "authorized_keys"}
PidFile none
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
LogLevel ERROR
""")
    # a private /run holding the privilege separation folder: the machine's /run is left as it is. Root's
    # ~/.bashrc, which bash reads for a command over SSH, hidden: the machine's shell set-up (a pyenv that rehashes
    # its shims, racing with itself in concurrent sessions) is not what the tests run
    script = (f"mount -t tmpfs tmpfs /run && mkdir -m 755 /run/sshd"
              f" && {{ [ ! -e /root/.bashrc ] || mount --bind /dev/null /root/.bashrc; }}"
              f" && exec {SSHD} -D -e -f {config}")
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=(folder / "sshd.log").open("wb"))
    server = Sshd(folder, port, proc)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"sshd ended: {(folder / 'sshd.log').read_text()}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "sshd did not listen within 20 s"
                time.sleep(0.05)
        yield server
    finally:
        server.thaw()
        server.kill()
