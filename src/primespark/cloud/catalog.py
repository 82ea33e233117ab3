"""How each service kind runs as a container: image (pinned), ports, volumes, secrets and what it consumes.

The fleet says where a service runs and on which port; this says how that kind of service is run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from primespark.fleet.model import Fleet, ServiceKind


@dataclass(frozen=True)
class ServiceRecipe:
    image: str | None  # pinned; None: no public image, the fleet names one (a fleet check says so)
    container_port: int | None  # None: the container listens on the fleet's port itself
    secrets: tuple[str, ...] = ()  # env variable names generated per service and kept in Vault
    consumes: tuple[ServiceKind, ...] = ()  # services this one talks to (it gets their URLs)
    reads_secrets_of: tuple[ServiceKind, ...] = ()  # services whose credentials it needs
    data_dir: str | None = None  # mounted from /srv/<service>/data
    environment: dict[str, str] = field(default_factory=dict)
    command: tuple[str, ...] = ()
    healthcheck: tuple[str, ...] = ()
    metrics_path: str | None = None  # where it serves Prometheus metrics, if it does (Prometheus scrapes it)


RECIPES: dict[ServiceKind, ServiceRecipe] = {
    ServiceKind.kafka: ServiceRecipe(
        image="apache/kafka:3.8.0",
        container_port=None,
        data_dir="/var/lib/kafka/data",
        environment={
            "KAFKA_NODE_ID": "1",
            "KAFKA_PROCESS_ROLES": "broker,controller",
            "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
            "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
            "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
            "KAFKA_LOG_DIRS": "/var/lib/kafka/data",
        },
    ),
    ServiceKind.timescaledb: ServiceRecipe(
        image="timescale/timescaledb:2.17.2-pg16",
        container_port=5432,
        secrets=("POSTGRES_PASSWORD",),
        data_dir="/var/lib/postgresql/data",
        environment={"POSTGRES_USER": "spark", "POSTGRES_DB": "spark"},
        healthcheck=("CMD", "pg_isready", "-U", "spark"),
    ),
    ServiceKind.redis: ServiceRecipe(
        image="redis:7.4.1",
        container_port=6379,
        secrets=("REDIS_PASSWORD",),
        data_dir="/data",
        # $$ keeps compose from interpolating: the shell in the container expands it from env_file.
        command=("sh", "-c", 'exec redis-server --appendonly yes --requirepass "$$REDIS_PASSWORD"'),
    ),
    ServiceKind.mlflow: ServiceRecipe(
        image="ghcr.io/mlflow/mlflow:v2.17.2",
        container_port=5000,
        secrets=("MLFLOW_FLASK_SERVER_SECRET_KEY",),
        data_dir="/mlflow",
        command=("mlflow", "server", "--host", "0.0.0.0", "--port", "5000",  # noqa: S104 inside the container
                 "--backend-store-uri", "sqlite:////mlflow/mlflow.db", "--artifacts-destination", "/mlflow/artifacts"),
    ),
    # The monitoring trio reads the files of primespark.monitoring (mounted by primespark.cloud.services).
    ServiceKind.prometheus: ServiceRecipe(
        image="prom/prometheus:v2.55.1",
        container_port=9090,
        data_dir="/prometheus",
        metrics_path="/metrics",
    ),
    ServiceKind.alertmanager: ServiceRecipe(
        image="prom/alertmanager:v0.27.0",
        container_port=9093,
        data_dir="/alertmanager",
        metrics_path="/metrics",
    ),
    ServiceKind.grafana: ServiceRecipe(
        image="grafana/grafana:11.3.1",
        container_port=3000,
        secrets=("GF_SECURITY_ADMIN_PASSWORD",),
        data_dir="/var/lib/grafana",
        environment={"GF_SECURITY_ADMIN_USER": "admin", "GF_USERS_ALLOW_SIGN_UP": "false"},
        metrics_path="/metrics",
    ),
    # The orchestrator's server and UI (SQLite in its data folder); /api/metrics when metrics are enabled.
    ServiceKind.prefect: ServiceRecipe(
        image="prefecthq/prefect:3.9.1-python3.11",
        container_port=4200,
        data_dir="/root/.prefect",
        environment={"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_ENABLE_METRICS": "true"},
        command=("prefect", "server", "start", "--host", "0.0.0.0", "--port", "4200"),  # noqa: S104 in the container
        metrics_path="/api/metrics",
    ),
    ServiceKind.api: ServiceRecipe(
        image=None,  # our own API: no public image exists, each fleet names the one it builds
        container_port=8000,
        secrets=("API_SECRET_KEY",),
        consumes=(ServiceKind.redis, ServiceKind.timescaledb, ServiceKind.kafka, ServiceKind.mlflow),
        reads_secrets_of=(ServiceKind.redis, ServiceKind.timescaledb),
    ),
}


def secret_path(fleet: Fleet, service: str) -> str:
    """The KV v2 path (below the mount) that holds a service's generated secrets."""
    return f"primespark/{fleet.name}/services/{service}"


def readable_services(fleet: Fleet, host: str) -> list[str]:
    """Services whose secrets `host` may read: its own, and those of services its own consume."""
    own = fleet.services_on(host)
    wanted = {kind for svc in own.values() for kind in RECIPES[svc.kind].reads_secrets_of}
    consumed = [n for n, s in fleet.services.items() if s.kind in wanted and RECIPES[s.kind].secrets]
    mine = [n for n, s in own.items() if RECIPES[s.kind].secrets]
    return sorted(set(mine) | set(consumed))
