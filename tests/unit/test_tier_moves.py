"""Tier migration on this machine: the local transport (every host a folder here), real rsync through the transfer
engine, the real host-side script and SQLite catalog; the plan's policy on its own; moves killed with SIGKILL at
each step and replayed."""

from __future__ import annotations

import contextlib
import contextvars
import gc
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash
import yaml

from primespark.agents.execute import HOT_TIER_STAGING, results_root
from primespark.agents.taskside import STAGING as TASK_STAGING
from primespark.context import FleetContext
from primespark.data import migrate, tierside, transfer
from primespark.data.tiers import FileInfo, HostScan, plan_boundary, render_plan
from primespark.errors import UserError
from primespark.fleet import load_fleet
from primespark.fleet.model import Tier, TierName

ROOT = Path(__file__).resolve().parents[2]
MINI = ROOT / "tests" / "fixtures" / "fleet" / "valid" / "mini-full.yaml"
DAY = 86400
NOW = 1_800_000_000.0


# --- the plan on its own -----------------------------------------------------------------------------------------


def _tiers(**hot: Any) -> dict[TierName, Tier]:
    return {TierName.hot: Tier(hosts=["pi-1"], path="/srv/hot", capacity_gb=0.001, max_age_days=7,
                               low_watermark=0.5, high_watermark=0.8, pinned=["config/**", "**/*.lock"],
                               min_age_minutes=10, **hot),
            TierName.warm: Tier(hosts=["nas-1"], path="/srv/warm", capacity_gb=0.01, max_age_days=90)}


def _file(path: str, size: int, age_days: float, *, atime_age_days: float | None = None,
          open_for_writing: bool = False) -> FileInfo:
    mtime = NOW - age_days * DAY
    atime = NOW - (atime_age_days if atime_age_days is not None else age_days) * DAY
    return FileInfo(path, size, int(mtime * 1e9), int(atime * 1e9), open_for_writing)


def test_the_plan_says_why_each_file_moves_or_stays() -> None:
    files = (
        _file("data/old.bin", 1000, 10),
        _file("data/read-lately.bin", 1000, 10, atime_age_days=1),  # old, but read yesterday (atime kept)
        _file("config/app.conf", 1000, 30),
        _file("logs/app.lock", 1000, 30),
        _file("keep/raw.bin", 1000, 30),
        _file("keep/deeper/raw.bin", 1000, 30),
        _file("data/open.bin", 1000, 30, open_for_writing=True),
        _file("data/fresh.bin", 1000, 5 / (24 * 60)),  # written five minutes ago
    )
    scan = HostScan("pi-1", TierName.hot, "/srv/hot", files, 8000, frozenset({"keep"}), atime_kept=True)
    plan = plan_boundary(_tiers(), TierName.hot, [scan], {"nas-1": 0}, NOW)
    assert [(m.path, m.destination) for m in plan.moves] == [("data/old.bin", "nas-1")]
    assert plan.moves[0].reason == "older than 7 days (last used 10.0 days ago)"
    kept = {s.path: s.reason for s in plan.skipped}
    assert kept == {"config/app.conf": "pinned: matches 'config/**'", "logs/app.lock": "pinned: matches '**/*.lock'",
                    "keep/raw.bin": "pinned: .spark-pin in keep/", "keep/deeper/raw.bin": "pinned: .spark-pin in keep/",
                    "data/open.bin": "open for writing"}
    # the fresh file is young, so it would not have moved anyway: not listed; below the watermark nothing else moves
    assert "data/read-lately.bin" not in kept
    # without access times (noatime), the file read yesterday is as old as its modification
    plain = plan_boundary(_tiers(), TierName.hot, [HostScan("pi-1", TierName.hot, "/srv/hot", files, 8000,
                                                            frozenset({"keep"}), atime_kept=False)],
                          {"nas-1": 0}, NOW)
    assert [m.path for m in plain.moves] == ["data/old.bin", "data/read-lately.bin"]


def test_above_the_high_watermark_the_oldest_move_until_the_low_one_and_the_plan_is_deterministic() -> None:
    files = [_file(f"d/{i:02d}.bin", 100_000, 1 + i / 10) for i in range(9)]  # 900 kB of 1 MB: above 80 %
    files.append(_file("d/pinned.lock", 50_000, 30))
    scan = HostScan("pi-1", TierName.hot, "/srv/hot", tuple(files), 950_000)
    plan = plan_boundary(_tiers(), TierName.hot, [scan], {"nas-1": 0}, NOW)
    moved = [m.path for m in plan.moves]
    assert moved == ["d/08.bin", "d/07.bin", "d/06.bin", "d/05.bin", "d/04.bin"]  # oldest first
    assert all("above its high watermark (95% > 80%)" in m.reason for m in plan.moves)
    assert plan.usage["pi-1"].after == 450_000 <= 0.5 * 1_000_000
    # old enough to move by age, and pinned: it stays, and the plan says why
    assert {s.path: s.reason for s in plan.skipped} == {"d/pinned.lock": "pinned: matches '**/*.lock'"}
    shuffled = HostScan("pi-1", TierName.hot, "/srv/hot", tuple(reversed(files)), 950_000)
    assert render_plan(plan_boundary(_tiers(), TierName.hot, [shuffled], {"nas-1": 0}, NOW)) == render_plan(plan)


def test_a_move_that_would_fill_the_next_tier_above_its_high_watermark_waits_and_says_so() -> None:
    files = (_file("a.bin", 2_000_000, 10), _file("b.bin", 1_000_000, 9))
    scan = HostScan("pi-1", TierName.hot, "/srv/hot", files, 3_000_000)
    plan = plan_boundary(_tiers(), TierName.hot, [scan], {"nas-1": 6_600_000}, NOW)  # warm: 10 MB, high 85 %
    assert [m.path for m in plan.moves] == ["b.bin"]
    [waiting] = plan.waiting
    assert waiting.path == "a.bin"
    assert waiting.reason == "waits: nas-1 would go above its high watermark (86% > 85%)"
    assert plan.usage["nas-1"].after == 7_600_000


def test_an_agent_tasks_staging_folder_never_moves_its_committed_result_may() -> None:
    """A task writes into its staging folder on the hot tier and commits it by a rename: files aged down from there
    would be missing from its result. Above the high watermark too, and on the hot tier only."""
    staging = f"{HOT_TIER_STAGING}/t-1"
    files = (_file(f"{staging}/out/part-0.bin", 300_000, 10), _file(f"{staging}/stdout.log", 300_000, 10),
             _file("tasks/t-0/out/result.bin", 300_000, 10), _file("data/new.bin", 50_000, 1))
    scan = HostScan("pi-1", TierName.hot, "/srv/hot", files, 950_000)  # above 80 %: the watermark moves old first
    plan = plan_boundary(_tiers(), TierName.hot, [scan], {"nas-1": 0}, NOW)
    assert [m.path for m in plan.moves] == ["tasks/t-0/out/result.bin", "data/new.bin"]
    assert {s.path: s.reason for s in plan.skipped} == {f"{staging}/out/part-0.bin": "an agent task's staging folder",
                                                        f"{staging}/stdout.log": "an agent task's staging folder"}
    warm = HostScan("nas-1", TierName.warm, "/srv/warm", (_file(f"{staging}/x.bin", 1000, 100),), 1000)
    cold = {**_tiers(), TierName.cold: Tier(hosts=["ops-1"], path="/srv/cold", capacity_gb=1)}
    assert [m.path for m in plan_boundary(cold, TierName.warm, [warm], {"ops-1": 0}, NOW).moves] == [f"{staging}/x.bin"]


# --- on real files -------------------------------------------------------------------------------------------------


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    monkeypatch.setenv("SPARK_STATE_DIR", str(path))
    return path


def make_fleet(root: Path, hot: dict[str, Any] | None = None, warm: dict[str, Any] | None = None) -> str:
    """The mini fleet with its tiers in folders under `root`: one Pi's hot tier, the NAS's warm, ops-1's cold."""
    data = yaml.safe_load(MINI.read_text())
    data["tiers"] = {
        "hot": {"hosts": ["pi-1"], "path": f"{root}/hot", "capacity_gb": 0.001, "max_age_days": 7,
                "low_watermark": 0.5, "high_watermark": 0.8, "pinned": ["config/**"], "min_age_minutes": 10,
                **(hot or {})},
        "warm": {"hosts": ["nas-1"], "path": f"{root}/warm", "capacity_gb": 1, "max_age_days": 90, **(warm or {})},
        "cold": {"hosts": ["ops-1"], "path": f"{root}/cold", "capacity_gb": 1},
    }
    data["backup"]["plans"] = {}
    for tier in ("hot", "warm", "cold"):
        (root / tier).mkdir(exist_ok=True)
    path = root / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    load_fleet(str(path))  # fails here, with its location, if the tiers are wrong
    return str(path)


def put(path: Path, size: int, age_days: float, seed: int | None = None) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    content = random.Random(seed if seed is not None else str(path)).randbytes(size)
    path.write_bytes(content)
    when = time.time() - age_days * DAY
    os.utime(path, (when, when))
    return content


def quietly(path: Path) -> bytes:
    """A file's content, read without making it look used (its access time is the policy's input)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
    with open(fd, "rb") as handle:
        return handle.read()


def temporaries(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if migrate.STAGING in p.parts or ".~tmp~" in p.parts]


@pytest.fixture
def tiers(tmp_path: Path, state: Path) -> tuple[FleetContext, Path]:
    fleet = make_fleet(tmp_path)
    return FleetContext.load(fleet, "local"), tmp_path


def one_pass(ctx: FleetContext, tier: TierName = TierName.hot) -> list[migrate.BatchResult]:
    plan, algorithm = migrate.plan_pass(ctx, tier)
    return migrate.run_plan(ctx, plan, algorithm)


def test_a_full_hot_tier_ends_at_or_below_its_low_watermark_and_pinned_open_and_fresh_files_stay(
        tiers: tuple[FleetContext, Path]) -> None:
    ctx, root = tiers
    hot, warm = root / "hot", root / "warm" / "pi-1"
    old = {f"readings/old-{i}.bin": put(hot / f"readings/old-{i}.bin", 50_000, 10 + i) for i in range(8)}
    recent = {f"readings/new-{i}.bin": put(hot / f"readings/new-{i}.bin", 50_000, 1 + i / 10) for i in range(10)}
    stays = {"config/site.conf": put(hot / "config/site.conf", 50_000, 30),
             "raw/keep.bin": put(hot / "raw/keep.bin", 50_000, 30),
             "logs/open.bin": put(hot / "logs/open.bin", 50_000, 30),
             "incoming/fresh.bin": put(hot / "incoming/fresh.bin", 50_000, 0)}
    (hot / "raw" / ".spark-pin").touch()
    capacity = 1_000_000
    assert sum(len(c) for c in [*old.values(), *recent.values(), *stays.values()]) > 0.8 * capacity
    with open(hot / "logs/open.bin", "ab") as writer:  # a writer holds it open
        when = time.time() - 30 * DAY
        os.utime(hot / "logs/open.bin", (when, when))
        results = one_pass(ctx)
        assert writer.writable()
    [result] = results
    used = sum(p.stat().st_size for p in hot.rglob("*") if p.is_file() and tierside.OWN_PREFIX not in str(p))
    assert used <= 0.5 * capacity, f"{used} bytes left on hot"
    for rel, content in stays.items():
        assert (hot / rel).read_bytes() == content, f"{rel} moved"
        assert not (warm / rel).exists()
    for rel, content in old.items():
        assert not (hot / rel).exists(), f"{rel} (older than max_age_days) stayed"
        assert (warm / rel).read_bytes() == content
    moved = [rel for rel in [*old, *recent] if (warm / rel).exists()]
    assert result.moved == len(moved) and len(moved) > len(old)  # the watermark moved some recent ones too
    for rel in moved:
        [row] = migrate.where(ctx, f"pi-1:{hot / rel}")
        assert (row["tier"], row["host"], row["path"]) == ("warm", "nas-1", str(warm / rel))
        assert row["size"] == (warm / rel).stat().st_size
    assert not temporaries(root)
    assert not migrate.backlog(ctx)
    # the hot tier's ledger counts the files moved out, for its backups' shrink check
    assert json.loads((hot / tierside.LEDGER).read_text())["files"] == len(moved)


def test_the_copy_into_the_staging_folder_renames_each_file_once(tiers: tuple[FleetContext, Path],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """No --delay-updates for the copy: the staging folder is the copies' waiting room already (the place step
    renames them into place), and rsync's extra rename of every file cost a third of the copy's time."""
    ctx, root = tiers
    files = {f"d/f{i}.bin": put(root / "hot" / f"d/f{i}.bin", 2000, 30) for i in range(3)}
    plans: list[transfer.TransferPlan] = []
    real_run = transfer.run

    def run(runner: Any, plan: transfer.TransferPlan, **kwargs: Any) -> transfer.TransferReport:
        plans.append(plan)
        return real_run(runner, plan, **kwargs)

    monkeypatch.setattr(transfer, "run", run)
    [result] = one_pass(ctx)
    assert result.moved == 3 and len(plans) == 1
    assert "--delay-updates" not in plans[0].argv() and "--fsync" not in plans[0].argv()
    assert all((root / "warm" / "pi-1" / rel).read_bytes() == content for rel, content in files.items())
    assert not temporaries(root)


def test_a_move_reads_each_source_once_and_records_the_sum_rsync_took(tiers: tuple[FleetContext, Path],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The source's hash is the sum rsync took as it sent the file (its receiver checked the copy against it): no
    second read of every source; the flushed copy is still hashed and compared with it."""
    ctx, root = tiers
    files = {f"d/f{i}.bin": put(root / "hot" / f"d/f{i}.bin", 3000 + i, 30) for i in range(4)}
    ops: list[tuple[str, str]] = []
    real_side = migrate.side

    def side(runner: Any, op: str, spec: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        ops.append((runner.name, op))
        return real_side(runner, op, spec, timeout)

    monkeypatch.setattr(migrate, "side", side)
    [result] = one_pass(ctx)
    assert result.moved == 4
    assert ("pi-1", "hash") not in ops and ("nas-1", "check") in ops
    for rel, content in files.items():
        [row] = migrate.where(ctx, str(root / "hot" / rel))
        assert row["hash"] == f"xxh3_128:{xxhash.xxh3_128(content).hexdigest()}"


def journal_batch(files: int) -> migrate.Batch:
    batch = migrate.Batch("pi-1", "nas-1", "/srv/hot", "/srv/warm/pi-1", "xxh3_128")
    batch.entries = [migrate.Entry("move", f"/srv/hot/f{i}", f"f{i}", f"/s/f{i}", f"/w/f{i}", "pi-1", f"/srv/hot/f{i}",
                                   "warm", 10, 1) for i in range(files)]
    return batch


def test_the_journal_appends_what_changed_and_a_save_cut_short_counts_as_not_made(tmp_path: Path) -> None:
    batch = journal_batch(1000)
    journal = tmp_path / "pi-1--nas-1.json"
    migrate.save(journal, batch)
    first = journal.stat().st_size
    batch.entries[7].step, batch.entries[7].hash = "copied", "xxh3_128:ab"
    migrate.save(journal, batch)
    migrate.save(journal, batch)  # nothing changed: nothing written
    assert len(journal.read_text().splitlines()) == 2 and journal.stat().st_size - first < 100
    loaded = migrate.load(journal)
    assert loaded is not None and [(e.step, e.hash) for e in loaded.entries] == \
        [(e.step, e.hash) for e in batch.entries]
    batch.entries[8].step = "copied"
    migrate.save(journal, batch)
    with open(journal, "r+b") as cut:  # the last save's line torn by a crash
        cut.truncate(journal.stat().st_size - 5)
    loaded = migrate.load(journal)
    assert loaded is not None and (loaded.entries[7].step, loaded.entries[8].step) == ("copied", "planned")
    loaded.entries[9].step = "copied"  # a replay's save after the torn line: the batch written whole again
    migrate.save(journal, loaded)
    assert len(journal.read_text().splitlines()) == 1
    again = migrate.load(journal)
    assert again is not None and [e.step for e in again.entries[7:10]] == ["copied", "planned", "copied"]
    assert again is not None
    again.entries[10].step = "copied"
    migrate.save(journal, again)
    again.entries[11].step = "copied"
    migrate.save(journal, again)
    journal.write_text(journal.read_text().replace('{"steps"', '{"steps', 1))  # damage before the end: refused
    with pytest.raises(UserError, match="cannot be read"):
        migrate.load(journal)


def test_a_step_that_moves_the_whole_batch_is_one_short_journal_line(tmp_path: Path) -> None:
    batch = journal_batch(10_000)
    journal = tmp_path / "pi-1--nas-1.json"
    migrate.save(journal, batch)
    for i, entry in enumerate(batch.entries):  # the copy: every entry's hash, one by one
        entry.step, entry.hash = "copied", f"xxh3_128:{i:032x}"
    migrate.save(journal, batch)
    for entry in batch.entries:
        entry.step = "verified"
    batch.entries[5000].step, batch.entries[5000].note = "abandoned", "copy differs from the source"
    before = journal.stat().st_size
    migrate.save(journal, batch)
    assert journal.stat().st_size - before < 200  # three runs, not 10,000 entries
    loaded = migrate.load(journal)
    assert loaded is not None
    assert [(e.step, e.note, e.hash) for e in loaded.entries] == [(e.step, e.note, e.hash) for e in batch.entries]


def test_a_chunks_save_writes_its_own_entries_and_the_journal_loads_whole(tmp_path: Path) -> None:
    """Two chunks of a batch saved by their own steps (the second one first, its entries in reverse order, as chunks
    of another order than the plan's): each save compares only its chunk, and the journal loads as the batch is."""
    batch = journal_batch(10_000)
    journal = tmp_path / "pi-1--nas-1.json"
    migrate.save(journal, batch)
    first, second = batch.entries[:4000], batch.entries[4000:][::-1]
    for i, entry in enumerate(second):
        entry.step, entry.hash = "copied", f"xxh3_128:{i:032x}"
    migrate.save(journal, batch, second)
    for entry in second:
        entry.step = "verified"
    migrate.save(journal, batch, second)
    for entry in first:
        entry.step = "copied"
    first[7].note = "a note"
    migrate.save(journal, batch, first)
    assert len(journal.read_text().splitlines()) == 4
    loaded = migrate.load(journal)
    assert loaded is not None
    assert [(e.step, e.note, e.hash) for e in loaded.entries] == [(e.step, e.note, e.hash) for e in batch.entries]


def test_chunks_of_smaller_files_are_copied_first_each_folder_whole_unless_larger_than_a_chunk() -> None:
    """A folder of large files ahead of one of small files in path order: the small files' chunk comes first (their
    settling then runs beside the large files' copy, and the pass ends on a chunk quick to settle). The large
    folder holds more than a chunk's bytes: it is cut by bytes (the pass ends on the settling of its last piece
    only)."""
    def entry(rel: str, size: int) -> migrate.Entry:
        return migrate.Entry("move", f"/srv/hot/{rel}", rel, f"/s/{rel}", f"/w/{rel}", "pi-1", f"/srv/hot/{rel}",
                             "warm", size, 1)

    large = [entry(f"a/l{i}", migrate.CHUNK_BYTES // 2) for i in range(3)]
    small = [entry(f"b/f{i}", 1000) for i in range(10)]
    pieces = migrate.chunks([*small[::-1], *large])
    assert [[e.rel for e in chunk] for chunk in pieces] == [[e.rel for e in small], [e.rel for e in large[:2]],
                                                            [e.rel for e in large[2:]]]
    few = migrate.chunks([*small, *large[:2]])  # a folder of exactly a chunk's bytes stays whole
    assert [[e.rel for e in chunk] for chunk in few] == [[e.rel for e in small], [e.rel for e in large[:2]]]
    ahead = [entry(f"0/f{i}", 1000) for i in range(3)]  # small files before the large folder in path order
    pieces = migrate.chunks([*large, *ahead])
    assert [[e.rel for e in chunk] for chunk in pieces] == [[e.rel for e in ahead], [e.rel for e in large[:2]],
                                                            [e.rel for e in large[2:]]]


def test_the_journal_writes_once_what_every_entry_shares_and_loads_each_entry_as_it_was(tmp_path: Path) -> None:
    batch = journal_batch(1000)  # paths below no folder of the batch's but the source and its origin
    journal = tmp_path / "pi-1--nas-1.json"
    migrate.save(journal, batch)
    head = json.loads(journal.read_text().splitlines()[0])
    assert head["columns"] == ["rel", "staging", "final", "size", "mtime_ns", "atime_ns"]
    assert head["below"] == {"source": "/srv/hot/", "origin_path": "/srv/hot/"}
    assert head["same"] == {"action": "move", "origin_host": "pi-1", "to_tier": "warm", "hash": None,
                            "step": "planned", "note": ""}
    batch.entries[3].origin_path, batch.entries[4].note = "/srv/hot/elsewhere", "a note"  # no longer shared
    batch.saved = None  # written whole again
    migrate.save(journal, batch)
    head = json.loads(journal.read_text().splitlines()[0])
    assert "origin_path" in head["columns"] and "note" in head["columns"]
    loaded = migrate.load(journal)
    assert loaded is not None and loaded.entries == batch.entries


def test_a_journal_of_rows_of_every_field_still_replays(tmp_path: Path) -> None:
    """A journal a killed pass of the previous version left (a row of every field per entry) loads."""
    batch = journal_batch(3)
    journal = tmp_path / "pi-1--nas-1.json"
    head = {"source_host": "pi-1", "dest_host": "nas-1", "source_root": "/srv/hot", "dest_root": "/srv/warm/pi-1",
            "algorithm": "xxh3_128", "columns": migrate.ENTRY_FIELDS,
            "rows": [[getattr(e, name) for name in migrate.ENTRY_FIELDS] for e in batch.entries]}
    journal.write_text(json.dumps(head) + "\n" + json.dumps({"steps": [["copied", "", [[0, 2]]]], "set": []}) + "\n")
    loaded = migrate.load(journal)
    assert loaded is not None and [e.step for e in loaded.entries] == ["copied", "copied", "planned"]
    assert [e.source for e in loaded.entries] == [e.source for e in batch.entries]


def test_a_journal_written_before_rows_still_replays(tmp_path: Path) -> None:
    """A journal a killed pass of the previous version left (each entry a dict, every change listed) loads."""
    entry = migrate.Entry("move", "/srv/hot/a", "a", "/s/a", "/w/a", "pi-1", "/srv/hot/a", "warm", 10, 1)
    journal = tmp_path / "pi-1--nas-1.json"
    head = {"source_host": "pi-1", "dest_host": "nas-1", "source_root": "/srv/hot", "dest_root": "/srv/warm/pi-1",
            "algorithm": "xxh3_128", "entries": [vars(entry)]}
    journal.write_text(json.dumps(head) + "\n" + json.dumps({"set": [[0, "copied", "", "xxh3_128:ab"]]}) + "\n")
    loaded = migrate.load(journal)
    assert loaded is not None and (loaded.entries[0].step, loaded.entries[0].hash) == ("copied", "xxh3_128:ab")


def test_a_pass_leaves_a_running_tasks_staging_folder_on_the_hot_tier(tiers: tuple[FleetContext, Path]) -> None:
    """Where the agents write (`results_root`, its staging folder), an old file stays; the committed result moves."""
    ctx, root = tiers
    tasks = Path(results_root(ctx.fleet, "pi-1"))
    assert tasks.parent == root / "hot"
    staging = {f"{TASK_STAGING}/t-1/out/part-{i}.bin": put(tasks / TASK_STAGING / f"t-1/out/part-{i}.bin", 1000, 30)
               for i in range(3)}
    committed = put(tasks / "t-0" / "out" / "result.bin", 1000, 30)
    [result] = one_pass(ctx)
    for rel, content in staging.items():
        assert (tasks / rel).read_bytes() == content, f"{rel} moved while its task may still write there"
    assert not (root / "warm" / "pi-1" / tasks.name / TASK_STAGING).exists()
    assert (root / "warm" / "pi-1" / tasks.name / "t-0" / "out" / "result.bin").read_bytes() == committed
    assert result.moved == 1


def test_a_missing_lower_tier_folder_moves_nothing(tiers: tuple[FleetContext, Path]) -> None:
    ctx, root = tiers
    put(root / "hot" / "a.bin", 1000, 30)
    (root / "warm").rmdir()  # the NAS's disk not mounted: its mount point gone, or empty
    with pytest.raises(UserError, match=r"warm tier's folder .* is missing on nas-1"):
        migrate.plan_pass(ctx, TierName.hot)
    assert (root / "hot" / "a.bin").exists()


# --- kills: SIGKILL of the process running the move, at each step, then replay -------------------------------------

MOVER = """
import sys
from primespark.agents.execute import HOT_TIER_STAGING, results_root
from primespark.agents.taskside import STAGING as TASK_STAGING
from primespark.context import FleetContext
from primespark.data import migrate
from primespark.fleet.model import TierName
ctx = FleetContext.load(sys.argv[1], "local")
if len(sys.argv) > 2:
    migrate.CHUNK_FILES = int(sys.argv[2])
plan, algorithm = migrate.plan_pass(ctx, TierName.hot)
migrate.run_plan(ctx, plan, algorithm)
"""
# the steps a chunk's journal shows on its way (its check places what it verified: "verified" is seen only where a
# copy's hash was not known before the check, so a kill waiting for it would mostly find the pass ended)
STEPS = ("planned", "copied", "placed", "committed")


def _processes() -> dict[int, tuple[int, int]]:
    """pid → (ppid, session)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(name)] = (int(fields[1]), int(fields[3]))
    return out


def kill_tree(root: int) -> None:
    """The mover and everything it started (their own sessions included), frozen first so nothing new starts,
    then killed: as if the machine running the pass had died there."""
    seen: set[int] = set()
    while True:
        table = _processes()
        sessions = {table[p][1] for p in seen | {root} if p in table}
        tree = {root} | {p for p, (parent, sid) in table.items() if parent in seen | {root} or sid in sessions}
        new = tree - seen
        if not new:
            break
        for pid in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        seen |= new
    for pid in seen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _journal_steps(path: Path) -> set[str]:
    try:
        batch = migrate.load(path)
    except UserError:  # caught mid-write
        return set()
    return {e.step for e in batch.entries} if batch else set()


def _least_step(path: Path) -> str | None:
    """The step the whole batch has reached (its least advanced unfinished entry's)."""
    steps = [s for s in _journal_steps(path) if s not in migrate.FINISHED]
    return min(steps, key=migrate.ORDER.index) if steps else None


def run_and_kill(fleet: str, journal: Path, at_step: str | None, after: float | None, chunk_files: int | None = None
                 ) -> tuple[str | None, float]:
    """Start a pass in a process of its own; kill it once its journal shows `at_step` (or `after` seconds after the
    journal appeared: the moving, not Python's start-up). The steps the journal showed when it died, or None if the
    pass ended first; and how long the journal was there."""
    chunking = [] if chunk_files is None else [str(chunk_files)]
    mover = subprocess.Popen([sys.executable, "-c", MOVER, fleet, *chunking], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    appeared: float | None = None
    try:
        while mover.poll() is None and time.monotonic() < deadline:
            if appeared is None and journal.exists():
                appeared = time.monotonic()
            if (at_step is not None and _least_step(journal) == at_step) or \
                    (after is not None and appeared is not None and time.monotonic() - appeared >= after):
                kill_tree(mover.pid)
                mover.wait(timeout=30)
                return ",".join(sorted(_journal_steps(journal))) or "before the journal", 0.0
            time.sleep(0.001)
        assert mover.poll() is not None, "the pass did not end within 120 s"
        assert mover.returncode == 0, mover.stderr.read().decode() if mover.stderr else ""
        return None, time.monotonic() - appeared if appeared is not None else 0.0
    finally:
        if mover.poll() is None:
            kill_tree(mover.pid)
        mover.wait(timeout=30)
        if mover.stderr:
            mover.stderr.close()


def exactly_once(ctx: FleetContext, root: Path, originals: dict[str, bytes], synced: frozenset[str] = frozenset()
                 ) -> dict[str, int]:
    """Every file on one tier only, equal, with one catalog entry where it is below hot and none on hot; no
    temporaries, no unfinished journal. (A file still on hot may also have its sync job's copy on warm, as it had
    before the pass: `synced`.)"""
    hot, warm = root / "hot", root / "warm" / "pi-1"
    entries = {row["origin_path"]: row for row in migrate.ls(ctx, "pi-1")}
    where = {"hot": 0, "warm": 0}
    for rel, content in originals.items():
        places = [p for p in (hot / rel, warm / rel) if p.exists()]
        if rel in synced and len(places) == 2:
            assert quietly(warm / rel) == content
            places = [hot / rel]
        assert len(places) == 1, f"{rel} is at {places}"
        assert quietly(places[0]) == content, f"{rel} differs at {places[0]}"
        if places[0] == warm / rel:
            assert entries[str(hot / rel)]["path"] == str(warm / rel)
            where["warm"] += 1
        else:
            assert str(hot / rel) not in entries, f"{rel} is on hot and in the catalog"
            where["hot"] += 1
    assert set(entries) <= {str(hot / rel) for rel in originals}
    assert not temporaries(root), temporaries(root)
    assert not any(migrate.backlog(ctx).values())
    return where


@pytest.mark.slow
@pytest.mark.parametrize("chunk_files", [None, 8], ids=["one-chunk", "three-chunks-settled-while-the-next-copies"])
def test_a_move_killed_at_any_step_and_replayed_leaves_every_file_exactly_once(tmp_path: Path, state: Path,
                                                                             chunk_files: int | None) -> None:
    def setup(name: str) -> tuple[Path, str, FleetContext, dict[str, bytes], frozenset[str]]:
        root = tmp_path / name
        root.mkdir()
        fleet = make_fleet(root, hot={"capacity_gb": 1})  # only age moves: every file is old
        originals = {f"d{j % 3}/f{j:02d}.bin": put(root / "hot" / f"d{j % 3}/f{j:02d}.bin", 400_000, 10, seed=j)
                     for j in range(24)}
        # some already synced to the warm tier (a sync job's copy): checked and committed, not sent again
        synced = frozenset(f"d{j % 3}/f{j:02d}.bin" for j in range(0, 24, 5))
        for rel in synced:
            put(root / "warm" / "pi-1" / rel, 400_000, 10, seed=int(rel[-6:-4]))
        return root, fleet, FleetContext.load(fleet, "local"), originals, synced

    # the kills at a time fall within the moving as this machine runs it (a loaded CI machine is slower)
    _, fleet, ctx, _, _ = setup("timed")
    seen, moving = run_and_kill(fleet, migrate.journal_path(ctx, "pi-1", "nas-1"), None, None, chunk_files)
    assert seen is None and moving > 0
    points: list[tuple[str | None, float | None]] = [(step, None) for step in STEPS] * 2
    shares = random.Random(17).sample([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], 6)
    points += [(None, moving * share) for share in shares]
    observed: list[str | None] = []
    runs = 0
    for step, delay in points:
        for attempt in range(3):  # a pass quicker than the calibrating one is tried again with an earlier kill
            root, fleet, ctx, originals, synced = setup(f"run{runs}")
            runs += 1
            journal = migrate.journal_path(ctx, "pi-1", "nas-1")
            seen, _ = run_and_kill(fleet, journal, step, None if delay is None else delay / 2 ** attempt,
                                   chunk_files)
            left = journal.exists()
            replayed = migrate.replay(ctx, "pi-1", "nas-1")
            assert (replayed is not None) == left and not journal.exists()
            counts = exactly_once(ctx, root, originals, synced)
            one_pass(ctx)  # a final pass moves what the killed one left
            assert exactly_once(ctx, root, originals) == {"hot": 0, "warm": 24}, counts
            if seen is not None or delay is None:
                break
        observed.append(seen)
    print("kills at:", observed)
    killed = [s for s in observed if s is not None]
    assert len(killed) >= len(points) - 2, observed  # (a kill may miss a pass that was quicker than a step)
    assert len(set(killed)) >= 4, f"the kills fell on too few steps: {observed}"


# --- the catalog, recall, two boundaries ---------------------------------------------------------------------------


def _entries(ctx: FleetContext) -> list[tuple[Any, ...]]:
    rows = [*migrate.ls(ctx, "pi-1"), *migrate.ls(ctx, "nas-1")]
    return sorted((r["origin_host"], r["origin_path"], r["tier"], r["host"], r["path"], r["size"], r["hash"])
                  for r in rows)


def test_the_catalog_lost_is_rebuilt_from_the_tiers_with_every_entry(tmp_path: Path, state: Path) -> None:
    fleet = make_fleet(tmp_path, hot={"capacity_gb": 1})
    ctx = FleetContext.load(fleet, "local")
    hot = tmp_path / "hot"
    for i in range(30):
        put(hot / f"cam/{i:02d}.jpg", 20_000 + i, 120 if i < 10 else 10)  # ten old enough for cold too
    put(hot / "cam/today.jpg", 1000, 0)
    one_pass(ctx, TierName.hot)
    one_pass(ctx, TierName.warm)
    before = _entries(ctx)
    assert len(before) == 30
    assert sum(1 for e in before if e[2] == "cold") == 10
    assert {e[0] for e in before} == {"pi-1"}  # cold entries still name the Pi and its path
    (_, catalog) = migrate.catalog_place(ctx.fleet)
    for suffix in ("", "-wal", "-shm"):
        Path(catalog + suffix).unlink(missing_ok=True)
    assert _entries(ctx) == []
    assert migrate.rebuild(ctx) == 30
    assert _entries(ctx) == before


def test_recall_brings_a_moved_file_back_equal(tiers: tuple[FleetContext, Path]) -> None:
    ctx, root = tiers
    hot = root / "hot"
    content = put(hot / "frames/0001.raw", 300_000, 20)
    one_pass(ctx)
    assert not (hot / "frames/0001.raw").exists()
    [row] = migrate.where(ctx, str(hot / "frames/0001.raw"))
    result = migrate.recall(ctx, str(hot / "frames/0001.raw"))
    assert result.moved == 1
    assert (hot / "frames/0001.raw").read_bytes() == content
    assert not Path(row["path"]).exists()
    assert migrate.where(ctx, str(hot / "frames/0001.raw")) == []
    assert not temporaries(root)
    assert not list((root / "warm").rglob(Path(tierside.LEDGER).name)), "a recall wrote a tier ledger"


def test_a_file_changed_while_it_moved_stays_and_its_copy_goes(tiers: tuple[FleetContext, Path]) -> None:
    ctx, root = tiers
    hot = root / "hot"
    put(hot / "a.bin", 10_000, 20)
    plan, algorithm = migrate.plan_pass(ctx, TierName.hot)
    [batch] = list(migrate.batches(ctx, plan, algorithm))
    migrate._copy(ctx, batch)
    migrate._check(ctx, batch, batch.at("copied"), replaying=False)
    journal = migrate.journal_path(ctx, batch.source_host, batch.dest_host)
    migrate.save(journal, batch)
    with open(hot / "a.bin", "ab") as more:  # a writer appends after the copy was verified
        more.write(b"later")
    migrate.finish(ctx, batch, journal)
    assert (hot / "a.bin").read_bytes().endswith(b"later")
    assert not (root / "warm" / "pi-1" / "a.bin").exists()
    assert migrate.where(ctx, str(hot / "a.bin")) == []
    assert batch.entries[0].note.startswith("changed while it moved")


# --- the flow and the CLI ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.slow
def test_the_tier_flow_moves_reports_and_publishes_metrics_and_the_cli_answers(
        prefect: None, tiers: tuple[FleetContext, Path], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prometheus_client.parser import text_string_to_metric_families

    from flows.tiers import tier
    from primespark.cli.app import main

    def spark(*args: str) -> None:
        monkeypatch.setattr(sys, "argv", ["spark", *args, "--env", fleet, "--transport", "local"])
        with pytest.raises(SystemExit) as done:
            main()
        assert done.value.code in (0, None), capsys.readouterr().err

    ctx, root = tiers
    hot = root / "hot"
    contents = {i: put(hot / f"r/{i}.bin", 100_000, 9 + i) for i in range(5)}
    put(hot / "config/keep.conf", 1000, 50)
    fleet = str(root / "fleet.yaml")
    textfile = root / "prom"
    result = tier("hot", fleet, "local", textfile=str(textfile), retries=0, retry_delay_seconds=0.1)
    [moved] = result["results"]
    assert (moved["moved"], moved["bytes"]) == (5, 500_000)
    assert moved["example"] in {f"pi-1:{hot}/r/{i}.bin" for i in range(5)}
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["tier-hot-warm"])))
    report = str(sorted(found, key=lambda a: a.created)[-1].data)
    assert "| pi-1 | nas-1 | 5 | 488.3 KiB |" in report, report
    assert "pinned: matches 'config/**'" in report
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families((textfile / "primespark_tier_hot-warm_pi-1.prom")
                                                             .read_text()) for s in family.samples}
    assert samples[("primespark_tier_moved_files", (("boundary", "hot-warm"), ("source", "pi-1")))] == 5
    assert samples[("primespark_tier_success", (("boundary", "hot-warm"), ("source", "pi-1")))] == 1
    assert samples[("primespark_tier_used_bytes", (("host", "pi-1"), ("tier", "hot")))] == 1000
    assert samples[("primespark_tier_journal_backlog_files", (("boundary", "hot-warm"), ("source", "pi-1")))] == 0
    # the CLI: where, ls, rebuild after the catalog is lost, recall
    capsys.readouterr()
    spark("tier", "where", str(hot / "r/3.bin"), "--json")
    spark("tier", "ls", f"pi-1:{hot}/r", "--json")
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[0])[0]["path"] == str(root / "warm" / "pi-1" / "r/3.bin")
    assert len(json.loads(out[1])) == 5
    before = _entries(ctx)
    Path(migrate.catalog_place(ctx.fleet)[1]).unlink()
    spark("tier", "rebuild")
    assert _entries(ctx) == before
    spark("tier", "recall", str(hot / "r/2.bin"))
    assert (hot / "r/2.bin").read_bytes() == contents[2]
    # a pass from the command line shows where a file it moved went
    put(hot / "r/old.bin", 100_000, 30)
    capsys.readouterr()
    spark("tier", "run")
    shown = "".join(capsys.readouterr().out.split())  # the table's title, wrapped at the console's width
    assert f"whereonemovedfileisnow(sparktierwherepi-1:{hot}/r/old.bin" in shown, shown
    # and a pass that moves nothing (a scheduled one came first) shows the last file an earlier pass moved
    spark("tier", "run")
    shown = "".join(capsys.readouterr().out.split())
    assert f"nothingmovedinthispass;thelastfileanearlieronemoved(sparktierwherepi-1:{hot}/r/old.bin" in shown, shown
    # a host that is not the tier's: told before any flow run starts
    monkeypatch.setattr(sys, "argv", ["spark", "tier", "run", "--host", "nas-1", "--env", fleet, "--transport",
                                      "local"])
    with pytest.raises(SystemExit) as refused:
        main()
    told = capsys.readouterr()
    assert refused.value.code not in (0, None) and "nas-1 is not a host of the hot tier" in told.err, told
    assert "Flow run" not in told.out + told.err


def test_the_backups_read_the_ledger_the_tier_pass_writes() -> None:
    from primespark.backup import hostside

    assert hostside.TIER_LEDGER == tierside.LEDGER  # two standalone host scripts, one file between them


def test_a_pass_over_ssh_with_no_sync_job_there_pushes_through_the_lower_tiers_own_account(
        tmp_path: Path, state: Path) -> None:
    """Tier passes need no sync job: warm → cold goes through the cold tier's write-only account, confined to
    the warm host's folder there; a sync job that writes into that folder is the route instead."""
    from primespark.mesh.service import plan_and_save

    staging = f"{tmp_path}/cold/nas-1/{migrate.STAGING}"
    fleet = make_fleet(tmp_path)
    ctx = FleetContext.load(fleet, "ssh")
    overlay = plan_and_save(ctx.fleet, "fleet", ctx.state_dir, ctx.secrets).plan.state().address_of("ops-1")
    route, destination = migrate.route_to(ctx, "nas-1", "ops-1", staging)
    assert route.target == f"sync-tier-move-cold@{overlay}"  # across sites: over the mesh
    assert destination == f"/{migrate.STAGING}"
    data = yaml.safe_load(Path(fleet).read_text())
    data["sync"] = {"jobs": {"warm-to-cold": {"source": f"nas-1:{tmp_path}/warm",
                                              "destination": f"ops-1:{tmp_path}/cold/nas-1"}}}
    Path(fleet).write_text(yaml.safe_dump(data))
    ctx = FleetContext.load(fleet, "ssh")
    route, destination = migrate.route_to(ctx, "nas-1", "ops-1", staging)
    assert route.target == f"sync-warm-to-cold@{overlay}"
    assert destination == f"/{migrate.STAGING}"
    assert "ControlPath=/etc/primespark/sync/cm-%C" in route.rsh, "the pass's sessions to the account share one"


def test_a_recall_over_ssh_goes_through_the_recall_account_only_where_the_tier_allows_it(
        tmp_path: Path, state: Path) -> None:
    """The staged copy of a recall lands in the hot tier's recall folder: with `recall: true` the warm host pushes
    there through the tier's write-only account; without it, the refusal says how to allow it. Sync jobs of the
    hot tier never carry that folder."""
    from primespark.data.sync import held_back, links

    folder = f"{tmp_path}/hot/.spark-tier-recall/{migrate.STAGING}"
    ctx = FleetContext.load(make_fleet(tmp_path, hot={"recall": True}), "ssh")
    route, destination = migrate.route_to(ctx, "nas-1", "pi-1", folder)
    assert destination == f"/{migrate.STAGING}"
    assert route.target.startswith("sync-tier-recall-hot@")
    assert links(ctx.fleet) == [link for link in links(ctx.fleet) if not link.job.startswith("tier-recall")]

    ctx = FleetContext.load(make_fleet(tmp_path), "ssh")
    with pytest.raises(UserError, match="set `recall: true` on tier hot"):
        migrate.route_to(ctx, "nas-1", "pi-1", folder)
    for link in links(ctx.fleet):
        if link.source_path.startswith(f"{tmp_path}/hot"):
            assert "/.spark-tier-recall/" in held_back(ctx.fleet, link)


def test_no_sync_job_sends_a_tier_pass_staging_folder(tmp_path: Path, state: Path) -> None:
    """A mirror of the warm tier (the lab's warm-to-cloud) leaves the copies a tier pass is staging where they are:
    sent once placed, never sent and then deleted as a batch (more than its max_delete); its watcher ignores them."""
    from primespark.data import sync, watchside

    path = Path(make_fleet(tmp_path))
    data = yaml.safe_load(path.read_text())
    data["sync"] = {"jobs": {"to-cloud": {"source": f"nas-1:{tmp_path}/warm", "mode": "mirror", "max_delete": 3,
                                          "destination": f"ops-1:{tmp_path}/cloud"}}}
    path.write_text(yaml.safe_dump(data))
    ctx = FleetContext.load(str(path), "local")
    [link] = sync.links_of(ctx.fleet, "to-cloud")
    warm = tmp_path / "warm" / "pi-1"
    staged = put(warm / migrate.STAGING / "d" / "f.bin", 1000, 30)
    placed = put(warm / "d" / "g.bin", 1000, 30)
    transfer.run(ctx.hosts.runner(link.source), sync.plan_for(ctx, link), timeout=60)
    cloud = tmp_path / "cloud" / "pi-1"
    assert (cloud / "d" / "g.bin").read_bytes() == placed
    assert not (cloud / migrate.STAGING).exists(), "a staged, unverified copy was sent"
    assert (warm / migrate.STAGING / "d" / "f.bin").read_bytes() == staged
    assert watchside.IGNORED_NAME.match(migrate.STAGING)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder another owner needs root (the tier pass runs as root)")
def test_folders_the_place_step_makes_belong_to_the_account_that_wrote_the_copy(tmp_path: Path) -> None:
    account = 65534  # nobody: the sync account a tier pass copies through
    staging = tmp_path / "warm" / "pi-1" / migrate.STAGING / "media" / "2026" / "cam.jpg"
    staging.parent.mkdir(parents=True)
    staging.write_bytes(b"jpeg")
    for made_by_rsync in (staging, staging.parent, staging.parent.parent):
        os.chown(made_by_rsync, account, account)
    final = tmp_path / "warm" / "pi-1" / "media" / "2026" / "cam.jpg"

    done = tierside.place({"entries": [{"staging": str(staging), "final": str(final)}]})

    assert done == {"entries": ["placed"]} and final.read_bytes() == b"jpeg"
    assert [(p.stat().st_uid, p.stat().st_gid) for p in (final.parent, final.parent.parent)] == [(account, account)] * 2
    assert (tmp_path / "warm" / "pi-1").stat().st_uid == 0, "a folder that was there changed owner"


def test_a_staged_folder_of_only_the_batchs_copies_is_placed_whole(tmp_path: Path) -> None:
    """One rename for a folder whose final place is new; file by file where the folder holds anything else or its
    final folder is there already. Each copy gets the source's access time either way."""
    staging, warm = tmp_path / "warm" / "pi-1" / migrate.STAGING, tmp_path / "warm" / "pi-1"
    entries = []
    for folder in ("new", "mixed", "there"):
        (staging / folder).mkdir(parents=True)
        for name in ("a.dat", "b.dat"):
            (staging / folder / name).write_bytes(name.encode())
            entries.append({"staging": str(staging / folder / name), "final": str(warm / folder / name),
                            "atime_ns": 1_000_000_000, "mtime_ns": 2_000_000_000})
    (staging / "mixed" / ".c.dat.Ab12Cd").write_bytes(b"a temporary a killed copy left")
    (warm / "there").mkdir()
    (warm / "there" / "kept.dat").write_bytes(b"a sync job's")
    new_folder = (staging / "new").stat().st_ino

    done = tierside.place({"entries": entries})

    assert done == {"entries": ["placed"] * 6}
    assert (warm / "new").stat().st_ino == new_folder, "not renamed whole"
    assert not (staging / "new").exists()
    assert [p.name for p in (staging / "mixed").iterdir()] == [".c.dat.Ab12Cd"]
    assert sorted(p.name for p in (warm / "there").iterdir()) == ["a.dat", "b.dat", "kept.dat"]
    for folder in ("new", "mixed", "there"):
        for name in ("a.dat", "b.dat"):
            copy = (warm / folder / name).stat()
            assert (warm / folder / name).read_bytes() == name.encode()
            assert (copy.st_atime_ns, copy.st_mtime_ns) == (1_000_000_000, 2_000_000_000)
    again = tierside.place({"entries": entries})  # a replay: every copy is in place already
    assert again == {"entries": ["placed"] * 6}


def test_a_large_check_hashes_half_of_the_copies_in_a_second_process(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows are the same, in the same order, as one process gives; a failure of the child is a failure."""
    staging = tmp_path / "warm" / "pi-1" / migrate.STAGING
    staging.mkdir(parents=True)
    entries = []
    for i in range(8):
        content = f"copy {i}".encode()
        if i % 4 != 3:  # every fourth copy is missing
            (staging / f"f{i}").write_bytes(content if i % 4 != 2 else content + b"!")  # every third: wrong size
        entries.append({"staging": str(staging / f"f{i}"), "final": str(tmp_path / "warm" / "pi-1" / f"f{i}"),
                        "size": len(content)})
    spec = {"algorithm": "sha256", "staging_root": str(staging), "entries": entries}
    one_process = tierside.check(spec)
    monkeypatch.setattr(tierside, "PARALLEL_CHECK_BYTES", 4)
    forked: list[int] = []
    real_fork = os.fork
    monkeypatch.setattr(os, "fork", lambda: forked.append(1) or real_fork())

    assert tierside.check(spec) == one_process
    assert forked == [1]
    assert [found is not None and found.startswith("sha256:") for found in one_process["staging"]] \
        == [True, True, False, False] * 2
    assert one_process["staging"][2] == f"size:{len(b'copy 2!')}" and one_process["final"] == [None] * 8
    with pytest.raises(RuntimeError, match="second hashing process failed"):
        tierside.check({**spec, "entries": [*entries[:7], {k: entries[7][k] for k in ("staging", "size")}]})  # no final


@pytest.mark.parametrize("size", [0, 1, 5000, tierside.CHUNK - 1, tierside.CHUNK, tierside.CHUNK + 1,
                                  3 * tierside.CHUNK + 5])
def test_a_file_of_any_size_hashes_as_the_hash_of_its_whole_content(tmp_path: Path, size: int) -> None:
    # a small file is read in one read of its size, a large one through one buffer: both must see every byte once
    content = random.Random(size).randbytes(size)
    path = tmp_path / "f.bin"
    path.write_bytes(content)
    found = tierside.hash_file(str(path), "xxh3_128")
    assert found == (f"xxh3_128:{xxhash.xxh3_128(content).hexdigest()}", size, path.stat().st_mtime_ns)
    assert tierside.hash_file(str(path), "sha256", size) is not None
    assert tierside.hash_file(str(path), "sha256", size + 1) == (f"size:{size}", size, path.stat().st_mtime_ns)


def test_no_hash_for_what_is_not_a_file_and_a_fifo_does_not_hold_the_check(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")  # no writer: a blocking open would wait for ever
    (tmp_path / "folder").mkdir()
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.extend(
        tierside.hash_file(str(tmp_path / name), "sha256", 0) for name in ("fifo", "folder", "absent")), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "hashing a FIFO blocked"
    assert result == [None, None, None]


def test_a_check_is_cut_where_half_of_its_work_is_and_a_small_one_is_not_cut() -> None:
    """Work by bytes and files: a few large copies are hashed in two processes like many small ones."""
    mib = 1024**2
    assert tierside._halfway([{"size": 64 * mib}] * 4) == 2
    assert tierside._halfway([{"size": 1024 * mib}, *[{"size": 4096}] * 1000, {"size": 900 * mib}]) == 1
    assert tierside._halfway([{"size": 4096}] * 2000) == 1000
    assert tierside._halfway([{"size": 4096}] * 100) == 100  # 6.8 MB of work: one process
    assert tierside._halfway([{"size": 512 * mib}]) == 1


def test_a_chunk_is_settled_while_the_next_one_copies_and_every_file_moves_once(
        tmp_path: Path, state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three folders of eight files, in chunks of eight: the first chunk's copies are placed while rsync copies the
    second; a folder a later chunk writes below (`a` above `a/z`) is never renamed whole meanwhile."""
    root = tmp_path
    ctx = FleetContext.load(make_fleet(root, hot={"capacity_gb": 1}), "local")
    originals = {f"{folder}/f{j}.bin": put(root / "hot" / folder / f"f{j}.bin", 20_000, 10, seed=j)
                 for folder in ("a", "a/z", "c") for j in range(8)}
    monkeypatch.setattr(migrate, "CHUNK_FILES", 8)
    copying, placed = threading.Event(), threading.Event()
    place_during_copy: list[bool] = []
    keeps: list[list[str]] = []
    real_side, real_run = migrate.side, transfer.run

    def side(runner: Any, op: str, spec: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        if op == "check" and "place" in spec and not keeps:  # the first chunk's: once the second chunk's copy began
            place_during_copy.append(copying.wait(timeout=30))
            keeps.append(spec["place"]["keep"])
            done = real_side(runner, op, spec, timeout)
            placed.set()
            return done
        return real_side(runner, op, spec, timeout)

    def run(runner: Any, plan: transfer.TransferPlan, **kwargs: Any) -> transfer.TransferReport:
        if plan.files and plan.files[0].startswith("a/z"):  # the second chunk's copy: held until that place
            copying.set()
            placed.wait(timeout=30)
        return real_run(runner, plan, **kwargs)

    monkeypatch.setattr(migrate, "side", side)
    monkeypatch.setattr(migrate.transfer, "run", run)
    [result] = one_pass(ctx)

    assert result.moved == 24
    assert place_during_copy == [True], "the first chunk was not placed while the second one was being copied"
    staging = f"{root}/warm/pi-1/{migrate.STAGING}"
    assert keeps[0] == [f"{staging}/a", f"{staging}/a/z", f"{staging}/c"]  # while a/z and c are still to be copied
    assert exactly_once(ctx, root, originals) == {"hot": 0, "warm": 24}


def test_copies_run_ahead_of_a_slow_settling_as_far_as_the_bound_and_a_failed_settling_stops_them(
        tmp_path: Path, state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Five folders of eight files, in chunks of eight, at most two chunks copied and not settled: while the first
    chunk's check is held, the second and third chunks are copied and the fourth is not; then the second chunk's
    place fails: no chunk after the fourth is copied, the chunks copied meanwhile stay copied, and the replay
    leaves every file exactly once."""
    root = tmp_path
    ctx = FleetContext.load(make_fleet(root, hot={"capacity_gb": 1}), "local")
    originals = {f"d{i}/f{j}.bin": put(root / "hot" / f"d{i}/f{j}.bin", 20_000, 10, seed=8 * i + j)
                 for i in range(5) for j in range(8)}
    monkeypatch.setattr(migrate, "CHUNK_FILES", 8)
    monkeypatch.setattr(migrate, "UNSETTLED_CHUNKS", 2)
    copied: list[str] = []  # the folder of each chunk whose copy started, in order
    third_copying = threading.Event()
    copied_while_held: list[list[str]] = []
    checks = places = 0
    real_side, real_run = migrate.side, transfer.run

    def side(runner: Any, op: str, spec: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        nonlocal checks, places
        if op == "check" and copied:  # a chunk's check after its copy (the first check is for copies already there)
            checks += 1
            if checks == 1:  # the first chunk's: held until the third chunk's copy began
                third_copying.wait(timeout=30)
                copied_while_held.append(list(copied))
        if op == "check" and "place" in spec:  # a chunk's check, which places what it verified
            places += 1
            if places == 2:
                raise migrate.TierStepFailed("the second chunk's place failed (a test)")
        return real_side(runner, op, spec, timeout)

    def run(runner: Any, plan: transfer.TransferPlan, **kwargs: Any) -> transfer.TransferReport:
        copied.append(plan.files[0].split("/")[0] if plan.files else "")
        if len(copied) == 3:
            third_copying.set()
        return real_run(runner, plan, **kwargs)

    monkeypatch.setattr(migrate, "side", side)
    monkeypatch.setattr(migrate.transfer, "run", run)
    with pytest.raises(migrate.TierStepFailed, match="second chunk's place failed"):
        one_pass(ctx)

    assert copied_while_held == [["d0", "d1", "d2"]], "the copies waited for the first chunk's settling"
    assert copied == ["d0", "d1", "d2", "d3"]  # the fourth after the first chunk settled; none after the failure
    batch = migrate.load(migrate.journal_path(ctx, "pi-1", "nas-1"))
    assert batch is not None
    steps = {folder: {e.step for e in batch.entries if e.rel.startswith(folder + "/")}
             for folder in ("d0", "d1", "d2", "d3", "d4")}
    assert steps == {"d0": {"done"}, "d1": {"copied"}, "d2": {"copied"}, "d3": {"copied"}, "d4": {"planned"}}
    monkeypatch.setattr(migrate, "side", real_side)
    assert migrate.replay(ctx, "pi-1", "nas-1") is not None
    one_pass(ctx)
    assert exactly_once(ctx, root, originals) == {"hot": 0, "warm": 40}


def test_no_copy_is_looked_for_where_the_next_tier_has_no_folder_for_the_host_and_one_is_where_it_has(
        tmp_path: Path, state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before copying, a pass asks the destination which planned files it holds already (a sync job's copies); with
    no folder for the host there, nothing can be, and the question is not asked of every file."""
    root = tmp_path
    ctx = FleetContext.load(make_fleet(root, hot={"capacity_gb": 1}), "local")
    for j in range(4):
        put(root / "hot" / "d" / f"f{j}.bin", 20_000, 10, seed=j)
    asked: list[str] = []  # the steps before the first copy
    real_side, real_run = migrate.side, transfer.run
    copying: list[bool] = []

    def side(runner: Any, op: str, spec: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        if not copying:
            asked.append(op)
        return real_side(runner, op, spec, timeout)

    def run(runner: Any, plan: transfer.TransferPlan, **kwargs: Any) -> transfer.TransferReport:
        copying.append(True)
        return real_run(runner, plan, **kwargs)

    monkeypatch.setattr(migrate, "side", side)
    monkeypatch.setattr(migrate.transfer, "run", run)
    assert not (root / "warm" / "pi-1").exists()
    [result] = one_pass(ctx)
    assert result.moved == 4 and asked == ["scan", "scan"]
    for j in range(4, 8):
        put(root / "hot" / "d" / f"f{j}.bin", 20_000, 10, seed=j)
    asked.clear()
    copying.clear()
    [result] = one_pass(ctx)
    assert result.moved == 4 and asked == ["scan", "scan", "check"]  # warm/pi-1 is there now


def test_copies_placed_by_a_check_whose_answer_was_lost_are_found_placed_by_the_replay(
        tmp_path: Path, state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk's check verifies and places its copies on the destination; the pass stops before it hears so (the
    journal still says copied). The replay finds each under its final name with the source's hash: placed, then
    committed and its source deleted, counted as moved (not as a copy that was there already), every file once."""
    root = tmp_path
    ctx = FleetContext.load(make_fleet(root, hot={"capacity_gb": 1}), "local")
    originals = {f"d{i}/f{j}.bin": put(root / "hot" / f"d{i}/f{j}.bin", 20_000, 10, seed=8 * i + j)
                 for i in range(2) for j in range(8)}
    monkeypatch.setattr(migrate, "CHUNK_FILES", 8)
    real_side = migrate.side

    def side(runner: Any, op: str, spec: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        done = real_side(runner, op, spec, timeout)
        if op == "check" and "place" in spec:
            raise migrate.TierStepFailed("the pass stopped here (a test)")
        return done

    monkeypatch.setattr(migrate, "side", side)
    with pytest.raises(migrate.TierStepFailed, match="stopped here"):
        one_pass(ctx)
    batch = migrate.load(migrate.journal_path(ctx, "pi-1", "nas-1"))
    assert batch is not None
    first = [e for e in batch.entries if e.rel.startswith("d0/")]
    assert {e.step for e in first} == {"copied"}
    assert all((root / "warm" / "pi-1" / e.rel).is_file() for e in first)  # placed, though the journal says copied
    monkeypatch.setattr(migrate, "side", real_side)
    replayed = migrate.replay(ctx, "pi-1", "nas-1")
    assert replayed is not None and replayed.moved == 16 and replayed.already_there == 0  # d1 had been copied too
    one_pass(ctx)
    assert exactly_once(ctx, root, originals) == {"hot": 0, "warm": 16}


def test_a_pass_stopped_before_its_batch_is_written_leaves_every_source_and_its_replay_empties_the_staging(
        tmp_path: Path, state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal names the batch (its header) before anything is copied; the entries are written while the first
    chunk copies. The pass stops on that write (a full disk, a kill): the copy had staged files, the journal holds
    the header only, every source is where it was; the replay removes the staged copies, and the next pass moves
    every file once."""
    root = tmp_path
    ctx = FleetContext.load(make_fleet(root, hot={"capacity_gb": 1}), "local")
    originals = {f"d{i}/f{j}.bin": put(root / "hot" / f"d{i}/f{j}.bin", 20_000, 10, seed=8 * i + j)
                 for i in range(2) for j in range(8)}
    real_write = migrate._write_whole

    def write_whole(path: Path, batch: migrate.Batch) -> None:
        if batch.entries:
            raise OSError(28, "No space left on device (a test)")
        real_write(path, batch)

    monkeypatch.setattr(migrate, "_write_whole", write_whole)
    with pytest.raises(OSError, match="No space left"):
        one_pass(ctx)
    journal = migrate.journal_path(ctx, "pi-1", "nas-1")
    header = migrate.load(journal)
    assert header is not None and header.entries == [] and header.dest_root == str(root / "warm" / "pi-1")
    assert temporaries(root / "warm"), "the first chunk's copy ran beside the journal's write"
    assert all((root / "hot" / rel).is_file() for rel in originals)
    monkeypatch.setattr(migrate, "_write_whole", real_write)
    replayed = migrate.replay(ctx, "pi-1", "nas-1")
    assert replayed is not None and replayed.moved == 0
    assert temporaries(root / "warm") == [] and not journal.exists()
    one_pass(ctx)
    assert exactly_once(ctx, root, originals) == {"hot": 0, "warm": 16}


def test_rsync_is_given_a_folder_whole_only_when_all_it_held_moves_and_a_file_new_since_the_scan_stays(
        tiers: tuple[FleetContext, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    ctx, root = tiers
    hot = root / "hot"
    originals = {rel: put(hot / rel, 5_000, 20) for rel in (
        "cam/day1/a.bin", "cam/day1/b.bin",  # all old, no subfolder: named whole
        "cam/day2/a.bin",  # beside a fresh file that stays: file by file
        "cam/day3/a.bin", "cam/day3/sub/b.bin")}  # day3 has a subfolder: file by file; sub is whole
    originals["cam/day2/fresh.bin"] = put(hot / "cam/day2/fresh.bin", 5_000, 0)
    (hot / "cam/day1/link").symlink_to("a.bin")  # a name that is no regular file: day1 is not whole any more
    (hot / "cam/day4").mkdir()
    originals["cam/day4/a.bin"] = put(hot / "cam/day4/a.bin", 5_000, 20)
    names: list[tuple[str, ...]] = []
    real_run = transfer.run

    def run(runner: Any, plan: transfer.TransferPlan, **kwargs: Any) -> transfer.TransferReport:
        names.append(plan.files or ())
        (hot / "cam/day4/late.bin").write_bytes(b"written after the scan")  # in a folder named whole
        return real_run(runner, plan, **kwargs)

    monkeypatch.setattr(migrate.transfer, "run", run)
    [result] = one_pass(ctx)

    assert sorted(names[0]) == ["cam/day1/a.bin", "cam/day1/b.bin", "cam/day2/a.bin", "cam/day3/a.bin",
                                "cam/day3/sub", "cam/day4"]
    assert result.moved == 6
    assert (hot / "cam/day4/late.bin").read_bytes() == b"written after the scan"  # copied, never placed: it stays
    assert not (root / "warm" / "pi-1" / "cam/day4/late.bin").exists()
    assert (hot / "cam/day1/link").is_symlink()
    assert exactly_once(ctx, root, originals) == {"hot": 1, "warm": 6}


def test_a_long_move_says_how_far_it_is(tmp_path: Path, state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three chunks of eight files: a line after each chunk settles, counting on to the whole batch, and while each
    chunk copies, the files and bytes sent so far (every line here: PROGRESS_SECONDS is 0)."""
    root = tmp_path
    ctx = FleetContext.load(make_fleet(root, hot={"capacity_gb": 1}), "local")
    for j in range(24):
        put(root / "hot" / f"d{j % 3}/f{j:02d}.bin", 20_000, 10, seed=j)
    monkeypatch.setattr(migrate, "CHUNK_FILES", 8)
    monkeypatch.setattr(transfer, "PROGRESS_SECONDS", 0)
    plan, algorithm = migrate.plan_pass(ctx, TierName.hot)
    [batch] = list(migrate.batches(ctx, plan, algorithm))
    lines: list[str] = []
    heard_in = contextvars.ContextVar("heard_in", default="a thread of its own")
    heard_in.set("the caller's context")  # a flow run's: its Prefect settings and run are contextvars too
    contexts: set[str] = set()

    def hear(line: str) -> None:
        lines.append(line)
        contexts.add(heard_in.get())

    result = migrate.move_batch(ctx, batch, hear)

    assert result.moved == 24
    assert contexts == {"the caller's context"}  # the lines of chunks settled in the second thread too
    moved = [re.fullmatch(r"pi-1 → nas-1: (\d+) of 24 files moved \((.+) of 468\.8 KiB\) in \d+ s", line)
             for line in lines if "moved" in line]
    assert [(m.group(1), m.group(2)) for m in moved if m] == [("8", "156.2 KiB"), ("16", "312.5 KiB"),
                                                              ("24", "468.8 KiB")], lines
    copying = [re.fullmatch(r"pi-1 → nas-1: copying chunk (\d) of 3: (\d+) files, .+ sent in \d+ s \(.+/s\)", line)
               for line in lines if "copying" in line]
    assert all(copying), lines
    counts = [(int(m.group(1)), int(m.group(2))) for m in copying if m]
    assert counts == sorted(counts), lines  # chunk by chunk, each one counting up
    assert [max(n for chunk, n in counts if chunk == k) for k in (1, 2, 3)] == [8, 8, 8], lines


def test_a_pass_runs_with_the_cycle_collector_paused_and_leaves_it_as_it_found_it(
        tiers: tuple[FleetContext, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Paused while it plans and moves; a cycle made beside a chunk (as a flow's client makes them) is freed once
    that chunk is settled, not at the pass's end."""
    ctx, root = tiers
    put(root / "hot" / "old.bin", 1000, 30)
    during: list[bool] = []
    for name in ("plan_boundary", "move_batch"):
        real = getattr(migrate, name)
        monkeypatch.setattr(migrate, name, lambda *a, real=real, **k: during.append(gc.isenabled()) or real(*a, **k))

    class Node:
        pass

    cycles: list[weakref.ref[Node]] = []
    real_delete = migrate._delete

    def delete(*args: Any, **kwargs: Any) -> list[migrate.Entry]:
        node = Node()
        node.self = node  # type: ignore[attr-defined]  # a cycle: only the collector frees it
        cycles.append(weakref.ref(node))
        return real_delete(*args, **kwargs)

    monkeypatch.setattr(migrate, "_delete", delete)
    real_finish = migrate.finish
    alive_at_finish: list[bool] = []
    monkeypatch.setattr(migrate, "finish",
                        lambda *a: alive_at_finish.append(cycles[0]() is not None) or real_finish(*a))
    assert gc.isenabled()
    one_pass(ctx)
    assert during == [False, False] and gc.isenabled()
    assert alive_at_finish == [False]  # collected after its chunk, inside the pause
    assert (root / "warm" / "pi-1" / "old.bin").is_file()
    with migrate.collector_paused():  # nested, and one that fails inside another
        with contextlib.suppress(RuntimeError), migrate.collector_paused():
            raise RuntimeError("a failed step")
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()  # off before: stays off
    try:
        with migrate.collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_request_goes_as_columns_below_their_roots_and_the_host_makes_each_entry_whole_again() -> None:
    """One list per field; a path below its root without it; a field of one value sent once, one equal to a field
    before it by that field's name; the host makes each entry whole again (a recall's final path, not below the
    root, goes whole; one entry, no entry)."""
    entries = [{"staging": "/w/pi-1/.in/a/f", "final": "/w/pi-1/a/f", "size": 1, "host": "nas-1"},
               {"staging": "/w/pi-1/.in/b", "final": "/w/pi-1/b", "size": 2, "host": "nas-1"}]

    def sent_back(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        sent = migrate.as_columns({key: [row[key] for row in rows] for key in entries[0]},
                                  staging="/w/pi-1/.in", final="/w/pi-1")
        return sent, tierside.absolute(json.loads(json.dumps(sent)))

    sent, back = sent_back(entries)
    assert sent["roots"] == {"staging": "/w/pi-1/.in/", "final": "/w/pi-1/"}
    assert sent["columns"] == {"staging": ["a/f", "b"], "size": [1, 2]}
    assert sent["alias"] == {"final": "staging"} and sent["same"] == {"host": "nas-1"}
    assert back == entries
    recall = [entries[0], {**entries[1], "final": "/srv/hot/b"}]
    sent, back = sent_back(recall)
    assert "final" not in sent["roots"] and sent["columns"]["final"] == ["/w/pi-1/a/f", "/srv/hot/b"]
    assert back == recall
    assert sent_back(entries[:1])[1] == entries[:1] and sent_back([])[1] == []
