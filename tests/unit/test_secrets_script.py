"""`primespark-secrets`, the VM's boot-time secret pull, run as cloud-init installs it (bash, curl, jq).

Against a stand-in HTTP server that fails in each way Vault can (refused, 403, sealed, malformed or partial
answers): the previous env files survive byte for byte and the stack is not restarted. Against a real OpenBao
dev server: the AppRole login works and the host's env files hold exactly its secrets, 0600; sealed or
stopped, the old files stay.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from primespark.cloud.catalog import readable_services, secret_path
from primespark.cloud.services import VaultTarget, stack_files
from primespark.cloud.vault import VaultSecretsProvider, issue_secret_id, vault_spec
from primespark.fleet import load_fleet

HOST = "core-1"  # reads redis, api and timescaledb (the API's database)
OLD = {"redis.env": b"REDIS_PASSWORD=old-redis\n", "api.env": b"API_SECRET_KEY=old-api\n"}


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    missing = [tool for tool in ("bash", "curl", "jq") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: `make setup` installs them (APT_PACKAGES)")


@dataclass
class Host:
    """A VM's secret-pull files under tmp_path, as cloud-init writes them for HOST."""

    root: Path
    script: Path
    env: dict[str, str]
    secrets: Path
    restarts: Path

    def run(self, attempts: int = 3) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.env, "PRIMESPARK_SECRETS_ATTEMPTS": str(attempts),
               "PRIMESPARK_SECRETS_DELAY": "0"}
        return subprocess.run(["bash", str(self.script)], env=env, capture_output=True, text=True, timeout=120)

    def files(self) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(self.secrets.iterdir())}

    def restarted(self) -> int:
        return len(self.restarts.read_text().splitlines()) if self.restarts.exists() else 0

    def plant_old(self) -> None:
        for name, data in OLD.items():
            (self.secrets / name).write_bytes(data)
            (self.secrets / name).chmod(0o600)


def make_host(tmp_path: Path, address: str, secret_id: str = "sid-from-the-configuration-run") -> Host:
    fleet = load_fleet("homelab")
    files = {f.path: f for f in stack_files(fleet, HOST, VaultTarget(address))}
    root = tmp_path / "vm"
    (root / "vault").mkdir(parents=True)
    secret_file = root / "vault" / "secret-id"
    secret_file.write_text(secret_id + "\n")
    secret_file.chmod(0o400)
    vault_env = "".join(line + "\n" for line in files["/etc/primespark/vault.env"].content.splitlines()
                        if not line.startswith("VAULT_SECRET_ID_FILE="))
    (root / "vault.env").write_text(vault_env + f"VAULT_SECRET_ID_FILE={secret_file}\n")
    (root / "vault" / "paths").write_text(files["/etc/primespark/vault/paths"].content)
    script = root / "primespark-secrets"
    script.write_text(files["/usr/local/sbin/primespark-secrets"].content)
    secrets = root / "secrets"
    secrets.mkdir(mode=0o700)
    restarts = root / "restarts"
    env = {"PRIMESPARK_VAULT_ENV": str(root / "vault.env"), "PRIMESPARK_VAULT_PATHS": str(root / "vault" / "paths"),
           "PRIMESPARK_SECRETS_DIR": str(secrets), "PRIMESPARK_STACK_RESTART": f"echo restart >> {restarts}"}
    return Host(root, script, env, secrets, restarts)


# A stand-in Vault that fails in one way ---------------------------------------------------------------------

GOOD_LOGIN = {"auth": {"client_token": "s.standin", "policies": ["default"]}}


@dataclass
class StandIn:
    login: tuple[int, bytes]
    reads: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # by the last path segment (service)
    calls: list[str] = field(default_factory=list)


@pytest.fixture
def stand_in() -> Iterator[tuple[str, StandIn]]:
    behaviour = StandIn(login=(200, json.dumps(GOOD_LOGIN).encode()))

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            behaviour.calls.append(f"POST {self.path}")
            self._answer(*behaviour.login)

        def do_GET(self) -> None:
            behaviour.calls.append(f"GET {self.path}")
            if self.headers.get("X-Vault-Token") != "s.standin":
                self._answer(403, b'{"errors":["permission denied"]}')
                return
            self._answer(*behaviour.reads.get(self.path.rsplit("/", 1)[-1], (200, _kv({"X": "y"}))))

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", behaviour
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _kv(data: dict) -> bytes:
    return json.dumps({"data": {"data": data, "metadata": {"version": 1}}}).encode()


FAILURES = {
    "login refused (403)": dict(login=(403, b'{"errors":["invalid role or secret ID"]}')),
    "sealed (503)": dict(login=(503, b'{"errors":["Vault is sealed"]}')),
    "login answer malformed": dict(login=(200, b'{"auth": {"client_tok')),
    "login answer without a token": dict(login=(200, b'{"auth": null, "warnings": ["x"]}')),
    "read denied (403)": dict(reads={"api": (403, b'{"errors":["permission denied"]}')}),
    "read answer malformed": dict(reads={"api": (200, b'{"data": {"data": {"API_SECRET_KEY": "new')}),
    "read answer partial (no data)": dict(reads={"api": (200, b'{"data": {"metadata": {"version": 3}}}')}),
    "read answer empty object": dict(reads={"api": (200, _kv({}))}),
    "read answer not strings": dict(reads={"api": (200, _kv({"API_SECRET_KEY": {"nested": 1}}))}),
    "read answer with a newline": dict(reads={"api": (200, _kv({"API_SECRET_KEY": "a\nREDIS_PASSWORD=x"}))}),
    "read answer HTML": dict(reads={"api": (200, b"<html>proxy error</html>")}),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_any_failure_keeps_the_old_env_files_and_does_not_restart(tmp_path, stand_in, case) -> None:
    address, behaviour = stand_in
    for name, value in FAILURES[case].items():
        setattr(behaviour, name, value)
    host = make_host(tmp_path, address)
    host.plant_old()
    before = host.files()
    result = host.run(attempts=3)
    assert result.returncode != 0, result.stderr
    assert host.files() == before, "the previous env files survive byte for byte, with nothing beside them"
    assert all(stat.S_IMODE((host.secrets / n).stat().st_mode) == 0o600 for n in OLD)
    assert host.restarted() == 0
    assert "the previous env files are kept and the stack is not restarted" in result.stderr
    assert "after 3 attempt(s)" in result.stderr
    assert sum(c.startswith("POST /v1/auth/approle/login") for c in behaviour.calls) == 3, "retried, bounded"
    assert "s.standin" not in result.stderr and "sid-from-the-configuration-run" not in result.stderr


def test_a_refused_connection_keeps_the_old_env_files(tmp_path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    host = make_host(tmp_path, f"http://127.0.0.1:{port}")
    host.plant_old()
    result = host.run(attempts=2)
    assert result.returncode != 0
    assert host.files() == OLD and host.restarted() == 0
    assert f"no answer from http://127.0.0.1:{port}" in result.stderr


def test_a_missing_secret_id_changes_nothing(tmp_path, stand_in) -> None:
    address, behaviour = stand_in
    host = make_host(tmp_path, address)
    (host.root / "vault" / "secret-id").unlink()
    host.plant_old()
    result = host.run()
    assert result.returncode != 0 and "waiting for" in result.stderr
    assert host.files() == OLD and host.restarted() == 0 and behaviour.calls == []


def test_the_stand_in_success_path_writes_all_files_then_restarts_once(tmp_path, stand_in) -> None:
    address, behaviour = stand_in
    behaviour.reads = {"api": (200, _kv({"API_SECRET_KEY": "new-api"})),
                       "redis": (200, _kv({"REDIS_PASSWORD": "new-redis"})),
                       "timescaledb": (200, _kv({"POSTGRES_PASSWORD": "new-pg"}))}
    host = make_host(tmp_path, address)
    host.plant_old()
    result = host.run()
    assert result.returncode == 0, result.stderr
    assert host.files() == {"api.env": b"API_SECRET_KEY=new-api\n", "redis.env": b"REDIS_PASSWORD=new-redis\n",
                            "timescaledb.env": b"POSTGRES_PASSWORD=new-pg\n"}
    assert host.restarted() == 1


# The real server ------------------------------------------------------------------------------------------------


def test_real_vault_approle_pull_then_sealed_and_stopped_keep_the_files(tmp_path, fresh_vault) -> None:
    fleet = load_fleet("homelab")
    values = VaultSecretsProvider(fresh_vault.client).create(
        {"fleet": "homelab", **vault_spec(fleet, "secret")}).outs["values"]
    host = make_host(tmp_path, fresh_vault.address, issue_secret_id(fresh_vault.client(), fleet, HOST))

    result = host.run()
    assert result.returncode == 0, result.stderr
    expected = {f"{name}.env": "".join(f"{k}={v}\n" for k, v in values[secret_path(fleet, name)].items()).encode()
                for name in readable_services(fleet, HOST)}
    assert host.files() == expected and set(expected) == {"api.env", "redis.env", "timescaledb.env"}
    assert all(stat.S_IMODE((host.secrets / n).stat().st_mode) == 0o600 for n in expected)
    assert stat.S_IMODE(host.secrets.stat().st_mode) == 0o700
    assert host.restarted() == 1

    fresh_vault.seal()
    sealed = host.run(attempts=2)
    assert sealed.returncode != 0 and "Vault is sealed" in sealed.stderr
    assert host.files() == expected and host.restarted() == 1

    fresh_vault.unseal()
    assert host.run().returncode == 0 and host.restarted() == 2

    fresh_vault.stop()
    stopped = host.run(attempts=2)
    assert stopped.returncode != 0 and "no answer from" in stopped.stderr
    assert host.files() == expected and host.restarted() == 2


def test_real_vault_refuses_a_wrong_secret_id(tmp_path, fresh_vault) -> None:
    fleet = load_fleet("homelab")
    VaultSecretsProvider(fresh_vault.client).create({"fleet": "homelab", **vault_spec(fleet, "secret")})
    host = make_host(tmp_path, fresh_vault.address, "00000000-0000-0000-0000-000000000000")
    host.plant_old()
    result = host.run(attempts=2)
    assert result.returncode != 0 and "auth/approle/login: HTTP 400" in result.stderr, result.stderr
    assert host.files() == OLD and host.restarted() == 0
