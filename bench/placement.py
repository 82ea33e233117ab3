"""Placement decision time: one agent task over generated fleets of 20, 200 and 1,000 hosts with 100 tasks queued.

Target: one decision at 1,000 hosts in at most 50 ms. The fleets are `fleet/generate.py`'s (Pis and NASes at the
edge, VMs in the cloud) with a hot tier on the Pis, a warm tier on the NASes and quiet hours on every third Pi;
the facts are seeded random (free CPU and memory, one host in ten on battery, one in twenty drained, the task's
data on a few Pis and their NAS copies). The 100 queued tasks are already placed on random hosts: the decision
takes their share off each host. "One" is the best of 20 decisions; "queue" places the 100 queued tasks one after
another (each seeing those before it), its median per decision.

`--lab`: submit-to-running on the lab (target ≤ 3 s): from calling the `agent-task` flow (this process, Prefect
loaded once, as a worker's flow process has it) to the task's command running on its host (it writes its start
time; the lab's containers share this machine's clock), median of 20, beside a plain `ssh host cmd` (the same
stamp over one SSH connection made for it). Needs root and Docker; holds the lab lock; a lab where `make lab` ran
is used as it is, else brought up (bench/workers.py's ensure_lab).
"""

from __future__ import annotations

import argparse
import random
import secrets
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime

from timing import best_of

from primespark.agents.placement import HostFacts, Placed, Unavailable, place
from primespark.fleet.generate import generate_fleet_data
from primespark.fleet.loader import validate_data
from primespark.fleet.model import Fleet, HostKind, TaskSpec

TARGET_MS = 50
SUBMIT_TARGET_S = 3.0
QUEUED = 100
NOW = datetime(2026, 11, 30, 22, 30, tzinfo=UTC)  # inside the quiet hours of every third Pi
TASK = TaskSpec(command="python3 -m summarise /srv/hot/readings", cpus=0.5, memory_mb=256,
                data=["pi-2:/srv/hot/readings", "/srv/hot/models"])


def fleet_of(size: int) -> Fleet:
    data = generate_fleet_data(size)
    pis = [n for n, h in data["hosts"].items() if h["kind"] == "pi"]
    nases = [n for n, h in data["hosts"].items() if h["kind"] == "nas"]
    for i, name in enumerate(pis):
        if i % 3 == 0:
            data["hosts"][name]["power"]["quiet_hours"] = ["23:00", "06:00"]
    data["timezone"] = "Europe/Berlin"
    data["tiers"] = {"hot": {"hosts": pis, "path": "/srv/hot", "capacity_gb": 50, "max_age_days": 7},
                     "warm": {"hosts": nases, "path": "/srv/warm", "capacity_gb": 4000}}
    return validate_data(data, f"generated-{size}.yaml")


def facts_of(fleet: Fleet, rng: random.Random) -> dict[str, HostFacts | Unavailable]:
    facts: dict[str, HostFacts | Unavailable] = {}
    for name, host in fleet.hosts.items():
        if rng.random() < 0.02:
            facts[name] = Unavailable("cannot reach it over SSH")
            continue
        data: dict[str, int] = {}
        if host.kind is HostKind.pi and rng.random() < 0.3:
            data = {"/srv/hot/models": rng.randrange(10**9)}
        if name == "pi-2" or (host.kind is HostKind.nas and rng.random() < 0.5):
            data["/srv/hot/readings" if name == "pi-2" else "/srv/warm/pi-2/readings"] = 1_200_000_000
        facts[name] = HostFacts(cpus_free=rng.uniform(0, host.cpus), memory_free_mb=rng.randrange(host.memory_mb),
                                on_mains=rng.random() > 0.1, battery_percent=rng.uniform(0, 100),
                                drained=rng.random() < 0.05, data_bytes=data)
    return facts


STAMP = 'date +%s.%N > "$SPARK_TASK_OUTPUT/started"'


def submit_to_running(runs: int) -> tuple[list[float], list[float], str]:
    """Seconds from submitting to the command running on its host, per run; the same for plain ssh; the host."""
    from flows.agent_task import agent_task
    from primespark.agents.execute import results_root
    from primespark.context import FleetContext
    from primespark.fleet.model import TaskPower
    from primespark.lab.ssh import ssh_argv
    from primespark.orchestration.runs import record_runs, run_here

    ctx = FleetContext.load("lab")
    record_runs(ctx)
    spec = TaskSpec(command=STAMP, cpus=0.1, memory_mb=32, data=["pi-2:/srv/hot/lab-data"],
                    power=TaskPower(run_in_quiet_hours=True))
    prefix, submitted, ssh = f"bench-submit-{secrets.token_hex(2)}", [], []
    hosts: set[str] = set()
    try:
        for i in range(runs):
            start = time.time()
            result = run_here(agent_task, spec=spec, name="bench-submit", task_id=f"{prefix}-{i}", env="lab")
            hosts.add(result["host"])
            stamp = ctx.hosts.runner(result["host"]).run(["cat", f"{result['path']}/out/started"], timeout=30)
            submitted.append(float(stamp.text) - start)
        state_dir = ctx.settings.state_dir("lab")
        for _ in range(runs):
            start = time.time()
            done = subprocess.run(ssh_argv(state_dir, ctx.fleet, "pi-2", "date +%s.%N"), capture_output=True,
                                  text=True, timeout=30, check=True)
            ssh.append(float(done.stdout) - start)
    finally:
        for host in hosts:  # the benchmark's results, not the fleet's
            ctx.hosts.runner(host).run(["sh", "-c", f"rm -rf {results_root(ctx.fleet, host)}/{prefix}-*"], timeout=30)
    return submitted, ssh, ", ".join(sorted(hosts))


def lab(runs: int) -> None:
    from workers import ensure_lab

    from primespark.lab.lock import lab_lock

    with lab_lock():
        ensure_lab()
        submitted, ssh, hosts = submit_to_running(runs)
    met = "met" if statistics.median(submitted) <= SUBMIT_TARGET_S else "NOT met"
    print(f"submit -> running on the lab ({hosts}), median of {runs}:")
    print(f"  agent-task flow (facts, placement, decision artifact, start): {statistics.median(submitted):.2f} s "
          f"(slowest {max(submitted):.2f} s; target ≤ {SUBMIT_TARGET_S:.0f} s: {met})")
    print(f"  plain ssh pi-2 cmd:                                          {statistics.median(ssh):.2f} s "
          f"(slowest {max(ssh):.2f} s)")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lab", action="store_true", help="submit-to-running on the lab, not the decision time")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args(argv)
    if args.lab:
        lab(args.runs)
        return
    print(f"{'hosts':>6} {'queued':>7} {'one':>9} {'queue, median':>14}  target")
    for size in (20, 200, 1000):
        fleet = fleet_of(size)
        rng = random.Random(size)
        facts = facts_of(fleet, rng)
        runners = [n for n, h in fleet.hosts.items() if h.kind is not HostKind.kvm_host]
        placed = [Placed(rng.choice(runners), 0.25, 128) for _ in range(QUEUED)]
        decision = place(fleet, TASK, facts, placed, NOW)
        one = best_of(lambda fleet=fleet, facts=facts, placed=placed: place(fleet, TASK, facts, placed, NOW), 20)
        queue: list[Placed] = list(placed)
        each = []
        for _ in range(QUEUED):
            start = time.perf_counter()
            chosen = place(fleet, TASK, facts, queue, NOW).host
            each.append(time.perf_counter() - start)
            if chosen is not None:
                queue.append(Placed(chosen, TASK.cpus, TASK.memory_mb))
        median = statistics.median(each)
        target = f"≤ {TARGET_MS} ms: {'met' if one * 1000 <= TARGET_MS else 'MISSED'}" if size == 1000 else ""
        print(f"{len(fleet.hosts):>6} {QUEUED:>7} {one * 1000:>7.2f}ms {median * 1000:>12.2f}ms  {target}"
              f"   (chose {decision.host})")


if __name__ == "__main__":
    main(sys.argv[1:])
