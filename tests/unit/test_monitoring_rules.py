"""The generated alert rules under `promtool test rules`: every alert of the production fleet (homelab.yaml, with
its own holds and targets) fires on the series that should page and stays silent on those that should not.

Input series are named through the metric registry, so a renamed metric or label breaks these tests; the
expected annotations are the alert's own templates expanded with the alert's labels, so a summary that does not
name its host, or a runbook link that moved, breaks them too. promtool comes from Debian's `prometheus` package
(`make setup`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from primespark.fleet import load_fleet
from primespark.mesh.plan import allocate
from primespark.monitoring import metrics as m
from primespark.monitoring.alerts import fleet_alerts, rule_groups, runbook_url, sync_limits
from primespark.monitoring.files import RULES_YML, dump_yaml, monitoring_files, write_files
from primespark.monitoring.paths import RULES_FILE
from primespark.monitoring.promql import selector

REPO = Path(__file__).resolve().parents[2]
FLEET = load_fleet(REPO / "inventory" / "homelab.yaml")
ALERTS = {a.name: a for a in fleet_alerts(FLEET)}
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian's prometheus package) is not "
                                    "installed: run `make setup`")
GB = 1_000_000_000


@dataclass
class Case:
    alert: str
    name: str
    series: list[dict[str, str]]
    eval_times: list[str]
    fires: list[dict[str, str]] = field(default_factory=list)  # the alerts' labels (severity added), [] for silence
    interval: str = "1m"

    @property
    def firing(self) -> bool:
        return bool(self.fires)


def series(metric: m.Metric, values: str, **labels: str) -> dict[str, str]:
    return {"series": selector(metric, **labels), "values": values}


NODE = {"job": "node", "instance": "pi-1", "host": "pi-1", "site": "edge", "kind": "pi"}
ROOT = {**NODE, "device": "/dev/mmcblk0p2", "fstype": "ext4", "mountpoint": "/"}


def filesystem(avail: str, *, size: int = 100 * GB, readonly: int = 0, samples: int = 400) -> list[dict[str, str]]:
    return [series(m.NODE_FS_AVAIL, avail, **ROOT), series(m.NODE_FS_SIZE, f"{size}x{samples}", **ROOT),
            series(m.NODE_FS_READONLY, f"{readonly}x{samples}", **ROOT)]


def every(start_minutes: int, end_minutes: int, step: int) -> list[str]:
    return [f"{t}m" for t in range(start_minutes, end_minutes + 1, step)]


# 6 hours at 60% free, then a one-hour burst of writes down to 10% free, cleaned up within 15 minutes, then
# steady again (5-minute samples): free space is low and falling for less than the hour the rules hold for.
BURST = "60e9x72 " + " ".join(f"{60 - 50 * i / 12:.4f}e9" for i in range(1, 13)) + " 10e9 35e9 60e9x150"
# A steady fill of 2% of the disk an hour from 60% free (5-minute samples): it reaches the page zone and stays.
STEADY = f"{60 * GB}-{2 * GB // 12}x360"

DRILL_LATE = ALERTS["DrillOverdue"].threshold
CHECK_LATE = ALERTS["ResticCheckOverdue"].threshold
RPO = FLEET.backup.targets.rpo_hours * 3600  # type: ignore[union-attr]
PLANS = sorted(FLEET.backup.plans)  # type: ignore[union-attr]
REPOSITORIES = sorted(FLEET.backup.repositories)  # type: ignore[union-attr]
BACKUP = {"host": "pi-1", "repository": "nas-primary", "job": "node", "instance": "nas-1", "site": "edge",
          "kind": "nas"}
PAIR = {"mesh": "fleet", "source": "pi-1", "target": "core-1", "job": "node", "instance": "pi-1", "host": "pi-1",
        "site": "edge", "kind": "pi"}


def _others_fresh(metric: m.Metric, label: str, names: list[str], skip: str, steps: int) -> list[dict[str, str]]:
    """Fresh timestamps (5-minute samples, each the sample's own time) for every subject but `skip`."""
    return [series(metric, f"0+300x{steps}", **{label: n}) for n in names if n != skip]


WEEK = 7 * 86400 // 300  # 5-minute samples in a week
WEEKS2 = 2 * WEEK
# A job that ran at time 0 and a week later: each sample holds the time of the latest run.
WEEKLY = f"0x{WEEK - 1} {7 * 86400}x{WEEK}"


def late(threshold: float | None) -> str:
    """An evaluation time past the threshold and the alert's 10-minute hold."""
    assert threshold is not None
    return f"{int(threshold // 3600) + 1}h"


CERT = {"certificate": "/etc/ssl/primespark/cert.pem", **NODE}
# A 24-hour certificate from time 0 (5-minute samples), and one renewed at two thirds of its life (16 h).
KEPT = [series(m.TLS_NOT_BEFORE, "0x300", **CERT), series(m.TLS_NOT_AFTER, "86400x300", **CERT)]
RENEWED = [series(m.TLS_NOT_BEFORE, "0x192 57600x108", **CERT), series(m.TLS_NOT_AFTER, "86400x192 144000x108", **CERT)]

# Sync metrics are on the link's source host, labelled with the job and the source (flows/sync.py).
MIRROR = {"sync_job": "warm-to-cloud", "source": "nas-1", "job": "node", "instance": "nas-1", "host": "nas-1",
          "site": "edge", "kind": "nas"}
HOT = {"sync_job": "hot-to-nas", "source": "pi-1", **NODE}
MODELS = {"sync_job": "models-to-edge", "source": "analytics-1", "job": "node", "instance": "analytics-1",
          "host": "analytics-1", "site": "cloud", "kind": "vm"}
LIMITS = {(x.job, x.source): x for x in sync_limits(FLEET)}
MIRROR_LAG = LIMITS["warm-to-cloud", "nas-1"].lag  # continuous, no pause: the watcher restart budget
HOT_LAG = LIMITS["hot-to-nas", "pi-1"].lag  # continuous, paused in pi-1's quiet hours: the budget plus 7.5 h
MODELS_AGE = LIMITS["models-to-edge", "analytics-1"].age  # every 30 minutes
NEVER = max(x.longest for x in LIMITS.values())
assert MIRROR_LAG and HOT_LAG and MODELS_AGE and HOT_LAG > MIRROR_LAG + 7 * 3600


def _links_fresh(skip: str | None, steps: int) -> list[dict[str, str]]:
    """Every link with a limit but `skip` (a job) publishing a success at each 5-minute sample."""
    return [series(m.SYNC_LAST_SUCCESS, f"0+300x{steps}", sync_job=job, source=source) for job, source in LIMITS
            if job != skip]


# A pass every 30 minutes (5-minute samples, each holding the time of the latest success), for 6 hours.
HALF_HOURLY = " ".join(f"{k * 1800}x5" for k in range(12))

# The Prefect export's file, on the server's host (ops-1): its pools, agent-task runs and its own time, written every
# minute (1-minute samples, each export's time its sample's own).
SERVER = {"job": "node", "instance": "ops-1", "host": "ops-1", "site": "cloud", "kind": "vm"}
EDGE_POOL, CLOUD_POOL = {"pool": "spark-edge", **SERVER}, {"pool": "spark-cloud", **SERVER}
EXPORTING = series(m.PREFECT_EXPORT_TIME, "0+60x40", **SERVER)
SUMMARISE = {"template": "summarise", **SERVER}

CASES: list[Case] = [
    Case("HostDown", "a host silent past the hold", [series(m.UP, "1 1 0x10", **NODE)], ["10m"], [NODE]),
    Case("HostDown", "a missed scrape or two", [series(m.UP, "1 0 0 1x10", **NODE)], ["2m", "10m"]),
    Case("MonitoringTargetDown", "Alertmanager not answering",
         [series(m.UP, "0x10", job="alertmanager", instance="ops-1", host="ops-1", site="cloud", kind="vm")],
         ["10m"], [{"job": "alertmanager", "instance": "ops-1", "host": "ops-1", "site": "cloud", "kind": "vm"}]),
    Case("MonitoringTargetDown", "a host down is HostDown's, not this one's", [series(m.UP, "0x10", **NODE)],
         ["10m"]),
    Case("FilesystemFillingUp", "a steady fill, at a day's trend", filesystem(STEADY), ["12h"], [ROOT],
         interval="5m"),
    Case("FilesystemFillingUp", "a one-hour write burst, then clean-up", filesystem(BURST, samples=240),
         every(360, 600, 10), interval="5m"),
    Case("FilesystemFillingUp", "low but not falling", filesystem("30e9x200"), ["10h"], interval="5m"),
    Case("FilesystemFillingUpFast", "a steady fill pages before the disk is full", filesystem(STEADY), ["28h"],
         [ROOT], interval="5m"),
    Case("FilesystemFillingUpFast", "a one-hour write burst, then clean-up, does not page",
         filesystem(BURST, samples=240), every(360, 600, 5), interval="5m"),
    Case("FilesystemFillingUpFast", "a read-only filesystem, falling", filesystem(STEADY, readonly=1), ["28h"],
         interval="5m"),
    Case("FilesystemAlmostFull", "under 5% free for half an hour", filesystem("4e9x60"), ["40m"], [ROOT]),
    Case("FilesystemAlmostFull", "under 5% free, read-only", filesystem("4e9x60", readonly=1), ["40m"]),
    Case("FilesystemAlmostFull", "a one-hour write burst, then clean-up", filesystem(BURST, samples=240),
         every(360, 600, 10), interval="5m"),
    Case("ClockSkew", "an offset that grows", [series(m.NODE_TIMEX_OFFSET, "0.06+0.001x30", **NODE)], ["20m"],
         [NODE]),
    Case("ClockSkew", "an offset that converges", [series(m.NODE_TIMEX_OFFSET, "0.2-0.001x30", **NODE)], ["20m"]),
    Case("BackupFailed", "the last run failed", [series(m.BACKUP_SUCCESS, "1 1 0x5", **BACKUP)], ["5m"], [BACKUP]),
    Case("BackupFailed", "every run succeeded", [series(m.BACKUP_SUCCESS, "1x10", **BACKUP)], ["10m"]),
    Case("BackupTooOld", "no snapshot since the RPO target",
         [series(m.BACKUP_SNAPSHOT_TIME, "0x400", **BACKUP),
          *_others_fresh(m.BACKUP_SNAPSHOT_TIME, "host", PLANS, "pi-1", 400)],
         [f"{int(RPO // 3600) + 1}h"], [BACKUP], interval="5m"),
    Case("BackupTooOld", "a host with a plan that never reported",
         _others_fresh(m.BACKUP_SNAPSHOT_TIME, "host", PLANS, "pi-1", 400), [f"{int(RPO // 3600) + 1}h"],
         [{"host": "pi-1", "condition": "no-data"}], interval="5m"),
    Case("BackupTooOld", "a snapshot every 5 minutes",
         [series(m.BACKUP_SNAPSHOT_TIME, "0+300x400", **BACKUP),
          *_others_fresh(m.BACKUP_SNAPSHOT_TIME, "host", PLANS, "pi-1", 400)], ["28h"], interval="5m"),
    Case("DrillFailed", "the last drill failed", [series(m.DRILL_SUCCESS, "0x5", host="pi-1")], ["3m"],
         [{"host": "pi-1"}]),
    Case("DrillFailed", "the drill passed", [series(m.DRILL_SUCCESS, "1x5", host="pi-1")], ["3m"]),
    Case("DrillOverdue", "no drill for longer than the schedule allows",
         [series(m.DRILL_LAST_RUN, f"0x{WEEKS2}", host="pi-1"),
          *_others_fresh(m.DRILL_LAST_RUN, "host", PLANS, "pi-1", WEEKS2)],
         [late(DRILL_LATE)], [{"host": "pi-1"}], interval="5m"),
    Case("DrillOverdue", "weekly drills", [series(m.DRILL_LAST_RUN, WEEKLY, host=h) for h in PLANS],
         ["13d"], interval="5m"),
    Case("ResticCheckFailed", "check found damage",
         [series(m.CHECK_SUCCESS, "0x5", repository="nas-primary", client="pi-1", host="nas-1")], ["3m"],
         [{"repository": "nas-primary", "client": "pi-1", "host": "nas-1"}]),
    Case("ResticCheckFailed", "check passed",
         [series(m.CHECK_SUCCESS, "1x5", repository="nas-primary", client="pi-1", host="nas-1")], ["3m"]),
    Case("ResticCheckOverdue", "a repository not checked for too long",
         [series(m.CHECK_LAST_RUN, f"0x{WEEKS2}", repository="nas-primary", host="nas-1"),
          *_others_fresh(m.CHECK_LAST_RUN, "repository", REPOSITORIES, "nas-primary", WEEKS2)],
         [late(CHECK_LATE)], [{"repository": "nas-primary", "host": "nas-1"}], interval="5m"),
    Case("ResticCheckOverdue", "weekly checks", [series(m.CHECK_LAST_RUN, WEEKLY, repository=r) for r in REPOSITORIES],
         ["13d"], interval="5m"),
    Case("MeshPairDown", "a pair that stays down", [series(m.MESH_PAIR_UP, "0x10", **PAIR)], ["10m"], [PAIR]),
    Case("MeshPairDown", "a pair down for one check", [series(m.MESH_PAIR_UP, "1 0 1x10", **PAIR)], ["2m", "10m"]),
    Case("MeshHandshakeStale", "a handshake older than WireGuard keeps a session",
         [series(m.MESH_HANDSHAKE_AGE, "400x10", **PAIR)], ["10m"], [PAIR]),
    Case("MeshHandshakeStale", "a fresh handshake", [series(m.MESH_HANDSHAKE_AGE, "30x10", **PAIR)], ["10m"]),
    Case("TierAboveHighWatermark", "the hot tier above its own watermark (80%)",
         [series(m.STORAGE_USAGE, "0.82x30", name="tier-hot", path="/srv/hot", **NODE)], ["20m"],
         [{"name": "tier-hot", "path": "/srv/hot", **NODE}]),
    Case("TierAboveHighWatermark", "the warm tier at 82%: under its own watermark (85%)",
         [series(m.STORAGE_USAGE, "0.82x30", name="tier-warm", path="/srv/warm", **{**NODE, "host": "nas-1"})],
         ["20m"]),
    Case("SyncRefused", "a mirror refused by every retry", [series(m.SYNC_SUCCESS, "1 1 0x10", **MIRROR)], ["10m"],
         [MIRROR]),
    Case("SyncRefused", "a failed pass that the watcher's retry repairs",
         [series(m.SYNC_SUCCESS, "1 0 0 1x10", **MIRROR)], ["2m", "10m"]),
    Case("SyncLagHigh", "a continuous mirror minutes behind", [series(m.SYNC_LAG, f"{MIRROR_LAG + 180:.0f}x30",
                                                                       **MIRROR)], ["20m"], [MIRROR]),
    Case("SyncLagHigh", "a continuous mirror seconds behind", [series(m.SYNC_LAG, "20x30", **MIRROR)], ["20m"]),
    Case("SyncLagHigh", "a Pi's first pass after its quiet hours",
         [series(m.SYNC_LAG, f"{HOT_LAG - 600:.0f}x30", **HOT)], ["20m"]),
    Case("SyncLagHigh", "a Pi's lag beyond its quiet hours", [series(m.SYNC_LAG, f"{HOT_LAG + 300:.0f}x30", **HOT)],
         ["20m"], [HOT]),
    Case("SyncLagHigh", "a scheduled job with no success since its schedule's gap",
         [series(m.SYNC_LAST_SUCCESS, "0x40", **MODELS)], [late(MODELS_AGE)], [MODELS], interval="5m"),
    Case("SyncLagHigh", "a scheduled job passing every 30 minutes",
         [series(m.SYNC_LAST_SUCCESS, HALF_HOURLY, **MODELS)], ["3h", "5h"], interval="5m"),
    Case("SyncLagHigh", "a link that never published a success", _links_fresh("models-to-edge", 120),
         [f"{int(NEVER // 3600) + 1}h"], [{"sync_job": "models-to-edge", "source": "analytics-1",
                                            "condition": "no-data"}], interval="5m"),
    Case("SyncLagHigh", "every link publishing its successes", _links_fresh(None, 120), [f"{int(NEVER // 3600) + 1}h"],
         interval="5m"),
    Case("UpsOnBattery", "mains out", [series(m.POWER_ON_BATTERY, "0 1x5", signal="nut", **NODE)], ["4m"],
         [{"signal": "nut", **NODE}]),
    Case("UpsOnBattery", "a flicker", [series(m.POWER_ON_BATTERY, "0 1 0x5", signal="nut", **NODE)], ["2m", "5m"]),
    Case("UpsBatteryLow", "at the shutdown threshold", [series(m.POWER_BATTERY_LOW, "0 1x3", signal="gpio", **NODE)],
         ["1m"], [{"signal": "gpio", **NODE}]),
    Case("CertificateExpiry", "not renewed: under a sixth (4 h) of its life left", KEPT, ["20h15m", "23h"], [CERT],
         interval="5m"),
    Case("CertificateExpiry", "not renewed yet, but 5 h left", KEPT, ["19h"], interval="5m"),
    Case("CertificateExpiry", "renewed at two thirds of its life", RENEWED, ["20h15m", "24h"], interval="5m"),
    Case("UpsBatteryLow", "charged", [series(m.POWER_BATTERY_LOW, "0x5", signal="gpio", **NODE)], ["4m"]),
    Case("WorkerPoolNotReady", "the edge pool's worker gone (or the pool paused) for minutes",
         [series(m.WORK_POOL_READY, "1 0x20", **EDGE_POOL), series(m.WORK_POOL_READY, "1x20", **CLOUD_POOL), EXPORTING],
         ["10m"], [EDGE_POOL]),
    Case("WorkerPoolNotReady", "a worker restarting: not ready for two minutes",
         [series(m.WORK_POOL_READY, "1 0 0 1x20", **EDGE_POOL), series(m.WORK_POOL_READY, "1x20", **CLOUD_POOL),
          EXPORTING], ["3m", "10m"]),
    Case("WorkerPoolNotReady", "the export stopped at 5 min: its last figures say ready, and go stale",
         [series(m.WORK_POOL_READY, "1x30", **EDGE_POOL), series(m.WORK_POOL_READY, "1x30", **CLOUD_POOL),
          series(m.PREFECT_EXPORT_TIME, "0+60x5 300x25", **SERVER)], ["20m"],
         [{**CLOUD_POOL, "condition": "no-data"}, {**EDGE_POOL, "condition": "no-data"}]),
    Case("WorkerPoolNotReady", "the export missed 7 runs (a server restart), stale for under the hold, then caught up",
         [series(m.WORK_POOL_READY, "1x30", **EDGE_POOL), series(m.WORK_POOL_READY, "1x30", **CLOUD_POOL),
          series(m.PREFECT_EXPORT_TIME, "0+60x5 300x6 780+60x20", **SERVER)], ["12m", "20m"]),
    Case("WorkerPoolNotReady", "a pool of the fleet the export never wrote",
         [series(m.WORK_POOL_READY, "1x20", **CLOUD_POOL), EXPORTING], ["10m"],
         [{"pool": "spark-edge", "condition": "no-data"}]),
    Case("AgentTaskFailures", "a run failed in the last hour", [series(m.AGENT_TASK_FAILED, "0 1x10", **SUMMARISE)],
         ["5m"], [SUMMARISE]),
    Case("AgentTaskFailures", "no run failed in the last hour", [series(m.AGENT_TASK_FAILED, "0x10", **SUMMARISE)],
         ["5m"]),
    Case("AgentTaskFailures", "the failure left the window", [series(m.AGENT_TASK_FAILED, "1x3 0x10", **SUMMARISE)],
         ["8m"]),
]


def expand(template: str, labels: dict[str, str]) -> str:
    """The alert templates use `{{ $labels.NAME }}` only; a missing label renders empty, as in Prometheus."""
    out = re.sub(r"\{\{ \$labels\.([a-zA-Z_]+) \}\}", lambda mt: labels.get(mt[1], ""), template)
    assert "{{" not in out, f"a template this test cannot expand: {template}"
    return out


def expected(case: Case) -> list[dict[str, Any]]:
    alert = ALERTS[case.alert]
    out = []
    for labels in case.fires:
        notes = {"summary": expand(alert.summary, labels), "description": expand(alert.description, labels),
                 "runbook_url": runbook_url(FLEET, alert.name)}
        out.append({"exp_labels": {**labels, "severity": alert.severity.value}, "exp_annotations": notes})
    return out


def promtool_test(case: Case, rules: Path) -> dict[str, Any]:
    return {"rule_files": [str(rules)], "evaluation_interval": case.interval, "tests": [{
        "interval": case.interval, "input_series": case.series,
        "alert_rule_test": [{"eval_time": t, "alertname": case.alert, "exp_alerts": expected(case)}
                            for t in case.eval_times]}]}


def rules_of(alert: str) -> dict[str, Any]:
    """The generated rules file cut to one alert's rules: days of series evaluate in a moment."""
    groups = rule_groups(FLEET)["groups"]
    return {"groups": [{**g, "rules": [r for r in g["rules"] if r.get("alert") == alert]} for g in groups
                       if any(r.get("alert") == alert for r in g["rules"])]}


@needs_promtool
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.alert}: {c.name}")
def test_alert_rule(case: Case, tmp_path: Path) -> None:
    assert case.alert in ALERTS, f"{case.alert} is not an alert of {FLEET.name}"
    rules = tmp_path / "rules.yml"
    rules.write_text(dump_yaml(rules_of(case.alert)))
    test = tmp_path / "test.yml"
    test.write_text(yaml.safe_dump(promtool_test(case, rules), sort_keys=False))
    done = subprocess.run([PROMTOOL, "test", "rules", str(test)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    generated = {r["alert"] for g in rule_groups(FLEET)["groups"] for r in g["rules"] if "alert" in r}
    assert generated == set(ALERTS)
    firing = {c.alert for c in CASES if c.firing}
    silent = {c.alert for c in CASES if not c.firing}
    assert not generated - firing, f"no firing case: {sorted(generated - firing)}"
    assert not generated - silent, f"no silent case: {sorted(generated - silent)}"


def test_sync_limits_follow_each_links_mode_schedule_and_pauses() -> None:
    """A continuous link may lag by what a watcher restart explains, a scheduled one miss its schedule's gap plus a
    quarter (at least an hour); both plus their longest pause, merged across midnight and across the timetable's
    and the quiet hours' windows. A job run on demand has no limit."""
    from primespark.data.sync import longest_pause_seconds
    from primespark.fleet import load_text
    from primespark.monitoring.alerts import WATCH_RESTART_SECONDS, overdue_seconds, watch_restart_seconds

    restart = watch_restart_seconds(FLEET)
    assert restart == 2 * (2 * 30 + WATCH_RESTART_SECONDS)  # the homelab's heartbeat is Prefect's 30 s
    assert {k: (x.lag, x.age) for k, x in LIMITS.items()} == {
        **{("hot-to-nas", pi): (restart + 7.5 * 3600, None) for pi in ("pi-1", "pi-2", "pi-3", "pi-4")},
        ("warm-to-cloud", "nas-1"): (restart, None), ("models-to-edge", "analytics-1"): (None, 5400.0)}
    assert overdue_seconds("*/30 * * * *") == 5400.0
    data = yaml.safe_load((REPO / "inventory" / "homelab.yaml").read_text())
    data["orchestration"]["heartbeat_seconds"] = 120
    jobs = data["sync"]["jobs"]
    jobs["warm-to-cloud"]["bandwidth"] = {"01:00": "pause", "03:00": "2M", "22:00": "pause"}  # 22:00 to 03:00
    jobs["hot-to-nas"]["bandwidth"] = {"06:00": "pause", "08:00": "off"}  # 23:00 (quiet) to 08:00
    jobs["models-to-edge"] = {**jobs["models-to-edge"], "schedule": "0 3 * * *", "bandwidth": {"00:00": "pause",
                                                                                              "04:00": "off"}}
    jobs["on-demand"] = {"source": "analytics-1:/srv/scratch", "destination": "nas-1:/srv/scratch"}
    fleet = load_text(yaml.safe_dump(data))
    limits = {(x.job, x.source): x for x in sync_limits(fleet)}
    restart = 2 * (2 * 120 + WATCH_RESTART_SECONDS)
    assert limits["warm-to-cloud", "nas-1"].lag == restart + 5 * 3600
    assert limits["hot-to-nas", "pi-1"].lag == restart + 9 * 3600
    assert limits["models-to-edge", "analytics-1"].age == overdue_seconds("0 3 * * *") + 4 * 3600
    assert ("on-demand", "analytics-1") not in limits
    assert fleet.sync is not None
    every_hour = fleet.sync.jobs["warm-to-cloud"].model_copy(update={"bandwidth": {"06:00": "pause"}})
    assert longest_pause_seconds(fleet, every_hour, "nas-1") == 24 * 3600


def test_the_burst_and_the_fill_are_what_they_claim() -> None:
    """The burst case dips under 20% free within the hour and recovers; the steady fill ends under 5% free."""
    burst = [float(v) for v in BURST.replace("x72", "").replace("x150", "").split()]
    assert min(burst) <= 10e9 and burst[-1] == 60e9
    for free, at_least in ((40e9, 45), (20e9, 15)):  # minutes under each threshold: long, but under the hour
        low = [i for i, v in enumerate(burst) if v < free]
        assert at_least <= (low[-1] - low[0] + 1) * 5 < 60 and len(low) == low[-1] - low[0] + 1
    assert 60 * GB - 360 * (2 * GB // 12) < 5 * GB


@needs_promtool
@pytest.mark.parametrize("env", ["lab", "homelab"])
def test_promtool_checks_the_generated_config_and_rules(env: str, tmp_path: Path) -> None:
    fleet = load_fleet(REPO / "inventory" / f"{env}.yaml")
    overlays = {mesh: allocate(fleet.mesh_members(mesh), fleet.meshes[mesh].overlay, None)[0]
                for mesh in fleet.meshes}
    files = monitoring_files(fleet, overlays)
    write_files(files, tmp_path)
    rules = tmp_path / RULES_YML
    checked = subprocess.run([PROMTOOL, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # the config names the rules where both deployments put them; point it at this copy to check it here
    config = tmp_path / "prometheus.yml"
    config.write_text(config.read_text().replace(RULES_FILE, str(rules)))
    checked = subprocess.run([PROMTOOL, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
