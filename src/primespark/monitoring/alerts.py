"""The fleet's alert and recording rules, derived from its targets: RPO, drill and check schedules, tier
watermarks, mesh keepalives, sync modes and pauses. One `Alert` per alert name holds its rule expressions, how long
the condition must hold (`for:`; the fleet's `monitoring.alert_for` overrides it), its severity, summary, runbook
and the signal its dashboard panel plots — the rules, the dashboards and `spark status` all read them from here.

Alerts follow the node-exporter mixin where it has one (filesystem, clock) — including its answer to
predict_linear's false positives: a filesystem alert needs low free space AND a predicted fill AND a writable
mount, held for an hour, so a write burst that is cleaned up within the hour never fires.

Work pools and agent tasks have no metric of Prefect's own: primespark.monitoring.prefect_export publishes them from
the Prefect server's host every minute, with its timestamp, so an export that stopped is seen as missing data.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from primespark.fleet.model import Fleet, Orchestration, Severity
from primespark.mesh.health import STALE_HANDSHAKE_SECONDS
from primespark.monitoring import metrics as m
from primespark.monitoring.promql import duration, selector
from primespark.monitoring.scrape import NODE_JOB

RUNBOOK_DIR = "docs/runbooks"
# How long a Crashed watch run takes to run again: the crash automation schedules it again at once, its worker
# polls, the flow starts its watchers. An allowance, not a measurement (about 1 min on the lab).
WATCH_RESTART_SECONDS = 300.0

# Dashboards (primespark.monitoring.dashboards builds them; every alert names the one holding its panel).
OVERVIEW, MESH, BACKUPS, NODES, SYNC, AGENTS = "overview", "mesh", "backups", "nodes", "sync", "agents"
# The Prefect export runs every minute (roles/prefect_server's cron file): older than this, it has stopped.
EXPORT_STALE_SECONDS = 300


@dataclass(frozen=True)
class Alert:
    name: str
    severity: Severity
    hold: str  # the rule's `for:`, unless the fleet overrides it
    exprs: tuple[str, ...]  # the first is the alert's condition; more (held `slow_hold`) catch missing data
    summary: str
    description: str
    signal: str  # what its dashboard panel plots
    dashboard: str
    unit: str = "none"  # Grafana's unit of the signal
    threshold: float | None = None
    slow_hold: str | None = None  # `for:` of the extra expressions (missing data is judged over a longer time)

    def held(self, fleet: Fleet) -> str:
        return fleet.monitoring.alert_for.get(self.name, self.hold)


# Alerts whose rule ships but whose dashboard panel waits: no host publishes their signal yet, so the panel would
# plot nothing in any fleet. Name → why, and what brings it. (None today: the certificates' expiry metrics come
# from each host's spark-tls-renew.)
PANEL_NOT_YET: dict[str, str] = {}


def schedule_gap_seconds(cron: str, horizon_days: int = 400, limit: int = 2000) -> float:
    """The longest time between two consecutive runs of a cron schedule (over a year, or `limit` runs)."""
    from croniter import croniter

    start = datetime(2025, 1, 1, tzinfo=UTC)
    runs = croniter(cron, start)
    previous = runs.get_next(datetime)
    longest = 0.0
    for _ in range(limit):
        current = runs.get_next(datetime)
        longest = max(longest, (current - previous).total_seconds())
        if (current - start).days > horizon_days:
            break
        previous = current
    return longest


def overdue_seconds(cron: str) -> float:
    """When a scheduled job is late: its longest gap plus a quarter of it (at least an hour) for the run itself."""
    gap = schedule_gap_seconds(cron)
    return gap + max(3600.0, gap / 4)


def _node(metric: m.Metric) -> str:
    return selector(metric, job=NODE_JOB, fstype=("!=", ""))


def _filesystem(free_below_percent: int, predict_hours: int | None) -> str:
    avail, size, readonly = (_node(x) for x in (m.NODE_FS_AVAIL, m.NODE_FS_SIZE, m.NODE_FS_READONLY))
    parts = [f"({avail} / {size} * 100 < {free_below_percent}"]
    if predict_hours is not None:
        parts.append(f"and predict_linear({avail}[6h], {predict_hours} * 3600) < 0")
    parts.append(f"and {readonly} == 0)")
    return "\n".join(parts)


def _host_alerts() -> list[Alert]:
    node_up, other_up = selector(m.UP, job=NODE_JOB), selector(m.UP, job=("!=", NODE_JOB))
    offset = selector(m.NODE_TIMEX_OFFSET)
    free = selector(m.FS_FREE)
    return [
        Alert("HostDown", Severity.critical, "5m", (f"{node_up} == 0",),
              "{{ $labels.host }} is down: its node exporter does not answer",
              "Prometheus has not scraped {{ $labels.host }} ({{ $labels.site }}) for the hold time.",
              node_up, OVERVIEW),
        Alert("MonitoringTargetDown", Severity.warning, "5m", (f"{other_up} == 0",),
              "{{ $labels.job }} on {{ $labels.host }} does not answer Prometheus",
              "The {{ $labels.job }} service's metrics endpoint on {{ $labels.host }} failed its scrapes.",
              other_up, OVERVIEW),
        Alert("FilesystemFillingUp", Severity.warning, "1h", (_filesystem(40, 24),),
              "{{ $labels.host }}: {{ $labels.mountpoint }} is predicted to fill within 24 hours",
              "Under 40% free, the last 6 hours' trend reaches zero within a day, and it is writable.",
              free, NODES, "percentunit", 0.4),
        Alert("FilesystemFillingUpFast", Severity.critical, "1h", (_filesystem(20, 4),),
              "{{ $labels.host }}: {{ $labels.mountpoint }} is predicted to fill within 4 hours",
              "Under 20% free, the last 6 hours' trend reaches zero within 4 hours, and it is writable.",
              free, NODES, "percentunit", 0.2),
        Alert("FilesystemAlmostFull", Severity.critical, "30m", (_filesystem(5, None),),
              "{{ $labels.host }}: {{ $labels.mountpoint }} has under 5% free",
              "A writable filesystem with under 5% of its space free, whatever its trend.",
              free, NODES, "percentunit", 0.05),
        Alert("ClockSkew", Severity.warning, "10m",
              (f"({offset} > 0.05 and deriv({offset}[5m]) >= 0)\nor ({offset} < -0.05 and deriv({offset}[5m]) <= 0)",),
              "{{ $labels.host }}'s clock is more than 50 ms off and not converging",
              "The kernel's clock offset is beyond 50 ms and growing: schedules, restic timestamps and TLS suffer.",
              offset, NODES, "s", 0.05),
    ]


def _and_missing(condition: str, missing: str) -> tuple[str, ...]:
    return (condition, missing) if missing else (condition,)


def _backup_alerts(fleet: Fleet) -> list[Alert]:
    spec = fleet.backup
    if spec is None:
        return []
    rpo = spec.targets.rpo_hours * 3600
    drill_late, check_late = overdue_seconds(spec.drill.schedule), overdue_seconds(spec.check.schedule)
    snapshot, drill_run = selector(m.BACKUP_SNAPSHOT_TIME), selector(m.DRILL_LAST_RUN)
    check_run = selector(m.CHECK_LAST_RUN)
    # A subject with no metric at all (never run, or its host long gone) fires after the same time.
    never_backed = "\nor ".join(f"absent({selector(m.BACKUP_SNAPSHOT_TIME, host=h)})" for h in sorted(spec.plans))
    never_drilled = "\nor ".join(f"absent({selector(m.DRILL_LAST_RUN, host=h)})" for h in sorted(spec.plans))
    never_checked = "\nor ".join(f"absent({selector(m.CHECK_LAST_RUN, repository=r)})"
                                  for r in sorted(spec.repositories))
    return [
        Alert("BackupFailed", Severity.critical, "1m", (f"{selector(m.BACKUP_SUCCESS)} == 0",),
              "the last backup of {{ $labels.host }} into {{ $labels.repository }} failed",
              "The backup flow ended in failure after its retries; the previous snapshot is the newest.",
              selector(m.BACKUP_SUCCESS), BACKUPS),
        Alert("BackupTooOld", Severity.critical, "10m", _and_missing(f"time() - {snapshot} > {rpo:.0f}", never_backed),
              "{{ $labels.host }}'s newest snapshot is older than the RPO target",
              f"The RPO target is {spec.targets.rpo_hours:g} h (backup.targets.rpo_hours); a host with a plan "
              "and no snapshot metric at all fires after the same time.",
              selector(m.BACKUP_AGE), BACKUPS, "s", rpo, slow_hold=duration(rpo)),
        Alert("DrillFailed", Severity.critical, "1m", (f"{selector(m.DRILL_SUCCESS)} == 0",),
              "the last DR drill of {{ $labels.host }} failed",
              "The restore did not verify, a service check failed, or RTO/RPO missed their targets.",
              selector(m.DRILL_SUCCESS), BACKUPS),
        Alert("DrillOverdue", Severity.warning, "10m",
              _and_missing(f"time() - {drill_run} > {drill_late:.0f}", never_drilled),
              "{{ $labels.host }} has not been drilled on schedule",
              f"backup.drill.schedule is `{spec.drill.schedule}`; no drill ended in the last "
              f"{duration(drill_late)}.", selector(m.DRILL_AGE), BACKUPS, "s", drill_late,
              slow_hold=duration(drill_late)),
        Alert("ResticCheckFailed", Severity.critical, "1m", (f"{selector(m.CHECK_SUCCESS)} == 0",),
              "restic check of {{ $labels.repository }}/{{ $labels.client }} on {{ $labels.host }} found errors",
              "`restic check` reported damage or could not finish; backups into it may not restore.",
              selector(m.CHECK_SUCCESS), BACKUPS),
        Alert("ResticCheckOverdue", Severity.warning, "10m",
              _and_missing(f"time() - {check_run} > {check_late:.0f}", never_checked),
              "{{ $labels.repository }} has not been checked on schedule",
              f"backup.check.schedule is `{spec.check.schedule}`; no check ended in the last "
              f"{duration(check_late)}.", selector(m.CHECK_AGE), BACKUPS, "s", check_late,
              slow_hold=duration(check_late)),
    ]


def _mesh_alerts(fleet: Fleet) -> list[Alert]:
    if not fleet.meshes:
        return []
    return [
        Alert("MeshPairDown", Severity.warning, "5m", (f"{selector(m.MESH_PAIR_UP)} == 0",),
              "mesh {{ $labels.mesh }}: {{ $labels.source }} cannot reach {{ $labels.target }}",
              "A ping over the overlay from {{ $labels.host }} got no answer at the last `spark mesh check`.",
              selector(m.MESH_PAIR_UP), MESH),
        Alert("MeshHandshakeStale", Severity.warning, "5m",
              (f"{selector(m.MESH_HANDSHAKE_AGE)} > {STALE_HANDSHAKE_SECONDS}",),
              "mesh {{ $labels.mesh }}: {{ $labels.source }}'s handshake with {{ $labels.target }} is stale",
              f"WireGuard re-handshakes every 2 minutes while traffic flows and drops a session after "
              f"{STALE_HANDSHAKE_SECONDS} s; this pair's latest handshake is older.",
              selector(m.MESH_HANDSHAKE_AGE), MESH, "s", STALE_HANDSHAKE_SECONDS),
    ]


def _tier_alerts(fleet: Fleet) -> list[Alert]:
    if not fleet.tiers:
        return []
    exprs = ("\nor ".join(f"{selector(m.STORAGE_USAGE, name=f'tier-{t.value}')} > {spec.high_watermark:g}"
                          for t, spec in sorted(fleet.tiers.items())),)
    marks = ", ".join(f"{t.value} {spec.high_watermark:.0%}" for t, spec in sorted(fleet.tiers.items()))
    return [Alert("TierAboveHighWatermark", Severity.warning, "15m", exprs,
                  "{{ $labels.host }}: {{ $labels.name }} is above its high watermark",
                  f"Above the tier's high watermark ({marks}); writers stop at the over-quota marker until usage "
                  "falls below the low watermark.",
                  selector(m.STORAGE_USAGE, name=("=~", "tier-.*")), NODES, "percentunit",
                  min(spec.high_watermark for spec in fleet.tiers.values()))]


@dataclass(frozen=True)
class SyncLimit:
    """How far one link may fall behind before SyncLagHigh: the lag of its last pass (a continuous job) and the
    time since its last successful pass (a scheduled one); None where its mode sets none."""

    job: str
    source: str
    lag: float | None
    age: float | None

    @property
    def longest(self) -> float:
        return max(x for x in (self.lag, self.age) if x is not None)


def watch_restart_seconds(fleet: Fleet) -> float:
    """A continuous link's own lag limit: a watcher that died is marked Crashed after two heartbeats and
    scheduled again by the crash automation (within its deployment's crash retries), and its full pass delivers
    what changed meanwhile — given as long again. A larger lag is more than a restart the fleet handles."""
    heartbeat = (fleet.orchestration.heartbeat_seconds if fleet.orchestration is not None
                 else Orchestration.model_fields["heartbeat_seconds"].default)
    return 2.0 * (2 * heartbeat + WATCH_RESTART_SECONDS)


def sync_limits(fleet: Fleet) -> list[SyncLimit]:
    """Every link that has something to be late for (a continuous job, a schedule), with its limits: its mode's own
    plus the longest pause of its timetable and quiet hours, in which it is allowed to fall behind."""
    from primespark.data.layout import links
    from primespark.data.sync import longest_pause_seconds

    if fleet.sync is None:
        return []
    out = []
    for link in links(fleet):
        job = fleet.sync.jobs[link.job]
        if not job.continuous and job.schedule is None:
            continue  # run on demand only
        pause = longest_pause_seconds(fleet, job, link.source)
        out.append(SyncLimit(link.job, link.source, watch_restart_seconds(fleet) + pause if job.continuous else None,
                             overdue_seconds(job.schedule) + pause if job.schedule else None))
    return out


def _per_limit(limits: list[SyncLimit], which: str) -> list[tuple[str, list[str], float]]:
    """(job, sources, limit) for links of one job sharing a limit: one PromQL line each, not one per Pi."""
    groups: dict[tuple[str, float], list[str]] = {}
    for limit in limits:
        value = getattr(limit, which)
        if value is not None:
            groups.setdefault((limit.job, value), []).append(limit.source)
    return [(job, sources, value) for (job, value), sources in groups.items()]


def _links(metric: m.Metric, job: str, sources: list[str]) -> str:
    return selector(metric, sync_job=job, source=sources[0] if len(sources) == 1 else ("=~", "|".join(sources)))


def _limits_text(groups: list[tuple[str, list[str], float]], single: dict[str, int]) -> str:
    return ", ".join(f"{job}{'' if len(sources) == single[job] else ' from ' + ', '.join(sources)} "
                     f"{duration(value)}" for job, sources, value in groups)


def _sync_alerts(fleet: Fleet) -> list[Alert]:
    if fleet.sync is None:
        return []
    success = selector(m.SYNC_SUCCESS)
    alerts = [Alert(
        "SyncRefused", Severity.warning, "5m", (f"{success} == 0",),
        "sync {{ $labels.sync_job }} from {{ $labels.source }}: the last pass failed or was refused",
        "The link's last pass failed after its retries, or its guards refused it (a missing, unmounted or emptied "
        "source; more deletions than max_delete) and it changed nothing at the destination; a pass paused by its "
        "window does not count. The report artifact sync-{{ $labels.sync_job }} says which and why.",
        success, SYNC)]
    limits = sync_limits(fleet)
    if not limits:
        return alerts
    lags, ages = _per_limit(limits, "lag"), _per_limit(limits, "age")
    condition = "\nor ".join([*(f"{_links(m.SYNC_LAG, job, sources)} > {value:.0f}" for job, sources, value in lags),
                              *(f"time() - {_links(m.SYNC_LAST_SUCCESS, job, sources)} > {value:.0f}"
                                for job, sources, value in ages)])
    # a link that never published a success (never ran, or never succeeded) fires after its fleet's longest limit
    never = "\nor ".join(f"absent({selector(m.SYNC_LAST_SUCCESS, sync_job=x.job, source=x.source)})" for x in limits)
    count = {job: sum(x.job == job for x in limits) for job in {x.job for x in limits}}
    text = []
    if lags:
        text.append(f"Continuous links: the last pass's lag over {duration(watch_restart_seconds(fleet))} (a dead "
                    "watcher is seen after two heartbeats and scheduled again by the crash automation; its full pass "
                    "is given as long again) plus the link's longest pause window; limits: "
                    f"{_limits_text(lags, count)}.")
    if ages:
        text.append("Scheduled links: no successful pass for the schedule's longest gap plus a quarter (at least 1 h) "
                    f"plus the link's longest pause window; limits: {_limits_text(ages, count)}.")
    alerts.append(Alert(
        "SyncLagHigh", Severity.warning, "10m", _and_missing(condition, never),
        "sync {{ $labels.sync_job }} from {{ $labels.source }} is behind: changes arrive later than its mode allows",
        " ".join(text) + " A link that never published a successful pass fires after the longest limit.",
        selector(m.SYNC_LAG), SYNC, "s", min((value for _, _, value in lags), default=None),
        slow_hold=duration(max(x.longest for x in limits))))
    return alerts


def _power_alerts(fleet: Fleet) -> list[Alert]:
    if not any(h.power is not None and h.power.ups_signal != "none" for h in fleet.hosts.values()):
        return []
    return [
        Alert("UpsOnBattery", Severity.warning, "1m", (f"{selector(m.POWER_ON_BATTERY)} == 1",),
              "{{ $labels.host }} runs on battery",
              "The UPS reports on-battery (NUT's OB status): mains power is out.",
              selector(m.POWER_ON_BATTERY), NODES),
        Alert("UpsBatteryLow", Severity.critical, "0s", (f"{selector(m.POWER_BATTERY_LOW)} == 1",),
              "{{ $labels.host }}'s battery is low: it is shutting down",
              "The battery is at or below power.shutdown_battery_percent (or the low-battery line is set); "
              "spark-ups-guard drains the host, stops its agent tasks (their flows place them elsewhere) and halts it.",
              selector(m.POWER_BATTERY_LOW), NODES),
    ]


def _tls_alerts(fleet: Fleet) -> list[Alert]:
    """Where the fleet has a CA, every host has a certificate from it (primespark.pki), renewed by the host at two
    thirds of its life: one with under a sixth left has missed its renewal for half the time that was left (4 h of
    a 24 h certificate). A fleet without a CA publishes no certificate metrics: no rule, no empty panel."""
    from primespark.pki import serves_tls

    if not serves_tls(fleet):
        return []
    not_after, not_before = selector(m.TLS_NOT_AFTER), selector(m.TLS_NOT_BEFORE)
    return [Alert("CertificateExpiry", Severity.critical, "10m",
                  (f"({not_after} - time()) < ({not_after} - {not_before}) / 6",),
                  "{{ $labels.host }}'s certificate {{ $labels.certificate }} has under a sixth of its life left",
                  "It was due for renewal at two thirds of its life (the host's hourly spark-tls-renew) and is still "
                  "not renewed; services on the host fail their TLS handshakes when it expires.",
                  selector(m.TLS_LIFE_LEFT), NODES, "percentunit", 1 / 6)]


def _orchestration_alerts(fleet: Fleet) -> list[Alert]:
    """A fleet with a Prefect server: its work pools (one per site with a worker) and its agent-task runs."""
    if fleet.orchestration is None:
        return []
    from primespark.orchestration.naming import work_pool

    alerts = []
    pools = sorted(work_pool(site) for site in fleet.orchestration.workers)
    if pools:
        ready = selector(m.WORK_POOL_READY, pool=pools[0] if len(pools) == 1 else ("=~", "|".join(pools)))
        # an export that stopped leaves its last figures in place: each pool then fires as no-data, as does a pool
        # the export never wrote (the export not installed, or the pool not on the server)
        fresh = f"time() - {selector(m.PREFECT_EXPORT_TIME)} <= {EXPORT_STALE_SECONDS}"
        missing = "\nor ".join(f"absent({selector(m.WORK_POOL_READY, pool=p)})" for p in pools)
        alerts.append(Alert(
            "WorkerPoolNotReady", Severity.warning, "5m",
            (f"{ready} == 0", f"{ready} unless on (instance) ({fresh})", missing),
            "work pool {{ $labels.pool }} is not ready: no flow of its site starts",
            "The pool has no worker online, or it is paused (PAUSED is not ready either), or the Prefect export "
            f"({m.PREFECT_EXPORT}, every minute on the server's host) has not read it for {EXPORT_STALE_SECONDS} s: "
            "scheduled backups, drills, sync passes and agent tasks of the site wait.",
            ready, AGENTS, slow_hold="5m"))
    failed = selector(m.AGENT_TASK_FAILED)
    alerts.append(Alert(
        "AgentTaskFailures", Severity.warning, "1m", (f"{failed} > 0",),
        "agent tasks of {{ $labels.template }} failed or crashed in the last hour",
        "Runs of the agent-task flow for {{ $labels.template }} (`(inline)`: an inline spec) ended Failed or "
        f"Crashed in the last {duration(m.AGENT_FAILURE_WINDOW_SECONDS)} (after their retries); "
        "`spark task ls --state failed` lists them.", failed, AGENTS))
    return alerts


def fleet_alerts(fleet: Fleet) -> list[Alert]:
    """The alerts this fleet gets: those whose subject it has (backups, meshes, tiers, sync jobs, UPSes, a Prefect
    server and its pools, a CA and its hosts' certificates; every fleet has hosts)."""
    return [*_host_alerts(), *_backup_alerts(fleet), *_mesh_alerts(fleet), *_tier_alerts(fleet),
            *_sync_alerts(fleet), *_power_alerts(fleet), *_orchestration_alerts(fleet), *_tls_alerts(fleet)]


def _all_names() -> frozenset[str]:
    """Every alert any fleet can get (the fleet check refuses `alert_for` entries for others)."""
    import yaml

    # The model alone: the loader's cross checks read ALERT_NAMES themselves.
    everything = Fleet.model_validate(yaml.safe_load(_EVERYTHING))
    return frozenset(a.name for a in fleet_alerts(everything))


# The smallest fleet that gets every alert.
_EVERYTHING = """
name: everything
sites: {site: {kind: cloud, lan: 10.0.0.0/24}}
hosts:
  pi-1: {kind: pi, site: site, cpus: 1, memory_mb: 512, disk_gb: 8, address: 10.0.0.10, power: {ups_signal: nut}}
  nas-1: {kind: nas, site: site, cpus: 1, memory_mb: 512, disk_gb: 8, address: 10.0.0.11}
meshes: {mesh: {overlay: 10.9.0.0/24}}
tiers: {hot: {hosts: [pi-1], path: /srv/hot, capacity_gb: 1}}
sync: {jobs: {job: {source: "pi-1:/srv/hot", destination: "nas-1:/srv/warm/{host}", continuous: true}}}
orchestration: {server: nas-1, workers: {site: nas-1}}
backup:
  repositories: {repo: {host: nas-1, path: /srv/repo, password: "local:repo"}}
  plans: {pi-1: {repository: repo, paths: [/srv/hot]}}
  retention: {keep_last: 1}
  targets: {rpo_hours: 1, rto_minutes: 1}
  drill: {scratch_host: nas-1}
"""


def runbook_url(fleet: Fleet, name: str) -> str:
    base = fleet.monitoring.runbook_base_url
    return f"{base.rstrip('/')}/{RUNBOOK_DIR}/{name}.md" if base else f"{RUNBOOK_DIR}/{name}.md"


def _rules_of(fleet: Fleet, alert: Alert) -> list[dict[str, Any]]:
    annotations = {"summary": alert.summary, "description": alert.description,
                   "runbook_url": runbook_url(fleet, alert.name)}
    rules = [{"alert": alert.name, "expr": alert.exprs[0], "for": alert.held(fleet),
              "labels": {"severity": alert.severity.value}, "annotations": annotations}]
    for expr in alert.exprs[1:]:  # no data at all, judged over the slow hold; labelled apart (promtool lint)
        rules.append({"alert": alert.name, "expr": expr, "for": alert.slow_hold or alert.held(fleet),
                      "labels": {"severity": alert.severity.value, "condition": "no-data"},
                      "annotations": annotations})
    return rules


def recording_rules() -> list[dict[str, Any]]:
    avail, size = _node(m.NODE_FS_AVAIL), _node(m.NODE_FS_SIZE)
    return [
        {"record": m.BACKUP_AGE.name, "expr": f"time() - {selector(m.BACKUP_SNAPSHOT_TIME)}"},
        {"record": m.DRILL_AGE.name, "expr": f"time() - {selector(m.DRILL_LAST_RUN)}"},
        {"record": m.CHECK_AGE.name, "expr": f"time() - {selector(m.CHECK_LAST_RUN)}"},
        {"record": m.FS_FREE.name, "expr": f"{avail} / {size}"},
        {"record": m.SYNC_SUCCESS_AGE.name, "expr": f"time() - {selector(m.SYNC_LAST_SUCCESS)}"},
        {"record": m.TLS_LIFE_LEFT.name, "expr": f"({selector(m.TLS_NOT_AFTER)} - time()) / "
                                                 f"({selector(m.TLS_NOT_AFTER)} - {selector(m.TLS_NOT_BEFORE)})"},
    ]


def rule_groups(fleet: Fleet) -> dict[str, Any]:
    """The rules file: recordings first (dashboards and `spark status` read them), then the alerts."""
    return {"groups": [
        {"name": "primespark-records", "rules": recording_rules()},
        {"name": "primespark-alerts", "rules": [r for a in fleet_alerts(fleet) for r in _rules_of(fleet, a)]},
    ]}


ALERT_NAMES: frozenset[str] = _all_names()
