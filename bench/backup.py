"""Backup and restore of a generated 1 GiB mixed dataset: plain restic CLI beside our client and our flows.

Run: .venv/bin/python bench/backup.py [--size-mib 1024] [--rounds 5] [--work-dir /tmp]. The dataset, repositories
and restores live in a new folder under the work dir, removed at the end; `--work-dir /dev/shm` takes the disk's
write-back out of the times, which then vary less (restic's restores vary most). Target: our overhead at most 10%
over plain restic.

Rows, each the best and the median of the rounds (restic's own times vary by 10-20% here from run to run, so
one round proves little), and the median of each round's own ratio (ours over the restic step it ran beside,
which takes out what drifts between rounds); each of our steps runs right beside restic's, the order alternating:
- the first backup into a new repository: the whole `backup` flow (writer slot, backup with its XXH3-128
  manifest, Prefect bookkeeping, metrics) vs `restic backup` (both repositories made beforehand, untimed);
- the DR drill: the whole `dr_drill` flow (restore --verify, the hash of every restored file against the
  manifest, report and history artifacts, metrics, clean-up) vs `restic restore --verify`;
- the next backup after 5% of the files changed (the manifest hashes only what changed) vs `restic backup`.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "bench password, not a secret"


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


def change_some(root: Path, seed: int) -> None:
    """Rewrite 5% of the medium files (new content, same size): what a day of new frames looks like."""
    rng = random.Random(seed)
    frames = sorted((root / "frames").rglob("*.dat"))
    for path in rng.sample(frames, len(frames) // 20):
        path.write_bytes(os.urandom(path.stat().st_size))


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    os.sync()  # the previous step's dirty pages are not this step's cost
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def plain(*args: str, repo: Path) -> None:
    env = {**os.environ, "RESTIC_PASSWORD": PASSWORD, "RESTIC_REPOSITORY": str(repo)}
    subprocess.run(["restic", *args], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def fleet_file(work: Path, dataset: Path) -> Path:
    data = yaml.safe_load((ROOT / "inventory" / "lab.yaml").read_text())
    data["secrets"] = {"backend": "local"}  # the lab's own OpenBao runs only under `spark lab up`
    spec = data["backup"]
    for name, repository in spec["repositories"].items():
        repository["password"] = f"local:restic/{name}"
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
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work-dir", default="/tmp", help="where the dataset, repositories and restores go")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="spark-bench-backup-", dir=args.work_dir))
    os.environ["SPARK_STATE_DIR"] = str(work / "state")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        dataset = work / "dataset"
        files, size = make_dataset(dataset, args.size_mib)
        print(f"dataset: {files} files, {size / 2**20:.0f} MiB in {dataset}")

        from prefect import flow
        from prefect.testing.utilities import prefect_test_harness

        from flows.backup import backup
        from flows.dr_drill import dr_drill
        from primespark.backup import jobs
        from primespark.backup.drill import run_drill
        from primespark.backup.repositories import folders_on
        from primespark.context import FleetContext
        from primespark.orchestration.runs import in_process_runs

        fleet = fleet_file(work, dataset)
        ctx = FleetContext.load(str(fleet), "local")
        flow_repo = work / "flow-repos" / "pi-1" / "repo"
        prom = str(work / "prom")
        times: dict[str, list[float]] = {k: [] for k in (
            "plain backup", "flow backup", "session backup", "plain restore", "flow drill", "session drill",
            "plain again", "flow again")}
        scratch = Path(folders_on(ctx, ctx.fleet.backup.drill.scratch_host).scratch)  # type: ignore[union-attr]

        def cleaned_up() -> None:
            """Untimed: the drill's background removal of its restored copy ends before the next step."""
            while scratch.exists() and any(scratch.iterdir()):
                time.sleep(0.05)

        def fresh_repository() -> None:
            shutil.rmtree(flow_repo.parent.parent, ignore_errors=True)
            Path(folders_on(ctx, "pi-1").cache_file("nas-primary")).unlink(missing_ok=True)
            jobs.start_over(ctx, "nas-primary", ["pi-1"])  # untimed, as `restic init` for plain restic

        def pair(first_ours: bool, theirs: tuple[str, Any], ours: tuple[str, Any]) -> None:
            """Each of our steps beside restic's same step, adjacent, the order alternating by round."""
            for key, step in (ours, theirs) if first_ours else (theirs, ours):
                times[key].append(timed(step))
                cleaned_up()

        def one_round(round_: int) -> None:
            repo = work / f"plain-repo-{round_}"
            plain("init", repo=repo)
            fresh_repository()
            first = round_ % 2 == 1
            pair(first, ("plain backup", lambda: plain("backup", str(dataset), repo=repo)),
                 ("flow backup", lambda: backup("pi-1", str(fleet), "local", offsite=False, textfile=prom)))
            pair(first, ("plain restore", lambda: plain("restore", "latest", "--verify", "--target",
                                                        str(work / "restored"), repo=repo)),
                 ("flow drill", lambda: dr_drill("pi-1", str(fleet), "local", textfile=prom)))
            shutil.rmtree(work / "restored")
            change_some(dataset, round_)
            pair(first, ("plain again", lambda: plain("backup", str(dataset), repo=repo)),
                 ("flow again", lambda: backup("pi-1", str(fleet), "local", offsite=False, textfile=prom)))
            shutil.rmtree(repo)
            # the same work without Prefect: the host-side session and the drill's steps alone
            fresh_repository()
            times["session backup"].append(timed(lambda: jobs.backup_host(ctx, "pi-1")))
            times["session drill"].append(timed(lambda: run_drill(ctx, "pi-1")))
            cleaned_up()

        # run as `spark backup now` / `spark drill run` run them: in this process, without heartbeats
        with prefect_test_harness(server_startup_timeout=120), in_process_runs():
            flow(name="warm-up")(lambda: None)()  # the fresh server's first run (client, SQLite) is not a backup's
            for round_ in range(args.rounds):
                one_round(round_)
        rows = [("first backup: backup flow vs restic backup", "plain backup", "flow backup"),
                ("  the same without Prefect (host-side session)", "plain backup", "session backup"),
                ("DR drill: dr_drill flow vs restic restore --verify", "plain restore", "flow drill"),
                ("  the same without Prefect (run_drill)", "plain restore", "session drill"),
                ("next backup, 5% of files changed: flow vs restic", "plain again", "flow again")]
        print(f"\n{args.rounds} rounds in {args.work_dir}; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"{'':52} {'restic CLI':>10} {'ours':>7} {'overhead':>8}   {'restic':>7} {'ours':>7} {'overhead':>8}"
              f"   {'overhead':>8}")
        print(f"{'':52} {'best':>10} {'best':>7} {'':>8}   {'median':>7} {'median':>7} {'':>8}   {'paired':>8}")
        for name, theirs_key, ours_key in rows:
            cells = []
            for pick in (min, statistics.median):
                theirs, ours = pick(times[theirs_key]), pick(times[ours_key])
                cells.append(f"{theirs:9.2f}s {ours:6.2f}s {100 * (ours - theirs) / theirs:7.1f}%")
            # each round's own ratio (ours beside the restic step it ran next to), then their median
            paired = statistics.median(o / t for o, t in zip(times[ours_key], times[theirs_key], strict=True))
            print(f"{name:52} {'   '.join(cells)}   {100 * (paired - 1):7.1f}%")
        print("\ntarget: overhead ≤ 10% (the anchor: plain restic). The backup flow adds a hash manifest of every"
              "\nfile (hashed while restic derives its key, saved by the same restic run), the writer slot and"
              "\nPrefect's bookkeeping; the drill adds the hash comparison (beside restic's --verify), the report and"
              "\nartifacts.")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
