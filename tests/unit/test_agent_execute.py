"""Agent tasks run on this machine standing in for the fleet's hosts (`LocalHosts`, as the tier and sync tests):
the real host-side script, real processes, a hot tier in the test's folder. Every wait polls for its condition."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from agent_fleets import agent_fleet
from lost_hosts import FAST, FolderHosts

from primespark.agents import execute, taskside
from primespark.errors import StepFailed, UserError
from primespark.fleet import Fleet, load_fleet
from primespark.fleet.model import TaskSpec
from primespark.hosts import (
    CommandTimeout,
    Connection,
    HostLost,
    HostUnreachable,
    LocalHosts,
    LocalRunner,
    Runner,
    SshRunner,
    stream,
)


# A guard against a hang, not a speed target: `make test` runs the unit tests at a low priority beside the lab
# tests, where a stopped or signalled process can wait tens of seconds for a core.
def until(condition: Callable[[], bool], what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """The process exists and has not ended (a zombie has: only its parent's wait is left)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return load_fleet(agent_fleet(tmp_path))


def tasks_root(tmp_path: Path) -> Path:
    return tmp_path / "hot" / "tasks"


class Background:
    """`run_task` in a thread, for what happens while it runs."""

    def __init__(self, fleet: Fleet, host: str, task_id: str, task: TaskSpec, **kwargs: Any) -> None:
        self.result: execute.TaskResult | None = None
        self.error: BaseException | None = None

        def work() -> None:
            try:
                self.result = execute.run_task(LocalHosts(), fleet, host, task_id, task, **kwargs)
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=work, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join(60)
        assert not self.thread.is_alive(), "the run did not end"


def test_results_live_in_the_hot_tier_or_the_fallback_folder(fleet: Fleet, tmp_path: Path) -> None:
    assert execute.results_root(fleet, "pi-1") == f"{tmp_path}/hot/tasks"
    assert execute.results_root(fleet, "core-1") == execute.FALLBACK_ROOT == "/var/lib/primespark/tasks"
    with pytest.raises(UserError, match="not a plain name"):
        execute.check_task_id("../etc")
    made = execute.new_task_id("Summarise Readings")
    assert made.startswith("summarise-readings-") and execute.TASK_ID.match(made)


def test_a_task_runs_and_its_result_is_committed_once(fleet: Fleet, tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    task = TaskSpec(command=f'echo ran >> {marker}; echo hello; echo 42 > "$SPARK_TASK_OUTPUT/answer"',
                    cpus=0.5, memory_mb=64)
    result = execute.run_task(LocalHosts(), fleet, "pi-1", "t-1", task)
    root = tasks_root(tmp_path)
    assert (result.status, result.returncode, result.existing) == ("succeeded", 0, False)
    assert result.path == str(root / "t-1")
    assert (root / "t-1" / "out" / "answer").read_text() == "42\n"
    assert (root / "t-1" / "stdout.log").read_text() == "hello\n" == result.stdout_tail
    assert not (root / ".staging" / "t-1").exists()
    # limits are either enforced, and how, or not, and why: never silently left out
    assert result.limits.startswith(("enforced by ", "not enforced: ")) and len(result.limits) > 20
    # a rerun of the id runs nothing and reports the committed result
    again = execute.run_task(LocalHosts(), fleet, "pi-1", "t-1", task)
    assert again.existing and again.status == "succeeded" and again.path == result.path
    assert again.started == result.started
    assert marker.read_text() == "ran\n"
    assert sorted(p.name for p in root.iterdir()) == [".staging", "t-1"]


def test_a_running_task_has_a_record_beside_its_staging_folder_for_the_power_scripts(fleet: Fleet,
                                                                                     tmp_path: Path) -> None:
    record = tasks_root(tmp_path) / ".staging" / ("t-rec" + taskside.RUNNING_SUFFIX)
    go = tmp_path / "go"
    task = TaskSpec(command=f"while [ ! -e {go} ]; do sleep 0.05; done; exit 4",
                    power={"run_in_quiet_hours": True, "on_power_loss": "pause"})
    run = Background(fleet, "pi-1", "t-rec", task)
    until(record.exists, "the record is written")
    data = json.loads(record.read_text())
    assert data["task_id"] == "t-rec" and data["host"] == "pi-1" and data["pgid"] == data["pid"]
    assert data["staging"] == str(tasks_root(tmp_path) / ".staging" / "t-rec") and alive(data["monitor_pid"])
    assert data["power"] == {"run_in_quiet_hours": True, "min_battery_percent": 50, "on_power_loss": "pause"}
    go.touch()
    run.join()
    assert run.result is not None and run.result.status == "failed"
    assert not record.exists(), "the record outlived its run"


def test_a_failing_command_gives_its_exit_code_and_stderr_tail_and_commits_nothing(fleet: Fleet,
                                                                                  tmp_path: Path) -> None:
    task = TaskSpec(command="echo first line >&2; echo the real cause >&2; exit 3")
    result = execute.run_task(LocalHosts(), fleet, "pi-1", "t-fail", task)
    assert (result.status, result.returncode) == ("failed", 3)
    assert "the real cause" in result.stderr_tail
    assert not (tasks_root(tmp_path) / "t-fail").exists()
    assert result.path == str(tasks_root(tmp_path) / ".staging" / "t-fail")
    error = execute.failure(result)
    assert error.returncode == 3 and "exited 3" in error.message and "the real cause" in error.message


def test_a_task_past_its_timeout_is_killed_with_its_whole_process_group(fleet: Fleet, tmp_path: Path) -> None:
    # a child in the group, and one that left it (setsid): both end with the task
    task = TaskSpec(command='sleep 300 & echo $! > "$SPARK_TASK_OUTPUT/child"; '
                            'setsid sleep 300 & echo $! > "$SPARK_TASK_OUTPUT/escaped"; '
                            'trap "" TERM; sleep 300')
    started = time.monotonic()
    result = execute.run_task(LocalHosts(), fleet, "pi-1", "t-slow", task, grace_seconds=0.5, timeout_seconds=1)
    assert result.status == "timed-out"
    assert time.monotonic() - started < 30
    out = tasks_root(tmp_path) / ".staging" / "t-slow" / "out"
    pids = [int((out / name).read_text()) for name in ("child", "escaped")]
    assert not [p for p in pids if alive(p)], "a process of the task outlived its timeout"
    assert not alive(result.pid)
    assert not (tasks_root(tmp_path) / "t-slow").exists()


def test_a_run_killed_mid_task_leaves_only_staging_and_the_rerun_commits_exactly_one_result(
        fleet: Fleet, tmp_path: Path) -> None:
    hold = tmp_path / "hold"
    hold.touch()
    # the first run waits while `hold` exists; the rerun (hold gone) finishes
    task = TaskSpec(command=f'echo $$ > "$SPARK_TASK_OUTPUT/pid"; while [ -e {hold} ]; do sleep 0.05; done; '
                            f'echo done > "$SPARK_TASK_OUTPUT/done"')
    staging = tasks_root(tmp_path) / ".staging" / "t-kill"
    first = Background(fleet, "pi-1", "t-kill", task)
    until(lambda: (staging / "run.json").exists() and (staging / "out" / "pid").exists(), "the task started")
    record = yaml.safe_load((staging / "run.json").read_text())
    assert record["host"] == "pi-1" and record["pid"] > 0
    os.kill(record["monitor_pid"], signal.SIGKILL)  # the host-side runner dies, as on a worker or SSH loss
    first.join()
    assert isinstance(first.error, StepFailed) and first.result is None
    assert staging.is_dir() and not (tasks_root(tmp_path) / "t-kill").exists()
    orphan = int((staging / "out" / "pid").read_text())
    assert alive(orphan)  # left running by the killed runner: the rerun must end it
    hold.unlink()
    again = execute.run_task(LocalHosts(), fleet, "pi-1", "t-kill", task)
    assert again.status == "succeeded" and not again.existing
    assert not alive(orphan)
    committed = [p.name for p in tasks_root(tmp_path).iterdir() if p.name != ".staging"]
    assert committed == ["t-kill"]
    assert (tasks_root(tmp_path) / "t-kill" / "out" / "done").read_text() == "done\n"
    assert not staging.exists()


def test_cancel_stops_the_task_on_its_host_and_an_unknown_id_is_a_located_error(fleet: Fleet,
                                                                                tmp_path: Path) -> None:
    task = TaskSpec(command='sleep 300 & echo $! > "$SPARK_TASK_OUTPUT/child"; wait')
    staging = tasks_root(tmp_path) / ".staging" / "t-cancel"
    running = Background(fleet, "pi-1", "t-cancel", task, grace_seconds=2)
    until(lambda: (staging / "out" / "child").exists() and (staging / "run.json").exists(), "the task started")
    child = int((staging / "out" / "child").read_text())
    [cancelled], unasked = execute.cancel_task(LocalHosts(), fleet, "t-cancel", "fleet.yaml", grace_seconds=2)
    assert unasked == {}
    assert (cancelled.host, cancelled.found) == ("pi-1", "running")
    running.join()
    assert running.result is not None and running.result.status == "cancelled"
    assert not alive(child)
    assert not (tasks_root(tmp_path) / "t-cancel").exists()
    # asked again: it is known, and no longer running
    [again], _ = execute.cancel_task(LocalHosts(), fleet, "t-cancel", "fleet.yaml")
    assert again.found == "stopped"
    with pytest.raises(UserError, match=r"^fleet.yaml: no host knows task t-none \(asked: core-1, nas-1, ops-1, "
                                        r"pi-1, pi-2\)"):
        execute.cancel_task(LocalHosts(), fleet, "t-none", "fleet.yaml")


def test_a_second_run_of_a_running_id_is_refused_as_busy(fleet: Fleet, tmp_path: Path) -> None:
    hold = tmp_path / "hold"
    hold.touch()
    task = TaskSpec(command=f"while [ -e {hold} ]; do sleep 0.05; done")
    staging = tasks_root(tmp_path) / ".staging" / "t-busy"
    first = Background(fleet, "pi-1", "t-busy", task)
    until(lambda: (staging / "run.json").exists(), "the task started")
    with pytest.raises(execute.TaskBusy, match="running on pi-1 already"):
        execute.run_task(LocalHosts(), fleet, "pi-1", "t-busy", task)
    hold.unlink()
    first.join()
    assert first.result is not None and first.result.status == "succeeded"
    assert taskside.STAGING == ".staging"


def test_output_is_streamed_line_by_line_while_the_command_runs(fleet: Fleet, tmp_path: Path) -> None:
    go = tmp_path / "go"
    # the command goes on only once the test has seen its first line: collected-at-the-end output would never
    # let it, and the run would time out
    task = TaskSpec(command=f"echo first; echo warned >&2; while [ ! -e {go} ]; do sleep 0.05; done; echo second")
    seen: list[tuple[str, str]] = []

    def on_output(stream: str, line: str) -> None:
        seen.append((stream, line))
        if line == "first":
            go.touch()

    result = execute.run_task(LocalHosts(), fleet, "pi-1", "t-stream", task, timeout_seconds=20,
                              on_output=on_output)
    assert result.status == "succeeded"
    assert [line for stream, line in seen if stream == "stdout"] == ["first", "second"]
    assert ("stderr", "warned") in seen


def test_limits_use_systemd_run_then_cgroup_v2_then_say_why_not(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The choice of how limits are applied (what this machine has decides which path the runs above take; this
    checks each path's request, not the kernel's enforcement)."""
    monkeypatch.setattr(taskside, "SYSTEMD_BOOTED", str(tmp_path / "no-systemd"))
    monkeypatch.setattr(taskside, "CGROUP_ROOT", str(tmp_path / "no-cgroup2"))
    prefix, group, how = taskside._limits("t-1", 0.5, 128)
    assert (prefix, group) == ([], None)
    assert how == f"not enforced: systemd is not PID 1; no cgroup v2 at {tmp_path}/no-cgroup2"
    # cgroup v2: a folder of the task's own under primespark-tasks, its controllers on, cpu.max and memory.max set
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory\n")
    (root / "cgroup.subtree_control").write_text("")
    monkeypatch.setattr(taskside, "CGROUP_ROOT", str(root))
    prefix, group, how = taskside._limits("t-1", 0.5, 128)
    assert prefix == [] and group == str(root / "primespark-tasks" / "t-1")
    assert (root / "primespark-tasks" / "t-1" / "cpu.max").read_text() == "50000 100000"
    assert (root / "primespark-tasks" / "t-1" / "memory.max").read_text() == str(128 * 1024 * 1024)
    assert (root / "cgroup.subtree_control").read_text() == "+cpu +memory"
    assert how.startswith(f"enforced by cgroup v2 {group}: cpu.max 50000/100000, memory.max 128M")
    # systemd as PID 1, as root: a transient scope with CPUQuota and MemoryMax
    booted = tmp_path / "systemd"
    booted.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemd-run").write_text("#!/bin/sh\n")
    (bin_dir / "systemd-run").chmod(0o755)
    monkeypatch.setattr(taskside, "SYSTEMD_BOOTED", str(booted))
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    prefix, group, how = taskside._limits("t-1", 1.5, 512)
    assert prefix[:4] == ["systemd-run", "--scope", "--quiet", "--collect"] and group is None
    assert prefix[-5:] == ["-p", "CPUQuota=150%", "-p", "MemoryMax=512M", "--"]
    assert how == "enforced by systemd-run --scope: CPUQuota=150%, MemoryMax=512M"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert taskside._limits("t-2", 1, 64)[2].startswith("enforced by cgroup v2")  # not root: no system scope


class _Down:
    """A host that does not answer, as SshRunner reports it."""

    remote = True
    python = "python3"

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, argv: Any, *, env: Any = None, stdin: bytes | None = None, timeout: float | None = None) -> Any:
        raise HostUnreachable(f"cannot reach {self.name} (spark@{self.name}:22) over SSH: Connection refused")

    def pid_alive(self, pid: int) -> bool:
        raise AssertionError("not asked")


class _NasDown:
    def runner(self, host: str) -> Runner:
        return _Down(host) if host == "nas-1" else LocalRunner(host)


def test_a_host_down_fails_the_lookup_closed_but_not_a_cancel_elsewhere(fleet: Fleet, tmp_path: Path) -> None:
    with pytest.raises(HostUnreachable, match="cannot reach nas-1"):  # a result there would go unseen
        execute.find_task(_NasDown(), fleet, "t-x")
    with pytest.raises(UserError, match=r"no host knows task t-x \(asked: core-1, ops-1, pi-1, pi-2; could not "
                                        r"ask: nas-1: cannot reach nas-1"):
        execute.cancel_task(_NasDown(), fleet, "t-x", "fleet.yaml")
    hold = tmp_path / "hold"
    hold.touch()
    staging = tasks_root(tmp_path) / ".staging" / "t-x"
    running = Background(fleet, "pi-1", "t-x", TaskSpec(command=f"while [ -e {hold} ]; do sleep 0.05; done"))
    until(lambda: (staging / "run.json").exists(), "the task started")
    [found], unasked = execute.cancel_task(_NasDown(), fleet, "t-x", "fleet.yaml", grace_seconds=2)
    assert (found.host, found.found) == ("pi-1", "running") and list(unasked) == ["nas-1"]
    running.join()
    assert running.result is not None and running.result.status == "cancelled"


class _CloudDown:
    """A site worker's view: the cloud's hosts do not answer it (its key is authorised on the edge only)."""

    def runner(self, host: str) -> Runner:
        return _Down(host) if host in ("core-1", "ops-1") else LocalRunner(host)


def test_a_sites_lookup_and_cancel_ask_the_hosts_its_worker_reaches_only(fleet: Fleet) -> None:
    edge = {"pi-1", "pi-2", "nas-1"}
    with pytest.raises(HostUnreachable, match="cannot reach core-1"):  # every host: the cloud's fail it
        execute.find_task(_CloudDown(), fleet, "t-y")
    assert execute.find_task(_CloudDown(), fleet, "t-y", within=edge) == []
    with pytest.raises(UserError, match=r"no host knows task t-y \(asked: nas-1, pi-1, pi-2\)"):
        execute.cancel_task(_CloudDown(), fleet, "t-y", "fleet.yaml", within=edge)


class _FakeSsh:
    """SshRunner with `ssh` on PATH replaced by a script that runs the remote command line here: the SSH runner's
    own command line (the host's `timeout`, stdin framing) and its streaming, without a network."""

    def runner(self, host: str) -> Runner:
        return SshRunner(Connection(host, "192.0.2.11", "root"))


def test_output_streams_through_the_ssh_runner_and_a_runner_without_streaming_gets_it_at_the_end(
        fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text('#!/bin/sh\nfor last; do :; done\nexec sh -c "$last"\n')
    (bin_dir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    go = tmp_path / "go"
    task = TaskSpec(command=f"echo first; while [ ! -e {go} ]; do sleep 0.05; done; echo second")
    seen: list[str] = []

    def on_output(stream: str, line: str) -> None:
        seen.append(line)
        if line == "first":
            go.touch()

    result = execute.run_task(_FakeSsh(), fleet, "pi-1", "t-ssh", task, timeout_seconds=20, on_output=on_output)
    assert result.status == "succeeded" and seen == ["first", "second"]
    # a runner with `run` only (no `stream`): the lines come when the command has ended, all of them
    lines: list[str] = []
    done = stream(_RunOnly(), ["sh", "-c", "echo a; echo b"], on_line=lines.append)
    assert done.returncode == 0 and lines == ["a", "b"]


class _RunOnly:
    remote = False
    python = sys.executable
    name = "pi-1"

    def run(self, argv: Any, *, env: Any = None, stdin: bytes | None = None, timeout: float | None = None) -> Any:
        return LocalRunner("pi-1").run(argv, env=env, stdin=stdin, timeout=timeout)

    def pid_alive(self, pid: int) -> bool:
        return alive(pid)


def test_a_host_lost_mid_task_is_lost_within_the_budget_and_its_late_finish_commits_nothing(
        fleet: Fleet, tmp_path: Path) -> None:
    """The host drops off mid-task (the stand-in stops passing anything back and answers no probe), while the task
    goes on there: the run ends with HostLost (not a failure, a timeout or a cancel) within the liveness budget, and
    when the task finishes later nothing is committed until a controller asks; a later run of the id commits it."""
    hosts = FolderHosts(tmp_path / "hosts")
    release = tmp_path / "release"
    task = TaskSpec(command=f'echo started; while [ ! -e {release} ]; do sleep 0.05; done; echo late > '
                            f'"$SPARK_TASK_OUTPUT/who"')
    cut: list[float] = []

    def on_output(stream: str, line: str) -> None:
        if line == "started":
            hosts.cut("pi-1")
            cut.append(time.monotonic())

    with pytest.raises(HostLost) as lost:
        execute.run_task(hosts, fleet, "pi-1", "t-lost", task, timeout_seconds=120, on_output=on_output,
                         liveness=FAST)
    assert time.monotonic() - cut[0] <= FAST.within + 2
    assert lost.value.host == "pi-1" and "was lost mid-command" in lost.value.message
    assert not isinstance(lost.value, execute.TaskRunFailed | CommandTimeout)
    root = hosts.tasks("pi-1")
    staging = root / ".staging" / "t-lost"
    assert (staging / "run.json").exists() and not (staging / "result.json").exists()  # it still runs there
    release.touch()
    until(lambda: (staging / "result.json").exists(), "the task finished on the lost host")
    until(lambda: not list(_locked(root / ".staging")), "its host-side script ended")
    assert not (root / "t-lost").exists(), "the lost host committed a result nobody asked for"
    hosts.restore("pi-1")
    [found] = execute.find_task(hosts, fleet, "t-lost")
    assert (found.host, found.found) == ("pi-1", "finished")
    assert found.result is not None and found.result.status == "succeeded"
    # asked again, the host's finished run is its result: committed now, nothing runs again
    again = execute.run_task(hosts, fleet, "pi-1", "t-lost", task, liveness=FAST)
    assert (again.status, again.existing, again.path) == ("succeeded", True, str(root / "t-lost"))
    assert (root / "t-lost" / "out" / "who").read_text() == "late\n" and not staging.exists()


def _locked(folder: Path) -> list[str]:
    """Lock files of `folder` some process holds."""
    import fcntl

    held = []
    for lock in folder.glob("*.lock"):
        with lock.open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(lock.name)
    return held
