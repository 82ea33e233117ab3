"""The edge role's power scripts and the agent tasks running on their host: spark-ups-guard on a low battery and
spark-power at the start and end of quiet hours, run for real against tasks the task runner started here (the local
transport: pi-1 is this machine, its hot tier a folder of the test's). SPARK_RUN_DIR and --config point the scripts
at the test's folders instead of /run/spark and /etc/spark."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_fleets import agent_fleet
from test_agent_execute import Background, alive, tasks_root, until

from primespark.agents import execute, taskside
from primespark.agents.facts import DrainNote
from primespark.agents.taskside import RUNNING_SUFFIX
from primespark.fleet import Fleet, load_fleet
from primespark.fleet.model import TaskSpec
from primespark.hosts import LocalHosts

REPO = Path(__file__).resolve().parents[2]
POWER = REPO / "roles/edge/files/spark-power"
GUARD = REPO / "roles/edge/files/spark-ups-guard"
HOST = "pi-1"


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return load_fleet(agent_fleet(tmp_path))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    return folder


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return power_profile(tmp_path)


def power_profile(tmp_path: Path) -> Path:
    """A Pi's power profile as the edge role writes it (power.json.j2), in the test's folders; halt: marker."""
    (tmp_path / "gpio").write_text("0\n")
    path = tmp_path / "power.json"
    path.write_text(json.dumps({
        "governor": "ondemand", "quiet_governor": "powersave", "quiet_hours": ["23:00", "06:00"],
        "ups_signal": "gpio", "shutdown_battery_percent": 15, "nut_name": "ups@localhost",
        "gpio_path": str(tmp_path / "gpio"), "shutdown_delay_minutes": 1, "textfile_dir": str(tmp_path / "textfile"),
        "host": HOST, "task_root": str(tasks_root(tmp_path)), "halt": "marker",
        "governor_files": str(tmp_path / "no-cpufreq" / "*"), "shutdown_hooks": str(tmp_path / "shutdown.d")}))
    return path


def script(path: Path, run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPARK_RUN_DIR": str(run_dir)}
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, env=env, timeout=120)


class Started:
    """A task run by the task runner on pi-1 in the background, once its record says it runs."""

    def __init__(self, fleet: Fleet, tmp_path: Path, task_id: str, command: str, **power: Any) -> None:
        self.id = task_id
        self.staging = tasks_root(tmp_path) / ".staging" / task_id
        self.record = tasks_root(tmp_path) / ".staging" / (task_id + RUNNING_SUFFIX)
        self.run = Background(fleet, HOST, task_id, TaskSpec(command=command, power=power), grace_seconds=1)
        until(lambda: self.record.exists() and (self.staging / "stdout.log").exists()
              and "ready" in (self.staging / "stdout.log").read_text(), f"task {task_id} started")
        self.pid = json.loads(self.record.read_text())["pgid"]

    def output(self, name: str) -> str:
        return (self.staging / "out" / name).read_text().strip()

    def result(self) -> execute.TaskResult:
        self.run.join()
        assert self.run.error is None, self.run.error
        assert self.run.result is not None
        return self.run.result

    def end(self, fleet: Fleet) -> None:
        """Cancel it if it still runs (a test's leftover)."""
        if self.run.thread.is_alive():
            execute.cancel_task(LocalHosts(), fleet, self.id, "test", grace_seconds=1)
            self.run.join()


def group_stopped(pgid: int) -> bool:
    """Whether SIGSTOP to the group `pgid` has landed: a member stopped, none running or sleeping. Its leader may show
    D rather than T for as long as it is stopped: dash runs each command with vfork, and a stop that catches the
    child before its exec leaves the shell waiting on it (what the loaded CI machine showed, once for 120 s)."""
    states = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                states.add(fields[0])
    return "T" in states and states <= {"T", "D", "Z"}


@pytest.fixture
def started(fleet: Fleet) -> Iterator[list[Started]]:
    tasks: list[Started] = []
    yield tasks
    for task in tasks:
        task.end(fleet)


# A task with a child in its process group and one that left it (setsid); `ready` once it runs.
WITH_CHILD = ('sleep 300 & echo $! > "$SPARK_TASK_OUTPUT/child"; '
              'setsid sleep 300 & echo $! > "$SPARK_TASK_OUTPUT/escaped"; echo ready; wait')


def test_low_battery_drains_stops_a_requeue_task_group_keeps_an_allowed_one_and_halts_after(
        fleet: Fleet, tmp_path: Path, run_dir: Path, config: Path, started: list[Started]) -> None:
    requeue = Started(fleet, tmp_path, "embed-1", WITH_CHILD)  # min_battery_percent 50 (the default)
    allowed = Started(fleet, tmp_path, "probe-1", "echo ready; sleep 300", min_battery_percent=5)
    started += [requeue, allowed]
    children = [int(requeue.output(name)) for name in ("child", "escaped")]
    assert all(alive(pid) for pid in children)

    done = script(GUARD, run_dir, "--config", str(config), "--battery", "5", "--drain-timeout", "30", "--grace", "5")
    assert done.returncode == 2, done.stdout + done.stderr
    log = done.stdout
    note = DrainNote.parse((run_dir / "drain").read_text())  # as `spark host ls` reads it
    assert (note.by, note.reason) == ("spark-ups-guard", "battery 5%") and note.at.endswith("Z")
    result = requeue.result()
    assert (result.status, result.stopped_by) == ("power-stopped", "spark-ups-guard: battery 5%")
    assert not [pid for pid in children if alive(pid)], "a process of the stopped task ran on"
    assert not (tasks_root(tmp_path) / "embed-1").exists()  # nothing committed
    assert "was stopped by spark-ups-guard: battery 5%" in execute.failure(result).message
    assert alive(allowed.pid) and allowed.run.thread.is_alive(), "a task allowed at 5% was stopped"
    assert "task probe-1 (process group" in log and "goes on (it may run down to 5%)" in log
    assert "waiting at most 30 s for 1 task(s) to end: embed-1" in log
    # the halt (its lab marker) comes once the stopped task has ended, not before
    assert log.index("the stopped tasks ended in") < log.index("halt: marker")
    assert "low power" in (run_dir / "halted").read_text()


def test_the_drain_wait_is_bounded_and_says_what_it_did_on_the_timeout(
        fleet: Fleet, tmp_path: Path, run_dir: Path, config: Path, started: list[Started]) -> None:
    stubborn = Started(fleet, tmp_path, "stubborn-1", "trap '' TERM; echo ready; sleep 300")  # ignores SIGTERM
    started.append(stubborn)
    (tmp_path / "gpio").write_text("1\n")  # the low-battery line: no charge known, so every task stops
    began = time.monotonic()
    done = script(GUARD, run_dir, "--config", str(config), "--drain-timeout", "1", "--grace", "60")
    took = time.monotonic() - began
    assert done.returncode == 2, done.stdout + done.stderr
    assert took < 30, f"the guard waited {took:.0f} s, past its 1 s drain timeout"
    assert "drain timeout (1 s): still running: task stubborn-1" in done.stdout
    assert "SIGKILL, and halting all the same" in done.stdout
    assert "the charge is unknown" in done.stdout
    assert (run_dir / "halted").exists()
    assert DrainNote.parse((run_dir / "drain").read_text()).reason.startswith("battery low (low-battery line")
    assert stubborn.result().status == "power-stopped"  # its SIGKILL ended it


def test_quiet_hours_requeue_pause_or_keep_each_task_and_their_end_undoes_only_spark_powers_own(
        fleet: Fleet, tmp_path: Path, run_dir: Path, config: Path, started: list[Started]) -> None:
    go = tmp_path / "go"
    requeue = Started(fleet, tmp_path, "nightly-1", WITH_CHILD)
    paused = Started(fleet, tmp_path, "train-1", f"echo ready; while [ ! -e {go} ]; do sleep 0.05; done; echo done",
                     on_power_loss="pause")
    night = Started(fleet, tmp_path, "owl-1", "echo ready; sleep 300", run_in_quiet_hours=True)
    started += [requeue, paused, night]
    child = int(requeue.output("child"))

    begin = script(POWER, run_dir, "auto", "--config", str(config), "--at", "23:30", "--grace", "5")
    assert begin.returncode == 0, begin.stdout + begin.stderr
    assert "quiet hours: started" in begin.stdout and (run_dir / "quiet").exists()
    note = DrainNote.parse((run_dir / "drain").read_text())
    assert (note.by, note.reason) == ("spark-power", "quiet hours")
    assert requeue.result().status == "power-stopped" and not alive(child)
    until(lambda: group_stopped(paused.pid), f"the pause-policy task was paused (spark-power: {begin.stdout!r})")
    assert "paused (it may not run in quiet hours; its spec says on_power_loss: pause)" in begin.stdout
    assert alive(night.pid) and not group_stopped(night.pid)

    end = script(POWER, run_dir, "auto", "--config", str(config), "--at", "07:00")
    assert end.returncode == 0, end.stdout + end.stderr
    assert "quiet hours: ended" in end.stdout and "undrained" in end.stdout
    assert not (run_dir / "drain").exists() and not (run_dir / "quiet").exists()
    assert "task train-1 (process group" in end.stdout and "continued" in end.stdout
    until(lambda: not group_stopped(paused.pid), "the paused task continued")
    go.touch()
    result = paused.result()
    assert result.status == "succeeded", result  # continued, and committed
    assert (tasks_root(tmp_path) / "train-1" / "stdout.log").read_text() == "ready\ndone\n"


def test_the_end_of_quiet_hours_leaves_an_operators_drain(tmp_path: Path, run_dir: Path, config: Path) -> None:
    operator = {"by": "ada@laptop", "at": "2026-11-30T22:00:00Z", "reason": "disk swap"}
    (run_dir / "drain").write_text(json.dumps(operator, sort_keys=True) + "\n")  # as `spark host drain` writes it
    begin = script(POWER, run_dir, "auto", "--config", str(config), "--at", "23:30")
    assert "drained already, since 2026-11-30T22:00:00Z by ada@laptop: disk swap" in begin.stdout, begin.stdout
    end = script(POWER, run_dir, "auto", "--config", str(config), "--at", "06:30")
    assert end.returncode == 0, end.stderr
    assert "left the drain since 2026-11-30T22:00:00Z by ada@laptop: disk swap: not spark-power's" in end.stdout
    assert json.loads((run_dir / "drain").read_text()) == operator
    assert not (run_dir / "quiet").exists()


def test_a_task_paused_past_its_timeout_does_not_time_out(
        fleet: Fleet, tmp_path: Path, run_dir: Path, config: Path) -> None:
    go = tmp_path / "go"
    spec = TaskSpec(command=f"echo ready; while [ ! -e {go} ]; do sleep 0.05; done", power={"on_power_loss": "pause"})
    began = time.monotonic()
    # long enough for the power script to pause it on a loaded CI machine (4 s was not, once, beside the lab tests)
    timeout = 15
    run = Background(fleet, HOST, "slow-1", spec, timeout_seconds=timeout, grace_seconds=1)
    record = tasks_root(tmp_path) / ".staging" / ("slow-1" + RUNNING_SUFFIX)
    until(lambda: record.exists(), "the task started")
    pid = json.loads(record.read_text())["pgid"]
    assert script(POWER, run_dir, "auto", "--config", str(config), "--at", "23:30").returncode == 0
    until(lambda: not alive(pid) or group_stopped(pid), "the task was paused")
    assert alive(pid), f"the task ended before the power script paused it ({time.monotonic() - began:.1f} s)"
    # the time passing is what is tested here: paused past its timeout, the task is not timed out
    until(lambda: time.monotonic() - began > timeout + 1.5, "the task's timeout passed while it was paused")
    assert alive(pid) and group_stopped(pid) and run.thread.is_alive()
    assert script(POWER, run_dir, "auto", "--config", str(config), "--at", "06:00").returncode == 0
    go.touch()
    run.join()
    assert run.result is not None and run.result.status == "succeeded", run.result


def test_one_auto_run_at_a_time_the_second_waits_for_the_first_and_gives_up_after_its_wait(
        tmp_path: Path, run_dir: Path, config: Path) -> None:
    """Cron's run at a boundary of quiet hours and an operator's (or the one at boot) never act beside each other:
    the second decides on the markers the first left, and does nothing if the first outlasts its wait."""
    out = tmp_path / "second.out"
    with open(run_dir / "power.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a first run, still acting
        busy = script(POWER, run_dir, "auto", "--config", str(config), "--at", "23:30", "--lock-wait", "0.3")
        assert busy.returncode == 1 and "Traceback" not in busy.stderr, busy.stdout + busy.stderr
        assert "another spark-power auto still runs after 0.3 s" in busy.stderr, busy.stderr
        assert "nothing was changed" in busy.stderr and not (run_dir / "quiet").exists()
        with open(out, "w") as sink:
            second = subprocess.Popen([sys.executable, str(POWER), "auto", "--config", str(config), "--at", "23:30"],
                                      stdout=sink, stderr=subprocess.STDOUT, text=True,
                                      env={**os.environ, "SPARK_RUN_DIR": str(run_dir)})
        try:
            until(lambda: "waiting for it to end" in out.read_text(), "the second run waits for the first")
            assert not (run_dir / "quiet").exists() and second.poll() is None
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)
            assert second.wait(timeout=60) == 0, out.read_text()
    assert "quiet hours: started" in out.read_text() and (run_dir / "quiet").exists()


def test_missing_profile_is_one_line_with_the_fix(tmp_path: Path, run_dir: Path) -> None:
    for path in (POWER, GUARD):
        done = script(path, run_dir, "--config", str(tmp_path / "none.json"))
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert "cannot read the power profile" in done.stderr and "run the playbook" in done.stderr


@pytest.mark.parametrize(("processes", "paused"), [
    ({10: "T", 11: "T"}, True),  # the stop landed on the shell and its command
    ({10: "D", 11: "T"}, True),  # it caught the command between vfork and exec: the shell waits on it
    ({10: "D", 11: "S"}, False),  # a shell in a disk wait, its command asleep: not stopped
    ({10: "D"}, False),
    ({10: "S", 11: "T"}, False),  # the shell runs on: a command stopped on its own is no pause of the task
])
def test_a_task_counts_as_paused_when_its_group_is_stopped_also_with_its_shell_in_a_vfork_wait(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, processes: dict[int, str], paused: bool) -> None:
    """The task runner's test of a pause (its paused time is not the task's), on a /proc of the test's making:
    process 10 leads the group, 11 is its child, 99 another group's process, stopped."""
    for pid, how in {**processes, 99: "T"}.items():
        (tmp_path / str(pid)).mkdir()
        group = 99 if pid == 99 else 10
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (sh) {how} 1 {group} {group} 0 -1\n")
    monkeypatch.setattr(taskside, "PROC", str(tmp_path))
    assert taskside._paused(10) is paused
