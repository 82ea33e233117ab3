"""Tier migration in the lab: a Pi's hot tier moved to the NAS's warm tier over the edge LAN, through the
hot-to-nas sync job's rrsync-confined account, with the journaled move; the catalog on the NAS. And the NAS's warm
tier to ops-1's cold tier over the mesh, through the cold tier's own account (no sync job goes there).

Each test writes a fleet variant (the lab fleet with a small hot tier on pi-2, so that a few tens of MB fill it
above its high watermark) and works below /srv/hot/tiertest on pi-2, with pi-2's data generator paused.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from primespark.context import FleetContext
from primespark.data import migrate
from primespark.fleet.model import TierName

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.lab
FAST = {"retries": 1, "retry_delay_seconds": 1.0}
PI = "pi-2"
HOT, WARM = "/srv/hot", f"/srv/warm/{PI}"
TEST_DIR = "tiertest"
CAPACITY_GB = 0.05  # 50 MB: high 70 % = 35 MB
HOLDER_PID = "/tmp/tiertest-holder.pid"


def variant(tmp_path: Path) -> str:
    data = yaml.safe_load((REPO / "inventory" / "lab.yaml").read_text())
    data["tiers"]["hot"].update({"capacity_gb": CAPACITY_GB, "low_watermark": 0.5, "high_watermark": 0.7,
                                 "max_age_days": 7, "min_age_minutes": 5,
                                 "pinned": [*data["tiers"]["hot"].get("pinned", []), f"{TEST_DIR}/config/**"]})
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


# Hashes a tree without touching the files' access times (O_NOATIME): the tier pass counts a read as a use, and
# the test's own reading must not make an old file look recently used.
SHA_TREE = """
import hashlib, json, os, sys
root, found = sys.argv[1], {}
for folder, dirs, names in os.walk(root):
    dirs[:] = [d for d in dirs if d != ".~tmp~"]
    for name in names:
        path = os.path.join(folder, name)
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
        with os.fdopen(fd, "rb") as handle:
            found[os.path.relpath(path, root)] = hashlib.file_digest(handle, "sha256").hexdigest()
print(json.dumps(found))
"""


def sha_tree(lab: Any, host: str, root: str) -> dict[str, str]:
    done = lab.exec(host, ["python3", "-c", SHA_TREE, root])
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def write(lab: Any, rel: str, size: int, age_days: float) -> None:
    path = f"{HOT}/{TEST_DIR}/{rel}"
    done = lab.exec(PI, f"mkdir -p $(dirname {path}) && head -c {size} /dev/urandom > {path} && "
                        f"touch -d '@{int(time.time() - age_days * 86400)}' {path}")
    assert done.returncode == 0, done.stderr


@pytest.fixture
def hot_tier(lab: Any, configured: Any, tmp_path: Path) -> Iterator[str]:
    """pi-2's generator paused and its hot tier emptied of earlier test data; the variant fleet."""
    lab.exec(PI, f"rm -rf {HOT}/{TEST_DIR}")
    lab.exec("nas-1", f"rm -rf {WARM}/{TEST_DIR}")
    try:
        with lab.generator_paused(PI):
            yield variant(tmp_path)
    finally:
        lab.exec(PI, f"kill $(cat {HOLDER_PID} 2>/dev/null) 2>/dev/null; rm -f {HOLDER_PID}; rm -rf {HOT}/{TEST_DIR}")
        lab.exec("nas-1", f"rm -rf {WARM}/{TEST_DIR}")


def hot_used(lab: Any) -> int:
    done = lab.exec(PI, f"find {HOT} -type f -not -path '*/.spark-tier*' -printf '%s\\n'")
    return sum(int(x) for x in done.stdout.split())


def test_a_full_hot_tier_drains_to_its_low_watermark_and_every_moved_file_is_equal_and_found(
        lab: Any, lab_flows: None, hot_tier: str) -> None:
    from flows.tiers import tier

    for i in range(12):
        write(lab, f"old/o{i:02d}.bin", 1_500_000, 10 + i)  # older than max_age_days
    for i in range(16):
        write(lab, f"recent/r{i:02d}.bin", 1_500_000, 1 + i / 10)
    write(lab, "config/site.conf", 1_000_000, 60)  # pinned by the variant's glob
    write(lab, "keep/raw.bin", 1_000_000, 60)
    lab.exec(PI, f"touch {HOT}/{TEST_DIR}/keep/.spark-pin")
    write(lab, "logs/open.bin", 1_000_000, 60)
    # a writer on the Pi holds the file open (its pid noted, so that the fixture ends it: killing `docker exec`
    # here would leave it running in the container)
    holder = subprocess.Popen(["docker", "exec", lab.container(PI), "sh", "-c",
                               f"echo $$ > {HOLDER_PID}; exec 3>>{HOT}/{TEST_DIR}/logs/open.bin; exec sleep 600"])
    capacity = int(CAPACITY_GB * 1000**3)
    assert hot_used(lab) > 0.7 * capacity
    before = sha_tree(lab, PI, f"{HOT}/{TEST_DIR}")
    try:
        deadline = time.monotonic() + 30  # the holder has the file open for writing from here on
        while lab.exec(PI, f"ls -l /proc/$(cat {HOLDER_PID} 2>/dev/null || echo 0)/fd 2>/dev/null | "
                           "grep -q open.bin").returncode != 0:
            assert time.monotonic() < deadline, "the holder never opened the file"
            time.sleep(0.2)
        fleet = hot_tier
        result = tier("hot", fleet, "ssh", hosts=[PI], **FAST)
    finally:
        lab.exec(PI, f"kill $(cat {HOLDER_PID}) 2>/dev/null")
        holder.wait(timeout=30)
    print(json.dumps(result["results"]), json.dumps(result["skipped"]))
    used = hot_used(lab)
    print(f"{PI} hot tier: {used} bytes of {capacity} after the pass")
    assert used <= 0.5 * capacity
    after_hot = sha_tree(lab, PI, f"{HOT}/{TEST_DIR}")
    after_warm = sha_tree(lab, "nas-1", f"{WARM}/{TEST_DIR}")
    for rel in ("config/site.conf", "keep/raw.bin", "logs/open.bin"):
        assert rel in after_hot and rel not in after_warm, f"{rel} moved"
    assert all(f"old/o{i:02d}.bin" in after_warm for i in range(12))
    ctx = FleetContext.load(fleet, "ssh")
    for rel, digest in before.items():
        if rel in after_warm:
            assert rel not in after_hot, f"{rel} is on both tiers"
            assert after_warm[rel] == digest, f"{rel} differs on the NAS"
            [row] = migrate.where(ctx, f"{PI}:{HOT}/{TEST_DIR}/{rel}")
            assert (row["host"], row["path"]) == ("nas-1", f"{WARM}/{TEST_DIR}/{rel}")
    print("moved:", len(after_warm), "stayed:", len(after_hot))


def test_recall_brings_a_moved_file_back_equal(lab: Any, lab_flows: None, hot_tier: str) -> None:
    from flows.tiers import tier, tier_recall

    write(lab, "old/back.bin", 500_000, 30)
    digest = sha_tree(lab, PI, f"{HOT}/{TEST_DIR}")["old/back.bin"]
    tier("hot", hot_tier, "ssh", hosts=[PI], **FAST)
    assert "old/back.bin" not in sha_tree(lab, PI, f"{HOT}/{TEST_DIR}")
    # over SSH: nas-1 pushes through the hot tier's recall account on the Pi (`recall: true` in the lab fleet)
    tier_recall(f"{PI}:{HOT}/{TEST_DIR}/old/back.bin", hot_tier, "ssh")
    assert sha_tree(lab, PI, f"{HOT}/{TEST_DIR}")["old/back.bin"] == digest
    staged = lab.exec(PI, f"find {HOT}/.spark-tier-recall -type f")
    assert staged.returncode == 0 and staged.stdout == "", f"left in the recall folder: {staged.stdout}{staged.stderr}"


def test_a_warm_to_cold_pass_over_ssh_moves_an_old_file_to_the_cloud_equal_and_found(
        lab: Any, lab_flows: None, hot_tier: str) -> None:
    """No sync job carries nas-1's warm tier to ops-1: the pass pushes through the cold tier's own write-only
    account there, across sites over the mesh."""
    from flows.tiers import tier

    old = f"{WARM}/{TEST_DIR}/cold/old.bin"  # older than the warm tier's 90 days
    done = lab.exec("nas-1", f"mkdir -p $(dirname {old}) && head -c 700000 /dev/urandom > {old} && "
                             f"touch -d '@{int(time.time() - 200 * 86400)}' {old}")
    assert done.returncode == 0, done.stderr
    digest = sha_tree(lab, "nas-1", f"{WARM}/{TEST_DIR}")["cold/old.bin"]
    cold = f"/srv/cold/nas-1/{PI}/{TEST_DIR}"
    try:
        tier("warm", hot_tier, "ssh", hosts=["nas-1"], **FAST)
        assert "cold/old.bin" not in sha_tree(lab, "nas-1", f"{WARM}/{TEST_DIR}")
        assert sha_tree(lab, "ops-1", cold)["cold/old.bin"] == digest
        rows = migrate.where(FleetContext.load(hot_tier, "ssh"), f"{PI}:{HOT}/{TEST_DIR}/cold/old.bin")
        assert [(r["tier"], r["host"], r["path"]) for r in rows] == [("cold", "ops-1", f"{cold}/cold/old.bin")]
        owner = lab.exec("ops-1", f"stat -c %U {cold}/cold/old.bin").stdout.strip()
        assert owner == "sync-tier-move-cold", owner  # written through the pass's own account
        staged = lab.exec("ops-1", f"find /srv/cold -path '*{migrate.STAGING}*' -type f")
        assert staged.stdout == "", f"left staged: {staged.stdout}"
    finally:
        lab.exec("ops-1", f"rm -rf {cold}")


MOVER = """
import sys
from primespark.context import FleetContext
from primespark.data import migrate
from primespark.fleet.model import TierName
ctx = FleetContext.load(sys.argv[1], "ssh")
plan, algorithm = migrate.plan_pass(ctx, TierName.hot, [sys.argv[2]])
migrate.run_plan(ctx, plan, algorithm)
"""


def _kill_tree(root: int) -> None:
    """The mover and the ssh clients it started, frozen then killed (the commands on the hosts die with their
    ssh sessions: a transfer's guard ends it, a host-side step may finish first; the next replay copes)."""
    seen: set[int] = set()
    while True:
        table = {}
        for name in filter(str.isdigit, os.listdir("/proc")):
            try:
                fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(name)] = (int(fields[1]), int(fields[3]))
        sessions = {table[p][1] for p in seen | {root} if p in table}
        new = {root, *(p for p, (parent, sid) in table.items() if parent in seen | {root} or sid in sessions)} - seen
        if not new:
            break
        for pid in new:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                continue
        seen |= new
    for pid in seen:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue


def test_twenty_passes_killed_at_random_then_replayed_leave_every_file_exactly_once(
        lab: Any, lab_flows: None, hot_tier: str) -> None:
    rng = random.Random(20)
    ctx = FleetContext.load(hot_tier, "ssh")
    for i in range(60):
        write(lab, f"kill/k{i:02d}.bin", rng.randint(100_000, 1_500_000), 10 + i % 5)
    originals = sha_tree(lab, PI, f"{HOT}/{TEST_DIR}")
    outcomes = []
    for attempt in range(20):
        for i in range(3):  # fresh old files for each pass to work on
            write(lab, f"kill/a{attempt:02d}-{i}.bin", rng.randint(100_000, 1_500_000), 10)
        originals.update({f"kill/{k}": v for k, v in sha_tree(lab, PI, f"{HOT}/{TEST_DIR}/kill").items()})
        mover = subprocess.Popen([sys.executable, "-c", MOVER, hot_tier, PI], start_new_session=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cut = attempt == 7  # once: the destination cut off mid-copy
        time.sleep(rng.uniform(0.2, 4.0))
        if cut:
            subprocess.run(["docker", "pause", lab.container("nas-1")], check=True)
            time.sleep(2)
        _kill_tree(mover.pid)
        mover.wait(timeout=60)
        if cut:
            subprocess.run(["docker", "unpause", lab.container("nas-1")], check=True)
        # the killed mover's rsync on the Pi ends with its SSH session (it would otherwise go on writing staged
        # copies on nas-1 after the next replay had removed them)
        mover_rsync = ["pgrep", "-f", f"rsync .*{migrate.STAGING}"]  # not the sync jobs'
        deadline = time.monotonic() + 20
        while lab.exec(PI, mover_rsync).returncode == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lab.exec(PI, mover_rsync).returncode == 1, f"the mover's rsync still runs on {PI} after its kill"
        outcomes.append(json.dumps(sorted({e.step for e in (migrate.load(
            migrate.journal_path(ctx, PI, "nas-1")) or migrate.Batch("", "", "", "", "")).entries})))
    migrate.replay(ctx, PI, "nas-1")
    plan, algorithm = migrate.plan_pass(ctx, TierName.hot, [PI])
    migrate.run_plan(ctx, plan, algorithm)
    hot_now = sha_tree(lab, PI, f"{HOT}/{TEST_DIR}")
    warm_now = sha_tree(lab, "nas-1", f"{WARM}/{TEST_DIR}")
    entries = {row["origin_path"] for row in migrate.ls(ctx, f"{PI}:{HOT}/{TEST_DIR}")}
    once = 0
    for rel, digest in originals.items():
        places = [where for where, tree in (("hot", hot_now), ("warm", warm_now)) if rel in tree]
        assert len(places) == 1, f"{rel} on {places}"
        assert (hot_now if places == ["hot"] else warm_now)[rel] == digest, f"{rel} differs"
        assert (f"{HOT}/{TEST_DIR}/{rel}" in entries) == (places == ["warm"])
        once += 1
    leftovers = lab.exec("nas-1", f"find {WARM} -path '*.spark-tier-incoming*' -o -path '*.~tmp~*'").stdout.split()
    assert not leftovers, leftovers
    print(f"journal steps at each kill: {outcomes}")
    print(f"{once} files, each exactly once (hot {sum(1 for r in originals if r in hot_now)}, warm "
          f"{sum(1 for r in originals if r in warm_now)}), {len(entries)} catalog entries, no temporaries")
