"""What the server's and the workers' hosts get from the controller: each worker only its own site's secrets and
a key of its own; the API as each host reaches it (LAN on the server's site, mesh elsewhere)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from lab_fleets import lab_fleet

from primespark.backup import records
from primespark.context import FleetContext
from primespark.errors import UserError
from primespark.lab.ssh import known_host_names, operator_key
from primespark.mesh.service import plan_and_save
from primespark.orchestration.material import (
    LOCAL_POSTGRESQL_URL,
    WORKER_HOME,
    api_url,
    authorized_worker_keys,
    server_material,
    worker_material,
)
from primespark.secrets import ReadOnlyStore, SecretError, SecretNotFound, ensure_reference


def host_key() -> str:
    public = Ed25519PrivateKey.generate().public_key()
    return public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


@pytest.fixture
def lab_env(tmp_path: Path) -> str:
    """The lab fleet with a local store (its own OpenBao runs only under `spark lab up`)."""
    return lab_fleet(tmp_path, {"backend": "local"})


@pytest.fixture
def lab_state(lab_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FleetContext:
    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path))
    ctx = FleetContext.load(lab_env)
    plan_and_save(ctx.fleet, "fleet", ctx.state_dir, ctx.secrets)
    operator_key(ctx.state_dir, "operator@test")
    lines = [f"{','.join(known_host_names(n, h))} {host_key()}" for n, h in ctx.fleet.hosts.items()]
    (tmp_path / "ssh" / "known_hosts").write_text("\n".join(lines) + "\n")
    return ctx


def test_the_edge_worker_holds_the_edge_password_only_and_reaches_the_server_over_the_mesh(lab_state, lab_env) -> None:  # type: ignore[no-untyped-def]
    edge = worker_material(lab_env, "nas-1")
    assert edge["site"] == "edge" and edge["pool"] == "spark-edge"
    assert [s["key"] for s in edge["secrets"]] == ["audit/hmac-key", "restic/nas-primary"]
    address = edge["api_url"].removeprefix("http://").split(":")[0]
    assert edge["api_ca_file"] is None  # the local store: no fleet CA, plain HTTP
    assert IPv4Address(address) in IPv4Network("10.99.0.0/24") and edge["api_url"].endswith(":4200/api")
    hosts = {line.split()[0] for line in edge["known_hosts"]}
    assert hosts == {"172.30.1.11", "172.30.1.12", "172.30.1.13", "172.30.1.20"}
    cloud = worker_material(lab_env, "ops-1")
    assert [s["key"] for s in cloud["secrets"]] == ["audit/hmac-key", "restic/offsite"]
    assert cloud["api_url"] == "http://172.30.2.14:4200/api"  # the server's own site: its LAN address
    assert edge["auth_string"] == cloud["auth_string"] and edge["auth_string"].startswith("spark:")


def test_each_worker_has_a_key_of_its_own_never_the_controllers(lab_state, lab_env) -> None:  # type: ignore[no-untyped-def]
    edge, cloud = worker_material(lab_env, "nas-1"), worker_material(lab_env, "ops-1")
    operator = (lab_state.state_dir / "ssh" / "id_ed25519.pub").read_text().split()[1]
    keys = {edge["ssh_public_key"].split()[1], cloud["ssh_public_key"].split()[1]}
    assert len(keys) == 2 and operator not in keys
    assert edge["ssh_public_key"].endswith(" spark-worker-edge@lab")
    assert authorized_worker_keys(lab_env, "pi-1") == [edge["ssh_public_key"]]
    assert authorized_worker_keys(lab_env, "core-1") == [cloud["ssh_public_key"]]
    assert worker_material(lab_env, "nas-1")["ssh_private_key"] == edge["ssh_private_key"]  # made once


def test_the_server_listens_on_its_lan_and_mesh_addresses(lab_state, lab_env) -> None:  # type: ignore[no-untyped-def]
    server = server_material(lab_env, "ops-1")
    lan, mesh = server["addresses"]
    assert lan == "172.30.2.14" and mesh in [str(a) for a in IPv4Network("10.99.0.0/24")]
    assert server["port"] == 4200
    # inventory/lab.yaml keeps the database in PostgreSQL on ops-1, over its socket: no secret in the URL
    assert server["postgresql"] and server["database_url"] == LOCAL_POSTGRESQL_URL
    # the export's subjects: the pools, and inventory/lab.yaml's agent-task templates
    assert server["pools"] == ["spark-cloud", "spark-edge"] and server["templates"] == ["count-readings"]
    # the local store: no fleet CA, so the API is plain HTTP and nothing names a CA
    assert server["served"] is None and server["ca_file"] is None


def test_with_a_fleet_ca_the_api_is_served_over_tls_and_its_clients_trust_that_ca(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path))
    with_ca = FleetContext.load(lab_fleet(tmp_path, {"backend": "vault", "address": "https://vault.invalid:8200"},
                                          name="with-ca.yaml"))
    assert api_url(with_ca) == "https://172.30.2.14:4200/api"  # ops-1's LAN address: in its certificate
    without = FleetContext.load(lab_fleet(tmp_path, {"backend": "local"}, name="without-ca.yaml"))
    assert api_url(without) == "http://172.30.2.14:4200/api"


def test_a_host_without_a_worker_or_a_missing_host_key_is_a_clear_error(lab_state, lab_env) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UserError, match="pi-1 runs no worker"):
        worker_material(lab_env, "pi-1")
    known = lab_state.state_dir / "ssh" / "known_hosts"
    known.write_text("".join(ln + "\n" for ln in known.read_text().splitlines() if "172.30.1.12" not in ln))
    with pytest.raises(UserError, match="no host key for pi-2"):
        worker_material(lab_env, "nas-1")


def test_without_a_mesh_plan_the_worker_of_another_site_has_no_address_to_use(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path))
    with pytest.raises(UserError, match="spark mesh plan --env "):
        server_material(lab_fleet(tmp_path, {"backend": "local"}), "ops-1")


def test_a_workers_store_reads_and_never_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path))
    fleet = lab_fleet(tmp_path, {"backend": "local"})
    FleetContext.load(fleet).secrets.put("restic/nas-primary", "s3cret")
    monkeypatch.setenv("SPARK_SECRET_READ_ONLY", "1")
    store = FleetContext.load(fleet).secrets
    assert isinstance(store, ReadOnlyStore)
    assert store.get("restic/nas-primary") == "s3cret"
    with pytest.raises(SecretNotFound):
        store.get("restic/offsite")
    # a missing password is an error to report, never one to make up
    with pytest.raises(SecretError, match="read-only"):
        ensure_reference("local:restic/offsite", store, lambda: "made-up")
    assert not (tmp_path / "secrets" / "restic" / "offsite").exists()


def test_each_worker_gets_the_records_of_its_own_sites_repositories_only(lab_state, lab_env) -> None:  # type: ignore[no-untyped-def]
    """A worker opens only the repositories the controller recorded: the edge worker those of the edge's backups,
    drills and maintenance (their offsite copies included), the cloud worker the offsite copies it maintains."""
    clients = ("pi-1", "pi-2", "nas-1")
    for repository, client in [*((r, c) for r in ("nas-primary", "offsite") for c in clients), ("gone", "pi-9")]:
        records.save(lab_state.state_dir, records.Record(repository, client, f"/srv/{repository}/{client}/repo",
                                                         f"id-{repository}-{client}", records.now(), "initialised"))
    edge = records.parse(worker_material(lab_env, "nas-1")["repository_records"], "edge")
    cloud = records.parse(worker_material(lab_env, "ops-1")["repository_records"], "cloud")
    assert sorted(edge) == [f"{r}/{c}" for r in ("nas-primary", "offsite") for c in sorted(clients)]
    assert sorted(cloud) == [f"offsite/{c}" for c in sorted(clients)]
    assert cloud["offsite/pi-1"].id == "id-offsite-pi-1"  # the controller's record, as it is


def test_the_role_installs_the_records_where_deploy_writes_them() -> None:
    """`spark flows deploy` writes a worker's records at WORKER_HOME/state over SSH: the role's default home and
    file; a role run leaves the file deploy keeps up to date alone, and it is private (0600)."""
    role = Path(__file__).resolve().parents[2] / "roles" / "prefect_worker"
    assert yaml.safe_load((role / "defaults" / "main.yml").read_text())["prefect_worker_home"] == WORKER_HOME
    tasks = yaml.safe_load((role / "tasks" / "main.yml").read_text())
    (task,) = [t["ansible.builtin.copy"] for t in tasks if str(t.get("ansible.builtin.copy", {}).get("dest", ""))
               .endswith(records.RECORDS_FILE)]
    assert task["dest"] == "{{ prefect_worker_home }}/state/" + records.RECORDS_FILE
    assert task["content"] == "{{ prefect_worker_material.repository_records }}"
    assert task["mode"] == "0600" and task["force"] is False
