"""End to end in the lab: its secrets live in its own OpenBao (not dev mode), where production keeps them.

After `spark lab up` and site.yml: the restic passwords, the restic SFTP client keys and the mesh keys are in
OpenBao and nowhere in the clear in the lab's state directory; the hosts hold exactly those values; a lab host
that runs services logs in with its AppRole over its LAN and reads its own service secrets only. A backup and
a drill read their password from OpenBao; sealed, the next backup fails in one line and changes nothing;
`spark lab up` unseals it (or starts it again) and the backup works.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from lab_cli import SPARK

from primespark.cloud.catalog import readable_services, secret_path
from primespark.cloud.services import role_name
from primespark.cloud.vault_spec import issue_secret_id
from primespark.lab.openbao import listener_ca_file
from primespark.lab.topology import network_name
from primespark.mesh.keys import public_key_of

pytestmark = pytest.mark.lab

FAST = {"retries": 2, "retry_delay_seconds": 1.0}
PREFIX = "primespark/lab"  # secrets.prefix and the environment

# Runs inside a lab host: AppRole login over HTTP (the secret-id on stdin), then a read of each path.
APPROLE = """
import json, ssl, sys, urllib.error, urllib.request
spec = json.load(sys.stdin)
tls = ssl.create_default_context(cadata=spec["ca"])  # the lab's OpenBao listener CA only
def call(path, body=None, token=None):
    req = urllib.request.Request(spec["address"] + "/v1/" + path, method="POST" if body else "GET",
                                 data=json.dumps(body).encode() if body else None,
                                 headers={"X-Vault-Token": token} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10, context=tls) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as exc:
        return exc.code, None
status, login = call("auth/approle/login", {"role_id": spec["role_id"], "secret_id": spec["secret_id"]})
token = login["auth"]["client_token"]
print(json.dumps({p: call(spec["mount"] + "/data/" + p, token=token) for p in spec["paths"]}))
"""


def kv(client, path: str) -> dict[str, str]:
    return client.secrets.kv.v2.read_secret_version(path=path, mount_point="secret",
                                                    raise_on_deleted_version=True)["data"]["data"]


def listed(client, path: str) -> list[str]:
    return client.secrets.kv.v2.list_secrets(path=path, mount_point="secret")["data"]["keys"]


def local_store_files(lab) -> list[str]:
    root = lab.state_dir / "secrets"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_openbao_runs_unsealed_from_the_state_dir_and_is_initialised_once(lab):
    bao = lab.lab.openbao
    assert bao is not None and bao.state() == "unsealed"
    assert lab.first_up.openbao is not None and lab.first_up.openbao.started  # `lab down` had stopped it
    assert bao.data_dir.is_relative_to(lab.state_dir) and any(bao.data_dir.rglob("*.db"))
    assert json.loads(bao.credentials_file.read_text()).keys() == {"unseal_key", "root_token"}
    assert bao.credentials_file.stat().st_mode & 0o777 == 0o600 and lab.state_dir.stat().st_mode & 0o777 == 0o700
    assert "-dev" not in Path(f"/proc/{bao.pid()}/cmdline").read_bytes().decode().split("\0")


def test_fleet_secrets_are_in_openbao_and_not_in_the_local_store(lab, configured):
    fleet, spec = lab.fleet, lab.fleet.backup
    client = lab.lab.openbao.root_client()
    # where the fleet's vault: references point: a secret per repository (each worker reads its site's only)
    passwords = {name: kv(client, f"{PREFIX}/restic/{name}")["password"] for name in spec.repositories}
    assert all(passwords.values())
    assert {k.rstrip("/") for k in listed(client, f"{PREFIX}/restic/ssh/")} >= set(spec.plans)
    members = fleet.mesh_members("fleet")
    assert sorted(listed(client, f"{PREFIX}/mesh/fleet/")) == sorted(members)
    services = [secret_path(fleet, name) for name in readable_services(fleet, "core-1")]
    assert services and all(kv(client, path) for path in services)  # service secrets, as `spark up` makes them

    # The hosts hold exactly what OpenBao holds.
    on_pi = lab.exec("pi-1", "cat /etc/primespark/restic/nas-primary.password")
    assert on_pi.returncode == 0 and on_pi.stdout.strip() == passwords["nas-primary"]
    for host in ("pi-1", "core-1"):
        bundle = json.loads(kv(client, f"{PREFIX}/mesh/fleet/{host}")["value"])
        assert lab.exec(host, "wg show wg0 public-key").stdout.strip() == public_key_of(bundle["private_key"])
    assert kv(client, f"{PREFIX}/restic/ssh/pi-1")["value"].strip() == \
        lab.exec("pi-1", "cat /etc/primespark/restic/backup-pi-1.key").stdout.strip()

    # ... and the state directory holds none of them: no local store, no value in any file in the clear.
    assert local_store_files(lab) == []
    values = [*passwords.values(), json.loads(kv(client, f"{PREFIX}/mesh/fleet/pi-1")["value"])["private_key"]]
    for path in lab.state_dir.rglob("*"):
        if path.is_file() and "image-cache" not in path.parts and path.stat().st_size < 64 << 20:
            data = path.read_bytes()
            assert not any(v.encode() in data for v in values), f"a secret in the clear in {path}"


def test_a_host_with_services_reads_its_own_secrets_over_its_lan_and_no_others(lab, configured):
    fleet = lab.fleet
    bao = lab.lab.openbao
    cloud = next(n for n in lab.lab.plan().networks if n.name == network_name(fleet, "cloud"))
    assert cloud.gateway in bao.spec.listen
    # The edge LAN has no service host, but the edge's Prefect worker (nas-1) logs in there with its AppRole
    edge = next(n for n in lab.lab.plan().networks if n.name == network_name(fleet, "edge"))
    assert fleet.orchestration is not None and fleet.orchestration.workers["edge"].host == "nas-1"
    assert lab.probe("nas-1", [(str(edge.gateway), bao.spec.port)])[(str(edge.gateway), bao.spec.port)]

    client = bao.root_client()
    own = [secret_path(fleet, name) for name in readable_services(fleet, "core-1")]
    other = secret_path(fleet, "grafana")
    assert other not in own
    address = bao.spec.address_on(cloud.gateway)
    assert address.startswith("https://"), "hosts reach it only over TLS"
    spec = {"address": address, "role_id": role_name(fleet, "core-1"), "mount": "secret",
            "secret_id": issue_secret_id(client, fleet, "core-1"), "paths": [*own, other],
            "ca": listener_ca_file(lab.state_dir).read_text()}
    plain = lab.exec("core-1", f"curl -sS --max-time 10 http://{cloud.gateway}:{bao.spec.port}/v1/sys/health")
    assert '"initialized"' not in plain.stdout, "OpenBao answered in plaintext on the bridge"
    assert "HTTP request to an HTTPS server" in plain.stdout, (plain.stdout, plain.stderr)
    done = subprocess.run(["docker", "exec", "-i", lab.container("core-1"), "python3", "-c", APPROLE],
                          input=json.dumps(spec), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout)
    for path in own:
        status, body = answers[path]
        assert status == 200 and body["data"]["data"] == kv(client, path)
    assert answers[other][0] == 403


def test_backup_and_drill_use_openbao_and_sealed_it_fails_in_a_line_changing_nothing(lab, configured, lab_flows):
    from flows.backup import backup
    from flows.dr_drill import dr_drill
    from primespark.backup.repositories import restic_for
    from primespark.context import FleetContext

    root = lab.fleet.backup.plans["pi-1"].paths[0]
    assert lab.exec("pi-1", f"mkdir -p {root}/secrets-test && head -c 100000 /dev/urandom > "
                            f"{root}/secrets-test/data.bin").returncode == 0
    assert backup("pi-1", "lab", "ssh", offsite=False, **FAST)["snapshot"]
    assert dr_drill("pi-1", "lab", "ssh")["result"] == "pass"
    restic = restic_for(FleetContext.load("lab", "ssh"), "nas-primary", "pi-1")
    snapshots = [s.id for s in restic.snapshots()]

    lab.lab.openbao.root_client().sys.seal()
    try:
        assert lab.lab.openbao.state() == "sealed"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}  # spark needs none
        done = subprocess.run([SPARK, "backup", "now", "pi-1", "--env", "lab"], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        error = done.stderr[done.stderr.index("error: "):].splitlines()
        # The first thing the command reads from the store is the fleet CA, which verifies the Prefect API (the
        # runs are recorded on the fleet's server, over TLS): it stops there, in one line, before any backup step.
        assert error[0] == (f"error: secret store sealed: Vault at {lab.lab.openbao.address} answered "
                            "'Vault is sealed' while reading the fleet CA"), error
        assert error[1:] == ["    fix: run `spark lab up --env lab`: it starts the lab's OpenBao and unseals it"]
        # A run already under way (a flow, as a worker runs it) fails its backup step with the same reason.
        state = backup("pi-1", "lab", "ssh", offsite=False, return_state=True, **FAST)
        reason = str(state.result(raise_on_failure=False))
        assert state.is_failed() and reason.startswith(
            "backup of pi-1 into nas-primary failed: secret store sealed: Vault at "), reason
    finally:
        again = lab.lab.up()  # what the fix says; also when an assertion above failed: the lab stays usable
    assert again.openbao is not None and again.openbao.unsealed and not again.openbao.initialised
    assert [s.id for s in restic.snapshots()] == snapshots, "a snapshot was made while sealed"
    assert local_store_files(lab) == [], "a secret was made in a local store"
    assert backup("pi-1", "lab", "ssh", offsite=False, **FAST)["snapshot"] not in snapshots

    # Stopped rather than sealed: unreachable, after the retries; `lab up` starts it and unseals it again.
    lab.lab.openbao.stop()
    state = backup("pi-1", "lab", "ssh", offsite=False, return_state=True, **FAST)
    reason = str(state.result(raise_on_failure=False))
    assert state.is_failed() and "secret store unreachable: no answer from Vault at" in reason, reason
    restarted = lab.lab.up()
    assert restarted.openbao.started and restarted.openbao.unsealed and not restarted.openbao.initialised
    assert backup("pi-1", "lab", "ssh", offsite=False, **FAST)["snapshot"]
    lab.exec("pi-1", f"rm -rf {root}/secrets-test")
