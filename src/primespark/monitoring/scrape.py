"""What Prometheus scrapes and how it reaches each target: `prometheus.yml`, from the fleet and the mesh plan.

A host on the Prometheus host's own site is scraped at its LAN address; any other host over a WireGuard mesh
they share, at its overlay address (the cloud cannot open connections into an edge site behind NAT any other
way). The fleet check `prometheus-unreachable` refuses a fleet where neither holds.

Every target carries `host`, `site` and `kind` labels and `instance` = the host's name. The node job honours
the labels of the scraped samples: the textfile metrics the flows publish carry the `host` they are about
(a backup's client, a drill's subject), and that one wins over the target's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from primespark.cloud.catalog import RECIPES
from primespark.errors import UserError
from primespark.fleet.model import Fleet, ServiceKind
from primespark.inventory import managed_hosts
from primespark.monitoring.paths import RULES_FILE
from primespark.pki import HOST_TLS_FOLDER, serves_tls

NODE_JOB = "node"
# How Prometheus reaches a target that serves TLS: verified against the fleet CA, which the tls role puts on every
# host (and the compose stack mounts), at an address its certificate names; nothing skips verification.
HTTPS: dict[str, Any] = {"scheme": "https", "tls_config": {"ca_file": str(HOST_TLS_FOLDER / "ca.pem")}}

# mesh name → host → overlay address (the saved mesh plans)
Overlays = Mapping[str, Mapping[str, IPv4Address]]


@dataclass(frozen=True)
class Target:
    job: str
    host: str
    address: str  # host:port as Prometheus dials it
    metrics_path: str = "/metrics"
    tls: bool = False  # the target serves only TLS with its host's certificate from the fleet CA

    def labels(self, fleet: Fleet) -> dict[str, str]:
        host = fleet.hosts[self.host]
        return {"instance": self.host, "host": self.host, "site": host.site, "kind": host.kind.value}


def monitored_hosts(fleet: Fleet) -> list[str]:
    """Every host that runs a node exporter (the monitoring_agent role runs on every managed host)."""
    return managed_hosts(fleet)


def prometheus_hosts(fleet: Fleet) -> list[str]:
    return sorted({s.host for s in fleet.services.values() if s.kind is ServiceKind.prometheus})


def shared_mesh(fleet: Fleet, a: str, b: str) -> str | None:
    return next((m for m in sorted(fleet.meshes) if fleet.in_mesh(m, a) and fleet.in_mesh(m, b)), None)


def reaches(fleet: Fleet, source: str, target: str) -> bool:
    same_site = fleet.hosts[source].site == fleet.hosts[target].site
    return same_site or shared_mesh(fleet, source, target) is not None


def running_services(fleet: Fleet) -> dict[str, ServiceKind]:
    """Services that really run where the fleet places them. In production the compose stacks run them all; the
    lab's VMs are containers without compose, where only Prometheus and Alertmanager run (the monitoring_server
    role installs Debian's packages), so a lab's Prometheus does not scrape services that are not there."""
    lab_runs = {ServiceKind.prometheus, ServiceKind.alertmanager}
    return {name: svc.kind for name, svc in sorted(fleet.services.items())
            if fleet.lab is None or svc.kind in lab_runs}


def address_from(fleet: Fleet, source: str, target: str, overlays: Overlays) -> str:
    """The address `source` reaches `target` at: the LAN on one site, else the overlay of a mesh they share."""
    if fleet.hosts[source].site == fleet.hosts[target].site:
        return str(fleet.hosts[target].address)
    mesh = shared_mesh(fleet, source, target)
    if mesh is None:
        raise UserError(f"{source} cannot reach {target}: another site and no shared mesh",
                        "run `spark validate` (the fleet check prometheus-unreachable says what to change)")
    address = overlays.get(mesh, {}).get(target)
    if address is None:
        raise UserError(f"mesh {mesh} has no overlay address for {target} yet, so Prometheus cannot scrape it",
                        f"run `spark mesh plan --env {fleet.name}` first")
    return str(address)


def targets(fleet: Fleet, prometheus_host: str, overlays: Overlays) -> list[Target]:
    port = fleet.monitoring.node_exporter_port
    out = [Target(NODE_JOB, h, f"{address_from(fleet, prometheus_host, h, overlays)}:{port}", tls=serves_tls(fleet))
           for h in monitored_hosts(fleet)]
    for name, kind in running_services(fleet).items():
        path = RECIPES[kind].metrics_path
        if path is None:
            continue
        svc = fleet.services[name]
        out.append(Target(name, svc.host, f"{address_from(fleet, prometheus_host, svc.host, overlays)}:{svc.port}",
                          path, serves_tls(fleet)))
    return out


def alertmanager_addresses(fleet: Fleet, prometheus_host: str, overlays: Overlays) -> list[str]:
    return [f"{address_from(fleet, prometheus_host, s.host, overlays)}:{s.port}"
            for _, s in sorted(fleet.services.items()) if s.kind is ServiceKind.alertmanager]


def prometheus_config(fleet: Fleet, overlays: Overlays) -> dict[str, Any]:
    """prometheus.yml for the fleet's Prometheus (every prometheus service gets the same: an HA pair scrapes
    alike). Raises UserError when an overlay address it needs is not planned yet."""
    spec = fleet.monitoring
    hosts = prometheus_hosts(fleet)
    if not hosts:
        raise UserError(f"fleet {fleet.name} places no prometheus service",
                        "add `prometheus: {kind: prometheus, host: <host>, port: 9090}` under services")
    found = targets(fleet, hosts[0], overlays)
    jobs: dict[str, list[Target]] = {}
    for target in found:
        jobs.setdefault(target.job, []).append(target)
    scrape_configs: list[dict[str, Any]] = []
    for job, members in jobs.items():
        entry: dict[str, Any] = {"job_name": job}
        if job == NODE_JOB:
            entry["honor_labels"] = True
        if members[0].tls:
            entry.update(HTTPS)
        if members[0].metrics_path != "/metrics":
            entry["metrics_path"] = members[0].metrics_path
        entry["static_configs"] = [{"targets": [t.address], "labels": t.labels(fleet)} for t in members]
        scrape_configs.append(entry)
    config: dict[str, Any] = {
        "global": {"scrape_interval": spec.scrape_interval, "evaluation_interval": spec.evaluation_interval,
                   "external_labels": {"fleet": fleet.name}},
        "rule_files": [RULES_FILE],
    }
    if managers := alertmanager_addresses(fleet, hosts[0], overlays):
        alertmanagers: dict[str, Any] = {"static_configs": [{"targets": managers}]}
        if serves_tls(fleet):
            alertmanagers.update(HTTPS)
        config["alerting"] = {"alertmanagers": [alertmanagers]}
    config["scrape_configs"] = scrape_configs
    return config
