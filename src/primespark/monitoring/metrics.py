"""Every metric the project writes or reads, by name, in one registry; and the textfile writer.

Flows and checks write Prometheus text files for node exporter's textfile collector, one file per (flow,
subject), so concurrent runs never overwrite each other's figures. Writers name metrics only through the
constants here (a name typed twice can drift), so a renamed metric breaks the tests that read the files,
and alert rules built from this registry follow the rename. `write_to_textfile` writes through a temporary
file and a rename: the collector never reads half a file.

The registry also holds what others write and the rules read: node exporter's metrics, the textfile metrics of
the roles' scripts (spark-usage-guard, spark-ups-guard), Prometheus' own `up`, and the recording rules'
series. Each says where it comes from (`source`), so a test can hold each writer to its names.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, generate_latest, write_to_textfile

from primespark.fleet.model import Fleet
from primespark.hosts import CommandFailed, HostAccess

# Who writes a metric: the flows here, a role's script, node exporter, Prometheus itself, a recording rule.
FLOWS = "flows"
PREFECT_EXPORT = "primespark.monitoring.prefect_export"  # on the Prefect server's host, every minute (cron)
USAGE_GUARD = "roles/common/files/spark-usage-guard"
UPS_GUARD = "roles/edge/files/spark-ups-guard"
NODE_EXPORTER = "node_exporter"
PROMETHEUS = "prometheus"
RECORDING = "recording rule"


@dataclass(frozen=True)
class Metric:
    name: str
    help: str
    labels: tuple[str, ...]
    source: str = FLOWS


# --- backups and drills (flows/backup.py, flows/maintenance.py, flows/dr_drill.py) ----------------------------
_BACKUP = ("host", "repository")
BACKUP_SUCCESS = Metric("primespark_backup_success", "1 if the last backup run succeeded", _BACKUP)
BACKUP_LAST_RUN = Metric("primespark_backup_last_run_timestamp_seconds", "When the last backup run ended", _BACKUP)
BACKUP_LAST_SUCCESS = Metric("primespark_backup_last_success_timestamp_seconds", "When a backup last succeeded",
                             _BACKUP)
BACKUP_DURATION = Metric("primespark_backup_duration_seconds", "Duration of the last backup run", _BACKUP)
BACKUP_SNAPSHOT_TIME = Metric("primespark_backup_snapshot_timestamp_seconds", "Time of the newest snapshot", _BACKUP)
BACKUP_SNAPSHOT_AGE = Metric("primespark_backup_snapshot_age_seconds", "Age of the newest snapshot when written",
                             _BACKUP)
BACKUP_SIZE = Metric("primespark_backup_size_bytes", "Bytes in the newest snapshot", _BACKUP)
BACKUP_ADDED = Metric("primespark_backup_added_bytes", "Bytes the last backup added to the repository", _BACKUP)
CHECK_SUCCESS = Metric("primespark_restic_check_success", "1 if restic check found no errors",
                       ("repository", "client"))
CHECK_LAST_RUN = Metric("primespark_restic_check_last_run_timestamp_seconds", "When maintenance last ran",
                        ("repository",))
DRILL_SUCCESS = Metric("primespark_drill_success", "1 if the last DR drill passed", ("host",))
DRILL_LAST_RUN = Metric("primespark_drill_last_run_timestamp_seconds", "When the last DR drill ended", ("host",))
DRILL_RTO = Metric("primespark_drill_rto_seconds", "Drill start to verified restore", ("host",))
DRILL_RPO = Metric("primespark_drill_rpo_seconds", "Age of the restored snapshot at drill start", ("host",))
DRILL_RTO_TARGET = Metric("primespark_drill_rto_target_seconds", "The fleet's RTO target", ("host",))
DRILL_RPO_TARGET = Metric("primespark_drill_rpo_target_seconds", "The fleet's RPO target", ("host",))

# --- the mesh (spark mesh check) ------------------------------------------------------------------------------
_PAIR = ("mesh", "source", "target")
MESH_PAIR_UP = Metric("spark_mesh_pair_up", "1 when the target's overlay address answers ping from the source",
                      _PAIR)
MESH_PAIR_RTT = Metric("spark_mesh_pair_rtt_seconds", "Ping round trip over the overlay", _PAIR)
MESH_HANDSHAKE_AGE = Metric("spark_mesh_handshake_age_seconds",
                            "Seconds since the latest WireGuard handshake (direct peers)", _PAIR)
MESH_PAIRS_DOWN = Metric("spark_mesh_pairs_down", "Pairs that are down or have a stale handshake", ("mesh",))
MESH_HOST_PROBED = Metric("spark_mesh_host_probed", "1 when the host could be probed", ("mesh", "host"))
MESH_CHECK_TIME = Metric("spark_mesh_check_timestamp_seconds", "When the check ran", ("mesh",))

# --- the roles' scripts (textfile collector) ------------------------------------------------------------------
_GUARDED = ("name", "path")  # name: tier-<tier> or restic-<repository>
STORAGE_USED = Metric("spark_storage_used_bytes", "Bytes used under a guarded path (the tier, or its filesystem)",
                      _GUARDED, USAGE_GUARD)
STORAGE_CAPACITY = Metric("spark_storage_capacity_bytes", "The quota of a tier, or the size of a filesystem",
                          _GUARDED, USAGE_GUARD)
STORAGE_USAGE = Metric("spark_storage_usage_ratio", "Used over capacity", _GUARDED, USAGE_GUARD)
FILESYSTEM_USAGE = Metric("spark_filesystem_usage_ratio", "Used over size of the filesystem holding the path",
                          _GUARDED, USAGE_GUARD)
STORAGE_OVER_QUOTA = Metric("spark_storage_over_quota",
                            "1 while the path is above its high watermark (until below the low one)", _GUARDED,
                            USAGE_GUARD)
_POWER = ("signal",)  # the fleet's ups_signal: nut or gpio
POWER_ON_BATTERY = Metric("spark_power_on_battery", "1 while the UPS runs on battery (NUT's OB status)", _POWER,
                          UPS_GUARD)
POWER_BATTERY_LOW = Metric("spark_power_battery_low", "1 when the battery is at or below the shutdown threshold",
                           _POWER, UPS_GUARD)
POWER_BATTERY_CHARGE = Metric("spark_power_battery_charge_percent", "The UPS battery's charge (NUT)", _POWER,
                              UPS_GUARD)
POWER_CHECK_TIME = Metric("spark_power_check_timestamp_seconds", "When the power signal was last read", _POWER,
                          UPS_GUARD)

# --- node exporter (the rules and dashboards read these) ------------------------------------------------------
_FS = ("device", "fstype", "mountpoint")
NODE_FS_AVAIL = Metric("node_filesystem_avail_bytes", "Filesystem space available to non-root users", _FS,
                       NODE_EXPORTER)
NODE_FS_SIZE = Metric("node_filesystem_size_bytes", "Filesystem size", _FS, NODE_EXPORTER)
NODE_FS_READONLY = Metric("node_filesystem_readonly", "1 if the filesystem is mounted read-only", _FS,
                          NODE_EXPORTER)
NODE_TIMEX_OFFSET = Metric("node_timex_offset_seconds", "The kernel's estimate of the clock's offset", (),
                           NODE_EXPORTER)
NODE_TIMEX_SYNC = Metric("node_timex_sync_status", "1 if the clock is synchronised to a reliable source", (),
                         NODE_EXPORTER)
NODE_CPU = Metric("node_cpu_seconds_total", "Seconds the CPUs spent in each mode", ("cpu", "mode"), NODE_EXPORTER)
NODE_LOAD1 = Metric("node_load1", "1-minute load average", (), NODE_EXPORTER)
NODE_MEM_AVAILABLE = Metric("node_memory_MemAvailable_bytes", "Memory available for new work", (), NODE_EXPORTER)
NODE_MEM_TOTAL = Metric("node_memory_MemTotal_bytes", "Total memory", (), NODE_EXPORTER)
NODE_BOOT_TIME = Metric("node_boot_time_seconds", "When the host booted", (), NODE_EXPORTER)
NODE_TIME = Metric("node_time_seconds", "The host's clock (agent placement: how old a textfile reading is)", (),
                   NODE_EXPORTER)
NODE_NET_RECEIVE = Metric("node_network_receive_bytes_total", "Bytes received per interface", ("device",),
                          NODE_EXPORTER)
NODE_NET_TRANSMIT = Metric("node_network_transmit_bytes_total", "Bytes sent per interface", ("device",),
                           NODE_EXPORTER)

# --- Prometheus itself -----------------------------------------------------------------------------------------
UP = Metric("up", "1 if the last scrape of the target succeeded", (), PROMETHEUS)

# --- recording rules (primespark.monitoring.alerts records them; dashboards and `spark status` read them) ------
BACKUP_AGE = Metric("primespark:backup_snapshot_age_seconds", "Age of the newest snapshot, now", _BACKUP, RECORDING)
DRILL_AGE = Metric("primespark:drill_age_seconds", "Time since the last DR drill ended", ("host",), RECORDING)
CHECK_AGE = Metric("primespark:restic_check_age_seconds", "Time since maintenance last checked the repository",
                   ("repository",), RECORDING)
FS_FREE = Metric("primespark:filesystem_free_ratio", "Free space over size, per filesystem", _FS, RECORDING)

# --- sync (flows/sync.py): one file per link, a job's source host --------------------------------------------
# `sync_job`, not `job`: Prometheus gives every scraped series a `job` label of its own
_SYNC = ("sync_job", "source")
SYNC_SUCCESS = Metric("primespark_sync_success",
                      "1 if the link's last pass that ran succeeded (0: failed or refused; a paused pass leaves it)",
                      _SYNC)
SYNC_LAST_RUN = Metric("primespark_sync_last_run_timestamp_seconds", "When the link's last pass ended", _SYNC)
SYNC_LAST_SUCCESS = Metric("primespark_sync_last_success_timestamp_seconds", "When a pass of the link last succeeded",
                           _SYNC)
SYNC_LAG = Metric("primespark_sync_lag_seconds",
                  "The last pass's largest delay from a change at the source to its arrival at the destination", _SYNC)
SYNC_SENT_BYTES = Metric("primespark_sync_sent_bytes", "Bytes the link's last pass sent", _SYNC)
SYNC_SENT_FILES = Metric("primespark_sync_sent_files", "Files the link's last pass sent", _SYNC)
SYNC_DELETED_FILES = Metric("primespark_sync_deleted_files", "Files the link's last pass deleted at the destination",
                            _SYNC)
SYNC_DIFFERING_FILES = Metric("primespark_sync_differing_files",
                              "Files whose content differed at the destination after the last pass", _SYNC)
SYNC_ERRORS = Metric("primespark_sync_failed_passes", "Passes of the link that failed, since its state began", _SYNC)
SYNC_REFUSALS = Metric("primespark_sync_refused_passes",
                       "Passes the link's guards refused (a missing, unmounted or emptied source, too many deletions), "
                       "since its state began", _SYNC)
SYNC_CHECK_LAST_RUN = Metric("primespark_sync_check_last_run_timestamp_seconds",
                             "When the link's full checksum compare last ran", _SYNC)
SYNC_CHECK_BAD_FILES = Metric("primespark_sync_check_bad_files",
                              "Files the last full compare found missing or differing at the destination", _SYNC)
SYNC_SUCCESS_AGE = Metric("primespark:sync_last_success_age_seconds", "Time since a pass of the link last succeeded, "
                          "now (a recording rule)", _SYNC, RECORDING)

# --- tier migration (flows/tiers.py): one file per boundary and upper-tier host, on that host -------------------
_TIER = ("tier", "host")
_BOUNDARY = ("boundary", "source")  # boundary: hot-warm or warm-cold; source: the upper tier's host
TIER_USED_BYTES = Metric("primespark_tier_used_bytes", "Bytes in the host's tier folder after the last pass", _TIER)
TIER_USAGE = Metric("primespark_tier_usage_ratio", "The host's tier folder over the tier's capacity_gb", _TIER)
TIER_OLDEST_AGE = Metric("primespark_tier_oldest_file_age_seconds",
                         "Time since the least recently used file left in the host's tier folder was used", _TIER)
TIER_MOVED_FILES = Metric("primespark_tier_moved_files", "Files the last pass moved down from the host", _BOUNDARY)
TIER_MOVED_BYTES = Metric("primespark_tier_moved_bytes", "Bytes the last pass moved down from the host", _BOUNDARY)
TIER_SKIPPED_FILES = Metric("primespark_tier_skipped_files",
                            "Files that would have moved and stayed (pinned, open, fresh, or waiting for room below)",
                            _BOUNDARY)
TIER_SUCCESS = Metric("primespark_tier_success", "1 if the last pass from the host succeeded", _BOUNDARY)
TIER_LAST_SUCCESS = Metric("primespark_tier_last_success_timestamp_seconds",
                           "When a pass from the host last succeeded", _BOUNDARY)
TIER_JOURNAL_BACKLOG = Metric("primespark_tier_journal_backlog_files",
                              "Files of the host's move journal not finished (a killed pass; the next one replays it)",
                              _BOUNDARY)

# --- TLS (primespark.pki): one file per certificate, on its host, by spark-tls-renew (primespark.tls_renewer) --
_CERT = ("certificate",)  # the certificate's file on the host; the host is the scrape target's label
TLS_NOT_AFTER = Metric("primespark_tls_certificate_not_after_timestamp_seconds", "When the certificate expires",
                       _CERT)
TLS_NOT_BEFORE = Metric("primespark_tls_certificate_not_before_timestamp_seconds",
                        "When the certificate became valid", _CERT)
TLS_LIFE_LEFT = Metric("primespark:tls_certificate_life_left_ratio",
                       "The part of the certificate's life left, now (renewal is due below one third)", _CERT,
                       RECORDING)

# --- work pools and agent tasks (primespark.monitoring.prefect_export, on the Prefect server's host) --------------
# Prefect's own /metrics has only HTTP counters: the export reads pools, workers and agent-task runs from its API.
AGENT_FAILURE_WINDOW_SECONDS = 3600  # agent-task runs that ended Failed or Crashed this recently count
WORK_POOL_READY = Metric("primespark_work_pool_ready",
                         "1 if the work pool is READY (a worker online, not paused); 0 if NOT_READY, PAUSED or absent",
                         ("pool",), PREFECT_EXPORT)
WORK_POOL_WORKERS = Metric("primespark_work_pool_workers_online", "Workers of the pool the server sees online",
                           ("pool",), PREFECT_EXPORT)
AGENT_TASK_FAILED = Metric("primespark_agent_task_failed_runs",
                           "agent-task runs that ended Failed or Crashed in the last hour, per template "
                           "(`(inline)`: an inline spec)", ("template",), PREFECT_EXPORT)
AGENT_TASK_RUNNING = Metric("primespark_agent_task_running_runs", "agent-task runs running now, per template",
                            ("template",), PREFECT_EXPORT)
PREFECT_EXPORT_TIME = Metric("primespark_prefect_export_timestamp_seconds",
                             "When the export last read the Prefect server (it writes nothing when it cannot)", (),
                             PREFECT_EXPORT)

REGISTRY: dict[str, Metric] = {m.name: m for m in globals().copy().values() if isinstance(m, Metric)}
# Labels Prometheus adds to every scraped series (primespark.monitoring.scrape sets them per target).
TARGET_LABELS = ("job", "instance", "host", "site", "kind")


class Textfile:
    """The samples of one text file. Every metric declared is written with its HELP and TYPE, samples or not."""

    def __init__(self, *declared: Metric) -> None:
        self.registry = CollectorRegistry()
        self.gauges: dict[str, Gauge] = {}
        for metric in declared:
            self._gauge(metric)

    def _gauge(self, metric: Metric) -> Gauge:
        if REGISTRY.get(metric.name) is not metric:
            raise KeyError(f"{metric.name} is not in the metric registry (primespark.monitoring.metrics)")
        if metric.source not in (FLOWS, PREFECT_EXPORT):  # the writers in this package; the rest write their own
            raise KeyError(f"{metric.name} is written by {metric.source}, not by the flows")
        if metric.name not in self.gauges:
            self.gauges[metric.name] = Gauge(metric.name, metric.help, list(metric.labels), registry=self.registry)
        return self.gauges[metric.name]

    def set(self, metric: Metric, value: float | None, **labels: str) -> None:
        """One sample; a value of None writes none (a figure not known yet)."""
        gauge = self._gauge(metric)
        if value is not None:
            (gauge.labels(**labels) if metric.labels else gauge).set(value)

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(path), self.registry)
        path.chmod(0o644)
        return path


def certificate_metrics(certificate: str, not_before: float, not_after: float) -> Textfile:
    """A certificate's validity (`certificate`: its file on the host): the expiry alert and its panel read it."""
    out = Textfile()
    out.set(TLS_NOT_BEFORE, not_before, certificate=certificate)
    out.set(TLS_NOT_AFTER, not_after, certificate=certificate)
    return out


def textfile_path(directory: Path, name: str) -> Path:
    return directory / f"primespark_{name}.prom"


def backup_metrics(
    host: str,
    repository: str,
    *,
    success: bool,
    finished: float,
    duration_seconds: float,
    last_success: float | None,
    snapshot_time: float | None,
    size_bytes: int | None,
    added_bytes: int | None,
) -> Textfile:
    out = Textfile()
    labels = {"host": host, "repository": repository}
    out.set(BACKUP_SUCCESS, 1.0 if success else 0.0, **labels)
    out.set(BACKUP_LAST_RUN, finished, **labels)
    out.set(BACKUP_LAST_SUCCESS, last_success, **labels)
    out.set(BACKUP_DURATION, duration_seconds, **labels)
    out.set(BACKUP_SNAPSHOT_TIME, snapshot_time, **labels)
    out.set(BACKUP_SNAPSHOT_AGE, None if snapshot_time is None else max(0.0, finished - snapshot_time), **labels)
    out.set(BACKUP_SIZE, size_bytes, **labels)
    out.set(BACKUP_ADDED, added_bytes, **labels)
    return out


def check_metrics(repository: str, results: dict[str, bool], finished: float) -> Textfile:
    out = Textfile(CHECK_SUCCESS)
    for client, passed in results.items():
        out.set(CHECK_SUCCESS, 1.0 if passed else 0.0, repository=repository, client=client)
    out.set(CHECK_LAST_RUN, finished, repository=repository)
    return out


def drill_metrics(
    host: str,
    *,
    passed: bool,
    finished: float,
    rto_seconds: float | None,
    rpo_seconds: float | None,
    rto_target_seconds: float,
    rpo_target_seconds: float,
) -> Textfile:
    out = Textfile()
    out.set(DRILL_SUCCESS, 1.0 if passed else 0.0, host=host)
    out.set(DRILL_LAST_RUN, finished, host=host)
    out.set(DRILL_RTO, rto_seconds, host=host)
    out.set(DRILL_RPO, rpo_seconds, host=host)
    out.set(DRILL_RTO_TARGET, rto_target_seconds, host=host)
    out.set(DRILL_RPO_TARGET, rpo_target_seconds, host=host)
    return out


def mesh_metrics(
    mesh: str,
    pairs: list[tuple[str, str, bool, float | None, float | None]],
    probed: dict[str, bool],
    pairs_down: int,
) -> Textfile:
    """pairs: (source, target, reachable, rtt seconds, handshake age seconds); probed: host -> probed."""
    out = Textfile(MESH_PAIR_UP, MESH_PAIR_RTT, MESH_HANDSHAKE_AGE, MESH_PAIRS_DOWN, MESH_HOST_PROBED,
                   MESH_CHECK_TIME)
    for source, target, reachable, rtt, age in pairs:
        labels = {"mesh": mesh, "source": source, "target": target}
        out.set(MESH_PAIR_UP, 1 if reachable else 0, **labels)
        out.set(MESH_PAIR_RTT, rtt, **labels)
        out.set(MESH_HANDSHAKE_AGE, age, **labels)
    for host, ok in sorted(probed.items()):
        out.set(MESH_HOST_PROBED, 1 if ok else 0, mesh=mesh, host=host)
    out.set(MESH_PAIRS_DOWN, pairs_down, mesh=mesh)
    out.set(MESH_CHECK_TIME, time.time(), mesh=mesh)
    return out


def write_mesh_metrics(
    path: Path,
    mesh: str,
    pairs: list[tuple[str, str, bool, float | None, float | None]],
    probed: dict[str, bool],
    pairs_down: int,
) -> Path:
    return mesh_metrics(mesh, pairs, probed, pairs_down).write(path)


def textfile_dir(fleet: Fleet, override: str | None = None) -> Path:
    """Where the host's node exporter reads text files (the fleet's `monitoring.textfile_dir`)."""
    return Path(override or fleet.monitoring.textfile_dir)


# Runs on the host (as root): the file appears whole, under a name the collector reads only once complete.
_PUT = 'set -e; umask 022; tmp="$1/.$2.tmp.$$"; cat > "$tmp"; mv -f "$tmp" "$1/$2"'


def publish(hosts: HostAccess, fleet: Fleet, host: str, name: str, metrics: Textfile,
            override: str | None = None) -> str:
    """Write `metrics` where `host`'s node exporter serves them, so Prometheus sees them with that host's labels
    wherever the flow ran (a worker, the operator's machine, the lab's controller). `override`: a folder on this
    machine instead (tests). Where it went, as `host:path` or a local path."""
    if override is not None:
        return str(metrics.write(textfile_path(Path(override), name)))
    target = textfile_path(textfile_dir(fleet), name)
    runner = hosts.runner(host)
    if not runner.remote:
        return str(metrics.write(target))
    done = runner.run(["sh", "-c", _PUT, "sh", str(target.parent), target.name], stdin=metrics.text().encode(),
                      timeout=60)
    if done.returncode != 0:
        raise CommandFailed(f"{host}: writing {target} failed (exit {done.returncode}): {done.stderr.strip()[:300]}",
                            f"check that {target.parent} exists on {host} (the monitoring_agent role makes it)",
                            returncode=done.returncode, stderr=done.stderr)
    return f"{host}:{target}"


def sync_metrics(
    job: str,
    source: str,
    *,
    success: bool,
    finished: float,
    last_success: float | None,
    lag_seconds: float | None,
    sent_bytes: int,
    sent_files: int,
    deleted_files: int,
    differing_files: int,
    errors_total: int,
    refusals_total: int,
    check_finished: float | None = None,
    check_bad_files: int | None = None,
) -> Textfile:
    out = Textfile(SYNC_SUCCESS, SYNC_LAST_RUN, SYNC_LAST_SUCCESS, SYNC_LAG, SYNC_SENT_BYTES, SYNC_SENT_FILES,
                   SYNC_DELETED_FILES, SYNC_DIFFERING_FILES, SYNC_ERRORS, SYNC_REFUSALS, SYNC_CHECK_LAST_RUN,
                   SYNC_CHECK_BAD_FILES)
    labels = {"sync_job": job, "source": source}
    out.set(SYNC_SUCCESS, 1.0 if success else 0.0, **labels)
    out.set(SYNC_LAST_RUN, finished, **labels)
    out.set(SYNC_LAST_SUCCESS, last_success, **labels)
    out.set(SYNC_LAG, lag_seconds, **labels)
    out.set(SYNC_SENT_BYTES, sent_bytes, **labels)
    out.set(SYNC_SENT_FILES, sent_files, **labels)
    out.set(SYNC_DELETED_FILES, deleted_files, **labels)
    out.set(SYNC_DIFFERING_FILES, differing_files, **labels)
    out.set(SYNC_ERRORS, errors_total, **labels)
    out.set(SYNC_REFUSALS, refusals_total, **labels)
    out.set(SYNC_CHECK_LAST_RUN, check_finished, **labels)
    out.set(SYNC_CHECK_BAD_FILES, check_bad_files, **labels)
    return out


@dataclass(frozen=True)
class TierHostFigures:
    """One upper-tier host after a pass, and the hosts of both tiers' usage."""

    boundary: str
    source: str
    success: bool
    finished: float
    last_success: float | None
    moved_files: int
    moved_bytes: int
    skipped_files: int
    journal_backlog: int
    usage: tuple[tuple[str, str, int, float, float | None], ...]  # (tier, host, used bytes, ratio, oldest age)


def tier_metrics(figures: TierHostFigures) -> Textfile:
    out = Textfile(TIER_USED_BYTES, TIER_USAGE, TIER_OLDEST_AGE, TIER_MOVED_FILES, TIER_MOVED_BYTES,
                   TIER_SKIPPED_FILES, TIER_SUCCESS, TIER_LAST_SUCCESS, TIER_JOURNAL_BACKLOG)
    labels = {"boundary": figures.boundary, "source": figures.source}
    out.set(TIER_SUCCESS, 1.0 if figures.success else 0.0, **labels)
    out.set(TIER_LAST_SUCCESS, figures.last_success, **labels)
    out.set(TIER_MOVED_FILES, figures.moved_files, **labels)
    out.set(TIER_MOVED_BYTES, figures.moved_bytes, **labels)
    out.set(TIER_SKIPPED_FILES, figures.skipped_files, **labels)
    out.set(TIER_JOURNAL_BACKLOG, figures.journal_backlog, **labels)
    for tier, host, used, ratio, oldest in figures.usage:
        out.set(TIER_USED_BYTES, used, tier=tier, host=host)
        out.set(TIER_USAGE, ratio, tier=tier, host=host)
        out.set(TIER_OLDEST_AGE, oldest, tier=tier, host=host)
    return out
