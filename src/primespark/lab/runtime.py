"""Makes a LabPlan real with the Docker SDK, and takes it away again: only what carries the lab's label."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Network

import docker
import docker.errors
from docker.models.containers import Container
from docker.models.networks import Network

from primespark.errors import UserError
from primespark.lab.topology import HOST_LABEL, LABEL, ROLE_LABEL, SPEC_LABEL, ContainerSpec, LabPlan

Report = Callable[[str], None]


def docker_client() -> docker.DockerClient:
    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except docker.errors.DockerException as exc:
        raise UserError(f"Docker is not reachable: {exc}",
                        fix="start it with `make docker` (or `dockerd &`), and run as root or in the docker group") \
            from None
    return client


class LabRuntime:
    def __init__(self, client: docker.DockerClient, plan: LabPlan, image: str) -> None:
        self.client = client
        self.plan = plan
        self.image = image
        self.filters = {"label": f"{LABEL}={plan.fleet}"}

    # --- what exists -------------------------------------------------------------------------------
    def containers(self) -> dict[str, Container]:
        return {c.name: c for c in self.client.containers.list(all=True, filters=self.filters)}

    def networks(self) -> dict[str, Network]:
        return {n.name: n for n in self.client.networks.list(filters=self.filters)}

    def check_overlaps(self) -> None:
        """Docker refuses overlapping subnets; say which network is in the way before the slow part."""
        ours = {n.name for n in self.plan.networks}
        for net in self.client.networks.list():
            if net.name in ours and (net.attrs.get("Labels") or {}).get(LABEL) == self.plan.fleet:
                continue
            for pool in (net.attrs.get("IPAM") or {}).get("Config") or []:
                subnet = pool.get("Subnet")
                if not subnet or ":" in subnet:
                    continue
                for spec in self.plan.networks:
                    if spec.name == net.name:
                        raise UserError(f"a Docker network named {net.name} exists but was not made by the lab",
                                        fix=f"remove it (`docker network rm {net.name}`) or rename the fleet")
                    if IPv4Network(subnet).overlaps(spec.subnet):
                        raise UserError(
                            f"the lab's {spec.purpose} network {spec.subnet} overlaps Docker network "
                            f"{net.name} ({subnet})",
                            fix=f"remove that network (`docker network rm {net.name}`) or change the "
                            "addresses in the fleet file")

    # --- up ----------------------------------------------------------------------------------------
    def ensure_networks(self, report: Report) -> int:
        existing = self.networks()
        changed = 0
        for spec in self.plan.networks:
            net = existing.get(spec.name)
            if net is not None and (net.attrs.get("Labels") or {}).get(SPEC_LABEL) == spec.spec_hash():
                continue
            if net is not None:
                report(f"network {spec.name} changed: recreating it")
                net.reload()
                for cid in net.attrs.get("Containers") or {}:
                    self.client.containers.get(cid).remove(force=True)
                net.remove()
            report(f"creating network {spec.name} ({spec.subnet})")
            self.client.networks.create(
                spec.name, driver="bridge", check_duplicate=True,
                ipam=docker.types.IPAMConfig(pool_configs=[
                    docker.types.IPAMPool(subnet=str(spec.subnet), gateway=str(spec.gateway))]),
                labels={LABEL: self.plan.fleet, SPEC_LABEL: spec.spec_hash()},
            )
            changed += 1
        return changed

    def ensure_container(self, spec: ContainerSpec) -> str:
        """'kept', 'started' or 'created'."""
        wanted = spec.spec_hash(self.image)
        try:
            current = self.client.containers.get(spec.name)
        except docker.errors.NotFound:
            current = None
        if current is not None:
            if current.labels.get(SPEC_LABEL) == wanted and current.labels.get(LABEL) == self.plan.fleet:
                if current.status == "running":
                    return "kept"
                current.start()
                return "started"
            if current.labels.get(LABEL) != self.plan.fleet:
                raise UserError(f"a container named {spec.name} exists but was not made by the lab",
                                fix=f"remove it (`docker rm -f {spec.name}`) or rename the fleet")
            current.remove(force=True)
        self._create(spec, wanted)
        return "created"

    def _create(self, spec: ContainerSpec, spec_hash: str) -> None:
        api = self.client.api
        (primary, primary_address), *others = spec.addresses.items()
        labels = {LABEL: self.plan.fleet, SPEC_LABEL: spec_hash, ROLE_LABEL: spec.role}
        if spec.host:
            labels[HOST_LABEL] = spec.host
        host_config = api.create_host_config(
            network_mode=primary, init=True, cap_add=list(spec.capabilities),
            devices=["/dev/net/tun:/dev/net/tun:rwm"], sysctls=spec.sysctls or None,
            tmpfs={"/run": "exec"},  # a fresh /run on each start, as after a boot
        )
        networking = api.create_networking_config({
            primary: api.create_endpoint_config(ipv4_address=str(primary_address), aliases=list(spec.aliases)),
        })
        created = api.create_container(
            self.image, name=spec.name, hostname=spec.hostname, labels=labels, environment=spec.environment,
            host_config=host_config, networking_config=networking, detach=True,
        )
        for network, address in others:
            api.connect_container_to_network(created["Id"], network, ipv4_address=str(address),
                                             aliases=list(spec.aliases))
        api.start(created["Id"])

    def ensure_containers(self, report: Report) -> dict[str, str]:
        # Routers first: the hosts behind them route through them from their first second.
        routers = [s for s in self.plan.containers if s.role == "router"]
        hosts = [s for s in self.plan.containers if s.role != "router"]
        outcome: dict[str, str] = {}
        with ThreadPoolExecutor(max_workers=4) as pool:
            for batch in (routers, hosts):
                for spec, result in zip(batch, pool.map(self.ensure_container, batch), strict=True):
                    outcome[spec.name] = result
                    if result != "kept":
                        report(f"{result} {spec.name}")
                if batch is routers:
                    list(pool.map(self.wait_ready, routers))
        wanted = {s.name for s in self.plan.containers}
        for name, container in self.containers().items():
            if name not in wanted:  # a host taken out of the fleet file
                report(f"removing {name} (no longer in the fleet)")
                container.remove(force=True)
                outcome[name] = "removed"
        return outcome

    def exec(self, name: str, command: list[str], user: str = "root") -> tuple[int, str]:
        result = self.client.containers.get(name).exec_run(command, user=user, demux=False)
        return result.exit_code, (result.output or b"").decode(errors="replace")

    def _check_alive(self, spec: ContainerSpec) -> None:
        container = self.client.containers.get(spec.name)
        if container.status not in ("running", "created"):
            raise UserError(f"{spec.name} stopped right after starting ({container.status}):\n{self.logs(spec.name)}",
                            fix=f"see `docker logs {spec.name}`; fix the cause, then `spark lab up` again")

    def wait_ready(self, spec: ContainerSpec, timeout: float = 30) -> None:
        """The container's init has reported `ready` (after its routes and NAT rules are in place)."""
        deadline = time.monotonic() + timeout
        while b"ready" not in self.client.containers.get(spec.name).logs(tail=5):
            self._check_alive(spec)
            if time.monotonic() > deadline:
                raise UserError(f"{spec.name} did not get ready in {timeout:.0f} s:\n{self.logs(spec.name)}",
                                fix=f"see `docker logs {spec.name}`")
            time.sleep(0.2)

    def host_keys(self, spec: ContainerSpec, timeout: float = 30) -> list[str]:
        """The host's public keys once sshd has them (made at its first start)."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(spec)
            code, out = self.exec(spec.name, ["sh", "-c", "cat /etc/ssh/ssh_host_ed25519_key.pub "
                                              "/etc/ssh/ssh_host_ecdsa_key.pub /etc/ssh/ssh_host_rsa_key.pub"])
            if code == 0:
                return [" ".join(line.split()[:2]) for line in out.splitlines() if line.strip()]
            if time.monotonic() > deadline:
                raise UserError(f"{spec.name} has no SSH host keys after {timeout:.0f} s:\n{self.logs(spec.name)}",
                                fix=f"see `docker logs {spec.name}`; `spark lab up` recreates it if removed")
            time.sleep(0.3)

    def logs(self, name: str) -> str:
        try:
            return self.client.containers.get(name).logs(tail=20).decode(errors="replace")
        except docker.errors.DockerException as exc:
            return str(exc)

    # --- down --------------------------------------------------------------------------------------
    def remove_all(self, report: Report) -> tuple[int, int, int]:
        containers = list(self.containers().values())
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda c: c.remove(force=True, v=True), containers))
        for c in containers:
            report(f"removed {c.name}")
        networks = list(self.networks().values())
        for net in networks:
            net.remove()
            report(f"removed network {net.name}")
        volumes = self.client.volumes.list(filters=self.filters)
        for vol in volumes:
            vol.remove(force=True)
            report(f"removed volume {vol.name}")
        return len(containers), len(networks), len(volumes)


def ssh_banner(address: str, port: int, timeout: float = 2.0) -> bool:
    """sshd answers with its `SSH-2.0-` banner."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def wait_for_ssh(address: str, port: int, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ssh_banner(address, port):
            return True
        time.sleep(0.3)
    return False
