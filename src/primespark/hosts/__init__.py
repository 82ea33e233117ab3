"""How the controller (or a worker) reaches a fleet host: connection settings derived once from the fleet and
the state directory, and one `Runner` protocol with an SSH runner and a local runner."""

from __future__ import annotations

from primespark.fleet.model import Fleet
from primespark.hosts.connection import Connection, SshFiles, connection
from primespark.hosts.runner import (
    CommandFailed,
    CommandNotFound,
    CommandTimeout,
    Completed,
    HostAccess,
    HostLost,
    HostUnreachable,
    Liveness,
    LocalRunner,
    Runner,
    SshRunner,
    on_each,
    run_on,
    shell,
    stream,
)

__all__ = [
    "CommandFailed", "CommandNotFound", "CommandTimeout", "Completed", "Connection", "HostAccess", "HostLost",
    "HostUnreachable", "Liveness", "LocalHosts", "LocalRunner", "Runner", "SshFiles", "SshHosts", "SshRunner",
    "connection", "on_each", "run_on", "shell", "stream",
]


class SshHosts:
    """Every fleet host over SSH, with the environment's key and known_hosts."""

    def __init__(self, fleet: Fleet, files: SshFiles) -> None:
        self.fleet = fleet
        self.files = files

    def connection(self, host: str) -> Connection:
        return connection(self.fleet, host, self.files)

    def runner(self, host: str) -> Runner:
        return SshRunner(self.connection(host))


class LocalHosts:
    """Every host is this machine (tests and benchmarks of the flows)."""

    def runner(self, host: str) -> Runner:
        return LocalRunner(host)
