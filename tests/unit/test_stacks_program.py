"""The Pulumi program under Pulumi's mock engine: resources, key properties and outputs come from the fleet."""

from __future__ import annotations

import asyncio
import json

import pytest

from primespark.cloud.plan import plan
from primespark.fleet import load_fleet
from primespark.settings import get_settings

GIB = 1024**3


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path / "state"))
    get_settings.cache_clear()
    yield tmp_path / "state"
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def homelab():
    return load_fleet("homelab")


def _types(result) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in result.graph.resources:
        counts[r.type] = counts.get(r.type, 0) + 1
    return counts


def test_homelab_resources_and_counts(homelab):
    result = plan("homelab")
    counts = _types(result)
    vms = homelab.vms_on("kvm-1")
    assert len(vms) == 4
    assert counts["libvirt:index/domain:Domain"] == 4
    assert counts["libvirt:index/cloudInitDisk:CloudInitDisk"] == 4
    assert counts["libvirt:index/volume:Volume"] == 4 + 1  # a root volume per VM, one shared base image
    assert counts["pulumi:providers:libvirt"] == 1 and counts["libvirt:index/pool:Pool"] == 1
    assert counts["libvirt:index/network:Network"] == 1
    assert counts["primespark:cloud:ServiceStack"] == len({s.host for s in homelab.services.values()})
    assert counts["pulumi-python:dynamic/vault:Secrets"] == 1
    assert counts["primespark:cloud:WireGuardMesh"] == 1


def test_homelab_key_properties_follow_the_fleet(homelab):
    graph = plan("homelab").graph
    [provider] = graph.of_type("pulumi:providers:libvirt")
    kvm = homelab.hosts["kvm-1"]
    assert provider.outputs["uri"] == f"qemu+ssh://{kvm.ssh.user}@{kvm.ssh_address}/system"
    urns = graph.by_urn()
    for domain in graph.of_type("libvirt:index/domain:Domain"):
        host = homelab.hosts[domain.name]
        assert domain.outputs["vcpu"] == host.cpus and domain.outputs["memory"] == host.memory_mb
        assert domain.outputs["qemuAgent"] is True and domain.outputs["autostart"] is True
        assert domain.provider.startswith(provider.urn)
        lan, *public = domain.outputs["networkInterfaces"]
        assert lan["addresses"] == [str(host.address)]
        assert bool(public) == bool(host.public_address)
        labels = json.loads(domain.outputs["description"])["primespark"]["labels"]
        assert labels == host.labels
        vm_component = urns[domain.parent]
        assert vm_component.type == "primespark:cloud:VirtualMachine"
        assert urns[vm_component.parent].name == "kvm-1"
    roots = {v.name: v for v in graph.of_type("libvirt:index/volume:Volume") if v.outputs.get("baseVolumeId")}
    assert {n: v.outputs["size"] / GIB for n, v in roots.items()} == {
        f"{n}-root": h.disk_gb for n, h in homelab.vms_on("kvm-1").items()}
    [base] = [v for v in graph.of_type("libvirt:index/volume:Volume") if v.outputs.get("source")]
    assert base.outputs["source"].endswith(f"/{homelab.images['debian-12'].sha256}.qcow2")


def test_outputs_are_json_for_ansible_and_flows(homelab):
    outputs = plan("homelab").graph.outputs
    json.dumps(outputs)  # plain data only
    assert set(outputs["vms"]) == set(homelab.vms_on("kvm-1"))
    assert outputs["vms"]["core-1"]["address"] == str(homelab.hosts["core-1"].address)
    assert outputs["services"]["kafka"]["port"] == homelab.services["kafka"].port
    assert outputs["services"]["kafka"]["address"] == str(homelab.hosts["stream-1"].address)
    mesh = outputs["mesh"]["fleet"]
    assert set(mesh["public_keys"]) == set(homelab.mesh_members("fleet"))
    assert "private_keys" not in mesh


def test_program_runs_twice_in_one_process():
    first = plan("homelab")
    second = plan("lab")
    third = plan("homelab")
    assert first.graph.outputs["fleet"] == third.graph.outputs["fleet"] == "homelab"
    assert second.graph.outputs["fleet"] == "lab"
    assert len(first.graph.resources) == len(third.graph.resources)
    assert {r.name for r in second.graph.of_type("libvirt:index/domain:Domain")} == set(
        load_fleet("lab").vms_on("kvm-1"))


def test_a_plan_after_asyncio_run_in_the_same_thread():
    asyncio.run(asyncio.sleep(0))  # leaves the main thread without an event loop, which Pulumi's runtime asks for
    assert plan("lab").graph.outputs["fleet"] == "lab"


def test_no_generated_secret_in_any_output_or_cloud_init_file():
    result = plan("homelab")
    graph = result.graph
    [vault] = graph.of_type("pulumi-python:dynamic/vault:Secrets")
    generated = {v for values in vault.outputs["values"].values() for v in values.values()}
    generated |= {v for v in graph.secret_values if len(v) >= 20 and "\n" not in v}  # mesh private keys
    assert len(generated) >= 5
    plain = json.dumps(graph.outputs)
    seeds = [r for r in graph.of_type("libvirt:index/cloudInitDisk:CloudInitDisk")]
    assert len(seeds) == 4
    for secret in generated:
        assert secret not in plain
        for seed in seeds:
            for part in ("userData", "metaData", "networkConfig"):
                assert secret not in seed.outputs[part], f"{seed.name} {part}"
    assert not [v for v in result.violations if v.policy == "no-plaintext-secrets"]


def test_plan_writes_no_state(state_dir):
    plan("homelab")
    assert not state_dir.exists(), "spark plan must not create keys, plans or folders"


def test_the_pulumi_entry_point_reads_the_fleet_named_in_the_stack_config(state_dir, tmp_path, monkeypatch, vault,
                                                                          vault_prefix):
    """`stacks.program.main` as `pulumi up` runs it: config from Pulumi.homelab.yaml, the saved mesh plan, the
    mesh keys from the fleet's Vault (here a real OpenBao in place of homelab's)."""
    import yaml

    from primespark.cloud.mockengine import run_program
    from primespark.cloud.plan import stack_config
    from primespark.mesh.service import plan_and_save
    from primespark.secrets import VaultSecretStore, store_for
    from primespark.settings import settings_for
    from stacks.program import main

    state_dir.mkdir(mode=0o700)  # private, as spark makes it: the plan below is saved into it first
    config = stack_config("homelab")
    assert config["fleet"] == "homelab" and config["vaultAddress"].startswith("https://")
    data = yaml.safe_load((get_settings().inventory_dir / "homelab.yaml").read_text())
    data["secrets"].update(address=vault.address, prefix=vault_prefix)
    (tmp_path / "homelab.yaml").write_text(yaml.safe_dump(data))
    config = {**config, "fleet": str(tmp_path / "homelab.yaml")}
    monkeypatch.setenv("VAULT_TOKEN", vault.root_token)
    fleet = load_fleet(config["fleet"])
    store = store_for(fleet, "homelab", settings_for("homelab"))
    assert isinstance(store, VaultSecretStore)
    saved = plan_and_save(fleet, "fleet", state_dir, store)
    graph = run_program(main, "homelab", config)
    assert {r.name for r in graph.of_type("libvirt:index/domain:Domain")} == set(fleet.vms_on("kvm-1"))
    assert graph.outputs["vault"]["address"] == config["vaultAddress"]
    assert graph.outputs["mesh"]["fleet"]["public_keys"]["core-1"] == saved.plan.hosts["core-1"].public_key
    seed = next(r for r in graph.of_type("libvirt:index/cloudInitDisk:CloudInitDisk") if r.name == "core-1-seed")
    assert f"VAULT_ADDR={config['vaultAddress']}" in seed.outputs["userData"].replace("\\n", "\n")
