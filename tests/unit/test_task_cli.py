"""`spark task plan`: the per-host table, without running anything; one located error where no host can run it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from primespark.cli.app import main

FLEET = Path(__file__).resolve().parent.parent / "fixtures" / "fleet" / "valid" / "agent-tasks.yaml"
FACTS = """\
now: {now}
hosts:
  pi-1: {{cpus_free: 2.1, memory_free_mb: 3000, data_bytes: {{/srv/hot/readings: 1200000000}}}}
  pi-2: {{cpus_free: 3.0, memory_free_mb: 3000}}
  nas-1: {{unavailable: cannot reach nas-1 over SSH}}
  core-1: {{cpus_free: 3.0, memory_free_mb: 7000}}
  ops-1: {{cpus_free: 3.0, memory_free_mb: 7000}}
placed: [{{host: core-1, cpus: 0.5, memory_mb: 100}}]
"""


def spark(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setattr(sys, "argv", ["spark", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def facts(tmp_path: Path, now: str) -> str:
    path = tmp_path / "facts.yaml"
    path.write_text(FACTS.format(now=now))
    return str(path)


def test_a_template_is_planned_from_a_facts_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = spark(monkeypatch, capsys, "task", "plan", "--env", str(FLEET), "--template", "summarise-readings",
                         "--facts", facts(tmp_path, "2026-11-30T10:00:00Z"))
    assert code == 0
    assert "pi-1" in out and "1.2 GB of its data local, 2.1 CPUs free" in out
    assert "no label role=agent" in out  # pi-2
    assert "summarise-readings would run on pi-1 (nothing was run)" in out


def test_what_is_placed_counts_and_unavailable_facts_exclude(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = spark(monkeypatch, capsys, "task", "plan", "--env", str(FLEET), "--template", "train-step",
                         "--facts", facts(tmp_path, "2026-11-30T10:00:00Z"), "--json")
    assert code == 0
    import json

    decision = json.loads(out)
    assert decision["host"] == "ops-1"  # core-1 has a task placed: spread
    reasons = {c["host"]: c["reason"] for c in decision["candidates"]}
    assert reasons["nas-1"] == "facts unavailable: cannot reach nas-1 over SSH"
    assert reasons["core-1"] == "1 task placed there, 2.5 CPUs free"


def test_no_host_now_is_one_located_error_with_every_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = spark(monkeypatch, capsys, "task", "plan", "--env", str(FLEET), "--template",
                           "summarise-readings", "--facts", facts(tmp_path, "2026-11-30T23:30:00Z"))
    assert code == 1
    assert "quiet hours until 06:00" in out
    assert err.startswith(f"error: {FLEET}: tasks.summarise-readings: no host can run it now: ")
    assert "pi-1: excluded, quiet hours until 06:00; pi-2: excluded, no label role=agent" in err
    assert "fix:" in err


def test_a_spec_file_is_checked_like_a_template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "embed.yaml"
    spec.write_text("command: python3 -m embed\ncpus: 1\nmemroy_mb: 512\n")
    code, _, err = spark(monkeypatch, capsys, "task", "plan", str(spec), "--env", str(FLEET), "--facts",
                         facts(tmp_path, "2026-11-30T10:00:00Z"))
    assert code == 1
    assert f"{spec}:3: memroy_mb: Extra inputs are not permitted" in err
    assert "did you mean `memory_mb`?" in err
    spec.write_text("command: python3 -m embed\ndata: ['pi-9:/srv/hot/x']\n")
    code, _, err = spark(monkeypatch, capsys, "task", "plan", str(spec), "--env", str(FLEET), "--facts",
                         facts(tmp_path, "2026-11-30T10:00:00Z"))
    assert code == 1 and f"{spec}:2: data[0]: no host named 'pi-9'" in err
    spec.write_text("command: python3 -m embed\nmemory_mb: 512\n")
    code, out, _ = spark(monkeypatch, capsys, "task", "plan", str(spec), "--env", str(FLEET), "--facts",
                         facts(tmp_path, "2026-11-30T10:00:00Z"))
    assert code == 0 and "embed would run on pi-2" in out  # the edge, most CPUs free


@pytest.mark.parametrize(("args", "said"), [
    ((), "name one task: a SPEC file or --template NAME"),
    (("--template", "nope"), "has no task template named 'nope'"),
])
def test_naming_the_task_wrongly_says_how(args: tuple[str, ...], said: str, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = spark(monkeypatch, capsys, "task", "plan", "--env", str(FLEET), *args)
    assert code == 1 and said in err and "summarise-readings" in err


@pytest.mark.parametrize(("args", "said"), [
    (("--site", "edge"), "--site places a task among a site's hosts on that site's worker"),
    (("--on-worker", "--site", "moon"), "no site's worker to run it on: fleet lab has no site 'moon'"),
])
def test_a_run_on_a_worker_named_wrongly_says_how(args: tuple[str, ...], said: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before anything is submitted (no server is asked), with the sites that have a worker."""
    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path / "state"))
    code, _, err = spark(monkeypatch, capsys, "task", "run", "--template", "count-readings", "--env", "lab", *args)
    assert code == 1 and said in err, err
    if "--on-worker" in args:
        assert "sites with a worker: cloud, edge" in err, err


def test_live_facts_that_cannot_be_read_are_said_per_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    fleet = tmp_path / "mini.yaml"
    fleet.write_text(FLEET.read_text() + "monitoring: {node_exporter_port: 1}\n")
    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path / "state"))
    # local transport: every host is this machine, where nothing listens on port 1
    code, out, err = spark(monkeypatch, capsys, "task", "plan", "--env", str(fleet), "--template", "train-step",
                           "--transport", "local")
    assert code == 1
    assert out.count("facts unavailable: node exporter on port 1 did not answer") == 3  # core-1, nas-1, ops-1
    assert "no host can run it now" in err


def test_run_dry_run_plans_only_and_cancel_of_an_unknown_id_is_a_located_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = spark(monkeypatch, capsys, "task", "run", "--env", str(FLEET), "--template", "summarise-readings",
                         "--facts", facts(tmp_path, "2026-11-30T10:00:00Z"), "--dry-run")
    assert code == 0 and "summarise-readings would run on pi-1 (nothing was run)" in out
    from agent_fleets import agent_fleet

    fleet = agent_fleet(tmp_path)
    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path / "state"))
    code, out, err = spark(monkeypatch, capsys, "task", "cancel", "t-unknown", "--env", fleet, "--transport", "local")
    assert code == 1
    assert f"{fleet}: no host knows task t-unknown (asked: core-1, nas-1, ops-1, pi-1, pi-2)" in out + err


@pytest.mark.slow
def test_run_runs_the_task_and_says_where_and_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from agent_fleets import agent_fleet

    fleet = agent_fleet(tmp_path, {"hello": {"command": "echo hello", "memory_mb": 64}})
    (tmp_path / "state").mkdir(mode=0o700)
    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path / "state"))
    facts_path = tmp_path / "up.yaml"
    facts_path.write_text("now: 2026-11-30T12:00:00Z\nhosts:\n  pi-2: {cpus_free: 2.0, memory_free_mb: 3000}\n")
    from prefect.testing.utilities import prefect_test_harness

    # a server of the test's own, stopped before capsys closes its streams (a run's temporary server would log
    # its stop at exit, into a closed stream)
    with prefect_test_harness(server_startup_timeout=120):
        code, out, err = spark(monkeypatch, capsys, "task", "run", "--env", fleet, "--template", "hello", "--id",
                               "h-1", "--transport", "local", "--facts", str(facts_path))
        busy = tmp_path / "busy.yaml"  # pi-2 may take it later (memory frees up): --wait 0 says so at once
        busy.write_text("now: 2026-11-30T12:00:00Z\nhosts:\n  pi-2: {cpus_free: 2.0, memory_free_mb: 10}\n")
        told = spark(monkeypatch, capsys, "task", "run", "--env", fleet, "--template", "hello", "--id", "h-2",
                     "--transport", "local", "--facts", str(busy), "--wait", "0")
    assert told[0] == 1 and "no host can run it now: " in told[2] and "pi-2: excluded, 10 MiB free" in told[2], told
    assert code == 0, out + err
    assert "h-1 ran on pi-2 (attempt 1): " in out and "2.0 CPUs free" in out
    assert f"result: pi-2:{tmp_path}/hot/tasks/h-1" in out
    assert (tmp_path / "hot" / "tasks" / "h-1" / "stdout.log").read_text() == "hello\n"


def test_ls_with_the_server_down_is_one_line_naming_the_address(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    code, out, err = spark(monkeypatch, capsys, "task", "ls", "--env", str(FLEET))
    assert code == 1 and out == ""
    error, fix = err.splitlines()
    assert error.startswith(f"error: the Prefect server at {url} (from PREFECT_API_URL in the environment) is "
                            "unreachable: "), err
    assert fix.startswith("    fix: ") and "PREFECT_API_URL" in fix
    code, _, err = spark(monkeypatch, capsys, "task", "ls", "--env", str(FLEET), "--state", "done")
    assert code == 1 and "--state 'done' is not a state" in err and "completed" in err

