"""End to end in the lab: the audit log of the controller and of each site's worker (docs/audit.md).

A command run here (`spark backup now pi-1`) leaves one record of the command and one of its flow run in the
controller's chain; a run on a worker (`spark flows probe SITE`) one record in that worker's own chain, with its
site, deployment and flow-run id. Every chain verifies. `spark audit ship` copies the controller's checkpoints to
the NAS and the workers, and each worker's own to the other hosts.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from lab_cli import spark

from primespark.audit.chain import records
from primespark.audit.verify import verify_chain
from primespark.orchestration.material import WORKER_HOME

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def workers(deployed: Any) -> None:
    """site.yml (server and workers, with the audit key), then the fleet's deployments on the pools: the
    session's."""


def worker_chain(lab: Any, host: str, into: Path) -> Path:
    """A copy of the worker's chain and checkpoints, read from its container."""
    into.mkdir(parents=True, exist_ok=True)
    for name in ("log.jsonl", "log.checkpoints.jsonl"):
        done = lab.exec(host, ["cat", f"{WORKER_HOME}/state/audit/{name}"])
        if done.returncode == 0:
            (into / name).write_text(done.stdout)
    return into / "log.jsonl"


def test_a_command_and_its_flow_run_leave_one_record_each_on_the_controller(lab: Any, workers: None) -> None:
    chain = lab.state_dir / "audit" / "log.jsonl"
    before = len(list(records(chain))) if chain.exists() else 0
    done = spark("backup", "now", "pi-1", "--env", lab.fleet.name)
    assert done.returncode == 0, done.stdout + done.stderr
    new = list(records(chain))[before:]
    assert [(r["operation"], r["hosts"], r["outcome"]) for r in new] == [
        ("flow backup", ["pi-1"], "succeeded"), ("spark backup now", ["pi-1"], "succeeded")]
    assert new[0]["flow_run_id"] and new[1]["flow_run_id"] is None
    verified = spark("audit", "verify", "--env", lab.fleet.name)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_run_on_each_worker_leaves_one_record_in_that_workers_chain(lab: Any, workers: None,
                                                                      tmp_path: Path) -> None:
    from primespark.orchestration.placement import site_hosts

    for site, worker in lab.fleet.orchestration.workers.items():
        done = spark("flows", "probe", site, "--env", lab.fleet.name)
        assert done.returncode == 0, done.stdout + done.stderr
        chain = worker_chain(lab, worker.host, tmp_path / site)
        found = [r for r in records(chain) if r["operation"] == "flow probe"]
        runs = Counter(r["flow_run_id"] for r in found)
        assert found and all(n == 1 for n in runs.values()), runs  # one record per run
        last = found[-1]
        assert last["actor"].startswith(f"worker:{site}@") and last["deployment"] == f"probe-{site}"
        assert sorted(last["hosts"]) == sorted(site_hosts(lab.fleet, site))
        assert "hmac_key" not in last  # the role installed the key
        assert verify_chain(chain, None).ok


def test_the_controllers_checkpoints_are_copied_off_the_machine(lab: Any, workers: None) -> None:
    from primespark.audit.offsite import COPIES, offsite_hosts, origin

    every_record = {"SPARK_AUDIT_CHECKPOINT_EVERY": "1"}
    done = spark("mesh", "plan", "--env", lab.fleet.name, extra=every_record)  # a record, and its checkpoint
    assert done.returncode == 0, done.stdout + done.stderr
    shipped = spark("audit", "ship", "--env", lab.fleet.name)
    assert shipped.returncode == 0, shipped.stdout + shipped.stderr
    here = (lab.state_dir / "audit" / "log.checkpoints.jsonl").read_text()
    assert here
    for host in offsite_hosts(lab.fleet):  # the NAS and the workers
        copy = lab.exec(host, ["cat", f"{COPIES}/{lab.fleet.name}/{origin()}/log.checkpoints.jsonl"])
        assert copy.returncode == 0 and copy.stdout and here.startswith(copy.stdout), (host, copy.stderr)
        # all but the checkpoint of ship's own record, written when it had shipped (the lab checkpoints every one)
        assert here.count("\n") - copy.stdout.count("\n") <= 1, host
    verified = spark("audit", "verify", "--env", lab.fleet.name, "--offsite")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_the_workers_checkpoints_are_copied_off_their_machines(lab: Any, workers: None) -> None:
    from primespark.audit.offsite import COPIES, offsite_hosts, worker_source

    for site in lab.fleet.orchestration.workers:  # a record on each worker, and its checkpoint (the lab's every 1)
        done = spark("flows", "probe", site, "--env", lab.fleet.name)
        assert done.returncode == 0, done.stdout + done.stderr
    shipped = spark("audit", "ship", "--env", lab.fleet.name)
    assert shipped.returncode == 0, shipped.stdout + shipped.stderr
    for worker in lab.fleet.orchestration.workers.values():
        own = lab.exec(worker.host, ["sh", "-c", f"cat {WORKER_HOME}/state/audit/log.checkpoints.jsonl 2>/dev/null "
                                                 "|| true"]).stdout
        assert own, f"{worker.host}'s worker signed no checkpoint (the lab fleet checkpoints every record)"
        others = [h for h in offsite_hosts(lab.fleet) if h != worker.host]
        assert others, f"{worker.host}'s checkpoints have no other host to go to"
        for host in others:
            copy = lab.exec(host, ["cat", f"{COPIES}/{lab.fleet.name}/{worker_source(worker.host)}/"
                                          "log.checkpoints.jsonl"])
            assert copy.returncode == 0 and copy.stdout == own, (worker.host, host, copy.stderr)
        print(f"{worker.host}: {own.count(chr(10))} checkpoints, copied to {', '.join(others)}")
    verified = spark("audit", "verify", "--env", lab.fleet.name, "--offsite")
    assert verified.returncode == 0, verified.stdout + verified.stderr
