"""How each kind of compose service serves only TLS with its host's certificate, and how it takes a renewed one.

Every container that serves reads the host's certificate folder (`/etc/ssl/primespark`, mounted whole and read-only:
the renewer replaces files by rename, which a single-file bind mount would not follow) and joins the key's group by
its number (`pki.TLS_GID`, the same on every host), since `served.pem` is 0640 root:primespark-tls. Plaintext is
left only where nothing beyond the container's loopback reaches it. A service that re-reads its files on its own
(the Prometheus family at each handshake, Grafana on a timer, the Prefect server every 5 s) needs no reload; the
others get a command that `spark-tls-renew` runs after a renewal (`reload_commands`), none a restart.

The CrossGuard policy `no-plaintext-listeners` (policies/rules.py) checks the generated files independently of this.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass, field
from importlib.resources import files as package_files

from primespark.fleet.model import Fleet, ServiceKind
from primespark.pki import HOST_TLS_FOLDER, WEB_CONFIG, serves_tls

FOLDER = str(HOST_TLS_FOLDER)
SERVED = f"{FOLDER}/served.pem"  # key and certificate in one file (docs/tls.md)
CA = f"{FOLDER}/ca.pem"
STACK_DIR = "/opt/primespark"  # primespark.cloud.services takes these two from here
COMPOSE = f"{STACK_DIR}/compose.yaml"
DOCKER_COMPOSE = "/usr/bin/docker-compose"  # as primespark-stack.service runs it
KIND_LABEL = "io.primespark.kind"  # tells the policy which kind of server a compose service runs
PG_HBA = "/etc/primespark/pg_hba.conf"  # in the container
KAFKA_CONFIG = "/etc/primespark/kafka/server.properties"  # in the container
REDIS_SOCKET = "/tmp/redis.sock"
GUNICORN_PID = "/tmp/gunicorn.pid"
SERVE_API = f"{STACK_DIR}/serve_api.py"
# The API is our own image: its contract is to serve TLS with these files and to re-read them on SIGHUP.
API_TLS_ENV = {"PRIMESPARK_TLS_CERT": SERVED, "PRIMESPARK_TLS_KEY": SERVED, "PRIMESPARK_TLS_CA": CA}


@dataclass
class ServedTls:
    """What a compose service gets to serve TLS: merged into its compose entry by primespark.cloud.services."""

    environment: dict[str, str] = field(default_factory=dict)
    command: tuple[str, ...] = ()  # replaces the recipe's command when set
    entrypoint: tuple[str, ...] = ()  # replaces the image's when set
    volumes: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # host path -> content (written by cloud-init)
    reload: tuple[str, ...] = ()  # argv run on the host after a renewal; empty: the service re-reads on its own


def pg_hba() -> str:
    """Loopback may connect in plaintext (the container's own health check, a local dump); everyone else only over
    TLS, with a password."""
    return ("# Written by Prime Spark (primespark.cloud.service_tls): TLS beyond loopback, always a password.\n"
            "local   all all                trust\n"
            "host    all all 127.0.0.1/32   scram-sha-256\n"
            "host    all all ::1/128        scram-sha-256\n"
            "hostnossl all all all          reject\n"
            "hostssl all all all            scram-sha-256\n")


def kafka_properties(address: str, port: int) -> str:
    """server.properties of a single KRaft broker: SSL on the published port, the controller and the broker's own
    connection on the container's loopback. Kafka starts from this file, not from the image's scripts: they insist
    on JKS key stores for SSL listeners and add plaintext listeners of their own; this reads the PEM files (PKCS#8
    key) as they are."""
    lines = [
        "process.roles=broker,controller", "node.id=1", "controller.quorum.voters=1@localhost:9093",
        "controller.listener.names=CONTROLLER",
        f"listeners=SSL://0.0.0.0:{port},CONTROLLER://localhost:9093,LOCAL://localhost:9094",
        f"advertised.listeners=SSL://{address}:{port},LOCAL://localhost:9094",
        "listener.security.protocol.map=SSL:SSL,CONTROLLER:PLAINTEXT,LOCAL:PLAINTEXT",
        "inter.broker.listener.name=LOCAL",
        "ssl.keystore.type=PEM", f"ssl.keystore.location={SERVED}",
        "ssl.truststore.type=PEM", f"ssl.truststore.location={CA}",
        "ssl.client.auth=none", "ssl.enabled.protocols=TLSv1.3,TLSv1.2",
        "log.dirs=/var/lib/kafka/data", "offsets.topic.replication.factor=1",
        "transaction.state.log.replication.factor=1", "transaction.state.log.min.isr=1",
    ]
    return "# Written by Prime Spark (primespark.cloud.service_tls)\n" + "\n".join(lines) + "\n"


def kafka_cluster_id(fleet: Fleet, name: str) -> str:
    """The KRaft cluster id (a UUID in URL-safe base64, 22 characters), the same at every boot: from the fleet and
    the service's names, so it is not a secret and not a default shared by every installation."""
    digest = uuid.uuid5(uuid.NAMESPACE_URL, f"primespark:{fleet.name}:{name}").bytes
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def _exec(service: str, script: str) -> tuple[str, ...]:
    return (DOCKER_COMPOSE, "-f", COMPOSE, "exec", "-T", service, "sh", "-c", script)


def _signal(service: str, signal: str) -> tuple[str, ...]:
    return (DOCKER_COMPOSE, "-f", COMPOSE, "kill", "-s", signal, service)


def served_tls(fleet: Fleet, name: str) -> ServedTls | None:
    """How service `name` serves TLS, or None where the fleet has no CA (its services stay plain: docs/tls.md)."""
    if not serves_tls(fleet):
        return None
    svc = fleet.services[name]
    address = str(fleet.hosts[svc.host].address)
    tls = ServedTls(volumes=[f"{FOLDER}:{FOLDER}:ro"])
    kind = svc.kind
    if kind is ServiceKind.timescaledb:
        host_hba = f"{STACK_DIR}/{name}/pg_hba.conf"
        tls.files[host_hba] = pg_hba()
        tls.volumes.append(f"{host_hba}:{PG_HBA}:ro")
        settings = {"ssl": "on", "ssl_cert_file": SERVED, "ssl_key_file": SERVED,
                    "ssl_min_protocol_version": "TLSv1.2", "hba_file": PG_HBA}
        tls.command = ("postgres", *(arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")))
        tls.reload = _signal(name, "SIGHUP")  # the postmaster re-reads its SSL files on SIGHUP
    elif kind is ServiceKind.redis:
        # $$: compose leaves the $ to the container's shell, which expands it from env_file
        tls.command = ("sh", "-c", "exec redis-server --appendonly yes --requirepass \"$$REDIS_PASSWORD\" --port 0 "
                       f"--tls-port 6379 --tls-cert-file {SERVED} --tls-key-file {SERVED} --tls-ca-cert-file {CA} "
                       f"--tls-auth-clients no --tls-protocols 'TLSv1.2 TLSv1.3' --unixsocket {REDIS_SOCKET} "
                       "--unixsocketperm 700")
        # CONFIG SET of a TLS file reloads it even when the path is unchanged (Redis 7); the password comes from
        # the container's environment into redis-cli's, never into argv
        tls.reload = _exec(name, f'REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli -s {REDIS_SOCKET} CONFIG SET '
                                 f"tls-cert-file {SERVED} tls-key-file {SERVED} tls-ca-cert-file {CA}")
    elif kind is ServiceKind.kafka:
        host_config = f"{STACK_DIR}/{name}/server.properties"
        tls.files[host_config] = kafka_properties(address, svc.port)
        tls.volumes.append(f"{host_config}:{KAFKA_CONFIG}:ro")
        tls.entrypoint = ("sh", "-c")
        tls.command = (f"/opt/kafka/bin/kafka-storage.sh format --ignore-formatted -t {kafka_cluster_id(fleet, name)} "
                       f"-c {KAFKA_CONFIG} && exec /opt/kafka/bin/kafka-server-start.sh {KAFKA_CONFIG}",)
        # A dynamic update of the listener's key store: Kafka loads it again when the file changed (same path)
        tls.reload = _exec(name, "/opt/kafka/bin/kafka-configs.sh --bootstrap-server localhost:9094 --entity-type "
                                 "brokers --entity-name 1 --alter --add-config "
                                 f"listener.name.ssl.ssl.keystore.location={SERVED}")
    elif kind is ServiceKind.mlflow:
        gunicorn = f"--certfile={SERVED} --keyfile={SERVED} --pid {GUNICORN_PID}"
        tls.command = ("mlflow", "server", "--host", "0.0.0.0", "--port", "5000",  # noqa: S104 in the container
                       "--backend-store-uri", "sqlite:////mlflow/mlflow.db", "--artifacts-destination",
                       "/mlflow/artifacts", "--gunicorn-opts", gunicorn)
        # gunicorn's master starts new workers on SIGHUP and lets the old ones finish: new workers load the files
        tls.reload = _exec(name, f'kill -HUP "$(cat {GUNICORN_PID})"')
    elif kind is ServiceKind.grafana:
        tls.environment = {"GF_SERVER_PROTOCOL": "https", "GF_SERVER_CERT_FILE": SERVED,
                           "GF_SERVER_CERT_KEY": SERVED, "GF_SERVER_MIN_TLS_VERSION": "TLS1.2",
                           "GF_SERVER_CERTS_WATCH_INTERVAL": "1m"}  # Grafana loads a changed pair itself
    elif kind in (ServiceKind.prometheus, ServiceKind.alertmanager):
        tls.command = (f"--web.config.file={WEB_CONFIG}",)  # appended to theirs by the caller
    elif kind is ServiceKind.prefect:
        tls.files[SERVE_API] = serve_api_source()
        tls.volumes.append(f"{SERVE_API}:{SERVE_API}:ro")
        tls.command = ("python", SERVE_API, "--bind", "0.0.0.0", "--port", "4200",  # noqa: S104 in the container
                       "--tls", SERVED)
    elif kind is ServiceKind.api:
        tls.environment = dict(API_TLS_ENV)
        tls.reload = _signal(name, "SIGHUP")
    return tls


def serve_api_source() -> str:
    """The Prefect server with TLS and certificate reload (primespark.orchestration.serve_api imports only the
    standard library and Prefect, so the Prefect image runs it as a file)."""
    return (package_files("primespark.orchestration") / "serve_api.py").read_text(encoding="utf-8")


def reload_commands(fleet: Fleet, host: str) -> list[list[str]]:
    """What `spark-tls-renew` runs on `host` after it renewed the certificate, one argv per service. None in a lab:
    its VMs are containers without a compose stack (primespark.monitoring.scrape.running_services)."""
    if fleet.lab is not None:
        return []
    out = []
    for name in sorted(fleet.services_on(host)):
        tls = served_tls(fleet, name)
        if tls is not None and tls.reload:
            out.append(list(tls.reload))
    return out
