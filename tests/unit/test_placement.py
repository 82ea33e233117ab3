"""Where each deployment runs and what each worker holds, derived from the fleet (no Prefect involved)."""

from __future__ import annotations

from pathlib import Path

import pytest

from primespark.fleet import FleetError, load_fleet, load_text
from primespark.orchestration.placement import planned_deployments, pools, site_hosts, worker_repositories

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "fleet"


def test_the_lab_runs_edge_flows_on_the_edge_pool_and_offsite_maintenance_in_the_cloud() -> None:
    fleet = load_fleet("lab")
    placed = {d.name: d.pool(fleet) for d in planned_deployments(fleet, "lab")}
    assert placed == {
        "probe-edge": "spark-edge", "probe-cloud": "spark-cloud",
        # agent tasks placed among a site's hosts, on that site's worker (the UI's form, spark task run --on-worker)
        "agent-task-edge": "spark-edge", "agent-task-cloud": "spark-cloud",
        "backup-pi-1": "spark-edge", "backup-pi-2": "spark-edge", "backup-nas-1": "spark-edge",
        "dr-drill-pi-1": "spark-edge", "dr-drill-pi-2": "spark-edge", "dr-drill-nas-1": "spark-edge",
        "maintenance-nas-primary": "spark-edge", "maintenance-offsite": "spark-cloud",
        # sync jobs and tier passes run where their sources are: the Pis' hot tier and the NAS, at the edge
        **{f"{kind}-{job}": "spark-edge" for kind in ("sync", "sync-check", "sync-watch")
           for job in ("hot-to-nas", "warm-to-cloud")},
        # tier passes run where their source hosts are: the Pis' hot tier and the NAS's warm tier, on the edge
        "tier-hot-warm": "spark-edge", "tier-warm-cold": "spark-edge"}
    assert pools(fleet) == {"spark-edge": "edge", "spark-cloud": "cloud"}


def test_agent_tasks_leave_a_slot_of_their_sites_worker_to_the_other_flows() -> None:
    """A run may wait long for a host: at most the worker's limit less one at once (but one with a limit of one),
    so backups always find a slot; every other deployment runs one at a time."""
    fleet = load_fleet("lab")
    limits = {d.name: d.concurrency_limit for d in planned_deployments(fleet, "lab")}
    assert fleet.orchestration is not None
    for site, worker in fleet.orchestration.workers.items():
        assert worker.limit == 4 and limits.pop(f"agent-task-{site}") == 3  # the default limit
    assert set(limits.values()) == {1}
    one = fleet.model_copy(update={"orchestration": fleet.orchestration.model_copy(update={"workers": {
        site: worker.model_copy(update={"limit": 1}) for site, worker in fleet.orchestration.workers.items()}})})
    assert {d.concurrency_limit for d in planned_deployments(one, "lab") if d.flow == "agent-task"} == {1}
    # a fleet without orchestration (flows served from a laptop) has no worker, so no agent-task deployment
    laptop = fleet.model_copy(update={"orchestration": None})
    assert not [d for d in planned_deployments(laptop, "lab") if d.flow in ("agent-task", "probe")]


def test_each_worker_holds_the_passwords_of_its_own_sites_repositories_only() -> None:
    fleet = load_fleet("lab")
    assert worker_repositories(fleet, "edge") == ["nas-primary"]
    assert worker_repositories(fleet, "cloud") == ["offsite"]
    assert set(site_hosts(fleet, "edge")) == {"pi-1", "pi-2", "pi-3", "nas-1"}
    assert "kvm-1" not in site_hosts(fleet, "cloud") and "ops-1" in site_hosts(fleet, "cloud")


def test_maintenance_opens_repositories_on_their_host_and_catches_up_copies_within_one_site() -> None:
    lab = {d.name: d for d in planned_deployments(load_fleet("lab"), "lab")}
    primary = lab["maintenance-nas-primary"]
    assert primary.parameters["on_store"] and primary.parameters["offsite"]  # pi-1, pi-2, nas-1: all edge
    assert set(primary.hosts) == {"nas-1", "pi-1", "pi-2"}
    assert lab["maintenance-offsite"].hosts == ("ops-1",) and not lab["maintenance-offsite"].parameters["offsite"]
    # in the homelab analytics-1 (cloud) backs up into the NAS: the edge worker cannot copy from it
    homelab = {d.name: d for d in planned_deployments(load_fleet("homelab"), "homelab")}
    assert homelab["maintenance-nas-primary"].hosts == ("nas-1",)
    assert not homelab["maintenance-nas-primary"].parameters["offsite"]
    assert homelab["backup-analytics-1"].pool(load_fleet("homelab")) == "spark-cloud"


def test_a_placement_moves_a_deployment_and_may_pause_it() -> None:
    text = (FIXTURES / "valid" / "orchestrated.yaml").read_text()
    fleet = load_text(text + "  deployments:\n    maintenance-offsite: {pool: spark-edge, paused: true}\n")
    moved = next(d for d in planned_deployments(fleet, "mini") if d.name == "maintenance-offsite")
    assert moved.pool(fleet) == "spark-edge" and moved.paused(fleet)
    assert worker_repositories(fleet, "edge") == ["nas-primary", "offsite"]


def test_shorthand_and_mapping_forms_of_server_and_workers_agree() -> None:
    text = (FIXTURES / "valid" / "orchestrated.yaml").read_text()
    short = load_text(text)
    long = load_text(text.replace("  server: ops-1", "  server: {host: ops-1, port: 4200}")
                     .replace("    edge: nas-1", "    edge: {host: nas-1, limit: 4}"))
    assert short.orchestration == long.orchestration
    assert short.orchestration is not None and short.orchestration.poll_seconds == 1
    assert short.orchestration.heartbeat_seconds == 30


@pytest.mark.parametrize("field, value", [("heartbeat_seconds", "10"), ("poll_seconds", "0"),
                                          ("crash_retries", "-1")])
def test_orchestration_numbers_are_bounded(field: str, value: str) -> None:
    text = (FIXTURES / "valid" / "orchestrated.yaml").read_text()
    with pytest.raises(FleetError) as caught:
        load_text(text + f"  {field}: {value}\n")
    assert [p.path for p in caught.value.problems] == [("orchestration", field)]
