"""The monitoring files of a fleet, generated once and deployed twice: the compose stack mounts them into its
Prometheus, Alertmanager and Grafana containers (primespark.cloud.services), and the lab's monitoring_server
role copies them onto the host running Debian's packages (`spark monitoring render`). Paths are relative to
one folder; `Layout` says where each lands in either deployment."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import yaml

from primespark.errors import UserError
from primespark.fleet.model import Fleet, ServiceKind
from primespark.monitoring.alertmanager import alertmanager_config
from primespark.monitoring.alerts import rule_groups
from primespark.monitoring.scrape import Overlays, prometheus_config
from primespark.pki import HOST_TLS_FOLDER, serves_tls

PROMETHEUS_YML = "prometheus.yml"
RULES_YML = "rules/primespark.rules.yml"
ALERTMANAGER_YML = "alertmanager.yml"
DATASOURCE_YML = "grafana/provisioning/datasources/primespark.yml"
DASHBOARDS_YML = "grafana/provisioning/dashboards/primespark.yml"
DASHBOARD_DIR = "grafana/dashboards"
# Where Grafana reads the dashboards inside its container (the provider names it).
GRAFANA_DASHBOARDS = "/var/lib/primespark/dashboards"
DATASOURCE_UID = "primespark-prometheus"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PromQL) as literal blocks, lines never folded: files a person can read and diff."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1_000_000,
                     allow_unicode=True)


def overlays_of(fleet: Fleet, state_dir: Path) -> dict[str, dict[str, IPv4Address]]:
    """Every mesh's overlay addresses, from its saved plan (a mesh not planned yet has none)."""
    from primespark.mesh.plan import load_state

    out: dict[str, dict[str, IPv4Address]] = {}
    for mesh in fleet.meshes:
        state = load_state(state_dir, mesh)
        if state is not None:
            if state.fleet != fleet.name:
                raise UserError(f"the saved plan of mesh {mesh} in {state_dir} belongs to fleet {state.fleet}",
                                "give each environment its own state directory (SPARK_STATE_DIR)")
            out[mesh] = {host: saved.address for host, saved in state.hosts.items()}
    return out


def grafana_datasource(fleet: Fleet) -> dict[str, Any]:
    prometheus = next((s for _, s in sorted(fleet.services.items()) if s.kind is ServiceKind.prometheus), None)
    if prometheus is None:
        raise UserError(f"fleet {fleet.name} places no prometheus service for Grafana to read",
                        "add a service of kind prometheus")
    tls = serves_tls(fleet)
    url = f"{'https' if tls else 'http'}://{fleet.hosts[prometheus.host].address}:{prometheus.port}"
    source: dict[str, Any] = {
        "name": "Prometheus", "uid": DATASOURCE_UID, "type": "prometheus", "access": "proxy", "url": url,
        "isDefault": True, "editable": False, "jsonData": {"timeInterval": fleet.monitoring.scrape_interval}}
    if tls:  # verified against the fleet CA only; Grafana reads the file when it provisions ($__file, public)
        source["jsonData"]["tlsAuthWithCACert"] = True
        source["secureJsonData"] = {"tlsCACert": f"$__file{{{HOST_TLS_FOLDER / 'ca.pem'}}}"}
    return {"apiVersion": 1, "datasources": [source]}


def grafana_dashboard_provider() -> dict[str, Any]:
    return {"apiVersion": 1, "providers": [{
        "name": "primespark", "folder": "Prime Spark", "type": "file", "disableDeletion": True,
        "allowUiUpdates": False, "options": {"path": GRAFANA_DASHBOARDS, "foldersFromFilesStructure": False}}]}


def monitoring_files(fleet: Fleet, overlays: Overlays) -> dict[str, str]:
    """Relative path → content of every monitoring file of the fleet. Deterministic: the same fleet and mesh plan
    give the same bytes (the role's second run changes nothing)."""
    from primespark.monitoring.dashboards import dashboards

    files = {
        PROMETHEUS_YML: dump_yaml(prometheus_config(fleet, overlays)),
        RULES_YML: dump_yaml(rule_groups(fleet)),
        ALERTMANAGER_YML: dump_yaml(alertmanager_config(fleet)),
        DATASOURCE_YML: dump_yaml(grafana_datasource(fleet)),
        DASHBOARDS_YML: dump_yaml(grafana_dashboard_provider()),
    }
    for uid, board in dashboards(fleet).items():
        files[f"{DASHBOARD_DIR}/{uid}.json"] = json.dumps(board, indent=2, sort_keys=True) + "\n"
    return files


def write_files(files: Mapping[str, str], out: Path) -> list[Path]:
    written = []
    for relative, content in sorted(files.items()):
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        written.append(path)
    return written


@dataclass(frozen=True)
class Layout:
    """Where the files land: the same paths inside the containers and on the lab's Debian host."""

    prometheus_yml: str = "/etc/prometheus/prometheus.yml"
    rules_yml: str = "/etc/prometheus/rules/primespark.rules.yml"
    alertmanager_yml: str = "/etc/prometheus/alertmanager.yml"
