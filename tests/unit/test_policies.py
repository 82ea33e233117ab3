"""Each CrossGuard policy, called directly as the engine calls it: one passing and one violating case each."""

from __future__ import annotations

import json

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
    assert len(rules.POLICIES) == 5
