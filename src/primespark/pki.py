"""The fleet certificate authority on the PKI engine of Vault/OpenBao: one code path for production (the Pulumi
`FleetPki` component, stacks/pki.py) and the lab (`spark lab up`), as `cloud/vault_spec.py` is for the KV secrets.

`pki_plan` is pure data from the fleet: the fleet's PKI mount, its root CA, and per host a PKI role that issues only
for the host's names (`host`, `host.<domain>`) and its LAN and mesh addresses, for `tls.lifetime_hours`; an ACL
policy (policies/vault/tls-host.hcl.j2) that may use that one role; an AppRole with that policy for the host's
renewal. `apply_pki` makes a server hold the plan with hvac: idempotent, and it never rotates the CA (a root is
generated only when the mount has no issuer; a second one at once fails on the issuer's name). `issue` and
`renew_due` are what a host's renewal runs: a certificate is due at two thirds of its life (step-ca's rule).

Names: the mount is `primespark-pki/<fleet>` (one CA per fleet; one glob for the deployer), a host's PKI role
is the host's name inside it, its policy and AppRole `primespark-<fleet>-tls.<host>` (the dot keeps them apart
from the service AppRoles `primespark-<fleet>-<host>`: no host or fleet name has one).
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path
from typing import TYPE_CHECKING, Any

from primespark import tls_renewer
from primespark.errors import UserError
from primespark.fleet.model import Fleet
from primespark.tls_renewer import CertInfo

if TYPE_CHECKING:
    from cryptography import x509

    from primespark.secrets import VaultSecretStore

CA_TTL_HOURS = 10 * 8_760  # the root outlives any fleet's hosts; rotating it is a deliberate act, not an apply
CA_ISSUER = "fleet-ca"  # a second root generated at once fails on this name: two applies never make two CAs
KEY = {"key_type": "ec", "key_bits": 256}  # host keys: P-256, cheap on a Pi
TOKEN = {"token_ttl": 900, "token_max_ttl": 3600, "secret_id_ttl": 0}  # a renewal takes seconds
# Where a host keeps its certificate, key and the fleet CA (TlsFiles): not under /etc/primespark, which the worker
# role keeps 0700. And the group of the service accounts that serve with them: several services under their own
# users (Debian's prometheus, …) read one key, 0640.
HOST_TLS_FOLDER = Path("/etc/ssl/primespark")
TLS_GROUP = "primespark-tls"
# Its number, the same on every host: containers join it by number (compose `group_add`), and a number a host chose
# itself would differ from the one in the compose file. Outside Debian's system (100-999) and dynamic (61184-65519)
# ranges, and far above the first users' groups (1000…).
TLS_GID = 8443
# The web configuration (`--web.config.file`) every Prometheus-family server on a host serves TLS with (the tls role).
WEB_CONFIG = HOST_TLS_FOLDER / "web.yml"


def serves_tls(fleet: Fleet) -> bool:
    """Whether the fleet's endpoints serve TLS: its CA lives on the PKI engine of its Vault/OpenBao, so a fleet
    with the local secret store has none, and its endpoints stay plain HTTP (docs/tls.md)."""
    from primespark.fleet.model import SecretBackend

    return fleet.secrets.backend is SecretBackend.vault


def native_monitoring(fleet: Fleet) -> bool:
    """Whether Prometheus and Alertmanager run from Debian's packages on their host (the monitoring_server role), as
    in the lab, whose VMs have no compose stack; elsewhere the compose stack's containers run them."""
    return fleet.lab is not None


def client_context(ca_pem: str) -> ssl.SSLContext:
    """A client's TLS context that trusts the fleet CA only (not the system's), checks the name or address it
    dialled against the certificate, and speaks TLS 1.2 at least: what every client of a fleet endpoint uses."""
    context = ssl.create_default_context(cadata=ca_pem)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def mount_of(fleet_name: str) -> str:
    return f"primespark-pki/{fleet_name}"


def policy_name(fleet_name: str, host: str) -> str:
    return f"primespark-{fleet_name}-tls.{host}"


@dataclass(frozen=True)
class HostTls:
    """What one host may have certified, and the policy that lets it."""

    host: str
    role: str  # the PKI role in the fleet's mount
    names: tuple[str, ...]  # DNS SANs; the first is the common name
    addresses: tuple[str, ...]  # IP SANs: the LAN address, then the mesh addresses
    policy_name: str  # the ACL policy and the AppRole
    policy: str  # its HCL

    def role_params(self, lifetime_hours: int) -> dict[str, Any]:
        """The PKI role: exactly these names and addresses (OpenBao's allowed_ip_sans_cidr), this lifetime."""
        seconds = lifetime_hours * 3600
        return {"allowed_domains": list(self.names), "allow_bare_domains": True, "allow_subdomains": False,
                "allow_glob_domains": False, "allow_wildcard_certificates": False, "allow_localhost": False,
                "allow_any_name": False, "enforce_hostnames": True, "allow_ip_sans": True,
                "allowed_ip_sans_cidr": [f"{a}/32" for a in self.addresses], "allowed_uri_sans": [],
                "use_csr_sans": False, "use_csr_common_name": False, "server_flag": True, "client_flag": True,
                "ttl": seconds, "max_ttl": seconds, **KEY}


@dataclass(frozen=True)
class PkiPlan:
    fleet: str
    mount: str
    ca_common_name: str
    lifetime_hours: int
    hosts: dict[str, HostTls] = field(default_factory=dict)

    def props(self) -> dict[str, Any]:
        """JSON-friendly (a Pulumi resource's inputs)."""
        return asdict(self)

    @classmethod
    def from_props(cls, props: Mapping[str, Any]) -> PkiPlan:
        hosts = {name: HostTls(**{**h, "names": tuple(h["names"]), "addresses": tuple(h["addresses"])})
                 for name, h in props["hosts"].items()}
        return cls(props["fleet"], props["mount"], props["ca_common_name"], int(props["lifetime_hours"]), hosts)


def host_names(fleet: Fleet, host: str) -> tuple[str, ...]:
    return (host, f"{host}.{fleet.domain}")


def host_addresses(fleet: Fleet, host: str, overlays: Mapping[str, Mapping[str, IPv4Address]]) -> tuple[str, ...]:
    """The LAN address, then the host's address in each mesh it is in (sorted by mesh)."""
    mesh = [str(overlays[m][host]) for m in sorted(overlays) if host in overlays[m]]
    return tuple(dict.fromkeys([str(fleet.hosts[host].address), *mesh]))


def issue_params(names: tuple[str, ...], addresses: tuple[str, ...]) -> dict[str, str]:
    """What a host's issue request sends besides the lifetime: the first name as the CN, the others and the
    addresses as comma lists (the form the host's policy allows, value for value)."""
    return {"common_name": names[0], "alt_names": ",".join(names[1:]), "ip_sans": ",".join(addresses),
            "private_key_format": tls_renewer.PRIVATE_KEY_FORMAT}


def tls_policy(fleet: Fleet, host: str, names: tuple[str, ...], addresses: tuple[str, ...],
               root: Path | None = None) -> str:
    from primespark.cloud.vault_spec import hcl_templates, policies_dir

    sent = issue_params(names, addresses)
    # ACL parameter values match whole strings: the full lists as sent, or any one name or address of them.
    alt = list(dict.fromkeys([sent["alt_names"], *names]))
    ips = list(dict.fromkeys([sent["ip_sans"], *addresses]))
    template = hcl_templates(root or policies_dir()).get_template("tls-host.hcl.j2")
    return template.render(fleet=fleet.name, host=host, mount=mount_of(fleet.name), role=host, names=list(names),
                           alt_names=alt, ip_sans=ips, policy=policy_name(fleet.name, host))


def pki_plan(fleet: Fleet, overlays: Mapping[str, Mapping[str, IPv4Address]], root: Path | None = None) -> PkiPlan:
    """The fleet's PKI as data. `overlays`: each mesh's addresses (`mesh_overlays`, or the Pulumi mesh component's)."""
    hosts = {}
    for host in sorted(fleet.hosts):
        names, addresses = host_names(fleet, host), host_addresses(fleet, host, overlays)
        hosts[host] = HostTls(host, host, names, addresses, policy_name(fleet.name, host),
                              tls_policy(fleet, host, names, addresses, root))
    return PkiPlan(fleet.name, mount_of(fleet.name), f"Prime Spark {fleet.name} fleet CA",
                   fleet.tls.lifetime_hours, hosts)


def mesh_overlays(fleet: Fleet, state_dir: Path) -> dict[str, dict[str, IPv4Address]]:
    """Each mesh's addresses: its saved plan's, else the allocation `spark mesh plan` makes first (the same
    function on no previous plan), so a lab brought up before its mesh still certifies the right addresses."""
    from primespark.mesh.plan import allocate
    from primespark.monitoring.files import overlays_of

    saved = overlays_of(fleet, state_dir)
    return {mesh: saved.get(mesh) or allocate(fleet.mesh_members(mesh), spec.overlay, None)[0]
            for mesh, spec in sorted(fleet.meshes.items())}


# --- applying a plan --------------------------------------------------------------------------------------------


@dataclass
class PkiApplied:
    """What `apply_pki` changed; nothing on a second run."""

    mount_enabled: bool = False
    ca_generated: bool = False
    roles: list[str] = field(default_factory=list)
    policies: list[str] = field(default_factory=list)
    approles: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.mount_enabled or self.ca_generated or self.roles or self.policies or self.approles
                     or self.removed)


def _missing(read: Any) -> Any:
    """The answer of `read()`, or None where the server has no such thing."""
    import hvac.exceptions

    try:
        return read()
    except hvac.exceptions.InvalidPath:
        return None


def _listed(answer: Any) -> list[str]:
    return list(((answer or {}).get("data") or {}).get("keys") or [])


def _same(wanted: Mapping[str, Any], found: Mapping[str, Any]) -> bool:
    def norm(value: Any) -> Any:
        return sorted(value) if isinstance(value, list | tuple) else value

    # A field the server does not return is one it does not know (HashiCorp Vault has no allowed_ip_sans_cidr):
    # writing it again would change nothing, so it is no difference.
    return all(k not in found or norm(found[k]) == norm(v) for k, v in wanted.items())


def _ensure_mount(client: Any, plan: PkiPlan, done: PkiApplied) -> None:
    import hvac.exceptions

    found = client.sys.list_mounted_secrets_engines()["data"].get(f"{plan.mount}/")
    if found is None:
        try:
            client.sys.enable_secrets_engine("pki", path=plan.mount, description=plan.ca_common_name,
                                             config={"max_lease_ttl": f"{CA_TTL_HOURS}h"})
            done.mount_enabled = True
            return
        except hvac.exceptions.InvalidRequest as exc:
            if "already in use" not in str(exc):
                raise
        # Another apply enabled it a moment ago: judge what it made.
        found = client.sys.list_mounted_secrets_engines()["data"].get(f"{plan.mount}/") or {}
    if found.get("type") != "pki":
        raise UserError(f"Vault has a {found.get('type')} engine at {plan.mount}/, not the fleet's PKI engine",
                        f"move it away: the fleet CA lives at {plan.mount}/")


def _ensure_ca(client: Any, plan: PkiPlan, done: PkiApplied) -> None:
    """A root CA only where the mount has no issuer at all: an existing CA is never replaced."""
    import hvac.exceptions

    if _listed(_missing(lambda: client.list(f"{plan.mount}/issuers"))):
        return
    try:
        client.secrets.pki.generate_root(
            type="internal", common_name=plan.ca_common_name, mount_point=plan.mount,
            extra_params={"ttl": f"{CA_TTL_HOURS}h", "key_type": "ec", "key_bits": 384, "issuer_name": CA_ISSUER})
    except hvac.exceptions.InvalidRequest as exc:
        if "already in use" not in str(exc):
            raise
        return  # another apply made it a moment ago: theirs stands
    done.ca_generated = True


def _ensure_host(client: Any, plan: PkiPlan, tls: HostTls, done: PkiApplied) -> None:
    wanted = tls.role_params(plan.lifetime_hours)
    found = _missing(lambda: client.secrets.pki.read_role(tls.role, mount_point=plan.mount))
    if found is None or not _same(wanted, found["data"]):
        client.secrets.pki.create_or_update_role(tls.role, extra_params=wanted, mount_point=plan.mount)
        done.roles.append(tls.role)
    policy = _missing(lambda: client.sys.read_acl_policy(tls.policy_name))
    if policy is None or policy["data"]["policy"] != tls.policy:
        client.sys.create_or_update_acl_policy(name=tls.policy_name, policy=tls.policy)
        done.policies.append(tls.policy_name)
    approle = {"token_policies": [tls.policy_name], **TOKEN}
    found = _missing(lambda: client.auth.approle.read_role(tls.policy_name))
    role_id = _missing(lambda: client.auth.approle.read_role_id(tls.policy_name))
    if found is None or not _same(approle, found["data"]) or (role_id or {}).get("data", {}).get("role_id") != \
            tls.policy_name:
        client.auth.approle.create_or_update_approle(role_name=tls.policy_name, **approle)
        client.auth.approle.update_role_id(role_name=tls.policy_name, role_id=tls.policy_name)  # not a secret
        done.approles.append(tls.policy_name)


def _remove_leftovers(client: Any, plan: PkiPlan, done: PkiApplied) -> None:
    """Hosts that left the fleet lose their role, policy and AppRole (the mount and the prefix are the fleet's)."""
    import hvac.exceptions

    for role in _listed(_missing(lambda: client.secrets.pki.list_roles(mount_point=plan.mount))):
        if role not in plan.hosts:
            client.secrets.pki.delete_role(role, mount_point=plan.mount)
            done.removed.append(f"{plan.mount}/roles/{role}")
    prefix = policy_name(plan.fleet, "")
    wanted = {h.policy_name for h in plan.hosts.values()}
    for name in _listed(_missing(client.auth.approle.list_roles)):
        if name.startswith(prefix) and name not in wanted:
            with contextlib.suppress(hvac.exceptions.InvalidPath):
                client.auth.approle.delete_role(name)
            done.removed.append(f"auth/approle/role/{name}")
    for name in _listed(client.sys.list_acl_policies()):
        if name.startswith(prefix) and name not in wanted:
            client.sys.delete_acl_policy(name)
            done.removed.append(f"sys/policies/acl/{name}")


def apply_pki(client: Any, plan: PkiPlan) -> PkiApplied:
    """Make the server hold `plan`: the mount, the CA (made once), each host's role, policy and AppRole; what the
    plan no longer has goes. Writes only what differs, so a second run changes nothing; two at once make one CA."""
    import hvac.exceptions

    done = PkiApplied()
    _ensure_mount(client, plan, done)
    _ensure_ca(client, plan, done)
    if "approle/" not in client.sys.list_auth_methods()["data"]:
        try:
            client.sys.enable_auth_method(method_type="approle")
        except hvac.exceptions.InvalidRequest as exc:
            if "already in use" not in str(exc):  # else another apply enabled it a moment ago
                raise
    for tls in plan.hosts.values():
        for attempt in range(5):
            try:
                _ensure_host(client, plan, tls, done)
                break
            except hvac.exceptions.InternalServerError as exc:
                # OpenBao refuses one of two writes of the same thing at once; each step is idempotent: again.
                if "transaction commit failed" not in str(exc) or attempt == 4:
                    raise
    _remove_leftovers(client, plan, done)
    return done


def delete_pki(client: Any, plan: PkiPlan) -> None:
    """Remove the hosts' roles, policies and AppRoles; the mount and its CA stay (a CA is never thrown away by a
    deploy: certificates it issued may still be in use; `bao secrets disable` is the deliberate act)."""
    import hvac.exceptions

    for tls in plan.hosts.values():
        with contextlib.suppress(hvac.exceptions.InvalidPath):  # already gone: deleting twice is fine
            client.secrets.pki.delete_role(tls.role, mount_point=plan.mount)
        with contextlib.suppress(hvac.exceptions.InvalidPath):
            client.auth.approle.delete_role(tls.policy_name)
        with contextlib.suppress(hvac.exceptions.InvalidPath):
            client.sys.delete_acl_policy(tls.policy_name)


def ca_certificate(client: Any, mount: str) -> str:
    """The fleet CA's certificate (PEM); '' if the mount has none yet."""
    return str(client.secrets.pki.read_ca_certificate(mount_point=mount) or "")


# --- issuing and renewing ---------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Issued:
    """A host's certificate. `private_key` is a secret: never logged (no repr), written 0600 only."""

    certificate: str
    private_key: str
    ca: str
    serial: str


def issue(client: Any, plan: PkiPlan, host: str) -> Issued:
    """A certificate for every name and address of `host`, for the fleet's lifetime, from its own PKI role (a token
    with only the host's policy suffices)."""
    tls = plan.hosts[host]
    params = {**issue_params(tls.names, tls.addresses), "ttl": f"{plan.lifetime_hours}h"}
    data = client.write_data(f"{plan.mount}/issue/{tls.role}", data=params)["data"]
    return Issued(data["certificate"], data["private_key"], data["issuing_ca"], data["serial_number"])


def _info(cert: x509.Certificate) -> CertInfo:
    """A certificate as the renewal rules judge it (primespark.tls_renewer, which the hosts run as well)."""
    from cryptography import x509

    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = frozenset(sans.get_values_for_type(x509.DNSName))
        addresses = frozenset(str(a) for a in sans.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        names = addresses = frozenset()
    return CertInfo(cert.not_valid_before_utc, cert.not_valid_after_utc, names, addresses)


def renew_due(cert: x509.Certificate, now: datetime) -> bool:
    """Due from two thirds of its life on (and when expired, or not yet valid: a clock or a CA that moved)."""
    return tls_renewer.due(cert.not_valid_before_utc, cert.not_valid_after_utc, now)


def renew_at(cert: x509.Certificate) -> datetime:
    return tls_renewer.renew_at(cert.not_valid_before_utc, cert.not_valid_after_utc)


def covers(cert: x509.Certificate, tls: HostTls) -> bool:
    """Whether the certificate names exactly the host's names and addresses (a host that got a new address needs
    a new one, whatever its age)."""
    info = _info(cert)
    return info.names == set(tls.names) and info.addresses == set(tls.addresses)


@dataclass(frozen=True)
class TlsFiles:
    """Where a host keeps its certificate: cert.pem and ca.pem 0644, key.pem 0600, and served.pem 0600 (the key and
    the certificate in one file, for servers), in a 0755 folder."""

    folder: Path

    @property
    def cert(self) -> Path:
        return self.folder / "cert.pem"

    @property
    def key(self) -> Path:
        return self.folder / "key.pem"

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def served(self) -> Path:
        """The key and its certificate in one file, which a server names as both (Go's key pair loader skips the
        other block): one rename replaces both, so a server that reads them at each connection (node exporter) never
        pairs a new key with the old certificate during a renewal."""
        return self.folder / "served.pem"

    def load(self) -> x509.Certificate | None:
        from cryptography import x509

        try:
            return x509.load_pem_x509_certificate(self.cert.read_bytes())
        except (FileNotFoundError, ValueError):
            return None

    def write(self, issued: Issued) -> None:
        """The key first, then the certificate: a reader between the two renames sees a new key with the old
        certificate only for a moment, and services reload after both (the host's timer; not built yet)."""
        from primespark.secrets import atomic_write

        self.folder.mkdir(parents=True, exist_ok=True, mode=0o755)
        atomic_write(self.key, issued.private_key + "\n", 0o600)
        atomic_write(self.served, issued.private_key + "\n" + issued.certificate + "\n", 0o600)
        atomic_write(self.ca, issued.ca + "\n", 0o644)
        atomic_write(self.cert, issued.certificate + "\n", 0o644)


@dataclass(frozen=True)
class Renewal:
    host: str
    renewed: bool
    reason: str  # why it was (or was not) renewed
    not_after: datetime
    renew_at: datetime


def renewal_reason(current: x509.Certificate | None, tls: HostTls, now: datetime, force: bool = False) -> str | None:
    """Why a new certificate is needed now, or None: none yet, forced, names or addresses changed, or due."""
    return tls_renewer.reason(None if current is None else _info(current), tls.names, tls.addresses, now, force)


def renew(client: Any, plan: PkiPlan, host: str, files: TlsFiles, now: datetime | None = None,
          force: bool = False, dry_run: bool = False) -> Renewal:
    """Issue a new certificate for `host` into `files` when due (two thirds of its life), when it no longer covers
    the host's names and addresses, or when there is none; else leave it. `dry_run` only says which."""
    now = now or datetime.now(UTC)
    current = files.load()
    reason = renewal_reason(current, plan.hosts[host], now, force)
    if reason is None or dry_run:
        until = current.not_valid_after_utc if current is not None else now
        due = renew_at(current) if current is not None else now
        return Renewal(host, False, reason or "not due", until, due)
    files.write(issue(client, plan, host))
    fresh = files.load()
    assert fresh is not None  # just written
    return Renewal(host, True, reason, fresh.not_valid_after_utc, renew_at(fresh))


def served_plan(client: Any, fleet_name: str, host: str) -> PkiPlan:
    """A plan of one host as the server holds it: its PKI role's names, addresses and lifetime (the host's policy
    may read its own role). A host renews from this, not from a fleet file and mesh plan of its own, so it asks
    for exactly what the deployer's last apply allowed."""
    mount = mount_of(fleet_name)
    policy = policy_name(fleet_name, host)
    role = tls_renewer.role_of(client.secrets.pki.read_role(host, mount_point=mount)["data"], host,
                               lambda: client.read(f"sys/policies/acl/{policy}")["data"]["policy"])
    tls = HostTls(host, host, role.names, role.addresses, policy, "")
    return PkiPlan(fleet_name, mount, "", max(1, role.lifetime_seconds // 3600), {host: tls})


def lifetime(cert: x509.Certificate) -> timedelta:
    return cert.not_valid_after_utc - cert.not_valid_before_utc


# --- the controller's copy of the fleet CA ---------------------------------------------------------------------

# In the environment's state folder: the fleet CA as the controller's clients read it from a file (Prefect's client
# takes a file: PREFECT_API_SSL_CERT_FILE). Public; refreshed from Vault/OpenBao whenever it is read there.
CONTROLLER_CA = "fleet-ca.pem"


def context_vault(ctx: Any) -> VaultSecretStore:
    """The environment's Vault store, whose hvac client reads the CA and asks for certificates: on a host, its
    AppRole login (SPARK_VAULT_ROLE_ID and SPARK_VAULT_SECRET_ID_FILE, as a worker's); on the controller, the
    deployer's token or the lab's."""
    from primespark.secrets import ReadOnlyStore, VaultSecretStore

    store = ctx.secrets
    inner = store.store if isinstance(store, ReadOnlyStore) else store
    if not isinstance(inner, VaultSecretStore):
        raise UserError(f"the {ctx.env} fleet keeps its secrets in the local store: its CA lives in Vault/OpenBao",
                        "add `secrets: {backend: vault, address: https://<vault>:8200}` to the fleet file")
    return inner


def fleet_ca_pem(ctx: Any) -> str:
    """The fleet CA's certificate, read from the environment's Vault/OpenBao. Fails closed: a store that does not
    answer, or a fleet whose CA is not made yet, is one UserError saying so."""
    import hvac.exceptions
    import requests

    store = context_vault(ctx)
    try:
        pem = ca_certificate(store.client, mount_of(ctx.fleet.name))
    except hvac.exceptions.InvalidPath:
        pem = ""
    except (hvac.exceptions.VaultDown, requests.exceptions.RequestException) as exc:
        raise store.unavailable(exc, "reading", "the fleet CA") from None
    if not pem:
        raise UserError(f"the {ctx.fleet.name} fleet has no CA yet, so its TLS endpoints cannot be verified",
                        f"apply the fleet: `spark up` (or `spark lab up --env {ctx.env}`)")
    return pem


def save_fleet_ca(state_dir: Path, pem: str) -> Path:
    """The controller's copy of the fleet CA (CONTROLLER_CA), rewritten only when it differs; its path."""
    from primespark.secrets import atomic_write

    path = state_dir / CONTROLLER_CA
    if not path.is_file() or path.read_text() != pem:
        state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, pem, mode=0o644)
    return path


def fleet_ca_file(ctx: Any) -> Path:
    """The fleet CA read from the store now, saved in the state folder; its path."""
    return save_fleet_ca(ctx.state_dir, fleet_ca_pem(ctx))


# --- a host's own renewal (spark-tls-renew, primespark.tls_renewer) ----------------------------------------------

# Where the tls role installs the host's renewal: its configuration (public), its AppRole secret-id (0600), the
# renewer, and cron's schedule for it.
RENEWER = Path("/usr/local/sbin/spark-tls-renew")
RENEWER_CONFIG = Path(tls_renewer.CONFIG)
RENEWER_SECRET_ID = Path("/etc/spark/tls-renew.secret-id")
# The CA a host verifies its Vault/OpenBao with, where it is not one the system trusts: the lab's OpenBao's
# listener CA (primespark.lab.openbao). Written by the tls role; the renewer and the worker name it.
HOST_VAULT_CA = HOST_TLS_FOLDER / "vault-ca.pem"


def host_vault_ca(ctx: Any) -> str | None:
    """The CA the hosts verify the environment's Vault/OpenBao with, when not the system's: the lab's listener CA."""
    from primespark.fleet.model import VaultAuth

    if ctx.fleet.secrets.auth is not VaultAuth.lab:
        return None
    from primespark.lab.openbao import listener_ca_pem

    return listener_ca_pem(ctx.fleet, ctx.state_dir)


def renewer_secret_id_reference(host: str) -> str:
    return f"local:tls/{host}/renewer-secret-id"


def renewal_material(env: str, host: str) -> dict[str, Any]:
    """What the tls role installs for `host` to renew its own certificate: the renewer's configuration and the
    secret-id of the host's TLS AppRole (private: the tasks using it set no_log). The secret-id is made once in
    the environment's store and registered with the AppRole, so a second run changes nothing."""
    import secrets as pysecrets

    import hvac.exceptions
    import requests

    from primespark.cloud.service_tls import reload_commands
    from primespark.context import FleetContext
    from primespark.fleet.model import VaultAuth
    from primespark.orchestration.vault import registered_secret_id
    from primespark.secrets import ensure_reference

    ctx = FleetContext.load(env)
    if host not in ctx.fleet.hosts:
        raise UserError(f"fleet {ctx.fleet.name} has no host {host!r}", f"use one of: {', '.join(ctx.fleet.hosts)}")
    store = context_vault(ctx)
    client = store.client
    approle = policy_name(ctx.fleet.name, host)
    try:
        secret_id = ensure_reference(renewer_secret_id_reference(host), store, lambda: pysecrets.token_hex(18))
        if not registered_secret_id(client, approle, secret_id):
            client.auth.approle.create_custom_secret_id(role_name=approle, secret_id=secret_id,
                                                        metadata={"host": host, "fleet": ctx.fleet.name})
    except hvac.exceptions.InvalidPath:
        raise UserError(f"the fleet CA has no AppRole for {host}",
                        f"apply the fleet: `spark up` (or `spark lab up --env {env}`)") from None
    except (hvac.exceptions.VaultDown, requests.exceptions.RequestException) as exc:
        raise store.unavailable(exc, "registering", f"{host}'s renewal secret-id") from None
    address = store.addr
    if ctx.fleet.secrets.auth is VaultAuth.lab:  # the lab's OpenBao: at the bridge of the host's LAN, over TLS
        from primespark.lab.openbao import address_for

        address = address_for(ctx.fleet, host)
    vault_ca = host_vault_ca(ctx)
    config = tls_renewer.Config(host=host, vault_addr=address, mount=mount_of(ctx.fleet.name), role_id=approle,
                                secret_id_file=str(RENEWER_SECRET_ID), folder=str(HOST_TLS_FOLDER), group=TLS_GROUP,
                                textfile_dir=ctx.fleet.monitoring.textfile_dir,
                                vault_ca_file=str(HOST_VAULT_CA) if vault_ca else None,
                                reload=tuple(tuple(c) for c in reload_commands(ctx.fleet, host)))
    return {"config": asdict(config), "secret_id": secret_id, "script": tls_renewer.__file__, "vault_ca": vault_ca}
