"""The fleet's Prefect server over TLS, started as the prefect_server role starts it where the fleet has a CA
(`serve_api --tls served.pem`), on loopback: Prefect's own client and spark's health check reach it through the
fleet CA named by PREFECT_API_SSL_CERT_FILE; another CA and plaintext are refused; a certificate replaced under a
continuous stream of new connections is served without a restart, and none of them fails."""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from agent_fleets import fleet_ca
from test_flows_deploy import free_port, start_server

from primespark.errors import UserError
from primespark.orchestration.api import check_health
from primespark.pki import client_context

AUTH = "spark:tls-test"


@dataclass
class TlsServer:
    url: str
    port: int
    tls: Path  # the folder of ca.pem and served.pem


def served_serial(port: int, context: ssl.SSLContext) -> int:
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                             server_hostname="127.0.0.1") as tls:
        cert = tls.getpeercert()
    return int(str(cert["serialNumber"]), 16)


def serial_of(folder: Path) -> int:
    from cryptography import x509

    return int(x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes()).serial_number)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    tls = fleet_ca(tmp_path_factory.mktemp("tls"), "ops-1", addresses=("127.0.0.1",))
    home = tmp_path_factory.mktemp("prefect")
    port = free_port()
    process = start_server(home, AUTH, port, ["127.0.0.1"], tls=tls / "served.pem")
    url = f"https://127.0.0.1:{port}/api"
    context = client_context((tls / "ca.pem").read_text())
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (home / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2, context=context):
                    break
            except OSError:
                assert time.monotonic() < deadline, (home / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        yield TlsServer(url, port, tls)
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)


def test_prefects_client_and_the_health_check_trust_the_fleet_ca(server: TlsServer,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_SSL_CERT_FILE, PREFECT_API_URL, temporary_settings

    ca = str(server.tls / "ca.pem")
    with temporary_settings(updates={PREFECT_API_URL: server.url, PREFECT_API_AUTH_STRING: AUTH,
                                     PREFECT_API_SSL_CERT_FILE: ca}), get_client(sync_client=True) as client:
        assert client.api_healthcheck() is None  # None: healthy
        assert client.read_work_pools() == []
    monkeypatch.setenv("PREFECT_API_SSL_CERT_FILE", ca)
    check_health(server.url, "the test", "start it")
    other = fleet_ca(server.tls.parent / "other", "ops-1", addresses=("127.0.0.1",))  # another CA, the same names
    monkeypatch.setenv("PREFECT_API_SSL_CERT_FILE", str(other / "ca.pem"))
    with pytest.raises(UserError, match=r"the Prefect server at https://127.0.0.1:\d+/api \(from the test\) is "
                                        r"unreachable: .*CERTIFICATE_VERIFY_FAILED"):
        check_health(server.url, "the test", "start it")
    monkeypatch.setenv("PREFECT_API_SSL_CERT_FILE", str(server.tls / "missing.pem"))
    with pytest.raises(UserError, match=r"cannot read the CA that verifies the Prefect API \(.*missing.pem"):
        check_health(server.url, "the test", "start it")


def test_plaintext_gets_nothing(server: TlsServer) -> None:
    with pytest.raises((OSError, http.client.HTTPException)):
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/api/health", timeout=5).read()


def test_a_certificate_replaced_under_continuous_requests_is_served_without_a_restart(server: TlsServer) -> None:
    context = client_context((server.tls / "ca.pem").read_text())
    before = served_serial(server.port, context)
    answered, failed = [], []
    stop = threading.Event()

    def ask() -> None:  # a new connection (a new handshake) each time, as a fresh client does
        while not stop.is_set():
            request = urllib.request.Request(f"{server.url}/health", headers={"Connection": "close"})
            try:
                with urllib.request.urlopen(request, timeout=5, context=context) as reply:
                    answered.append(reply.status)
            except OSError as exc:
                failed.append(repr(exc))

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        renewed = fleet_ca(server.tls.parent / "renewed", "ops-1", addresses=("127.0.0.1",), issuer=server.tls)
        staged = server.tls / ".served.pem.new"
        staged.write_bytes((renewed / "served.pem").read_bytes())
        os.replace(staged, server.tls / "served.pem")  # as the tls role's copy does: one rename
        deadline = time.monotonic() + 30
        while (now := served_serial(server.port, context)) == before:
            assert time.monotonic() < deadline, "the server still serves the old certificate"
            time.sleep(0.2)
        replaced = len(answered)
        while len(answered) < replaced + 5:  # and it goes on answering with the new one
            assert time.monotonic() < deadline + 30, failed[-3:]
            time.sleep(0.1)
    finally:
        stop.set()
        asker.join(timeout=30)
    print(f"{len(answered)} requests across the replacement, {len(failed)} failed")
    assert now == serial_of(renewed) and before == serial_of(server.tls)
    assert not failed, failed[:3]
    assert set(answered) == {200}
