"""How soon a site's worker starts a run, and what an idle worker costs its host (the lab's edge worker on nas-1).

Run: .venv/bin/python bench/workers.py [--runs 20] [--idle-seconds 60]. Needs root and Docker; holds the lab lock.
A lab where `make lab` ran is used as it is; otherwise the benchmark brings it up (`spark lab up`, site.yml,
`spark flows deploy`) and leaves it up.

- Latency: from "run deployment" (the flow run's creation, as the UI's Run button makes it) to "flow running on
  the worker" (its Running state, set by the flow's own process on nas-1), both as the server records them;
  also to Pending (the worker took it). Median of `--runs` runs of `probe-edge` (without its SSH round), with
  Prefect's default worker polling (PREFECT_WORKER_QUERY_SECONDS=10) and a fresh interpreter per run, with the
  fleet's polling (orchestration.poll_seconds, 1 s) and a fresh interpreter, and with the fleet's polling and
  warm starts (the worker as the prefect_worker role starts it), side by side. Target: ≤ 3 s as the role sets it.
- Idle cost: CPU (over `--idle-seconds` with no run) and resident memory of the worker process, of its warm
  server, and of its supervisor (the lab has no systemd). A Pi has 4-8 GB.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv running the bench
SPARK = str(BIN / "spark")
WORKER_HOST = "nas-1"
ENV_FILE = "/etc/primespark/spark-prefect-worker.env"
COMMAND_FILE = "/etc/primespark/spark-prefect-worker.command"
WORKER_LOG = "/var/log/primespark/spark-prefect-worker.log"
SUPERVISOR_PID = "/run/primespark/spark-prefect-worker.pid"
PREFECT_DEFAULT_POLL = 10.0
TARGET_SECONDS = 3.0


def container(host: str) -> str:
    return f"spark-lab-{host}"


def on_host(script: str, timeout: float = 120) -> str:
    done = subprocess.run(["docker", "exec", container(WORKER_HOST), "sh", "-c", script], capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"on {WORKER_HOST}: `{script[:80]}` failed: {done.stderr.strip()}")
    return done.stdout


def ensure_lab() -> None:
    from primespark.context import FleetContext
    from primespark.errors import UserError
    from primespark.orchestration.api import use_fleet_prefect

    try:
        use_fleet_prefect(FleetContext.load("lab"))
        return
    except UserError as exc:
        print(f"the lab's Prefect server does not answer ({exc.message}): bringing the lab up", flush=True)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    for argv in ([SPARK, "lab", "up", "--env", "lab"],
                 [str(BIN / "ansible-playbook"), "-i", "inventory/lab.fleet.yml", "site.yml"],
                 [SPARK, "flows", "deploy", "--no-watch", "--env", "lab"]):  # the pool's runs: the bench's only
        subprocess.run(argv, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    use_fleet_prefect(FleetContext.load("lab"))


def cold(command: list[str]) -> list[str]:
    """The role's command line without the warmstart wrapper: each run a fresh interpreter importing Prefect."""
    if "primespark.orchestration.warmstart" not in command:
        return command
    start = command.index("primespark.orchestration.warmstart") - 2  # its `python -m`
    return command[:start] + command[command.index("--", start) + 1:]


def restart_worker(poll_seconds: float, warm: bool) -> None:
    """The edge worker again, polling every `poll_seconds`, warm or cold; back READY before this returns."""
    on_host(f"sed -i 's/^PREFECT_WORKER_QUERY_SECONDS=.*/PREFECT_WORKER_QUERY_SECONDS={poll_seconds}/' {ENV_FILE}")
    venv = "/opt/primespark/venv/bin/python"
    on_host(f"{venv} -m primespark.orchestration.supervise --name spark-prefect-worker --stop")
    command = shlex.split(on_host(f"cat {COMMAND_FILE}"))
    on_host(f"setsid --fork {shlex.join(command if warm else cold(command))}")
    wait_ready(time.monotonic())
    if warm:  # its runs start warm once the server has imported Prefect
        deadline = time.monotonic() + 120
        while "warmstart: serving" not in on_host(f"tail -n 50 {WORKER_LOG}") and time.monotonic() < deadline:
            time.sleep(0.5)


def wait_ready(since: float, timeout: float = 120) -> None:
    from prefect.client.orchestration import get_client

    while time.monotonic() - since < timeout:
        with get_client(sync_client=True) as client:
            workers = client.read_workers_for_work_pool("spark-edge")
        online = [w for w in workers if w.status.value == "ONLINE" and w.last_heartbeat_time is not None
                  and w.last_heartbeat_time.timestamp() > time.time() - (time.monotonic() - since)]
        if online:
            return
        time.sleep(1)
    raise SystemExit("the edge worker did not come back online")


def one_run(poll_seconds: float) -> tuple[float, float]:
    """(to Pending, to Running) of one probe-edge run, in seconds, as the server timed them."""
    from prefect.client.orchestration import get_client

    time.sleep(random.uniform(0, poll_seconds))  # any phase of the worker's polling
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("probe/probe-edge")
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"reach": False})
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            current = client.read_flow_run(run.id)
            if current.state is not None and current.state.is_final():
                break
            time.sleep(0.5)
        states = {s.type.value: s.timestamp for s in client.read_flow_run_states(run.id)}
    created = run.created
    if "RUNNING" not in states or created is None:
        raise SystemExit(f"run {run.name} never ran: {sorted(states)}")
    return ((states["PENDING"] - created).total_seconds(), (states["RUNNING"] - created).total_seconds())


def latencies(poll_seconds: float, runs: int, warm: bool) -> dict[str, float]:
    restart_worker(poll_seconds, warm)
    measured = [one_run(poll_seconds) for _ in range(runs)]
    return {"pending": statistics.median(p for p, _ in measured), "running": statistics.median(r for _, r in measured),
            "running_max": max(r for _, r in measured)}


def idle_cost(seconds: float) -> dict[str, Any]:
    supervisor = on_host(f"cat {SUPERVISOR_PID}").strip()
    worker = on_host(f"pgrep -P {supervisor}").split()[0]
    ticks = int(on_host("getconf CLK_TCK"))

    def cpu(pid: str) -> int:
        fields = on_host(f"cat /proc/{pid}/stat").rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    def rss_mib(pid: str) -> float:
        line = next(ln for ln in on_host(f"cat /proc/{pid}/status").splitlines() if ln.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    warm = next((pid for pid in on_host(f"pgrep -P {worker} || true").split()
                 if "primespark.orchestration.warmstart" in on_host(f"tr '\\0' ' ' < /proc/{pid}/cmdline")), None)
    if warm is None:
        raise SystemExit(f"the worker on {WORKER_HOST} has no warm server (its role sets prefect_worker_warm_start)")
    before = cpu(worker), cpu(warm), cpu(supervisor)
    time.sleep(seconds)
    after = cpu(worker), cpu(warm), cpu(supervisor)
    percent = [100 * (a - b) / ticks / seconds for a, b in zip(after, before, strict=True)]
    return {"worker_cpu_percent": percent[0], "warm_cpu_percent": percent[1], "supervisor_cpu_percent": percent[2],
            "worker_rss_mib": rss_mib(worker), "warm_rss_mib": rss_mib(warm), "supervisor_rss_mib": rss_mib(supervisor),
            "pid": worker}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--idle-seconds", type=float, default=60)
    args = parser.parse_args(argv)
    from primespark.fleet import load_fleet
    from primespark.lab.lock import lab_lock

    fleet = load_fleet("lab")
    assert fleet.orchestration is not None
    ours = fleet.orchestration.poll_seconds
    with lab_lock():
        ensure_lab()
        idle = idle_cost(args.idle_seconds)
        default = latencies(PREFECT_DEFAULT_POLL, args.runs, warm=False)
        polled = latencies(ours, args.runs, warm=False)
        project = latencies(ours, args.runs, warm=True)  # and leaves the worker as site.yml set it
    print(f"\nrun deployment -> flow running on the edge worker ({WORKER_HOST}), median of {args.runs} runs, "
          f"load {os.getloadavg()[0]:.1f}:")
    print("| worker polling | run starts | to Pending (taken) | to Running (flow started) | slowest | "
          f"target ≤ {TARGET_SECONDS:.0f} s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, start, figures in ((f"Prefect's default ({PREFECT_DEFAULT_POLL:.0f} s)", "cold", default),
                                  (f"the fleet's ({ours:g} s)", "cold", polled),
                                  (f"the fleet's ({ours:g} s)", "warm (the role's)", project)):
        met = ("met" if figures["running"] <= TARGET_SECONDS else "not met") if figures is project else ""
        print(f"| {label} | {start} | {figures['pending']:.2f} s | {figures['running']:.2f} s "
              f"| {figures['running_max']:.2f} s | {met} |")
    print(f"\nidle for {args.idle_seconds:.0f} s: the worker process (pid {idle['pid']} on {WORKER_HOST}) used "
          f"{idle['worker_cpu_percent']:.2f}% of a core and {idle['worker_rss_mib']:.0f} MiB resident; its warm server "
          f"{idle['warm_cpu_percent']:.2f}% and {idle['warm_rss_mib']:.0f} MiB; its supervisor "
          f"{idle['supervisor_cpu_percent']:.2f}% and {idle['supervisor_rss_mib']:.0f} MiB")
    held = idle["worker_rss_mib"] + idle["warm_rss_mib"]
    print(f"(a Pi has 4-8 GiB: the worker and its warm server take {held / 4096:.1%} of 4 GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
