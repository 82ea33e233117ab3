"""How the controller (or a worker) reaches a fleet host: connection settings derived once from the fleet and
the state directory, and one `Runner` protocol with an SSH runner and a local runner."""

from __future__ import annotations

import dataclasses
from functools import cached_property
from pathlib import Path

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
    ended_with_session,
    on_each,
    run_on,
    shell,
    stream,
)

__all__ = [
    "CommandFailed", "CommandNotFound", "CommandTimeout", "Completed", "Connection", "HostAccess", "HostLost",
    "HostUnreachable", "Liveness", "LocalHosts", "LocalRunner", "Runner", "SshFiles", "SshHosts", "SshRunner",
    "connection", "ended_with_session", "on_each", "run_on", "shell", "stream",
]


class SshHosts:
    """Every fleet host over SSH, with the environment's key and known_hosts; the runners' commands share one
    connection per host (connection.SHARED_PERSIST_SECONDS)."""

    def __init__(self, fleet: Fleet, files: SshFiles) -> None:
        self.fleet = fleet
        self.files = files

    @cached_property
    def shared_dir(self) -> Path | None:
        return self.files.shared_dir()

    def connection(self, host: str) -> Connection:
        return dataclasses.replace(connection(self.fleet, host, self.files), shared_dir=self.shared_dir)

    def runner(self, host: str) -> Runner:
        return SshRunner(self.connection(host))

    def close_shared(self) -> None:
        """End every host's shared connection (hosts about to go away: they would linger until their keepalive)."""
        for host in self.fleet.hosts:
            SshRunner(self.connection(host)).drop_shared()


class LocalHosts:
    """Every host is this machine (tests and benchmarks of the flows)."""

    def runner(self, host: str) -> Runner:
        return LocalRunner(host)
