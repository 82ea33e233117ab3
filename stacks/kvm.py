"""`KvmHost` and `VirtualMachine`: libvirt resources for one KVM host of the fleet and the VMs it runs."""

from __future__ import annotations

import pulumi
import pulumi_libvirt as libvirt

from primespark.cloud.cloudinit import Seed, labels_description, mac_for
from primespark.fleet.model import Fleet

GIB = 1024**3


class KvmHost(pulumi.ComponentResource):
    """One libvirt provider (qemu+ssh to the host), a storage pool, the cloud LAN and the base images."""

    def __init__(self, name: str, fleet: Fleet, *, pool_path: str, image_cache: str, uri: str | None = None,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        host = fleet.hosts[name]
        site = fleet.sites[host.site]
        port = f":{host.ssh.port}" if host.ssh.port != 22 else ""
        uri = uri or f"qemu+ssh://{host.ssh.user}@{host.ssh_address}{port}/system"
        # Props become Output attributes of the component: none may share a name with an attribute set here.
        super().__init__("primespark:cloud:KvmHost", name, {
            "host": name, "uri": uri, "cpus": host.cpus, "memoryMb": host.memory_mb, "diskGb": host.disk_gb,
        }, opts)
        # Not a child of the component: a provider parented inside the component it serves forms a cycle.
        self.provider = libvirt.Provider(name, uri=uri)
        child = pulumi.ResourceOptions(parent=self, provider=self.provider)
        self.pool = libvirt.Pool(f"{name}-pool", name="primespark", type="dir", path=pool_path, opts=child)
        self.lan = libvirt.Network(
            f"{name}-lan", name=f"{fleet.name}-{host.site}", mode="nat", domain=fleet.domain,
            addresses=[str(site.lan)], autostart=True,
            dhcp=libvirt.NetworkDhcpArgs(enabled=False),
            dns=libvirt.NetworkDnsArgs(enabled=True, local_only=True), opts=child)
        self.base_volumes: dict[str, libvirt.Volume] = {}
        for image_name in sorted({vm.vm.image for vm in fleet.vms_on(name).values() if vm.vm}):
            image = fleet.images[image_name]
            # The source is the checksum-named file `spark up` downloads and verifies: the content is pinned.
            self.base_volumes[image_name] = libvirt.Volume(
                f"{name}-{image_name}-base", name=f"{image_name}-{image.sha256[:12]}.qcow2", pool=self.pool.name,
                source=f"{image_cache}/{image.sha256}.qcow2", format="qcow2", opts=child)
        self.register_outputs({"uri": uri})


class VirtualMachine(pulumi.ComponentResource):
    """A root volume on the host's base image, a cloud-init seed, and the domain itself."""

    def __init__(self, name: str, fleet: Fleet, kvm: KvmHost, seed: Seed, *, public_bridge: str,
                 exposure: list[dict[str, str | int]], opts: pulumi.ResourceOptions | None = None) -> None:
        host = fleet.hosts[name]
        assert host.vm is not None
        super().__init__("primespark:cloud:VirtualMachine", name, {
            "host": name, "kvmHost": host.vm.kvm_host, "address": str(host.address),
            "publicAddress": str(host.public_address) if host.public_address else None,
            "labels": dict(host.labels), "exposure": exposure,
        }, pulumi.ResourceOptions.merge(pulumi.ResourceOptions(parent=kvm), opts))
        child = pulumi.ResourceOptions(parent=self, provider=kvm.provider)
        self.root = libvirt.Volume(
            f"{name}-root", name=f"{name}-root.qcow2", pool=kvm.pool.name, format="qcow2",
            base_volume_id=kvm.base_volumes[host.vm.image].id, size=host.disk_gb * GIB,
            opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(ignore_changes=["size"])))
        self.seed = libvirt.CloudInitDisk(
            f"{name}-seed", name=f"{name}-seed.iso", pool=kvm.pool.name,
            user_data=seed.user_data, meta_data=seed.meta_data, network_config=seed.network_config, opts=child)
        interfaces = [libvirt.DomainNetworkInterfaceArgs(
            network_id=kvm.lan.id, addresses=[str(host.address)], hostname=name, mac=mac_for(name, "lan"))]
        if host.public_address:
            interfaces.append(libvirt.DomainNetworkInterfaceArgs(
                bridge=public_bridge, mac=mac_for(name, "public")))
        self.domain = libvirt.Domain(
            name, name=name, vcpu=host.cpus, memory=host.memory_mb, qemu_agent=True, autostart=host.vm.autostart,
            running=True, description=labels_description(name, host),
            cpu=libvirt.DomainCpuArgs(mode="host-passthrough"), cloudinit=self.seed.id,
            disks=[libvirt.DomainDiskArgs(volume_id=self.root.id)], network_interfaces=interfaces,
            consoles=[libvirt.DomainConsoleArgs(type="pty", target_port="0", target_type="serial")],
            opts=child)
        self.register_outputs({"address": str(host.address)})
