"""A fleet for agent task tests on this machine: the agent-tasks fixture with its hot tier (pi-1, pi-2) in a folder
of the test's and the test's own templates."""

from __future__ import annotations

import contextlib
import http.server
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "fleet" / "valid" / "agent-tasks.yaml"


def agent_fleet(root: Path, tasks: dict[str, Any] | None = None) -> str:
    data = yaml.safe_load(FIXTURE.read_text())
    data["tiers"]["hot"]["path"] = str(root / "hot")
    del data["backup"]  # its plans name /srv/hot, which is no tier folder here
    data["tasks"] = tasks or {}
    (root / "hot").mkdir(exist_ok=True)
    path = root / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def fleet_ca(folder: Path, host: str, addresses: tuple[str, ...] = (), issuer: Path | None = None) -> Path:
    """A CA and a certificate for `host` (its name and `addresses`) signed by it, as the tls role leaves them on a
    host: ca.pem, cert.pem, key.pem and served.pem (key and certificate) in `folder`, which it returns; and the CA's
    key (ca-key.pem: a test CA). With `issuer` (a folder an earlier call made) that CA signs a new key and
    certificate instead: a renewal."""
    from datetime import UTC, datetime, timedelta
    from ipaddress import ip_address

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    if issuer is None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test fleet CA")])
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
              .serial_number(1).not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(hours=1))
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .sign(ca_key, hashes.SHA256()))
    else:
        loaded = serialization.load_pem_private_key((issuer / "ca-key.pem").read_bytes(), None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        ca_key, ca = loaded, x509.load_pem_x509_certificate((issuer / "ca.pem").read_bytes())
        ca_name = ca.subject
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host),
                                                        *(x509.IPAddress(ip_address(a)) for a in addresses)]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "ca-key.pem").write_bytes(ca_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    (folder / "served.pem").write_bytes((folder / "key.pem").read_bytes() + (folder / "cert.pem").read_bytes())
    return folder


@contextlib.contextmanager
def node_exporter(metrics: str, tls: Path | None = None) -> Iterator[int]:
    """A stand-in node exporter on loopback serving `metrics`; its port. Stopped on leaving. With `tls` (a folder
    from fleet_ca), it serves only TLS with that folder's certificate."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = metrics.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls / "cert.pem", tls / "key.pem")
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
