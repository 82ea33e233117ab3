"""The monitoring generator beside its rules: prometheus.yml (who is scraped where), alertmanager.yml (routes,
receivers, secrets by reference, checked by amtool), the dashboards (a panel per alert, React panels only,
registry names only), the runbooks, publishing textfile metrics onto a host, and `spark status` against a real
Prometheus on loopback."""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from primespark.errors import UserError
from primespark.fleet import Fleet, load_fleet, load_text
from primespark.hosts import LocalRunner
from primespark.lab.topology import plan_lab
from primespark.mesh.plan import allocate
from primespark.monitoring import metrics as m
from primespark.monitoring.alertmanager import alertmanager_config, receiver_secrets, secret_files
from primespark.monitoring.alerts import ALERT_NAMES, PANEL_NOT_YET, RUNBOOK_DIR, fleet_alerts, rule_groups
from primespark.monitoring.dashboards import REACT_PANELS, dashboards, panel_queries
from primespark.monitoring.files import ALERTMANAGER_YML, dump_yaml, grafana_datasource, monitoring_files, write_files
from primespark.monitoring.paths import SECRETS_DIR
from primespark.monitoring.scrape import Target, monitored_hosts, prometheus_config
from primespark.monitoring.status import PrometheusApi, gather

REPO = Path(__file__).resolve().parents[2]
SPARK = Path(sys.executable).parent / "spark"
LAB = load_fleet(REPO / "inventory" / "lab.yaml")
HOMELAB = load_fleet(REPO / "inventory" / "homelab.yaml")
# Grafana's Angular panels, which Grafana 11 no longer draws.
ANGULAR = {"graph", "singlestat", "table-old", "grafana-piechart-panel", "grafana-worldmap-panel", "flot"}


def overlays(fleet: Fleet) -> dict[str, dict[str, IPv4Address]]:
    return {mesh: allocate(fleet.mesh_members(mesh), fleet.meshes[mesh].overlay, None)[0] for mesh in fleet.meshes}


def names_in(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (selectors), leaving functions, keywords and label names aside."""
    without_labels = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", re.sub(r"\{[^}]*\}", "{}", expr))
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_labels)
    tokens = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*(?=\{\}|\s|$|\)|\s*[-+*/<>=!])", without_ranges))
    words = {"and", "or", "unless", "by", "without", "on", "ignoring", "time", "vector", "count", "sum", "avg",
             "absent", "rate", "deriv", "predict_linear", "max", "min"}
    return {t for t in tokens if t not in words and not t.isdigit()}


# --- prometheus.yml ---------------------------------------------------------------------------------------------

def test_the_lab_scrapes_the_edge_over_the_mesh_and_the_cloud_on_its_lan() -> None:
    addresses = overlays(LAB)
    config = prometheus_config(LAB, addresses)
    node = next(j for j in config["scrape_configs"] if j["job_name"] == "node")
    assert node["honor_labels"] is True
    # the lab's CA is its OpenBao's: node exporters are scraped over TLS, verified against the fleet CA
    assert node["scheme"] == "https" and node["tls_config"] == {"ca_file": "/etc/ssl/primespark/ca.pem"}
    targets = {c["labels"]["host"]: (c["targets"][0], c["labels"]) for c in node["static_configs"]}
    assert set(targets) == set(monitored_hosts(LAB)) and "kvm-1" not in targets  # the lab's KVM host is this machine
    port = LAB.monitoring.node_exporter_port
    for host, (address, labels) in targets.items():
        spec = LAB.hosts[host]
        expected = addresses["fleet"][host] if spec.site == "edge" else spec.address
        assert address == f"{expected}:{port}", host
        assert labels == {"instance": host, "host": host, "site": spec.site, "kind": spec.kind.value}
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"node", "prometheus", "alertmanager"}  # the lab runs no Grafana, no Prefect on its hosts
    # the lab's Prometheus and Alertmanager (Debian's) serve only TLS too: Prometheus reaches both over https
    https = {"scheme": "https", "tls_config": {"ca_file": "/etc/ssl/primespark/ca.pem"}}
    assert all(jobs[job].items() >= https.items() for job in ("prometheus", "alertmanager"))
    alertmanagers = config["alerting"]["alertmanagers"][0]
    assert alertmanagers["static_configs"][0]["targets"] == ["172.30.2.14:9093"]
    assert alertmanagers.items() >= https.items()
    assert config["global"]["scrape_interval"] == "5s"


def test_production_scrapes_every_running_service_with_metrics() -> None:
    config = prometheus_config(HOMELAB, overlays(HOMELAB))
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"node", "prometheus", "alertmanager", "grafana", "prefect"}
    assert jobs["prefect"]["metrics_path"] == "/api/metrics"
    hosts = {c["labels"]["host"] for c in jobs["node"]["static_configs"]}
    assert "kvm-1" in hosts  # a real KVM host runs a node exporter too
    # the node exporters (the tls role) and the compose stack's containers (service_tls) serve only TLS: each is
    # scraped over https, verified against the fleet CA, and so are alerts sent
    https = {"scheme": "https", "tls_config": {"ca_file": "/etc/ssl/primespark/ca.pem"}}
    for job in ("node", "prometheus", "alertmanager", "grafana", "prefect"):
        assert {k: jobs[job][k] for k in https} == https, job
    assert {k: config["alerting"]["alertmanagers"][0][k] for k in https} == https


def test_a_fleet_without_a_ca_scrapes_plain_http() -> None:
    fleet = load_fleet(REPO / "tests" / "fixtures" / "fleet" / "valid" / "mini-full.yaml")  # the local store
    node = next(j for j in prometheus_config(fleet, overlays(fleet))["scrape_configs"] if j["job_name"] == "node")
    assert "scheme" not in node and "tls_config" not in node
    source = grafana_datasource(fleet)["datasources"][0]
    assert source["url"].startswith("http://") and "secureJsonData" not in source


def test_grafana_reads_prometheus_over_tls_verified_by_the_fleet_ca() -> None:
    [source] = grafana_datasource(HOMELAB)["datasources"]
    prometheus = HOMELAB.services["prometheus"]
    assert source["url"] == f"https://{HOMELAB.hosts[prometheus.host].address}:{prometheus.port}"
    assert source["jsonData"]["tlsAuthWithCACert"] is True
    # Grafana reads the CA file when it provisions (public; the container mounts the host's folder)
    assert source["secureJsonData"] == {"tlsCACert": "$__file{/etc/ssl/primespark/ca.pem}"}


def test_an_unplanned_mesh_is_a_clear_error() -> None:
    with pytest.raises(UserError, match=r"mesh fleet has no overlay address for pi-1 .*") as caught:
        prometheus_config(LAB, {})
    assert "spark mesh plan --env lab" in caught.value.fix


def test_the_lab_receiver_listens_where_the_lab_puts_the_controller() -> None:
    url = LAB.monitoring.receivers["controller"].url
    assert url is not None
    prometheus_site = LAB.hosts[LAB.services["alertmanager"].host].site
    network = next(n for n in plan_lab(LAB, "ssh-ed25519 AAAA test").networks if n.purpose == f"site {prometheus_site}")
    assert url.startswith(f"http://{network.gateway}:")


def test_generated_files_are_the_same_bytes_each_time() -> None:
    first = monitoring_files(LAB, overlays(LAB))
    assert first == monitoring_files(LAB, overlays(LAB))
    assert set(first) >= {"prometheus.yml", "rules/primespark.rules.yml", "alertmanager.yml"}


# --- alertmanager.yml --------------------------------------------------------------------------------------------

def test_routes_follow_the_fleet_and_secrets_stay_references() -> None:
    config = alertmanager_config(HOMELAB)
    routes = [(r["receiver"], r["matchers"]) for r in config["route"]["routes"]]
    assert routes == [("pager", ['severity="critical"']), ("ops-mail", ['severity="critical"']),
                      ("ops-mail", ['severity="warning"'])]
    assert all(r["continue"] for r in config["route"]["routes"])
    text = dump_yaml(config)
    for reference in secret_files(HOMELAB).values():
        assert reference not in text
    assert secret_files(HOMELAB) == {"ops-mail.password": "vault:secret/primespark/monitoring#smtp-password",
                                     "pager.bearer_token": "vault:secret/primespark/monitoring#ntfy-token"}
    receivers = {r["name"]: r for r in config["receivers"]}
    assert receivers["ops-mail"]["email_configs"][0]["auth_password_file"] == f"{SECRETS_DIR}/ops-mail.password"
    token = receivers["pager"]["webhook_configs"][0]["http_config"]["authorization"]["credentials_file"]
    assert token == f"{SECRETS_DIR}/pager.bearer_token"


@pytest.mark.skipif(shutil.which("amtool") is None,
                    reason="amtool (Debian's prometheus-alertmanager package) is not installed: run `make setup`")
@pytest.mark.parametrize("fleet", [LAB, HOMELAB], ids=["lab", "homelab"])
def test_amtool_accepts_the_generated_alertmanager_config(fleet: Fleet, tmp_path: Path) -> None:
    write_files(monitoring_files(fleet, overlays(fleet)), tmp_path)
    done = subprocess.run(["amtool", "check-config", str(tmp_path / ALERTMANAGER_YML)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


SLACK_FLEET = (REPO / "inventory" / "lab.yaml").read_text().replace(
    '    controller: {kind: webhook, url: "http://172.30.2.254:9799/alerts"}',
    '    controller: {kind: webhook, url: "http://172.30.2.254:9799/alerts"}\n'
    '    chat: {kind: slack, api_url: "local:monitoring/slack-hook", channel: "#ops"}')


def test_receiver_secrets_are_read_from_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiver's reference is read from the fleet's store (here the local one: the lab's OpenBao runs only
    under `lab up`)."""
    import yaml
    from lab_fleets import lab_fleet

    from primespark.context import FleetContext
    from primespark.secrets import SecretError

    fleet_file = Path(lab_fleet(tmp_path, {"backend": "local"}, "chatty.yaml"))
    data = yaml.safe_load(fleet_file.read_text())
    data["monitoring"]["receivers"]["chat"] = {"kind": "slack", "api_url": "local:monitoring/slack-hook",
                                               "channel": "#ops"}
    fleet_file.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path / "state"))

    with pytest.raises(SecretError, match="monitoring/slack-hook"):
        receiver_secrets(str(fleet_file))
    FleetContext.load(str(fleet_file)).secrets.put("monitoring/slack-hook", "https://hooks.example.org/T/B/x")
    assert receiver_secrets(str(fleet_file)) == {"chat.api_url": "https://hooks.example.org/T/B/x"}
    slack = next(r for r in alertmanager_config(load_text(SLACK_FLEET))["receivers"] if r["name"] == "chat")
    assert slack["slack_configs"][0]["api_url_file"] == f"{SECRETS_DIR}/chat.api_url"


# --- rules, runbooks, dashboards ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fleet", [LAB, HOMELAB], ids=["lab", "homelab"])
def test_rules_read_only_registered_metrics_and_link_runbooks_that_exist(fleet: Fleet) -> None:
    recorded = set()
    for group in rule_groups(fleet)["groups"]:
        for rule in group["rules"]:
            unknown = names_in(rule["expr"]) - set(m.REGISTRY)
            assert not unknown, f"{rule.get('alert') or rule.get('record')}: {unknown}"
            if "record" in rule:
                recorded.add(rule["record"])
                assert m.REGISTRY[rule["record"]].source == m.RECORDING
                continue
            assert rule["labels"]["severity"] in ("critical", "warning", "info")
            assert "{{ $labels." in rule["annotations"]["summary"]
            runbook = REPO / rule["annotations"]["runbook_url"]
            assert runbook.is_file(), runbook
    assert recorded == {x.name for x in m.REGISTRY.values() if x.source == m.RECORDING}


def test_every_alert_has_a_runbook_that_says_what_to_check_and_do() -> None:
    for name in ALERT_NAMES:
        text = (REPO / RUNBOOK_DIR / f"{name}.md").read_text()
        assert text.startswith(f"# {name} ("), name
        assert "## Check" in text and "## Do" in text, name


@pytest.mark.parametrize("fleet", [LAB, HOMELAB], ids=["lab", "homelab"])
def test_every_alert_has_a_panel_showing_its_signal(fleet: Fleet) -> None:
    boards = dashboards(fleet)
    assert set(boards) == {"overview", "mesh", "backups", "nodes", "sync", "agents"}
    shown = {}
    for board in boards.values():
        for panel in board["panels"]:
            for target in panel["targets"]:
                shown.setdefault(target["expr"], []).append(panel["description"])
    for alert in fleet_alerts(fleet):
        if alert.name in PANEL_NOT_YET:  # its rule ships; its signal has no publisher yet (a reason is given)
            assert alert.signal not in shown and PANEL_NOT_YET[alert.name]
            continue
        assert alert.signal in shown, f"no panel plots {alert.name}'s signal"
        assert any(alert.name in d for d in shown[alert.signal])


@pytest.mark.parametrize("fleet", [LAB, HOMELAB], ids=["lab", "homelab"])
def test_dashboards_use_react_panels_and_registered_metrics_only(fleet: Fleet) -> None:
    for uid, board in dashboards(fleet).items():
        assert board["uid"] == f"primespark-{fleet.name}-{uid}"
        types = {p["type"] for p in board["panels"]}
        assert types <= REACT_PANELS and not types & ANGULAR, types
        for panel in board["panels"]:
            assert panel["datasource"] == {"type": "prometheus", "uid": "primespark-prometheus"}
        for title, expr in panel_queries(board):
            unknown = names_in(expr) - set(m.REGISTRY) - {"ALERTS"}
            assert not unknown, f"{uid}/{title}: {unknown}"


def test_a_fleet_without_a_ups_gets_no_ups_alert_or_panel() -> None:
    assert {"UpsOnBattery", "UpsBatteryLow"} <= {a.name for a in fleet_alerts(HOMELAB)}
    assert not {"UpsOnBattery", "UpsBatteryLow"} & {a.name for a in fleet_alerts(LAB)}
    queries = [q for board in dashboards(LAB).values() for _, q in panel_queries(board)]
    assert not [q for q in queries if "spark_power_" in q]


def test_the_registry_refuses_a_name_or_label_it_does_not_have() -> None:
    from primespark.monitoring.promql import selector

    with pytest.raises(KeyError, match="has no label 'hostname'"):
        selector(m.BACKUP_SUCCESS, hostname="pi-1")
    renamed = m.Metric("primespark_backups_success", "renamed", ("host",))
    with pytest.raises(KeyError, match="not in the metric registry"):
        selector(renamed)


# --- publishing textfile metrics onto the host ------------------------------------------------------------------

class ShellHost(LocalRunner):
    """This machine as a remote host would be run: every command through the runner, none of it in-process."""

    remote = True


class ShellHosts:
    def runner(self, host: str) -> ShellHost:
        return ShellHost(host)


def test_publish_writes_the_file_whole_where_the_host_exporter_reads(tmp_path: Path) -> None:
    fleet = LAB.model_copy(update={"monitoring": LAB.monitoring.model_copy(update={"textfile_dir": str(tmp_path)})})
    metrics = m.backup_metrics("pi-1", "nas-primary", success=False, finished=100.0, duration_seconds=3.0,
                               last_success=None, snapshot_time=None, size_bytes=None, added_bytes=None)
    where = m.publish(ShellHosts(), fleet, "pi-1", "backup_pi-1", metrics)
    assert where == f"pi-1:{tmp_path}/primespark_backup_pi-1.prom"
    assert [p.name for p in tmp_path.iterdir()] == ["primespark_backup_pi-1.prom"]  # no temporary file left
    text = (tmp_path / "primespark_backup_pi-1.prom").read_text()
    assert 'primespark_backup_success{host="pi-1",repository="nas-primary"} 0.0' in text
    missing = fleet.model_copy(update={"monitoring": fleet.monitoring.model_copy(
        update={"textfile_dir": str(tmp_path / "absent")})})
    with pytest.raises(UserError, match=r"writing .*absent/primespark_backup_pi-1\.prom failed"):
        m.publish(ShellHosts(), missing, "pi-1", "backup_pi-1", metrics)


# --- spark status against a real Prometheus ----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Exporter:
    """Serves /<host> for each host: what that host's node exporter would (its textfile metrics included)."""

    def __init__(self) -> None:
        self.bodies: dict[str, str] = {}
        exporter = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = exporter.bodies.get(self.path.strip("/"))
                if body is None:
                    self.send_error(404)
                    return
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def healthy_bodies(fleet: Fleet, now: float) -> dict[str, str]:
    bodies = {h: "node_load1 0.5\n" for h in monitored_hosts(fleet)}
    assert fleet.backup is not None
    for host in fleet.backup.plans:
        bodies[host] += m.backup_metrics(host, fleet.backup.plans[host].repository, success=True, finished=now,
                                         duration_seconds=5, last_success=now, snapshot_time=now - 60,
                                         size_bytes=1000, added_bytes=10).text()
        bodies[host] += m.drill_metrics(host, passed=True, finished=now, rto_seconds=30, rpo_seconds=60,
                                        rto_target_seconds=900, rpo_target_seconds=93600).text()
    bodies["pi-1"] += m.mesh_metrics("fleet", [("pi-1", "core-1", True, 0.002, 20.0)], {"pi-1": True}, 0).text()
    from primespark.pki import HOST_TLS_FOLDER

    for host in monitored_hosts(fleet):  # what each host's spark-tls-renew publishes: an hour into 24 h
        bodies[host] += m.certificate_metrics(str(HOST_TLS_FOLDER / "cert.pem"), now - 3600, now + 23 * 3600).text()
    return bodies


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[str, Exporter]]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus (Debian's package) is not installed: run `make setup`")
    exporter = Exporter()
    fleet = LAB
    rules = tmp_path / "rules.yml"
    rules.write_text(dump_yaml(rule_groups(fleet)))
    node = [{"targets": [f"127.0.0.1:{exporter.port}"],
             "labels": {**Target("node", h, "").labels(fleet), "__metrics_path__": f"/{h}"}}
            for h in monitored_hosts(fleet)]
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(rules)],
              "scrape_configs": [{"job_name": "node", "honor_labels": True, "static_configs": node}]}
    (tmp_path / "prometheus.yml").write_text(dump_yaml(config))
    port = free_port()
    process = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"))
    try:
        yield f"http://127.0.0.1:{port}", exporter
    finally:
        process.terminate()
        process.wait(timeout=30)
        exporter.server.shutdown()


def until(condition, seconds: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while True:
        with contextlib.suppress(UserError):
            value = condition()
            if value:
                return value
        assert time.monotonic() < deadline, "the condition did not hold in time"
        time.sleep(0.5)


def test_prometheus_serves_only_tls_with_the_tls_roles_web_config_and_status_verifies_it(tmp_path: Path) -> None:
    binary, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if binary is None or promtool is None:
        pytest.skip("prometheus (Debian's package) is not installed: run `make setup`")
    import jinja2
    from agent_fleets import fleet_ca

    from primespark.pki import client_context

    tls = fleet_ca(tmp_path / "tls", "ops-1", addresses=("127.0.0.1",))
    other = fleet_ca(tmp_path / "other", "ops-1", addresses=("127.0.0.1",))  # another CA, the same names
    template = (REPO / "roles" / "tls" / "templates" / "web.yml.j2").read_text()
    web = tmp_path / "web.yml"
    web.write_text(jinja2.Template(template).render(spark_tls={"folder": str(tls)}, ansible_managed="test"))
    checked = subprocess.run([promtool, "check", "web-config", str(web)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    (tmp_path / "prometheus.yml").write_text(dump_yaml({"global": {"scrape_interval": "1s"}}))
    port = free_port()
    process = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                f"--web.config.file={web}"],
                               stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"))
    try:
        trusted = PrometheusApi(f"https://127.0.0.1:{port}", timeout=5,
                                context=client_context((tls / "ca.pem").read_text()))
        assert until(lambda: trusted.query("vector(1)"))[0].value == 1  # the address is in its certificate
        with pytest.raises(UserError, match=r"cannot read Prometheus at https://127.0.0.1:\d+: .*CERTIFICATE_VERIFY"):
            PrometheusApi(f"https://127.0.0.1:{port}", timeout=5,
                          context=client_context((other / "ca.pem").read_text())).query("vector(1)")
        with pytest.raises(UserError, match=r"refused /api/v1/query: HTTP 400 Client sent an HTTP request to an HTTPS"):
            PrometheusApi(f"http://127.0.0.1:{port}", timeout=5).query("vector(1)")
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_status_is_zero_on_a_healthy_fleet_and_names_the_critical_alert(prometheus: tuple[str, Exporter]) -> None:
    url, exporter = prometheus
    exporter.bodies = healthy_bodies(LAB, time.time())
    api = PrometheusApi(url, timeout=5)
    healthy = until(lambda: (s := gather(LAB, api)) and all(v == 1 for v in s.hosts.values())
                    and all(b["age"] == b["age"] for b in s.backups.values()) and s)
    assert healthy.exit_code == 0 and not healthy.alerts
    assert set(healthy.hosts) == set(monitored_hosts(LAB))
    done = subprocess.run([str(SPARK), "status", "--env", "lab", "--prometheus", url], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    for host in monitored_hosts(LAB):
        assert host in done.stdout
    assert "no alerts firing" in done.stdout
    assert set(healthy.certificates or {}) == set(monitored_hosts(LAB)), "every host's certificate, from its metrics"
    assert done.stdout.count("expires in 23.0 h") + done.stdout.count("expires in 22.9 h") == len(monitored_hosts(LAB))

    exporter.bodies["pi-1"] = exporter.bodies["pi-1"].replace(
        'primespark_backup_success{host="pi-1",repository="nas-primary"} 1.0',
        'primespark_backup_success{host="pi-1",repository="nas-primary"} 0.0')
    del exporter.bodies["pi-2"]  # its exporter stops answering
    # both changes reach Prometheus at their own next scrape: wait for both (CI once saw the alert first)
    failing = until(lambda: (s := gather(LAB, api)) and any(a.name == "BackupFailed" for a in s.alerts)
                    and s.hosts.get("pi-2") == 0 and s)
    assert failing.exit_code == 2
    assert [(a.name, a.host, a.severity) for a in failing.alerts if a.name == "BackupFailed"] == [
        ("BackupFailed", "pi-1", "critical")]
    assert failing.hosts["pi-2"] == 0
    done = subprocess.run([str(SPARK), "status", "--env", "lab", "--prometheus", url], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "BackupFailed" in done.stdout and "the last backup of pi-1 into nas-primary failed" in done.stdout


def test_the_hosts_table_says_when_a_certificate_is_due_or_expiring() -> None:
    """Renewal is due at two thirds of the life (the hosts' spark-tls-renew), CertificateExpiry's line a sixth."""
    from primespark.monitoring.status import certificate_state

    start, life = 1_000_000.0, 24 * 3600.0
    assert certificate_state(start, start + life, start + 3600) == ("expires in 23.0 h", "green")
    assert certificate_state(start, start + life, start + life * 2 / 3) == ("renewal due, expires in 8.0 h", "yellow")
    assert certificate_state(start, start + life, start + life - 3600)[1] == "bold red"
    assert certificate_state(start, start + life, start + life - 3600)[0] == "expires in 1.0 h, not renewed"
    assert certificate_state(start, start + life, start + life + 7200) == ("EXPIRED 2.0 h ago", "bold red")


def test_status_without_prometheus_is_one_clear_line() -> None:
    done = subprocess.run([str(SPARK), "status", "--env", "lab", "--prometheus", f"http://127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "cannot read Prometheus at http://127.0.0.1:" in done.stderr and "Traceback" not in done.stderr


def test_publish_through_the_flows_keeps_working_with_a_local_folder(tmp_path: Path) -> None:
    """Tests and benchmarks pass `textfile`: the file lands there, on this machine, as before."""
    written = m.publish(ShellHosts(), LAB, "pi-1", "drill_pi-1",
                        m.drill_metrics("pi-1", passed=True, finished=1.0, rto_seconds=1.0, rpo_seconds=1.0,
                                        rto_target_seconds=900, rpo_target_seconds=93600), str(tmp_path))
    assert written == str(tmp_path / "primespark_drill_pi-1.prom")


def orchestration_body(at: float) -> str:
    """The Prefect export's file on the server's host: spark-cloud ready, spark-edge not (no worker); one inline
    run running, two runs of summarise failed in the window."""
    from primespark.monitoring.prefect_export import INLINE, Export

    return Export(ready={"spark-cloud": True, "spark-edge": False}, workers={"spark-cloud": 1, "spark-edge": 0},
                  failed={"summarise": 2, INLINE: 0}, running={"summarise": 0, INLINE: 1}, at=at).textfile().text()


def test_status_shows_sync_lag_work_pools_and_agent_tasks_and_never_a_stale_pool_as_ready(
        prometheus: tuple[str, Exporter]) -> None:
    from primespark.data.layout import links
    from primespark.monitoring.prefect_export import INLINE

    url, exporter = prometheus
    now = time.time()
    bodies = healthy_bodies(LAB, now)
    for link in links(LAB):
        bodies[link.source] += m.sync_metrics(
            link.job, link.source, success=link.source != "pi-2", finished=now, last_success=now - 60,
            lag_seconds=42.0, sent_bytes=1, sent_files=1, deleted_files=0, differing_files=0, errors_total=0,
            refusals_total=0).text()
    server = LAB.orchestration.server.host  # type: ignore[union-attr]
    bodies[server] += orchestration_body(now)
    exporter.bodies = bodies
    api = PrometheusApi(url, timeout=5)
    found = until(lambda: (s := gather(LAB, api)) and s.export_fresh and all(
        v["since"] == v["since"] for v in s.sync.values()) and s)
    assert set(found.sync) == {(x.job, x.source) for x in links(LAB)}
    assert {k: (v["success"], v["lag"]) for k, v in found.sync.items()} == {
        (x.job, x.source): (0.0 if x.source == "pi-2" else 1.0, 42.0) for x in links(LAB)}
    assert all(50 <= v["since"] <= 600 for v in found.sync.values())
    assert found.pools == {"spark-cloud": {"ready": 1.0, "workers": 1.0},
                           "spark-edge": {"ready": 0.0, "workers": 0.0}}
    assert found.tasks_running == {"summarise": 0.0, INLINE: 1.0}
    assert found.tasks_failed == {"summarise": 2.0, INLINE: 0.0}
    done = subprocess.run([str(SPARK), "status", "--env", "lab", "--prometheus", url], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert "Traceback" not in done.stderr, done.stderr
    assert "hot-to-nas" in done.stdout and "42 s" in done.stdout
    row = {pool: next(line for line in done.stdout.splitlines() if pool in line) for pool in found.pools}
    assert "NOT READY" in row["spark-edge"] and "READY" in row["spark-cloud"] and "NOT" not in row["spark-cloud"]
    assert "agent tasks: 1 running, 2 failed or crashed in the last 1.0 h (summarise 2)" in done.stdout

    # the export stops (its last file says ready): past the alert's limit the pools are unknown, not ready
    exporter.bodies[server] = exporter.bodies[server].replace(orchestration_body(now), orchestration_body(now - 3600))
    stale = until(lambda: (s := gather(LAB, api)) and s.export_age is not None and s.export_age > 3000 and s)
    assert not stale.export_fresh
    assert all(v["ready"] != v["ready"] for v in stale.pools.values())  # nan: unknown
    assert not stale.tasks_running and not stale.tasks_failed
    done = subprocess.run([str(SPARK), "status", "--env", "lab", "--prometheus", url], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert "NO CURRENT DATA" in done.stdout and "READY" not in done.stdout.replace("NOT READY", "")
    assert "agent tasks: unknown" in done.stdout
