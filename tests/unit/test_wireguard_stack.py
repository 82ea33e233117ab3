"""`WireGuardMesh` under Pulumi's mocks: the cloud VMs' keys and configs are secrets, public data is not."""

from __future__ import annotations

import pulumi

from primespark.cloud.mockengine import run_program
from primespark.fleet import load_fleet
from primespark.fleet.model import HostKind
from primespark.mesh.keys import public_key_of
from primespark.mesh.service import plan_and_save
from primespark.secrets import LocalSecretStore
from stacks.wireguard_mesh import WireGuardMesh


def test_cloud_keys_are_pulumi_secrets_and_public_keys_match_the_plan(tmp_path):
    fleet = load_fleet("lab")
    planned = plan_and_save(fleet, "fleet", tmp_path, LocalSecretStore(tmp_path / "secrets"))

    def program() -> None:
        mesh = WireGuardMesh(fleet, "fleet", planned)
        for name in ("public_keys", "endpoints", "addresses", "private_keys", "configs"):
            pulumi.export(f"mesh_{name}", getattr(mesh, name))

    graph = run_program(program, "lab")
    [component] = graph.of_type("primespark:cloud:WireGuardMesh")
    assert component.name == "mesh-fleet"
    outputs = graph.outputs
    vms = sorted(h for h in planned.plan.hosts if fleet.hosts[h].kind is HostKind.vm)
    assert vms == ["analytics-1", "core-1", "ops-1", "stream-1"]
    assert graph.secret_outputs == {"mesh_private_keys", "mesh_configs"}
    assert sorted(outputs["mesh_private_keys"]) == vms, "only the cloud VMs' keys go to Pulumi"
    for host in vms:
        private = outputs["mesh_private_keys"][host]
        assert public_key_of(private) == outputs["mesh_public_keys"][host] == planned.plan.hosts[host].public_key
        assert f"PrivateKey = {private}" in outputs["mesh_configs"][host]
    assert outputs["mesh_public_keys"]["pi-1"] == planned.plan.hosts["pi-1"].public_key
    assert outputs["mesh_endpoints"] == {h: f"{fleet.hosts[h].public_address}:51820" for h in vms}
    assert outputs["mesh_addresses"]["core-1"] == str(planned.plan.hosts["core-1"].address)
