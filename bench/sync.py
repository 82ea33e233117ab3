"""Sync on the lab: `spark sync run` beside plain `rsync -a` over the same transport, and the continuous lag.

Run: .venv/bin/python bench/sync.py [--small 100000] [--large-gib 2] [--lag-files 200] [--lag-seconds 60]

The dataset (`--small` files of 0.5-8 KiB in folders of 100, plus `--large-gib` GiB of 128 MiB files) is made in
pi-1's hot tier. Both contenders copy pi-1's hot tier to its folder on nas-1 exactly as the lab's `hot-to-nas`
job does it: rsync runs on pi-1, reached over SSH from here, and pushes through the job's account on nas-1
(its key, its known hosts, rrsync confining it to /srv/warm/pi-1). Plain is `rsync -a` with that ssh command;
ours is the whole `spark sync run hot-to-nas --source pi-1` command (interpreter start, Prefect's run and the
link's lock, the probe, rsync (the files from 8 MiB in a second run, with --delay-updates), the XXH3-128
verification of what was sent, the job's flushes of nas-1's filesystem before and after (its `fsync: pass`), the
state, metrics and report), its time in the flow by step as the Prefect server recorded it. Each round clears
the destination, then times a first sync and a no-change re-sync of each, the order alternating by round.
Target: ours at most 1.1x plain, both times. Beside it, plain's first sync followed by a flush of nas-1's
filesystem (`sync -f`): a copy as durable as ours, which plain leaves to the kernel's writeback.

Then the continuous lag: the `sync-watch` flow runs the job while pi-1 writes `--lag-files` files evenly over
`--lag-seconds`; nas-1 notes when each appears (a listing every 0.2 s). Target: p95 at most 30 s.
`--lag-files 0` leaves the lag out.

Holds the lab lock; brings the lab up if needed (and down again after, also when a step fails), applies site.yml
when the lab's Prefect server does not answer (a lab `make lab` did not configure), stops the lab's watch runs
(`make lab` starts one per continuous job; they would sync the dataset meanwhile) and starts them again after,
pauses the lab data generator on pi-1 while it runs, and removes its files at the end.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from primespark.context import FleetContext
from primespark.data import sync as core
from primespark.data.layout import links
from primespark.errors import UserError
from primespark.fleet import load_fleet
from primespark.lab import Lab
from primespark.lab.lock import lab_lock
from primespark.orchestration.api import use_fleet_prefect
from primespark.orchestration.deploy import watches_stopped
from primespark.playbook import run_ansible

REPO = Path(__file__).resolve().parents[1]
SPARK = str(Path(sys.executable).parent / "spark")
PAUSE = "/var/lib/primespark/lab-generator/paused"
DATASET = r"""
import os, random, sys
root, small, large_gib = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
rng = random.Random(16)
for i in range(small):
    folder = os.path.join(root, "small", f"d{i // 100:04d}")
    if i % 100 == 0:
        os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"f{i:06d}.dat"), "wb") as handle:
        handle.write(rng.randbytes(rng.randint(512, 8192)))
os.makedirs(os.path.join(root, "large"), exist_ok=True)
for i in range(int(large_gib * 8)):
    with open(os.path.join(root, "large", f"l{i:02d}.bin"), "wb") as handle:
        for _ in range(8):
            handle.write(os.urandom(16 << 20))
"""
WRITER = r"""
import json, os, sys, time
root, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
os.makedirs(root, exist_ok=True)
start = time.time()
for i in range(count):
    time.sleep(max(0.0, start + i * seconds / count - time.time()))
    with open(os.path.join(root, f"w{i:04d}.bin"), "wb") as handle:
        handle.write(os.urandom(4096 + (i * 7919) % 60000))
    print(json.dumps({"name": f"w{i:04d}.bin", "t": time.time()}), flush=True)
"""
POLLER = r"""
import json, os, sys, time
root, expected, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
seen, deadline = {}, time.time() + timeout
while time.time() < deadline and len(seen) < expected:
    now = time.time()
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        names = []
    for name in names:
        if not name.startswith(".") and name not in seen:
            seen[name] = now
    time.sleep(0.2)
print(json.dumps(seen))
"""


def sh(ctx: FleetContext, host: str, script: str, timeout: float = 3600) -> str:
    from primespark.hosts import run_on

    return run_on(ctx.hosts, host, script, timeout=timeout)


def plain(ctx: FleetContext, link: Any) -> float:
    """`rsync -a` on pi-1 over the job's own route (the same ssh command, key, account and rrsync), each run its
    own SSH connection as a plain rsync makes it (not the pass's shared one: `ssh_route`'s ControlMaster)."""
    route, destination = core.route_for(ctx, link)
    following = (*route.rsh[1:], "")
    rsh = [word for word, after in zip(route.rsh, following, strict=True)  # without the `-o Control…` pairs
           if not word.startswith("Control") and not (word == "-o" and after.startswith("Control"))]
    runner = ctx.hosts.runner(link.source)
    start = time.perf_counter()
    done = runner.run(["rsync", "-a", "-e", " ".join(rsh), link.source_path.rstrip("/") + "/",
                       route.destination(destination)], timeout=7200)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"plain rsync failed: {done.stderr[-2000:]}")
    return seconds


def flush(ctx: FleetContext, link: Any) -> float:
    """nas-1's filesystem flushed (`sync -f` of the job's folder): what plain's copy leaves to the kernel and ours
    waits for (the job's `fsync: pass`), so that a crash right after loses nothing."""
    start = time.perf_counter()
    sh(ctx, link.destination, f"sync -f {link.destination_path}")
    return time.perf_counter() - start


def ours(env: str) -> tuple[float, dict[str, Any]]:
    """The whole `spark sync run` command."""
    start = time.perf_counter()
    done = subprocess.run([SPARK, "sync", "run", "hot-to-nas", "--source", "pi-1", "--env", env, "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=7200)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"spark sync run failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])["links"][0]


def step_seconds(flow_run_name: str) -> str:
    """The latest run of `flow_run_name` by step: each task's time summed over its runs (the link's steps run one
    after another), from the Prefect server that recorded it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        [run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[flow_run_name])),
                                      sort=FlowRunSort.START_TIME_DESC, limit=1)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    steps: dict[str, float] = {}
    for task in tasks:
        name = task.name.rsplit("-", 1)[0]
        steps[name] = steps.get(name, 0.0) + task.total_run_time.total_seconds()
    return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in sorted(steps.items(), key=lambda kv: -kv[1]))


def clear(ctx: FleetContext, link: Any) -> None:
    sh(ctx, link.destination, f"find {link.destination_path} -mindepth 1 -delete")


def lag(ctx: FleetContext, env: str, container: dict[str, str], files: int, seconds: float) -> list[float]:
    from flows.sync import sync_watch

    outcome: dict[str, Any] = {}
    context = contextvars.copy_context()
    watcher = threading.Thread(target=lambda: context.run(lambda: outcome.update(result=sync_watch(
        "hot-to-nas", env, "ssh", duration_seconds=seconds + 120))))
    started = time.time()
    watcher.start()
    [link] = [lk for lk in links(ctx.fleet, "hot-to-nas") if lk.source == "pi-1"]
    while (core.load_state(ctx, link).last_success or 0) < started:  # the first, full pass done
        time.sleep(1)
    poller = subprocess.Popen(["docker", "exec", container["nas-1"], "python3", "-c", POLLER,
                               "/srv/warm/pi-1/bench-lag", str(files), str(seconds + 100)],
                              stdout=subprocess.PIPE, text=True)
    writer = subprocess.run(["docker", "exec", container["pi-1"], "python3", "-c", WRITER, "/srv/hot/bench-lag",
                             str(files), str(seconds)], capture_output=True, text=True, check=True)
    seen = json.loads(poller.communicate()[0])
    watcher.join()
    written = {json.loads(line)["name"]: json.loads(line)["t"] for line in writer.stdout.splitlines()}
    missing = set(written) - set(seen)
    if missing:
        print(f"{len(missing)} of {files} files did not arrive within the window")
    print(f"watch flow: {outcome.get('result')}")
    return sorted(seen[name] - written[name] for name in written if name in seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--large-gib", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--lag-files", type=int, default=200)
    parser.add_argument("--lag-seconds", type=float, default=60)
    args = parser.parse_args()
    fleet = load_fleet(str(REPO / "inventory" / "lab.yaml"))
    the_lab = Lab(fleet)
    load_before = os.getloadavg()
    with lab_lock():
        was_up = any(h.state == "running" for h in the_lab.status(check_ssh=False).hosts)
        try:
            measure(the_lab, args)
        finally:
            if not was_up:
                the_lab.down()
    load = " ".join(f"{x:.2f}" for x in load_before), " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{os.cpu_count()} CPUs, load average {load[0]} before, {load[1]} after")


def measure(the_lab: Lab, args: argparse.Namespace) -> None:
    """Everything between the lab coming up and going down again (also when a step fails)."""
    the_lab.up()
    container = {h: the_lab.plan().container(h).name for h in ("pi-1", "nas-1")}
    try:
        use_fleet_prefect(FleetContext.load("lab"))
    except UserError as exc:  # a lab `make lab` did not configure: what it does before its flows
        print(f"the lab's Prefect server does not answer ({exc.message}): applying site.yml", flush=True)
        applied = run_ansible(Path("inventory/lab.fleet.yml"), playbook="site.yml", root=REPO)
        if applied.rc != 0:
            raise SystemExit("site.yml failed: " + "\n".join(applied.failed_tasks)) from exc
        use_fleet_prefect(FleetContext.load("lab"))
    ctx = FleetContext.load("lab", "ssh")
    # The lab's own watches would sync the dataset and each copy of it meanwhile (pi-1 to nas-1, nas-1 to the
    # cloud), on the same two cores, and hold the link's lock against `spark sync run`.
    with watches_stopped(ctx) as stopped:
        if stopped:
            print(f"the lab's watch runs stopped while measuring: {', '.join(stopped)} (started again after)")
        [link] = [lk for lk in links(ctx.fleet, "hot-to-nas") if lk.source == "pi-1"]
        sh(ctx, "pi-1", f"mkdir -p {os.path.dirname(PAUSE)} && touch {PAUSE}")
        try:
            made = time.perf_counter()
            sh(ctx, "pi-1", "rm -rf /srv/hot/bench /srv/hot/bench-lag")
            subprocess.run(["docker", "exec", container["pi-1"], "python3", "-c", DATASET, "/srv/hot/bench",
                            str(args.small), str(args.large_gib)], check=True)
            files = sh(ctx, "pi-1", "find /srv/hot -type f | wc -l").strip()
            size = sh(ctx, "pi-1", "du -sb /srv/hot | cut -f1").strip()
            print(f"dataset on pi-1: {files} files, {int(size) / 2**30:.2f} GiB in /srv/hot "
                  f"(made in {time.perf_counter() - made:.0f} s, not counted)")
            rows: dict[str, list[float]] = {"plain first": [], "plain flushed": [], "plain again": [], "ours first": [],
                                            "ours again": []}
            detail: list[dict[str, Any]] = []
            for round_no in range(args.rounds):
                order = ("plain", "ours") if round_no % 2 == 0 else ("ours", "plain")
                for who in order:
                    clear(ctx, link)
                    os.sync()
                    if who == "plain":
                        rows["plain first"].append(plain(ctx, link))
                        rows["plain flushed"].append(rows["plain first"][-1] + flush(ctx, link))
                        rows["plain again"].append(plain(ctx, link))
                    else:
                        seconds, first = ours("lab")
                        first["steps"] = step_seconds("sync-hot-to-nas")
                        rows["ours first"].append(seconds)
                        again_seconds, again = ours("lab")
                        again["steps"] = step_seconds("sync-hot-to-nas")
                        rows["ours again"].append(again_seconds)
                        detail += [first, again]
            print(f"\n{'':<28}{'plain rsync -a':>16}{'spark sync run':>16}{'ratio':>9}   target <= 1.1x")
            for step in ("first", "again"):
                p, o = statistics.median(rows[f"plain {step}"]), statistics.median(rows[f"ours {step}"])
                label = "first sync" if step == "first" else "no-change re-sync"
                print(f"{label:<28}{p:>15.1f}s{o:>15.1f}s{o / p:>8.2f}x   {'met' if o / p <= 1.1 else 'missed'}")
                if step == "first":  # beside a copy as durable as ours: plain's, then nas-1's filesystem flushed
                    f = statistics.median(rows["plain flushed"])
                    print(f"{'  plain then flushed':<28}{f:>15.1f}s{o:>15.1f}s{o / f:>8.2f}x")
            for d in detail:
                print(f"  ours, {d['files_sent']} files sent ({d['bytes_sent'] / 2**30:.2f} GiB): rsync "
                      f"{d['transfer_seconds']:.1f} s of {d['finished'] - d['started']:.1f} s in the flow; "
                      f"{d['verified']} verified; by step: {d['steps']}")
            sh(ctx, "pi-1", "rm -rf /srv/hot/bench")
            clear(ctx, link)
            lags = lag(ctx, "lab", container, args.lag_files, args.lag_seconds) if args.lag_files else []
            if lags:
                q = statistics.quantiles(lags, n=100)
                print(f"\ncontinuous lag, pi-1 to nas-1, {len(lags)} files over {args.lag_seconds:.0f} s: "
                      f"p50 {q[49]:.1f} s, p90 {q[89]:.1f} s, p95 {q[94]:.1f} s, p99 {q[98]:.1f} s, "
                      f"max {max(lags):.1f} s   target p95 <= 30 s: {'met' if q[94] <= 30 else 'missed'}")
        finally:
            sh(ctx, "pi-1", f"rm -rf /srv/hot/bench /srv/hot/bench-lag; rm -f {PAUSE}")
            clear(ctx, link)


if __name__ == "__main__":
    main()
