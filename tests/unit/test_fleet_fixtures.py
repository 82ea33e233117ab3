"""The fixture matrix: every invalid fleet is rejected with its expected, located message; every valid one loads."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from primespark.cli.app import main
from primespark.fleet import FleetError, load_fleet
from primespark.fleet.errors import dotted

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "fleet"
INVALID = sorted((FIXTURES / "invalid").glob("*.yaml"))
VALID = sorted((FIXTURES / "valid").glob("*.yaml"))
SPARK = Path(sys.executable).parent / "spark"


def expectation(path: Path) -> tuple[str, str]:
    text = path.read_text()
    message = re.search(r"^# expect: (.+)$", text, re.M)
    field = re.search(r"^# expect-path: ?(.*)$", text, re.M)
    assert message and field, f"{path.name} lacks its # expect / # expect-path header"
    return message.group(1), field.group(1)


def test_the_matrix_is_large_enough() -> None:
    assert len(INVALID) >= 20
    assert len(VALID) >= 5


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_fleet_is_rejected_with_a_located_message(path: Path) -> None:
    message, field = expectation(path)
    with pytest.raises(FleetError) as caught:
        load_fleet(path)
    problems = caught.value.problems
    matching = [p for p in problems if message in p.message or message in p.fix]
    assert matching, f"no problem says {message!r}: {[str(p) for p in problems]}"
    problem = matching[0]
    assert problem.file == str(path)
    assert problem.line is not None
    assert dotted(problem.path) == field or (not field and not problem.path)
    if field:
        # The line must point at the field itself (or the mapping that lacks it).
        line = path.read_text().splitlines()[problem.line - 1]
        keys = [str(k) for k in problem.path if isinstance(k, str)]
        assert any(k in line for k in keys[-2:]), f"line {problem.line} ({line!r}) is not about {field}"


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_fleet_loads(path: Path) -> None:
    fleet = load_fleet(path)
    assert fleet.hosts


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_the_cli_answers_every_invalid_fleet_without_a_traceback(
    path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    message, field = expectation(path)
    monkeypatch.setattr(sys, "argv", ["spark", "validate", "--env", str(path)])
    with pytest.raises(SystemExit) as exited:
        main()
    out, err = capsys.readouterr()
    assert exited.value.code == 1
    assert "Traceback" not in out + err
    assert f"{path}:" in err
    assert message in err
    if field:
        assert f": {field}: " in err
    assert "fix:" in err


def test_the_installed_command_exits_1_without_a_traceback() -> None:
    path = FIXTURES / "invalid" / "address-outside-site.yaml"
    done = subprocess.run([str(SPARK), "validate", "--env", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert re.search(rf"{re.escape(str(path))}:\d+: hosts\.nas-1\.address: ", done.stderr)
    ok = subprocess.run([str(SPARK), "validate", "--env", "homelab"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr


def test_several_problems_are_reported_together(tmp_path: Path) -> None:
    text = (FIXTURES / "valid" / "mini-full.yaml").read_text()
    text = text.replace("address: 192.0.2.20", "address: 198.51.100.20")
    text = text.replace("host: ops-1, port: 9090", "host: ghost-1, port: 9090")
    text = text.replace("max_age_days: 90", "max_age_days: 5")
    bad = tmp_path / "three.yaml"
    bad.write_text(text)
    with pytest.raises(FleetError) as caught:
        load_fleet(bad)
    codes = {p.code for p in caught.value.problems}
    assert {"address-outside-site", "unknown-host", "tier-order"} <= codes
    assert caught.value.summary().startswith("3 problems in the fleet")


def test_the_shipped_inventories_are_valid() -> None:
    for env in ("lab", "homelab"):
        fleet = load_fleet(env)
        assert fleet.name == env


def test_homelab_places_four_vms_on_one_kvm_host() -> None:
    fleet = load_fleet("homelab")
    assert list(fleet.vms_on("kvm-1")) == ["core-1", "stream-1", "analytics-1", "ops-1"]
    assert {s.kind.value for s in fleet.services.values()} == {
        "kafka", "timescaledb", "redis", "mlflow", "prometheus", "alertmanager", "grafana", "prefect", "api"}


def test_capacity_check_can_be_left_to_the_policy_pack() -> None:
    path = FIXTURES / "invalid" / "kvm-host-overcommitted.yaml"
    fleet = load_fleet(path, skip=frozenset({"kvm-capacity"}))
    assert sum(vm.cpus for vm in fleet.vms_on("kvm-1").values()) > fleet.hosts["kvm-1"].cpus
