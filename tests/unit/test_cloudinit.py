"""cloud-init seeds from the fleet: contents per role, `cloud-init schema` on every one, a NoCloud seed image."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from primespark.cloud.catalog import RECIPES
from primespark.cloud.cloudinit import exposure_for, pi_seed, vm_seed
from primespark.cloud.services import VaultTarget, compose_for, stack_files
from primespark.fleet import HostKind, ServiceKind, load_fleet, load_text
from primespark.mesh.plan import allocate
from primespark.monitoring.files import monitoring_files

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ5nJ8w3rZVa0x2n0Y0E5hX0C0m4e5fJ3wD8v5t9m1Qb spark@test"
VAULT = VaultTarget("https://vault.example.org:8200")
INVENTORY = Path(__file__).resolve().parents[2] / "inventory"


def overlays(fleet):
    """Overlay addresses as a first `spark mesh plan` hands them out."""
    return {m: allocate(fleet.mesh_members(m), fleet.meshes[m].overlay, None)[0] for m in fleet.meshes}


def seeds(env: str):
    fleet = load_fleet(env)
    monitoring = monitoring_files(fleet, overlays(fleet))
    for name, host in fleet.hosts.items():
        if host.kind is HostKind.vm:
            yield fleet, name, vm_seed(fleet, name, files=stack_files(fleet, name, VAULT, monitoring),
                                       automation_keys=[KEY])
        elif host.kind is HostKind.pi:
            yield fleet, name, pi_seed(fleet, name, automation_keys=[KEY])


def files_of(user_data: str) -> dict[str, str]:
    return {f["path"]: f["content"] for f in yaml.safe_load(user_data)["write_files"]}


def test_role_contents_homelab():
    fleet = load_fleet("homelab")
    rendered = {name: seed for _, name, seed in seeds("homelab")}
    streaming = yaml.safe_load(rendered["stream-1"].user_data)
    sysctl = files_of(rendered["stream-1"].user_data)["/etc/sysctl.d/60-primespark.conf"]
    assert "vm.max_map_count = 262144" in sysctl
    assert streaming["hostname"] == "stream-1" and streaming["timezone"] == fleet.timezone
    assert "qemu-guest-agent" in streaming["packages"] and "docker.io" in streaming["packages"]
    assert "postgresql-client" in yaml.safe_load(rendered["analytics-1"].user_data)["packages"]
    assert "vm.overcommit_memory = 1" in files_of(rendered["core-1"].user_data)["/etc/sysctl.d/60-primespark.conf"]
    assert "restic" in yaml.safe_load(rendered["ops-1"].user_data)["packages"]
    users = {u["name"]: u for u in streaming["users"]}
    assert KEY in users[fleet.hosts["stream-1"].ssh.user]["ssh_authorized_keys"]


def test_compose_on_each_vm_is_where_the_fleet_places_services():
    fleet = load_fleet("homelab")
    for _, name, seed in seeds("homelab"):
        if fleet.hosts[name].kind is not HostKind.vm:
            continue
        compose = yaml.safe_load(files_of(seed.user_data)["/opt/primespark/compose.yaml"])
        assert set(compose["services"]) == set(fleet.services_on(name))
        for svc_name, svc in fleet.services_on(name).items():
            [port] = compose["services"][svc_name]["ports"]
            assert port.startswith(f"{fleet.hosts[name].address}:{svc.port}:")
    stream = {n: s for _, n, s in seeds("homelab")}["stream-1"]
    kafka = files_of(stream.user_data)["/opt/primespark/kafka/server.properties"]
    assert "process.roles=broker,controller" in kafka  # KRaft, no ZooKeeper
    assert f"advertised.listeners=SSL://{fleet.hosts['stream-1'].address}:9092," in kafka
    ops = {n: s for _, n, s in seeds("homelab")}["ops-1"]
    prometheus = yaml.safe_load(files_of(ops.user_data)["/opt/primespark/monitoring/prometheus.yml"])
    targets = {c["labels"]["host"]: c["targets"][0] for c in prometheus["scrape_configs"][0]["static_configs"]}
    # the cloud reaches the edge (behind NAT) over the mesh only: pi-1 at its overlay address
    port = fleet.monitoring.node_exporter_port
    assert targets["pi-1"] == f"{overlays(fleet)['fleet']['pi-1']}:{port}"
    assert targets["core-1"] == f"{fleet.hosts['core-1'].address}:{port}"


def test_monitoring_containers_mount_the_generated_files():
    fleet = load_fleet("homelab")
    monitoring = monitoring_files(fleet, overlays(fleet))
    written = {f.path: f.content for f in stack_files(fleet, "ops-1", VAULT, monitoring)}
    compose = yaml.safe_load(written["/opt/primespark/compose.yaml"])["services"]
    for relative, content in monitoring.items():
        assert written[f"/opt/primespark/monitoring/{relative}"] == content
    assert "/opt/primespark/monitoring/rules:/etc/prometheus/rules:ro" in compose["prometheus"]["volumes"]
    # the host's certificate folder (the fleet CA that verifies the node exporters, at the path prometheus.yml
    # names), whole: the renewal replaces its files by rename
    assert "/etc/ssl/primespark:/etc/ssl/primespark:ro" in compose["prometheus"]["volumes"]
    assert not any("key.pem" in v for s in compose.values() for v in s.get("volumes", []))
    assert "--config.file=/etc/prometheus/alertmanager.yml" in compose["alertmanager"]["command"]
    assert any(v.endswith(":/etc/grafana/provisioning/dashboards:ro") for v in compose["grafana"]["volumes"])
    assert compose["prefect"]["environment"]["PREFECT_API_ENABLE_METRICS"] == "true"
    with pytest.raises(Exception, match="no monitoring files"):
        stack_files(fleet, "ops-1", VAULT)


def test_compose_uses_the_kinds_default_image_unless_the_fleet_names_one():
    fleet = load_fleet("homelab")
    core = compose_for(fleet, "core-1")["services"]
    assert core["redis"]["image"] == RECIPES[ServiceKind.redis].image == "redis:7.4.1"
    assert RECIPES[ServiceKind.api].image is None, "there is no public image of the API"
    assert core["api"]["image"] == fleet.services["api"].image == "registry.home.arpa/primespark/api:0.1.0"
    data = yaml.safe_load((INVENTORY / "homelab.yaml").read_text())
    data["services"]["redis"]["image"] = "registry.example.org/mirror/redis:7.4.1-alpine"
    named = load_text(yaml.safe_dump(data), "named.yaml")
    named_core = compose_for(named, "core-1")["services"]
    assert named_core["redis"]["image"] == "registry.example.org/mirror/redis:7.4.1-alpine"
    assert {k: v for k, v in named_core["redis"].items() if k != "image"} == \
        {k: v for k, v in core["redis"].items() if k != "image"}, "only the image changes"
    written = yaml.safe_load(files_of(vm_seed(named, "core-1", files=stack_files(named, "core-1", VAULT),
                                              automation_keys=[KEY]).user_data)["/opt/primespark/compose.yaml"])
    assert written["services"]["redis"]["image"] == "registry.example.org/mirror/redis:7.4.1-alpine"


def test_secrets_come_from_vault_at_boot_never_inline():
    fleet = load_fleet("homelab")
    rendered = {name: seed for _, name, seed in seeds("homelab")}
    core = files_of(rendered["core-1"].user_data)
    paths = core["/etc/primespark/vault/paths"].split("\n")
    assert "redis primespark/homelab/services/redis" in paths and "api primespark/homelab/services/api" in paths
    assert not any(p.startswith("grafana ") for p in paths), "core-1 may not read grafana's secret"
    assert "VAULT_ROLE_ID=primespark-homelab-core-1" in core["/etc/primespark/vault.env"]
    compose = yaml.safe_load(core["/opt/primespark/compose.yaml"])
    assert "/etc/primespark/secrets/redis.env" in compose["services"]["redis"]["env_file"]
    assert "REDIS_PASSWORD" not in compose["services"]["redis"].get("environment", {})
    for name in fleet.vms_on("kvm-1"):
        assert "secret-id" not in yaml.safe_load(rendered[name].user_data).get("bootcmd", [])


def test_firewall_admits_only_ssh_and_wireguard_publicly():
    fleet = load_fleet("homelab")
    for name in fleet.vms_on("kvm-1"):
        public = [e for e in exposure_for(fleet, name) if e.network == "public"]
        assert {(e.protocol, e.port) for e in public} == {("tcp", 22), ("udp", 51820)}
    seed = next(s for n, s in ((n, s) for _, n, s in seeds("homelab")) if n == "core-1")
    nft = files_of(seed.user_data)["/etc/nftables.conf"]
    assert 'iifname "pub0" tcp dport 22 accept' in nft and "policy drop" in nft
    assert 'iifname "pub0" tcp dport 8000' not in nft


def test_pi_first_boot():
    fleet = load_fleet("homelab")
    seed = pi_seed(fleet, "pi-1", automation_keys=[KEY])
    files = files_of(seed.user_data)
    assert files["/etc/default/cpufrequtils"] == "GOVERNOR=ondemand\n"
    assert "QUIET_START=23:00" in files["/etc/primespark/power.env"]
    network = yaml.safe_load(seed.network_config)
    assert network["ethernets"]["eth0"]["addresses"] == [f"{fleet.hosts['pi-1'].address}/24"]


@pytest.mark.skipif(shutil.which("cloud-init") is None, reason="cloud-init is not installed (make setup installs it)")
def test_every_rendered_user_data_passes_cloud_init_schema(tmp_path):
    count = 0
    for env in ("homelab", "lab"):
        for _, name, seed in seeds(env):
            path = tmp_path / f"{env}-{name}.yaml"
            path.write_text(seed.user_data)
            yaml.safe_load(seed.network_config)
            yaml.safe_load(seed.meta_data)
            result = subprocess.run(["cloud-init", "schema", "--config-file", str(path)], capture_output=True,
                                    text=True, check=False)
            assert result.returncode == 0, f"{env}/{name}: {result.stdout}{result.stderr}"
            count += 1
    assert count == 8 + 7  # homelab: 4 VMs + 4 Pis; lab: 4 VMs + 3 Pis


@pytest.mark.skipif(shutil.which("cloud-localds") is None, reason="cloud-localds is not installed (cloud-image-utils)")
def test_nocloud_seed_image_for_one_vm(tmp_path):
    fleet = load_fleet("homelab")
    seed = vm_seed(fleet, "core-1", files=stack_files(fleet, "core-1", VAULT), automation_keys=[KEY])
    for part, text in (("user-data", seed.user_data), ("meta-data", seed.meta_data),
                       ("network-config", seed.network_config)):
        (tmp_path / part).write_text(text)
    image = tmp_path / "seed.img"
    subprocess.run(["cloud-localds", "--network-config", str(tmp_path / "network-config"), str(image),
                    str(tmp_path / "user-data"), str(tmp_path / "meta-data")], check=True, capture_output=True)
    raw = image.read_bytes()
    assert raw[32769:32774] == b"CD001", "an ISO 9660 image"
    assert b"CIDATA" in raw[32768:34816].upper(), "labelled cidata, as NoCloud looks for"
    assert b"core-1" in raw and b"#cloud-config" in raw
