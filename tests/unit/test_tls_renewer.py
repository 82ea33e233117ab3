"""spark-tls-renew (primespark.tls_renewer), the renewal a host runs from cron, against a real OpenBao dev server
with the fleet's PKI plan: as the hosts run it (the system's python3, isolated: no spark venv), with the host's own
AppRole. It issues when there is no certificate, keeps one that is not due, renews at two thirds of its life, when
the role's addresses changed or when forced, writes the files with their modes and the expiry metrics, and fails
closed (a store that does not answer, a refused secret-id) with one line, the files untouched.
"""

from __future__ import annotations

import ast
import grp
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from primespark import tls_renewer
from primespark.fleet import load_fleet
from primespark.fleet.model import Fleet
from primespark.mesh.plan import allocate
from primespark.monitoring import metrics as m
from primespark.pki import PkiPlan, apply_pki, pki_plan
from primespark.vault_server import DevServer

SCRIPT = Path(tls_renewer.__file__)
HOST_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


def overlays(fleet: Fleet) -> dict[str, dict[str, IPv4Address]]:
    return {mesh: allocate(fleet.mesh_members(mesh), spec.overlay, None)[0] for mesh, spec in fleet.meshes.items()}


@pytest.fixture
def applied(fresh_vault: DevServer) -> PkiPlan:
    plan = pki_plan(load_fleet("lab"), overlays(load_fleet("lab")))
    apply_pki(fresh_vault.client(), plan)
    return plan


def host_config(server: DevServer, plan: PkiPlan, host: str, tmp_path: Path, address: str | None = None) -> Path:
    """What the tls role installs on `host`: the configuration and a secret-id of its TLS AppRole (0600)."""
    approle = plan.hosts[host].policy_name
    secret_id = server.client().auth.approle.generate_secret_id(role_name=approle)["data"]["secret_id"]
    tmp_path.mkdir(parents=True, exist_ok=True)
    secret_file = tmp_path / "secret-id"
    secret_file.write_text(secret_id + "\n")
    secret_file.chmod(0o600)
    (tmp_path / "textfile").mkdir(exist_ok=True)
    config = tls_renewer.Config(host=host, vault_addr=address or server.address, mount=plan.mount, role_id=approle,
                                secret_id_file=str(secret_file), folder=str(tmp_path / "tls"),
                                group=grp.getgrgid(os.getgid()).gr_name, textfile_dir=str(tmp_path / "textfile"))
    path = tmp_path / "tls-renew.json"
    path.write_text(json.dumps(config.__dict__))
    return path


def as_the_host_runs_it(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert HOST_PYTHON, "Debian's python3 is what the hosts run the renewer with"
    return subprocess.run([HOST_PYTHON, "-I", str(SCRIPT), "--config", str(config), *args], capture_output=True,
                          text=True, timeout=120, check=False)


def load(folder: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())


def test_the_renewer_needs_only_the_standard_library() -> None:
    """The Pis have python3 but no spark venv: the file the role copies there imports nothing else."""
    tree = ast.parse(SCRIPT.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert imported, "the parse found the imports"
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported - set(sys.stdlib_module_names)
    assert SCRIPT.read_text().startswith("#!/usr/bin/python3\n")


def test_its_metrics_are_the_registry_s(tmp_path: Path) -> None:
    """The expiry alert and its panel read the names primespark.monitoring.metrics declares."""
    start = datetime(2026, 12, 3, 10, tzinfo=UTC)
    info = tls_renewer.CertInfo(start, start + timedelta(hours=24), frozenset(), frozenset())
    text = tls_renewer.metrics_text('/etc/ssl/primespark/"cert".pem', info)
    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    assert set(samples) == {m.TLS_NOT_AFTER.name, m.TLS_NOT_BEFORE.name}
    assert samples[m.TLS_NOT_AFTER.name].value == (start + timedelta(hours=24)).timestamp()
    assert samples[m.TLS_NOT_BEFORE.name].labels == {"certificate": '/etc/ssl/primespark/"cert".pem'}


def test_a_host_renews_its_own_certificate_when_due(applied: PkiPlan, fresh_vault: DevServer,
                                                    tmp_path: Path) -> None:
    config_file = host_config(fresh_vault, applied, "pi-1", tmp_path)
    folder = tmp_path / "tls"
    tls = applied.hosts["pi-1"]

    dry = as_the_host_runs_it(config_file, "--dry-run")
    assert dry.returncode == 0 and "pi-1: would renew (no certificate yet)" in dry.stdout, dry.stderr
    assert not (folder / "cert.pem").exists(), "a dry run writes nothing"
    assert not list((tmp_path / "textfile").iterdir()), "a dry run writes nothing"

    first = as_the_host_runs_it(config_file)
    assert first.returncode == 0, first.stderr
    assert "pi-1: renewed (no certificate yet)" in first.stdout and "PRIVATE" not in first.stdout + first.stderr
    cert = load(folder)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == set(tls.names)
    assert {str(a) for a in sans.get_values_for_type(x509.IPAddress)} == set(tls.addresses)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc >= timedelta(hours=23), "the fleet's 24 h"
    served = folder / "served.pem"
    assert stat.S_IMODE(served.stat().st_mode) == 0o640 and served.stat().st_gid == os.getgid()
    assert stat.S_IMODE((folder / "cert.pem").stat().st_mode) == stat.S_IMODE((folder / "ca.pem").stat().st_mode) \
        == 0o644
    assert not (folder / "key.pem").exists(), "the key is in served.pem only"
    # PKCS#8, the one form every server reads (Kafka's PEM key store reads no other)
    pkcs8 = "-----BEGIN " + "PRIVATE KEY-----\n"  # split: no committed file looks like it holds a key
    assert served.read_text().startswith(pkcs8)
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(served, served)  # the key is the certificate's: a server can serve the pair
    client_side = ssl.create_default_context(cafile=str(folder / "ca.pem"))
    assert client_side.cert_store_stats()["x509_ca"] == 1
    prom = (tmp_path / "textfile" / "primespark_tls_pi-1.prom").read_text()
    samples = {s.name: s for f in text_string_to_metric_families(prom) for s in f.samples}
    assert samples[m.TLS_NOT_AFTER.name].value == cert.not_valid_after_utc.timestamp()
    assert samples[m.TLS_NOT_AFTER.name].labels == {"certificate": str(folder / "cert.pem")}

    again = as_the_host_runs_it(config_file)
    assert again.returncode == 0 and "pi-1: kept (not due)" in again.stdout
    assert load(folder).serial_number == cert.serial_number

    config = tls_renewer.Config.read(str(config_file))
    two_thirds = cert.not_valid_before_utc + (cert.not_valid_after_utc - cert.not_valid_before_utc) * 2 / 3
    before_due = tls_renewer.run(config, now=two_thirds - timedelta(seconds=1))
    assert not before_due.renewed and load(folder).serial_number == cert.serial_number
    at_two_thirds = tls_renewer.run(config, now=two_thirds)
    assert at_two_thirds.renewed and at_two_thirds.reason == "two thirds of its life are over"
    renewed = load(folder)
    assert renewed.serial_number != cert.serial_number

    forced = as_the_host_runs_it(config_file, "--force")
    assert forced.returncode == 0 and "pi-1: renewed (forced)" in forced.stdout
    assert load(folder).serial_number != renewed.serial_number


def test_a_host_whose_addresses_changed_gets_a_new_certificate(applied: PkiPlan, fresh_vault: DevServer,
                                                               tmp_path: Path) -> None:
    config_file = host_config(fresh_vault, applied, "nas-1", tmp_path)
    assert as_the_host_runs_it(config_file).returncode == 0
    fleet = load_fleet("lab")
    moved = pki_plan(fleet, {"fleet": {**overlays(fleet)["fleet"], "nas-1": IPv4Address("10.99.0.200")}})
    apply_pki(fresh_vault.client(), moved)  # the deployer's apply: the role now allows the new mesh address
    run = as_the_host_runs_it(config_file)
    assert run.returncode == 0 and "nas-1: renewed (its names or addresses changed)" in run.stdout, run.stderr
    sans = load(tmp_path / "tls").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "10.99.0.200" in {str(a) for a in sans.get_values_for_type(x509.IPAddress)}


def test_it_fails_closed_and_leaves_the_files(applied: PkiPlan, fresh_vault: DevServer, tmp_path: Path) -> None:
    config_file = host_config(fresh_vault, applied, "pi-2", tmp_path)
    assert as_the_host_runs_it(config_file).returncode == 0
    folder = tmp_path / "tls"
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix == ".pem"}

    # another host's secret-id: the login is refused
    other = host_config(fresh_vault, applied, "pi-3", tmp_path / "other")
    data = json.loads(config_file.read_text())
    data["secret_id_file"] = json.loads(other.read_text())["secret_id_file"]
    refused_config = tmp_path / "refused.json"
    refused_config.write_text(json.dumps(data))
    refused = as_the_host_runs_it(refused_config, "--force")
    assert refused.returncode == 1 and refused.stdout == ""
    assert "refused" in refused.stderr and "secret-id" in refused.stderr and len(refused.stderr.splitlines()) == 1

    # a store that does not answer: a port on loopback nobody listens on
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data["secret_id_file"] = json.loads(config_file.read_text())["secret_id_file"]
    data["vault_addr"] = f"http://127.0.0.1:{port}"
    down_config = tmp_path / "down.json"
    down_config.write_text(json.dumps(data))
    (tmp_path / "textfile" / "primespark_tls_pi-2.prom").unlink()
    down = as_the_host_runs_it(down_config, "--force")
    assert down.returncode == 1 and len(down.stderr.splitlines()) == 1
    assert f"secret store unreachable: no answer from Vault at http://127.0.0.1:{port}" in down.stderr
    assert "while renewing pi-2's certificate" in down.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix == ".pem"} == before
    assert (tmp_path / "textfile" / "primespark_tls_pi-2.prom").is_file(), "the alert still sees the clock run down"

    # a folder it cannot write (a file stands where it should be): one line, nothing renamed
    data = json.loads(config_file.read_text())
    (tmp_path / "not-a-folder").write_text("")
    data["folder"] = str(tmp_path / "not-a-folder" / "tls")
    blocked_config = tmp_path / "blocked.json"
    blocked_config.write_text(json.dumps(data))
    blocked = as_the_host_runs_it(blocked_config)
    assert blocked.returncode == 1 and len(blocked.stderr.splitlines()) == 1 and "Traceback" not in blocked.stderr
    assert "not-a-folder" in blocked.stderr and "Not a directory" in blocked.stderr, blocked.stderr

    (tmp_path / "bad.json").write_text(json.dumps({"host": 1, "colour": "red"}))
    bad = as_the_host_runs_it(tmp_path / "bad.json")
    assert bad.returncode == 1 and len(bad.stderr.splitlines()) == 1, bad.stderr
    assert "missing vault_addr, mount, role_id, secret_id_file; unknown colour; not text: host" in bad.stderr

    missing = as_the_host_runs_it(tmp_path / "nowhere.json")
    assert missing.returncode == 1 and "nowhere.json: no such file: site.yml's tls role writes it" in missing.stderr


def test_two_runs_at_once_take_turns(applied: PkiPlan, fresh_vault: DevServer, tmp_path: Path) -> None:
    """cron's run and site.yml's may meet: the lock makes the second wait, then judge what the first wrote."""
    from concurrent.futures import ThreadPoolExecutor

    config_file = host_config(fresh_vault, applied, "pi-1", tmp_path)
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(pool.map(lambda _: as_the_host_runs_it(config_file), range(2)))
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    lines = sorted(r.stdout.split(" ", 1)[1] for r in runs)
    assert lines[0].startswith("pi-1: kept (not due)") and lines[1].startswith("pi-1: renewed (no certificate yet)")


def test_after_a_renewal_it_reloads_the_servers_that_do_not_re_read(applied: PkiPlan, fresh_vault: DevServer,
                                                                     tmp_path: Path) -> None:
    """The compose stack's Postgres, Redis, Kafka and MLflow take a renewed certificate only when told: the
    renewer runs their reload commands after a renewal (not when it kept the certificate), and one that fails is
    tried again at every run until it succeeds, failing each run meanwhile."""
    config_file = host_config(fresh_vault, applied, "pi-1", tmp_path)
    log = tmp_path / "reloads.log"
    allowed = tmp_path / "reload-works"
    data = json.loads(config_file.read_text())
    second = f"test -e {allowed} || {{ echo 'not ready' >&2; exit 3; }}; echo second >> {log}"
    data["reload"] = [["/bin/sh", "-c", f"echo first >> {log}"], ["/bin/sh", "-c", second]]
    config_file.write_text(json.dumps(data))
    folder = tmp_path / "tls"

    failed = as_the_host_runs_it(config_file)
    assert failed.returncode == 1 and len(failed.stderr.splitlines()) == 1, failed.stderr
    assert "renewed the certificate, but the servers that do not re-read it were not all reloaded" in failed.stderr
    assert "exited 3: not ready" in failed.stderr
    serial = load(folder).serial_number  # the renewal itself is kept
    assert log.read_text() == "first\n" and (folder / tls_renewer.RELOAD_PENDING).exists()

    still = as_the_host_runs_it(config_file)  # not due, but the reload is still owed
    assert still.returncode == 1 and "kept the certificate, but" in still.stderr
    allowed.write_text("")
    done = as_the_host_runs_it(config_file)
    assert done.returncode == 0 and "pi-1: kept (not due)" in done.stdout and "reloaded 2 service(s)" in done.stdout
    assert log.read_text() == "first\nfirst\nfirst\nsecond\n"
    assert not (folder / tls_renewer.RELOAD_PENDING).exists() and load(folder).serial_number == serial

    quiet = as_the_host_runs_it(config_file)
    assert quiet.returncode == 0 and "reloaded" not in quiet.stdout and log.read_text().count("\n") == 4
    forced = as_the_host_runs_it(config_file, "--force")
    assert forced.returncode == 0 and "renewed (forced)" in forced.stdout and "reloaded 2 service(s)" in forced.stdout
    assert log.read_text().endswith("first\nsecond\n") and log.read_text().count("\n") == 6

    data["reload"] = [["ok"], "not a command"]
    config_file.write_text(json.dumps(data))
    bad = as_the_host_runs_it(config_file)
    assert bad.returncode == 1 and "not text: reload (a list of commands, each a list of strings)" in bad.stderr


def test_on_a_vault_whose_roles_hold_no_addresses_it_asks_for_the_policy_s(
        applied: PkiPlan, fresh_vault: DevServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HashiCorp Vault's PKI roles have no allowed_ip_sans_cidr (OpenBao's do): there the renewer reads the
    addresses from the host's own policy, which allows exactly the last apply's. The server here is OpenBao; its
    role answers are stripped of the field, as Vault's look. The issue request still goes to the real server,
    whose policy checks every value."""
    plain_call = tls_renewer.Store.call

    def as_vault_answers(self: tls_renewer.Store, method: str, path: str, *args: object, **kwargs: object) -> dict:
        answer = plain_call(self, method, path, *args, **kwargs)  # type: ignore[arg-type]
        if method == "GET" and "/roles/" in path:
            answer["data"].pop("allowed_ip_sans_cidr")
        return answer

    monkeypatch.setattr(tls_renewer.Store, "call", as_vault_answers)
    config = tls_renewer.Config.read(str(host_config(fresh_vault, applied, "nas-1", tmp_path)))
    first = tls_renewer.run(config)
    assert first.renewed, first
    sans = load(tmp_path / "tls").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(a) for a in sans.get_values_for_type(x509.IPAddress)} == set(applied.hosts["nas-1"].addresses)
    again = tls_renewer.run(config)
    assert not again.renewed and again.reason == "not due", "the policy's addresses are the certificate's"

    policy = fresh_vault.client().sys.read_acl_policy(applied.hosts["nas-1"].policy_name)["data"]["policy"]
    assert tls_renewer.policy_addresses(policy) == applied.hosts["nas-1"].addresses
    with pytest.raises(tls_renewer.RenewError, match="names no ip_sans"):
        tls_renewer.policy_addresses('path "x" { capabilities = ["read"] }')
