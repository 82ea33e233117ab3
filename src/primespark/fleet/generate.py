"""Synthetic fleets of any size, for benchmarks and scale tests: a valid fleet file's data, not a model."""

from __future__ import annotations

from ipaddress import IPv4Network
from typing import Any

import yaml

from primespark.fleet.model import ServiceKind

VMS_PER_KVM_HOST = 8


def generate_fleet_data(
    hosts: int, *, vm_share: float = 0.4, topology: str = "full_mesh", name: str = "scale"
) -> dict[str, Any]:
    """About `hosts` hosts: Pis and NASes at the edge; VMs (with KVM hosts to hold them) in the cloud."""
    vms = int(hosts * vm_share)
    kvm_hosts = max(1, -(-vms // VMS_PER_KVM_HOST))
    edge = max(2, hosts - vms - kvm_hosts)
    edge_lan, cloud_lan, wan = IPv4Network("10.64.0.0/16"), IPv4Network("10.65.0.0/16"), IPv4Network("10.66.0.0/16")
    overlay_prefix = 32
    while 2 ** (32 - overlay_prefix) - 2 < hosts + 2:
        overlay_prefix -= 1
    data: dict[str, Any] = {
        "name": name,
        "sites": {
            "edge": {"kind": "edge", "lan": str(edge_lan), "behind_nat": True,
                     "public_address": str(wan.network_address + 2)},
            "cloud": {"kind": "cloud", "lan": str(cloud_lan)},
        },
        "lab": {"wan": str(wan)},
        "images": {"debian-12": {"url": "https://images.example.org/debian-12.qcow2", "sha256": "a" * 64}},
        "hosts": {},
        "services": {},
    }
    all_hosts: dict[str, Any] = data["hosts"]
    for i in range(edge):
        kind = "nas" if i % 20 == 0 else "pi"
        entry: dict[str, Any] = {"kind": kind, "site": "edge", "cpus": 4, "memory_mb": 4096, "disk_gb": 64,
                                 "address": str(edge_lan.network_address + 10 + i), "labels": {"role": "agent"}}
        if kind == "pi":
            entry.update(arch="aarch64", power={"governor": "ondemand"})
        all_hosts[f"{kind}-{i + 1}"] = entry
    for k in range(kvm_hosts):
        all_hosts[f"kvm-{k + 1}"] = {
            "kind": "kvm_host", "site": "cloud", "cpus": 64, "memory_mb": 262_144, "disk_gb": 8000,
            "address": str(cloud_lan.network_address + 2 + k), "public_address": str(wan.network_address + 10 + k),
        }
    service_kinds = list(ServiceKind)
    for v in range(vms):
        vm_name = f"vm-{v + 1}"
        all_hosts[vm_name] = {
            "kind": "vm", "site": "cloud", "cpus": 4, "memory_mb": 8192, "disk_gb": 200,
            "address": str(cloud_lan.network_address + 1000 + v),
            "public_address": str(wan.network_address + 1000 + v),
            "labels": {"backup": "daily"},
            "vm": {"kvm_host": f"kvm-{v // VMS_PER_KVM_HOST + 1}", "image": "debian-12"},
        }
        kind = service_kinds[v % len(service_kinds)]
        service: dict[str, Any] = {"kind": kind.value, "host": vm_name, "port": 8000 + v % 7}
        if kind is ServiceKind.api:  # no public image: a fleet names its own
            service["image"] = "registry.example.org/primespark/api:0.1.0"
        data["services"][f"{kind.value}-{v + 1}"] = service
    mesh: dict[str, Any] = {"overlay": f"10.96.0.0/{min(overlay_prefix, 24)}", "topology": topology}
    if topology == "hub_and_spoke":
        mesh["hub"] = "kvm-1"
    data["meshes"] = {"fleet": mesh}
    return data


def generate_fleet_yaml(hosts: int, **kwargs: Any) -> str:
    return yaml.safe_dump(generate_fleet_data(hosts, **kwargs), sort_keys=False)
