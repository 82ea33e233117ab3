"""The compose stack's services serve only TLS with their host's certificate (primespark.cloud.service_tls): what
every container gets, how clients reach them, which reload a renewal runs, and a real Postgres (Debian's) started
with the settings and pg_hba.conf the stack generates: TLS verified against the CA, plaintext beyond loopback
refused, and a renewed certificate served after the reload the renewer runs, with no restart."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from postgres_testing import BIN, POSTGRES, running, scratch_folder

from primespark.cloud import service_tls
from primespark.cloud.services import VaultTarget, compose_for, endpoints, stack_files
from primespark.fleet import ServiceKind, load_fleet
from primespark.fleet.model import Fleet, SecretBackend
from primespark.mesh.plan import allocate
from primespark.monitoring.files import monitoring_files
from primespark.orchestration import serve_api
from primespark.pki import TLS_GID

HOMELAB = load_fleet("homelab")
FOLDER_MOUNT = "/etc/ssl/primespark:/etc/ssl/primespark:ro"


def without_ca(fleet: Fleet) -> Fleet:
    return fleet.model_copy(update={"secrets": fleet.secrets.model_copy(update={"backend": SecretBackend.local})})


def services(fleet: Fleet = HOMELAB) -> dict[str, dict]:
    hosts = sorted({s.host for s in fleet.services.values()})
    return {n: s for h in hosts for n, s in compose_for(fleet, h)["services"].items()}


def stack(fleet: Fleet, host: str) -> dict[str, str]:
    overlays = {m: allocate(fleet.mesh_members(m), fleet.meshes[m].overlay, None)[0] for m in fleet.meshes}
    return {f.path: f.content for f in stack_files(fleet, host, VaultTarget("https://vault.example.org:8200"),
                                                   monitoring_files(fleet, overlays))}


def test_every_container_reads_the_host_folder_and_joins_the_key_group_by_number() -> None:
    found = services()
    assert set(found) == set(HOMELAB.services)
    for name, entry in found.items():
        assert entry["group_add"] == [str(TLS_GID)], name
        assert FOLDER_MOUNT in entry["volumes"], name
        # the renewer replaces files by rename: a file mounted alone would keep the old one
        assert not any(v.startswith("/etc/ssl/primespark/") for v in entry["volumes"]), name
        assert entry["labels"] == {service_tls.KIND_LABEL: HOMELAB.services[name].kind.value}


def test_each_kind_serves_tls_on_its_published_port() -> None:
    found = services()
    postgres = found["timescaledb"]["command"]
    assert postgres[0] == "postgres" and "ssl=on" in postgres and "hba_file=/etc/primespark/pg_hba.conf" in postgres
    assert "ssl_key_file=/etc/ssl/primespark/served.pem" in postgres
    redis = found["redis"]["command"][-1]
    assert "--port 0 --tls-port 6379" in redis and '"$$REDIS_PASSWORD"' in redis  # no plain port; no secret inline
    assert found["kafka"]["entrypoint"] == ["sh", "-c"]
    assert "kafka-server-start.sh /etc/primespark/kafka/server.properties" in found["kafka"]["command"][0]
    assert "--certfile=/etc/ssl/primespark/served.pem" in found["mlflow"]["command"][-1]
    assert found["grafana"]["environment"]["GF_SERVER_PROTOCOL"] == "https"
    assert found["grafana"]["environment"]["GF_SERVER_CERTS_WATCH_INTERVAL"] == "1m"
    for kind in ("prometheus", "alertmanager"):
        assert found[kind]["command"][-1] == "--web.config.file=/etc/ssl/primespark/web.yml"
        assert found[kind]["command"][0].startswith("--config.file="), "their own flags stay"
    assert found["prefect"]["command"][-2:] == ["--tls", "/etc/ssl/primespark/served.pem"]
    assert found["prefect"]["environment"]["PREFECT_UI_API_URL"].startswith("https://")
    assert found["api"]["environment"]["PRIMESPARK_TLS_CERT"] == "/etc/ssl/primespark/served.pem"


def test_the_seed_writes_the_files_the_servers_start_from() -> None:
    analytics = stack(HOMELAB, "analytics-1")
    hba = analytics["/opt/primespark/timescaledb/pg_hba.conf"]
    assert "hostnossl all all all          reject" in hba and "host    all all 127.0.0.1/32" in hba
    kafka = stack(HOMELAB, "stream-1")["/opt/primespark/kafka/server.properties"]
    props = dict(line.split("=", 1) for line in kafka.splitlines() if "=" in line and not line.startswith("#"))
    assert props["listeners"] == "SSL://0.0.0.0:9092,CONTROLLER://localhost:9093,LOCAL://localhost:9094"
    assert props["listener.security.protocol.map"] == "SSL:SSL,CONTROLLER:PLAINTEXT,LOCAL:PLAINTEXT"
    assert props["ssl.keystore.type"] == "PEM" and props["ssl.keystore.location"] == "/etc/ssl/primespark/served.pem"
    # the Prefect image runs our server file as it is: it imports only the standard library and Prefect
    ops = stack(HOMELAB, "ops-1")
    assert ops[service_tls.SERVE_API] == Path(serve_api.__file__).read_text()
    cluster = service_tls.kafka_cluster_id(HOMELAB, "kafka")
    assert len(cluster) == 22 and cluster == service_tls.kafka_cluster_id(HOMELAB, "kafka")
    assert cluster != service_tls.kafka_cluster_id(HOMELAB.model_copy(update={"name": "other"}), "kafka")


def test_clients_reach_the_services_over_tls_verified_by_the_fleet_ca() -> None:
    api = services()["api"]["environment"]
    analytics = HOMELAB.hosts["analytics-1"].address
    assert api["TIMESCALEDB_URL"] == (f"postgres://{analytics}:5432/?sslmode=verify-full"
                                      "&sslrootcert=/etc/ssl/primespark/ca.pem")
    assert api["REDIS_URL"].startswith("rediss://") and api["KAFKA_URL"].startswith("kafka+ssl://")
    assert api["MLFLOW_URL"] == f"https://{analytics}:5000"
    assert endpoints(HOMELAB)["grafana"]["url"].startswith("https://")


def test_a_renewal_reloads_only_the_servers_that_do_not_re_read_their_files() -> None:
    reloads = {host: service_tls.reload_commands(HOMELAB, host) for host in ("core-1", "stream-1", "analytics-1",
                                                                               "ops-1")}
    reloaded = {c[c.index("-T") + 1] if "-T" in c else c[-1] for cs in reloads.values() for c in cs}
    assert reloaded == {"timescaledb", "redis", "kafka", "mlflow", "api"}
    assert reloads["ops-1"] == [], "Prometheus, Alertmanager, Grafana and the Prefect server re-read on their own"
    assert ["/usr/bin/docker-compose", "-f", "/opt/primespark/compose.yaml", "kill", "-s", "SIGHUP",
            "timescaledb"] in reloads["analytics-1"]
    [redis] = [c for c in reloads["core-1"] if "redis" in c]
    assert 'REDISCLI_AUTH="$REDIS_PASSWORD"' in redis[-1], "the password reaches redis-cli from the environment"
    lab = load_fleet("lab")  # its VMs are containers that run no compose stack: nothing to reload there
    assert {s.host for s in lab.services.values()} and all(
        service_tls.reload_commands(lab, s.host) == [] for s in lab.services.values())


def test_a_fleet_without_a_ca_keeps_its_services_plain() -> None:
    plain = without_ca(HOMELAB)
    found = services(plain)
    assert not any("group_add" in e or FOLDER_MOUNT in e.get("volumes", []) for e in found.values())
    assert found["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"].startswith("PLAINTEXT://")
    assert found["api"]["environment"]["REDIS_URL"].startswith("redis://")
    assert all(service_tls.reload_commands(plain, h) == [] for h in ("core-1", "analytics-1"))


# --- a real Postgres ---------------------------------------------------------------------------------------------

LISTEN = "127.0.0.2"  # not the 127.0.0.1 pg_hba.conf admits in plaintext: a client bound here is "beyond loopback"
SSL_REQUEST = struct.pack("!ii", 8, 80877103)


def issue(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate) -> str:
    """served.pem as the renewer writes it: a PKCS#8 key, then a certificate naming LISTEN."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "db")]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(IPv4Address(LISTEN))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return pem + cert.public_bytes(serialization.Encoding.PEM).decode()


def install(folder: Path, served: str) -> None:
    """As spark-tls-renew does: a temporary file, root:<key group> 0640, renamed over served.pem."""
    temporary = folder / ".tmp-served"
    temporary.write_text(served)
    os.chown(temporary, 0, TLS_GID)
    temporary.chmod(0o640)
    temporary.replace(folder / "served.pem")


def from_beyond_loopback(port: int) -> socket.socket:
    """A connection from 127.0.0.2, which pg_hba.conf's loopback lines (127.0.0.1/32, ::1/128) do not match."""
    return socket.create_connection((LISTEN, port), timeout=10, source_address=(LISTEN, 0))


def startup(sock: socket.socket | ssl.SSLSocket) -> tuple[bytes, bytes]:
    """Postgres' StartupMessage (protocol 3.0) for user spark; returns the reply's type and body."""
    body = struct.pack("!i", 196608) + b"user\0spark\0database\0postgres\0\0"
    sock.sendall(struct.pack("!i", len(body) + 4) + body)
    kind, length = struct.unpack("!ci", sock.recv(5))
    data = b""
    while len(data) < length - 4:
        data += sock.recv(length - 4 - len(data))
    return kind, data


def served_serial(port: int, ca_file: Path) -> int:
    """The serial of the certificate Postgres serves: its SSLRequest, then a TLS handshake verified by the CA."""
    context = ssl.create_default_context(cafile=str(ca_file))
    with from_beyond_loopback(port) as raw:
        raw.sendall(SSL_REQUEST)
        assert raw.recv(1) == b"S", "the server offers TLS"
        with context.wrap_socket(raw, server_hostname=LISTEN) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def psql(port: int, sslmode: str, ca_file: Path, password_file: Path) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PGPASSFILE": str(password_file)}  # the password never in argv
    target = f"host={LISTEN} port={port} user=spark dbname=postgres sslmode={sslmode} sslrootcert={ca_file}"
    return subprocess.run(["psql", target, "-Atc", "select ssl from pg_stat_ssl where pid = pg_backend_pid()"],
                          capture_output=True, text=True, timeout=30, check=False, env=environment)


@pytest.fixture
def as_postgres_user() -> Iterator[tuple[Path, list[str]]]:
    """A folder the unprivileged server user owns, and the prefix that runs a command as it, in the key's group by
    number (the container's group_add)."""
    work = scratch_folder("the key is root:8443 0640 as on a host, read by another user in that group: needs root")
    nobody = pwd.getpwnam("nobody")
    prefix = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", f"--groups={TLS_GID}", "--"]
    try:
        yield work, prefix
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_postgres_serves_only_tls_with_the_generated_settings(as_postgres_user: tuple[Path, list[str]]) -> None:
    work, as_user = as_postgres_user
    certs = work / "ssl"
    certs.mkdir(mode=0o755)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test fleet CA")])
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    ca_file = certs / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    install(certs, issue(ca_key, ca))

    # the generated command and pg_hba.conf, with the container's paths mapped to this folder
    [hba_content] = [c for p, c in stack(HOMELAB, "analytics-1").items() if p.endswith("pg_hba.conf")]
    hba = work / "pg_hba.conf"
    hba.write_text(hba_content)
    command = services()["timescaledb"]["command"][1:]
    settings = [arg.replace(service_tls.FOLDER, str(certs)).replace(service_tls.PG_HBA, str(hba)) for arg in command]

    data = work / "data"
    password = "a-test-password-" + os.urandom(6).hex()
    (work / "pw").write_text(password + "\n")
    for path in (work, work / "pw"):
        os.chown(path, pwd.getpwnam("nobody").pw_uid, -1)
    subprocess.run([*as_user, str(BIN / "initdb"), "-D", str(data), "-U", "spark", f"--pwfile={work / 'pw'}",
                    "--auth=scram-sha-256"], check=True, capture_output=True, timeout=120)
    (work / "pw").unlink()
    password_file = work / "pgpass"
    password_file.write_text(f"{LISTEN}:*:*:spark:{password}\n")
    password_file.chmod(0o600)

    with socket.socket() as probe:
        probe.bind((LISTEN, 0))
        port = probe.getsockname()[1]
    command = [*as_user, str(POSTGRES[-1]), "-D", str(data), "-c", f"listen_addresses={LISTEN}",
               "-c", f"port={port}", "-c", f"unix_socket_directories={work}", *settings]
    with running(command, ["-h", LISTEN, "-p", str(port)]) as server:
        verified = psql(port, "verify-full", ca_file, password_file)
        assert verified.returncode == 0 and verified.stdout.strip() == "t", verified.stderr
        # beyond loopback: plaintext is refused by pg_hba.conf; over TLS the server asks for the password (SCRAM)
        with from_beyond_loopback(port) as plain:
            kind, body = startup(plain)
        assert kind == b"E" and b"rejects connection" in body and b"no encryption" in body, body
        with from_beyond_loopback(port) as raw:
            raw.sendall(SSL_REQUEST)
            assert raw.recv(1) == b"S"
            with ssl.create_default_context(cafile=str(ca_file)).wrap_socket(raw, server_hostname=LISTEN) as tls:
                kind, body = startup(tls)
        assert kind == b"R" and struct.unpack("!i", body[:4])[0] == 10 and b"SCRAM-SHA-256" in body, (kind, body)

        first = served_serial(port, ca_file)
        renewed = issue(ca_key, ca)
        install(certs, renewed)
        new = x509.load_pem_x509_certificate(renewed.encode()).serial_number
        assert served_serial(port, ca_file) == first, "Postgres holds its files until told"
        # what `docker-compose kill -s SIGHUP timescaledb` does: the reload spark-tls-renew runs
        [reload] = [c for c in service_tls.reload_commands(HOMELAB, "analytics-1") if c[-1] == "timescaledb"]
        os.kill(server.pid, getattr(signal, reload[-2]))
        deadline = time.monotonic() + 30
        while served_serial(port, ca_file) != new:
            assert time.monotonic() < deadline, "the renewed certificate was not served within 30 s of SIGHUP"
            time.sleep(0.1)  # polling the served certificate
        assert server.poll() is None, "reloaded, not restarted"
        assert psql(port, "verify-full", ca_file, password_file).stdout.strip() == "t"


def test_every_service_kind_has_a_tls_way() -> None:
    """A new kind of service must say how it serves TLS before a fleet can place it (or the policy refuses it)."""
    for kind in ServiceKind:
        name = next((n for n, s in HOMELAB.services.items() if s.kind is kind), None)
        assert name is not None, f"homelab places no {kind.value}: add one so this test covers it"
        tls = service_tls.served_tls(HOMELAB, name)
        assert tls is not None and (tls.command or tls.environment), kind
    yaml.safe_dump(services())  # the compose files are plain YAML
