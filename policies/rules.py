"""The CrossGuard policies of Prime Spark. Plain functions over resource props (camelCase wire names), so
`spark plan` and the tests run them directly and `pulumi preview --policy-pack policies` runs them for real."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

import yaml
from pulumi_policy import (
    EnforcementLevel,
    PolicyResource,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)

DOMAIN = "libvirt:index/domain:Domain"
VOLUME = "libvirt:index/volume:Volume"
CLOUD_INIT = "libvirt:index/cloudInitDisk:CloudInitDisk"
KVM_HOST = "primespark:cloud:KvmHost"
VM = "primespark:cloud:VirtualMachine"
VAULT_SECRETS = "pulumi-python:dynamic/vault:Secrets"
MESH = "primespark:cloud:WireGuardMesh"
STACK = "pulumi:pulumi:Stack"
GIB = 1024**3
_YAML = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: user-data is long
PUBLIC_PURPOSES = ("ssh", "wireguard")
SHA256_FILE = re.compile(r"(^|/)[0-9a-f]{64}\.(qcow2|img|raw)$")
SECRET_PATTERNS = (  # (what to call it, pattern); messages name the kind, never the matched text
    ("a private key block", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
    ("a password or token assignment",
     re.compile(r"(?i)\b(password|passwd|secret[_-]?key|api[_-]?key|secret[_-]?id|token)\b\s*[:=]\s*['\"]?"
                r"(?![$<{(])[^\s'\"]{8,}")),
    ("a WireGuard private key", re.compile(r"(?m)^\s*PrivateKey\s*=\s*[A-Za-z0-9+/]{42,43}=")),
)


def _labels(props: Mapping[str, Any]) -> dict[str, str]:
    try:
        return dict(json.loads(props.get("description") or "{}").get("primespark", {}).get("labels", {}))
    except (ValueError, AttributeError):
        return {}


def vm_backup_and_autostart(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    if args.resource_type != DOMAIN:
        return
    labels = _labels(args.props)
    if not labels.get("backup"):
        report_violation(f"VM {args.name} has no `backup` label: set labels.backup in the fleet "
                         "(e.g. daily, or none to say so explicitly)", None)
    if args.props.get("autostart") is not True:
        report_violation(f"VM {args.name} does not autostart: it stays down after the KVM host reboots", None)
    if args.props.get("qemuAgent") is not True:
        report_violation(f"VM {args.name} runs without the QEMU guest agent (no clean shutdown, no address report)",
                         None)


def base_image_pinned(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    if args.resource_type != VOLUME or not args.props.get("source"):
        return
    source = str(args.props["source"])
    if not SHA256_FILE.search(source):
        report_violation(f"base image {args.name} comes from {source}, which is not pinned by checksum: the "
                         "source must be the verified file named by its sha256 (`spark up` downloads it)", None)


def _ancestor(resource: PolicyResource, type_: str) -> PolicyResource | None:
    current = resource.parent
    while current is not None:
        if current.resource_type == type_:
            return current
        current = current.parent
    return None


def kvm_capacity(args: StackValidationArgs, report_violation: ReportViolation) -> None:
    used: dict[str, dict[str, float]] = {}
    hosts = {r.urn: r for r in args.resources if r.resource_type == KVM_HOST}
    for resource in args.resources:
        host = _ancestor(resource, KVM_HOST)
        if host is None:
            continue
        totals = used.setdefault(host.urn, {"cpus": 0, "memoryMb": 0, "diskGb": 0})
        if resource.resource_type == DOMAIN:
            totals["cpus"] += float(resource.props.get("vcpu") or 0)
            totals["memoryMb"] += float(resource.props.get("memory") or 0)
        elif resource.resource_type == VOLUME and resource.props.get("baseVolumeId") is not None:
            totals["diskGb"] += float(resource.props.get("size") or 0) / GIB
    for urn, totals in used.items():
        host = hosts[urn]
        for field, unit in (("cpus", "vCPUs"), ("memoryMb", "MiB"), ("diskGb", "GB")):
            have = float(host.props.get(field) or 0)
            if totals[field] > have:
                report_violation(f"KVM host {host.name} is over-committed: its VMs need {totals[field]:g} {unit}, "
                                 f"it has {have:g} {unit}; grow the host or move a VM in the fleet", urn)


def _strings(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if key != "__provider":
                yield from _strings(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _strings(item, f"{path}[{i}]")


def generated_secrets(resources: list[PolicyResource]) -> set[str]:
    """Values the program generated as secrets: Vault service secrets and WireGuard private keys."""
    found: set[str] = set()
    for resource in resources:
        if resource.resource_type == VAULT_SECRETS:
            found |= {v for _, v in _strings(resource.props.get("values") or {})}
        elif resource.resource_type == MESH:
            found |= {v for _, v in _strings(resource.props.get("private_keys") or {})}
    return {v for v in found if len(v) >= 8}


def no_plaintext_secrets(args: StackValidationArgs, report_violation: ReportViolation) -> None:
    secrets = generated_secrets(list(args.resources))
    # One alternation for all secrets: a scan per string instead of one per secret and string.
    any_secret = re.compile("|".join(re.escape(s) for s in sorted(secrets, key=len, reverse=True))) if secrets \
        else None
    for resource in args.resources:
        if resource.resource_type in (VAULT_SECRETS, MESH):
            continue  # where the secrets live, as Pulumi secrets
        for path, text in _strings(resource.props):
            if any_secret is not None and any_secret.search(text):
                where = "a stack output" if resource.resource_type == STACK else f"{resource.name} ({path})"
                report_violation(f"a generated secret appears in plain text in {where}: deliver it from Vault "
                                 "at run time instead", resource.urn)
                continue
            for kind, pattern in SECRET_PATTERNS:
                if pattern.search(text):
                    report_violation(f"{resource.name} ({path}) holds what looks like a secret ({kind}): "
                                     "keep secrets in Vault", resource.urn)
                    break


def _written_files(user_data: str) -> dict[str, str]:
    """Path -> content of the files a cloud-init user-data writes (write_files)."""
    try:
        document = yaml.load(user_data, Loader=_YAML) or {}  # noqa: S506 a safe loader (CSafeLoader or SafeLoader)
    except yaml.YAMLError:
        return {}
    items = document.get("write_files") if isinstance(document, dict) else None
    return {str(i.get("path", "")): str(i.get("content") or "") for i in items or [] if isinstance(i, dict)}


def _compose_services(files: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for path, content in files.items():
        if path.endswith("compose.yaml"):
            try:
                compose = yaml.load(content, Loader=_YAML) or {}  # noqa: S506 a safe loader (CSafeLoader or SafeLoader)
            except yaml.YAMLError:
                continue
            found |= {str(n): s for n, s in (compose.get("services") or {}).items() if isinstance(s, dict)}
    return found


def _compose_ports(user_data: str) -> Iterator[str]:
    for service in _compose_services(_written_files(user_data)).values():
        yield from (str(p) for p in service.get("ports") or [])


def public_exposure(args: StackValidationArgs, report_violation: ReportViolation) -> None:
    seeds: dict[str, list[PolicyResource]] = {}
    for r in args.resources:
        if r.resource_type == CLOUD_INIT and r.parent is not None:
            seeds.setdefault(r.parent.urn, []).append(r)
    for vm in (r for r in args.resources if r.resource_type == VM):
        for rule in vm.props.get("exposure") or []:
            if rule.get("network") == "public" and not str(rule.get("purpose", "")).startswith(PUBLIC_PURPOSES):
                report_violation(f"VM {vm.name} admits {rule.get('purpose')} ({rule.get('protocol')}/"
                                 f"{rule.get('port'):g}) from the public network: only SSH and WireGuard may be "
                                 "public; reach services over the LAN or the mesh", vm.urn)
        lan_address = vm.props.get("address")
        for disk in seeds.get(vm.urn, []):
            for port in _compose_ports(str(disk.props.get("userData") or "")):
                bind = port.rsplit(":", 2)[0] if port.count(":") == 2 else ""
                if bind != lan_address:
                    report_violation(f"VM {vm.name} publishes container port {port!r} beyond its LAN address "
                                     f"{lan_address}: bind published ports to the LAN address", vm.urn)


KIND_LABEL = "io.primespark.kind"  # primespark.cloud.service_tls.KIND_LABEL
TLS_FOLDER = "/etc/ssl/primespark"
LOOPBACK = ("127.0.0.1/32", "::1/128", "localhost", "127.0.0.1", "::1", "samehost")


def _mounted(service: Mapping[str, Any], files: Mapping[str, str], inside: str) -> str | None:
    """The content of the written file that the container sees at `inside`, if a volume mounts one there."""
    for volume in service.get("volumes") or []:
        parts = str(volume).split(":")
        if len(parts) >= 2 and parts[1] == inside:
            return files.get(parts[0])
    return None


def _flag(words: list[str], name: str) -> str | None:
    """The value of `name` in a command: `-c name=value` (Postgres), `--name=value` or `--name value`."""
    for i, word in enumerate(words):
        if word.startswith(f"{name}="):
            return word.split("=", 1)[1]
        if word == name and i + 1 < len(words):
            return words[i + 1]
    return None


def _postgres_plaintext(service: Mapping[str, Any], files: Mapping[str, str]) -> str | None:
    words = [str(w) for w in service.get("command") or []]
    if _flag(words, "ssl") != "on":
        return "its command does not set ssl=on"
    hba = _mounted(service, files, _flag(words, "hba_file") or "")
    if hba is None:
        return "its hba_file is not a file the seed writes and mounts"
    for line in hba.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 4 or fields[0] not in ("host", "hostnossl"):
            continue  # local (the socket), hostssl, and hostgssenc lines need no check
        address = fields[3]
        if fields[-1] != "reject" and address not in LOOPBACK:
            return f"its pg_hba.conf admits plaintext from {address} ({fields[0]} without reject)"
    return None


def _kafka_plaintext(service: Mapping[str, Any], files: Mapping[str, str]) -> str | None:
    words = " ".join(str(w) for w in service.get("command") or []).split()
    config_path = next((w for w in words if w.endswith("server.properties")), "")
    text = _mounted(service, files, config_path)
    if text is None:
        return "it does not start from a server.properties the seed writes and mounts"
    props = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    protocols = dict(p.split(":", 1) for p in props.get("listener.security.protocol.map", "").split(",") if ":" in p)
    for listener in filter(None, props.get("listeners", "").split(",")):
        name, _, where = listener.partition("://")
        host = where.rpartition(":")[0]
        if host not in LOOPBACK and protocols.get(name, name) not in ("SSL", "SASL_SSL"):
            return f"its listener {listener} is {protocols.get(name, name)}, not SSL"
    return None


def _plaintext_reason(kind: str, service: Mapping[str, Any], files: Mapping[str, str]) -> str | None:
    """Why the service's published listener may answer plaintext, or None when it serves only TLS. Each kind is
    judged by its own server's settings in the seed, not by what the generator meant."""
    words = [str(w) for w in service.get("command") or []]
    line = " ".join(words)
    environment = service.get("environment") or {}
    if kind == "timescaledb":
        return _postgres_plaintext(service, files)
    if kind == "kafka":
        return _kafka_plaintext(service, files)
    if kind == "redis":
        return None if "--port 0" in line and "--tls-port" in line else "it does not set --port 0 and --tls-port"
    if kind == "mlflow":
        return None if "--certfile=" in line and "--keyfile=" in line else "its gunicorn has no --certfile/--keyfile"
    if kind == "grafana":
        return None if environment.get("GF_SERVER_PROTOCOL") in ("https", "h2") else "GF_SERVER_PROTOCOL is not https"
    if kind in ("prometheus", "alertmanager"):
        return None if any(w.startswith("--web.config.file=") for w in words) else "it has no --web.config.file"
    if kind == "prefect":
        return None if _flag(words, "--tls") else "its server has no --tls"
    if kind == "api":
        return None if environment.get("PRIMESPARK_TLS_CERT") else "PRIMESPARK_TLS_CERT (its TLS contract) is unset"
    return f"it is of kind {kind or '(no io.primespark.kind label)'}, which this policy cannot judge"


def no_plaintext_listeners(args: StackValidationArgs, report_violation: ReportViolation) -> None:
    for disk in (r for r in args.resources if r.resource_type == CLOUD_INIT):
        files = _written_files(str(disk.props.get("userData") or ""))
        for name, service in sorted(_compose_services(files).items()):
            if not service.get("ports"):
                continue  # publishes nothing: reachable from its own compose network only
            kind = str((service.get("labels") or {}).get(KIND_LABEL, ""))
            why = _plaintext_reason(kind, service, files)
            if why is None and not any(str(v).startswith(f"{TLS_FOLDER}:") for v in service.get("volumes") or []):
                why = f"it does not mount the host's certificate folder {TLS_FOLDER}"
            if why is not None:
                report_violation(f"{disk.name}: service {name} may answer in plaintext beyond loopback: {why}. "
                                 "Give the fleet its CA (secrets.backend: vault) so every service serves TLS "
                                 "(docs/tls.md)", disk.urn)


POLICIES = [
    ResourceValidationPolicy(
        name="vm-backup-label-and-autostart",
        description="Every VM carries a backup label, autostarts and runs the QEMU guest agent.",
        validate=vm_backup_and_autostart, enforcement_level=EnforcementLevel.MANDATORY),
    ResourceValidationPolicy(
        name="base-image-pinned",
        description="Base images come from a file verified against the fleet's sha256, not a moving URL.",
        validate=base_image_pinned, enforcement_level=EnforcementLevel.MANDATORY),
    StackValidationPolicy(
        name="kvm-capacity",
        description="The VMs on a KVM host fit in its CPUs, memory and disk.",
        validate=kvm_capacity, enforcement_level=EnforcementLevel.MANDATORY),
    StackValidationPolicy(
        name="no-plaintext-secrets",
        description="No generated secret (or secret-looking value) in a plain output, cloud-init or any input.",
        validate=no_plaintext_secrets, enforcement_level=EnforcementLevel.MANDATORY),
    StackValidationPolicy(
        name="public-exposure",
        description="Only WireGuard and SSH are reachable from public networks.",
        validate=public_exposure, enforcement_level=EnforcementLevel.MANDATORY),
    StackValidationPolicy(
        name="no-plaintext-listeners",
        description="Every service a VM publishes serves only TLS with its host's certificate; plaintext stays on "
        "loopback.",
        validate=no_plaintext_listeners, enforcement_level=EnforcementLevel.MANDATORY),
]
