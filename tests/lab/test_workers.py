"""End to end in the lab: flows run on the sites' workers (docs/workers.md).

site.yml installs the Prefect server on ops-1 and a worker per site (nas-1 for the edge, ops-1 for the cloud);
`spark flows deploy` fills the pools. Runs are created through the API as the UI's Run button does, and must run
on the worker of the site whose hosts they touch, never on this machine. A worker that dies mid-backup (`kill -9`
of its process; separately, its container stopped) leaves no run Running: it is Crashed within two minutes, its
repository's slot is free, its pool NOT_READY; once the worker is back the rescheduled run completes once. Each
worker holds its own site's secrets only.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from lab_cli import spark, until

from primespark.orchestration.submit import worker_of

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
WORKER_HOME = "/var/lib/primespark/worker"
WORKER_ENV = "/etc/primespark/spark-prefect-worker.env"
SUPERVISOR_PID = "/run/primespark/spark-prefect-worker.pid"
TWO_MINUTES = 120


@pytest.fixture(scope="module")
def workers(deployed) -> Any:
    """site.yml (server, worker keys, workers), then the fleet's deployments on the pools, without the watch runs:
    the session's (`deployed`). Applying site.yml again here took 90 s and found nothing to change: the tests
    before put back what they stop, and test_roles' second run of site.yml checks that nothing differs."""
    return deployed


def client():  # type: ignore[no-untyped-def]
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def trigger(name: str, parameters: dict[str, Any] | None = None) -> UUID:
    """A run of deployment `name` created through the API, as the UI's Run button does."""
    with client() as api:
        deployment = api.read_deployment_by_name(name)
        return api.create_flow_run_from_deployment(deployment.id, parameters=parameters or {}).id


def flow_processes_here(run_id: UUID) -> list[int]:
    """Processes on this machine that run (or ran) flow run `run_id`. The lab's containers' processes show in this
    /proc too: only those in this process's own pid namespace are the controller's."""
    found = []
    marker = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    ours = os.readlink("/proc/self/ns/pid")
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "ns" / "pid") != ours:
                    continue  # a lab container's process (a worker's flow run, as it should be)
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def finish(run_id: UUID, timeout: float = 600) -> Any:
    """Wait for the run's end, checking all along that no process here runs it."""
    here: list[int] = []

    def done() -> Any:
        here.extend(flow_processes_here(run_id))
        with client() as api:
            run = api.read_flow_run(run_id)
        return run if run.state is not None and run.state.is_final() else None

    run = until(f"run {run_id} to end", done, timeout, every=0.5)
    assert not here, f"flow run {run_id} ran on the controller: pids {here}"
    return run


def snapshots_of(host: str, run_id: UUID | None = None) -> list[str]:
    """The host's backup snapshots; with `run_id`, those of that flow run only (its run tag: a scheduled backup
    of the host may save its own meanwhile)."""
    from primespark.backup.manifest import run_of
    from primespark.backup.repositories import plan_of, restic_for
    from primespark.context import FleetContext

    ctx = FleetContext.load("lab", "ssh")
    found = restic_for(ctx, plan_of(ctx, host).repository, host).snapshots(tags=["primespark-backup"])
    return [s.id for s in found if run_id is None or run_of(s) == run_id.hex]


def test_deploy_twice_the_second_changes_nothing(lab, workers):
    assert "created" in workers.stdout or "nothing changed" in workers.stdout
    again = spark("flows", "deploy", "--no-watch", "--env", lab.fleet.name)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing changed" in again.stdout, again.stdout


def test_both_pools_are_ready_with_one_worker_each(lab, workers):
    spec = lab.fleet.orchestration
    for site, worker in spec.workers.items():
        pool = f"spark-{site}"

        def ready(pool: str = pool) -> bool:
            with client() as api:
                return api.read_work_pool(pool).status.value == "READY"

        until(f"{pool} READY", ready, 90)
        with client() as api:
            online = [w.name for w in api.read_workers_for_work_pool(pool) if w.status.value == "ONLINE"]
        assert online == [worker.host], (pool, online)
    status = spark("flows", "status", "--env", lab.fleet.name)
    assert status.returncode == 0 and status.stdout.count("READY") == 2, status.stdout + status.stderr


def test_an_edge_backup_triggered_through_the_api_runs_on_the_edge_worker(lab, workers):
    run_id = trigger("backup/backup-pi-1")
    run = finish(run_id)
    assert run.state.is_completed(), run.state.message
    assert run.work_pool_name == "spark-edge" and worker_of(run) == "nas-1", run
    assert len(snapshots_of("pi-1", run_id)) == 1


def test_a_cloud_deployment_runs_on_the_cloud_worker(lab, workers):
    for host in lab.fleet.backup.plans:  # every client's repository exists (and is copied offsite) first
        state = finish(trigger(f"backup/backup-{host}")).state
        assert state.is_completed(), state.message  # the whole reason: pytest cuts a state's repr short
    run = finish(trigger("maintenance/maintenance-offsite"))
    assert run.state.is_completed(), run.state.message
    assert run.work_pool_name == "spark-cloud" and worker_of(run) == "ops-1", run


def test_the_server_keeps_its_runs_in_postgresql_reached_over_its_socket_only(lab, workers):
    from primespark.orchestration.material import LOCAL_POSTGRESQL_URL

    server = lab.fleet.orchestration.server.host
    assert lab.fleet.orchestration.server.postgresql  # inventory/lab.yaml
    env = lab.exec(server, "sed -n 's/^PREFECT_SERVER_DATABASE_CONNECTION_URL=//p' "
                           "/etc/primespark/spark-prefect-server.env")
    assert env.stdout.strip() == LOCAL_POSTGRESQL_URL, env.stdout + env.stderr
    with client() as api:
        [latest] = api.read_flow_runs(limit=1)  # any run the API knows is a row of PostgreSQL's flow_run
    row = lab.exec(server, "runuser -u postgres -- psql -XtAq prefect -c "
                           f"\"SELECT count(*) FROM flow_run WHERE id = '{latest.id}'\"")
    assert row.stdout.strip() == "1", row.stdout + row.stderr
    listening = lab.exec(server, "ss -Hltnp")
    assert listening.returncode == 0 and "postgres" not in listening.stdout, listening.stdout  # no TCP port


def test_each_probe_reaches_its_sites_hosts_from_its_worker(lab, workers):
    for site in lab.fleet.orchestration.workers:
        done = spark("flows", "probe", site, "--env", lab.fleet.name)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"on {lab.fleet.orchestration.workers[site].host}" in done.stdout


# --- a worker that dies ---------------------------------------------------------------------------------------


def worker_pid(lab) -> int:
    supervisor = lab.exec("nas-1", f"cat {SUPERVISOR_PID}").stdout.strip()
    # its children: the worker, and the shared SSH connections its runs left (daemons, re-parented to it)
    found = lab.exec("nas-1", f"pgrep -P {supervisor} -f 'prefect worker start'").stdout.split()
    assert len(found) == 1, found
    return int(found[0])


@contextmanager
def fresh_data(lab, host: str, megabytes: int) -> Iterator[None]:
    """New random data on the host: its backup then takes long enough to be killed in the middle. Removed after,
    with the copy the hot tier's sync job made on the NAS (the mirror to the cloud then drops its own): left there,
    it would keep the sync jobs busy and fill the disks for the tests after."""
    root = lab.fleet.backup.plans[host].paths[0]
    done = lab.exec(host, f"mkdir -p {root} && head -c {megabytes}M /dev/urandom > {root}/large.bin", timeout=300)
    assert done.returncode == 0, done.stderr
    try:
        yield
    finally:
        lab.exec(host, f"rm -f {root}/large.bin")
        lab.exec("nas-1", f"rm -f /srv/warm/{host}/large.bin")


def lock_slots(repository: str) -> int:
    from primespark.orchestration.locks import repository_lock

    with client() as api:
        return int(api.read_global_concurrency_limit_by_name(repository_lock(repository)).active_slots)


def state_types(run_id: UUID) -> list[str]:
    with client() as api:
        return [s.type.value for s in api.read_flow_run_states(run_id)]


def pool_status(pool: str) -> str:
    with client() as api:
        return str(api.read_work_pool(pool).status.value)


def backup_killed_midway(lab, kill: Callable[[], None], bring_back: Callable[[], None]) -> None:
    """A backup of pi-2 on the edge worker, the worker killed while restic writes; the Must-show checks."""
    host, repository = "pi-2", lab.fleet.backup.plans["pi-2"].repository
    with fresh_data(lab, host, 600):
        _backup_killed_midway(lab, host, repository, kill, bring_back)


def _backup_killed_midway(lab, host: str, repository: str, kill: Callable[[], None],
                          bring_back: Callable[[], None]) -> None:
    before = snapshots_of(host)
    run_id = trigger(f"backup/backup-{host}")
    until("the backup holds its repository's lock", lambda: "RUNNING" in state_types(run_id)
          and lock_slots(repository) == 1, 300)
    killed = time.monotonic()
    kill()
    # the host-side session saw its controller go and interrupted restic (hostside.watch_controller): none is left
    # writing on the host, unsupervised, to save a snapshot beside the rescheduled run's
    until(f"no restic left on {host}", lambda: lab.exec(host, "! grep -qsx restic /proc/[0-9]*/comm").returncode == 0,
          60)
    until("Crashed", lambda: "CRASHED" in state_types(run_id), TWO_MINUTES)
    crashed = time.monotonic() - killed
    with client() as api:
        assert not api.read_flow_run(run_id).state.is_running()
    until("the repository's slot free", lambda: lock_slots(repository) == 0, TWO_MINUTES - crashed)
    until("spark-edge NOT_READY", lambda: pool_status("spark-edge") == "NOT_READY",
          TWO_MINUTES - (time.monotonic() - killed))
    assert time.monotonic() - killed <= TWO_MINUTES
    bring_back()
    run = finish(run_id, timeout=900)
    assert run.state.is_completed(), run.state.message
    assert run.run_count == 2 and state_types(run_id).count("COMPLETED") == 1
    assert len(snapshots_of(host)) >= len(before) + 1
    assert len(snapshots_of(host, run_id)) == 1, "exactly one snapshot of the run: none from its killed attempt"
    print(f"Crashed {crashed:.0f} s after the kill")


def test_worker_killed_with_kill_9_mid_backup(lab, workers):
    def kill() -> None:
        pid = worker_pid(lab)
        assert lab.exec("nas-1", f"kill -9 {pid}").returncode == 0

    backup_killed_midway(lab, kill, lambda: lab.playbook("site.yml", limit="nas-1"))


def test_worker_container_stopped_mid_backup(lab, workers):
    def kill() -> None:
        subprocess.run(["docker", "stop", lab.container("nas-1")], check=True, capture_output=True, timeout=60)

    def bring_back() -> None:
        lab.lab.up()  # starts the stopped container
        lab.playbook("site.yml", limit="nas-1")  # its mesh interface and its worker come back

    backup_killed_midway(lab, kill, bring_back)


# --- what each worker holds --------------------------------------------------------------------------------


def material(lab, host: str) -> dict[str, str]:
    listing = lab.exec(host, f"find {WORKER_HOME}/state {WORKER_ENV} -type f").stdout.split()
    return {path: lab.exec(host, f"cat {path}").stdout for path in listing}


def test_each_worker_holds_its_own_sites_secrets_only(lab, workers):
    from primespark.context import FleetContext
    from primespark.orchestration.material import worker_key
    from primespark.secrets import read_reference

    ctx = FleetContext.load("lab")
    passwords = {name: read_reference(repo.password, ctx.secrets)
                 for name, repo in ctx.fleet.backup.repositories.items()}
    controller_key = (lab.state_dir / "ssh" / "id_ed25519").read_text()
    edge, cloud = material(lab, "nas-1"), material(lab, "ops-1")
    secrets_of = {h: sorted(p.removeprefix(f"{WORKER_HOME}/state/secrets/") for p in m if "/secrets/" in p)
                  for h, m in (("nas-1", edge), ("ops-1", cloud))}
    print(f"edge worker: {sorted(edge)}\ncloud worker: {sorted(cloud)}")
    # The lab keeps its secrets in its OpenBao: a worker holds no secret files, only its AppRole's secret-id, 0600
    # (its policy grants its own site's repository passwords: tests/unit/test_worker_vault.py shows the 403)
    assert secrets_of == {"nas-1": [], "ops-1": []}
    for worker in ("nas-1", "ops-1"):
        assert lab.exec(worker, f"stat -c %a {WORKER_HOME}/state/vault-secret-id").stdout.strip() == "600", worker
    assert not any(passwords["offsite"] in text for text in edge.values()), "a cloud password on the edge worker"
    assert not any(passwords["nas-primary"] in text for text in cloud.values()), "an edge password in the cloud"
    assert not any(controller_key.strip() in text for m in (edge, cloud) for text in m.values())
    for path in (f"{WORKER_HOME}/state/ssh/id_ed25519", WORKER_ENV):
        assert lab.exec("nas-1", f"stat -c %a {path}").stdout.strip() == "600"

    keys = {site: worker_key(ctx, site).public_line.split()[1] for site in ("edge", "cloud")}
    for host in ("pi-1", "nas-1", "core-1", "ops-1"):
        authorized = lab.exec(host, "cat /home/spark/.ssh/authorized_keys").stdout
        site = lab.fleet.hosts[host].site
        other = "cloud" if site == "edge" else "edge"
        assert keys[site] in authorized and keys[other] not in authorized, host

    from primespark.orchestration.material import mesh_address

    def login(worker: str, target: str, address: str) -> subprocess.CompletedProcess[str]:
        return lab.exec(worker, f"ssh -i {WORKER_HOME}/state/ssh/id_ed25519 -o BatchMode=yes -o ConnectTimeout=5 "
                        "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                        f"spark@{address} sudo -n true", timeout=60)

    assert login("nas-1", "pi-1", str(lab.fleet.hosts["pi-1"].address)).returncode == 0
    assert login("ops-1", "core-1", str(lab.fleet.hosts["core-1"].address)).returncode == 0
    for worker, target in (("nas-1", "ops-1"), ("ops-1", "pi-1")):
        denied = login(worker, target, str(mesh_address(ctx, target, worker)))
        assert denied.returncode != 0 and "Permission denied (publickey)" in denied.stderr, (worker, target,
                                                                                               denied.stderr)
