"""The fleet: one typed, validated description that everything else derives from."""

from primespark.fleet.errors import FleetError, Problem
from primespark.fleet.loader import load_fleet, load_text
from primespark.fleet.model import Fleet, Host, HostKind, ServiceKind, Site, Topology

__all__ = [
    "Fleet", "FleetError", "Host", "HostKind", "Problem", "ServiceKind", "Site", "Topology", "load_fleet",
    "load_text",
]
