"""A worker that dies mid-run (PrefectHQ/prefect#16746), with Prefect's own mechanisms as `spark flows deploy`
sets them up: a real server, a real process worker under the no-systemd supervisor, a run holding a repository
lock; `kill -9` of the worker. The run is marked Crashed within two heartbeat intervals, its lock's slot comes
free, the pool turns NOT_READY, the run is scheduled again, and a worker that comes back completes it once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lab_fleets import lab_fleet
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
from test_flows_deploy import free_port, start_server, wait_healthy

from primespark.context import FleetContext
from primespark.orchestration import supervise
from primespark.orchestration.deploy import DeployReport, ensure_automations
from primespark.orchestration.locks import LOCK_LEASE_SECONDS
from primespark.orchestration.material import auth_string

pytestmark = pytest.mark.slow

FLOW = '''
import pathlib, time
from prefect import flow
from primespark.orchestration.locks import hold

@flow(name="crashy")
def crashy(marker: str) -> int:
    path = pathlib.Path(marker)
    runs = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(runs))
    with hold("restic-crash-test"):
        if runs == 1:
            time.sleep(600)  # the first run hangs until its worker dies
    return runs
'''
HEARTBEAT = 30  # Prefect's minimum, the fleet's default


def until(what: str, predicate: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


@pytest.fixture
def setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path / "state"))
    ctx = FleetContext.load(lab_fleet(tmp_path, {"backend": "local"}))  # the lab's OpenBao runs only under lab up
    auth = auth_string(ctx)
    port = free_port()
    home = tmp_path / "server"
    home.mkdir()
    server = start_server(home, auth, port, ["127.0.0.1"])
    url = f"http://127.0.0.1:{port}/api"
    code = tmp_path / "code"
    code.mkdir()
    (code / "crashy.py").write_text(FLOW)
    sys.path.insert(0, str(code))
    try:
        wait_healthy(url, server, home)
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_API_AUTH_STRING: auth}):
            yield {"ctx": ctx, "url": url, "auth": auth, "code": code, "tmp": tmp_path}
    finally:
        sys.path.remove(str(code))
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def start_worker(setting: dict[str, Any], name: str) -> subprocess.Popen[bytes]:
    tmp: Path = setting["tmp"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SPARK_"))}
    env.update(PREFECT_API_URL=setting["url"], PREFECT_API_AUTH_STRING=setting["auth"],
               PREFECT_HOME=str(tmp / f"home-{name}"), PREFECT_WORKER_QUERY_SECONDS="1",
               PREFECT_WORKER_HEARTBEAT_SECONDS="5", PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(HEARTBEAT),
               PYTHONPATH=str(setting["code"]))
    prefect = Path(sys.executable).with_name("prefect")
    return subprocess.Popen(
        [sys.executable, "-m", "primespark.orchestration.supervise", "--name", "spark-test-worker", "--run-dir",
         str(tmp), "--log", str(tmp / f"{name}.log"), "--", str(prefect), "worker", "start", "--pool", "spark-test",
         "--type", "process", "--name", name], env=env, start_new_session=True)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_a_run_whose_worker_died_is_crashed_freed_rescheduled_and_completed_once(setting: dict[str, Any]) -> None:
    import crashy  # type: ignore[import-not-found]
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments import run_deployment
    from prefect.deployments.runner import EntrypointType
    from prefect.workers.process import ProcessWorker

    ctx: FleetContext = setting["ctx"]
    marker = setting["tmp"] / "runs"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="spark-test", type="process",
                                               base_job_template=ProcessWorker.get_default_base_job_template()))
        ensure_automations(client, ctx, DeployReport())
        crashy.crashy.to_deployment(
            "crashy-once", work_pool_name="spark-test", entrypoint_type=EntrypointType.MODULE_PATH,
            parameters={"marker": str(marker)}, tags=["fleet:lab", "crash-retries:1"]).apply()
        from primespark.orchestration.locks import ensure_locks

        ensure_locks(["restic-crash-test"])

        def state() -> Any:
            return client.read_flow_run(run.id).state

        def slots() -> int:
            return int(client.read_global_concurrency_limit_by_name("restic-crash-test").active_slots)

        worker = start_worker(setting, "worker-1")
        try:
            run = run_deployment("crashy/crashy-once", timeout=0, as_subflow=False)
            until("the run holds its lock", lambda: state().is_running() and slots() == 1, 120)
            killed = time.monotonic()
            (service,) = children(worker.pid)
            os.kill(service, signal.SIGKILL)  # the worker process only: the supervisor ends its runs
            worker.wait(timeout=60)
            crashed_states = until("Crashed", lambda: [s for s in client.read_flow_run_states(run.id)
                                                      if s.type.value == "CRASHED"], 2 * HEARTBEAT + 60)
            crashed_after = time.monotonic() - killed
            assert "no heartbeat" in (crashed_states[0].message or "")
            until("the lock's slot is free", lambda: slots() == 0, LOCK_LEASE_SECONDS + 60)
            freed_after = time.monotonic() - killed
            until("the pool is NOT_READY", lambda: client.read_work_pool("spark-test").status.value == "NOT_READY",
                  90)
            until("rescheduled", lambda: state().is_scheduled(), 60)
            assert state().name == "AwaitingRetry"
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
        back = start_worker(setting, "worker-2")
        try:
            until("completed on the worker that came back", lambda: state().is_completed(), 180)
        finally:
            # as a service stop does it: SIGTERM to the supervisor, SIGKILL to its group if not gone in 60 s (a
            # Prefect worker's graceful shutdown once took longer beside the lab tests, retrying its API calls)
            supervise.stop("spark-test-worker", setting["tmp"], timeout=60)
            back.wait(timeout=30)
        final = client.read_flow_run(run.id)
    print(f"crashed {crashed_after:.0f} s and slot freed {freed_after:.0f} s after kill -9 of the worker")
    assert final.run_count == 2 and marker.read_text() == "2"  # one crashed attempt, one completed: no third
    assert crashed_after < 2 * HEARTBEAT + 30 and freed_after < 120, (crashed_after, freed_after)
