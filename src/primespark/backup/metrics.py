"""Prometheus text-format metrics for node exporter's textfile collector, one file per flow and subject.

One file per (flow, host or repository) so concurrent flows never overwrite each other's figures;
`write_to_textfile` writes through a temporary file and a rename, so the collector never reads half a file.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile


def _write(directory: Path, name: str, registry: CollectorRegistry) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"primespark_{name}.prom"
    write_to_textfile(str(path), registry)
    path.chmod(0o644)
    return path


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
    registry = CollectorRegistry()
    labels = {"host": host, "repository": repository}

    def gauge(name: str, doc: str, value: float | None) -> None:
        if value is not None:
            Gauge(name, doc, list(labels), registry=registry).labels(**labels).set(value)

    gauge("primespark_backup_success", "1 if the last backup run succeeded", 1.0 if success else 0.0)
    gauge("primespark_backup_last_run_timestamp_seconds", "When the last backup run ended", finished)
    gauge("primespark_backup_last_success_timestamp_seconds", "When a backup last succeeded", last_success)
    gauge("primespark_backup_duration_seconds", "Duration of the last backup run", duration_seconds)
    gauge("primespark_backup_snapshot_timestamp_seconds", "Time of the newest snapshot", snapshot_time)
    gauge("primespark_backup_snapshot_age_seconds", "Age of the newest snapshot when written",
          None if snapshot_time is None else max(0.0, finished - snapshot_time))
    gauge("primespark_backup_size_bytes", "Bytes in the newest snapshot", size_bytes)
    gauge("primespark_backup_added_bytes", "Bytes the last backup added to the repository", added_bytes)
    return _write(directory, f"backup_{host}", registry)


def write_check_metrics(directory: Path, repository: str, results: dict[str, bool], finished: float) -> Path:
    registry = CollectorRegistry()
    ok = Gauge("primespark_restic_check_success", "1 if restic check found no errors",
               ["repository", "client"], registry=registry)
    for client, passed in results.items():
        ok.labels(repository=repository, client=client).set(1.0 if passed else 0.0)
    Gauge("primespark_restic_check_last_run_timestamp_seconds", "When maintenance last ran", ["repository"],
          registry=registry).labels(repository=repository).set(finished)
    return _write(directory, f"maintenance_{repository}", registry)


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
    registry = CollectorRegistry()

    def gauge(name: str, doc: str, value: float | None) -> None:
        if value is not None:
            Gauge(name, doc, ["host"], registry=registry).labels(host=host).set(value)

    gauge("primespark_drill_success", "1 if the last DR drill passed", 1.0 if passed else 0.0)
    gauge("primespark_drill_last_run_timestamp_seconds", "When the last DR drill ended", finished)
    gauge("primespark_drill_rto_seconds", "Drill start to verified restore", rto_seconds)
    gauge("primespark_drill_rpo_seconds", "Age of the restored snapshot at drill start", rpo_seconds)
    gauge("primespark_drill_rto_target_seconds", "The fleet's RTO target", rto_target_seconds)
    gauge("primespark_drill_rpo_target_seconds", "The fleet's RPO target", rpo_target_seconds)
    return _write(directory, f"drill_{host}", registry)
