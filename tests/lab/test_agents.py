"""Agent tasks on the lab (issue 18): `spark task run` places the lab fleet's `count-readings` template on live
facts — each host's node exporter over SSH, its drain marker, the bytes of the task's data it holds, its site's work
pool on the lab's Prefect server — runs it there and records the run on that server (`spark task ls`)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from lab_cli import REPO, SPARK, spark, until

from primespark.agents.execute import results_root
from primespark.agents.taskside import RUNNING_SUFFIX, STAGING
from primespark.playbook import run_ansible

pytestmark = pytest.mark.lab

TEMPLATE = "count-readings"  # inventory/lab.yaml: its data is pi-2:/srv/hot/lab-data
EXTRA_DATA = "/srv/hot/lab-data/agent-test.bin"  # pi-2 then holds clearly more of it than the copy sync keeps


@pytest.fixture(scope="module")
def agents(lab, deployed) -> Any:
    """Workers READY on both pools (placement reads each site's pool), and pi-2 holding 8 MiB more of the task's
    data than any copy of it; removed at the end."""
    done = lab.exec("pi-2", f"head -c 8M /dev/urandom > {EXTRA_DATA}")
    assert done.returncode == 0, done.stderr
    yield lab
    lab.exec("pi-2", f"rm -f {EXTRA_DATA}")


def task(command: str, *args: str) -> Any:
    done = spark("task", command, "--template", TEMPLATE, "--env", "lab", "--json", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def ran_on(lab, result: dict[str, Any]) -> str:
    """What the task's command wrote on the host its result folder is on: that host's name, and the files it saw."""
    done = lab.exec(result["host"], f"cat {result['path']}/out/ran-on {result['path']}/out/files")
    assert done.returncode == 0, done.stderr
    name, files = done.stdout.split()
    assert int(files) > 0
    return name


def test_a_task_runs_where_its_data_is_and_off_a_drained_host(agents) -> None:
    lab = agents
    first = task("run")
    assert first["host"] == "pi-2", first
    assert "of its data local" in first["why"], first["why"]
    assert ran_on(lab, first) == lab.exec("pi-2", "hostname").stdout.strip()

    # A pass of the sync job puts a copy of the data on nas-1 (the lab's tests deploy without the continuous watch):
    # off the drained Pi, the copy decides where the task goes. Without one, the other hosts would differ only in
    # their CPUs free, and a load read a moment later may rank them the other way round.
    synced = spark("sync", "run", "hot-to-nas", "--source", "pi-2", "--env", "lab")
    assert synced.returncode == 0, synced.stdout + synced.stderr
    drained = spark("host", "drain", "pi-2", "--env", "lab", "--reason", "lab test: disk swap")
    assert drained.returncode == 0, drained.stdout + drained.stderr
    try:
        plan = task("plan")
        reasons = {c["host"]: c for c in plan["candidates"]}
        assert reasons["pi-2"]["verdict"] == "excluded" and "drained" in reasons["pi-2"]["reason"], reasons["pi-2"]
        assert plan["host"] == "nas-1" and "of its data local" in reasons["nas-1"]["reason"], reasons
        second = task("run")
        assert second["host"] == plan["host"], (second, plan)
        assert ran_on(lab, second) == lab.exec("nas-1", "hostname").stdout.strip()
    finally:
        undrained = spark("host", "undrain", "pi-2", "--env", "lab")
    assert undrained.returncode == 0, undrained.stdout + undrained.stderr

    # Both runs are on the lab's Prefect server, each on the host it ran on, exactly once.
    listed = spark("task", "ls", "--env", "lab", "--state", "completed", columns=300)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    for run in (first, second):
        rows = [line for line in listed.stdout.splitlines() if run["task_id"] in line]
        assert len(rows) == 1 and run["host"] in rows[0], listed.stdout


def test_a_low_battery_drains_the_pi_requeues_its_task_and_only_then_halts(agents, tmp_path: Path) -> None:
    lab = agents
    spec = tmp_path / "slow.yaml"
    spec.write_text(SLOW_TASK)
    task_id = f"low-battery-{secrets.token_hex(3)}"
    running = start_task(spec, task_id)
    try:
        wait_running(lab, "pi-2", task_id, running)
        guard = lab.exec("pi-2", "/usr/local/sbin/spark-ups-guard --battery 5", timeout=180)
        out, err = running.communicate(timeout=300)
    finally:
        if running.poll() is None:
            running.kill()
        halted = lab.exec("pi-2", "cat /run/spark/halted").stdout
        lab.exec("pi-2", "rm -f /run/spark/halted /run/spark/quiet && /usr/local/sbin/spark-ups-guard")
        undrained = spark("host", "undrain", "pi-2", "--env", "lab")
    print(guard.stdout)
    assert guard.returncode == 2, guard.stdout + guard.stderr  # low power: it acted
    said = guard.stdout.splitlines()
    drained = next(i for i, line in enumerate(said) if "drained (battery 5%)" in line)
    waited = next(i for i, line in enumerate(said) if "to end: " in line and task_id in line)
    ended = next(i for i, line in enumerate(said) if "the stopped tasks ended in" in line)
    halt = next(i for i, line in enumerate(said) if "halt: marker" in line)
    assert drained < waited < ended < halt, said
    assert "low power (battery 5%" in halted, halted
    assert running.returncode == 0, out + err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["host"] != "pi-2" and result["status"] == "succeeded" and result["attempts"] >= 2, result
    assert undrained.returncode == 0, undrained.stdout + undrained.stderr


def start_task(spec: Path, task_id: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # the CLI finds the server itself
    return subprocess.Popen([SPARK, "task", "run", str(spec), "--id", task_id, "--env", "lab", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def wait_running(lab, host: str, task_id: str, running: subprocess.Popen[str]) -> None:
    """Until the task's command runs on `host` (its running record), or the run ended without it."""
    record = f"{results_root(lab.fleet, host)}/{STAGING}/{task_id}{RUNNING_SUFFIX}"
    until(f"{task_id} running on {host}",
          lambda: running.poll() is not None or lab.exec(host, f"test -f {record}").returncode == 0, timeout=180)
    assert running.poll() is None, running.communicate()

# A task of 20 s, placed on pi-2 where its data is: long enough to lose its host while it runs.
SLOW_TASK = """
command: 'sleep 20; hostname > "$SPARK_TASK_OUTPUT/ran-on"'
cpus: 0.1
memory_mb: 32
data: ["pi-2:/srv/hot/lab-data"]
timeout_minutes: 5
power: {run_in_quiet_hours: true}
"""


def test_a_task_whose_host_stops_is_requeued_within_60_s_and_runs_once(agents, tmp_path: Path) -> None:
    lab = agents
    spec = tmp_path / "slow.yaml"
    spec.write_text(SLOW_TASK)
    task_id = f"host-stop-{secrets.token_hex(3)}"
    pi2_root = results_root(lab.fleet, "pi-2")
    running = start_task(spec, task_id)
    try:
        wait_running(lab, "pi-2", task_id, running)
        subprocess.run(["docker", "stop", "-t", "1", lab.container("pi-2")], check=True, capture_output=True,
                       timeout=60)
        stopped = time.time()
        out, err = running.communicate(timeout=300)
    finally:
        if running.poll() is None:
            running.kill()
        lab.lab.up()  # starts the stopped container; site.yml brings its mesh, exporter and power scripts back
        back = run_ansible(Path(f"inventory/{lab.fleet.name}.fleet.yml"), playbook="site.yml", limit="pi-2",
                           root=REPO)
    assert running.returncode == 0, out + err
    assert back.rc == 0, "\n".join(back.failed_tasks) or back.output[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["host"] != "pi-2" and result["status"] == "succeeded", result
    assert result["kept_off"]["pi-2"].startswith("lost mid-task at "), result["kept_off"]
    requeued = result["started"] - stopped  # the new attempt's start (the containers share this machine's clock)
    print(f"pi-2 stopped; the task started on {result['host']} {requeued:.1f} s later")
    assert 0 < requeued <= 60, requeued

    # Exactly one result: on the host it ran on; pi-2, back, holds none committed, and the id run again runs
    # nothing and answers with that one.
    assert lab.exec(result["host"], f"test -d {result['path']}").returncode == 0
    assert lab.exec("pi-2", f"test -e {pi2_root}/{task_id}").returncode != 0
    again = spark("task", "run", str(spec), "--id", task_id, "--env", "lab", "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    rerun = json.loads(again.stdout.strip().splitlines()[-1])
    assert rerun["existing"] is True and (rerun["host"], rerun["path"]) == (result["host"], result["path"]), rerun
    assert lab.exec("pi-2", f"test -e {pi2_root}/{task_id}").returncode != 0

