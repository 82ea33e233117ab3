"""A role's secret lookup that fails says why: its task hides its result (no_log, the result holds keys), so the
lookup's own error (no fleet, no mesh plan, a sealed store) is shown by the block's rescue, not "censored"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from primespark.playbook import run_ansible

ROOT = Path(__file__).resolve().parents[2]


def secret_lookups(tasks: list[dict[str, Any]], rescue: list[dict[str, Any]] | None = None):  # type: ignore[no-untyped-def]
    """(task, the rescue of the block it is in) for every no_log task that calls one of the project's lookups."""
    for task in tasks:
        if "block" in task:
            yield from secret_lookups(task["block"], task.get("rescue"))
            continue
        if task.get("no_log") and "lookup('spark_" in str(task.get("ansible.builtin.set_fact", "")):
            yield task, rescue


ROLES = sorted(p.parent.parent.name for p in ROOT.glob("roles/*/lookup_plugins/spark_*.py"))


@pytest.mark.parametrize("role", ROLES)
def test_every_secret_lookup_is_in_a_block_whose_rescue_says_why(role: str) -> None:
    tasks = yaml.safe_load((ROOT / "roles" / role / "tasks" / "main.yml").read_text())
    found = list(secret_lookups(tasks))
    assert found, f"{role}: no secret lookup found (the role has a lookup plugin)"
    for task, rescue in found:
        assert rescue, f"{role}: {task['name']!r} is not in a block with a rescue"
        said = [r["ansible.builtin.fail"]["msg"] for r in rescue if "ansible.builtin.fail" in r]
        assert said == ["{{ ansible_failed_result.msg }}"], (role, rescue)


@pytest.mark.parametrize("role", ["prefect_worker", "prefect_server", "tls"])
def test_a_failing_lookup_shows_its_own_error(role: str, tmp_path: Path) -> None:
    """As `spark` and the lab tests run a playbook (run_ansible's failed tasks): the lookup's own words, not an
    empty message. In check mode, so that a lookup that did not fail would change nothing here."""
    missing = tmp_path / "no-such-fleet.yaml"
    book = tmp_path / "play.yml"
    book.write_text(yaml.safe_dump([{
        "hosts": "pi-1", "gather_facts": False, "check_mode": True,
        "vars": {"spark_fleet": str(missing), "spark_site": "edge", "ansible_user": "spark",
                 "spark_textfile_dir": "/var/lib/node_exporter",
                 "spark_tls": {"folder": str(tmp_path / "tls"), "group": "root", "gid": 0,
                               "web_config": str(tmp_path / "web.yml")}},
        "roles": [role],
    }]))
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("pi-1 ansible_connection=local\n")
    run = run_ansible(inventory, playbook=str(book), root=ROOT,
                      env={"ANSIBLE_STRATEGY": "linear", "ANSIBLE_FACT_CACHING": "memory"})
    assert run.rc != 0, run.output
    said = [line for line in run.failed_tasks if "Say why it could not be read" in line]
    plugin = {"tls": "spark_tls_renewal"}.get(role, f"spark_{role}")
    assert said and f"{plugin}: " in said[0] and f"{missing}: no such fleet file" in said[0], run.failed_tasks
