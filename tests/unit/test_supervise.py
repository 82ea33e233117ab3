"""The no-systemd service supervisor: a service's orphans die with it (as systemd's KillMode=control-group does),
status and stop work by name. Real processes, no stand-ins."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from primespark.orchestration.supervise import read_env_file, running

# A "worker" that starts a "flow run" in a session of its own (as Prefect's process worker does), writes both
# pids, and waits.
SERVICE = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
open(sys.argv[1], "w").write(f"{os.getpid()} {child.pid} {os.environ.get('SPARK_PROBE', '')}")
time.sleep(600)
"""


def wait_for(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def supervised(tmp_path: Path):  # type: ignore[no-untyped-def]
    pids = tmp_path / "pids"
    env_file = tmp_path / "service.env"
    env_file.write_text("# settings\nSPARK_PROBE=from-env-file\n")
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "primespark.orchestration.supervise", "--name", "spark-test-service",
         "--run-dir", str(tmp_path), "--env-file", str(env_file), "--log", str(tmp_path / "log"), "--",
         sys.executable, "-c", SERVICE, str(pids)], start_new_session=True)
    wait_for(lambda: pids.is_file() and len(pids.read_text().split()) == 3)
    service, flow_run, probe = pids.read_text().split()
    yield supervisor, int(service), int(flow_run), probe, tmp_path
    for pid in (int(service), int(flow_run), supervisor.pid):
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    supervisor.wait(timeout=10)


def test_kill_9_of_the_service_ends_the_run_it_started_and_the_supervisor(supervised) -> None:  # type: ignore[no-untyped-def]
    supervisor, service, flow_run, probe, run_dir = supervised
    assert probe == "from-env-file"
    assert running("spark-test-service", run_dir) == supervisor.pid
    os.kill(service, signal.SIGKILL)
    assert supervisor.wait(timeout=30) == 128 + signal.SIGKILL
    assert not alive(flow_run), "the flow run outlived its worker"
    assert running("spark-test-service", run_dir) is None
    assert "ended 1 processes" in (run_dir / "log").read_text()


DAEMONS = """
import os, sys, time
for _ in range(3):  # each daemonizes as ssh's ControlMaster does (fork, setsid, fork), lives briefly, exits
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            time.sleep(0.2)
            os._exit(0)
        os._exit(0)
    os.wait()
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(600)
"""


def test_daemons_the_service_started_are_reaped_when_they_exit(tmp_path: Path) -> None:
    noted = tmp_path / "service.pid"
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "primespark.orchestration.supervise", "--name", "spark-test-daemons",
         "--run-dir", str(tmp_path), "--", sys.executable, "-c", DAEMONS, str(noted)], start_new_session=True)
    try:
        wait_for(lambda: noted.is_file() and noted.read_text() != "")

        def children() -> list[str]:
            found = []
            for entry in Path("/proc").iterdir():
                try:
                    stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except (OSError, IndexError):
                    continue
                if int(stat[1]) == supervisor.pid:
                    found.append(stat[0])
            return found

        # the daemons were re-parented to the supervisor (a subreaper) and have exited: only the service is left
        wait_for(lambda: len(children()) == 1 and "Z" not in children())
    finally:
        os.killpg(supervisor.pid, signal.SIGKILL)
        supervisor.wait(timeout=10)


def test_stop_by_name_ends_the_service_and_what_it_started(supervised) -> None:  # type: ignore[no-untyped-def]
    supervisor, service, flow_run, _, run_dir = supervised
    status = [sys.executable, "-m", "primespark.orchestration.supervise", "--name", "spark-test-service",
              "--run-dir", str(run_dir)]
    assert subprocess.run([*status, "--status"]).returncode == 0
    assert subprocess.run([*status, "--stop"], timeout=60).returncode == 0
    supervisor.wait(timeout=30)
    assert not alive(service) and not alive(flow_run)
    assert subprocess.run([*status, "--status"]).returncode == 1


def test_env_files_are_read_as_systemd_reads_them(tmp_path: Path) -> None:
    path = tmp_path / "env"
    path.write_text("# a comment\n\nPREFECT_API_URL=http://10.99.0.2:4200/api\nAUTH=spark:a=b\n")
    assert read_env_file(path) == {"PREFECT_API_URL": "http://10.99.0.2:4200/api", "AUTH": "spark:a=b"}
