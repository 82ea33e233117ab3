"""The lab's OpenBao without Docker: a real `bao server` (not dev mode) on loopback with its data in a state
folder — initialised once, unsealed on every `ensure_ready`, its data kept across restarts; what the plan says it
listens on; and commands finding it through the lab fleet's `secrets: {backend: vault, auth: lab}`."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import yaml

from primespark.context import FleetContext
from primespark.errors import UserError
from primespark.fleet import load_fleet
from primespark.fleet.loader import validate_data
from primespark.lab.openbao import LabOpenBao, credentials_file
from primespark.lab.topology import OpenBaoSpec, network_name, plan_lab
from primespark.secrets import SecretError, SecretStoreSealed, VaultSecretStore, ensure_reference, read_reference
from primespark.settings import settings_for
from primespark.vault_server import _free_port_pair, health_status

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def bao(tmp_path: Path) -> Iterator[LabOpenBao]:
    server = LabOpenBao(tmp_path / "state", OpenBaoSpec(_free_port_pair(), (IPv4Address("127.0.0.1"),),
                                                         ("secret", "kv-lab")))
    (tmp_path / "state").mkdir(mode=0o700)
    try:
        yield server
    finally:
        server.stop()


def test_plan_listens_on_loopback_and_on_the_lan_of_hosts_with_service_secrets_or_a_worker() -> None:
    fleet = load_fleet(str(REPO / "inventory" / "lab.yaml"))
    plan = plan_lab(fleet, "ssh-ed25519 AAAA test")
    spec = plan.openbao
    assert spec is not None and spec.port == fleet.lab.openbao_port and spec.mounts == ("secret",)
    service_sites = {fleet.hosts[s.host].site for s in fleet.services.values()}
    assert service_sites == {"cloud"}
    assert fleet.orchestration is not None and set(fleet.orchestration.workers) == {"edge", "cloud"}
    lans = [n.gateway for n in plan.networks if n.name in (network_name(fleet, "edge"), network_name(fleet, "cloud"))]
    # this machine on the cloud LAN (service hosts) and on the edge LAN (the edge worker logs in there)
    assert spec.listen[0] == IPv4Address("127.0.0.1") and sorted(spec.listen[1:]) == sorted(lans) and len(lans) == 2
    assert spec.address == f"http://127.0.0.1:{fleet.lab.openbao_port}"
    # A lab on the local store runs no OpenBao.
    data = yaml.safe_load((REPO / "inventory" / "lab.yaml").read_text())
    data["secrets"] = {"backend": "local"}
    for repository in data["backup"]["repositories"].values():
        repository["password"] = "local:restic/x"
    assert plan_lab(validate_data(data, "lab"), "ssh-ed25519 AAAA test").openbao is None


def test_initialised_once_unsealed_again_and_its_data_outlives_the_process(bao: LabOpenBao) -> None:
    first = bao.ensure_ready()
    assert (first.started, first.initialised, first.unsealed) == (True, True, True)
    assert first.mounts_enabled == ["secret", "kv-lab"]
    credentials = json.loads(bao.credentials_file.read_text())
    assert sorted(credentials) == ["root_token", "unseal_key"]  # the only secrets the state folder keeps
    assert bao.credentials_file.stat().st_mode & 0o777 == 0o600
    assert bao.home.stat().st_mode & 0o777 == 0o700 and bao.data_dir.stat().st_mode & 0o777 == 0o700
    pid = bao.pid()
    assert pid is not None
    argv = Path(f"/proc/{pid}/cmdline").read_bytes()
    for value in credentials.values():
        assert value.encode() not in argv and value not in bao.log_file.read_text()
    client = bao.root_client()
    client.secrets.kv.v2.create_or_update_secret(path="lab/x", secret={"value": "kept"}, mount_point="kv-lab")
    mounts = client.sys.list_mounted_secrets_engines()["data"]
    assert mounts["kv-lab/"]["type"] == "kv" and mounts["kv-lab/"]["options"]["version"] == "2"

    again = bao.ensure_ready()
    assert not again.changed and bao.pid() == pid, "a ready server is left as it is"

    client.sys.seal()
    assert bao.state() == "sealed"
    unsealed = bao.ensure_ready()
    assert unsealed.unsealed and not unsealed.started and bao.state() == "unsealed"

    assert bao.stop() and bao.pid() is None and bao.state() == "not running"
    assert bao.data_dir.is_dir() and bao.credentials_file.is_file(), "stopping keeps the data and the key"
    restarted = bao.ensure_ready()
    assert (restarted.started, restarted.initialised, restarted.unsealed) == (True, False, True)
    assert json.loads(bao.credentials_file.read_text()) == credentials, "initialised once only"
    value = bao.root_client().secrets.kv.v2.read_secret_version(path="lab/x", mount_point="kv-lab",
                                                                raise_on_deleted_version=True)
    assert value["data"]["data"] == {"value": "kept"}


def test_a_new_listen_address_restarts_it_and_it_answers_there(bao: LabOpenBao) -> None:
    bao.ensure_ready()
    old = bao.pid()
    bao.spec = OpenBaoSpec(bao.spec.port, (IPv4Address("127.0.0.1"), IPv4Address("127.0.0.2")), bao.spec.mounts)
    ready = bao.ensure_ready()
    assert ready.started and ready.unsealed and bao.pid() not in (None, old)
    assert health_status(bao.spec.address_on(IPv4Address("127.0.0.2"))) == 200


def test_a_port_taken_by_another_program_is_a_clear_preflight_error(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        server = LabOpenBao(tmp_path, OpenBaoSpec(port, (IPv4Address("127.0.0.1"),), ("secret",)))
        with pytest.raises(UserError, match=f"port {port} or {port + 1} \\(the lab's OpenBao\\) is taken") as caught:
            server.start()
    assert "lab.openbao_port" in caught.value.fix
    assert server.pid() is None and not server.credentials_file.exists()


def test_lost_credentials_are_a_clear_error_not_a_new_init(bao: LabOpenBao) -> None:
    bao.ensure_ready()
    bao.credentials_file.unlink()
    bao.stop()
    with pytest.raises(UserError, match="initialised, but its unseal key is gone") as caught:
        bao.ensure_ready()
    assert str(bao.data_dir) in caught.value.fix


def test_a_server_that_ends_while_starting_is_named_with_how_it_ended(
        bao: LabOpenBao, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server it started is asked for its exit status (not looked for in /proc, where a process can be
    caught between states): the error says how it ended."""
    import subprocess

    from primespark.lab import openbao

    def ends_at_once(args: list[str], *_: object, **__: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["sh", "-c", "exit 3", *args], start_new_session=True)

    monkeypatch.setattr(openbao, "spawn_bao", ends_at_once)
    with pytest.raises(UserError, match=r"stopped before it could answer \(exit status 3\)") as caught:
        bao.ensure_ready(timeout=30)
    assert str(bao.log_file) in caught.value.fix


def lab_fleet_on(tmp_path: Path, port: int) -> str:
    data = yaml.safe_load((REPO / "inventory" / "lab.yaml").read_text())
    data["lab"]["openbao_port"] = port
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_commands_find_the_lab_openbao_through_the_fleet_with_no_vault_variables(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith(("VAULT_", "BAO_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path / "state"))
    env = lab_fleet_on(tmp_path, _free_port_pair())
    ctx = FleetContext.load(env)
    with pytest.raises(SecretError, match="the lab's OpenBao has not been set up") as missing:
        ctx.secrets  # noqa: B018 (made on first use)
    assert "spark lab up --env lab" in missing.value.fix

    planned = plan_lab(ctx.fleet, "ssh-ed25519 AAAA test").openbao
    assert planned is not None
    spec = OpenBaoSpec(planned.port, (IPv4Address("127.0.0.1"),), planned.mounts)  # no lab bridges here
    server = LabOpenBao(ctx.state_dir, spec)
    try:
        server.ensure_ready()
        store = FleetContext.load(env).secrets
        assert isinstance(store, VaultSecretStore) and store.addr == spec.address
        password = ctx.fleet.backup.repositories["nas-primary"].password
        assert password == "vault:secret/primespark/lab/restic/nas-primary#password"
        made = ensure_reference(password, store, lambda: "restic-pw")
        assert read_reference(password, store) == made == "restic-pw"
        assert ensure_reference("local:mesh/fleet/pi-1", store, lambda: "wg") == "wg"
        root = server.root_client()
        listed = root.secrets.kv.v2.list_secrets(path="primespark/lab/", mount_point="secret")["data"]["keys"]
        assert sorted(listed) == ["mesh/", "restic/"]
        assert not (ctx.state_dir / "secrets").exists(), "no local store"
        assert sorted(p.name for p in ctx.state_dir.iterdir()) == ["openbao", "openbao.pid"]
        assert credentials_file(ctx.state_dir).stat().st_mode & 0o777 == 0o600

        root.sys.seal()
        with pytest.raises(SecretStoreSealed, match=r"^secret store sealed: .* while reading "
                                                    r"secret/primespark/lab/restic/nas-primary#password") as sealed:
            ensure_reference(password, FleetContext.load(env).secrets, lambda: pytest.fail("made while sealed"))
        assert sealed.value.fix.startswith("run `spark lab up --env lab`")
    finally:
        server.stop()


def test_lab_up_moves_a_leftover_local_store_into_openbao_and_sets_conflicts_aside_there(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from primespark.lab import Lab
    from primespark.secrets import LocalSecretStore

    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path / "state"))
    for name in ("SPARK_SECRET_BACKEND", "SPARK_VAULT_MOUNT", "SPARK_VAULT_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    lab = Lab(load_fleet(lab_fleet_on(tmp_path, _free_port_pair())), settings_for("lab"))
    assert lab.openbao is not None
    lab.openbao.spec = OpenBaoSpec(lab.openbao.spec.port, (IPv4Address("127.0.0.1"),), lab.openbao.spec.mounts)
    local = LocalSecretStore(lab.state_dir / "secrets")
    local.put("mesh/fleet/pi-1", "wg-pi-1")
    local.put("restic/ssh/pi-1", "ssh-key")
    local.put("pulumi/passphrase", "old")
    try:
        lab.openbao.ensure_ready()
        root = lab.openbao.root_client()
        root.secrets.kv.v2.create_or_update_secret(path="primespark/lab/pulumi/passphrase", secret={"value": "new"},
                                                   mount_point="secret")
        said: list[str] = []
        moved = lab._move_local_secrets(said.append)
        assert sorted(m.key for m in moved) == ["mesh/fleet/pi-1", "restic/ssh/pi-1"]
        for key, value in (("mesh/fleet/pi-1", "wg-pi-1"), ("restic/ssh/pi-1", "ssh-key"),
                           ("pulumi/passphrase", "new")):
            read = root.secrets.kv.v2.read_secret_version(path=f"primespark/lab/{key}", mount_point="secret",
                                                          raise_on_deleted_version=True)
            assert read["data"]["data"] == {"value": value}
        aside = root.secrets.kv.v2.read_secret_version(path="primespark/lab/local-conflicts/pulumi/passphrase",
                                                       mount_point="secret", raise_on_deleted_version=True)
        assert aside["data"]["data"] == {"value": "old"}, "the conflicting local value is kept, in OpenBao"
        assert not (lab.state_dir / "secrets").exists(), "no local store is left, not even its folders"
        assert any("pulumi/passphrase" in line and "local-conflicts/pulumi/passphrase" in line for line in said), said
        assert lab._move_local_secrets(said.append) == [], "nothing more to move"
    finally:
        lab.openbao.stop()


def test_lab_up_gives_the_lab_the_fleet_ca_once_and_keeps_it_across_restarts(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`spark lab up`'s PKI step (`Lab._pki_up`: LabOpenBao.ensure_pki, the plan and apply `spark up` uses): the CA
    is made on the first run, a second run changes nothing, and a restarted, unsealed server has the same CA."""
    from primespark.lab import Lab
    from primespark.pki import ca_certificate, mount_of

    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path / "state"))
    lab = Lab(load_fleet(lab_fleet_on(tmp_path, _free_port_pair())), settings_for("lab"))
    assert lab.openbao is not None
    lab.openbao.spec = OpenBaoSpec(lab.openbao.spec.port, (IPv4Address("127.0.0.1"),), lab.openbao.spec.mounts)
    try:
        lab.openbao.ensure_ready()
        said: list[str] = []
        first = lab._pki_up(said.append)
        assert first.ca_generated and set(first.roles) == set(lab.fleet.hosts)
        assert any("generated the fleet CA" in line for line in said), said
        ca = ca_certificate(lab.openbao.root_client(), mount_of(lab.fleet.name))
        assert "BEGIN CERTIFICATE" in ca
        said.clear()
        assert not lab._pki_up(said.append).changed and said == [], "a second run changes and says nothing"
        lab.openbao.stop()
        lab.openbao.ensure_ready()
        assert not lab._pki_up(said.append).changed, "a restart keeps the CA and the roles"
        assert ca_certificate(lab.openbao.root_client(), mount_of(lab.fleet.name)) == ca
    finally:
        lab.openbao.stop()


def test_the_bridges_serve_only_tls_with_the_listener_ca_and_loopback_stays_plain(tmp_path: Path) -> None:
    """The configuration and certificates `spark lab up` starts OpenBao with (the lab's test_secrets and every
    worker and renewal on the lab reach it over TLS on the bridges)."""
    from cryptography import x509

    from primespark.lab.openbao import listener_ca_file

    bridges = (IPv4Address("172.30.2.1"), IPv4Address("172.30.1.1"))
    server = LabOpenBao(tmp_path, OpenBaoSpec(8200, (IPv4Address("127.0.0.1"), *bridges), ("secret",)))
    assert server.ensure_listener_tls()
    loopback, *on_bridges = [listener["tcp"] for listener in json.loads(server.config())["listener"]]
    assert loopback == {"address": "127.0.0.1:8200", "cluster_address": "127.0.0.1:8201", "tls_disable": True}
    assert [b["address"] for b in on_bridges] == ["172.30.2.1:8200", "172.30.1.1:8200"]
    for listener in on_bridges:
        assert "tls_disable" not in listener and listener["tls_min_version"] == "tls12"
        assert listener["tls_cert_file"] == str(server.listener_cert)
        assert listener["tls_key_file"] == str(server.listener_key)
    assert server.spec.address_on(bridges[0]) == "https://172.30.2.1:8200"
    assert server.spec.address_on(IPv4Address("127.0.0.1")) == "http://127.0.0.1:8200"

    ca = x509.load_pem_x509_certificate(listener_ca_file(tmp_path).read_bytes())
    cert = x509.load_pem_x509_certificate(server.listener_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(str(a) for a in sans.get_values_for_type(x509.IPAddress)) == ["172.30.1.1", "172.30.2.1"]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for secret in (server.listener_key, server.tls_dir / "ca-key.pem"):
        assert secret.stat().st_mode & 0o777 == 0o600, secret
    assert server.tls_dir.stat().st_mode & 0o777 == 0o700

    assert not server.ensure_listener_tls(), "the same bridges: kept"
    moved = LabOpenBao(tmp_path, OpenBaoSpec(8200, (IPv4Address("127.0.0.1"), IPv4Address("172.30.9.1")),
                                             ("secret",)))
    assert moved.ensure_listener_tls(), "a bridge moved: a new certificate"
    again = x509.load_pem_x509_certificate(moved.listener_cert.read_bytes())
    again.verify_directly_issued_by(x509.load_pem_x509_certificate(listener_ca_file(tmp_path).read_bytes()))
    assert x509.load_pem_x509_certificate(listener_ca_file(tmp_path).read_bytes()) == ca, "the CA is made once"
