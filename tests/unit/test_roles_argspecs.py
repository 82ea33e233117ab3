"""Role argument specs: the fleet's own variables pass, a wrong variable is rejected with a clear message.

Runs ansible-playbook against localhost (connection local) with only the always-tagged validation task.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from primespark.fleet import load_fleet
from primespark.inventory import build_inventory

REPO = Path(__file__).resolve().parents[2]
ROLE_HOST = {"common": "pi-1", "hardening": "nas-1", "monitoring_agent": "core-1", "edge": "pi-1", "nas": "nas-1",
             "monitoring_server": "ops-1", "spark_venv": "nas-1", "prefect_server": "ops-1", "prefect_worker": "nas-1",
             "sync": "nas-1", "lab_generator": "pi-1"}


@pytest.fixture(scope="module")
def hostvars(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict[str, Any]]]:
    with pytest.MonkeyPatch.context() as patch:  # set for this module only, whatever the run had before
        patch.setenv("SPARK_STATE_DIR", str(tmp_path_factory.mktemp("state")))
        data = build_inventory(load_fleet("lab"))["_meta"]["hostvars"]
    yield {h: {k: v for k, v in hv.items() if k.startswith("spark_")} for h, hv in data.items()}


def validate(tmp_path: Path, plays: list[tuple[str, dict[str, Any]]]) -> subprocess.CompletedProcess[str]:
    playbook = []
    for i, (role, variables) in enumerate(plays):
        (tmp_path / f"vars{i}.json").write_text(json.dumps(variables))
        playbook.append({"name": f"Validate {role}", "hosts": "localhost", "gather_facts": False,
                         "vars_files": [str(tmp_path / f"vars{i}.json")], "roles": [role]})
    (tmp_path / "play.yml").write_text(json.dumps(playbook))
    (tmp_path / "none.cfg").write_text("[defaults]\n")
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(REPO / "roles"), "ANSIBLE_CONFIG": str(tmp_path / "none.cfg"),
           "ANSIBLE_LOCALHOST_WARNING": "false", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "false",
           "ANSIBLE_NOCOLOR": "1"}
    return subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", "-c", "local",
         # Only the always-tagged argument validation runs; no task touches this machine.
         "--tags", "spark-validation-only", str(tmp_path / "play.yml")],
        capture_output=True, text=True, env=env, timeout=120,
    )


def test_fleet_variables_pass_every_role(tmp_path: Path, hostvars: dict[str, dict[str, Any]]) -> None:
    result = validate(tmp_path, [(role, hostvars[host]) for role, host in ROLE_HOST.items()])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("Validating arguments against arg spec 'main'") == len(ROLE_HOST)


BAD = [
    ("hardening", "spark_ssh_port", "twenty-two", "spark_ssh_port"),
    ("monitoring_agent", "spark_node_exporter_port", "nine-one-hundred", "spark_node_exporter_port"),
    ("edge", "spark_power", {"governor": "turbo", "ups_signal": "none", "shutdown_battery_percent": 15},
     "governor must be one of"),
    ("nas", "spark_backup_accounts", [{"client": "pi-1", "nas": "nas-1", "repository": "r", "chroot": "/x",
                                       "path": "/repo"}], "user"),
    ("common", "spark_operators", [{"name": "ada", "keys": "not-a-list-of-keys", "sudo": "maybe"}], "sudo"),
    ("monitoring_server", "spark_monitoring", {"native": "sometimes", "config_dir": "/etc/prometheus",
                                               "secrets_dir": "/etc/prometheus/s", "retention": "30d"}, "native"),
    ("sync", "spark_sync_accounts", [{"job": "x", "user": "sync-x", "mode": "both-ways", "roots": []}],
     "mode must be one of"),
    ("lab_generator", "spark_lab", "perhaps", "spark_lab"),
]


@pytest.mark.parametrize(("role", "variable", "value", "expected"), BAD, ids=[b[0] for b in BAD])
def test_wrong_variable_is_rejected_clearly(tmp_path: Path, hostvars: dict[str, dict[str, Any]], role: str,
                                            variable: str, value: Any, expected: str) -> None:
    variables = copy.deepcopy(hostvars[ROLE_HOST[role]])
    variables[variable] = value
    result = validate(tmp_path, [(role, variables)])
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Validation of arguments failed" in output, output
    assert expected in output, output
