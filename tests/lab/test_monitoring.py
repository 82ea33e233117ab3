"""End to end on the lab: site.yml brings up Debian's Prometheus and Alertmanager on the host the fleet places them
on, with the generated files; the main job (backups, drills, maintenance, mesh check) publishes its metrics onto
the hosts; Prometheus scrapes every node exporter (the edge over the mesh), every dashboard query has data, an
alert travels Prometheus → Alertmanager → a webhook on the controller and resolves, and `spark status` tells a
healthy lab from one with an alert firing.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from lab_cli import TLS_PLAYBOOK, served_certificate, spark, until

from primespark.cli.tls import fleet_client_context
from primespark.inventory import managed_hosts
from primespark.mesh.plan import load_state
from primespark.monitoring.dashboards import dashboards, panel_queries
from primespark.monitoring.status import prometheus_url, service_url

pytestmark = pytest.mark.lab

FAST = {"retries": 1, "retry_delay_seconds": 1.0}
PLAYBOOK = """\
- name: Monitoring servers only
  hosts: monitoring_servers
  become: true
  roles:
    - monitoring_server
"""


@dataclass(frozen=True)
class Prometheus:
    """The lab's Prometheus as the controller reaches it: over https, verified against the fleet CA only."""

    url: str
    context: ssl.SSLContext

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10, context=self.context) as reply:
            body = json.load(reply)
        assert body["status"] == "success", body
        return body["data"]


def query(prometheus: Prometheus, expr: str) -> list[dict[str, Any]]:
    return list(prometheus.get(f"/api/v1/query?{urllib.parse.urlencode({'query': expr})}")["result"])


@pytest.fixture(scope="module")
def monitored(lab, configured) -> Prometheus:
    """site.yml on the whole lab (the session's `configured`), then the main job of `make lab` (LAB_FLOWS, here from
    the controller); Prometheus, verified with the fleet CA read from the lab's OpenBao (as `spark status` does)."""
    for step in (["backup", "now"], ["drill", "run"], ["backup", "maintain"], ["sync", "run"],
                 ["mesh", "check", "--publish"]):
        done = spark(*step, "--env", lab.fleet.name, timeout=900)
        assert done.returncode == 0, f"{' '.join(step)}: {done.stdout[-3000:]}{done.stderr[-2000:]}"
    # The usage guard runs from cron every 5 minutes; run it once now on every host (what cron runs), so its
    # figures are there without waiting for the clock, and a guard that fails says why here.
    for host in managed_hosts(lab.fleet):
        guard = lab.exec(host, "/usr/local/sbin/spark-usage-guard /etc/spark/usage-guard.json")
        assert guard.returncode == 0, f"{host}: spark-usage-guard: {guard.stderr[-2000:]}"
    return Prometheus(prometheus_url(lab.fleet), fleet_client_context(lab.fleet.name))


def test_monitoring_role_second_run_changes_nothing(lab, monitored, tmp_path):
    playbook = tmp_path / "monitoring.yml"
    playbook.write_text(PLAYBOOK)
    run = lab.playbook(playbook)
    assert run.hosts == {lab.fleet.services["prometheus"].host}
    assert all(c["changed"] == 0 for c in run.stats.values()), "\n".join(run.changed_tasks)


def test_prometheus_scrapes_every_node_exporter_over_tls_the_edge_over_the_mesh(lab, monitored):
    overlay = load_state(lab.state_dir, "fleet")
    assert overlay is not None

    def node_targets() -> dict[str, dict[str, Any]] | None:
        active = monitored.get("/api/v1/targets?state=active")["activeTargets"]
        node = {t["labels"]["host"]: t for t in active if t["labels"]["job"] == "node"}
        return node if node and all(t["health"] == "up" for t in node.values()) else None

    targets = until("every node exporter target up", node_targets, 120, every=2, tolerate=(OSError, ValueError))
    assert set(targets) == set(managed_hosts(lab.fleet))
    for host, target in targets.items():
        url = urllib.parse.urlparse(target["scrapeUrl"])
        assert url.scheme == "https", f"{host} is scraped in plaintext"  # and up: verified against the fleet CA
        address = url.hostname
        if lab.fleet.behind_nat(host):
            assert address == str(overlay.hosts[host].address), f"{host} is not scraped over the mesh"
        else:
            assert address == str(lab.fleet.hosts[host].address)
    services = {r["metric"]["job"]: r["value"][1] for r in query(monitored, 'up{job!="node"}')}
    assert services == {"prometheus": "1", "alertmanager": "1"}
    for target in monitored.get("/api/v1/targets?state=active")["activeTargets"]:
        assert target["scrapeUrl"].startswith("https://"), target["scrapeUrl"]
    [manager] = monitored.get("/api/v1/alertmanagers")["activeAlertmanagers"]
    assert manager["url"].startswith("https://"), "Prometheus sends alerts in plaintext"


def test_prometheus_and_alertmanager_serve_only_tls_with_their_hosts_certificate(lab, monitored):
    """Both answer the controller over https, verified against the fleet CA, with their host's certificate (its
    name and LAN address); a plaintext request gets no answer but the TLS server's refusal."""
    for name in ("prometheus", "alertmanager"):
        service = lab.fleet.services[name]
        address = str(lab.fleet.hosts[service.host].address)
        found = served_certificate(lab.exec, service.host, address, service.port)
        assert [["commonName", service.host]] in found["subject"], (name, found["subject"])
        assert ["IP Address", address] in found["subjectAltName"], (name, found["subjectAltName"])
        url = service_url(lab.fleet, service.host, service.port)
        assert url.startswith("https://")
        with urllib.request.urlopen(f"{url}/-/ready", timeout=10, context=monitored.context) as reply:
            assert reply.status == 200, name
        with pytest.raises(urllib.error.HTTPError) as plaintext:
            urllib.request.urlopen(f"http://{address}:{service.port}/-/ready", timeout=10)
        assert plaintext.value.code == 400, name
        assert b"Client sent an HTTP request to an HTTPS server" in plaintext.value.read(), name


def test_every_dashboard_query_returns_data_after_the_main_job(lab, monitored):
    queries = [(f"{uid}/{title}", expr) for uid, board in dashboards(lab.fleet).items()
               for title, expr in panel_queries(board)]
    assert len(queries) > 20
    # the figures the fixture's runs wrote reach Prometheus at its next scrape of each node exporter
    deadline = time.monotonic() + 120
    while True:
        empty = [f"{panel}: {expr}" for panel, expr in queries if not query(monitored, expr)]
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(10)
    assert not empty, "queries without data:\n" + "\n".join(empty)


@contextlib.contextmanager
def webhook(url: str) -> Iterator[list[dict[str, Any]]]:
    """Alertmanager's deliveries to the lab fleet's webhook receiver, on this machine's lab-network address."""
    where = urllib.parse.urlparse(url)
    received: list[dict[str, Any]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            received.append(json.loads(self.rfile.read(length)))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((where.hostname or "", where.port or 80), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield received
    finally:
        server.shutdown()
        server.server_close()


def delivered(received: list[dict[str, Any]], status: str, alert: str, host: str) -> bool:
    return any(a["status"] == status and a["labels"].get("alertname") == alert and a["labels"].get("host") == host
               for payload in received for a in payload.get("alerts", []))


def run_backup(lab) -> Any:
    """One backup of pi-1 (no offsite copy), in this process, reported to the lab's Prefect server (the
    `lab_flows` fixture points this process at it, with its API auth string)."""
    from flows.backup import backup
    from primespark.orchestration.runs import in_process_runs

    with in_process_runs():
        return backup("pi-1", "lab", "ssh", offsite=False, return_state=True, **FAST)


def test_spark_status_lists_every_host_and_exits_zero_when_healthy(lab, monitored):
    done = until("spark status exits 0", lambda: (d := spark("status", "--env", "lab", timeout=120))
                 and d.returncode == 0 and d, 180, every=5)
    for host in managed_hosts(lab.fleet):
        assert host in done.stdout
    assert "no alerts firing" in done.stdout


def test_a_backup_cut_off_from_the_nas_alerts_through_alertmanager_and_resolves(lab, monitored, lab_flows):
    nas = lab.fleet.hosts["nas-1"]
    receiver = lab.fleet.monitoring.receivers["controller"].url
    assert receiver is not None
    pi_address = str(lab.fleet.hosts["pi-1"].address)
    cut = f"iptables -I INPUT -p tcp --dport {nas.ssh.port} -s {pi_address} -j REJECT --reject-with tcp-reset"
    with webhook(receiver) as received:
        assert lab.exec("nas-1", cut).returncode == 0
        try:
            assert run_backup(lab).is_failed()
            until("BackupFailed for pi-1 delivered to the webhook",
                  lambda: delivered(received, "firing", "BackupFailed", "pi-1"), 120)
            status = spark("status", "--env", "lab", timeout=120)
            assert status.returncode == 2, status.stdout + status.stderr
            assert "BackupFailed" in status.stdout and "pi-1" in status.stdout
        finally:
            lab.exec("nas-1", cut.replace("-I INPUT", "-D INPUT"))
        assert run_backup(lab).is_completed()
        until("BackupFailed for pi-1 resolved at the webhook",
              lambda: delivered(received, "resolved", "BackupFailed", "pi-1"), 180)
    assert until("spark status back to 0", lambda: spark("status", "--env", "lab", timeout=120).returncode == 0, 120)


def test_a_certificate_rotated_under_a_continuous_scrape_loses_no_scrape(lab, monitored, tmp_path):
    """pi-1's and ops-1's certificates and keys replaced now (the tls role with tls_force, as for a key that may have
    leaked) while Prometheus scrapes every interval: pi-1's exporter (over the mesh), and on ops-1 the exporter,
    Prometheus itself and Alertmanager. Each serves the new certificate without a restart, and every scrape from
    before the rotation to three intervals after it succeeded. The Prefect API on ops-1 serves it too."""
    prometheus, alertmanager = lab.fleet.services["prometheus"], lab.fleet.services["alertmanager"]
    rotated_hosts = ("pi-1", prometheus.host)
    assert alertmanager.host == prometheus.host
    port = lab.fleet.monitoring.node_exporter_port
    served = {f'up{{job="node",host="{h}"}}': (h, port) for h in rotated_hosts}
    served |= {f'up{{job="{name}"}}': (svc.host, svc.port)
               for name, svc in (("prometheus", prometheus), ("alertmanager", alertmanager))}
    interval = float(lab.fleet.monitoring.scrape_interval.removesuffix("s"))

    def serials() -> dict[str, str]:
        return {selector: served_certificate(lab.exec, host, str(lab.fleet.hosts[host].address), at)["serialNumber"]
                for selector, (host, at) in served.items()}

    orchestration = lab.fleet.orchestration
    assert orchestration is not None and orchestration.server.host == prometheus.host
    prefect_at = (str(lab.fleet.hosts[orchestration.server.host].address), orchestration.server.port)

    def prefect_serial() -> str:
        return str(served_certificate(lab.exec, orchestration.server.host, *prefect_at)["serialNumber"])

    before = serials()
    prefect_before = prefect_serial()
    started = time.time()
    playbook = tmp_path / "tls.yml"
    playbook.write_text(TLS_PLAYBOOK)
    lab.playbook(playbook, limit=",".join(rotated_hosts), extravars={"tls_force": True})
    rotated = time.time()
    after = serials()
    kept = [selector for selector in served if after[selector] == before[selector]]
    assert not kept, f"still the old certificate behind {kept}"
    # the Prefect server on ops-1 loads the new one into its live TLS context within seconds, without a restart
    until("the Prefect API serving ops-1's new certificate", lambda: prefect_serial() != prefect_before, 30, every=1)

    def last_scrapes() -> bool:
        return all(found and float(found[0]["value"][1]) > rotated + 3 * interval
                   for found in (query(monitored, f"timestamp({selector})") for selector in served))

    until("three scrapes of each after the rotation", last_scrapes, 60 + 5 * interval, every=interval)
    window = int(time.time() - started) + 1
    print(f"rotation took {rotated - started:.1f} s")
    for selector in served:
        [worst] = query(monitored, f"min_over_time({selector}[{window}s])")
        [count] = query(monitored, f"count_over_time({selector}[{window}s])")
        scrapes = int(float(count["value"][1]))
        print(f"{selector}: {scrapes} scrapes in {window} s, the worst up {worst['value'][1]}")
        assert worst["value"][1] == "1", f"a scrape of {selector} failed during the rotation"
        assert scrapes >= int(window / interval) - 1, f"{selector}: {scrapes} scrapes in {window} s at {interval} s"
