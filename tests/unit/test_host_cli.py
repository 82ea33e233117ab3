"""`spark host drain|undrain|ls` with the local transport, each host a folder of this machine (its markers there:
SPARK_RUN_DIR), and a stand-in node exporter, so that `spark task plan` reads live facts as it would on the hosts."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from agent_fleets import agent_fleet, node_exporter
from test_task_cli import spark

from primespark.audit.chain import records
from primespark.hosts import Connection, LocalRunner, Runner, SshRunner

METRICS = "".join(f'node_cpu_seconds_total{{cpu="{n}",mode="idle"}} 100\n' for n in range(4)) + """\
node_load1 0.5
node_memory_MemAvailable_bytes 3e+09
"""


def dead_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class HostsInFolders:
    """Each host a folder of this machine, holding its markers (SPARK_RUN_DIR); a host in `down` is reached over
    SSH at a loopback port nothing listens on (ssh itself says it cannot connect)."""

    def __init__(self, root: Path, down: frozenset[str] = frozenset()) -> None:
        self.root = root
        self.down = down
        self.port = dead_port()

    def runner(self, host: str) -> Runner:
        if host in self.down:
            return SshRunner(Connection(host, "127.0.0.1", "spark", self.port))
        (self.root / host).mkdir(parents=True, exist_ok=True)
        return LocalRunner(host, prefix=["env", f"SPARK_RUN_DIR={self.root / host}"])


@pytest.fixture
def exporter() -> Iterator[int]:
    """A stand-in node exporter on this machine: 4 CPUs, a load of 0.5, 3 GB available."""

    with node_exporter(METRICS) as port:
        yield port


@pytest.fixture
def fleet(tmp_path: Path, exporter: int, monkeypatch: pytest.MonkeyPatch) -> str:
    """The agent-tasks fleet with a task any host may run at any hour, its hosts folders of this machine."""
    path = agent_fleet(tmp_path, {"any": {"command": "true", "cpus": 0.5, "memory_mb": 64,
                                          "power": {"run_in_quiet_hours": True}}})
    data = yaml.safe_load(Path(path).read_text())
    data["monitoring"] = {"node_exporter_port": exporter}
    Path(path).write_text(yaml.safe_dump(data))
    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr("primespark.context.LocalHosts", lambda: HostsInFolders(tmp_path / "hosts"))
    return path


def candidates(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fleet: str) -> dict[str, Any]:
    code, out, err = spark(monkeypatch, capsys, "task", "plan", "--env", fleet, "--template", "any", "--transport",
                           "local", "--json")
    assert code == 0, out + err
    return {c["host"]: (c["verdict"], c["reason"]) for c in json.loads(out)["candidates"]}


def host(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fleet: str,
         *args: str) -> tuple[int, str, str]:
    return spark(monkeypatch, capsys, "host", *args, "--env", fleet, "--transport", "local")


def test_a_drained_host_is_excluded_from_placement_until_undrained(
        fleet: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    before = candidates(monkeypatch, capsys, fleet)
    assert before["pi-2"][0] in ("chosen", "eligible"), before

    code, out, err = host(monkeypatch, capsys, fleet, "drain", "pi-2", "--reason", "disk swap [bay 2]")
    assert code == 0, out + err
    marker = tmp_path / "hosts" / "pi-2" / "drain"
    note = json.loads(marker.read_text())
    assert note["reason"] == "disk swap [bay 2]" and note["by"].count("@") == 1 and note["at"].endswith("Z")
    assert f"pi-2: drained since {note['at']} by {note['by']}: disk swap [bay 2]" in out
    assert not any((tmp_path / "hosts" / h / "drain").exists() for h in ("pi-1", "nas-1", "core-1", "ops-1"))

    drained = candidates(monkeypatch, capsys, fleet)
    assert drained["pi-2"] == ("excluded", "drained")
    assert all(verdict != "excluded" for name, (verdict, _) in drained.items() if name not in ("pi-2", "kvm-1"))

    code, out, _ = host(monkeypatch, capsys, fleet, "ls")
    assert code == 0
    row = next(line for line in out.splitlines() if "pi-2" in line)
    assert f"yes, since {note['at']}" in row and "3.5 CPUs free" in row
    assert "yes, since" not in next(line for line in out.splitlines() if "pi-1" in line)

    code, out, _ = host(monkeypatch, capsys, fleet, "undrain", "pi-2")
    assert code == 0 and f"pi-2: undrained (it was drained since {note['at']}" in out
    assert not marker.exists()
    assert candidates(monkeypatch, capsys, fleet)["pi-2"] == before["pi-2"]


def test_drain_and_undrain_are_idempotent_and_each_is_audited(
        fleet: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert host(monkeypatch, capsys, fleet, "drain", "pi-1", "--reason", "kernel update")[0] == 0
    marker = tmp_path / "hosts" / "pi-1" / "drain"
    first = marker.read_text()
    note = json.loads(first)
    code, out, _ = host(monkeypatch, capsys, fleet, "drain", "pi-1", "--reason", "another reason")
    assert code == 0
    assert f"pi-1: already drained since {note['at']} by {note['by']}: kernel update; nothing changed" in out
    assert marker.read_text() == first, "the first drain's note is kept"
    assert host(monkeypatch, capsys, fleet, "undrain", "pi-1")[0] == 0
    code, out, _ = host(monkeypatch, capsys, fleet, "undrain", "pi-1")
    assert code == 0 and "pi-1: not drained; nothing changed" in out
    found = list(records(tmp_path / "state" / "audit" / "log.jsonl"))
    assert [(r["operation"], r["hosts"], r["outcome"]) for r in found] == [
        ("spark host drain", ["pi-1"], "succeeded"), ("spark host drain", ["pi-1"], "succeeded"),
        ("spark host undrain", ["pi-1"], "succeeded"), ("spark host undrain", ["pi-1"], "succeeded")]
    assert found[0]["parameters"]["reason"] == "kernel update"  # the why is read in the log, not HMAC'd


def test_an_operators_drain_replaces_a_power_scripts_and_so_outlasts_its_quiet_hours(
        fleet: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "hosts" / "pi-1" / "drain"
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"by": "spark-power", "at": "2026-11-30T23:00:00Z", "reason": "quiet hours"}))
    code, out, err = host(monkeypatch, capsys, fleet, "drain", "pi-1", "--reason", "disk swap")
    assert code == 0, out + err
    note = json.loads(marker.read_text())
    assert note["reason"] == "disk swap" and note["by"] != "spark-power"
    assert "replaces the drain since 2026-11-30T23:00:00Z by spark-power: quiet hours" in " ".join(out.split())
    assert sorted(p.name for p in marker.parent.iterdir()) == ["drain"]  # no temporary file left
    # an operator's drain is never replaced, by anyone
    code, out, _ = host(monkeypatch, capsys, fleet, "drain", "pi-1", "--reason", "another")
    assert code == 0 and "already drained" in out and json.loads(marker.read_text()) == note


@pytest.mark.parametrize("command", [["drain", "pi-9", "--reason", "x"], ["undrain", "pi-9"]])
def test_an_unknown_host_names_the_fleet_file_and_its_hosts(
        fleet: str, command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = host(monkeypatch, capsys, fleet, *command)
    assert code == 1
    assert err.startswith(f"error: {fleet}: no host named 'pi-9' in fleet mini\n")
    assert "fix: use one of its hosts: core-1, kvm-1, nas-1, ops-1, pi-1, pi-2" in err
    assert not (tmp_path / "hosts").exists(), "no host was asked"


def test_an_unreachable_host_is_one_line_saying_what_was_tried(
        fleet: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    hosts = HostsInFolders(tmp_path / "hosts", frozenset({"nas-1"}))
    monkeypatch.setattr("primespark.context.LocalHosts", lambda: hosts)
    code, _, err = host(monkeypatch, capsys, fleet, "drain", "nas-1", "--reason", "x")
    assert code == 1
    message, fix = err.strip().splitlines()
    assert message == (f"error: nas-1: not drained: cannot reach nas-1 (spark@127.0.0.1:{hosts.port}) over SSH: "
                       f"ssh: connect to host 127.0.0.1 port {hosts.port}: Connection refused")
    assert fix.strip().startswith("fix: check that the host is up and reachable")
    code, out, _ = host(monkeypatch, capsys, fleet, "ls")
    assert code == 0
    row = next(line for line in out.splitlines() if "nas-1" in line)
    assert "no: cannot reach nas-1" in row and "unknown" in row


def test_drain_wait_returns_once_the_hosts_tasks_have_ended_and_fails_naming_those_still_running(
        fleet: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import threading

    from test_agent_execute import until

    from primespark.agents import execute
    from primespark.fleet import load_fleet
    from primespark.fleet.model import TaskSpec

    hosts, loaded = HostsInFolders(tmp_path / "hosts"), load_fleet(fleet)
    release = tmp_path / "release"
    spec = TaskSpec(command=f"while [ ! -e {release} ]; do sleep 0.05; done", memory_mb=64)
    results: list[execute.TaskResult] = []
    task = threading.Thread(target=lambda: results.append(execute.run_task(hosts, loaded, "pi-1", "long-1", spec)),
                            daemon=True)
    task.start()
    try:
        until(lambda: execute.running_on(hosts, loaded, "pi-1") == ["long-1"], "the task runs on pi-1", 60)
        assert execute.running_on(hosts, loaded, "pi-2") == [], "pi-2 shares the task folder here, not the task"

        code, out, err = host(monkeypatch, capsys, fleet, "drain", "pi-1", "--reason", "disk swap", "--wait", "1")
        assert code != 0, out + err
        assert "pi-1: 1 agent task still running after 1 s: long-1; pi-1 stays drained" in out + err, out + err
        assert "spark task cancel ID" in out + err
        assert (tmp_path / "hosts" / "pi-1" / "drain").exists()

        asked: list[list[str]] = []

        def ends_after_first_look(*args: Any, **kwargs: Any) -> list[str]:
            running = real(*args, **kwargs)
            asked.append(running)
            release.touch()  # the task ends after the drain saw it running
            return running

        real = execute.running_on
        monkeypatch.setattr(execute, "running_on", ends_after_first_look)
        code, out, err = host(monkeypatch, capsys, fleet, "drain", "pi-1", "--reason", "disk swap", "--wait", "60")
        assert code == 0, out + err
        assert asked[0] == ["long-1"] and asked[-1] == [], asked
        assert "pi-1: already drained" in out and "pi-1: no agent task runs on it" in out
    finally:
        release.touch()
        task.join(60)
    assert results and results[0].status == "succeeded"
