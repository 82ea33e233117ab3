"""`FleetPki` under Pulumi's mock engine, and its hvac provider against a real OpenBao dev server: the component
registers the plan `spark lab up` applies (one code path), the provider makes the CA once and keeps it through
updates, and a delete takes the hosts' roles and policies, never the CA."""

from __future__ import annotations

from pathlib import Path

import pytest

from primespark.cloud.mockengine import run_program
from primespark.cloud.plan import plan
from primespark.cloud.vault import PKI_TYPE_TOKEN, FleetPkiProvider
from primespark.fleet import load_fleet
from primespark.fleet.model import Fleet
from primespark.mesh.service import plan_and_save
from primespark.pki import PkiPlan, apply_pki, ca_certificate, mesh_overlays, pki_plan
from primespark.secrets import LocalSecretStore
from primespark.settings import get_settings
from primespark.vault_server import DevServer
from stacks.pki import FleetPki
from stacks.wireguard_mesh import WireGuardMesh


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path / "state"))
    get_settings.cache_clear()
    yield tmp_path / "state"
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def lab() -> Fleet:
    return load_fleet("lab")


def graph_props(fleet: Fleet, tmp_path: Path) -> dict:
    """The Pki resource's inputs as the program registers them, its mesh addresses from the mesh component."""
    planned = plan_and_save(fleet, "fleet", tmp_path, LocalSecretStore(tmp_path / "secrets"), save=False)

    def program() -> None:
        mesh = WireGuardMesh(fleet, "fleet", planned)
        FleetPki(fleet, {"fleet": mesh.overlay})

    graph = run_program(program, fleet.name)
    [component] = graph.of_type("primespark:cloud:FleetPki")
    [resource] = graph.of_type(PKI_TYPE_TOKEN)
    assert resource.parent == component.urn and component.name == "pki"
    assert component.outputs["mount"] == "primespark-pki/lab" and component.outputs["lifetime_hours"] == 24
    return resource.inputs


def test_the_component_registers_the_plan_the_lab_applies(lab: Fleet, tmp_path: Path) -> None:
    props = graph_props(lab, tmp_path)
    assert props["fleet"] == "lab"
    assert PkiPlan.from_props(props["plan"]) == pki_plan(lab, mesh_overlays(lab, tmp_path / "empty"))


def test_the_program_has_the_fleet_ca_beside_vault_secrets() -> None:
    result = plan("homelab")
    [pki] = result.graph.of_type(PKI_TYPE_TOKEN)
    fleet = load_fleet("homelab")
    assert set(pki.inputs["plan"]["hosts"]) == set(fleet.hosts)
    assert result.graph.outputs["tls"]["mount"] == "primespark-pki/homelab"
    assert result.graph.outputs["tls"]["roles"] == sorted(f"primespark-homelab-tls.{h}" for h in fleet.hosts)
    assert not [v for v in result.violations if v.policy == "no-plaintext-secrets"]


def test_the_provider_makes_the_ca_once_and_the_lab_path_agrees(lab: Fleet, tmp_path: Path,
                                                                fresh_vault: DevServer) -> None:
    client = fresh_vault.client()
    props = graph_props(lab, tmp_path)
    provider = FleetPkiProvider(fresh_vault.client)
    created = provider.create(props)
    ca = created.outs["ca"]
    assert "BEGIN CERTIFICATE" in ca and ca == ca_certificate(client, "primespark-pki/lab")
    # The lab's apply of its own plan finds everything in place: one code path, nothing to change.
    assert not apply_pki(client, pki_plan(lab, mesh_overlays(lab, tmp_path / "empty"))).changed
    assert provider.diff("id", props, props).changes is False
    assert provider.update("id", props, props).outs["ca"] == ca, "an update never rotates the CA"
    shorter = {**props, "plan": {**props["plan"], "lifetime_hours": 6}}
    assert provider.diff("id", props, shorter).changes is True
    assert provider.update("id", props, shorter).outs["ca"] == ca
    assert client.secrets.pki.read_role("pi-1", mount_point="primespark-pki/lab")["data"]["max_ttl"] == 6 * 3600

    provider.delete("id", shorter)
    provider.delete("id", shorter)  # twice: already gone is fine
    policies = set(client.sys.list_acl_policies()["data"]["keys"])
    assert not [p for p in policies if p.startswith("primespark-lab-tls.")]
    assert ca_certificate(client, "primespark-pki/lab") == ca, "a deploy never throws the CA away"
