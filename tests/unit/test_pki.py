"""The fleet CA (primespark.pki) against a real OpenBao dev server: the plan from the fleet, the apply (twice: no
change, the CA never rotated), a host's AppRole issuing for its own names and addresses and refused for another
host's, the certificate verified against the CA with `cryptography`, renewal at two thirds of a certificate's life,
and the fleet's `tls:` section with located errors.

Each test that applies gets a server of its own (`fresh_vault`): the mount, roles and policies are server-wide.
"""

from __future__ import annotations

import ssl
import stat
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, ip_address
from pathlib import Path

import hvac
import hvac.exceptions
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from primespark.fleet import FleetError, load_fleet, load_text
from primespark.fleet.model import Fleet
from primespark.mesh.plan import allocate
from primespark.pki import (
    PkiPlan,
    TlsFiles,
    apply_pki,
    ca_certificate,
    covers,
    issue,
    mesh_overlays,
    pki_plan,
    renew,
    renew_due,
)
from primespark.settings import get_settings
from primespark.vault_server import DevServer

REPO = Path(__file__).resolve().parents[2]
MINI = (REPO / "tests" / "fixtures" / "fleet" / "valid" / "mini-full.yaml").read_text()


@pytest.fixture(scope="module")
def lab() -> Fleet:
    return load_fleet("lab")


def overlays(fleet: Fleet) -> dict[str, dict[str, IPv4Address]]:
    return {mesh: allocate(fleet.mesh_members(mesh), spec.overlay, None)[0] for mesh, spec in fleet.meshes.items()}


def login(server: DevServer, plan: PkiPlan, host: str) -> hvac.Client:
    """What the host's renewal does: AppRole login with its role-id and a secret-id the deployer gave it."""
    name = plan.hosts[host].policy_name
    secret_id = server.client().auth.approle.generate_secret_id(role_name=name)["data"]["secret_id"]
    client = hvac.Client(url=server.address)
    answer = client.auth.approle.login(role_id=name, secret_id=secret_id)
    assert answer["auth"]["policies"] == ["default", name]
    return client


def sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(ext.get_values_for_type(x509.DNSName)), {str(a) for a in ext.get_values_for_type(x509.IPAddress)}


def test_the_plan_is_data_from_the_fleet(lab: Fleet) -> None:
    plan = pki_plan(lab, overlays(lab))
    assert plan.mount == "primespark-pki/lab" and plan.lifetime_hours == 24
    assert set(plan.hosts) == set(lab.hosts)
    pi = plan.hosts["pi-1"]
    assert pi.names == ("pi-1", "pi-1.lab.primespark.internal")
    assert pi.addresses == (str(lab.hosts["pi-1"].address), str(overlays(lab)["fleet"]["pi-1"]))
    assert plan.hosts["kvm-1"].addresses == (str(lab.hosts["kvm-1"].address),), "not in the mesh: LAN only"
    assert pi.policy_name == "primespark-lab-tls.pi-1"
    assert 'path "primespark-pki/lab/issue/pi-1"' in pi.policy
    assert "pi-2" not in pi.policy and '"*"' not in pi.policy and "/sign/" not in pi.policy
    role = pi.role_params(24)
    assert role["allowed_ip_sans_cidr"] == [f"{a}/32" for a in pi.addresses] and role["max_ttl"] == 86400
    assert not role["allow_subdomains"] and not role["allow_glob_domains"] and not role["allow_any_name"]
    assert PkiPlan.from_props(plan.props()) == plan, "a Pulumi input round trip loses nothing"


def test_mesh_addresses_come_from_the_saved_plan_else_the_first_allocation(lab: Fleet, tmp_path: Path) -> None:
    from primespark.mesh.plan import MeshState, save_state

    assert mesh_overlays(lab, tmp_path) == overlays(lab)
    first = overlays(lab)["fleet"]
    moved = {h: IPv4Address(int(a) + 100) for h, a in first.items()}
    spec = lab.meshes["fleet"]
    save_state(tmp_path, MeshState(fleet="lab", mesh="fleet", interface=spec.interface, overlay=spec.overlay,
                                   listen_port=spec.listen_port, topology=spec.topology,
                                   hosts={h: {"address": a, "public_key": "k"} for h, a in moved.items()}))
    assert mesh_overlays(lab, tmp_path) == {"fleet": moved}


def test_apply_makes_the_ca_and_the_roles_and_twice_changes_nothing(lab: Fleet, fresh_vault: DevServer) -> None:
    client = fresh_vault.client()
    plan = pki_plan(lab, overlays(lab))
    done = apply_pki(client, plan)
    assert done.mount_enabled and done.ca_generated and set(done.roles) == set(lab.hosts)
    assert set(done.policies) == set(done.approles) == {h.policy_name for h in plan.hosts.values()}
    ca = ca_certificate(client, plan.mount)
    ca_cert = x509.load_pem_x509_certificate(ca.encode())
    assert ca_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Prime Spark lab fleet CA"
    assert set(client.secrets.pki.list_roles(mount_point=plan.mount)["data"]["keys"]) == set(lab.hosts)
    role = client.secrets.pki.read_role("pi-1", mount_point=plan.mount)["data"]
    assert role["allowed_domains"] == list(plan.hosts["pi-1"].names) and role["max_ttl"] == 86400
    issuers = client.list(f"{plan.mount}/issuers")["data"]["keys"]

    again = apply_pki(client, plan)
    assert not again.changed, again
    assert ca_certificate(client, plan.mount) == ca, "the CA is never rotated by an apply"
    assert client.list(f"{plan.mount}/issuers")["data"]["keys"] == issuers

    # A host that leaves the fleet loses its role, policy and AppRole; the CA stays.
    smaller = PkiPlan(plan.fleet, plan.mount, plan.ca_common_name, plan.lifetime_hours,
                      {h: t for h, t in plan.hosts.items() if h != "pi-3"})
    gone = apply_pki(client, smaller)
    assert set(gone.removed) == {"primespark-pki/lab/roles/pi-3", "auth/approle/role/primespark-lab-tls.pi-3",
                                 "sys/policies/acl/primespark-lab-tls.pi-3"}
    assert not gone.ca_generated and ca_certificate(client, plan.mount) == ca


def test_a_host_issues_for_its_own_names_and_addresses_only(lab: Fleet, fresh_vault: DevServer) -> None:
    plan = pki_plan(lab, overlays(lab))
    apply_pki(fresh_vault.client(), plan)
    pi = login(fresh_vault, plan, "pi-1")
    before = datetime.now(UTC)
    issued = issue(pi, plan, "pi-1")
    cert = x509.load_pem_x509_certificate(issued.certificate.encode())
    ca = x509.load_pem_x509_certificate(ca_certificate(fresh_vault.client(), plan.mount).encode())
    cert.verify_directly_issued_by(ca)  # signed by the fleet CA
    assert issued.ca.strip() == ca_certificate(fresh_vault.client(), plan.mount).strip()
    names, addresses = sans(cert)
    assert names == set(plan.hosts["pi-1"].names)
    assert addresses == {str(lab.hosts["pi-1"].address), str(overlays(lab)["fleet"]["pi-1"])}
    assert covers(cert, plan.hosts["pi-1"]) and not covers(cert, plan.hosts["pi-2"])
    left = cert.not_valid_after_utc - before
    assert timedelta(hours=24) - timedelta(minutes=1) <= left <= timedelta(hours=24) + timedelta(minutes=1)
    key = issued.private_key.encode()
    assert b"PRIVATE KEY" in key and "PRIVATE" not in repr(issued), "the key never shows in a repr"

    mount = plan.mount
    other_ip = str(lab.hosts["pi-2"].address)
    with pytest.raises(hvac.exceptions.Forbidden):  # another host's role: not in its policy
        pi.secrets.pki.generate_certificate("pi-2", common_name="pi-2", mount_point=mount)
    # Its own role with another host's name or address: its policy refuses the values (the only IP limit on a
    # HashiCorp Vault) ...
    for refused in ({"common_name": "pi-2"}, {"common_name": "pi-1", "alt_names": "pi-2.lab.primespark.internal"},
                    {"common_name": "pi-1", "ip_sans": other_ip},
                    {"common_name": "pi-1", "ip_sans": f"{lab.hosts['pi-1'].address},{other_ip}"},
                    {"common_name": "pi-1", "other_sans": "1.2.3.4;UTF8:pi-2"}):
        with pytest.raises(hvac.exceptions.Forbidden):
            pi.write_data(f"{mount}/issue/pi-1", data=refused)
    # ... and so does the role itself, even for a token that may send anything (root).
    root = fresh_vault.client()
    for refused in ({"common_name": "pi-2"}, {"common_name": "pi-1", "alt_names": "pi-1.other.example"},
                    {"common_name": "pi-1", "ip_sans": other_ip}, {"common_name": "localhost"},
                    {"common_name": "x.pi-1.lab.primespark.internal"}):
        with pytest.raises(hvac.exceptions.InvalidRequest, match="not allowed"):
            root.write_data(f"{mount}/issue/pi-1", data=refused)
    with pytest.raises(hvac.exceptions.Forbidden):  # no CSR of its own choosing, no roles, no revocation
        pi.write(f"{mount}/sign/pi-1", csr="x", common_name="pi-1")
    with pytest.raises(hvac.exceptions.Forbidden):
        pi.secrets.pki.create_or_update_role("pi-1", extra_params={"allow_any_name": True}, mount_point=mount)
    with pytest.raises(hvac.exceptions.Forbidden):
        pi.write_data(f"{mount}/revoke", data={"serial_number": issued.serial})
    only_lan = pi.write_data(f"{mount}/issue/pi-1", data={"common_name": "pi-1",
                                                           "ip_sans": str(lab.hosts["pi-1"].address)})
    assert sans(x509.load_pem_x509_certificate(only_lan["data"]["certificate"].encode()))[1] == \
        {str(lab.hosts["pi-1"].address)}, "fewer of its own addresses is allowed"
    longer = pi.secrets.pki.generate_certificate("pi-1", common_name="pi-1", extra_params={"ttl": "72h"},
                                                 mount_point=mount)
    longest = x509.load_pem_x509_certificate(longer["data"]["certificate"].encode())
    assert longest.not_valid_after_utc - datetime.now(UTC) <= timedelta(hours=24, minutes=1), "capped at the fleet's"


def test_the_fleets_lifetime_reaches_the_role_and_the_certificate(fresh_vault: DevServer) -> None:
    fleet = load_text(MINI + "tls: {lifetime_hours: 6}\n", "mini.yaml")
    plan = pki_plan(fleet, overlays(fleet))
    assert plan.lifetime_hours == 6
    apply_pki(fresh_vault.client(), plan)
    cert = x509.load_pem_x509_certificate(issue(login(fresh_vault, plan, "pi-1"), plan, "pi-1").certificate.encode())
    assert cert.not_valid_after_utc - datetime.now(UTC) <= timedelta(hours=6, minutes=1)
    assert cert.not_valid_after_utc - datetime.now(UTC) >= timedelta(hours=6, minutes=-1)


@pytest.mark.parametrize(("section", "path", "code"), [
    ("tls: {lifetime_hours: 0}", "tls.lifetime_hours", "greater_than_equal"),
    ("tls: {lifetime_hours: 9000}", "tls.lifetime_hours", "less_than_equal"),
    ("tls: {lifetime_hours: 1.5}", "tls.lifetime_hours", "int_from_float"),
    ("tls: {lifetime: 24}", "tls.lifetime", "extra_forbidden"),
])
def test_tls_errors_are_located(section: str, path: str, code: str) -> None:
    text = MINI + section + "\n"
    with pytest.raises(FleetError) as caught:
        load_text(text, "mini.yaml")
    [problem] = caught.value.problems
    assert ".".join(map(str, problem.path)) == path and problem.code == code
    assert problem.file == "mini.yaml" and problem.line == text.count("\n")
    assert load_fleet("lab").tls.lifetime_hours == 24, "24 h when the fleet says nothing"


def _cert(start: datetime, hours: int) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pi-1")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(start).not_valid_after(start + timedelta(hours=hours))
            .sign(key, hashes.SHA256()))


def test_renewal_is_due_at_two_thirds_of_the_life() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    cert = _cert(start, 24)
    assert not renew_due(cert, start)
    assert not renew_due(cert, start + timedelta(hours=16) - timedelta(seconds=1))
    assert renew_due(cert, start + timedelta(hours=16))
    assert renew_due(cert, start + timedelta(hours=30)), "expired"
    assert renew_due(cert, start - timedelta(seconds=1)), "not valid yet: the clock or the CA moved"
    short = _cert(start, 3)
    assert not renew_due(short, start + timedelta(hours=2) - timedelta(seconds=1))
    assert renew_due(short, start + timedelta(hours=2))


def test_renew_writes_the_files_when_due_only(lab: Fleet, fresh_vault: DevServer, tmp_path: Path) -> None:
    plan = pki_plan(lab, overlays(lab))
    apply_pki(fresh_vault.client(), plan)
    host = login(fresh_vault, plan, "nas-1")
    files = TlsFiles(tmp_path / "tls")
    first = renew(host, plan, "nas-1", files)
    assert first.renewed and first.reason == "no certificate yet"
    assert stat.S_IMODE(files.key.stat().st_mode) == stat.S_IMODE(files.served.stat().st_mode) == 0o600
    # served.pem: the key and the certificate together, as a server loads them (one rename replaces both)
    served = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    served.load_cert_chain(files.served, files.served)
    assert files.served.read_text() == files.key.read_text() + files.cert.read_text()
    assert stat.S_IMODE(files.cert.stat().st_mode) == stat.S_IMODE(files.ca.stat().st_mode) == 0o644
    cert = files.load()
    assert cert is not None
    x509.load_pem_x509_certificate(files.ca.read_bytes()).public_key()  # the CA is there to verify peers
    serial = cert.serial_number
    later = renew(host, plan, "nas-1", files, now=datetime.now(UTC) + timedelta(hours=1))
    assert not later.renewed and files.load().serial_number == serial  # type: ignore[union-attr]
    due = renew(host, plan, "nas-1", files, now=cert.not_valid_before_utc + timedelta(hours=17))
    assert due.renewed and due.reason == "two thirds of its life are over"
    assert files.load().serial_number != serial  # type: ignore[union-attr]
    # A new mesh address: the old certificate no longer covers the host, whatever its age.
    moved = pki_plan(lab, {"fleet": {**overlays(lab)["fleet"], "nas-1": ip_address("10.99.0.200")}})  # type: ignore[dict-item]
    assert not covers(files.load(), moved.hosts["nas-1"])  # type: ignore[arg-type]


def test_the_deployer_policy_is_enough_to_apply(lab: Fleet, fresh_vault: DevServer) -> None:
    root = fresh_vault.client()
    root.sys.create_or_update_acl_policy(
        name="deployer", policy=(get_settings().root / "policies" / "vault" / "deployer.hcl").read_text())
    token = root.auth.token.create(policies=["deployer"], no_default_policy=True, ttl="1h")["auth"]["client_token"]
    deployer = fresh_vault.client(token)
    plan = pki_plan(lab, overlays(lab))
    assert apply_pki(deployer, plan).ca_generated
    assert not apply_pki(deployer, plan).changed
    with pytest.raises(hvac.exceptions.Forbidden):  # it certifies no one itself
        issue(deployer, plan, "pi-1")


def test_a_host_renews_with_its_own_token_through_the_command(lab: Fleet, fresh_vault: DevServer, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`spark tls renew`: with only pi-1's TLS policy, it asks for exactly what pi-1's role on the server allows,
    writes the files and the expiry metrics, keeps a certificate that is not due, and is refused for pi-2."""
    import yaml
    from typer.testing import CliRunner

    from primespark.cli.app import app
    from primespark.errors import UserError
    from primespark.monitoring import metrics as m
    from primespark.pki import served_plan

    plan = pki_plan(lab, overlays(lab))
    apply_pki(fresh_vault.client(), plan)
    host = login(fresh_vault, plan, "pi-1")
    served = served_plan(host, "lab", "pi-1")
    assert served.hosts["pi-1"].names == plan.hosts["pi-1"].names
    assert served.hosts["pi-1"].addresses == plan.hosts["pi-1"].addresses and served.lifetime_hours == 24
    with pytest.raises(hvac.exceptions.Forbidden):  # its own role only
        served_plan(host, "lab", "pi-2")
    # on a HashiCorp Vault the role holds no addresses: they come from the host's own policy, which it may read
    # (and no other host's)
    plain_read_role = host.secrets.pki.read_role

    def as_vault_answers(*args: object, **kwargs: object) -> dict:
        answer = plain_read_role(*args, **kwargs)
        answer["data"].pop("allowed_ip_sans_cidr")
        return answer

    monkeypatch.setattr(host.secrets.pki, "read_role", as_vault_answers)
    assert served_plan(host, "lab", "pi-1").hosts["pi-1"].addresses == plan.hosts["pi-1"].addresses
    with pytest.raises(hvac.exceptions.Forbidden):
        host.read(f"sys/policies/acl/{plan.hosts['pi-2'].policy_name}")
    monkeypatch.undo()

    data = yaml.safe_load((REPO / "inventory" / "lab.yaml").read_text())
    data["secrets"] = {"backend": "vault", "address": fresh_vault.address, "auth": "token"}
    fleet_file = tmp_path / "lab.yaml"
    fleet_file.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("VAULT_TOKEN", host.token)
    get_settings.cache_clear()
    folder, metrics = tmp_path / "tls", tmp_path / "textfile"
    args = ["tls", "renew", "--env", str(fleet_file), "--host", "pi-1", "--dir", str(folder),
            "--textfile-dir", str(metrics)]
    try:
        dry = CliRunner().invoke(app, [*args, "--dry-run"])
        assert dry.exit_code == 0 and "pi-1: would renew (no certificate yet)" in dry.output, dry.output
        assert "valid until" not in dry.output, "no certificate yet: no dates to give"
        assert not folder.exists() and not metrics.exists(), "a dry run writes nothing"
        first = CliRunner().invoke(app, args)
        assert first.exit_code == 0, first.output
        assert "pi-1: renewed (no certificate yet)" in first.output and "PRIVATE" not in first.output
        cert = TlsFiles(folder).load()
        assert cert is not None and covers(cert, plan.hosts["pi-1"])
        from prometheus_client.parser import text_string_to_metric_families

        prom = (metrics / "primespark_tls_pi-1.prom").read_text()
        samples = {s.name: s for f in text_string_to_metric_families(prom) for s in f.samples}
        assert samples[m.TLS_NOT_AFTER.name].value == cert.not_valid_after_utc.timestamp()
        assert samples[m.TLS_NOT_BEFORE.name].value == cert.not_valid_before_utc.timestamp()
        assert samples[m.TLS_NOT_AFTER.name].labels == {"certificate": str(folder / "cert.pem")}
        again = CliRunner().invoke(app, args)
        assert again.exit_code == 0 and "pi-1: kept (not due)" in again.output
        other = CliRunner().invoke(app, [*args[:5], "pi-2", *args[6:]])
        assert other.exit_code != 0 and isinstance(other.exception, UserError)
        assert "refused" in str(other.exception)
    finally:
        get_settings.cache_clear()


def test_two_applies_at_once_make_one_ca(lab: Fleet, fresh_vault: DevServer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    plan = pki_plan(lab, overlays(lab))
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = list(pool.map(lambda _: apply_pki(fresh_vault.client(), plan), range(4)))
    client = fresh_vault.client()
    assert len(client.list(f"{plan.mount}/issuers")["data"]["keys"]) == 1
    assert sum(d.ca_generated for d in done) == 1 and sum(d.mount_enabled for d in done) == 1
    assert not apply_pki(client, plan).changed
