"""The Prefect flows end to end on this machine: real restic, local repositories, one Prefect test server.

Every host of a test fleet is this machine (the local transport); repositories are folders. The fault tests
corrupt a pack, backdate a snapshot, cut the "NAS" (an SFTP server that refuses connections) and race two
writers on one repository.
"""

from __future__ import annotations

import contextvars
import filecmp
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness
from restic_testing import ResticTestClient

from flows.backup import BackupFailed, backup
from flows.deployments import build_deployments
from flows.dr_drill import dr_drill
from flows.maintenance import maintenance
from primespark.backup import jobs, repositories
from primespark.backup.repositories import Location, folders_on, restic_for
from primespark.context import FleetContext
from primespark.data import tierside
from primespark.fleet import load_fleet
from primespark.fleet.model import TierName

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow
FAST = {"retries": 2, "retry_delay_seconds": 0.2}


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    """One Prefect test server for the module (it takes seconds to start)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry writes racing on SQLite
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture
def state(harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A state directory of the test's own: what one test records of its repositories is not another's."""
    path = tmp_path / "state"
    monkeypatch.setenv("SPARK_STATE_DIR", str(path))
    return path


def make_fleet(root: Path, plans: tuple[str, ...] = ("pi-1",), rpo_hours: float = 26,
               secrets: dict[str, Any] | None = None) -> str:
    """The lab fleet with its backup section pointed at folders under `root` (one source of the rest); its
    secrets in a local store, or in the Vault `secrets` names (the lab's own OpenBao runs only under `lab up`)."""
    data = yaml.safe_load((ROOT / "inventory" / "lab.yaml").read_text())
    data["secrets"] = secrets or {"backend": "local"}
    data.pop("orchestration")  # runs here, recorded by this module's Prefect test server (not a fleet server)
    backup_spec = data["backup"]
    if data["secrets"]["backend"] == "local":
        for name, repository in backup_spec["repositories"].items():
            repository["password"] = f"local:restic/{name}"
    backup_spec["repositories"]["nas-primary"]["path"] = str(root / "nas")
    backup_spec["repositories"]["offsite"]["path"] = str(root / "cloud")
    backup_spec["plans"] = {}
    for host in plans:
        src = root / "src" / host
        (src / "app").mkdir(parents=True, exist_ok=True)
        (src / "notes.txt").write_text(f"{host} notes\n")
        (src / "blob.bin").write_bytes(os.urandom(300_000))
        (src / "app" / "state.db").write_bytes(os.urandom(50_000))
        (src / "cache.tmp").write_text("not backed up")
        backup_spec["plans"][host] = {"repository": "nas-primary", "paths": [str(src)], "excludes": ["*.tmp"]}
    backup_spec["targets"]["rpo_hours"] = rpo_hours
    data["services"]["pi1-app"] = {
        "kind": "api", "host": "pi-1", "port": 8080, "check": "http", "image": "registry.example.org/api:1",
        "backup_paths": [str(root / "src" / "pi-1" / "app")],
        "restore_check": "test -s {root}" + str(root / "src" / "pi-1" / "app" / "state.db"),
    }
    path = root / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    load_fleet(str(path))  # fails here, with its location, if the edit broke the fleet
    return str(path)


def run(flow, *args, **kwargs):  # type: ignore[no-untyped-def]
    return flow(*args, transport="local", return_state=True, **kwargs)


def artifact_markdown(key: str) -> str:
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert found, f"no artifact {key!r} in the Prefect API"
    return str(sorted(found, key=lambda a: a.created)[-1].data)


def promtool(path: Path) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (make setup installs prometheus)")
    proc = subprocess.run(["promtool", "check", "metrics"], input=path.read_bytes(), capture_output=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_backup_copy_maintenance_drill_pass(state: Path, tmp_path: Path) -> None:
    from primespark.backup.manifest import run_of

    fleet = make_fleet(tmp_path, ("pi-1", "pi-2"))
    prom = tmp_path / "textfile"
    result = run(backup, "pi-1", fleet, textfile=str(prom), **FAST).result()
    assert result["files"] == 3 and result["manifest_files"] == 3 and result["copied_to"] == ["offsite"]
    ctx = FleetContext.load(fleet, "local")
    offsite = restic_for(ctx, "offsite", "pi-1")
    copied = offsite.snapshots(tags=["primespark-backup"])
    assert [s.original[:8] for s in copied if s.original] == [result["snapshot"][:8]]
    # the manifest is inside the data snapshot, and travels with it
    assert result["manifest_inside_snapshot"] and not offsite.snapshots(tags=["primespark-manifest"])
    manifest_dir = folders_on(ctx, "pi-1").manifest_dir("nas-primary")
    copied_manifest = json.loads(offsite.dump(copied[0].id, f"{manifest_dir}/primespark-manifest.json"))
    assert len(copied_manifest["files"]) == 3 and copied_manifest["run"] == run_of(copied[0])
    metrics = (prom / "primespark_backup_pi-1.prom").read_text()
    assert 'primespark_backup_success{host="pi-1",repository="nas-primary"} 1.0' in metrics
    assert "primespark_backup_last_success_timestamp_seconds" in metrics
    promtool(prom / "primespark_backup_pi-1.prom")

    run(backup, "pi-2", fleet, textfile=str(prom), **FAST).result()
    done = run(maintenance, "nas-primary", fleet, textfile=str(prom), read_data_subset="100%").result()
    assert done["checked"] == {"nas-primary": {"pi-1": True, "pi-2": True}, "offsite": {"pi-1": True, "pi-2": True}}
    promtool(prom / "primespark_maintenance_nas-primary.prom")

    row = run(dr_drill, "pi-1", fleet, textfile=str(prom), keep_restore=True).result()
    assert row["result"] == "pass" and row["files"] == 3 and row["scratch"] == "pi-3"
    report = artifact_markdown("drill-report-pi-1")
    assert "DR drill PASSED: pi-1 → pi-3" in report and "| pi1-app | restore_check | passed" in report
    assert "pi-3" in artifact_markdown("drill-history")  # the table artifact holds this drill's row
    drills = (prom / "primespark_drill_pi-1.prom").read_text()
    assert 'primespark_drill_success{host="pi-1"} 1.0' in drills and "primespark_drill_rto_seconds" in drills
    promtool(prom / "primespark_drill_pi-1.prom")
    # byte for byte: the restored tree equals the source (minus the excluded *.tmp)
    restored = Path(folders_on(ctx, "pi-3").scratch)
    tree = next(restored.glob("pi-1-*")) / str(tmp_path / "src" / "pi-1").lstrip("/")
    comparison = filecmp.dircmp(tmp_path / "src" / "pi-1", tree)
    assert comparison.left_only == ["cache.tmp"] and not comparison.right_only
    assert filecmp.cmpfiles(tmp_path / "src" / "pi-1", tree, ["notes.txt", "blob.bin", "app/state.db"],
                            shallow=False)[0] == ["notes.txt", "blob.bin", "app/state.db"]
    shutil.rmtree(restored, ignore_errors=True)

    # the offsite copy alone is enough: it carries the snapshot and the manifest inside it
    from primespark.backup.drill import run_drill

    from_offsite = run_drill(ctx, "pi-1", repository="offsite")
    assert from_offsite.passed and from_offsite.repository == "offsite", from_offsite.failures
    assert from_offsite.files_matched == 3 and from_offsite.snapshot == copied[0].id[:8]


def test_corrupted_pack_fails_check_and_drill_naming_it(state: Path, tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path)
    (tmp_path / "src" / "pi-1" / "blob.bin").write_bytes(os.urandom(6_000_000))
    run(backup, "pi-1", fleet, textfile=str(tmp_path / "prom"), offsite=False, **FAST).result()
    repo = tmp_path / "nas" / "pi-1" / "repo"
    packs = sorted((p for p in (repo / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(packs[-1].read_bytes())
    data[len(data) // 2] ^= 0xFF
    packs[-1].write_bytes(bytes(data))

    state_ = run(maintenance, "nas-primary", fleet, textfile=str(tmp_path / "prom"), offsite=False,
                 read_data_subset="100%")
    assert state_.is_failed()
    assert packs[-1].name in str(state_.result(raise_on_failure=False))
    drill = run(dr_drill, "pi-1", fleet, textfile=str(tmp_path / "prom"))
    assert drill.is_failed()
    report = artifact_markdown("drill-report-pi-1")
    assert "DR drill FAILED" in report and "ciphertext verification failed" in report
    assert "blob.bin" in report  # which file could not be restored


def test_stale_snapshot_is_an_rpo_breach(state: Path, tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, rpo_hours=2)
    old = datetime.now(UTC) - timedelta(hours=3)
    run(backup, "pi-1", fleet, textfile=str(tmp_path / "prom"), offsite=False, snapshot_time=old, **FAST).result()
    drill = run(dr_drill, "pi-1", fleet, textfile=str(tmp_path / "prom"))
    assert drill.is_failed()
    message = str(drill.result(raise_on_failure=False))
    assert "RPO breach" in message and "target is 2" in message
    report = artifact_markdown("drill-report-pi-1")
    assert "| RPO (snapshot age) | 3.00 h | 2.00 h | MISS |" in report
    drill_metrics = (tmp_path / "prom" / "primespark_drill_pi-1.prom").read_text()
    assert 'primespark_drill_success{host="pi-1"} 0.0' in drill_metrics


def test_unreachable_nas_retries_fails_clearly_then_recovers_without_unlock(
    state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The repository is served over real SFTP (OpenSSH's sftp-server) through a switch we can pull."""
    fleet = make_fleet(tmp_path)
    down, attempts = tmp_path / "nas-down", tmp_path / "attempts"
    switch = tmp_path / "nas.sh"
    switch.write_text(f"#!/bin/sh\necho x >> {attempts}\n"
                      f"if [ -e {down} ]; then echo 'ssh: connect to host nas-1 port 22: Connection refused' >&2;"
                      " exit 255; fi\nexec /usr/lib/openssh/sftp-server\n")
    switch.chmod(0o755)

    def over_sftp(ctx: FleetContext, repository: str, client: str, via: str) -> Location:
        path = ctx.fleet.backup.repositories[repository].path  # type: ignore[union-attr]
        return Location(f"sftp:backup@nas-1:{path}/{client}/repo", {"sftp.command": str(switch)})

    monkeypatch.setattr(repositories, "location", over_sftp)
    run(backup, "pi-1", fleet, textfile=str(tmp_path / "prom"), offsite=False, **FAST).result()

    # a writer dies mid-backup when the NAS goes away: its lock stays behind
    ctx = FleetContext.load(fleet, "local")
    client = restic_for(ctx, "nas-primary", "pi-1")
    proc = subprocess.Popen(["restic", "--repo", client.repository, "--option", f"sftp.command={switch}",
                             "backup", "--stdin"], env={**os.environ, "RESTIC_PASSWORD": client.password},
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not client.locks() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    assert len(client.locks()) == 1

    down.touch()
    attempts.write_text("")
    failed = run(backup, "pi-1", fleet, textfile=str(tmp_path / "prom"), offsite=False, **FAST)
    assert failed.is_failed()
    reason = str(failed.result(raise_on_failure=False))
    # restic relays the ssh error line from a goroutine that may lose the race with its exit: not asserted
    assert "storage is unreachable" in reason and "sftp" in reason, reason
    logs = flow_logs(failed)  # an expected failure: the reason in the Prefect UI, no stack under it
    assert "storage is unreachable" in logs and "Traceback" not in logs, logs
    assert len(attempts.read_text().split()) >= 1 + FAST["retries"], "no retries happened"
    assert "primespark_backup_success{host=\"pi-1\",repository=\"nas-primary\"} 0.0" in (
        tmp_path / "prom" / "primespark_backup_pi-1.prom").read_text()

    down.unlink()
    result = run(backup, "pi-1", fleet, textfile=str(tmp_path / "prom"), offsite=False, **FAST).result()
    assert len(result["stale_locks_removed"]) == 1 and client.locks() == []
    assert run(maintenance, "nas-primary", fleet, offsite=False, textfile=str(tmp_path / "prom")).is_completed()


def test_two_backups_of_one_repository_take_turns(state: Path, tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, ("pi-1", "pi-2"))
    for host in ("pi-1", "pi-2"):
        (tmp_path / "src" / host / "blob.bin").write_bytes(os.urandom(20_000_000))
    ctx = FleetContext.load(fleet, "local")
    for host in ("pi-1", "pi-2"):
        jobs.prepare(ctx, "nas-primary", host)

    def windows(target) -> list[tuple[float, float]]:  # type: ignore[no-untyped-def]
        out: list[tuple[float, float]] = []
        # each thread in a copy of this context: the harness's Prefect settings live in contextvars
        threads = [threading.Thread(target=contextvars.copy_context().run, args=(lambda h=h: out.append(target(h)),))
                   for h in ("pi-1", "pi-2")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sorted(out)

    # without the limit the two writers overlap (so the check below can fail) …
    free = windows(lambda h: (lambda done: (done.started, done.finished))(jobs.backup_host(ctx, h)))
    assert free[1][0] < free[0][1], f"the unguarded writers did not overlap: {free}"
    # … through the flow they take turns
    guarded = windows(lambda h: tuple(run(backup, h, fleet, textfile=str(tmp_path / "prom"), offsite=False,
                                          **FAST).result()["write_window"]))
    assert guarded[1][0] >= guarded[0][1], f"two writers in nas-primary at once: {guarded}"


def test_deployments_carry_the_fleet_schedules(state: Path) -> None:
    fleet = load_fleet("lab")
    deployments = {d.name: d for d in build_deployments(fleet, "lab", on_pools=False)}  # served, as on a laptop
    sync = {f"{kind}-{job}" for kind in ("sync", "sync-check", "sync-watch") for job in ("hot-to-nas", "warm-to-cloud")}
    assert set(deployments) == {"backup-pi-1", "backup-pi-2", "backup-nas-1", "dr-drill-pi-1", "dr-drill-pi-2",
                                "dr-drill-nas-1", "maintenance-nas-primary", "maintenance-offsite", "probe-edge",
                                "probe-cloud", *sync, "tier-hot-warm", "tier-warm-cold", "agent-task-edge",
                                "agent-task-cloud"}
    assert deployments["tier-hot-warm"].schedules[0].schedule.cron == fleet.tiers[TierName.hot].schedule  # type: ignore[union-attr]
    assert not deployments["tier-warm-cold"].schedules  # the lab's warm tier has no schedule: on demand
    assert fleet.sync is not None
    # continuous jobs: one long watch run each, no schedule; the full compare on the job's check schedule
    assert not deployments["sync-watch-hot-to-nas"].schedules and not deployments["sync-hot-to-nas"].schedules
    assert deployments["sync-check-warm-to-cloud"].schedules[0].schedule.cron == (  # type: ignore[union-attr]
        fleet.sync.jobs["warm-to-cloud"].check_schedule)
    assert deployments["backup-pi-1"].schedules[0].schedule.cron == fleet.backup.plans["pi-1"].schedule  # type: ignore[union-attr]
    assert deployments["dr-drill-nas-1"].schedules[0].schedule.cron == fleet.backup.drill.schedule  # type: ignore[union-attr]
    deployment_id = deployments["backup-pi-1"].apply()
    with get_client(sync_client=True) as client:
        stored = client.read_deployment(deployment_id)
    assert stored.name == "backup-pi-1" and stored.parameters["host"] == "pi-1"
    assert stored.schedules[0].schedule.cron == "15 * * * *"


def test_drill_report_lists_the_drills_in_the_terminal(state: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from primespark.backup.drill import DrillReport, append_history
    from primespark.cli.app import app

    fleet = make_fleet(tmp_path)
    ctx = FleetContext.load(fleet, "local")
    passed = DrillReport("pi-1", "pi-3", "2026-01-01T05:00:00+00:00", "nas-primary", snapshot="a" * 64,
                         rpo_seconds=3600, rto_seconds=90)
    failed = DrillReport("pi-2", "pi-3", "2026-01-02T05:00:00+00:00", "nas-primary",
                         failures=["RPO breach: the newest snapshot is 30.00 h old"])
    append_history(ctx.state_dir, passed)
    append_history(ctx.state_dir, failed)
    out = CliRunner().invoke(app, ["drill", "report", "--env", fleet, "--last", "2"])
    assert out.exit_code == 0, out.output
    lines = [ln for ln in out.output.splitlines() if "2026-01-0" in ln]
    assert len(lines) == 2
    assert "pi-1" in lines[0] and "pass" in lines[0] and "aaaaaaaa" in lines[0] and "1.5" in lines[0]
    assert "pi-2" in lines[1] and "FAIL" in lines[1] and "RPO breach" in out.output
    wrong = subprocess.run([str(Path(sys.executable).parent / "spark"), "drill", "run", "pi-1", "--env", fleet,
                            "--transport", "local", "--repository", "elsewhere"], capture_output=True, text=True)
    said = wrong.stdout + wrong.stderr
    assert wrong.returncode != 0 and "not in repository 'elsewhere'" in said, said
    assert "nas-primary, offsite" in said and "Traceback" not in said


def test_unchanged_files_keep_their_hash_and_edits_are_hashed_again(state: Path, tmp_path: Path) -> None:
    """The host-side cache: a second backup hashes nothing; an edit is hashed even when its mtime is put back."""
    fleet = make_fleet(tmp_path)
    ctx = FleetContext.load(fleet, "local")
    first = jobs.backup_host(ctx, "pi-1").run
    assert first.files == 3 and first.hashed_now == 3
    cache = Path(folders_on(ctx, "pi-1").cache_file("nas-primary"))
    assert cache.stat().st_mode & 0o777 == 0o600
    assert jobs.backup_host(ctx, "pi-1").run.hashed_now == 0
    notes = tmp_path / "src" / "pi-1" / "notes.txt"
    before = notes.stat()
    notes.write_text("pi-1 notez\n")  # same size
    os.utime(notes, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the old mtime: only ctime tells
    assert jobs.backup_host(ctx, "pi-1").run.hashed_now == 1
    from primespark.backup.drill import run_drill

    report = run_drill(ctx, "pi-1")
    assert report.passed and report.files_matched == 3, report.failures


def test_drill_fails_when_restored_content_differs_from_the_manifest(state: Path, tmp_path: Path) -> None:
    """A manifest that records other content than restic saved (here: a doctored cache) fails the drill."""
    from primespark.backup.drill import run_drill

    fleet = make_fleet(tmp_path)
    ctx = FleetContext.load(fleet, "local")
    jobs.backup_host(ctx, "pi-1")
    cache = Path(folders_on(ctx, "pi-1").cache_file("nas-primary"))
    data = json.loads(cache.read_text())
    blob = str(tmp_path / "src" / "pi-1" / "blob.bin")
    data["files"][blob][0] = "0" * 64
    cache.write_text(json.dumps(data))
    jobs.backup_host(ctx, "pi-1")  # blob.bin unchanged: its (wrong) hash is carried into the new manifest
    report = run_drill(ctx, "pi-1")
    assert not report.passed and report.files_mismatched == [blob] and report.files_matched == 2
    assert "restored content differs" in report.failures[0]


def test_a_host_without_xxhash_hashes_with_sha256_and_drills_still_compare(
    state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hosts without python3-xxhash write sha256 manifests, which a drill with xxhash hashes its way; a drill on
    a host that lacks the manifest's hash says what to install instead of comparing unlike hashes."""
    from primespark.backup.drill import run_drill

    fleet = make_fleet(tmp_path)
    ctx = FleetContext.load(fleet, "local")
    no_xxhash = tmp_path / "no-xxhash"
    no_xxhash.mkdir()
    (no_xxhash / "xxhash.py").write_text("raise ImportError('this host has no python3-xxhash')\n")
    monkeypatch.setenv("PYTHONPATH", str(no_xxhash))  # the host-side session is a child of this process
    jobs.backup_host(ctx, "pi-1")
    cache = json.loads(Path(folders_on(ctx, "pi-1").cache_file("nas-primary")).read_text())
    blob = str(tmp_path / "src" / "pi-1" / "blob.bin")
    assert cache["hash"] == "sha256" and len(cache["files"][blob][0]) == 64
    monkeypatch.delenv("PYTHONPATH")
    report = run_drill(ctx, "pi-1")
    assert report.passed and report.files_matched == 3, report.failures
    jobs.backup_host(ctx, "pi-1")  # with xxhash: an XXH3-128 manifest, every file hashed again
    cache = json.loads(Path(folders_on(ctx, "pi-1").cache_file("nas-primary")).read_text())
    assert cache["hash"] == "xxh3_128" and len(cache["files"][blob][0]) == 32
    monkeypatch.setenv("PYTHONPATH", str(no_xxhash))
    report = run_drill(ctx, "pi-1")
    assert not report.passed and "install python3-xxhash" in " ".join(report.failures), report.failures


def test_snapshot_without_its_manifest_is_reported_not_compared_with_another(state: Path, tmp_path: Path) -> None:
    from primespark.backup.drill import run_drill
    from primespark.backup.manifest import BACKUP_TAG

    fleet = make_fleet(tmp_path)
    ctx = FleetContext.load(fleet, "local")
    jobs.backup_host(ctx, "pi-1")
    # a newer data snapshot whose manifest never got stored: the newest manifest belongs to the older one
    client = ResticTestClient.of(restic_for(ctx, "nas-primary", "pi-1"))
    newer = client.backup([str(tmp_path / "src" / "pi-1")], tags=[BACKUP_TAG, "primespark-run-feedfeedfeed"],
                          host="pi-1")
    report = run_drill(ctx, "pi-1")
    assert report.snapshot == newer.snapshot_id[:8]
    assert not report.passed and f"no content manifest for snapshot {report.snapshot}" in report.failures[0]


def test_stale_exclusive_lock_is_cleared_when_the_backup_finds_it(state: Path, tmp_path: Path) -> None:
    """A killed `restic check` leaves an exclusive lock; the next backup clears it (its process is gone)."""
    fleet = make_fleet(tmp_path)
    (tmp_path / "src" / "pi-1" / "blob.bin").write_bytes(os.urandom(30_000_000))
    ctx = FleetContext.load(fleet, "local")
    jobs.backup_host(ctx, "pi-1")
    client = restic_for(ctx, "nas-primary", "pi-1")
    locks = Path(client.repository) / "locks"
    proc = subprocess.Popen(["restic", "--repo", client.repository, "check", "--read-data"],
                            env={**os.environ, "RESTIC_PASSWORD": client.password},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    # restic writes a lock under a temporary name, then renames it to its 64-hex id
    while not [f for f in locks.iterdir() if len(f.name) == 64] and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert [lock.exclusive for lock in client.locks()] == [True], "no exclusive lock was left behind"
    done = jobs.backup_host(ctx, "pi-1")
    assert len(done.stale_locks_removed) == 1 and client.locks() == []


def test_drill_leaves_no_restored_copy_behind(state: Path, tmp_path: Path) -> None:
    from primespark.backup.drill import run_drill

    fleet = make_fleet(tmp_path)
    ctx = FleetContext.load(fleet, "local")
    jobs.backup_host(ctx, "pi-1")
    scratch = Path(folders_on(ctx, ctx.fleet.backup.drill.scratch_host).scratch)
    (scratch / "pi-1-19990101T000000.removing").mkdir(parents=True)  # what an interrupted clean-up left
    report = run_drill(ctx, "pi-1")
    assert report.passed, report.failures
    deadline = time.monotonic() + 30
    while list(scratch.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(scratch.iterdir()) == [], "the restored copy (or an old one) is still there"


def test_a_manifest_that_cannot_go_inside_its_snapshot_goes_beside_it_and_leaves_with_it(
    state: Path, tmp_path: Path
) -> None:
    """Where the manifest folder cannot be had (here a file stands in its place), each run stores its manifest
    as a snapshot of its own; retention drops those of forgotten snapshots only, and drills still compare."""
    from primespark.backup.drill import run_drill
    from primespark.backup.manifest import run_of

    fleet = make_fleet(tmp_path)
    data = yaml.safe_load(Path(fleet).read_text())
    data["backup"]["retention"] = {"keep_last": 1}
    Path(fleet).write_text(yaml.safe_dump(data))
    ctx = FleetContext.load(fleet, "local")
    blocked = Path(folders_on(ctx, "pi-1").manifest_dir("nas-primary"))
    shutil.rmtree(blocked, ignore_errors=True)
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("not a folder")
    try:
        runs = [jobs.backup_host(ctx, "pi-1").run for _ in range(3)]
    finally:
        blocked.unlink()  # the state folder is this module's: the other tests keep theirs
    assert all(not r.manifest_embedded and r.separate_manifest for r in runs)
    assert runs[0].embed_problem and "cannot be used" in runs[0].embed_problem
    outcome = jobs.maintain(ctx, "nas-primary", check=False)
    assert outcome.forgotten == {"pi-1": 2} and outcome.orphan_manifests == {"pi-1": 2}, outcome
    left = restic_for(ctx, "nas-primary", "pi-1").snapshots()
    assert sorted(s.tags[0] for s in left) == ["primespark-backup", "primespark-manifest"]
    assert run_of(left[0]) == run_of(left[1])  # the kept manifest is the kept snapshot's
    assert run_drill(ctx, "pi-1").passed


def test_a_run_backs_up_once_whatever_its_attempts(state: Path, tmp_path: Path) -> None:
    """A worker killed after restic saved the snapshot and before the run ended: the rescheduled run (the same
    flow run id) keeps that snapshot and makes no second one; an earlier attempt whose manifest cannot be read
    is forgotten and the backup made again. The flow tags its snapshot with its flow run's id."""
    from primespark.backup.manifest import run_of

    fleet = make_fleet(tmp_path)
    state_of = run(backup, "pi-1", fleet, offsite=False, **FAST)
    result = state_of.result()
    ctx = FleetContext.load(fleet, "local")
    client = restic_for(ctx, "nas-primary", "pi-1")
    (saved,) = client.snapshots(tags=["primespark-backup"])
    assert run_of(saved) == str(state_of.state_details.flow_run_id).replace("-", "")
    assert saved.id.startswith(result["snapshot"]) and result["earlier_attempt"] is False

    (tmp_path / "src" / "pi-1" / "later.txt").write_text("written after the first attempt\n")
    first = jobs.backup_host(ctx, "pi-1", run_id="a" * 32)  # the attempt whose run never recorded its end
    again = jobs.backup_host(ctx, "pi-1", run_id="a" * 32)  # the rescheduled run
    assert again.run.earlier_attempt and not first.run.earlier_attempt
    assert again.run.summary.snapshot_id == first.run.summary.snapshot_id
    assert again.run.files == first.run.files == 4 and again.run.manifest_embedded
    backed_up = [p for p in (tmp_path / "src" / "pi-1").rglob("*") if p.is_file() and p.suffix != ".tmp"]
    # the host's bytes (restic's own total counts the manifest file inside the snapshot too)
    assert again.run.summary.total_bytes_processed == sum(p.stat().st_size for p in backed_up)
    assert len(client.snapshots(tags=["primespark-backup"])) == 2, "the rescheduled run backed up twice"

    # an earlier attempt without a readable manifest is no backup to keep: forgotten, made again
    blocked = Path(folders_on(ctx, "pi-1").manifest_dir("nas-primary"))
    shutil.rmtree(blocked)
    blocked.write_text("not a folder")  # the manifest goes apart; its snapshot is then forgotten by hand
    try:
        partial = jobs.backup_host(ctx, "pi-1", run_id="b" * 32)
    finally:
        blocked.unlink()
    assert partial.run.separate_manifest
    client.forget_ids([partial.run.separate_manifest])
    redone = jobs.backup_host(ctx, "pi-1", run_id="b" * 32)
    assert not redone.run.earlier_attempt and redone.run.summary.snapshot_id != partial.run.summary.snapshot_id
    runs = [run_of(s) for s in client.snapshots(tags=["primespark-backup"])]
    assert runs.count("b" * 32) == 1 and len(runs) == 3, runs


# --- fail closed, never start over silently, always report (#13) -----------------------------------------------


def flow_logs(state) -> str:  # type: ignore[no-untyped-def]
    """Everything the run logged to the Prefect API (what the UI shows), flushed first."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # the run's logs still queued go to the API first
    with get_client(sync_client=True) as client:
        run_id = LogFilterFlowRunId(any_=[state.state_details.flow_run_id])
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=run_id))
    return "\n".join(log.message for log in logs)


def test_a_repository_that_went_missing_is_refused_never_made_again(state: Path, tmp_path: Path) -> None:
    """The NAS folder moved aside (as an unmounted volume looks): the backup fails naming the repository and what
    to check, and makes nothing there; moved back, the next backup sees the old snapshots; `spark backup init`
    starts over on purpose."""
    fleet = make_fleet(tmp_path)
    first = run(backup, "pi-1", fleet, offsite=False, textfile=str(tmp_path / "prom"), **FAST).result()
    assert first["created_repository"]
    repo = tmp_path / "nas" / "pi-1" / "repo"
    aside = repo.with_name("repo.aside")
    repo.rename(aside)
    refused = run(backup, "pi-1", fleet, offsite=False, textfile=str(tmp_path / "prom"), **FAST)
    assert refused.is_failed()
    reason = str(refused.result(raise_on_failure=False))
    assert f"the restic repository of pi-1 in nas-primary is missing at {repo}" in reason, reason
    assert "refusing to start a new, empty one" in reason and "mounted" in reason
    assert f"spark backup init nas-primary --client pi-1 --env {Path(fleet).stem}" in reason or \
        "spark backup init nas-primary --client pi-1" in reason, reason
    assert not (repo / "config").exists(), "a new repository was made in the old one's place"
    logs = flow_logs(refused)
    assert "is missing at" in logs and "Traceback" not in logs, logs  # an expected failure: no stack in the UI
    # and on the terminal: the reason and what to do, no traceback (the CLI reports to this module's server)
    from prefect.settings import PREFECT_API_URL

    spark = str(Path(sys.executable).parent / "spark")
    cli = subprocess.run([spark, "backup", "now", "pi-1", "--env", fleet, "--transport", "local"],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "SPARK_STATE_DIR": str(state), "PREFECT_API_URL": PREFECT_API_URL.value()})
    assert cli.returncode == 1 and "is missing at" in cli.stderr, cli.stdout[-2000:] + cli.stderr[-3000:]
    assert "Traceback" not in cli.stdout + cli.stderr, cli.stderr[-3000:]

    aside.rename(repo)
    again = run(backup, "pi-1", fleet, offsite=False, textfile=str(tmp_path / "prom"), **FAST).result()
    assert not again["created_repository"]
    ctx = FleetContext.load(fleet, "local")
    assert len(restic_for(ctx, "nas-primary", "pi-1").snapshots(tags=["primespark-backup"])) == 2

    # another repository in its place (a volume from another disk) is refused as well
    shutil.rmtree(repo)
    ResticTestClient.of(restic_for(ctx, "nas-primary", "pi-1")).init()
    replaced = run(backup, "pi-1", fleet, offsite=False, textfile=str(tmp_path / "prom"), **FAST)
    assert replaced.is_failed() and "is not the one this environment initialised" in str(
        replaced.result(raise_on_failure=False))

    # starting over on purpose: the command records what is there now (it deletes nothing)
    shutil.rmtree(repo)
    done = subprocess.run([spark, "backup", "init", "nas-primary", "--env", fleet, "--transport", "local"],
                          capture_output=True, text=True, env={**os.environ, "SPARK_STATE_DIR": str(state)})
    assert done.returncode == 0, done.stderr
    assert "pi-1: made a new, empty repository" in done.stdout and (repo / "config").is_file()
    assert run(backup, "pi-1", fleet, offsite=False, textfile=str(tmp_path / "prom"), **FAST).is_completed()


def test_an_empty_or_shrunk_backup_fails_unless_expected(state: Path, tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path)
    src = tmp_path / "src" / "pi-1"
    for i in range(10):
        (src / f"extra-{i}.txt").write_text(f"extra {i}\n")
    prom = str(tmp_path / "prom")
    assert run(backup, "pi-1", fleet, offsite=False, textfile=prom, **FAST).result()["manifest_files"] == 13
    ctx = FleetContext.load(fleet, "local")
    client = restic_for(ctx, "nas-primary", "pi-1")

    for i in range(10):  # 13 files → 3: a fall of 77%, more than max_shrink's 50%
        (src / f"extra-{i}.txt").unlink()
    shrunk = run(backup, "pi-1", fleet, offsite=False, textfile=prom, **FAST)
    assert shrunk.is_failed()
    reason = str(shrunk.result(raise_on_failure=False))
    assert "file count fell from 13 to 3" in reason and "backup.max_shrink (50%)" in reason, reason
    assert "--accept-shrink" in reason
    assert len(client.snapshots(tags=["primespark-backup"])) == 1, "the refused snapshot was kept"
    assert 'primespark_backup_success{host="pi-1",repository="nas-primary"} 0.0' in (
        tmp_path / "prom" / "primespark_backup_pi-1.prom").read_text()
    accepted = run(backup, "pi-1", fleet, offsite=False, textfile=prom, accept_shrink=True, **FAST).result()
    assert accepted["manifest_files"] == 3

    # a plan path that is not there: refused before restic starts
    moved = src.with_name("pi-1.moved")
    src.rename(moved)
    missing = run(backup, "pi-1", fleet, offsite=False, textfile=prom, **FAST)
    assert missing.is_failed()
    reason = str(missing.result(raise_on_failure=False))
    assert f"the plan paths {src}" in reason or f"{src}" in reason, reason
    assert "is not there on pi-1" in reason or "are not there on pi-1" in reason, reason
    assert len(client.snapshots(tags=["primespark-backup"])) == 2
    moved.rename(src)

    # no files at all: refused; accepted, the drill of it has nothing to verify
    for path in [p for p in src.rglob("*") if p.is_file()]:  # the folders stay: a service's path is one
        path.unlink()
    empty = run(backup, "pi-1", fleet, offsite=False, textfile=prom, **FAST)
    assert empty.is_failed() and "the snapshot holds no files" in str(empty.result(raise_on_failure=False))
    run(backup, "pi-1", fleet, offsite=False, textfile=prom, accept_shrink=True, **FAST).result()
    drill = run(dr_drill, "pi-1", fleet, textfile=prom)
    assert drill.is_failed()
    assert "nothing to verify" in str(drill.result(raise_on_failure=False))
    assert "DR drill FAILED" in artifact_markdown("drill-report-pi-1")


def test_files_tier_migration_moved_away_do_not_count_as_a_shrink_files_gone_otherwise_do(
        state: Path, tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path)
    src = tmp_path / "src" / "pi-1"
    for i in range(10):
        (src / f"old-{i}.bin").write_text(f"old {i}\n")
    tierside.count_moved_out(str(src), 2)  # the plan's path is a tier folder, as the lab's /srv/hot
    prom = str(tmp_path / "prom")
    assert run(backup, "pi-1", fleet, offsite=False, textfile=prom, **FAST).result()["manifest_files"] == 14
    assert jobs.load_state(FleetContext.load(fleet, "local"), "pi-1")["tiered_out"] == 2

    for i in range(10):  # 14 files → 4, as a tier pass does it: the ledger counts them
        (src / f"old-{i}.bin").unlink()
    tierside.count_moved_out(str(src), 10)
    assert run(backup, "pi-1", fleet, offsite=False, textfile=prom, **FAST).result()["manifest_files"] == 4

    for name in ("notes.txt", "blob.bin", "app/state.db"):  # gone by hand: the ledger does not cover them
        (src / name).unlink()
    shrunk = run(backup, "pi-1", fleet, offsite=False, textfile=prom, **FAST)
    assert shrunk.is_failed()
    assert "file count fell from 4 to 1 (75% fewer)" in str(shrunk.result(raise_on_failure=False))


def test_a_plan_path_that_is_not_there_is_left_out_when_expected(state: Path, tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path)
    data = yaml.safe_load(Path(fleet).read_text())
    gone = str(tmp_path / "src" / "not-mounted")
    data["backup"]["plans"]["pi-1"]["paths"].append(gone)
    Path(fleet).write_text(yaml.safe_dump(data))
    refused = run(backup, "pi-1", fleet, offsite=False, textfile=str(tmp_path / "prom"), **FAST)
    assert refused.is_failed() and f"the plan path {gone} is not there on pi-1" in str(
        refused.result(raise_on_failure=False))
    done = run(backup, "pi-1", fleet, offsite=False, textfile=str(tmp_path / "prom"), accept_shrink=True,
               **FAST).result()
    assert done["manifest_files"] == 3


def test_a_drill_checks_the_repository_and_reports_damage_the_restore_did_not_touch(
    state: Path, tmp_path: Path
) -> None:
    """A data pack only an older snapshot needs goes missing: the newest snapshot restores whole, the
    structural check finds the damage, and the drill fails with it in its report."""
    fleet = make_fleet(tmp_path)
    src = tmp_path / "src" / "pi-1"
    files = [src / "blob.bin", src / "notes.txt", src / "app" / "state.db"]
    files[0].write_bytes(os.urandom(12_000_000))
    prom = str(tmp_path / "prom")
    run(backup, "pi-1", fleet, offsite=False, textfile=prom, **FAST).result()
    repo = tmp_path / "nas" / "pi-1" / "repo"
    first_packs = {p for p in (repo / "data").rglob("*") if p.is_file()}
    for path in files:  # new content throughout: the first backup's data packs hold only its own blobs
        path.write_bytes(os.urandom(path.stat().st_size))
    run(backup, "pi-1", fleet, offsite=False, textfile=prom, **FAST).result()
    old_only = max(first_packs, key=lambda p: p.stat().st_size)
    old_only.unlink()

    ctx = FleetContext.load(fleet, "local")
    restored = ResticTestClient.of(restic_for(ctx, "nas-primary", "pi-1"))
    restored.restore("latest", str(tmp_path / "plain-restore"))  # the newest snapshot comes back whole
    drill = run(dr_drill, "pi-1", fleet, textfile=prom)
    assert drill.is_failed()
    report = artifact_markdown("drill-report-pi-1")
    assert "3 files equal" in report and "`restic check` of the repository (index and every snapshot's trees): " \
        "FAILED" in report, report
    assert old_only.name[:8] in report and "restic check found damage" in report, report


def test_every_drill_reports_whatever_failed(state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restore_check with braces runs as written; a scratch host unreachable at clean-up keeps the passed verdict,
    with the clean-up problem beside it; killed drills' copies are swept, a running drill's is not."""
    from primespark.backup import drill as drill_module
    from primespark.hosts import HostUnreachable

    fleet = make_fleet(tmp_path)
    data = yaml.safe_load(Path(fleet).read_text())
    notes = tmp_path / "src" / "pi-1" / "notes.txt"
    data["services"]["pi1-app"]["restore_check"] = "awk '{print $1}' {root}" + str(notes) + " | grep -qx pi-1"
    Path(fleet).write_text(yaml.safe_dump(data))
    prom = tmp_path / "prom"
    run(backup, "pi-1", fleet, offsite=False, textfile=str(prom), **FAST).result()
    ctx = FleetContext.load(fleet, "local")
    scratch = Path(folders_on(ctx, "pi-3").scratch)
    killed = [scratch / "pi-1-19990101T000000", scratch / "pi-2-19990101T000000"]
    running = scratch / "pi-2-29990101T000000"  # another host's drill, under way
    for folder in [*killed, running]:
        (folder / "data").mkdir(parents=True)

    def unreachable(runner, target, timeout=120):  # type: ignore[no-untyped-def]
        raise HostUnreachable(f"cannot reach {runner.name} over SSH: Connection timed out")

    monkeypatch.setattr(drill_module, "remove_in_background", unreachable)
    done = run(dr_drill, "pi-1", fleet, textfile=str(prom))
    assert done.is_completed(), done.result(raise_on_failure=False)
    report = artifact_markdown("drill-report-pi-1")
    assert "DR drill PASSED" in report and "| pi1-app | restore_check | passed" in report, report
    assert "## Clean-up (does not change the verdict)" in report and "Connection timed out" in report
    assert 'primespark_drill_success{host="pi-1"} 1.0' in (prom / "primespark_drill_pi-1.prom").read_text()
    deadline = time.monotonic() + 30
    while any(f.exists() for f in killed) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(f.exists() for f in killed) and running.is_dir()


def test_a_drill_that_stops_on_a_bug_still_reports(state: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever stops a drill — here a bug standing in for one — it ends with a report, a history row and
    metrics that say it failed; the old success metric does not stay."""
    from primespark.backup import drill as drill_module
    from primespark.backup.drill import load_history

    fleet = make_fleet(tmp_path)
    prom = tmp_path / "prom"
    run(backup, "pi-1", fleet, offsite=False, textfile=str(prom), **FAST).result()
    assert run(dr_drill, "pi-1", fleet, textfile=str(prom)).is_completed()

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyError("print $1")

    monkeypatch.setattr(drill_module, "_service_checks", broken)
    failed = run(dr_drill, "pi-1", fleet, textfile=str(prom))
    assert failed.is_failed()
    assert "unexpected error (KeyError" in artifact_markdown("drill-report-pi-1")
    assert 'primespark_drill_success{host="pi-1"} 0.0' in (prom / "primespark_drill_pi-1.prom").read_text()
    assert [r["result"] for r in load_history(state)] == ["pass", "FAIL"]


def test_a_cache_folder_that_cannot_be_written_is_a_warning(state: Path, tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path)
    ctx = FleetContext.load(fleet, "local")
    cache_dir = Path(folders_on(ctx, "pi-1").cache)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    cache_dir.write_text("a file where the cache folder goes")
    done = run(backup, "pi-1", fleet, offsite=False, textfile=str(tmp_path / "prom"), **FAST)
    assert done.is_completed(), done.result(raise_on_failure=False)
    assert "cannot be written" in flow_logs(done) and "hashed again next time" in flow_logs(done)


def test_a_step_that_outlives_its_timeout_fails_clearly_and_frees_the_lock(
    state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The repository's storage hangs (an SFTP server that never answers): the step is stopped after the
    fleet's timeout with a clear reason, its processes are gone, and the writer slot is free at once."""
    fleet = make_fleet(tmp_path)
    data = yaml.safe_load(Path(fleet).read_text())
    hang, pids = tmp_path / "hang", tmp_path / "pids"
    switch = tmp_path / "nas.sh"
    switch.write_text(f"#!/bin/sh\nif [ -e {hang} ]; then echo $$ >> {pids}; exec sleep 600; fi\n"
                      "exec /usr/lib/openssh/sftp-server\n")
    switch.chmod(0o755)

    def over_sftp(ctx: FleetContext, repository: str, client: str, via: str) -> Location:
        path = ctx.fleet.backup.repositories[repository].path  # type: ignore[union-attr]
        return Location(f"sftp:backup@nas-1:{path}/{client}/repo", {"sftp.command": str(switch)})

    monkeypatch.setattr(repositories, "location", over_sftp)
    run(backup, "pi-1", fleet, offsite=False, textfile=str(tmp_path / "prom"), **FAST).result()
    # tight limits for the hung run only (a loaded machine may take 3 s to start restic, as in the run above)
    Path(fleet).write_text(yaml.safe_dump({**data, "backup": {**data["backup"], "timeouts": {
        "command_seconds": 3, "minimum_minutes": 0.1}}}))
    hang.touch()
    started = time.monotonic()
    stuck = run(backup, "pi-1", fleet, offsite=False, textfile=str(tmp_path / "prom"), **FAST)
    assert stuck.is_failed() and time.monotonic() - started < 120
    reason = str(stuck.result(raise_on_failure=False))
    assert "did not finish within 3 s and was stopped" in reason and "backup.timeouts" in reason, reason
    for pid in pids.read_text().split():
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{pid}").exists(), "the hung storage process was left running"
    hang.unlink()
    Path(fleet).write_text(yaml.safe_dump(data))
    started = time.monotonic()
    assert run(backup, "pi-1", fleet, offsite=False, textfile=str(tmp_path / "prom"), **FAST).is_completed()
    assert time.monotonic() - started < 60, "the next backup waited for the writer slot"


def test_two_first_backups_at_once_agree_on_one_password(state: Path, tmp_path: Path) -> None:
    """Two clients of one repository backed up for the first time at once: one password, made once, opens both."""
    from primespark.secrets import read_reference

    fleet = make_fleet(tmp_path, ("pi-1", "pi-2"))
    ctx = FleetContext.load(fleet, "local")
    results: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def first_backup(host: str) -> None:
        barrier.wait()
        try:
            results[host] = jobs.backup_host(ctx, host)
        except Exception as exc:  # asserted below
            results[host] = exc

    threads = [threading.Thread(target=contextvars.copy_context().run, args=(first_backup, h))
               for h in ("pi-1", "pi-2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(r, jobs.HostBackup) for r in results.values()), results
    password = read_reference("local:restic/nas-primary", ctx.secrets)
    for host in ("pi-1", "pi-2"):
        assert restic_for(ctx, "nas-primary", host).password == password
        assert restic_for(ctx, "nas-primary", host).snapshots(), f"{host}'s repository does not open with it"


def test_a_sealed_or_unreachable_secret_store_fails_the_backup_in_a_line_and_changes_nothing(
    state: Path, tmp_path: Path, fresh_vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The repository password is in Vault (a real OpenBao). Sealed: the backup fails at once (no retry can
    help) with the store's one-line reason and its fix, through the flow and through `spark backup now`, and
    makes no snapshot and no secret anywhere. Unreachable: retried, then the same. Unsealed: it works."""
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("VAULT_TOKEN", fresh_vault.root_token)
    fleet = make_fleet(tmp_path, secrets={"backend": "vault", "address": fresh_vault.address})
    ctx = FleetContext.load(fleet, "local")
    reference = ctx.fleet.backup.repositories["nas-primary"].password  # type: ignore[union-attr]
    assert reference == "vault:secret/primespark/lab/restic/nas-primary#password"
    run(backup, "pi-1", fleet, textfile=str(tmp_path / "prom"), offsite=False, **FAST).result()
    restic = restic_for(ctx, "nas-primary", "pi-1")
    snapshots = [s.id for s in restic.snapshots()]
    local = sorted((state / "secrets").rglob("*"))  # the other tests' local stores share the state folder

    fresh_vault.seal()
    failed = run(backup, "pi-1", fleet, textfile=str(tmp_path / "prom"), offsite=False, **FAST)
    assert failed.is_failed()
    reason = failed.result(raise_on_failure=False)
    assert isinstance(reason, BackupFailed), reason
    assert reason.message.startswith("backup of pi-1 into nas-primary failed: secret store sealed: Vault at ")
    assert "secret/primespark/lab/restic/nas-primary#password" in reason.message and "\n" not in reason.message
    assert "bao operator unseal" in reason.fix

    spark = subprocess.run(
        [str(Path(sys.executable).parent / "spark"), "backup", "now", "pi-1", "--env", fleet, "--transport", "local"],
        env={**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}, capture_output=True, text=True,
        timeout=300)
    assert spark.returncode == 1 and "Traceback" not in spark.stderr, spark.stderr
    error = spark.stderr[spark.stderr.index("error: "):].splitlines()
    assert error[0].startswith("error: backup of pi-1 into nas-primary failed: secret store sealed: Vault at ")
    assert error[0].endswith("while reading secret/primespark/lab/restic/nas-primary#password"), error
    assert error[1:] == ["    fix: unseal it (`bao operator unseal`, or `vault operator unseal`) and run again"]

    fresh_vault.unseal()
    assert [s.id for s in restic.snapshots()] == snapshots, "no snapshot while sealed"
    assert sorted((state / "secrets").rglob("*")) == local, "no secret was made in a local store"

    address = fresh_vault.address
    fresh_vault.stop()
    down = run(backup, "pi-1", fleet, offsite=False, **FAST)
    reason = down.result(raise_on_failure=False)
    assert isinstance(reason, BackupFailed) and "secret store unreachable: no answer from Vault at " \
        f"{address}" in reason.message, reason
