"""`ServiceStack`: the compose services the fleet places on one VM, with their boot-time secret pull."""

from __future__ import annotations

from collections.abc import Mapping

import pulumi

from primespark.cloud.services import VaultTarget, endpoints, stack_files
from primespark.fleet.model import Fleet


class ServiceStack(pulumi.ComponentResource):
    """Files for cloud-init (compose, Vault pull, systemd units) and the endpoints they serve."""

    def __init__(self, host: str, fleet: Fleet, vault: VaultTarget, all_endpoints: dict[str, dict] | None = None,
                 opts: pulumi.ResourceOptions | None = None, monitoring: Mapping[str, str] | None = None) -> None:
        self.files = stack_files(fleet, host, vault, monitoring)
        self.endpoints = {name: ep for name, ep in (all_endpoints or endpoints(fleet)).items() if ep["host"] == host}
        super().__init__("primespark:cloud:ServiceStack", f"{host}-services", {
            "host": host, "services": self.endpoints, "paths": [f.path for f in self.files],
        }, opts)
        self.register_outputs({"endpoints": self.endpoints})
