"""Sync jobs end to end on this machine: the flows with the local transport (every host is this machine, every
folder a folder under the test's own), real rsync, real inotify watchers, one Prefect test server."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness
from prometheus_client.parser import text_string_to_metric_families
from rrsync_testing import forced_route, gate_without_xxhash

from flows.sync import sync, sync_check, sync_watch
from primespark.context import FleetContext
from primespark.data import sync as core
from primespark.data import tierside, transfer
from primespark.data.layout import links
from primespark.errors import UserError
from primespark.fleet import load_fleet
from primespark.hosts import LocalRunner
from primespark.orchestration.locks import (
    BURST_IDLE_SECONDS,
    SLOW_TAKE_SECONDS,
    BurstHolder,
    ensure_locks,
    hold,
    sync_lock,
    wanted,
)
from primespark.orchestration.runs import run_here

ROOT = Path(__file__).resolve().parents[2]
FAST = {"retries": 1, "retry_delay_seconds": 0.2}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("state")
    path.chmod(0o700)
    old = os.environ.get("SPARK_STATE_DIR")
    os.environ["SPARK_STATE_DIR"] = str(path)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with prefect_test_harness(server_startup_timeout=120):
        yield path
    if old is None:
        del os.environ["SPARK_STATE_DIR"]
    else:
        os.environ["SPARK_STATE_DIR"] = old


@pytest.fixture(autouse=True)
def own_state(state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's links start with no state (the state directory is per test; the Prefect server is shared)."""
    mine = tmp_path / "state"
    mine.mkdir(mode=0o700)
    monkeypatch.setenv("SPARK_STATE_DIR", str(mine))
    return mine


def make_fleet(root: Path, **jobs: dict[str, Any]) -> str:
    """The lab fleet with sync jobs of the test's own, over folders under `root`."""
    data = yaml.safe_load((ROOT / "inventory" / "lab.yaml").read_text())
    data["sync"] = {"jobs": jobs}
    del data["orchestration"]  # the commands record runs on the test's Prefect server, not the lab's on ops-1
    path = root / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    load_fleet(str(path))  # fails here, with its location, if the jobs are wrong
    return str(path)


def fill(folder: Path, count: int, prefix: str = "r") -> list[Path]:
    made = []
    for i in range(count):
        path = folder / "readings" / f"{prefix}{i:03d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"i": i, "prefix": prefix}))
        made.append(path)
    return made


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".~tmp~" not in p.parts}


def artifact(key: str) -> str:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert found, f"no artifact {key!r}"
    return str(sorted(found, key=lambda a: a.created)[-1].data)


def metrics(path: Path) -> dict[str, float]:
    return {f"{s.name}": s.value for family in text_string_to_metric_families(path.read_text())
            for s in family.samples}


def run(flow: Any, *args: Any, **kwargs: Any) -> Any:
    return flow(*args, transport="local", return_state=True, **FAST, **kwargs)


@pytest.fixture
def copy_job(tmp_path: Path) -> tuple[str, Path, Path]:
    source = tmp_path / "hot"
    source.mkdir()
    fleet = make_fleet(tmp_path, **{"hot-to-nas": {"source": f"pi-1:{source}",
                                                   "destination": f"nas-1:{tmp_path}/warm/{{host}}",
                                                   "exclude": ["*.tmp"], "continuous": True}})
    return fleet, source, tmp_path / "warm" / "pi-1"


@pytest.fixture
def mirror_job(tmp_path: Path) -> tuple[str, Path, Path]:
    source = tmp_path / "warm"
    source.mkdir()
    fleet = make_fleet(tmp_path, **{"to-cloud": {"source": f"nas-1:{source}",
                                                 "destination": f"analytics-1:{tmp_path}/cloud",
                                                 "mode": "mirror", "max_delete": 3}})
    return fleet, source, tmp_path / "cloud"


def test_a_copy_pass_sends_verifies_records_and_reports(state: Path, tmp_path: Path,
                                                        copy_job: tuple[str, Path, Path]) -> None:
    fleet, source, destination = copy_job
    fill(source, 12)
    (source / "big.bin").write_bytes(os.urandom(300_000))
    (source / "draft.tmp").write_text("excluded")
    prom = tmp_path / "prom"
    result = run(sync, "hot-to-nas", fleet, textfile=str(prom)).result()
    [link] = result["links"]
    assert link["status"] == "succeeded" and link["files_sent"] == 13 and link["verified"] == 13
    assert link["differing"] == 0 and link["bytes_sent"] > 300_000 and link["source_files"] == 13
    assert tree(destination) == {k: v for k, v in tree(source).items() if not k.endswith(".tmp")}
    again = run(sync, "hot-to-nas", fleet, textfile=str(prom)).result()["links"][0]
    assert again["files_sent"] == 0 and again["skipped"] == 13
    ctx = FleetContext.load(fleet, "local")
    saved = core.load_state(ctx, links(ctx.fleet, "hot-to-nas")[0])
    assert saved.last_status == "succeeded" and saved.source_files == 13 and saved.last_success
    figures = metrics(prom / "primespark_sync_hot-to-nas_pi-1.prom")
    assert figures["primespark_sync_success"] == 1 and figures["primespark_sync_refused_passes"] == 0
    assert figures["primespark_sync_last_success_timestamp_seconds"] == pytest.approx(saved.last_success)
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "metrics"], input=(prom / "primespark_sync_hot-to-nas_pi-1.prom")
                               .read_bytes(), capture_output=True)
        assert check.returncode == 0, check.stdout + check.stderr
    report = artifact("sync-hot-to-nas")
    assert "| pi-1 → nas-1 | full | succeeded | 0 |" in report


def test_agent_tasks_staging_on_a_hot_tier_is_never_sent_even_by_a_job_including_everything(
        state: Path, tmp_path: Path) -> None:
    source = tmp_path / "hot"
    fleet = make_fleet(tmp_path, **{"hot-to-nas": {"source": f"pi-1:{source}", "include": ["*"],
                                                   "destination": f"nas-1:{tmp_path}/warm/{{host}}"}})
    data = yaml.safe_load(Path(fleet).read_text())
    data["tiers"]["hot"]["path"] = str(source)  # pi-1's hot tier is the job's source
    Path(fleet).write_text(yaml.safe_dump(data))
    fill(source, 3)
    (source / "tasks" / ".staging" / "t-2" / "out").mkdir(parents=True)
    (source / "tasks" / ".staging" / "t-2" / "out" / "half.bin").write_bytes(b"still being written")
    (source / "tasks" / "t-1" / "out").mkdir(parents=True)
    (source / "tasks" / "t-1" / "out" / "result.json").write_text("{}")
    tierside.count_moved_out(str(source), 5)  # the hot tier's ledger: its own backups' record, not data
    result = run(sync, "hot-to-nas", fleet, textfile=str(tmp_path / "prom")).result()
    assert result["links"][0]["status"] == "succeeded", result
    sent = tree(tmp_path / "warm" / "pi-1")
    assert "tasks/t-1/out/result.json" in sent and len([k for k in sent if k.startswith("readings/")]) == 3
    assert not any(".staging" in k for k in sent), sorted(sent)
    assert not any(".spark-tier" in k for k in sent), sorted(sent)


def test_a_mirror_deletes_what_its_source_lost_within_max_delete(state: Path, tmp_path: Path,
                                                                 mirror_job: tuple[str, Path, Path]) -> None:
    fleet, source, destination = mirror_job
    files = fill(source, 8)
    run(sync, "to-cloud", fleet, textfile=str(tmp_path / "prom")).result()
    for path in files[:3]:
        path.unlink()
    [link] = run(sync, "to-cloud", fleet, textfile=str(tmp_path / "prom")).result()["links"]
    assert link["deleted"] == 3 and sorted(link["deletions"]) == [f"readings/r{i:03d}.json" for i in range(3)]
    assert tree(destination) == tree(source)


def test_a_mirror_over_max_delete_deletes_nothing_and_publishes_the_list(state: Path, tmp_path: Path,
                                                                         mirror_job: tuple[str, Path, Path]) -> None:
    fleet, source, destination = mirror_job
    files = fill(source, 10)
    prom = tmp_path / "prom"
    run(sync, "to-cloud", fleet, textfile=str(prom)).result()
    before = tree(destination)
    for path in files[:6]:  # max_delete is 3
        path.unlink()
    outcome = run(sync, "to-cloud", fleet, textfile=str(prom))
    assert outcome.is_failed()
    reason = str(outcome.result(raise_on_failure=False))
    assert "would delete 6 files" in reason and "max_delete (3)" in reason and "nothing was deleted" in reason
    assert tree(destination) == before
    held = artifact("sync-to-cloud-held-deletions")
    assert all(f"`readings/r{i:03d}.json`" in held for i in range(6)) and "r006" not in held
    figures = metrics(prom / "primespark_sync_to-cloud_nas-1.prom")
    assert figures["primespark_sync_success"] == 0 and figures["primespark_sync_refused_passes"] == 1


def test_a_mirror_whose_source_was_replaced_by_an_empty_folder_refuses(state: Path, tmp_path: Path,
                                                                       mirror_job: tuple[str, Path, Path]) -> None:
    fleet, source, destination = mirror_job
    fill(source, 2)  # fewer than max_delete: only the empty-source guard can stop it
    run(sync, "to-cloud", fleet, textfile=str(tmp_path / "prom")).result()
    before = tree(destination)
    source.rename(tmp_path / "warm-moved-away")  # as an unmounted volume looks: the folder is there, empty
    source.mkdir()
    outcome = run(sync, "to-cloud", fleet, textfile=str(tmp_path / "prom"))
    assert outcome.is_failed()
    reason = str(outcome.result(raise_on_failure=False))
    assert "is empty, where the last pass saw 2 files" in reason and "--accept-empty-source" in reason
    assert tree(destination) == before
    source.rmdir()
    missing = str(run(sync, "to-cloud", fleet, textfile=str(tmp_path / "prom")).result(raise_on_failure=False))
    assert f"the source nas-1:{source} is missing" in missing
    assert tree(destination) == before
    source.mkdir()
    accepted = run(sync, "to-cloud", fleet, accept_empty_source=True, textfile=str(tmp_path / "prom")).result()
    # max_delete counts what rsync deletes: the two files and their folder
    assert sorted(accepted["links"][0]["deletions"]) == ["readings/", "readings/r000.json", "readings/r001.json"]
    assert tree(destination) == {}


def test_a_source_no_longer_mounted_is_refused(state: Path, tmp_path: Path, copy_job: tuple[str, Path, Path]) -> None:
    fleet, source, destination = copy_job
    fill(source, 3)
    run(sync, "hot-to-nas", fleet, textfile=str(tmp_path / "prom")).result()
    ctx = FleetContext.load(fleet, "local")
    [link] = links(ctx.fleet, "hot-to-nas")
    saved = core.load_state(ctx, link)
    saved.mount = True  # what the last pass saw when the source was a mounted volume
    core.save_state(ctx, link, saved)
    fill(source, 1, prefix="new")
    outcome = run(sync, "hot-to-nas", fleet, textfile=str(tmp_path / "prom"))
    assert "looks unmounted" in str(outcome.result(raise_on_failure=False))
    assert not (destination / "readings" / "new000.json").exists()


def test_a_dry_run_shows_what_would_change_and_changes_nothing(state: Path, tmp_path: Path,
                                                               mirror_job: tuple[str, Path, Path]) -> None:
    from typer.testing import CliRunner

    from primespark.cli.app import app

    fleet, source, destination = mirror_job
    files = fill(source, 4)
    run(sync, "to-cloud", fleet, textfile=str(tmp_path / "prom")).result()
    files[0].unlink()
    fill(source, 1, prefix="new")
    before = tree(destination)
    ctx = FleetContext.load(fleet, "local")
    [link] = links(ctx.fleet, "to-cloud")
    saved = json.loads(core.state_file(ctx, link).read_text())
    out = CliRunner().invoke(app, ["sync", "run", "to-cloud", "--env", fleet, "--transport", "local", "--dry-run"])
    assert out.exit_code == 0, out.output
    assert "would delete 1" in out.output and "- readings/r000.json" in out.output
    assert "would send 1" in out.output and "+ readings/new000.json" in out.output
    assert tree(destination) == before
    assert json.loads(core.state_file(ctx, link).read_text()) == saved, "a dry run changed the link's state"


def test_bandwidth_windows_and_quiet_hours() -> None:
    fleet = load_fleet("homelab")  # Europe/Berlin; pi-1's quiet hours are 23:00-06:30
    assert fleet.sync is not None
    mirror = fleet.sync.jobs["warm-to-cloud"]  # {"07:00": "2M", "23:00": "off"}
    noon = datetime(2026, 6, 1, 10, 0, tzinfo=UTC)  # 12:00 in Berlin (summer time)
    window = core.window_at(fleet, mirror, "nas-1", noon)
    assert window.rate == "2M" and window.bwlimit_kib == 2048 and window.until is not None
    assert window.until.isoformat() == "2026-06-01T23:00:00+02:00"
    early = core.window_at(fleet, mirror, "nas-1", datetime(2026, 6, 1, 3, 0, tzinfo=UTC))  # 05:00: the night's
    assert early.rate == "off" and early.until is not None and early.until.hour == 7
    copy = fleet.sync.jobs["hot-to-nas"]  # no timetable, paused in the Pi's quiet hours
    quiet = core.window_at(fleet, copy, "pi-1", datetime(2026, 6, 1, 22, 0, tzinfo=UTC))  # midnight in Berlin
    assert quiet.paused and quiet.until is not None and quiet.until.isoformat() == "2026-06-02T06:30:00+02:00"
    day = core.window_at(fleet, copy, "pi-1", noon)
    assert not day.paused and day.until is not None and day.until.hour == 23


def test_a_paused_window_sends_nothing_and_says_until_when(state: Path, tmp_path: Path) -> None:
    source = tmp_path / "hot"
    fill(source, 2)
    fleet = make_fleet(tmp_path, **{"paused": {"source": f"pi-1:{source}", "destination": f"nas-1:{tmp_path}/out",
                                               "bandwidth": {"00:00": "pause", "12:00": "pause"}}})
    [link] = run(sync, "paused", fleet, textfile=str(tmp_path / "prom")).result()["links"]
    assert link["status"] == "paused" and "paused until" in link["reason"] and link["files_sent"] == 0
    assert not (tmp_path / "out" / "readings").exists()


def test_a_pause_neither_fails_the_link_in_its_metrics_nor_clears_a_failure(state: Path, tmp_path: Path) -> None:
    """primespark_sync_success is the last pass that ran: SyncRefused must not fire every night of quiet hours."""
    source = tmp_path / "hot"
    fill(source, 2)
    fleet = make_fleet(tmp_path, **{"paused": {"source": f"pi-1:{source}", "destination": f"nas-1:{tmp_path}/out",
                                               "bandwidth": {"00:00": "pause", "12:00": "pause"}}})
    prom = tmp_path / "prom"
    success = prom / "primespark_sync_paused_pi-1.prom"
    [done] = run(sync, "paused", fleet, textfile=str(prom), bwlimit="off").result()["links"]  # past the window
    assert done["status"] == "succeeded" and metrics(success)["primespark_sync_success"] == 1
    [link] = run(sync, "paused", fleet, textfile=str(prom)).result()["links"]
    assert link["status"] == "paused" and metrics(success)["primespark_sync_success"] == 1
    run(sync_check, "paused", fleet, textfile=str(prom)).result()  # the compare republishes the link's figures
    assert metrics(success)["primespark_sync_success"] == 1
    shutil.rmtree(source)  # refused (a missing source); the pauses after it keep it so
    assert run(sync, "paused", fleet, textfile=str(prom), bwlimit="off").is_failed()
    assert metrics(success)["primespark_sync_success"] == 0
    fill(source, 2)
    assert run(sync, "paused", fleet, textfile=str(prom)).result()["links"][0]["status"] == "paused"
    assert metrics(success)["primespark_sync_success"] == 0


def _watchers(source: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-c" in argv and str(source).encode() in argv and any(b"inotify" in a for a in argv):
            pids.append(int(proc.name))
    return pids


def _slots(lock: str) -> int:
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(lock).active_slots


def test_a_lock_made_by_another_run_at_the_same_moment_is_taken_not_an_error(
        state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs taking a lock no one has used yet both make it: the second's create is refused (the first's landed
    between its read and its create). Seen with two agent tasks claiming a host at once."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.exceptions import ObjectNotFound

    lock = f"made-twice-{uuid.uuid4().hex[:8]}"
    ensure_locks([lock])  # the other run's
    read = SyncPrefectClient.read_global_concurrency_limit_by_name
    misses = [lock]

    def read_before_the_other_made_it(self: Any, name: str) -> Any:
        if name in misses:
            misses.remove(name)
            raise ObjectNotFound(http_exc=Exception(f"{name} not found"))
        return read(self, name)

    monkeypatch.setattr(SyncPrefectClient, "read_global_concurrency_limit_by_name", read_before_the_other_made_it)
    ensure_locks([lock])
    assert not misses, "the race was not staged"
    monkeypatch.undo()
    with hold(lock):
        assert _slots(lock) == 1


def test_a_burst_holds_its_lock_across_its_work_and_gives_it_up_when_idle_held_long_or_failed(state: Path) -> None:
    lock = f"burst-test-{uuid.uuid4().hex[:8]}"
    ensure_locks([lock])
    holder = BurstHolder(lock, idle_seconds=1.0, max_hold_seconds=60)
    try:
        assert [holder.submit(_slots, lock).result(timeout=60) for _ in range(3)] == [1, 1, 1]
        assert holder.takes == 1, "back-to-back work took the lock more than once"
        _wait_for(lambda: _slots(lock) == 0, 15, "the lock given up once idle")
        assert holder.submit(_slots, lock).result(timeout=60) == 1 and holder.takes == 2

        def fail() -> None:
            raise RuntimeError("a failed pass")

        with pytest.raises(RuntimeError, match="a failed pass"):
            holder.submit(fail).result(timeout=60)
        _wait_for(lambda: _slots(lock) == 0, 15, "the lock given up after a failure")
        assert holder.submit(_slots, lock).result(timeout=60) == 1 and holder.takes == 3
    finally:
        holder.close()
    assert _slots(lock) == 0, "close() left the lock held"
    every_time = BurstHolder(lock, idle_seconds=60, max_hold_seconds=0)  # held "too long" at once: taken per item
    try:
        assert [every_time.submit(_slots, lock).result(timeout=60) for _ in range(3)] == [1, 1, 1]
        assert every_time.takes == 3
    finally:
        every_time.close()


def test_a_burst_hands_its_lock_to_a_run_waiting_for_it(state: Path) -> None:
    lock = f"burst-test-{uuid.uuid4().hex[:8]}"
    ensure_locks([lock])
    holder = BurstHolder(lock, idle_seconds=600, max_hold_seconds=600)  # only a waiting run makes it let go
    stop = threading.Event()

    def feed() -> None:  # back-to-back work, as a busy link's passes
        while not stop.is_set():
            holder.submit(time.sleep, 0.3).result(timeout=120)

    feeder = threading.Thread(target=feed)
    try:
        holder.submit(time.sleep, 0).result(timeout=60)
        feeder.start()
        assert _gets_within(lock, 90), "a run waiting for the lock did not get it from a busy burst in 90 s"
        assert holder.handovers >= 1
        _wait_for(lambda: holder.takes >= 2, 60, "the burst taking its lock again after the waiting run")
        assert not wanted(lock)
        stop.set()
        feeder.join(timeout=120)
        _wait_for(lambda: _slots(lock) == 1, 30, "the burst holding its lock between items")  # idle: 600 s
        assert _gets_within(lock, 60), "a run waiting for the lock did not get it from an idle burst in 60 s"
        assert holder.handovers >= 2
    finally:
        stop.set()
        if feeder.is_alive():
            feeder.join(timeout=120)
        holder.close()


def test_a_burst_says_when_its_work_waited_long_for_the_lock(state: Path, caplog: pytest.LogCaptureFixture) -> None:
    lock = f"burst-test-{uuid.uuid4().hex[:8]}"
    ensure_locks([lock])
    holder = BurstHolder(lock, label="hot-to-nas/pi-1")
    try:
        with caplog.at_level(logging.WARNING, logger="primespark.orchestration.locks"):
            with hold(lock):  # another run's pass, longer than a take may take unremarked
                waiting = holder.submit(time.sleep, 0)
                time.sleep(SLOW_TAKE_SECONDS + 1)
            waiting.result(timeout=60)
            quick = holder.submit(time.sleep, 0)  # held already: no take, nothing said
            quick.result(timeout=60)
    finally:
        holder.close()
    said = [r.getMessage() for r in caplog.records if "taking" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"hot-to-nas/pi-1: taking {lock} took "), said


def _gets_within(lock: str, seconds: float) -> bool:
    """Whether `hold(lock)` in another thread gets it within `seconds` (a daemon: one still waiting ends with
    pytest)."""
    took = threading.Event()

    def take() -> None:
        with hold(lock):
            took.set()

    threading.Thread(target=take, daemon=True).start()
    return took.wait(seconds)


def _wait_for(condition: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.1)


def test_continuous_sync_is_quick_quiet_when_idle_and_survives_a_dead_watcher(
        state: Path, tmp_path: Path, copy_job: tuple[str, Path, Path]) -> None:
    fleet, source, destination = copy_job
    fill(source, 5, prefix="before")  # made while nothing watched: the first full pass finds them
    ctx = FleetContext.load(fleet, "local")
    [link] = links(ctx.fleet, "hot-to-nas")
    outcome: dict[str, Any] = {}
    context = contextvars.copy_context()
    watcher = threading.Thread(target=lambda: context.run(lambda: outcome.update(result=sync_watch(
        "hot-to-nas", fleet, "local", duration_seconds=45, quiet_seconds=0.5, max_wait_seconds=2,
        textfile=str(tmp_path / "prom"), **FAST))))
    watcher.start()
    try:
        _wait_for(lambda: len(tree(destination)) == 5, 30, "the first full pass")
        written: dict[str, float] = {}
        for i in range(20):
            path = source / "stream" / f"s{i:02d}.json"
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps({"i": i}))
            written[f"stream/s{i:02d}.json"] = time.time()
            time.sleep(0.1)
        arrived: dict[str, float] = {}

        def all_arrived() -> bool:
            for name in written:
                if name not in arrived and (destination / name).exists():
                    arrived[name] = time.time()
            return len(arrived) == len(written)

        _wait_for(all_arrived, 20, "the 20 streamed files")
        lags = sorted(arrived[n] - written[n] for n in written)
        assert lags[-1] < 10, lags
        assert tree(destination) == tree(source)
        # a quiet source makes no passes (once the pass that carried the last files has recorded itself)
        delivered = max(arrived.values())
        _wait_for(lambda: (core.load_state(ctx, link).last_run or 0) >= delivered, 15,
                  "the pass that carried the last files, recorded")
        # the link's lock outlives the pass (kept for the next one; a pass taking its own gives it up before it
        # records itself), and is given up once the link has been idle BURST_IDLE_SECONDS
        assert _slots(sync_lock("hot-to-nas", "pi-1")) == 1, "the burst's lock was not kept across passes"
        last = core.load_state(ctx, link).last_run
        time.sleep(4)
        assert core.load_state(ctx, link).last_run == last, "a pass ran while the source was quiet"
        _wait_for(lambda: _slots(sync_lock("hot-to-nas", "pi-1")) == 0, BURST_IDLE_SECONDS + 10,
                  "the lock given up by an idle link")
        # the watcher dies (as when the source host restarts); what changes meanwhile still arrives
        [pid] = _watchers(source)
        os.kill(pid, signal.SIGKILL)
        (source / "while-down.json").write_text("written while nothing watched")
        _wait_for(lambda: (destination / "while-down.json").exists(), 30, "the change made while the watcher was down")
        _wait_for(lambda: len(_watchers(source)) == 1, 10, "a new watcher")
    finally:
        watcher.join(timeout=120)
    assert outcome["result"]["full_passes"] >= 2 and outcome["result"]["failed"] == 0, outcome
    assert not _watchers(source), "a watcher outlived its flow"


@pytest.mark.parametrize("state_type", ["CANCELLING", "CRASHED"])
def test_a_watch_stops_once_the_server_holds_its_run_cancelled_or_crashed(
        state: Path, tmp_path: Path, copy_job: tuple[str, Path, Path], state_type: str) -> None:
    """Cancelled from the UI (a run started here has no worker to stop it), or marked Crashed while its process
    had lost touch with the server (a replacement may be starting): the watch ends itself, watchers and all."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.objects import StateType
    from prefect.states import State

    fleet, source, destination = copy_job
    fill(source, 3)
    outcome: dict[str, Any] = {}
    context = contextvars.copy_context()

    def watch() -> None:  # as `spark sync watch` runs it
        try:
            run_here(sync_watch, "hot-to-nas", fleet, "local", duration_seconds=120, state_check_seconds=0.5, **FAST)
        except UserError as exc:
            outcome["error"] = exc

    watcher = threading.Thread(target=lambda: context.run(watch))
    watcher.start()
    try:
        _wait_for(lambda: len(tree(destination)) == 3 and len(_watchers(source)) == 1, 30, "watching")
        with get_client(sync_client=True) as client:
            [run] = [r for r in client.read_flow_runs(flow_run_filter=FlowRunFilter())
                     if r.name == "sync-watch-hot-to-nas" and r.state is not None and r.state.is_running()]
            client.set_flow_run_state(run.id, State(type=StateType(state_type)), force=True)
            stopped_at = time.monotonic()
        watcher.join(timeout=30)
        assert not watcher.is_alive(), "the watch went on"
        took = time.monotonic() - stopped_at
    finally:
        watcher.join(timeout=150)
    assert took < 10, took  # far from the 120 s it was started for
    assert not _watchers(source), "a watcher outlived its flow"
    error = outcome["error"]  # the command's one line, not a traceback
    assert error.message == f"the run was cancelled (stopped: the server held it {StateType(state_type).value.title()})"
    with get_client(sync_client=True) as client:
        [after] = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    assert after.state is not None and after.state.is_cancelled(), after.state  # not Completed, not Cancelling


def test_the_full_check_finds_a_differing_copy_and_repairs_it(state: Path, tmp_path: Path,
                                                              copy_job: tuple[str, Path, Path]) -> None:
    fleet, source, destination = copy_job
    (source / "model.bin").write_bytes(os.urandom(100_000))
    fill(source, 3)
    run(sync, "hot-to-nas", fleet, textfile=str(tmp_path / "prom")).result()
    copy = destination / "model.bin"
    stat = copy.stat()
    data = bytearray(copy.read_bytes())
    data[500] ^= 0x01
    copy.write_bytes(bytes(data))
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    quick = run(sync, "hot-to-nas", fleet, textfile=str(tmp_path / "prom")).result()["links"][0]
    assert quick["files_sent"] == 0, "size and time agree: a quick pass cannot see it"
    [found] = run(sync_check, "hot-to-nas", fleet, repair=True, textfile=str(tmp_path / "prom")).result()["links"]
    assert found["differing"] == ["model.bin"] and found["missing"] == [] and found["matched"] == 3
    assert copy.read_bytes() == (source / "model.bin").read_bytes()
    assert "model.bin" in artifact("sync-check-hot-to-nas")


def _commands(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every command the flows run on a host (the local transport's runner), in order: run, or streamed (rsync)."""
    ran: list[list[str]] = []
    real_run, real_stream = LocalRunner.run, LocalRunner.stream

    def recording(self: LocalRunner, argv: Any, **kwargs: Any) -> Any:
        ran.append([str(a) for a in argv])
        return real_run(self, argv, **kwargs)

    def recording_stream(self: LocalRunner, argv: Any, **kwargs: Any) -> Any:
        ran.append([str(a) for a in argv])
        return real_stream(self, argv, **kwargs)

    monkeypatch.setattr(LocalRunner, "run", recording)
    monkeypatch.setattr(LocalRunner, "stream", recording_stream)
    return ran


def _boot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, boot_id: str) -> Path:
    """The destination's boot id, as a file the test can change (a restart of its kernel)."""
    path = tmp_path / "boot_id"
    path.write_text(boot_id + "\n")
    monkeypatch.setattr(transfer, "BOOT_ID", str(path))
    return path


def test_a_pass_flushes_its_destination_once_not_each_file(state: Path, tmp_path: Path,
                                                          copy_job: tuple[str, Path, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    fleet, source, destination = copy_job
    fill(source, 20)
    ran = _commands(monkeypatch)
    [link] = run(sync, "hot-to-nas", fleet, textfile=str(tmp_path / "prom")).result()["links"]
    assert link["status"] == "succeeded" and link["files_sent"] == 20
    rsyncs = [i for i, argv in enumerate(ran) if "rsync" in " ".join(argv)]
    flushes = [i for i, argv in enumerate(ran) if "flush-exit=" in " ".join(argv)]
    assert rsyncs and all("--fsync" not in ran[i] for i in rsyncs), "no flush per file"
    assert [ran[i][-2] for i in flushes] == [str(destination)] * 2, "one before the pass, one after its copies"
    assert flushes[0] < rsyncs[0] and flushes[1] > rsyncs[0]
    ctx = FleetContext.load(fleet, "local")
    saved = core.load_state(ctx, links(ctx.fleet, "hot-to-nas")[0])
    assert not saved.unflushed and saved.destination_boot == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    ran.clear()
    again = run(sync, "hot-to-nas", fleet, textfile=str(tmp_path / "prom")).result()["links"][0]
    assert again["files_sent"] == 0
    assert len([argv for argv in ran if "flush-exit=" in " ".join(argv)]) == 1, \
        "a pass that changed nothing flushes nothing after it"


def test_copies_a_restarted_destination_may_have_lost_are_compared_by_content(
        state: Path, tmp_path: Path, copy_job: tuple[str, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    fleet, source, destination = copy_job
    boot = _boot(monkeypatch, tmp_path, "boot-1")
    (source / "model.bin").write_bytes(os.urandom(100_000))
    fill(source, 3)
    run(sync, "hot-to-nas", fleet, textfile=str(tmp_path / "prom")).result()
    ctx = FleetContext.load(fleet, "local")
    [link] = links(ctx.fleet, "hot-to-nas")

    def lose_a_copy() -> None:
        """What a crash before write-back leaves: the right size and time, the content never written."""
        copy = destination / "model.bin"
        stat = copy.stat()
        copy.write_bytes(bytes(stat.st_size))
        os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        saved = core.load_state(ctx, link)
        saved.unflushed = True  # the pass that wrote it died before its flush
        core.save_state(ctx, link, saved)

    lose_a_copy()
    same_boot = run(sync, "hot-to-nas", fleet, textfile=str(tmp_path / "prom")).result()["links"][0]
    assert same_boot["files_sent"] == 0, "the destination did not restart: its kernel held the copies, flushed now"
    lose_a_copy()
    boot.write_text("boot-2\n")  # the destination restarted before the copies were flushed
    restarted = run(sync, "hot-to-nas", fleet, textfile=str(tmp_path / "prom")).result()["links"][0]
    assert restarted["status"] == "succeeded" and restarted["sent"] == ["model.bin"]
    assert tree(destination) == tree(source)
    saved = core.load_state(ctx, link)
    assert not saved.unflushed and not saved.recheck and saved.destination_boot == "boot-2"


def test_the_verification_reads_each_copy_back_at_the_destination_once(
        state: Path, tmp_path: Path, copy_job: tuple[str, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Over a sync account (the role's gate and rrsync, as sshd runs them): the copies are hashed where they are
    and compared with the sums rsync took of the sources as it sent them; a destination that cannot hash them is
    compared by rsync's checksum run, reading both ends."""
    fleet, source, destination = copy_job
    fill(source, 5)
    (source / "model.bin").write_bytes(os.urandom(300_000))
    destination.mkdir(parents=True)
    route = forced_route(tmp_path, destination, "-wo", "-no-del")
    monkeypatch.setattr(core, "route_for", lambda ctx, link: (route, "/"))
    ctx = FleetContext.load(fleet, "local")
    [link] = links(ctx.fleet, "hot-to-nas")
    sent = core.transfer_link(ctx, link, core.probe(ctx, link)).sent
    assert len(sent) == 6 and all(item.checksum for item in sent)
    corrupt = destination / "model.bin"
    stat = corrupt.stat()
    data = bytearray(corrupt.read_bytes())
    data[1234] ^= 0xFF  # same size and time: only its content tells
    corrupt.write_bytes(bytes(data))
    os.utime(corrupt, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    (destination / "readings" / "r001.json").unlink()
    (source / "readings" / "r002.json").write_text('{"changed": "since it was sent"}')

    read_back = core.verify_link(ctx, link, sent)

    assert (read_back.checked, read_back.differing, read_back.changed_since) == \
        (6, ["model.bin", "readings/r001.json"], []), "the copy of r002 is what was sent: it verifies"
    assert read_back.boot == Path(transfer.BOOT_ID).read_text().strip(), "flushed while hashed (`fsync: pass`)"
    bare = forced_route(gate_without_xxhash(tmp_path, monkeypatch), destination, "-wo", "-no-del")
    monkeypatch.setattr(core, "route_for", lambda ctx, link: (bare, "/"))
    by_rsync = core.verify_link(ctx, link, sent)
    assert by_rsync.differing == ["model.bin"] and by_rsync.boot is None, "nothing flushed: the flush step does it"
    assert by_rsync.changed_since == ["readings/r001.json", "readings/r002.json"]


def test_a_pass_whose_verification_flushed_the_destination_does_not_flush_it_again(
        state: Path, tmp_path: Path, copy_job: tuple[str, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    fleet, source, destination = copy_job
    fill(source, 5)
    destination.mkdir(parents=True)
    route = forced_route(tmp_path, destination, "-wo", "-no-del")
    monkeypatch.setattr(core, "route_for", lambda ctx, link: (route, "/"))
    flushes: list[str] = []
    flush_destination = core.flush_destination

    def counted(ctx: FleetContext, link: Any) -> str:
        flushes.append(link.name)
        return flush_destination(ctx, link)

    monkeypatch.setattr(core, "flush_destination", counted)
    [done] = run(sync, "hot-to-nas", fleet, textfile=str(tmp_path / "prom")).result()["links"]
    assert done["status"] == "succeeded" and done["verified"] == 5 and tree(destination) == tree(source)
    assert len(flushes) == 1, "one flush before the pass (its boot id); the one after came with the verification"
    ctx = FleetContext.load(fleet, "local")
    [link] = links(ctx.fleet, "hot-to-nas")
    saved = core.load_state(ctx, link)
    assert not saved.unflushed and saved.destination_boot == Path(transfer.BOOT_ID).read_text().strip()


def test_a_destination_restarted_during_a_pass_fails_it_and_the_next_compares_everything(
        state: Path, tmp_path: Path, copy_job: tuple[str, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    fleet, source, destination = copy_job
    boot = _boot(monkeypatch, tmp_path, "boot-1")
    fill(source, 5)
    verify_link = core.verify_link

    def restart_then_verify(*args: Any) -> core.Verification:
        boot.write_text("boot-2\n")
        return verify_link(*args)

    monkeypatch.setattr(core, "verify_link", restart_then_verify)
    failed = run(sync, "hot-to-nas", fleet, textfile=str(tmp_path / "prom"))
    assert failed.is_failed() and "restarted during the pass" in str(failed.message) + artifact("sync-hot-to-nas")
    ctx = FleetContext.load(fleet, "local")
    [link] = links(ctx.fleet, "hot-to-nas")
    assert core.load_state(ctx, link).recheck
    monkeypatch.setattr(core, "verify_link", verify_link)
    lost = destination / "readings" / "r002.json"
    stat = lost.stat()
    lost.write_bytes(bytes(stat.st_size))
    os.utime(lost, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    [again] = run(sync, "hot-to-nas", fleet, textfile=str(tmp_path / "prom")).result()["links"]
    assert again["status"] == "succeeded" and again["sent"] == ["readings/r002.json"]
    assert tree(destination) == tree(source) and not core.load_state(ctx, link).recheck


def test_status_shows_pending_files_and_the_oldest_change(state: Path, tmp_path: Path,
                                                          copy_job: tuple[str, Path, Path]) -> None:
    fleet, source, _ = copy_job
    fill(source, 2)
    run(sync, "hot-to-nas", fleet, textfile=str(tmp_path / "prom")).result()
    late = fill(source, 3, prefix="late")
    old = time.time() - 120
    os.utime(late[0], (old, old))
    ctx = FleetContext.load(fleet, "local")
    [link] = links(ctx.fleet, "hot-to-nas")
    row = core.status_of(ctx, link)
    assert row.pending_files == 3 and row.last_status == "succeeded"
    assert row.lag_seconds is not None and 119 < row.lag_seconds < 180


def test_key_material_for_the_sync_role(state: Path, tmp_path: Path) -> None:
    from lab_fleets import lab_fleet

    from primespark.mesh.service import plan_and_save

    lab = lab_fleet(tmp_path, {"backend": "local"})  # the lab's OpenBao runs only under `spark lab up`
    ctx = FleetContext.load(lab, "ssh")
    known = ctx.state_dir / "ssh" / "known_hosts"
    known.parent.mkdir(parents=True, exist_ok=True)
    known.write_text("nas-1,172.30.1.20 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeNasKeyForTheTest\n"
                     "analytics-1,172.30.2.13,172.30.0.23 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeCloudKeyTest\n"
                     "ops-1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeColdTierKeyTest\n"
                     + "".join(f"pi-{n} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakePi{n}KeyForTheTest\n"
                               for n in (1, 2, 3)))
    pi = core.host_material(lab, "pi-1")
    from cryptography.hazmat.primitives import serialization

    serialization.load_ssh_private_key(str(pi["private_key"]).encode(), password=None)  # a usable OpenSSH key
    assert pi["known_hosts"] == ["172.30.1.20 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeNasKeyForTheTest"]
    # the hot tier's `recall: true`: the warm and cold tiers' hosts push recalled files back
    assert set(pi["public_keys"]) == {"nas-1", "ops-1"}  # type: ignore[arg-type]
    with pytest.raises(core.UserError, match="no saved plan"):  # nas-1 pushes to the cloud over the mesh
        core.host_material(lab, "nas-1")
    plan = plan_and_save(ctx.fleet, "fleet", ctx.state_dir, ctx.secrets).plan
    nas = core.host_material(lab, "nas-1")
    overlay = plan.state().address_of("analytics-1")
    pis = {f"{ctx.fleet.hosts[f'pi-{n}'].address} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakePi{n}KeyForTheTest"
           for n in (1, 2, 3)}
    # and to ops-1's cold tier over the mesh, through the tier pass's own account (no sync job goes there)
    cold = f"{plan.state().address_of('ops-1')} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeColdTierKeyTest"
    assert set(nas["known_hosts"]) == {f"{overlay} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeCloudKeyTest", cold, *pis}
    assert set(nas["public_keys"]) == {"pi-1", "pi-2", "pi-3"}  # type: ignore[arg-type]
    assert nas["public_keys"]["pi-1"] == core.client_key(ctx, "pi-1")[1]  # type: ignore[index]
    assert core.host_material(lab, "pi-1")["private_key"] == pi["private_key"], "the key was made again"
    assert core.host_material(lab, "analytics-1") == {
        "private_key": None, "known_hosts": [], "public_keys": {"nas-1": core.client_key(ctx, "nas-1")[1]}}
    assert core.host_material(lab, "ops-1")["public_keys"] == {"nas-1": core.client_key(ctx, "nas-1")[1]}


def test_a_large_argument_passed_as_is_reaches_its_task_unwalked(state: Path) -> None:
    """A pass hands its tasks the transfer report (100,000 files in the benchmark): Prefect walks every element
    of a task's arguments first (seconds per task at that size), except what `as_is` marks; the task still gets
    the value itself, not Prefect's wrapper."""
    from dataclasses import dataclass

    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    from primespark.orchestration.inputs import as_is

    read: list[int] = []

    @dataclass
    class Sent:
        size: int

        def __getattribute__(self, name: str) -> Any:
            if name == "size":
                read.append(1)
            return object.__getattribute__(self, name)

    @task(cache_policy=NO_CACHE)
    def count(sent: list[Sent]) -> str:
        return type(sent).__name__

    @flow
    def two_passes() -> tuple[str, int, str, int]:
        sent = [Sent(n) for n in range(100)]
        walked = count(sent)
        visits = len(read)
        unwalked = count(as_is(sent))
        return walked, visits, unwalked, len(read) - visits

    walked, visits, unwalked, more = two_passes()
    assert walked == unwalked == "list"
    assert visits >= 100 and more == 0, (visits, more)  # the first call walked each element; as_is none
