"""The live facts placement reads: a node exporter's metrics text (a captured sample), and reading them on a host."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_fleets import fleet_ca, node_exporter

from primespark.agents.facts import (
    HostReading,
    facts_from_metrics,
    hosts_to_read,
    load_facts_file,
    parse_metrics,
    read_host,
    read_reading,
)
from primespark.agents.placement import HostFacts, Unavailable
from primespark.errors import UserError
from primespark.fleet import load_text
from primespark.fleet.model import Fleet, TaskSpec
from primespark.hosts import LocalHosts

# Captured from node exporter 1.5 on a 4-core Pi (trimmed: a few families of the ~1,000 lines), with the UPS guard's
# textfile metrics (spark_power.prom) as the textfile collector serves them.
SAMPLE = """\
# HELP go_goroutines Number of goroutines that currently exist.
# TYPE go_goroutines gauge
go_goroutines 8
# HELP node_cpu_seconds_total Seconds the CPUs spent in each mode.
# TYPE node_cpu_seconds_total counter
node_cpu_seconds_total{cpu="0",mode="idle"} 951373.86
node_cpu_seconds_total{cpu="0",mode="iowait"} 1032.17
node_cpu_seconds_total{cpu="0",mode="system"} 4128.5
node_cpu_seconds_total{cpu="0",mode="user"} 12049.41
node_cpu_seconds_total{cpu="1",mode="idle"} 950211.2
node_cpu_seconds_total{cpu="1",mode="user"} 13311.07
node_cpu_seconds_total{cpu="2",mode="idle"} 952880.71
node_cpu_seconds_total{cpu="2",mode="user"} 11204.9
node_cpu_seconds_total{cpu="3",mode="idle"} 949502.33
node_cpu_seconds_total{cpu="3",mode="user"} 14090.02
# HELP node_load1 1m load average.
# TYPE node_load1 gauge
node_load1 1.9
# HELP node_load5 5m load average.
# TYPE node_load5 gauge
node_load5 1.62
# HELP node_memory_MemAvailable_bytes Memory information field MemAvailable_bytes.
# TYPE node_memory_MemAvailable_bytes gauge
node_memory_MemAvailable_bytes 2.68435456e+09
# HELP node_memory_MemTotal_bytes Memory information field MemTotal_bytes.
# TYPE node_memory_MemTotal_bytes gauge
node_memory_MemTotal_bytes 4.124237824e+09
# HELP node_time_seconds System time in seconds since epoch (1970).
# TYPE node_time_seconds gauge
node_time_seconds 1.7644896423e+09
# HELP node_textfile_scrape_error 1 if there was an error opening or reading a file, 0 otherwise
# TYPE node_textfile_scrape_error gauge
node_textfile_scrape_error 0
# HELP spark_power_battery_charge_percent The UPS battery's charge (NUT)
# TYPE spark_power_battery_charge_percent gauge
spark_power_battery_charge_percent{signal="nut"} 42
# HELP spark_power_battery_low 1 when the battery is at or below the shutdown threshold
# TYPE spark_power_battery_low gauge
spark_power_battery_low{signal="nut"} 0
# HELP spark_power_check_timestamp_seconds When the power signal was last read
# TYPE spark_power_check_timestamp_seconds gauge
spark_power_check_timestamp_seconds{signal="nut"} 1.7644896e+09
# HELP spark_power_on_battery 1 while the UPS runs on battery (NUT's OB status)
# TYPE spark_power_on_battery gauge
spark_power_on_battery{signal="nut"} 1
"""

FLEET = """
name: facts
sites:
  edge: {kind: edge, lan: 192.0.2.0/24}
hosts:
  pi-1: {kind: pi, site: edge, arch: aarch64, cpus: 4, memory_mb: 4096, disk_gb: 64, address: 192.0.2.11,
         power: {ups_signal: nut}}
  pi-2: {kind: pi, site: edge, arch: aarch64, cpus: 2, memory_mb: 2048, disk_gb: 64, address: 192.0.2.12}
  nas-1: {kind: nas, site: edge, cpus: 4, memory_mb: 8192, disk_gb: 8000, address: 192.0.2.20}
tiers:
  hot: {hosts: [pi-1, pi-2], path: /srv/hot, capacity_gb: 50, max_age_days: 7}
  warm: {hosts: [nas-1], path: /srv/warm, capacity_gb: 4000}
monitoring: {node_exporter_port: %d}
"""


# the fleet's CA lives in Vault/OpenBao: its exporters serve TLS (the address is never reached here)
VAULT = "secrets: {backend: vault, address: 'https://vault.invalid:8200'}\n"


def fleet_on(port: int = 9100) -> Fleet:
    return load_text(FLEET % port)


def test_the_sample_parses_by_sample_name() -> None:
    samples = parse_metrics(SAMPLE)
    assert samples["node_load1"] == [({}, 1.9)]
    assert len(samples["node_cpu_seconds_total"]) == 10
    assert samples["spark_power_on_battery"] == [({"signal": "nut"}, 1.0)]


def test_facts_from_a_captured_sample() -> None:
    facts = facts_from_metrics(fleet_on(), "pi-1", SAMPLE, data_bytes={"/srv/hot/readings": 5})
    # 4 CPUs (the distinct `cpu` labels) minus the 1-minute load; MemAvailable in MiB; on battery at 42%
    assert facts == HostFacts(cpus_free=pytest.approx(2.1), memory_free_mb=2560, on_mains=False,
                              battery_percent=42.0, battery_low=False, data_bytes={"/srv/hot/readings": 5})


def test_a_host_never_offers_more_than_the_fleet_gives_it() -> None:
    # pi-2 is a 2-CPU, 2 GiB host in the fleet; the sample's machine has 4 CPUs and 2.5 GiB available
    facts = facts_from_metrics(fleet_on(), "pi-2", SAMPLE)
    assert isinstance(facts, HostFacts)
    assert facts.cpus_free == pytest.approx(0.1) and facts.memory_free_mb == 2048
    assert facts.on_mains is True  # no UPS signal: mains is its only supply


def test_a_lab_host_counts_its_share_of_the_machines_load() -> None:
    # The lab's three hosts are containers of one machine, whose load (1.9) each exporter reads: pi-2 (2 CPUs)
    # has 2 - 1.9 / 3 free there, not the 0.1 a host with the whole load would offer.
    lab = load_text(FLEET % 9100 + "lab: {wan: 198.51.100.0/24}\n")
    facts = facts_from_metrics(lab, "pi-2", SAMPLE)
    assert isinstance(facts, HostFacts) and facts.cpus_free == pytest.approx(2 - 1.9 / 3)


def test_missing_metrics_make_the_host_unavailable_not_guessed() -> None:
    no_load = "\n".join(line for line in SAMPLE.splitlines() if "node_load1" not in line)
    assert facts_from_metrics(fleet_on(), "pi-2", no_load) == Unavailable("its metrics hold no node_load1")
    no_power = "\n".join(line for line in SAMPLE.splitlines() if "spark_power" not in line)
    found = facts_from_metrics(fleet_on(), "pi-1", no_power)
    assert isinstance(found, Unavailable) and "ups_signal is nut" in found.reason
    assert isinstance(facts_from_metrics(fleet_on(), "pi-2", "node_load1{ 1"), Unavailable)


def test_a_stale_ups_reading_makes_the_host_unavailable() -> None:
    stale = SAMPLE.replace("node_time_seconds 1.7644896423e+09", "node_time_seconds 1.7644906e+09")
    found = facts_from_metrics(fleet_on(), "pi-1", stale)
    assert found == Unavailable("its UPS reading is 17 min old (spark-ups-guard reads it every minute; is its cron "
                                "running?)")
    no_clock = "\n".join(line for line in SAMPLE.splitlines() if "node_time_seconds" not in line)
    found = facts_from_metrics(fleet_on(), "pi-1", no_clock)
    assert isinstance(found, Unavailable) and "age of its UPS reading is unknown" in found.reason


def test_the_hosts_read_are_those_not_ruled_out_and_those_holding_its_data() -> None:
    task = TaskSpec(command="x", arch=["aarch64"], data=["pi-1:/srv/hot/readings"])
    assert hosts_to_read(fleet_on(), task) == {"pi-1": ["/srv/hot/readings"], "pi-2": [],
                                               "nas-1": ["/srv/warm/pi-1/readings"]}


@pytest.fixture
def exporter() -> Iterator[int]:
    """A stand-in node exporter on this machine, serving the sample."""

    with node_exporter(SAMPLE) as port:
        yield port


def test_reading_a_host_through_its_runner(exporter: int, tmp_path: Path) -> None:
    (tmp_path / "readings").mkdir()
    (tmp_path / "readings" / "a.csv").write_bytes(b"x" * 1000)
    (tmp_path / "readings" / "b.csv").write_bytes(b"x" * 234)
    fleet = fleet_on(exporter)
    found = read_host(LocalHosts(), fleet, "pi-1", [str(tmp_path / "readings"), str(tmp_path / "none")],
                      worker_ready=True)
    assert isinstance(found, HostFacts), found
    assert found.data_bytes == {str(tmp_path / "readings"): 1234, str(tmp_path / "none"): 0}
    assert found.on_mains is False and found.battery_percent == 42.0
    assert not found.drained and not found.paused  # this machine has no /run/spark markers


def test_an_exporter_that_does_not_answer_makes_the_host_unavailable(exporter: int) -> None:
    found = read_host(LocalHosts(), fleet_on(1), "pi-2", [], worker_ready=True)
    assert isinstance(found, Unavailable) and "node exporter on port 1 did not answer" in found.reason


def test_a_fleet_with_a_ca_reads_the_exporter_over_tls_verified_as_the_host(tmp_path: Path) -> None:
    own, other = fleet_ca(tmp_path / "pi-1", "pi-1"), fleet_ca(tmp_path / "pi-2", "pi-2")
    with node_exporter(SAMPLE, tls=own) as port:
        fleet = load_text(FLEET % port + VAULT)
        found = read_reading(LocalHosts(), fleet, "pi-1", tls_folder=own)
        assert isinstance(found, HostReading) and found.metrics == SAMPLE, found
        # the same exporter is not pi-2 (its name is not in the certificate), nor is another CA's certificate
        as_other = read_reading(LocalHosts(), fleet, "pi-2", tls_folder=own)
        assert isinstance(as_other, HostReading) and as_other.metrics is None
        assert "did not answer" in as_other.error and "pi-2" in as_other.error, as_other.error
        foreign = read_reading(LocalHosts(), fleet, "pi-1", tls_folder=other)
        assert isinstance(foreign, HostReading) and "CERTIFICATE_VERIFY_FAILED" in foreign.error, foreign.error
    with node_exporter(SAMPLE) as plain:  # a fleet with a CA never reads a plaintext exporter
        found = read_reading(LocalHosts(), load_text(FLEET % plain + VAULT), "pi-1", tls_folder=own)
        assert isinstance(found, HostReading) and found.metrics is None and "did not answer" in found.error


def test_a_facts_file_with_a_bad_field_is_one_located_error(tmp_path: Path) -> None:
    bad = tmp_path / "facts.yaml"
    bad.write_text("hosts:\n  pi-1:\n    cpus_free: 2\n    memory_free: 100\n")
    with pytest.raises(UserError, match=r"facts.yaml:4: hosts.pi-1.memory_free: Extra inputs are not permitted"):
        load_facts_file(bad)
    good = tmp_path / "good.yaml"
    good.write_text("now: 2026-11-30T22:30:00Z\nhosts:\n  pi-1: {cpus_free: 2, memory_free_mb: 100}\n"
                    "  pi-2: {unavailable: powered off}\nplaced: [{host: pi-1, cpus: 0.5, memory_mb: 10}]\n")
    facts, placed = load_facts_file(good).facts(fleet_on(), str(good))
    assert facts["pi-2"] == Unavailable("powered off")
    assert facts["nas-1"] == Unavailable(f"not in {good}")
    assert isinstance(facts["pi-1"], HostFacts) and placed[0].host == "pi-1"


def test_a_sites_worker_readiness_from_its_pool() -> None:
    from primespark.agents.facts import pool_readiness

    assert pool_readiness(fleet_on(), {}) == {"edge": True}  # no orchestration: no worker stands in between
    orchestrated = load_text(FLEET % 9100 + "orchestration: {server: nas-1, workers: {edge: nas-1}}\n")
    assert pool_readiness(orchestrated, {"spark-edge": True}) == {"edge": True}
    assert pool_readiness(orchestrated, {}) == {"edge": False}


def test_an_unknown_worker_state_makes_every_needed_host_unavailable() -> None:
    from primespark.agents.facts import read_facts

    task = TaskSpec(command="x", arch=["aarch64"])  # nas-1 is ruled out by the fleet: not read at all
    found = read_facts(LocalHosts(), fleet_on(1), task, "the Prefect server at http://ops-1:4200 is unreachable")
    assert found == {h: Unavailable("its site's worker state is unknown: the Prefect server at http://ops-1:4200 is "
                                    "unreachable") for h in ("pi-1", "pi-2")}
