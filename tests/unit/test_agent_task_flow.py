"""The `agent-task` flow on this machine: the local transport (every host is this machine, the hot tier a folder of
the test's), host facts from a facts file (no node exporter here), one Prefect test server."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from agent_fleets import agent_fleet
from lost_hosts import FAST, FolderHosts
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness
from test_agent_execute import Background, _locked, alive, until
from test_power_scripts import GUARD, power_profile, script

from flows.agent_task import agent_task, artifact_key
from primespark.agents import execute
from primespark.agents.execute import TaskRunFailed
from primespark.agents.placement import NoEligibleHost, NoEligibleHostInTime
from primespark.fleet import load_fleet
from primespark.fleet.model import TaskSpec
from primespark.hosts import LocalHosts
from primespark.orchestration.agent_runs import AgentRun, agent_runs

pytestmark = pytest.mark.slow
HOSTS = ("core-1", "kvm-1", "nas-1", "ops-1", "pi-1", "pi-2")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    state = tmp_path_factory.mktemp("state")
    state.chmod(0o700)
    old = os.environ.get("SPARK_STATE_DIR")
    os.environ["SPARK_STATE_DIR"] = str(state)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with prefect_test_harness(server_startup_timeout=120):
        yield
    if old is None:
        del os.environ["SPARK_STATE_DIR"]
    else:
        os.environ["SPARK_STATE_DIR"] = old


def facts_file(root: Path) -> str:
    """pi-1 and pi-2 can take tasks (pi-1 has more free); pi-1's quiet hours (23:00-06:00) are not now."""
    path = root / "facts.yaml"
    up = {"memory_free_mb": 3000, "on_mains": True, "worker_ready": True}
    path.write_text(yaml.safe_dump({
        "now": "2026-11-30T12:00:00Z",
        "hosts": {"pi-1": {**up, "cpus_free": 3.0}, "pi-2": {**up, "cpus_free": 2.0},
                  "nas-1": {"unavailable": "cannot reach nas-1 over SSH"}}}))
    return str(path)


def artifact(key: str) -> Any:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert found, f"no artifact {key!r}"
    return max(found, key=lambda a: str(a.created)).data


def flow_logs(state: Any) -> str:
    """What the run logged to the Prefect API (what the UI shows), flushed first."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        run_id = LogFilterFlowRunId(any_=[state.state_details.flow_run_id])
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=run_id))
    return "\n".join(log.message for log in logs)


def test_a_template_is_placed_run_and_committed_and_a_rerun_of_its_id_runs_nothing(
        server: None, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    fleet = agent_fleet(tmp_path, {"count": {"command": f'echo ran >> {runs}; echo counted > "$SPARK_TASK_OUTPUT/n"; '
                                                        'echo hello from the task',
                                            "cpus": 0.5, "memory_mb": 64}})
    facts = facts_file(tmp_path)
    state = agent_task(template="count", task_id="count-1", env=fleet, transport="local", facts_file=facts,
                       return_state=True)
    result = state.result()
    assert (result["host"], result["status"], result["attempts"]) == ("pi-1", "succeeded", 1)
    assert result["path"] == str(tmp_path / "hot" / "tasks" / "count-1")
    assert "3.0 CPUs free" in result["why"]
    assert (tmp_path / "hot" / "tasks" / "count-1" / "out" / "n").read_text() == "counted\n"
    rows = json.loads(artifact(f"{artifact_key('count-1')}-placement"))
    verdicts = {r["host"]: (r["verdict"], r["why"]) for r in rows}
    assert set(verdicts) == set(HOSTS)
    assert verdicts["pi-1"][0] == "chosen" and verdicts["pi-2"][0] == "eligible"
    assert verdicts["nas-1"] == ("excluded", "facts unavailable: cannot reach nas-1 over SSH")
    assert verdicts["kvm-1"] == ("excluded", "a KVM host runs VMs, not tasks")
    assert "succeeded" in artifact(f"{artifact_key('count-1')}-result")
    assert "pi-1 stdout: hello from the task" in flow_logs(state)
    again = agent_task(template="count", task_id="count-1", env=fleet, transport="local", facts_file=facts)
    assert again["existing"] and again["attempts"] == 0 and again["path"] == result["path"]
    assert runs.read_text() == "ran\n"


def test_a_run_whose_labels_the_server_refuses_still_runs_its_task_and_says_so(
        server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefect's server on SQLite answers the labels request 503 under concurrent writes (seen in CI with five
    tasks submitted at once): the labels are bookkeeping, so the task runs and the run warns."""
    import httpx
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.exceptions import PrefectHTTPStatusError

    def busy(self: Any, flow_run_id: Any, labels: dict[str, Any]) -> None:
        request = httpx.Request("PATCH", f"http://prefect.invalid/api/flow_runs/{flow_run_id}/labels")
        response = httpx.Response(503, json={"exception_message": "Service Unavailable"}, request=request)
        raise PrefectHTTPStatusError.from_httpx_error(httpx.HTTPStatusError(
            "Server error '503 Service Unavailable'", request=request, response=response))

    monkeypatch.setattr(SyncPrefectClient, "update_flow_run_labels", busy)
    fleet = agent_fleet(tmp_path, {"hello": {"command": "echo hi", "cpus": 0.5, "memory_mb": 64}})
    state = agent_task(template="hello", task_id="unlabelled-1", env=fleet, transport="local",
                       facts_file=facts_file(tmp_path), return_state=True)
    assert state.is_completed(), state
    assert state.result()["status"] == "succeeded"
    logs = flow_logs(state)
    assert "labels primespark.task.cpus, primespark.task.host" in logs
    assert "503 Service Unavailable" in logs and "the task goes on" in logs


def test_a_failing_inline_task_is_placed_again_per_its_retries_and_fails_with_its_exit_code(
        server: None, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    fleet = agent_fleet(tmp_path)
    spec = TaskSpec(command=f"echo try >> {runs}; echo no model file >&2; exit 7", retries=1, memory_mb=64)
    state = agent_task(spec=spec, name="embed", task_id="embed-1", env=fleet, transport="local",
                       facts_file=facts_file(tmp_path), return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, TaskRunFailed)
    assert error.returncode == 7
    assert "exited 7" in error.message and "no model file" in error.message
    assert runs.read_text() == "try\ntry\n"  # the spec's one retry, placed again
    assert not (tmp_path / "hot" / "tasks" / "embed-1").exists()
    assert "failed" in artifact(f"{artifact_key('embed-1')}-result")


def test_an_inline_spec_no_host_can_run_is_refused_with_its_reason(server: None, tmp_path: Path) -> None:
    fleet = agent_fleet(tmp_path)
    spec = TaskSpec(command="true", memory_mb=100_000)
    state = agent_task(spec=spec, name="huge", task_id="huge-1", env=fleet, transport="local",
                       facts_file=facts_file(tmp_path), return_state=True)
    assert state.is_failed()
    assert "inline task huge" in str(state.result(raise_on_failure=False))


def busy_facts(root: Path) -> Path:
    """pi-1 and pi-2 up with too few CPUs free for a task of 0.5; the other hosts' facts unread: no host can take
    it now, every one of them may later."""
    path = root / "busy.yaml"
    path.write_text(yaml.safe_dump({"now": "2026-11-30T12:00:00Z", "hosts": {
        host: {"cpus_free": 0.2, "memory_free_mb": 3000} for host in ("pi-1", "pi-2")}}))
    return path


def test_a_task_no_host_can_take_now_waits_for_one_and_runs_once_one_frees_up(
        server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from test_task_cli import spark

    fleet = agent_fleet(tmp_path, {"hello": {"command": "echo hi", "cpus": 0.5, "memory_mb": 64}})
    facts = busy_facts(tmp_path)
    thread, states = in_background(template="hello", task_id="queued-1", env=fleet, transport="local",
                                   facts_file=str(facts), poll_seconds=1, wait_seconds=120)

    def waiting() -> bool:
        try:
            rows = json.loads(artifact(f"{artifact_key('queued-1')}-placement"))
        except AssertionError:  # none published yet
            return False
        return all(r["verdict"] == "excluded" for r in rows)

    def listed() -> AgentRun | None:
        return next((r for r in agent_runs(fleet) if r.task_id == "queued-1"), None)

    try:
        until(waiting, "the run waits for a host", seconds=60)
        # `spark task ls` says why it waits (the label follows the artifact)
        until(lambda: (run := listed()) is not None and run.waiting is not None, "the run's waiting label", 30)
        run = listed()
        assert run is not None and run.waiting is not None and run.host is None
        assert re.match(r"since \d\d:\d\d:\d\d: ", run.waiting), run.waiting
        assert "pi-1, pi-2: 0.2 CPUs free, the task needs 0.5" in run.waiting, run.waiting
        monkeypatch.delenv("PREFECT_API_URL", raising=False)  # the harness's server, as a Prefect profile would say
        code, out, err = spark(monkeypatch, capsys, "task", "ls", "--env", fleet)
        assert code == 0, out + err
        header = next(line for line in out.splitlines() if "task id" in line)
        row = next(line for line in out.splitlines() if line.startswith("│ queued-1"))
        assert header.split("┃")[-2].strip() == "waiting" and row.split("│")[-2].strip().startswith("since "), out
    finally:  # the run ends whatever the checks above said
        facts.write_text(Path(facts_file(tmp_path)).read_text())  # pi-1 has 3 CPUs free now
        thread.join(120)
    [state] = states
    result = state.result()
    assert (result["host"], result["status"], result["attempts"]) == ("pi-1", "succeeded", 1)
    run = listed()
    assert run is not None and (run.host, run.state, run.waiting) == ("pi-1", "Completed", None)
    logs = flow_logs(state)
    assert "task queued-1: no host can run it now; waiting for one (placed again every 1 s" in logs
    assert "pi-1: excluded, 0.2 CPUs free, the task needs 0.5" in logs


def test_a_task_no_host_can_ever_take_or_told_not_to_wait_fails_at_once(server: None, tmp_path: Path) -> None:
    fleet = agent_fleet(tmp_path)
    facts = str(busy_facts(tmp_path))
    told = agent_task(spec=TaskSpec(command="true", cpus=0.5, memory_mb=64), name="now", task_id="now-1", env=fleet,
                      transport="local", facts_file=facts, wait_seconds=0, return_state=True)
    error = told.result(raise_on_failure=False)
    assert type(error) is NoEligibleHost and "pi-1: excluded, 0.2 CPUs free" in error.message, error
    # a Pi's task on the cloud's worker: the cloud's hosts are x86_64, the edge's out of the worker's reach, so
    # waiting cannot help, however long it may wait (a spec no host of the fleet can run is refused before this)
    never = agent_task(spec=TaskSpec(command="true", memory_mb=64, arch=["aarch64"]), name="arm", task_id="arm-1",
                       env=fleet, transport="local", facts_file=facts, wait_seconds=600, site="cloud",
                       return_state=True)
    error = never.result(raise_on_failure=False)
    assert type(error) is NoEligibleHost, error
    assert "core-1: excluded, architecture x86_64, the task needs aarch64" in error.message
    assert "pi-1: excluded, not reached by site cloud's worker" in error.message
    assert "waiting for one" not in flow_logs(told) + flow_logs(never)


def test_a_sites_run_places_among_the_sites_hosts_only_and_says_why_of_the_others(server: None,
                                                                                   tmp_path: Path) -> None:
    """`agent-task-<site>` runs on that site's worker, whose key reaches the site's hosts only: on the edge pi-2,
    though ops-1 has more free, which is kept off with the reason; on the cloud a cloud host, though the task prefers
    the edge; an unknown site stops the run."""
    fleet = agent_fleet(tmp_path, {"hello": {"command": "echo hello", "memory_mb": 64}})
    facts = tmp_path / "facts.yaml"
    up = {"memory_free_mb": 3000}
    facts.write_text(yaml.safe_dump({"now": "2026-11-30T12:00:00Z", "hosts": {
        "pi-2": {**up, "cpus_free": 1.0}, "ops-1": {**up, "cpus_free": 3.5}, "core-1": {**up, "cpus_free": 3.5}}}))
    done = agent_task(template="hello", task_id="site-1", env=fleet, transport="local", facts_file=str(facts),
                      site="edge")
    assert done["host"] == "pi-2", done
    rows = {row["host"]: row for row in json.loads(artifact(f"{artifact_key('site-1')}-placement"))}
    assert rows["ops-1"]["verdict"] == "excluded", rows["ops-1"]
    assert rows["ops-1"]["why"] == "not reached by site edge's worker (this run places on its hosts)", rows
    cloud = agent_task(template="hello", task_id="site-2", env=fleet, transport="local", facts_file=str(facts),
                       site="cloud")
    assert cloud["host"] == "core-1", cloud  # the edge preferred, but not the cloud worker's to reach

    wrong = agent_task(template="hello", task_id="site-3", env=fleet, transport="local", facts_file=str(facts),
                       site="moon", return_state=True)
    assert wrong.is_failed() and "has no site 'moon'" in str(wrong.result(raise_on_failure=False))


def only_pi1(root: Path) -> str:
    path = root / "pi-1-only.yaml"
    path.write_text(yaml.safe_dump({"now": "2026-11-30T12:00:00Z", "hosts": {
        "pi-1": {"cpus_free": 3.0, "memory_free_mb": 3000}}}))
    return str(path)


def test_a_killed_attempt_still_running_on_another_host_is_stopped_before_the_task_runs_again(
        server: None, tmp_path: Path) -> None:
    fleet_file = agent_fleet(tmp_path)
    fleet = load_fleet(fleet_file)
    staging = tmp_path / "hot" / "tasks" / ".staging" / "left-1"
    first = Background(fleet, "pi-2", "left-1", TaskSpec(command='echo $$ > "$SPARK_TASK_OUTPUT/pid"; sleep 300'))
    until(lambda: (staging / "run.json").exists() and (staging / "out" / "pid").exists(), "the first attempt ran")
    os.kill(json.loads((staging / "run.json").read_text())["monitor_pid"], signal.SIGKILL)
    first.join()
    orphan = int((staging / "out" / "pid").read_text())
    assert alive(orphan)
    state = agent_task(spec=TaskSpec(command="echo again"), name="left", task_id="left-1", env=fleet_file,
                       transport="local", facts_file=only_pi1(tmp_path), return_state=True)
    result = state.result()
    assert (result["host"], result["status"]) == ("pi-1", "succeeded")
    assert not alive(orphan), "the killed attempt's command ran on beside the new one"
    assert "a killed attempt still runs on pi-2" in flow_logs(state)


def test_a_cancelled_task_fails_its_run_and_is_not_tried_again(server: None, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    fleet_file = agent_fleet(tmp_path)
    staging = tmp_path / "hot" / "tasks" / ".staging" / "stop-1"
    spec = TaskSpec(command=f"echo try >> {runs}; sleep 300", retries=2)
    states: list[Any] = []
    thread = threading.Thread(target=lambda: states.append(agent_task(
        spec=spec, name="stop", task_id="stop-1", env=fleet_file, transport="local",
        facts_file=only_pi1(tmp_path), return_state=True)), daemon=True)
    thread.start()
    until(lambda: (staging / "run.json").exists(), "the task started")
    [found], _ = execute.cancel_task(LocalHosts(), load_fleet(fleet_file), "stop-1", fleet_file, grace_seconds=2)
    assert found.found == "running"
    thread.join(60)
    [state] = states
    assert state.is_failed() and "was cancelled" in str(state.result(raise_on_failure=False))
    assert runs.read_text() == "try\n"


def test_a_task_stopped_for_power_is_placed_again_on_fresh_facts_without_using_a_retry(
        server: None, tmp_path: Path) -> None:
    """spark-ups-guard stops the task on pi-1 (a low battery) and drains pi-1: the next placement reads pi-1 drained
    (the facts file stands for the live reading of its marker) and runs the task on pi-2; retries 0 is enough."""
    hosts = tmp_path / "hosts"
    fleet_file = agent_fleet(tmp_path)
    facts = facts_file(tmp_path)
    record = tmp_path / "hot" / "tasks" / ".staging" / "power-1.running.json"
    spec = TaskSpec(command=f'echo "$SPARK_TASK_HOST" >> {hosts}; if [ "$SPARK_TASK_HOST" = pi-1 ]; then sleep 300; fi',
                    retries=0)
    states: list[Any] = []
    thread = threading.Thread(target=lambda: states.append(agent_task(
        spec=spec, name="power", task_id="power-1", env=fleet_file, transport="local", facts_file=facts,
        return_state=True)), daemon=True)
    thread.start()
    until(lambda: record.exists() and hosts.exists(), "the task started on pi-1")
    assert json.loads(record.read_text())["host"] == "pi-1"
    given = yaml.safe_load(Path(facts).read_text())
    given["hosts"]["pi-1"]["drained"] = True  # what the drain marker the guard writes makes of pi-1's facts
    Path(facts).write_text(yaml.safe_dump(given))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    guard = script(GUARD, run_dir, "--config", str(power_profile(tmp_path)), "--battery", "5", "--grace", "2")
    assert guard.returncode == 2, guard.stdout + guard.stderr
    thread.join(120)
    [state] = states
    result = state.result()
    assert (result["host"], result["status"], result["attempts"]) == ("pi-2", "succeeded", 2)
    assert hosts.read_text() == "pi-1\npi-2\n"
    logs = flow_logs(state)
    assert "was stopped by spark-ups-guard: battery 5%" in logs and "(retries kept)" in logs
    rows = json.loads(artifact(f"{artifact_key('power-1')}-placement"))
    assert {r["host"]: r["verdict"] for r in rows}["pi-1"] == "excluded"


def test_ls_lists_the_environments_runs_newest_first_with_their_host_and_state(
        server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`spark task ls` on the test server: this test's runs only (the module's other tests ran in fleets of their
    own), the host from the run's labels, `--state` read by the server."""
    from test_task_cli import spark

    fleet = agent_fleet(tmp_path, {"hello": {"command": "echo hello", "memory_mb": 64}})
    facts = facts_file(tmp_path)
    assert agent_task(template="hello", task_id="ls-ok", env=fleet, transport="local", facts_file=facts)["host"] \
        == "pi-1"
    failed = agent_task(spec=TaskSpec(command="exit 3", memory_mb=64), name="bad", task_id="ls-bad", env=fleet,
                        transport="local", facts_file=facts, return_state=True)
    assert failed.is_failed()
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # the harness's server, as a Prefect profile would say

    code, out, err = spark(monkeypatch, capsys, "task", "ls", "--env", fleet)
    assert code == 0, out + err
    rows = [line.split("│")[1:-1] for line in out.splitlines() if line.startswith("│")]
    assert [[cell.strip() for cell in row[:4]] for row in rows] == [
        ["ls-bad", "bad (inline)", "Failed", "pi-1"], ["ls-ok", "hello", "Completed", "pi-1"]], out
    assert all(row[4].strip().endswith("UTC") and row[5].strip().endswith(" s") for row in rows), out

    code, out, _ = spark(monkeypatch, capsys, "task", "ls", "--env", fleet, "--state", "failed")
    assert code == 0 and "ls-bad" in out and "ls-ok" not in out
    code, out, _ = spark(monkeypatch, capsys, "task", "ls", "--env", fleet, "--state", "running")
    assert code == 0 and "no agent-task runs (running) of" in out


def test_the_queue_is_the_fleets_runs_placed_within_the_last_minute_and_still_running(
        server: None, tmp_path: Path) -> None:
    """What live placement takes off the hosts' facts (their node_load1 does not hold these tasks yet): read from
    the runs' labels on the server, as the flow writes them when it places an attempt."""
    import time
    from uuid import UUID

    from prefect import flow
    from prefect.states import Completed, Running

    from primespark.agents.placement import Placed
    from primespark.orchestration.agent_runs import FLOW, TASK_ID_LABEL, placement_labels, recently_placed

    (tmp_path / "other").mkdir()
    fleet, other = agent_fleet(tmp_path), agent_fleet(tmp_path / "other")

    @flow(name=FLOW)
    def fake(env: str = "lab") -> None:
        pass

    now = time.time()

    def made(env: str, labels: dict[str, str], *states: Any) -> str:
        with get_client(sync_client=True) as client:
            run = client.create_flow_run(fake, parameters={"env": env})
            client.update_flow_run_labels(UUID(str(run.id)), labels)
            for state in states:
                client.set_flow_run_state(run.id, state, force=True)
        return str(run.id)

    made(fleet, placement_labels("pi-1", 0.5, 256, now - 5), Running())
    mine = made(fleet, placement_labels("pi-2", 1, 64, now - 1), Running())  # the run asking
    made(fleet, placement_labels("pi-2", 2, 64, now - 90), Running())  # its load is in node_load1 by now
    made(fleet, placement_labels("pi-1", 2, 64, now - 5), Running(), Completed())  # ended
    made(other, placement_labels("pi-1", 2, 64, now - 5), Running())  # another fleet's
    made(fleet, {TASK_ID_LABEL: "not-placed-yet"}, Running())
    assert recently_placed(fleet, now, exclude=mine) == [Placed("pi-1", 0.5, 256)]
    assert set(recently_placed(fleet, now)) == {Placed("pi-1", 0.5, 256), Placed("pi-2", 1.0, 64)}


def test_two_tasks_placed_at_the_same_instant_do_not_both_take_a_host_that_fits_one(
        server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both runs read the tasks placed (none) before either has written its own, so both decide on pi-1, the
    freest, which has room for one: the claim, under pi-1's lock, sends the second to pi-2."""
    import primespark.agents.facts as facts_module

    runs, release = tmp_path / "runs", tmp_path / "release"
    facts_path = tmp_path / "live.yaml"
    up = {"memory_free_mb": 3000, "on_mains": True, "worker_ready": True}
    facts_path.write_text(yaml.safe_dump({"hosts": {"pi-1": {**up, "cpus_free": 1.5}, "pi-2": {**up, "cpus_free": 1.2},
                                                    "nas-1": {"unavailable": "not in this test"}}}))
    both_read = threading.Barrier(2, timeout=60)
    reads: list[str] = []

    def live_facts(ctx: Any, spec: TaskSpec, connect: bool = True, within: Any = None) -> tuple[Any, str]:
        reads.append(threading.current_thread().name)
        if len(reads) <= 2:  # each run's first read waits for the other's: neither has placed anything yet
            with contextlib.suppress(threading.BrokenBarrierError):
                both_read.wait()
        return facts_module.load_facts_file(facts_path).facts(ctx.fleet, str(facts_path))[0], "the test's"

    monkeypatch.setattr(facts_module, "live_facts", live_facts)
    fleet = agent_fleet(tmp_path)
    spec = TaskSpec(command=f'echo "$SPARK_TASK_HOST" >> {runs}; while [ ! -e {release} ]; do sleep 0.05; done',
                    cpus=1, memory_mb=64, power={"run_in_quiet_hours": True})  # (whatever the hour)
    started = [in_background(spec=spec, name="one-cpu", task_id=f"same-instant-{i}", env=fleet, transport="local",
                             poll_seconds=1, wait_seconds=60) for i in (1, 2)]
    try:
        until(lambda: runs.exists() and len(runs.read_text().split()) == 2, "both tasks started", seconds=120)
    finally:  # the runs end whatever the check said
        release.touch()
        for thread, _ in started:
            thread.join(120)
    assert sorted(runs.read_text().split()) == ["pi-1", "pi-2"], runs.read_text()
    states = [state for _, got in started for state in got]
    assert [s.result()["status"] for s in states] == ["succeeded", "succeeded"]
    logs = [flow_logs(state) for state in states]
    assert sum("pi-1 was taken meanwhile by tasks placed at the same moment" in log for log in logs) == 1, logs


def test_the_flow_parameters_give_the_prefect_ui_a_typed_form_for_an_inline_task() -> None:
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(agent_task).model_dump()
    assert list(schema["properties"])[:4] == ["template", "spec", "name", "task_id"]
    fields = schema["definitions"]["TaskSpec"]["properties"]
    assert {"command", "cpus", "memory_mb", "arch", "labels", "data", "timeout_minutes", "retries", "power"} <= set(
        fields)
    assert fields["cpus"]["type"] == "number" and fields["retries"]["maximum"] == 10
    assert schema["properties"]["transport"]["enum"] == ["ssh", "local"]


def test_the_cancellation_hook_stops_the_task_of_the_cancelled_run(tmp_path: Path) -> None:
    """Called as Prefect calls it on a cancelled run (the run's parameters and id); its firing from a worker on a
    UI cancel is not tested here (the flow has no deployment)."""
    from types import SimpleNamespace

    from flows.agent_task import default_task_id, stop_on_host

    fleet_file = agent_fleet(tmp_path)
    run_id = "5f0c2a9e-1111-2222-3333-444455556666"
    task_id = default_task_id(None, "embed", run_id)
    assert task_id == "embed-5f0c2a9e"
    staging = tmp_path / "hot" / "tasks" / ".staging" / task_id
    running = Background(load_fleet(fleet_file), "pi-1", task_id, TaskSpec(command="sleep 300"), grace_seconds=1)
    until(lambda: (staging / "run.json").exists(), "the task started")
    stop_on_host(None, SimpleNamespace(id=run_id, parameters={"spec": {"command": "sleep 300"}, "name": "embed",
                                                              "env": fleet_file, "transport": "local"}), None)
    running.join()
    assert running.result is not None and running.result.status == "cancelled"
    # a run cancelled before its task started anywhere: nothing to stop, and no error
    stop_on_host(None, SimpleNamespace(id=run_id.replace("5f", "6f"), parameters={
        "template": "x", "env": fleet_file, "transport": "local"}), None)


@pytest.fixture
def lossy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FolderHosts]:
    """Hosts that can drop off (each in a folder of its own), watched on the scaled-down liveness budget; a task
    left waiting on a lost host is released at the end."""
    hosts = FolderHosts(tmp_path / "hosts")
    monkeypatch.setattr("primespark.context.LocalHosts", lambda: hosts)
    monkeypatch.setattr(execute, "LIVENESS", FAST)
    yield hosts
    (tmp_path / "release").touch()


def waits_on_pi1(tmp_path: Path, **fields: Any) -> TaskSpec:
    """A task that notes each host it starts on and, on pi-1, runs until the file `release` exists."""
    runs, release = tmp_path / "runs", tmp_path / "release"
    return TaskSpec(command=f'echo "$SPARK_TASK_HOST" >> {runs}; echo started; if [ "$SPARK_TASK_HOST" = pi-1 ]; '
                            f'then while [ ! -e {release} ]; do sleep 0.05; done; fi; '
                            f'echo "$SPARK_TASK_HOST" > "$SPARK_TASK_OUTPUT/who"', memory_mb=64, **fields)


def in_background(**parameters: Any) -> tuple[threading.Thread, list[Any]]:
    states: list[Any] = []
    thread = threading.Thread(target=lambda: states.append(agent_task(**parameters, return_state=True)), daemon=True)
    thread.start()
    return thread, states


def test_a_host_lost_mid_task_is_kept_off_and_the_task_runs_once_elsewhere_even_when_the_lost_one_finishes(
        server: None, tmp_path: Path, lossy: FolderHosts) -> None:
    runs, release = tmp_path / "runs", tmp_path / "release"
    fleet = agent_fleet(tmp_path)
    spec = waits_on_pi1(tmp_path, retries=0)  # a lost host is no failure: no retry is needed to run elsewhere
    parameters = {"spec": spec, "name": "lost", "task_id": "lost-1", "env": fleet, "transport": "local",
                  "facts_file": facts_file(tmp_path)}
    thread, states = in_background(**parameters)
    until(lambda: runs.exists() and runs.read_text() == "pi-1\n", "the task started on pi-1")
    lossy.cut("pi-1")  # pi-1 drops off the network, the task still running there
    thread.join(120)
    [state] = states
    result = state.result()
    assert (result["host"], result["status"], result["attempts"]) == ("pi-2", "succeeded", 2)
    lost = result["kept_off"]["pi-1"]
    assert re.fullmatch(r"lost mid-task at \d\d:\d\d:\d\d", lost), lost
    # the second attempt's decision table names the lost host with its reason
    rows = json.loads(artifact(f"{artifact_key('lost-1')}-placement"))
    verdicts = {r["host"]: (r["verdict"], r["why"]) for r in rows}
    assert verdicts["pi-1"] == ("excluded", lost) and verdicts["pi-2"][0] == "chosen"
    logs = flow_logs(state)
    assert f"attempt 1: pi-1 {lost}" in logs and "not one of its retries" in logs
    assert (lossy.tasks("pi-2") / "lost-1" / "out" / "who").read_text() == "pi-2\n"
    # pi-1's run went on; it finishes late and commits nothing (no controller asks it to)
    release.touch()
    staging = lossy.tasks("pi-1") / ".staging" / "lost-1"
    until(lambda: (staging / "result.json").exists() and not _locked(staging.parent), "pi-1's run finished late")
    assert (staging / "out" / "who").read_text() == "pi-1\n"
    assert not (lossy.tasks("pi-1") / "lost-1").exists()
    # pi-1 back: a rerun of the id reports pi-2's result and discards pi-1's finished run: one result, two runs
    lossy.restore("pi-1")
    again = agent_task(**parameters)
    assert (again["host"], again["existing"], again["attempts"]) == ("pi-2", True, 0)
    assert [h for h in HOSTS if (lossy.tasks(h) / "lost-1").exists()] == ["pi-2"]
    assert not staging.exists()
    assert runs.read_text() == "pi-1\npi-2\n"


def test_a_lost_host_and_no_other_eligible_waits_for_one_then_fails_naming_every_reason(
        server: None, tmp_path: Path, lossy: FolderHosts) -> None:
    runs = tmp_path / "runs"
    fleet = agent_fleet(tmp_path)
    thread, states = in_background(spec=waits_on_pi1(tmp_path), name="alone", task_id="alone-1", env=fleet,
                                   transport="local", facts_file=only_pi1(tmp_path), poll_seconds=1,
                                   wait_seconds=3)
    until(lambda: runs.exists(), "the task started on pi-1")
    lossy.cut("pi-1")
    thread.join(120)
    [state] = states
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, NoEligibleHostInTime), error
    assert "no host could run it again within 3 s of waiting" in error.message
    assert re.search(r"pi-1: excluded, lost mid-task at \d\d:\d\d:\d\d", error.message)
    assert "pi-2: excluded, facts unavailable" in error.message and "--id alone-1" in error.fix
    logs = flow_logs(state)
    assert "task alone-1: no host can run it now; waiting for one (placed again every 1 s" in logs
    assert runs.read_text() == "pi-1\n"


def test_a_task_waiting_after_a_host_loss_runs_once_a_host_is_eligible(
        server: None, tmp_path: Path, lossy: FolderHosts) -> None:
    runs = tmp_path / "runs"
    fleet = agent_fleet(tmp_path)
    facts = only_pi1(tmp_path)
    thread, states = in_background(spec=waits_on_pi1(tmp_path), name="later", task_id="later-1", env=fleet,
                                   transport="local", facts_file=facts, poll_seconds=1,
                                   wait_seconds=60)

    def waiting() -> bool:
        try:
            rows = json.loads(artifact(f"{artifact_key('later-1')}-placement"))
        except AssertionError:  # none published yet
            return False
        return any(r["host"] == "pi-1" and r["why"].startswith("lost mid-task") for r in rows)

    until(lambda: runs.exists(), "the task started on pi-1")
    lossy.cut("pi-1")
    until(waiting, "the run waits for a host", seconds=60)
    Path(facts).write_text(Path(facts_file(tmp_path)).read_text())  # pi-2 can take tasks now
    thread.join(120)
    [state] = states
    result = state.result()
    assert (result["host"], result["status"], result["attempts"]) == ("pi-2", "succeeded", 2)
    assert runs.read_text() == "pi-1\npi-2\n"
