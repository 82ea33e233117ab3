"""A worker per site, an AppRole per worker, against a real OpenBao dev server: its policy grants exactly its
site's repository passwords; logged in as the edge worker, a flow reads the edge password and gets 403 for the
cloud one; setting it up again changes nothing; the worker's store writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from lab_fleets import lab_fleet

from primespark.backup.repositories import password
from primespark.context import FleetContext
from primespark.errors import UserError
from primespark.orchestration.material import worker_material
from primespark.orchestration.vault import ensure_worker_access, role_name, worker_policy
from primespark.secrets import SecretError


@pytest.fixture
def controller(fresh_vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FleetContext:
    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path / "controller"))
    monkeypatch.setenv("VAULT_TOKEN", fresh_vault.root_token)
    return FleetContext.load(lab_fleet(tmp_path, {"backend": "vault", "address": fresh_vault.address}))


def as_worker(site: str, access: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FleetContext:
    """The environment the prefect_worker role gives a worker's flows (no VAULT_TOKEN: its AppRole)."""
    secret_id = tmp_path / f"{site}-secret-id"
    secret_id.write_text(access["secret_id"] + "\n")
    monkeypatch.delenv("VAULT_TOKEN")
    for key, value in {"SPARK_WORKER_SITE": site, "SPARK_SECRET_READ_ONLY": "1", "SPARK_VAULT_ROLE_ID":
                       access["role_id"], "SPARK_VAULT_SECRET_ID_FILE": str(secret_id),
                       "SPARK_STATE_DIR": str(tmp_path / site)}.items():
        monkeypatch.setenv(key, value)
    return FleetContext.load(str(tmp_path / "lab.yaml"))  # the controller's fleet file


def test_the_edge_workers_approle_reads_the_edge_password_and_gets_403_for_the_cloud_one(
        controller: FleetContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = {name: password(controller, name, create=True) for name in ("nas-primary", "offsite")}
    policy = worker_policy(controller, "edge")
    assert 'path "secret/data/primespark/lab/restic/nas-primary"' in policy and "offsite" not in policy
    access = ensure_worker_access(controller, "edge")
    assert access["role_id"] == role_name("lab", "edge")
    assert ensure_worker_access(controller, "edge") == access  # again: same credentials, no error
    worker = as_worker("edge", access, tmp_path, monkeypatch)
    assert password(worker, "nas-primary") == made["nas-primary"]
    with pytest.raises(SecretError, match=r"permission denied \(403\)"):
        password(worker, "offsite")
    with pytest.raises(SecretError, match="read-only"):  # a worker writes no secret, not even where it reads
        worker.secrets.put("restic/nas-primary", "overwritten")
    assert password(worker, "nas-primary") == made["nas-primary"]


def test_the_cloud_worker_gets_403_for_the_edge_password(controller: FleetContext, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    made = {name: password(controller, name, create=True) for name in ("nas-primary", "offsite")}
    worker = as_worker("cloud", ensure_worker_access(controller, "cloud"), tmp_path, monkeypatch)
    assert password(worker, "offsite") == made["offsite"]
    with pytest.raises(SecretError, match=r"permission denied \(403\)"):
        password(worker, "nas-primary")


def test_worker_material_with_vault_carries_credentials_not_secret_files(
        controller: FleetContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from primespark.lab.ssh import known_host_names, operator_key
    from primespark.mesh.service import plan_and_save

    plan_and_save(controller.fleet, "fleet", controller.state_dir, controller.secrets)
    operator_key(controller.state_dir, "operator@test")
    (controller.state_dir / "ssh" / "known_hosts").write_text("".join(
        f"{','.join(known_host_names(n, h))} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJx5\n"
        for n, h in controller.fleet.hosts.items()))
    edge = worker_material(str(tmp_path / "lab.yaml"), "nas-1")
    assert edge["secrets"] == [] and edge["vault"]["role_id"] == "primespark-lab-worker-edge"
    # a fleet in Vault has a CA: the worker reaches the API over TLS (the mesh), trusting the host's copy of the CA
    assert edge["api_url"].startswith("https://10.99.0.") and edge["api_ca_file"] == "/etc/ssl/primespark/ca.pem"


def test_a_local_store_has_no_approles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path))
    with pytest.raises(UserError, match="is not Vault"):
        ensure_worker_access(FleetContext.load(lab_fleet(tmp_path, {"backend": "local"})), "edge")


def test_a_worker_keeps_its_own_audit_chain_with_the_fleets_key_and_transit_checkpoints(
        controller: FleetContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from primespark.audit.checkpoints import read_checkpoints
    from primespark.audit.log import Operation, audit_key, audit_log, operation
    from primespark.audit.verify import verify_chain

    worker = as_worker("edge", ensure_worker_access(controller, "edge"), tmp_path, monkeypatch)
    assert audit_key(worker) == audit_key(controller)  # its policy reads the key; its store could not make one
    log = audit_log(worker)
    log.checkpoint_every = 1
    op = Operation("flow backup", worker.env, ["pi-1"], {"host": "pi-1", "password": "x" * 20}, "worker:edge@nas-1")
    with operation(lambda: log, op, destructive=False, warn=pytest.fail):
        pass
    assert log.folder == tmp_path / "edge" / "audit"  # under the worker's own state directory
    (point,) = read_checkpoints(log.chain)
    assert point.signer == "transit:transit/primespark-audit-lab" and point.signature.startswith("vault:v1:")
    assert verify_chain(log.chain, log._signer).ok
