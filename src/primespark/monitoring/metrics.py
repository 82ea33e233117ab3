"""Every metric the project writes, by name, in one registry; and the textfile writer that writes them.

Flows and checks write Prometheus text files for node exporter's textfile collector, one file per (flow,
subject), so concurrent runs never overwrite each other's figures. Writers name metrics only through the
constants here (a name typed twice can drift), so a renamed metric breaks the tests that read the files,
and alert rules built from this registry follow the rename. `write_to_textfile` writes through a temporary
file and a rename: the collector never reads half a file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from primespark.fleet.model import Fleet


@dataclass(frozen=True)
class Metric:
    name: str
    help: str
    labels: tuple[str, ...]


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

# --- sync (flows/sync.py): one file per link, a job's source host --------------------------------------------
_SYNC = ("job", "source")
SYNC_SUCCESS = Metric("primespark_sync_success", "1 if the link's last pass succeeded (0: failed or refused)", _SYNC)
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

REGISTRY: dict[str, Metric] = {m.name: m for m in globals().copy().values() if isinstance(m, Metric)}


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
        if metric.name not in self.gauges:
            self.gauges[metric.name] = Gauge(metric.name, metric.help, list(metric.labels), registry=self.registry)
        return self.gauges[metric.name]

    def set(self, metric: Metric, value: float | None, **labels: str) -> None:
        """One sample; a value of None writes none (a figure not known yet)."""
        gauge = self._gauge(metric)
        if value is not None:
            gauge.labels(**labels).set(value)

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(path), self.registry)
        path.chmod(0o644)
        return path


def textfile_path(directory: Path, name: str) -> Path:
    return directory / f"primespark_{name}.prom"


def write_backup_metrics(
    directory: Path,
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
) -> Path:
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
    return out.write(textfile_path(directory, f"backup_{host}"))


def write_check_metrics(directory: Path, repository: str, results: dict[str, bool], finished: float) -> Path:
    out = Textfile(CHECK_SUCCESS)
    for client, passed in results.items():
        out.set(CHECK_SUCCESS, 1.0 if passed else 0.0, repository=repository, client=client)
    out.set(CHECK_LAST_RUN, finished, repository=repository)
    return out.write(textfile_path(directory, f"maintenance_{repository}"))


def write_drill_metrics(
    directory: Path,
    host: str,
    *,
    passed: bool,
    finished: float,
    rto_seconds: float | None,
    rpo_seconds: float | None,
    rto_target_seconds: float,
    rpo_target_seconds: float,
) -> Path:
    out = Textfile()
    out.set(DRILL_SUCCESS, 1.0 if passed else 0.0, host=host)
    out.set(DRILL_LAST_RUN, finished, host=host)
    out.set(DRILL_RTO, rto_seconds, host=host)
    out.set(DRILL_RPO, rpo_seconds, host=host)
    out.set(DRILL_RTO_TARGET, rto_target_seconds, host=host)
    out.set(DRILL_RPO_TARGET, rpo_target_seconds, host=host)
    return out.write(textfile_path(directory, f"drill_{host}"))


def write_mesh_metrics(
    path: Path,
    mesh: str,
    pairs: list[tuple[str, str, bool, float | None, float | None]],
    probed: dict[str, bool],
    pairs_down: int,
) -> Path:
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
    return out.write(path)


def textfile_dir(fleet: Fleet, override: str | None = None) -> Path:
    """Where the host's node exporter reads text files (the fleet's `monitoring.textfile_dir`)."""
    return Path(override or fleet.monitoring.textfile_dir)


def write_sync_metrics(
    directory: Path,
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
) -> Path:
    out = Textfile(SYNC_SUCCESS, SYNC_LAST_RUN, SYNC_LAST_SUCCESS, SYNC_LAG, SYNC_SENT_BYTES, SYNC_SENT_FILES,
                   SYNC_DELETED_FILES, SYNC_DIFFERING_FILES, SYNC_ERRORS, SYNC_REFUSALS, SYNC_CHECK_LAST_RUN,
                   SYNC_CHECK_BAD_FILES)
    labels = {"job": job, "source": source}
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
    return out.write(textfile_path(directory, f"sync_{job}_{source}"))
