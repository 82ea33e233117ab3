"""`WireGuardMesh`: the mesh's cloud side in Pulumi — the cloud VMs' private keys and wg-quick configs held as
Pulumi secrets (encrypted in the state, masked in every display), public keys, overlay addresses and endpoints
exported in the clear. Keys and addresses come from the saved mesh plan (`spark mesh plan`), so Pulumi and
Ansible hand out the same keys; nothing is generated here.
"""

from __future__ import annotations

import pulumi

from primespark.fleet.model import Fleet, HostKind
from primespark.mesh.render import render_host
from primespark.mesh.service import Planned, current_plan
from primespark.secrets import store_for
from primespark.settings import settings_for


class WireGuardMesh(pulumi.ComponentResource):
    public_keys: pulumi.Output[dict[str, str]]
    endpoints: pulumi.Output[dict[str, str]]
    addresses: pulumi.Output[dict[str, str]]
    private_keys: pulumi.Output[dict[str, str]]
    configs: pulumi.Output[dict[str, str]]

    def __init__(self, fleet: Fleet, mesh: str, planned: Planned | None = None,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("primespark:cloud:WireGuardMesh", f"mesh-{mesh}", {"fleet": fleet.name, "mesh": mesh}, opts)
        if planned is None:
            settings = settings_for(fleet.name)
            planned = current_plan(fleet, mesh, settings.state_dir(fleet.name), store_for(fleet, fleet.name, settings))
        plan = planned.plan
        port = plan.spec.listen_port
        self.cloud_vms = [h for h in plan.hosts if fleet.hosts[h].kind is HostKind.vm]
        self.public_keys = pulumi.Output.from_input({h: c.public_key for h, c in plan.hosts.items()})
        self.overlay = {h: c.address for h, c in plan.hosts.items()}  # plain: the monitoring files need them
        self.addresses = pulumi.Output.from_input({h: str(c.address) for h, c in plan.hosts.items()})
        self.endpoints = pulumi.Output.from_input({
            h: f"{fleet.hosts[h].public_address}:{port}" for h in plan.hosts if fleet.hosts[h].public_address})
        self.private_keys = pulumi.Output.secret({h: planned.keys.private_key(h) for h in self.cloud_vms})
        self.configs = pulumi.Output.secret({h: render_host(plan, planned.keys, h) for h in self.cloud_vms})
        self.register_outputs({
            "public_keys": self.public_keys, "addresses": self.addresses, "endpoints": self.endpoints,
            "private_keys": self.private_keys, "configs": self.configs,
        })
