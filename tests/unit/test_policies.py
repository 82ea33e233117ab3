"""Each CrossGuard policy, called directly as the engine calls it: one passing and one violating case each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pulumi_policy import (
    PolicyCustomTimeouts,
    PolicyResource,
    PolicyResourceOptions,
    ResourceValidationArgs,
    StackValidationArgs,
)

from policies import rules

OPTS = PolicyResourceOptions(False, [], None, [], PolicyCustomTimeouts(0, 0, 0), [], None)
GIB = 1024**3


def resource(type_: str, name: str, props: dict, parent: PolicyResource | None = None) -> PolicyResource:
    return PolicyResource(type_, props, f"urn:pulumi:t::p::{type_}::{name}", name, OPTS, None, parent, [], {})


def check_resource(validate, type_: str, props: dict) -> list[str]:
    found: list[str] = []
    validate(ResourceValidationArgs(type_, props, f"urn:pulumi:t::p::{type_}::x", "x", OPTS, None),
             lambda message, urn=None: found.append(message))
    return found


def check_stack(validate, resources: list[PolicyResource]) -> list[str]:
    found: list[str] = []
    validate(StackValidationArgs(resources), lambda message, urn=None: found.append(message))
    return found


def domain_props(labels: dict, autostart: bool = True, agent: bool = True) -> dict:
    return {"vcpu": 4, "memory": 8192, "autostart": autostart, "qemuAgent": agent,
            "description": json.dumps({"primespark": {"host": "x", "labels": labels}})}


def test_vm_backup_label_and_autostart():
    ok = check_resource(rules.vm_backup_and_autostart, rules.DOMAIN, domain_props({"backup": "daily"}))
    assert ok == []
    no_label = check_resource(rules.vm_backup_and_autostart, rules.DOMAIN, domain_props({"role": "core"}))
    assert len(no_label) == 1 and "backup" in no_label[0]
    no_start = check_resource(rules.vm_backup_and_autostart, rules.DOMAIN,
                              domain_props({"backup": "daily"}, autostart=False, agent=False))
    assert len(no_start) == 2 and "autostart" in no_start[0] and "guest agent" in no_start[1]
    assert check_resource(rules.vm_backup_and_autostart, rules.VOLUME, {}) == []  # other types pass


def test_base_image_pinned():
    pinned = {"source": "/var/cache/primespark/" + "ab" * 32 + ".qcow2", "format": "qcow2"}
    assert check_resource(rules.base_image_pinned, rules.VOLUME, pinned) == []
    moving = {"source": "https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-genericcloud-amd64.qcow2"}
    [message] = check_resource(rules.base_image_pinned, rules.VOLUME, moving)
    assert "not pinned" in message
    root = {"baseVolumeId": "base-id", "size": 10 * GIB}  # a root volume has no source: nothing to pin
    assert check_resource(rules.base_image_pinned, rules.VOLUME, root) == []


def _kvm(vm_memory: list[int], disk_gb: int = 100) -> list[PolicyResource]:
    host = resource(rules.KVM_HOST, "kvm-1", {"cpus": 16, "memoryMb": 32768, "diskGb": 1000})
    out = [host]
    for i, memory in enumerate(vm_memory):
        vm = resource(rules.VM, f"vm-{i}", {"address": f"10.0.0.{i + 10}"}, host)
        out += [vm, resource(rules.DOMAIN, f"vm-{i}", {"vcpu": 4, "memory": memory}, vm),
                resource(rules.VOLUME, f"vm-{i}-root", {"baseVolumeId": "b", "size": disk_gb * GIB}, vm)]
    return out


def test_kvm_capacity():
    assert check_stack(rules.kvm_capacity, _kvm([8192, 8192, 16384])) == []
    [memory] = check_stack(rules.kvm_capacity, _kvm([16384, 16384, 8192]))
    assert "kvm-1 is over-committed" in memory and "40960 MiB" in memory
    over_disk = check_stack(rules.kvm_capacity, _kvm([1024, 1024], disk_gb=600))
    assert len(over_disk) == 1 and "1200 GB" in over_disk[0]


def _secret_graph(user_data: str, outputs: dict) -> list[PolicyResource]:
    vault = resource(rules.VAULT_SECRETS, "vault-secrets",
                     {"values": {"primespark/x/services/redis": {"REDIS_PASSWORD": "s3cr3t-generated-value"}}})
    vm = resource(rules.VM, "core-1", {"address": "10.0.0.11"})
    seed = resource(rules.CLOUD_INIT, "core-1-seed", {"userData": user_data}, vm)
    stack = resource(rules.STACK, "stack", outputs)
    return [vault, vm, seed, stack]


def test_no_plaintext_secrets():
    clean = "#cloud-config\nwrite_files:\n  - path: /etc/primespark/vault.env\n    content: VAULT_ROLE_ID=x\n"
    assert check_stack(rules.no_plaintext_secrets, _secret_graph(clean, {"vms": {"core-1": "10.0.0.11"}})) == []
    leaked_output = check_stack(rules.no_plaintext_secrets,
                                _secret_graph(clean, {"redis": {"password": "s3cr3t-generated-value"}}))
    assert len(leaked_output) == 1 and "stack output" in leaked_output[0]
    leaked_seed = check_stack(rules.no_plaintext_secrets,
                              _secret_graph(clean + "runcmd: [echo s3cr3t-generated-value]\n", {}))
    assert len(leaked_seed) == 1 and "core-1-seed" in leaked_seed[0]
    marker = "OPENSSH " + "PRIVATE KEY"  # split so that no committed file looks like it holds a key
    key = f"-----BEGIN {marker}-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END {marker}-----\n"
    pattern = check_stack(rules.no_plaintext_secrets, _secret_graph(clean + f"# {key!r}\n", {}))
    assert len(pattern) == 1 and "looks like a secret" in pattern[0]
    assignment = check_stack(rules.no_plaintext_secrets, _secret_graph(clean + "# password=hunter2hunter2\n", {}))
    assert len(assignment) == 1 and "hunter2" not in assignment[0], "the report must not repeat the secret"
    assert all("s3cr3t" not in m for m in leaked_output + leaked_seed)
    reference = check_stack(rules.no_plaintext_secrets, _secret_graph(clean + "# password=$REDIS_PASSWORD\n", {}))
    assert reference == [], "a reference to a variable is not a secret"


def _exposure_graph(exposure: list[dict], ports: list[str]) -> list[PolicyResource]:
    vm = resource(rules.VM, "core-1", {"address": "10.0.0.11", "publicAddress": "203.0.113.21",
                                       "exposure": exposure})
    compose = json.dumps({"services": {"api": {"image": "a", "ports": ports}}})
    user_data = "#cloud-config\nwrite_files:\n  - path: /opt/primespark/compose.yaml\n    content: " + \
        json.dumps(compose) + "\n"
    return [vm, resource(rules.CLOUD_INIT, "core-1-seed", {"userData": user_data}, vm)]


SSH = {"port": 22, "protocol": "tcp", "network": "public", "interface": "pub0", "purpose": "ssh"}
WG = {"port": 51820, "protocol": "udp", "network": "public", "interface": "pub0", "purpose": "wireguard fleet"}
API_LAN = {"port": 8000, "protocol": "tcp", "network": "lan", "interface": "lan0", "purpose": "api"}


def test_public_exposure():
    assert check_stack(rules.public_exposure, _exposure_graph([SSH, WG, API_LAN], ["10.0.0.11:8000:8000"])) == []
    api_public = {**API_LAN, "network": "public", "interface": "pub0"}
    [firewall] = check_stack(rules.public_exposure, _exposure_graph([SSH, WG, api_public], ["10.0.0.11:8000:8000"]))
    assert "api" in firewall and "public network" in firewall
    for port in ("8000:8000", "0.0.0.0:8000:8000", "203.0.113.21:8000:8000"):
        [published] = check_stack(rules.public_exposure, _exposure_graph([SSH, WG], [port]))
        assert "beyond its LAN address" in published


def _seeds(fleet, mutate=None) -> list[PolicyResource]:
    """The seeds of the fleet's VMs with services, as the program renders them; `mutate(compose, files)` first
    edits the compose services and written files of every seed (a fixture of a regression)."""
    import yaml

    from primespark.cloud.cloudinit import File, vm_seed
    from primespark.cloud.services import VaultTarget, stack_files
    from primespark.mesh.plan import allocate
    from primespark.monitoring.files import monitoring_files

    overlays = {m: allocate(fleet.mesh_members(m), fleet.meshes[m].overlay, None)[0] for m in fleet.meshes}
    monitoring = monitoring_files(fleet, overlays)
    out = []
    for host in sorted({s.host for s in fleet.services.values()}):
        files = {f.path: f for f in stack_files(fleet, host, VaultTarget("https://vault.example.org:8200"),
                                                monitoring)}
        if mutate is not None:
            compose = yaml.safe_load(files["/opt/primespark/compose.yaml"].content)
            texts = {path: f.content for path, f in files.items()}
            mutate(compose["services"], texts)
            texts["/opt/primespark/compose.yaml"] = yaml.safe_dump(compose)
            files = {path: File(path, content) for path, content in texts.items()}
        seed = vm_seed(fleet, host, files=list(files.values()), automation_keys=[])
        vm = resource(rules.VM, host, {"address": str(fleet.hosts[host].address)})
        out += [vm, resource(rules.CLOUD_INIT, f"{host}-seed", {"userData": seed.user_data}, vm)]
    return out


def _edit(service: str, change):
    def mutate(services: dict, files: dict) -> None:
        if service in services:
            change(services[service], files)
    return mutate


def _drop_flag(flag: str):
    def change(service: dict, _files: dict) -> None:
        service["command"] = [w.replace(flag, "") if isinstance(w, str) else w for w in service["command"]]
    return change


PLAINTEXT_FIXTURES = {  # a regression of one service -> what the violation says of it
    "postgres without ssl": (_edit("timescaledb", _drop_flag("ssl=on")), "timescaledb", "ssl=on"),
    "postgres admitting plaintext": (
        _edit("timescaledb", lambda s, f: f.update({"/opt/primespark/timescaledb/pg_hba.conf":
                                                     "host all all 0.0.0.0/0 scram-sha-256\n"})),
        "timescaledb", "admits plaintext from 0.0.0.0/0"),
    "redis on its plain port": (_edit("redis", _drop_flag("--port 0")), "redis", "--port 0"),
    "kafka with a plaintext listener": (
        _edit("kafka", lambda s, f: f.update({"/opt/primespark/kafka/server.properties": f[
            "/opt/primespark/kafka/server.properties"].replace("SSL:SSL", "SSL:PLAINTEXT")})),
        "kafka", "is PLAINTEXT, not SSL"),
    "mlflow without a certificate": (_edit("mlflow", _drop_flag("--certfile=")), "mlflow", "--certfile"),
    "grafana over http": (_edit("grafana", lambda s, f: s["environment"].pop("GF_SERVER_PROTOCOL")), "grafana",
                          "GF_SERVER_PROTOCOL"),
    "prometheus without its web config": (_edit("prometheus", lambda s, f: s["command"].pop()), "prometheus",
                                          "--web.config.file"),
    "prefect without tls": (_edit("prefect", lambda s, f: s["command"].remove("--tls")), "prefect", "--tls"),
    "api without its contract": (_edit("api", lambda s, f: s["environment"].pop("PRIMESPARK_TLS_CERT")), "api",
                                 "PRIMESPARK_TLS_CERT"),
    "no certificate folder": (_edit("alertmanager", lambda s, f: s["volumes"].pop()), "alertmanager",
                              "certificate folder"),
    "an unknown kind": (_edit("redis", lambda s, f: s.pop("labels")), "redis", "cannot judge"),
}


def test_no_plaintext_listeners_passes_the_fleets_seeds():
    from primespark.fleet import load_fleet

    assert check_stack(rules.no_plaintext_listeners, _seeds(load_fleet("homelab"))) == []


@pytest.mark.parametrize("case", sorted(PLAINTEXT_FIXTURES))
def test_no_plaintext_listeners_names_the_service_and_why(case):
    from primespark.fleet import load_fleet

    mutate, service, why = PLAINTEXT_FIXTURES[case]
    [message] = check_stack(rules.no_plaintext_listeners, _seeds(load_fleet("homelab"), mutate))
    assert f"service {service} may answer in plaintext" in message and why in message


def test_a_fleet_without_a_ca_fails_no_plaintext_listeners():
    from primespark.fleet import load_fleet

    fleet = load_fleet(Path(__file__).parents[1] / "fixtures" / "fleet" / "valid" / "mini-full.yaml")
    found = check_stack(rules.no_plaintext_listeners, _seeds(fleet))
    assert {m.split(":")[1].strip() for m in found} == {f"service {n} may answer in plaintext beyond loopback"
                                                         for n in fleet.services}
    assert all("secrets.backend: vault" in m for m in found)


@pytest.mark.parametrize("env", ["homelab", "lab"])
def test_the_real_program_passes_every_policy(env, tmp_path, monkeypatch):
    from primespark.cloud.plan import plan
    from primespark.settings import get_settings

    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        result = plan(env)
    finally:
        get_settings.cache_clear()
    assert result.violations == []
    assert len(rules.POLICIES) == 6
