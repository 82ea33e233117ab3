"""End to end: site.yml configures every lab host, a second run changes nothing, and the result holds up
(firewall open set from another host, sshd policy, node exporter and its textfile collector, SFTP chroot).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from lab_cli import FLEET_CA, TLS_PLAYBOOK, served_certificate

from primespark.fleet.model import HostKind
from primespark.inventory import build_inventory, managed_hosts
from primespark.playbook import run_ansible

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
# Ports scanned on every target: the fleet's, some that are never allowed, and a throw-away listener.
DENIED_PORTS = [21, 25, 80, 111, 443, 2049, 3306, 4200, 8080, 47124]
DECOY_PORT = 47124

# Runs inside a lab host: TCP connect to each target, and tell open (accepted), closed (refused:
# the host answered) from filtered (no answer within the timeout: the firewall dropped it).
SCAN = """
import json, socket, sys
from concurrent.futures import ThreadPoolExecutor
targets, timeout = json.loads(sys.argv[1]), float(sys.argv[2])
def scan(t):
    try:
        socket.create_connection((t[0], t[1]), timeout=timeout).close()
        return "open"
    except ConnectionRefusedError:
        return "closed"
    except OSError:
        return "filtered"
with ThreadPoolExecutor(len(targets)) as pool:
    print(json.dumps(list(pool.map(scan, targets))))
"""


def test_site_playbook_configures_every_host(lab, configured):
    assert configured.hosts == set(managed_hosts(lab.fleet))
    for host, counts in configured.stats.items():
        assert counts["failures"] == 0 and counts["unreachable"] == 0, (host, counts)
        assert counts["ok"] > 10, (host, counts)


def test_second_run_changes_nothing(lab, configured):
    run = lab.playbook("site.yml")
    assert run.hosts == set(managed_hosts(lab.fleet))
    changed = {host: counts["changed"] for host, counts in run.stats.items()}
    assert all(n == 0 for n in changed.values()), f"{changed}: " + "\n".join(run.changed_tasks)


def test_raw_answers_from_a_host_without_python(lab):
    # preflight's probe is `raw`, to find hosts without Python; under Mitogen (ansible.cfg's strategy) raw
    # would need one, so run_ansible runs it with the linear strategy. A missing interpreter stands in here.
    run = run_ansible(Path(f"inventory/{lab.fleet.name}.fleet.yml"), module="raw", module_args="echo raw-ok",
                      limit="pi-1", extravars={"ansible_python_interpreter": "/nonexistent/python3"}, root=REPO)
    assert run.rc == 0, "\n".join(run.failed_tasks) or run.output[-3000:]
    assert run.results["pi-1"][-1]["stdout"].strip() == "raw-ok"


def scan(lab, scanner: str, target: str, ports: list[int]) -> dict[int, str]:
    address = str(lab.fleet.hosts[target].address)
    done = lab.exec(scanner, ["python3", "-c", SCAN, json.dumps([[address, p] for p in ports]), "2"])
    assert done.returncode == 0, done.stderr
    return dict(zip(ports, json.loads(done.stdout), strict=True))


def scanner_for(lab, target: str) -> str:
    site = lab.fleet.hosts[target].site
    return next(h for h in managed_hosts(lab.fleet) if h != target and lab.fleet.hosts[h].site == site)


@pytest.mark.parametrize("kind", [HostKind.pi, HostKind.nas, HostKind.vm])
def test_firewall_answers_on_exactly_the_allowed_ports(lab, configured, kind):
    hostvars = build_inventory(lab.fleet)["_meta"]["hostvars"]
    targets = [h for h in managed_hosts(lab.fleet) if lab.fleet.hosts[h].kind is kind]
    # A host with services if the kind has one, so that service ports are part of what is checked.
    target = max(targets, key=lambda h: len(hostvars[h]["spark_services"]))
    allowed = {lab.fleet.hosts[target].ssh.port, lab.fleet.monitoring.node_exporter_port,
               *(s["port"] for s in hostvars[target]["spark_services"]),
               *([hostvars[target]["spark_prefect_server_port"]] if hostvars[target]["spark_prefect_server_port"]
                 else [])}
    ports = sorted(allowed | set(DENIED_PORTS))

    # Something listens on the decoy port: if it stays unanswered, the firewall dropped it.
    decoy = subprocess.Popen(["docker", "exec", lab.container(target), "python3", "-c",
                              "import socket, time; s = socket.socket(); "
                              f"s.bind(('0.0.0.0', {DECOY_PORT})); s.listen(); time.sleep(30)"])
    try:
        listening = ""
        for _ in range(50):
            listening = lab.exec(target, f"ss -Htln 'sport = :{DECOY_PORT}'").stdout
            if listening.strip():
                break
        assert listening.strip(), "the decoy listener did not start"
        result = scan(lab, scanner_for(lab, target), target, ports)
    finally:
        decoy.kill()
    answering = {p for p, state in result.items() if state != "filtered"}
    assert answering == allowed, f"{target} ({kind.value}): {result}"
    assert result[lab.fleet.hosts[target].ssh.port] == "open"
    assert result[lab.fleet.monitoring.node_exporter_port] == "open"


def test_nas_exports_the_warm_tier_to_the_overlay_only(lab, configured):
    nas = next(h for h in managed_hosts(lab.fleet) if lab.fleet.hosts[h].kind is HostKind.nas)
    overlay = str(next(iter(lab.fleet.meshes.values())).overlay)
    exports = lab.exec(nas, "cat /etc/exports.d/spark.exports").stdout
    warm = lab.fleet.tiers["warm"].path
    assert f"{warm} {overlay}(" in exports
    rules = lab.exec(nas, "nft list table inet spark_filter").stdout
    assert "ip saddr @overlay tcp dport 2049 accept" in rules


def test_sshd_takes_keys_only_and_modern_ciphers(lab, configured):
    pis = [h for h in managed_hosts(lab.fleet) if lab.fleet.hosts[h].kind is HostKind.pi]
    target, client = pis[0], pis[1]
    address = str(lab.fleet.hosts[target].address)
    opts = "-o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=5"
    password = lab.exec(client, f"ssh {opts} -o PubkeyAuthentication=no spark@{address} true")
    assert password.returncode != 0 and "Permission denied (publickey)" in password.stderr, password.stderr
    weak = lab.exec(client, f"ssh {opts} -c aes128-cbc spark@{address} true")
    assert weak.returncode != 0 and "no matching cipher" in weak.stderr, weak.stderr
    effective = lab.exec(target, "sshd -T -C user=spark,host=x,addr=127.0.0.1").stdout
    assert "passwordauthentication no" in effective and "permitrootlogin no" in effective


def test_node_exporter_serves_textfile_metrics_to_another_host(lab, configured):
    target, scanner = "pi-1", "pi-2"
    textfile = lab.fleet.monitoring.textfile_dir
    assert lab.exec(target, f"echo 'spark_lab_probe 42' > {textfile}/spark_lab_probe.prom").returncode == 0
    guard = lab.exec(target, "/usr/local/sbin/spark-usage-guard /etc/spark/usage-guard.json")
    assert guard.returncode == 0, guard.stderr
    url = f"https://{lab.fleet.hosts[target].address}:{lab.fleet.monitoring.node_exporter_port}/metrics"
    metrics = lab.exec(scanner, f"curl -fsS --max-time 10 --cacert {FLEET_CA} {url}").stdout
    assert "spark_lab_probe 42" in metrics
    hot = lab.fleet.tiers["hot"].path
    assert f'spark_storage_over_quota{{name="tier-hot",path="{hot}"}} 0' in metrics


def test_every_node_exporter_serves_only_tls_with_its_own_certificate_from_the_fleet_ca(lab, configured):
    """Each host's exporter, reached at its LAN address: its certificate verifies against the fleet CA (the one the
    lab's OpenBao holds), names that host, and a plaintext request gets no metrics. The key is readable by the
    serving accounts' group only, and only in served.pem."""
    from primespark.context import FleetContext
    from primespark.pki import fleet_ca_pem

    fleet_ca = fleet_ca_pem(FleetContext.load(lab.fleet.name))
    assert "BEGIN CERTIFICATE" in fleet_ca
    port = lab.fleet.monitoring.node_exporter_port
    for host in managed_hosts(lab.fleet):
        address = lab.fleet.hosts[host].address
        assert lab.exec(host, f"cat {FLEET_CA}").stdout.strip() == fleet_ca.strip(), f"{host} holds the fleet CA"
        found = served_certificate(lab.exec, host, str(address), port)
        assert [["commonName", host]] in found["subject"], (host, found["subject"])
        assert ["DNS", host] in found["subjectAltName"] and ["IP Address", str(address)] in found["subjectAltName"]
        plain = lab.exec(host, f"curl -sS --max-time 10 http://{address}:{port}/metrics")
        assert "node_load1" not in plain.stdout, f"{host} served metrics in plaintext"
        assert "HTTP request to an HTTPS server" in plain.stdout, (host, plain.stdout, plain.stderr)
        folder = FLEET_CA.rsplit("/", 1)[0]
        key = lab.exec(host, f"stat -c '%U %G %a' {folder}/served.pem").stdout.strip()
        assert key == "root primespark-tls 640", (host, key)
        assert lab.exec(host, f"test -e {folder}/key.pem").returncode == 1, "the key only in served.pem"


def test_every_host_renews_its_own_certificate_on_a_timer(lab, configured):
    """Each host has spark-tls-renew, run hourly by cron with its own TLS AppRole (its secret-id 0600): the command
    cron runs keeps a certificate that is not due and writes its expiry metrics; forced, it renews, and the host's
    exporter serves the new certificate at once, without a restart."""
    import re

    from primespark.monitoring import metrics as m
    from primespark.pki import TLS_GID

    textfile = lab.fleet.monitoring.textfile_dir
    port = lab.fleet.monitoring.node_exporter_port
    for host in managed_hosts(lab.fleet):
        cron = lab.exec(host, "cat /etc/cron.d/spark-tls-renew").stdout
        hourly = re.search(r"^(\d+) \* \* \* \* root (/usr/local/sbin/spark-tls-renew) (>>.*)$", cron, re.M)
        assert hourly and 0 <= int(hourly.group(1)) <= 59, (host, cron)
        owner = lab.exec(host, "stat -c '%U %G %a' /etc/spark/tls-renew.secret-id").stdout.strip()
        assert owner == "root root 600", (host, owner)
        # the key's group has the fleet's number on every host: containers join it by number (compose group_add)
        served = lab.exec(host, "stat -c '%U %g %a' /etc/ssl/primespark/served.pem").stdout.strip()
        assert served == f"root {TLS_GID} 640", (host, served)
        run = lab.exec(host, f"{hourly.group(2)}; echo rc=$?")  # as cron runs it, without its log redirection
        assert f"{host}: kept (not due)" in run.stdout and "rc=0" in run.stdout, (host, run.stdout, run.stderr)
        prom = lab.exec(host, f"cat {textfile}/primespark_tls_{host}.prom").stdout
        assert f'{m.TLS_NOT_AFTER.name}{{certificate="/etc/ssl/primespark/cert.pem"}}' in prom, (host, prom)

    address = str(lab.fleet.hosts["pi-2"].address)
    before = served_certificate(lab.exec, "pi-2", address, port)
    forced = lab.exec("pi-2", "/usr/local/sbin/spark-tls-renew --force")
    assert forced.returncode == 0 and "pi-2: renewed (forced)" in forced.stdout, forced.stderr
    after = served_certificate(lab.exec, "pi-2", address, port)
    assert after["serialNumber"] != before["serialNumber"], "the exporter serves the new certificate"
    assert ["DNS", "pi-2"] in after["subjectAltName"]


def test_the_tls_role_refuses_a_key_group_with_another_number(lab, configured, tmp_path):
    """Containers join primespark-tls by number, so a host whose group has another one is stopped with the fix, and
    nothing of its certificate changes."""
    from primespark.pki import TLS_GID

    host = "pi-3"
    before = lab.exec(host, "sha256sum /etc/ssl/primespark/served.pem").stdout
    assert lab.exec(host, f"groupmod -g {TLS_GID + 1} primespark-tls").returncode == 0
    try:
        book = tmp_path / "tls.yml"
        book.write_text(TLS_PLAYBOOK)
        run = lab.playbook(book, limit=host, check=False)
        assert run.rc != 0
        message = run.output[-4000:]
        assert f"primespark-tls has GID {TLS_GID + 1} on {host}, the fleet's is {TLS_GID}" in message, message
        assert f"groupmod -g {TLS_GID} primespark-tls" in message
        assert lab.exec(host, "sha256sum /etc/ssl/primespark/served.pem").stdout == before
    finally:
        lab.exec(host, f"groupmod -g {TLS_GID} primespark-tls")


def test_pi_gets_its_power_profile_and_hot_tier(lab, configured):
    status = lab.exec("pi-1", "/usr/local/sbin/spark-power status").stdout
    assert "no cpufreq" in status  # containers have no cpufreq: said, not failed
    cron = lab.exec("pi-1", "cat /etc/cron.d/spark-power").stdout
    start, end = lab.fleet.hosts["pi-1"].power.quiet_hours
    assert f"{int(start[3:])} {int(start[:2])} * * * root /usr/local/sbin/spark-power auto" in cron
    assert f"{int(end[3:])} {int(end[:2])} * * * root /usr/local/sbin/spark-power auto" in cron
    hot = lab.fleet.tiers["hot"].path
    layout = lab.exec("pi-1", f"stat -c '%n %U %a' {hot}/incoming {hot}/work").stdout.split("\n")
    assert layout[0] == f"{hot}/incoming spark-agent 750"
    running = lab.exec("pi-1", "pgrep -x cron && pgrep -x chronyd && pgrep -f prometheus-node-exporter")
    assert running.returncode == 0, "cron, chronyd and the node exporter run without systemd"


def test_backup_account_is_sftp_only_and_chrooted(lab, configured, tmp_path):
    nas = next(h for h in managed_hosts(lab.fleet) if lab.fleet.hosts[h].kind is HostKind.nas)
    hostvars = build_inventory(lab.fleet)["_meta"]["hostvars"]
    account: dict[str, Any] = next(a for a in hostvars[nas]["spark_backup_accounts"] if a["client"] != nas)
    client = account["client"]
    # The restic role gives each client its account's key; without it, authorise a key made here.
    key_path = f"{lab.fleet.backup.client_dir}/{account['user']}.key"
    replaced = lab.exec(client, f"test -s {key_path}").returncode != 0
    if replaced:
        key = tmp_path / "backup_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        keys = {"nas_backup_authorized_keys": {client: [key.with_suffix(".pub").read_text().strip()]}}
        lab.playbook("site.yml", limit=nas, extravars=keys)
        key_path = "/root/backup_key"
        subprocess.run(["docker", "cp", str(key), f"{lab.container(client)}:{key_path}"], check=True)
        lab.exec(client, f"chmod 600 {key_path}")
    try:
        check_backup_account(lab, nas, client, account, key_path)
    finally:
        if replaced:  # the NAS gets every client's own key back (from the secret store), for the tests after this
            lab.playbook("site.yml", limit=nas)


def check_backup_account(lab, nas: str, client: str, account: dict[str, Any], key_path: str) -> None:
    """SFTP only, chrooted to the account's folder, files owned by the account, no shell."""
    address = str(lab.fleet.hosts[nas].address)
    opts = (f"-i {key_path} -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
            "-o ConnectTimeout=5")
    batch = f"pwd\\nls /\\nput /etc/hostname {account['path']}/probe\\nls {account['path']}\\ncd /etc\\n"
    sftp = lab.exec(client, f"printf '{batch}' | sftp -b - {opts} {account['user']}@{address}")
    assert "Remote working directory: /" in sftp.stdout, sftp.stdout + sftp.stderr
    assert f"{account['path']}/probe" in sftp.stdout
    # The batch stops at `cd /etc`: the chroot has no /etc.
    assert sftp.returncode != 0 and "No such file" in sftp.stderr, sftp.stderr
    stored = lab.exec(nas, f"stat -c '%U' {account['chroot']}{account['path']}/probe").stdout.strip()
    assert stored == account["user"]
    shell = lab.exec(client, f"ssh {opts} {account['user']}@{address} id")
    assert "uid=" not in shell.stdout, "a backup account never gets a shell"
    lab.exec(nas, f"rm -f {account['chroot']}{account['path']}/probe")


def test_lab_data_gives_backups_and_drills_files_to_verify(lab, configured, lab_flows):
    """site.yml's lab-only role filled every plan's paths once (the second run above changed nothing): a few
    hundred files of mixed sizes, which a backup saves and a drill compares one by one."""
    from flows.backup import backup
    from flows.dr_drill import dr_drill

    hostvars = build_inventory(lab.fleet)["_meta"]["hostvars"]
    for host in lab.fleet.backup.plans:
        for path in hostvars[host]["spark_backup_paths"]:
            sizes = lab.exec(host, f"find {path} -type f -printf '%s\\n'").stdout.split()
            assert len(sizes) >= 200, (host, path, len(sizes))
            assert len(set(sizes)) >= 100 and "0" in sizes and max(map(int, sizes)) > 100_000, (host, path)
    # lab_flows: runs reported to the lab's Prefect server on ops-1, with its API auth string
    done = backup("pi-2", "lab", "ssh", offsite=False, retries=2, retry_delay_seconds=1.0)
    row = dr_drill("pi-2", "lab", "ssh")
    assert done["manifest_files"] >= 200 and row["result"] == "pass" and row["files"] >= 200, (done, row)


def test_lab_data_dates_files_back_for_the_first_tier_pass_to_move(lab, configured, lab_flows):
    """One file in 20 is three days old (the lab's hot tier keeps a day): the first pass, `make lab`'s, moves
    them. Neither a sync's nor a backup's read made them look used. Either they wait in the plan or a scheduled
    pass moved them already (then the catalog has them)."""
    from primespark.context import FleetContext
    from primespark.data import migrate
    from primespark.fleet.model import TierName
    from primespark.orchestration.locks import hold, tier_lock

    ctx = FleetContext.load("lab", "ssh")
    found = {}
    for pi in ("pi-1", "pi-2"):
        with hold(tier_lock(pi)):  # no scheduled pass between the plan and the catalog's answer
            plan, _ = migrate.plan_pass(ctx, TierName.hot, [pi])
            moved = migrate.ls(ctx, f"{pi}:/srv/hot")
        waiting = [m for m in plan.moves if m.path.rsplit("/", 1)[-1].startswith("lab-")]
        gone = [r["origin_path"] for r in moved if r["origin_path"].rsplit("/", 1)[-1].startswith("lab-")]
        print(f"{pi}: {len(waiting)} generated files to move, {len(gone)} moved already;",
              {m.path: m.reason for m in waiting})
        found[pi] = (waiting, gone)
    for pi, (waiting, gone) in found.items():
        assert all("older than" in m.reason for m in waiting), (pi, waiting)
        assert len(waiting) + len(gone) >= 10, (pi, waiting, gone)  # 12 dated back, one in the pinned config/
