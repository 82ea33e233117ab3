"""Backup and restore of a generated 1 GiB mixed dataset: plain restic CLI beside our client and our flows.

Run: .venv/bin/python bench/backup.py [--size-mib 1024]. The dataset and repositories live under /tmp
and are removed at the end. Target: our overhead at most 10% over plain restic.

Rows:
- client: `ResticClient.backup` / `.restore(verify=True)`, the calls the flows make, vs `restic backup` /
  `restic restore --verify` typed by hand: the wrapper's own cost.
- flow: the whole `backup` flow (repository check, stale-lock scan, backup, sha256 manifest of every file,
  Prefect bookkeeping) and the whole `dr_drill` flow (restore --verify, sha256 of every restored file against
  the manifest, report, artifacts) vs the bare restic commands: what the extra guarantees cost.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PASSWORD = "bench password, not a secret"
ROUNDS = 2


def make_dataset(root: Path, size_mib: int) -> tuple[int, int]:
    """60% large random files, 30% medium (100 KiB), 10% small text files (1-16 KiB)."""
    rng = random.Random(7)
    total = size_mib * 1024 * 1024
    files = 0
    large = root / "models"
    large.mkdir(parents=True)
    budget = int(total * 0.6)
    while budget > 0:
        size = min(budget, 64 * 1024 * 1024)
        (large / f"m{files}.bin").write_bytes(os.urandom(size))
        budget -= size
        files += 1
    budget = int(total * 0.3)
    for i in range(budget // (100 * 1024)):
        folder = root / "frames" / f"d{i % 50:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i}.dat").write_bytes(os.urandom(100 * 1024))
        files += 1
    budget = int(total * 0.1)
    words = [f"sensor{i} value {i * 3.14:.3f} ok\n" for i in range(1000)]
    i = 0
    while budget > 0:
        folder = root / "logs" / f"d{i % 100:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        text = "".join(rng.choice(words) for _ in range(rng.randint(40, 600)))
        (folder / f"l{i}.txt").write_text(text)
        budget -= len(text)
        files += 1
        i += 1
    return files, sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def plain(*args: str, repo: Path) -> None:
    env = {**os.environ, "RESTIC_PASSWORD": PASSWORD, "RESTIC_REPOSITORY": str(repo)}
    subprocess.run(["restic", *args], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def fleet_file(work: Path, dataset: Path) -> Path:
    data = yaml.safe_load((ROOT / "inventory" / "lab.yaml").read_text())
    spec = data["backup"]
    spec["repositories"]["nas-primary"]["path"] = str(work / "flow-repos")
    spec["repositories"]["offsite"]["path"] = str(work / "flow-offsite")
    spec["plans"] = {"pi-1": {"repository": "nas-primary", "paths": [str(dataset)]}}
    spec["targets"] = {"rpo_hours": 26, "rto_minutes": 60}
    path = work / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="spark-bench-backup-", dir="/tmp"))
    os.environ["SPARK_STATE_DIR"] = str(work / "state")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        dataset = work / "dataset"
        files, size = make_dataset(dataset, args.size_mib)
        print(f"dataset: {files} files, {size / 2**20:.0f} MiB in {dataset}")

        from prefect.testing.utilities import prefect_test_harness

        from flows.backup import backup
        from flows.dr_drill import dr_drill
        from primespark.restic import ResticClient

        rows: list[tuple[str, float, float]] = []
        # plain restic and our client, alternating, fresh repositories each round; the best of each counts
        times: dict[str, list[float]] = {"plain backup": [], "plain restore": [], "client backup": [],
                                         "client restore": []}
        for round_ in range(ROUNDS):
            repo = work / f"plain-repo-{round_}"
            plain("init", repo=repo)
            times["plain backup"].append(timed(lambda repo=repo: plain("backup", str(dataset), repo=repo)))
            times["plain restore"].append(timed(lambda repo=repo: plain(
                "restore", "latest", "--verify", "--target", str(work / "r1"), repo=repo)))
            shutil.rmtree(work / "r1")
            shutil.rmtree(repo)
            client = ResticClient(str(work / f"client-repo-{round_}"), PASSWORD)
            client.init()
            times["client backup"].append(timed(lambda client=client: client.backup([str(dataset)])))
            times["client restore"].append(timed(lambda client=client: client.restore(
                "latest", str(work / "r2"), verify=True)))
            shutil.rmtree(work / "r2")
            shutil.rmtree(client.repository)
        t_plain_backup, t_plain_restore = min(times["plain backup"]), min(times["plain restore"])
        rows += [("backup: client vs restic", t_plain_backup, min(times["client backup"])),
                 ("restore --verify: client vs restic", t_plain_restore, min(times["client restore"]))]
        # our flows (a temporary Prefect server; its start-up is not timed)
        fleet = fleet_file(work, dataset)
        with prefect_test_harness(server_startup_timeout=120):
            t_flow_backup = timed(lambda: backup("pi-1", str(fleet), "local", offsite=False,
                                                 textfile=str(work / "prom")))
            t_flow_drill = timed(lambda: dr_drill("pi-1", str(fleet), "local", textfile=str(work / "prom")))
        rows += [("backup flow (+manifest, locks, Prefect) vs restic backup", t_plain_backup, t_flow_backup),
                 ("dr_drill flow (+sha256 compare, report) vs restic restore --verify", t_plain_restore,
                  t_flow_drill)]

        print(f"\nbest of {ROUNDS} rounds for the client rows, one run for the flows; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"{'':68} {'restic CLI':>11} {'ours':>9} {'overhead':>9}")
        for name, theirs, ours in rows:
            print(f"{name:68} {theirs:10.2f}s {ours:8.2f}s {100 * (ours - theirs) / theirs:8.1f}%")
        print("\ntarget: overhead ≤ 10% (the anchor: plain restic). The client rows measure the wrapper; the flow rows"
              "\nadd a sha256 manifest of every file at backup time and a full hash comparison at drill time.")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
