"""`FleetPki`: the fleet certificate authority beside `VaultSecrets` — the PKI mount, its CA, each host's PKI role,
ACL policy and AppRole, from the plan `spark lab up` applies too (primespark.pki), applied through hvac."""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv4Address
from typing import Any

import pulumi
from pulumi.dynamic import Resource

from primespark.cloud.vault import FleetPkiProvider
from primespark.fleet.model import Fleet
from primespark.pki import pki_plan


class FleetPkiResource(Resource, module="vault", name="Pki"):
    ca: pulumi.Output[str]

    def __init__(self, name: str, props: dict[str, Any], opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(FleetPkiProvider(), name, {**props, "ca": None}, opts)


class FleetPki(pulumi.ComponentResource):
    def __init__(self, fleet: Fleet, overlays: Mapping[str, Mapping[str, IPv4Address]],
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("primespark:cloud:FleetPki", "pki", {"fleet": fleet.name}, opts)
        # The mesh addresses are the saved mesh plan's (the WireGuardMesh components'), as the monitoring files'.
        self.plan = pki_plan(fleet, overlays)
        self.roles = sorted(h.policy_name for h in self.plan.hosts.values())
        self.pki = FleetPkiResource("fleet-pki", {"fleet": fleet.name, "plan": self.plan.props()},
                                    pulumi.ResourceOptions(parent=self))
        self.ca = self.pki.ca
        self.register_outputs({"mount": self.plan.mount, "roles": self.roles,
                               "lifetime_hours": self.plan.lifetime_hours})
