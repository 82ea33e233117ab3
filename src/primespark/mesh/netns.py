"""Hosts as Linux network namespaces on one bridge: real WireGuard tunnels (wireguard-go) without containers.

Each host is held by an `unshare` process with its own network and mount namespaces, so that every host
has its own /etc/wireguard and /run/wireguard (wireguard-go's control sockets), as a real machine does.
Used by the tests; everything is torn down by `close()`, which kills every process in the namespaces.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterable
from ipaddress import IPv4Address
from pathlib import Path
from typing import NamedTuple

from primespark.errors import UserError
from primespark.hosts import LocalRunner, Runner, shell

_HOLD = ("mount --make-rprivate / && mount -t tmpfs -o mode=0700 tmpfs /run/wireguard && "
         "mount -t tmpfs -o mode=0700 tmpfs /etc/wireguard && mount -t sysfs sysfs /sys && "
         "ip link set lo up && echo ready && exec sleep 86400")


def completed(host: str, proc: subprocess.CompletedProcess[str], what: str) -> str:
    """The output of a set-up step of the fabric, or an error naming the host and the step."""
    if proc.returncode != 0:
        raise UserError(f"{host}: `{what.strip()[:120]}` failed (exit {proc.returncode}): "
                        f"{(proc.stderr or proc.stdout).strip()[:400]}")
    return proc.stdout


def netns_available() -> str | None:
    """Why namespaces with wireguard-go cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("unshare", "nsenter", "ip", "wg", "wg-quick", "wireguard-go", "ping"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if not Path("/dev/net/tun").exists():
        return "needs /dev/net/tun for wireguard-go"
    return None


class NetnsFabric:
    def __init__(self) -> None:
        self.tag = secrets.token_hex(2)
        self.holders: dict[str, subprocess.Popen[str]] = {}
        self.addresses: dict[str, list[IPv4Address]] = {}
        for folder in ("/run/wireguard", "/etc/wireguard"):
            Path(folder).mkdir(parents=True, exist_ok=True)
        self._switch = self._hold("switch")
        self._in(self._switch, "ip link add br0 type bridge && ip link set br0 up")

    def _hold(self, name: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(["unshare", "--net", "--mount", "--", "sh", "-c", _HOLD], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            proc.kill()
            raise RuntimeError(f"namespace for {name} did not start: {proc.stderr.read() if proc.stderr else ''}")
        return proc

    def _in(self, holder: subprocess.Popen[str], script: str, stdin: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nsenter", "-t", str(holder.pid), "-n", "-m", "--", "sh", "-c", script],
                              input=stdin, capture_output=True, text=True, timeout=timeout, check=False)

    def argv(self, host: str, script: str) -> list[str]:
        return ["nsenter", "-t", str(self.holders[host].pid), "-n", "-m", "--", "sh", "-c", script]

    def add_host(self, name: str, addresses: Iterable[IPv4Address]) -> None:
        index = len(self.holders)
        holder = self._hold(name)
        self.holders[name] = holder
        self.addresses[name] = list(addresses)
        outside = f"sp{self.tag}{index}"
        for argv in (["ip", "link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", str(holder.pid)],
                     ["ip", "link", "set", outside, "netns", str(self._switch.pid)]):
            completed(name, subprocess.run(argv, capture_output=True, text=True, check=False), " ".join(argv))
        completed(name, self._in(self._switch, f"ip link set {outside} master br0 up"), "bridge")
        script = "".join(f"ip addr add {a}/32 dev eth0 && " for a in self.addresses[name]) + "ip link set eth0 up"
        completed(name, self._in(holder, script), script)

    def connect_all(self) -> None:
        """On-link routes to every other host's addresses: one flat underlay, LAN and public alike."""
        for name, holder in self.holders.items():
            routes = [f"route replace {a}/32 dev eth0" for other, addrs in self.addresses.items()
                      if other != name for a in addrs]
            completed(name, self._in(holder, "ip -batch -", "\n".join(routes) + "\n"), "routes")

    def runner(self, host: str) -> Runner:
        """The host's runner (the hosts layer's local runner, entering the host's namespaces)."""
        return LocalRunner(host, prefix=["nsenter", "-t", str(self.holders[host].pid), "-n", "-m", "--"])

    def run(self, host: str, script: str, stdin: str | None = None, timeout: float = 60) -> str:
        return shell(self.runner(host), script, stdin, timeout)

    def pids_in(self, host: str) -> list[int]:
        target = os.readlink(f"/proc/{self.holders[host].pid}/ns/net")
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.readlink(f"/proc/{entry}/ns/net") == target:
                        found.append(int(entry))
                except OSError:
                    continue
        return found

    def close(self) -> None:
        """Kill every process in every namespace (wireguard-go daemons too), then the holders; never raises."""
        for name, holder in list(self.holders.items()):
            try:
                for pid in self.pids_in(name) if holder.poll() is None else []:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
            finally:
                holder.kill()
                holder.wait()
        self.holders.clear()
        self._switch.kill()
        self._switch.wait()

    def __enter__(self) -> NetnsFabric:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ContinuousPing:
    """`ping -D` every `interval` seconds from a host (any argv prefix: nsenter, ssh), for measuring outages."""

    def __init__(self, argv: list[str], deadline: float | None = None) -> None:
        self.deadline = deadline
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    @staticmethod
    def command(address: str, interval: float = 0.1, deadline: int | None = None) -> str:
        """With a deadline ping ends by itself (for `docker exec`, which does not pass SIGINT on)."""
        until = f" -w {deadline}" if deadline else ""
        return f"exec ping -D -n -i {interval} -W 1{until} {address}"

    def stop(self) -> PingResult:
        """What ping saw; the echoes still in flight when it was stopped count as sent, not as lost."""
        if self.deadline is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=(self.deadline or 0) + 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        replies = [line for line in out.splitlines() if line.startswith("[") and "bytes from" in line]
        stamps = [float(line[1:line.index("]")]) for line in replies]
        answered = {int(line.split("icmp_seq=")[1].split()[0]) for line in replies if "icmp_seq=" in line}
        sent = received = 0
        for line in out.splitlines():
            if "packets transmitted" in line:
                parts = line.split()
                sent, received = int(parts[0]), int(parts[3])
        gap = max((b - a for a, b in itertools.pairwise(stamps)), default=float("inf"))
        last = max(answered, default=0)
        return PingResult(sent, received, gap, lost=last - len(answered), unanswered_at_end=sent - last)


class PingResult(NamedTuple):
    sent: int
    received: int
    gap: float  # longest silence in seconds between two consecutive replies
    lost: int  # echoes without a reply although a later one had one: a real outage
    unanswered_at_end: int  # the last echoes, unanswered when ping stopped (in flight, or the tunnel is down)
