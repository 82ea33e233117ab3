"""The Pulumi program: read the fleet named in the stack config and compose the cloud side from it.

Nothing here names a host, an address or a size: all of it comes from the fleet model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulumi

from primespark.cloud.cloudinit import exposure_for, vm_seed
from primespark.cloud.services import VaultTarget, endpoints
from primespark.fleet import Fleet, HostKind, ServiceKind, load_fleet
from primespark.hosts import SshFiles
from primespark.mesh.service import Planned
from primespark.monitoring.files import monitoring_files
from primespark.settings import get_settings
from stacks.kvm import KvmHost, VirtualMachine
from stacks.pki import FleetPki
from stacks.services import ServiceStack
from stacks.vault import VaultSecrets
from stacks.wireguard_mesh import WireGuardMesh

# The policy pack checks KVM capacity on the resource graph, so the program does not refuse it first.
FLEET_SKIP = frozenset({"kvm-capacity"})


@dataclass(frozen=True)
class CloudConfig:
    """The stack config (Pulumi.<stack>.yaml, namespace `primespark`): where things are, not what they are."""

    fleet: str
    vault_address: str
    vault_mount: str = "secret"
    public_bridge: str = "br0"
    pool_path: str = "/var/lib/libvirt/images/primespark"
    image_cache: str = ""
    automation_keys: tuple[str, ...] = ()
    libvirt_uri: str = ""  # overrides every KVM host's qemu+ssh URI (test:///default in the integration test)
    manage_vault: bool = True  # false: a stack with no Vault to write to (the libvirt test driver)

    @classmethod
    def from_pulumi(cls) -> CloudConfig:
        config = pulumi.Config("primespark")
        fleet = config.require("fleet")
        return cls(
            fleet=fleet,
            vault_address=config.require("vaultAddress"),
            vault_mount=config.get("vaultMount") or "secret",
            public_bridge=config.get("publicBridge") or "br0",
            pool_path=config.get("poolPath") or cls.pool_path,
            image_cache=config.get("imageCache") or "",
            automation_keys=tuple(_automation_keys(pulumi.get_stack())),
            libvirt_uri=config.get("libvirtUri") or "",
            manage_vault=config.get_bool("manageVault") is not False,
        )


def _state_dir(env: str) -> Path:
    return get_settings().state_path(env)


def _automation_keys(env: str) -> list[str]:
    """The operator's key (the one Ansible and the flows use) is authorised on every VM."""
    return SshFiles.of(_state_dir(env)).public_keys()


def build(fleet: Fleet, config: CloudConfig, mesh_plans: dict[str, Planned] | None = None) -> dict[str, Any]:
    """Register every resource; return the stack outputs (also exported).

    `mesh_plans` stands in for the saved mesh plans (offline `spark plan`); without it the mesh component
    reads the saved plan and refuses a stale one."""
    image_cache = config.image_cache or str(_state_dir(pulumi.get_stack()) / "images")
    vault = VaultTarget(config.vault_address, config.vault_mount)
    vault_secrets = VaultSecrets(fleet, config.vault_mount) if config.manage_vault else None
    after_vault = pulumi.ResourceOptions(depends_on=[vault_secrets] if vault_secrets else [])
    service_endpoints = endpoints(fleet)
    meshes = {name: WireGuardMesh(fleet, name, (mesh_plans or {}).get(name)) for name in sorted(fleet.meshes)}
    # The fleet CA beside VaultSecrets: every host's certificate names its LAN and mesh addresses.
    pki = FleetPki(fleet, {name: mesh.overlay for name, mesh in meshes.items()}) if config.manage_vault else None
    # One set of monitoring files for the whole fleet (Prometheus scrapes the edge at its overlay addresses).
    monitoring = (monitoring_files(fleet, {name: mesh.overlay for name, mesh in meshes.items()})
                  if any(s.kind is ServiceKind.prometheus for s in fleet.services.values()) else None)
    stacks = {host: ServiceStack(host, fleet, vault, service_endpoints, after_vault, monitoring)
              for host in sorted({svc.host for svc in fleet.services.values()})}
    vms: dict[str, dict[str, Any]] = {}
    for kvm_name in fleet.hosts_of(HostKind.kvm_host):
        if not fleet.vms_on(kvm_name):
            continue
        kvm = KvmHost(kvm_name, fleet, pool_path=config.pool_path, image_cache=image_cache,
                      uri=config.libvirt_uri or None)
        for vm_name, host in fleet.vms_on(kvm_name).items():
            files = stacks[vm_name].files if vm_name in stacks else []
            seed = vm_seed(fleet, vm_name, files=files, automation_keys=list(config.automation_keys))
            VirtualMachine(vm_name, fleet, kvm, seed, public_bridge=config.public_bridge,
                           exposure=[e.as_dict() for e in exposure_for(fleet, vm_name)])
            vms[vm_name] = {
                "address": str(host.address), "public_address": str(host.public_address or ""),
                "kvm_host": kvm_name, "ssh": {"address": str(host.ssh_address), "user": host.ssh.user,
                                              "port": host.ssh.port},
                "labels": dict(host.labels), "services": sorted(fleet.services_on(vm_name)),
            }
    outputs: dict[str, Any] = {
        "fleet": fleet.name,
        "vms": vms,
        "services": service_endpoints,
        "vault": {"address": config.vault_address, "mount": config.vault_mount,
                  "roles": vault_secrets.roles if vault_secrets else []},
    }
    if pki is not None:
        outputs["tls"] = {"mount": pki.plan.mount, "lifetime_hours": pki.plan.lifetime_hours, "roles": pki.roles}
    if meshes:
        # Public keys, overlay addresses and endpoints only; the private keys stay secrets of the component.
        outputs["mesh"] = {name: {"public_keys": m.public_keys, "addresses": m.addresses, "endpoints": m.endpoints}
                           for name, m in meshes.items()}
    for key, value in outputs.items():
        pulumi.export(key, value)
    return outputs


def main() -> None:
    config = CloudConfig.from_pulumi()
    build(load_fleet(config.fleet, skip=FLEET_SKIP), config)
