"""Where an agent task runs: the placement decision as a table of scenarios, each with its host and reasons."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from primespark.agents.placement import (
    Decision,
    HostFacts,
    NoEligibleHost,
    Placed,
    Unavailable,
    data_places,
    may_take_later,
    place,
    quiet_until,
)
from primespark.fleet import load_text
from primespark.fleet.model import Arch, Fleet, TaskSpec

# Berlin, so that a test passing in UTC by accident fails: 22:30 UTC is 23:30 there (in pi-1's quiet hours).
FLEET = """
name: tasks
timezone: Europe/Berlin
sites:
  edge: {kind: edge, lan: 192.0.2.0/24, behind_nat: true}
  cloud: {kind: cloud, lan: 198.51.100.0/24}
images:
  debian-12: {url: "https://images.example.org/debian-12.qcow2", sha256: "%s"}
hosts:
  pi-1: {kind: pi, site: edge, arch: aarch64, cpus: 4, memory_mb: 4096, disk_gb: 64, address: 192.0.2.11,
         labels: {role: agent}, power: {quiet_hours: ["23:00", "06:00"], ups_signal: nut, shutdown_battery_percent: 15}}
  pi-2: {kind: pi, site: edge, arch: aarch64, cpus: 4, memory_mb: 4096, disk_gb: 64, address: 192.0.2.12,
         labels: {role: agent}, power: {quiet_hours: ["13:00", "14:00"]}}
  nas-1: {kind: nas, site: edge, cpus: 4, memory_mb: 8192, disk_gb: 8000, address: 192.0.2.20}
  kvm-1: {kind: kvm_host, site: cloud, cpus: 16, memory_mb: 65536, disk_gb: 2000, address: 198.51.100.2}
  ops-1: {kind: vm, site: cloud, cpus: 4, memory_mb: 8192, disk_gb: 200, address: 198.51.100.12,
          vm: {kvm_host: kvm-1, image: debian-12}}
tiers:
  hot: {hosts: [pi-1, pi-2], path: /srv/hot, capacity_gb: 50, max_age_days: 7}
  warm: {hosts: [nas-1], path: /srv/warm, capacity_gb: 4000, max_age_days: 90}
  cold: {hosts: [ops-1], path: /srv/cold, capacity_gb: 400}
""" % ("a" * 64)

GB12 = 1_200_000_000
DAY = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)  # 11:00 in Berlin: no host in quiet hours (pi-2's are 13:00-14:00)


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    # no mesh: the cold tier's route across sites (a tier pass's, `tier-no-route`) is not what placement reads
    return load_text(FLEET, skip=frozenset({"tier-no-route"}))


def base_facts() -> dict[str, HostFacts | Unavailable]:
    return {
        "pi-1": HostFacts(cpus_free=2.1, memory_free_mb=3000),
        "pi-2": HostFacts(cpus_free=2.5, memory_free_mb=3000),
        "nas-1": HostFacts(cpus_free=3.0, memory_free_mb=6000),
        "ops-1": HostFacts(cpus_free=3.5, memory_free_mb=7000),
        "kvm-1": HostFacts(cpus_free=12.0, memory_free_mb=60000),
    }


@dataclass
class Scenario:
    task: dict[str, Any]
    expected: str | None
    reasons: list[str]
    facts: dict[str, dict[str, Any] | str] = field(default_factory=dict)  # overrides; a str: unavailable
    placed: list[Placed] = field(default_factory=list)
    now: datetime = DAY


PI_TASK = {"command": "summarise", "arch": "aarch64"}
READINGS = {"command": "summarise", "data": ["pi-1:/srv/hot/readings"]}

SCENARIOS: dict[str, Scenario] = {
    "architecture mismatch": Scenario(PI_TASK, "pi-2", [
        "pi-2: chosen, 2.5 CPUs free", "pi-1: eligible, 2.1 CPUs free",
        "nas-1: excluded, architecture x86_64, the task needs aarch64",
        "ops-1: excluded, architecture x86_64, the task needs aarch64",
        "kvm-1: excluded, a KVM host runs VMs, not tasks; architecture x86_64, the task needs aarch64"]),
    "not enough memory on the Pis: the edge NAS before the cloud": Scenario(
        {"command": "embed", "memory_mb": 3500}, "nas-1", [
            "nas-1: chosen, 3.0 CPUs free", "ops-1: eligible, 3.5 CPUs free",
            "pi-1: excluded, 3000 MiB free, the task needs 3500",
            "pi-2: excluded, 3000 MiB free, the task needs 3500"]),
    "memory already placed counts": Scenario(
        {"command": "embed", "memory_mb": 3500}, "ops-1", [
            "ops-1: chosen, 3.5 CPUs free", "nas-1: excluded, 3000 MiB free, the task needs 3500"],
        placed=[Placed("nas-1", 0.5, 3000)]),
    "not enough CPU once placed tasks count": Scenario(
        {"command": "infer", "cpus": 2, "arch": "aarch64"}, "pi-1", [
            "pi-1: chosen, 2.1 CPUs free", "pi-2: excluded, 0.5 CPUs free, the task needs 2"],
        placed=[Placed("pi-2", 2.0, 100)]),
    "a fleet's memory the host does not have at all": Scenario(
        {"command": "train", "memory_mb": 6000, "arch": "aarch64"}, None, [
            "pi-1: excluded, 4096 MiB of memory in all, the task needs 6000"]),
    "quiet hours crossing midnight, in the fleet's time zone": Scenario(
        PI_TASK, "pi-2", ["pi-2: chosen, 2.5 CPUs free", "pi-1: excluded, quiet hours until 06:00"],
        facts={"pi-1": {"cpus_free": 4.0}}, now=datetime(2026, 11, 30, 22, 30, tzinfo=UTC)),
    "quiet hours after midnight": Scenario(
        PI_TASK, "pi-2", ["pi-1: excluded, quiet hours until 06:00"],
        facts={"pi-1": {"cpus_free": 4.0}}, now=datetime(2026, 12, 1, 4, 59, tzinfo=UTC)),
    "quiet hours ended at 06:00": Scenario(
        PI_TASK, "pi-1", ["pi-1: chosen, 4.0 CPUs free"],
        facts={"pi-1": {"cpus_free": 4.0}}, now=datetime(2026, 12, 1, 5, 0, tzinfo=UTC)),
    "a task allowed in quiet hours": Scenario(
        {**PI_TASK, "power": {"run_in_quiet_hours": True}}, "pi-1", ["pi-1: chosen, 4.0 CPUs free"],
        facts={"pi-1": {"cpus_free": 4.0}}, now=datetime(2026, 11, 30, 22, 30, tzinfo=UTC)),
    "quiet hours within a day": Scenario(
        PI_TASK, "pi-1", ["pi-2: excluded, quiet hours until 14:00", "pi-1: chosen, 2.1 CPUs free"],
        now=datetime(2026, 11, 30, 12, 30, tzinfo=UTC)),
    "battery below the task's threshold": Scenario(
        READINGS, "nas-1", ["pi-1: excluded, on battery at 35%, the task needs 50%",
                            "nas-1: chosen, 1.2 GB of its data on site edge, 3.0 CPUs free",
                            "pi-2: eligible, 1.2 GB of its data on site edge, 2.5 CPUs free"],
        facts={"pi-1": {"on_mains": False, "battery_percent": 35, "data_bytes": {"/srv/hot/readings": GB12}}}),
    "battery above the task's threshold": Scenario(
        READINGS, "pi-1", ["pi-1: chosen, 1.2 GB of its data local, 2.1 CPUs free"],
        facts={"pi-1": {"on_mains": False, "battery_percent": 80, "data_bytes": {"/srv/hot/readings": GB12}}}),
    "never at or below the host's shutdown threshold": Scenario(
        {**PI_TASK, "power": {"min_battery_percent": 10}}, "pi-2",
        ["pi-1: excluded, on battery at 15%, the task needs 16%"],
        facts={"pi-1": {"on_mains": False, "battery_percent": 15, "cpus_free": 4.0}}),
    "on battery, charge unknown": Scenario(
        PI_TASK, "pi-2", ["pi-1: excluded, on battery, its charge unknown (the task needs 50%)"],
        facts={"pi-1": {"on_mains": False, "cpus_free": 4.0}}),
    "the UPS guard's low-battery signal": Scenario(
        PI_TASK, "pi-2", ["pi-1: excluded, battery low (the UPS guard's signal)"],
        facts={"pi-1": {"battery_low": True, "on_mains": None, "cpus_free": 4.0}}),
    "the host's pause marker outside its quiet hours (the UPS guard's)": Scenario(
        PI_TASK, "pi-1", ["pi-2: excluded, the host pauses agent tasks (/run/spark/quiet), outside its quiet hours"],
        facts={"pi-2": {"paused": True}}),
    "the pause marker of quiet hours, for a task allowed in them": Scenario(
        {**PI_TASK, "power": {"run_in_quiet_hours": True}}, "pi-1", ["pi-1: chosen, 4.0 CPUs free"],
        facts={"pi-1": {"cpus_free": 4.0, "paused": True}}, now=datetime(2026, 11, 30, 22, 30, tzinfo=UTC)),
    "a drained host": Scenario(
        PI_TASK, "pi-1", ["pi-2: excluded, drained", "pi-1: chosen, 2.1 CPUs free"], facts={"pi-2": {"drained": True}}),
    "the site's worker is not ready": Scenario(
        PI_TASK, "pi-1", ["pi-2: excluded, the edge site's worker is not ready"],
        facts={"pi-2": {"worker_ready": False}}),
    "facts unavailable: excluded, never guessed": Scenario(
        PI_TASK, "pi-1", ["pi-2: excluded, facts unavailable: cannot reach pi-2 over SSH"],
        facts={"pi-2": "cannot reach pi-2 over SSH"}),
    "no facts given for a host": Scenario(
        {"command": "x"}, "nas-1", ["ops-1: excluded, facts unavailable: none given"], facts={"ops-1": "-"}),
    "data locality wins over spread": Scenario(
        READINGS, "pi-1", [
            "pi-1: chosen, 1.2 GB of its data local, 2 tasks placed there, 1.1 CPUs free",
            "pi-2: eligible, 1.2 GB of its data on site edge, 2.5 CPUs free",
            "ops-1: eligible, none of its data on its site, 3.5 CPUs free"],
        facts={"pi-1": {"data_bytes": {"/srv/hot/readings": GB12}}},
        placed=[Placed("pi-1", 0.5, 100), Placed("pi-1", 0.5, 100)]),
    "the data's host drained: its tier copy on the NAS": Scenario(
        READINGS, "nas-1", ["pi-1: excluded, drained", "nas-1: chosen, 1.2 GB of its data local, 3.0 CPUs free"],
        facts={"pi-1": {"drained": True, "data_bytes": {"/srv/hot/readings": GB12}},
               "nas-1": {"data_bytes": {"/srv/warm/pi-1/readings": GB12}}}),
    "data on the site beats the cloud's free CPUs": Scenario(
        {**READINGS, "arch": "x86_64", "prefer_edge": False}, "nas-1",
        ["nas-1: chosen, 1.2 GB of its data on site edge, 3.0 CPUs free",
         "ops-1: eligible, none of its data on its site, 3.5 CPUs free"],
        facts={"pi-1": {"data_bytes": {"/srv/hot/readings": GB12}}}),
    "spread: fewest tasks placed first": Scenario(
        PI_TASK, "pi-1", ["pi-1: chosen, 2.1 CPUs free", "pi-2: eligible, 1 task placed there, 2.0 CPUs free"],
        placed=[Placed("pi-2", 0.5, 100)]),
    "the edge preferred": Scenario(
        {"command": "x", "arch": "x86_64"}, "nas-1",
        ["nas-1: chosen, 3.0 CPUs free", "ops-1: eligible, 3.5 CPUs free"]),
    "no edge preference: most CPUs free": Scenario(
        {"command": "x", "arch": "x86_64", "prefer_edge": False}, "ops-1", ["ops-1: chosen, 3.5 CPUs free"]),
    "ties go to the host's name": Scenario(
        PI_TASK, "pi-1", ["pi-1: chosen, 2.5 CPUs free", "pi-2: eligible, 2.5 CPUs free"],
        facts={"pi-1": {"cpus_free": 2.5}}),
    "CPUs free differing below the tenth shown are a tie": Scenario(
        PI_TASK, "pi-1", ["pi-1: chosen, 2.5 CPUs free", "pi-2: eligible, 2.5 CPUs free"],
        facts={"pi-1": {"cpus_free": 2.46}, "pi-2": {"cpus_free": 2.54}}),
    "labels required": Scenario(
        {"command": "x", "labels": {"role": "agent"}}, "pi-2", ["nas-1: excluded, no label role=agent"]),
    "an image needs a container runtime": Scenario(
        {"command": "x", "image": "registry.example.org/primespark/x:1.0"}, None,
        ["pi-1: excluded, no container runtime (the task runs in an image)"]),
    "no eligible host": Scenario(
        PI_TASK, None, [
            "kvm-1: excluded, a KVM host runs VMs, not tasks; architecture x86_64, the task needs aarch64",
            "nas-1: excluded, architecture x86_64, the task needs aarch64",
            "ops-1: excluded, architecture x86_64, the task needs aarch64",
            "pi-1: excluded, quiet hours until 06:00",
            "pi-2: excluded, drained"],
        facts={"pi-2": {"drained": True}}, now=datetime(2026, 11, 30, 22, 30, tzinfo=UTC)),
}


def decide(fleet: Fleet, scenario: Scenario) -> Decision:
    facts = base_facts()
    for host, change in scenario.facts.items():
        if isinstance(change, str):
            if change == "-":
                del facts[host]
            else:
                facts[host] = Unavailable(change)
        else:
            current = facts[host]
            assert isinstance(current, HostFacts)
            facts[host] = replace(current, **change)
    return place(fleet, TaskSpec.model_validate(scenario.task), facts, scenario.placed, scenario.now, "summarise")


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_placement(fleet: Fleet, scenario: Scenario) -> None:
    decision = decide(fleet, scenario)
    assert decision.host == scenario.expected, decision.reasons()
    missing = [r for r in scenario.reasons if r not in decision.reasons()]
    assert not missing, f"missing {missing}; got {decision.reasons()}"
    # one verdict per host of the fleet, the chosen one first
    assert sorted(c.host for c in decision.candidates) == sorted(fleet.hosts)
    if decision.host is not None:
        assert decision.candidates[0].host == decision.host and decision.candidates[0].verdict == "chosen"


def test_no_eligible_host_is_one_located_error_naming_every_candidate(fleet: Fleet) -> None:
    decision = decide(fleet, SCENARIOS["no eligible host"])
    error = NoEligibleHost("tasks.summarise", decision)
    assert error.message.startswith("tasks.summarise: no host can run it now: kvm-1: excluded, ")
    for reason in decision.reasons():
        assert reason in error.message
    assert "\n" not in error.message


def test_equal_inputs_give_equal_decisions_whatever_their_order(fleet: Fleet) -> None:
    scenario = SCENARIOS["ties go to the host's name"]
    first = decide(fleet, scenario)
    facts = dict(reversed(list(base_facts().items())))
    facts["pi-1"] = HostFacts(cpus_free=2.5, memory_free_mb=3000)
    again = place(fleet, TaskSpec.model_validate(scenario.task), facts, [], scenario.now, "summarise")
    assert again == first


def test_a_host_kept_off_by_the_run_is_excluded_with_its_reason_whatever_its_facts(fleet: Fleet) -> None:
    task = TaskSpec.model_validate(PI_TASK)
    assert place(fleet, task, base_facts(), [], DAY).host == "pi-2"
    decision = place(fleet, task, base_facts(), [], DAY, keep_off={"pi-2": "lost mid-task at 10:59:58"})
    assert decision.host == "pi-1"
    assert "pi-2: excluded, lost mid-task at 10:59:58" in decision.reasons()
    # a host the fleet rules out keeps the fleet's reason; one not kept off is placed as before
    decision = place(fleet, task, base_facts(), [], DAY, keep_off={"pi-1": "lost", "pi-2": "lost", "ops-1": "lost"})
    assert decision.host is None
    assert "ops-1: excluded, architecture x86_64, the task needs aarch64" in decision.reasons()
    assert "pi-1: excluded, lost" in decision.reasons()


def test_hosts_that_may_take_a_task_later_are_those_only_live_facts_keep_off(fleet: Fleet) -> None:
    """Quiet hours, a drain, a full host pass; a KVM host, an architecture, a label, a size beyond the host's own do
    not; nor does a host the run keeps off."""
    anywhere = TaskSpec(command="true", memory_mb=64)
    assert may_take_later(fleet, anywhere) == sorted(h for h in fleet.hosts if h != "kvm-1")
    assert may_take_later(fleet, anywhere, {"pi-1": "lost mid-task at 12:00:00"}) == sorted(
        h for h in fleet.hosts if h not in ("kvm-1", "pi-1"))
    assert may_take_later(fleet, TaskSpec(command="true", memory_mb=10**6)) == []
    arm = TaskSpec(command="true", arch=[Arch.aarch64])
    assert may_take_later(fleet, arm) == sorted(h for h, spec in fleet.hosts.items()
                                                if spec.arch is Arch.aarch64 and h != "kvm-1")


def test_a_naive_now_is_refused(fleet: Fleet) -> None:
    with pytest.raises(ValueError, match="aware"):
        place(fleet, TaskSpec(command="x"), base_facts(), [], datetime(2026, 11, 30, 10, 0), "x")


@pytest.mark.parametrize(("window", "now", "until"), [
    (("23:00", "06:00"), "22:59", None), (("23:00", "06:00"), "23:00", "06:00"), (("23:00", "06:00"), "00:00", "06:00"),
    (("23:00", "06:00"), "05:59", "06:00"), (("23:00", "06:00"), "06:00", None),
    (("01:00", "02:00"), "01:00", "02:00"), (("01:00", "02:00"), "02:00", None), (("01:00", "02:00"), "00:59", None),
])
def test_quiet_hours_window(fleet: Fleet, window: tuple[str, str], now: str, until: str | None) -> None:
    from datetime import time

    from primespark.fleet.model import PowerProfile

    host = fleet.hosts["pi-1"].model_copy(update={"power": PowerProfile(quiet_hours=window)})
    assert quiet_until(host, time.fromisoformat(now)) == until


def test_where_copies_of_data_are_kept(fleet: Fleet) -> None:
    assert data_places(fleet, "pi-1:/srv/hot/readings") == [("pi-1", "/srv/hot/readings"),
                                                           ("nas-1", "/srv/warm/pi-1/readings"),
                                                           ("ops-1", "/srv/cold/nas-1/pi-1/readings")]
    # the layout as tier migration reads it back
    from primespark.data.migrate import origin_of

    assert origin_of(fleet, "ops-1", "/srv/cold/nas-1/pi-1/readings") == ("pi-1", "/srv/hot/readings")
    assert data_places(fleet, "/srv/hot/config") == [("pi-1", "/srv/hot/config"), ("pi-2", "/srv/hot/config")]
    assert data_places(fleet, "/opt/models") == []


# --- properties over random facts: what any decision must hold ---------------------------------------------------

HOSTS = ("pi-1", "pi-2", "nas-1", "ops-1", "kvm-1")
host_facts = st.builds(
    HostFacts, cpus_free=st.floats(0, 4), memory_free_mb=st.integers(0, 8192),
    on_mains=st.sampled_from([True, False, None]),
    battery_percent=st.one_of(st.none(), st.floats(0, 100)), battery_low=st.booleans(), drained=st.booleans(),
    paused=st.booleans(), worker_ready=st.booleans(),
    data_bytes=st.dictionaries(st.sampled_from(["/srv/hot/readings", "/srv/warm/pi-1/readings"]),
                               st.integers(0, 10**10), max_size=2))
facts_maps = st.dictionaries(st.sampled_from(HOSTS), st.one_of(host_facts, st.just(Unavailable("unreachable"))))
placements = st.lists(st.builds(Placed, st.sampled_from(HOSTS), st.floats(0.1, 2), st.integers(0, 2048)), max_size=6)
moments = st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2027, 1, 1), timezones=st.just(UTC))
tasks = st.builds(dict, command=st.just("x"), cpus=st.sampled_from([0.5, 1, 2]),
                  memory_mb=st.sampled_from([128, 2048, 5000]), data=st.just(["pi-1:/srv/hot/readings"]),
                  arch=st.sampled_from([[], ["aarch64"], ["x86_64"]]), prefer_edge=st.booleans())


@settings(max_examples=200, deadline=None)
@given(facts=facts_maps, placed=placements, now=moments, task=tasks, seed=st.randoms())
def test_any_decision_holds_its_constraints_and_ignores_input_order(
        fleet: Fleet, facts: dict[str, HostFacts | Unavailable], placed: list[Placed], now: datetime,
        task: dict[str, Any], seed: Any) -> None:
    spec = TaskSpec.model_validate(task)
    decision = place(fleet, spec, facts, placed, now, "t")
    assert sorted(c.host for c in decision.candidates) == sorted(fleet.hosts)  # one verdict per host
    assert [c.verdict for c in decision.candidates].count("chosen") == (decision.host is not None)
    if decision.host is not None:
        found = facts[decision.host]
        assert isinstance(found, HostFacts) and not found.drained and found.worker_ready and not found.battery_low
        taken = sum(p.cpus for p in placed if p.host == decision.host)
        assert found.cpus_free - taken >= spec.cpus
        assert not spec.arch or fleet.hosts[decision.host].arch in spec.arch
    shuffled_facts = dict(seed.sample(list(facts.items()), len(facts)))
    shuffled_placed = seed.sample(placed, len(placed))
    assert place(fleet, spec, shuffled_facts, shuffled_placed, now, "t").host == decision.host
