"""One context for operations: the environment, its fleet, settings, secret store and the way to reach hosts.

Commands and flows build one `FleetContext`; domain modules (backup, mesh, …) ask it through functions of
their own rather than each cloning a context of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from primespark.fleet import Fleet, load_fleet
from primespark.hosts import HostAccess, LocalHosts, SshFiles, SshHosts
from primespark.secrets import SecretStore, store_for
from primespark.settings import Settings, settings_for

# ssh: commands run on the fleet's hosts; local: every host is this machine (tests and benchmarks).
Transport = Literal["ssh", "local"]


def env_name(env_or_file: str, fleet: Fleet) -> str:
    """The environment a fleet file stands for: its fleet's name when given as a path."""
    return fleet.name if Path(env_or_file).suffix in (".yaml", ".yml") else env_or_file


@dataclass
class FleetContext:
    env: str
    fleet: Fleet
    settings: Settings
    transport: Transport
    hosts: HostAccess

    @classmethod
    def load(cls, env_or_file: str, transport: Transport = "ssh") -> FleetContext:
        fleet = load_fleet(env_or_file)
        env = env_name(env_or_file, fleet)
        settings = settings_for(env)
        hosts: HostAccess = (SshHosts(fleet, SshFiles.of(settings.state_path(env))) if transport == "ssh"
                             else LocalHosts())
        return cls(env, fleet, settings, transport, hosts)

    @property
    def state_dir(self) -> Path:
        """The environment's state directory (made, 0700, on first use)."""
        return self.settings.state_dir(self.env)

    @cached_property
    def secrets(self) -> SecretStore:
        """Built on first use: reading history or a plan needs no secret store. Where it is, the fleet file's
        `secrets:` section says (the lab: its own OpenBao, with the token from the lab's state directory)."""
        return store_for(self.fleet, self.env, self.settings)
