"""The service stack of one VM: a compose file for the services the fleet places there, the boot-time secret
pull from Vault (AppRole), and the systemd units that order them. Secrets are never part of these files."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from primespark.cloud import service_tls
from primespark.cloud.catalog import RECIPES, readable_services, secret_path
from primespark.cloud.cloudinit import SECRET_ID_FILE, File, images_dir
from primespark.errors import UserError
from primespark.fleet.model import Fleet, ServiceKind
from primespark.monitoring import files as mon
from primespark.monitoring.paths import CONFIG_DIR, HOST_SECRETS_DIR
from primespark.monitoring.paths import SECRETS_DIR as RECEIVER_SECRETS_MOUNT
from primespark.pki import TLS_GID, serves_tls

STACK_DIR = service_tls.STACK_DIR
COMPOSE_FILE = service_tls.COMPOSE  # where the reloads find it too
SECRETS_DIR = "/etc/primespark/secrets"
# The monitoring files (primespark.monitoring.files) under one folder, mounted read-only into the containers at
# the paths the files name; receivers' secrets are files the monitoring_server role writes from the fleet's
# references into HOST_SECRETS_DIR (`spark monitoring render` never holds them).
MONITORING_DIR = f"{STACK_DIR}/monitoring"
MONITORING_KINDS = (ServiceKind.prometheus, ServiceKind.alertmanager, ServiceKind.grafana)


@dataclass(frozen=True)
class VaultTarget:
    """Where VMs reach Vault and which KV v2 mount holds the secrets (from the stack config)."""

    address: str
    mount: str = "secret"


def role_name(fleet: Fleet, host: str) -> str:
    return f"primespark-{fleet.name}-{host}"


def endpoints(fleet: Fleet) -> dict[str, dict[str, Any]]:
    return {name: {"kind": svc.kind.value, "host": svc.host, "address": str(fleet.hosts[svc.host].address),
                   "port": svc.port, "url": _url(fleet, name)} for name, svc in sorted(fleet.services.items())}


def _url(fleet: Fleet, service: str) -> str:
    """Where clients reach a service; with the fleet CA, the TLS form each client library knows, verified against
    the CA file every container and host has (service_tls.CA)."""
    svc = fleet.services[service]
    tls = serves_tls(fleet)
    where = f"{fleet.hosts[svc.host].address}:{svc.port}"
    if svc.kind is ServiceKind.timescaledb:
        return f"postgres://{where}" + (f"/?sslmode=verify-full&sslrootcert={service_tls.CA}" if tls else "")
    scheme = {ServiceKind.redis: ("redis", "rediss"), ServiceKind.kafka: ("kafka", "kafka+ssl")}.get(
        svc.kind, ("http", "https"))
    return f"{scheme[tls]}://{where}"


def _compose_service(fleet: Fleet, name: str) -> dict[str, Any]:
    svc = fleet.services[name]
    recipe = RECIPES[svc.kind]
    address = fleet.hosts[svc.host].address
    inner = recipe.container_port or svc.port
    tls = service_tls.served_tls(fleet, name)
    environment = dict(recipe.environment)
    if svc.kind is ServiceKind.kafka and tls is None:
        environment |= {"KAFKA_LISTENERS": f"PLAINTEXT://:{svc.port},CONTROLLER://:9093",
                        "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT://{address}:{svc.port}"}
    elif svc.kind is ServiceKind.kafka:  # its server.properties says it all (service_tls.kafka_properties)
        environment = {}
    for other in recipe.consumes:
        for peer_name, peer in sorted(fleet.services.items()):
            if peer.kind is other:
                environment[f"{other.value.upper()}_URL"] = _url(fleet, peer_name)
    if svc.kind is ServiceKind.prefect:  # the browser reaches the API where the UI was served from
        environment["PREFECT_UI_API_URL"] = f"{'https' if tls else 'http'}://{address}:{svc.port}/api"
    env_files = [f"{SECRETS_DIR}/{n}.env" for n in _secret_sources(fleet, name)]
    # Published on the LAN address only: Docker's DNAT bypasses the input firewall, so never on 0.0.0.0.
    image = svc.image or recipe.image  # the fleet loader refuses a service that has neither
    entry: dict[str, Any] = {"image": image, "restart": "unless-stopped",
                             "ports": [f"{address}:{svc.port}:{inner}"],
                             "labels": {service_tls.KIND_LABEL: svc.kind.value}}
    if env_files:
        entry["env_file"] = env_files
    command, mounts = _monitoring(fleet, svc.kind)
    command = list(recipe.command or command)
    volumes = [f"/srv/{name}/data:{recipe.data_dir}"] if recipe.data_dir else []
    volumes += mounts
    if tls is not None:
        _add_tls(entry, svc.kind, tls, environment, command, volumes)
    for key, value in (("environment", environment), ("command", command), ("volumes", volumes)):
        if value:
            entry[key] = value
    if recipe.healthcheck:
        entry["healthcheck"] = {"test": list(recipe.healthcheck), "interval": "30s", "retries": 5}
    return entry


def _add_tls(entry: dict[str, Any], kind: ServiceKind, tls: service_tls.ServedTls, environment: dict[str, str],
             command: list[str], volumes: list[str]) -> None:
    """Merge how the service serves TLS into its compose entry (in place)."""
    environment |= tls.environment
    entry["group_add"] = [str(TLS_GID)]  # served.pem is 0640 root:primespark-tls, the same number everywhere
    if tls.entrypoint:
        entry["entrypoint"] = list(tls.entrypoint)
    if tls.command:  # the Prometheus pair takes one flag more; the others a command of their own
        command[:] = [*command, *tls.command] if kind in (ServiceKind.prometheus, ServiceKind.alertmanager) \
            else list(tls.command)
    volumes += tls.volumes


def _monitoring(fleet: Fleet, kind: ServiceKind) -> tuple[list[str], list[str]]:
    """The command and read-only mounts that give a monitoring container the generated files."""
    here = MONITORING_DIR
    if kind is ServiceKind.prometheus:
        return ([f"--config.file={CONFIG_DIR}/{mon.PROMETHEUS_YML}", "--storage.tsdb.path=/prometheus",
                 f"--storage.tsdb.retention.time={fleet.monitoring.retention}", "--web.enable-lifecycle"],
                [f"{here}/{mon.PROMETHEUS_YML}:{CONFIG_DIR}/{mon.PROMETHEUS_YML}:ro",
                 f"{here}/rules:{CONFIG_DIR}/rules:ro"])
    if kind is ServiceKind.alertmanager:
        return ([f"--config.file={CONFIG_DIR}/{mon.ALERTMANAGER_YML}", "--storage.path=/alertmanager"],
                [f"{here}/{mon.ALERTMANAGER_YML}:{CONFIG_DIR}/{mon.ALERTMANAGER_YML}:ro",
                 f"{HOST_SECRETS_DIR}:{RECEIVER_SECRETS_MOUNT}:ro"])
    if kind is ServiceKind.grafana:
        return ([], [f"{here}/grafana/provisioning/datasources:/etc/grafana/provisioning/datasources:ro",
                     f"{here}/grafana/provisioning/dashboards:/etc/grafana/provisioning/dashboards:ro",
                     f"{here}/{mon.DASHBOARD_DIR}:{mon.GRAFANA_DASHBOARDS}:ro"])
    return [], []


def _secret_sources(fleet: Fleet, service: str) -> list[str]:
    svc = fleet.services[service]
    recipe = RECIPES[svc.kind]
    own = [service] if recipe.secrets else []
    consumed = [n for n, s in sorted(fleet.services.items())
                if s.kind in recipe.reads_secrets_of and RECIPES[s.kind].secrets]
    return own + consumed


def compose_for(fleet: Fleet, host: str) -> dict[str, Any]:
    return {"name": "primespark",
            "services": {name: _compose_service(fleet, name) for name in sorted(fleet.services_on(host))}}


_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml when present


def _dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_DUMPER, sort_keys=False, default_flow_style=False)


def stack_files(fleet: Fleet, host: str, vault: VaultTarget, monitoring: Mapping[str, str] | None = None) -> list[File]:
    """Everything cloud-init writes for the host's services; empty for a VM without services. `monitoring`: the
    fleet's monitoring files (primespark.monitoring.files.monitoring_files), needed where a monitoring service
    runs."""
    if not fleet.services_on(host):
        return []
    readable = readable_services(fleet, host)
    files = [
        File(COMPOSE_FILE, _dump(compose_for(fleet, host))),
        File("/etc/primespark/vault.env",
             f"VAULT_ADDR={vault.address}\nVAULT_KV_MOUNT={vault.mount}\nVAULT_ROLE_ID={role_name(fleet, host)}\n"
             f"VAULT_SECRET_ID_FILE={SECRET_ID_FILE}\n"),
        File("/etc/primespark/vault/paths", "".join(f"{n} {secret_path(fleet, n)}\n" for n in readable)),
        File("/usr/local/sbin/primespark-secrets", _script(images_dir()), "0755"),
        File("/etc/systemd/system/primespark-secrets.path", _unit(
            "Pull service secrets once the AppRole secret-id is in place",
            f"[Path]\nPathExists={SECRET_ID_FILE}\nPathChanged={SECRET_ID_FILE}\n", "paths.target")),
        File("/etc/systemd/system/primespark-secrets.service", _unit(
            "Pull service secrets from Vault (AppRole)",
            # The script restarts primespark-stack itself, and only after a complete pull.
            "[Service]\nType=oneshot\nExecStart=/usr/local/sbin/primespark-secrets\n", None,
            after="network-online.target", wants="network-online.target")),
        File("/etc/systemd/system/primespark-stack.service", _unit(
            "Prime Spark services (docker compose)",
            f"[Service]\nType=oneshot\nRemainAfterExit=yes\nWorkingDirectory={STACK_DIR}\n"
            f"ExecStart=/usr/bin/docker-compose -f {COMPOSE_FILE} up -d --remove-orphans\n"
            f"ExecStop=/usr/bin/docker-compose -f {COMPOSE_FILE} down\n", "multi-user.target",
            after="docker.service primespark-secrets.service", wants="docker.service")),
    ]
    for name in sorted(fleet.services_on(host)):
        tls = service_tls.served_tls(fleet, name)
        files += [File(path, content) for path, content in sorted((tls.files if tls else {}).items())]
    if any(s.kind in MONITORING_KINDS for s in fleet.services_on(host).values()):
        if monitoring is None:
            raise UserError(f"{host} runs monitoring services but no monitoring files were given",
                            "pass primespark.monitoring.files.monitoring_files(fleet, overlays)")
        files += [File(f"{MONITORING_DIR}/{relative}", content) for relative, content in sorted(monitoring.items())]
    return files


@lru_cache(maxsize=4)
def _script(root: Path) -> str:
    return (root / "cloud-init" / "primespark-secrets.sh").read_text(encoding="utf-8")


def _unit(description: str, body: str, wanted_by: str | None, after: str = "", wants: str = "") -> str:
    head = f"[Unit]\nDescription={description}\n"
    head += f"After={after}\n" if after else ""
    head += f"Wants={wants}\n" if wants else ""
    tail = f"\n[Install]\nWantedBy={wanted_by}\n" if wanted_by else ""
    return f"{head}\n{body}{tail}"
