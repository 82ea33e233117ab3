"""`dr_drill`: restore a host's newest snapshot onto the fleet's scratch host, verify it (restic --verify and
content hashes against the source as of the snapshot), run the host's service checks, measure RTO and RPO against the
fleet's targets, check the repository's structure, publish the report (markdown) and the drill history (table),
fail the run on any miss."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from primespark.backup import drill as drills
from primespark.backup.session import RestoreRun
from primespark.context import FleetContext, Transport
from primespark.errors import StepFailed
from primespark.monitoring import metrics
from primespark.orchestration import auditing
from primespark.orchestration.auditing import audited
from primespark.orchestration.failures import RunFailed
from primespark.orchestration.locks import drill_lock, hold, repository_lock

HISTORY_ROWS = 30


class DrillFailed(RunFailed):
    pass


@task(name="drill-restore", cache_policy=NO_CACHE)
def restore(ctx: FleetContext, drill: drills.Drill) -> RestoreRun | None:
    return drills.restore(ctx, drill)


@task(name="drill-judge", cache_policy=NO_CACHE)
def judge(ctx: FleetContext, drill: drills.Drill, run: RestoreRun | None) -> drills.DrillReport:
    return drills.judge(ctx, drill, run)


@task(name="drill-check-repository", cache_policy=NO_CACHE)
def check_repository(ctx: FleetContext, drill: drills.Drill) -> drills.DrillReport:
    return drills.check_repository(ctx, drill)


def publish(ctx: FleetContext, report: drills.DrillReport, textfile: str | None) -> list[str]:
    """The history row, the metrics and the artifacts, each whatever became of the others; what failed (metrics that
    did not reach the host are a warning, not a failed drill)."""
    problems = []
    rows: list[dict[str, object]] = []
    try:
        rows = drills.append_history(ctx.state_dir, report)  # first: it may add a note to the report
    except Exception as exc:  # the metrics and the report still go out
        problems.append(f"the drill history was not written: {exc}")
    values = metrics.drill_metrics(report.host, passed=report.passed, finished=time.time(),
                                   rto_seconds=report.rto_seconds, rpo_seconds=report.rpo_seconds,
                                   rto_target_seconds=report.rto_target_seconds,
                                   rpo_target_seconds=report.rpo_target_seconds)
    try:  # on the drilled host, whose node exporter serves them; a host that cannot take them is a warning
        metrics.publish(ctx.hosts, ctx.fleet, report.host, f"drill_{report.host}", values, textfile)
    except StepFailed as exc:  # the report still goes out; a host gone quiet raises its own alert
        get_run_logger().warning("drill metrics of %s not published: %s", report.host, exc)
    markdown = drills.render_markdown(report)
    get_run_logger().info(markdown)
    create_markdown_artifact(markdown, key=f"drill-report-{report.host}", description=f"DR drill of {report.host}")
    if rows:
        create_table_artifact(rows[-HISTORY_ROWS:], key="drill-history", description="the last DR drills, all hosts")
    return problems


@flow(name="dr-drill", flow_run_name="dr-drill-{host}", log_prints=True)
@audited(auditing.host)
def dr_drill(
    host: str,
    env: str = "lab",
    transport: Transport = "ssh",
    keep_restore: bool = False,
    textfile: str | None = None,
    repository: str | None = None,
) -> dict[str, Any]:
    """`repository`: the plan's primary by default, or one of its offsite copies. Every drill ends with a report,
    a history row and metrics, whatever failed; clean-up problems are reported beside the verdict."""
    logger = get_run_logger()
    ctx = FleetContext.load(env, transport)
    drill = drills.plan_drill(ctx, host, repository)
    try:
        with hold(drill_lock(host)):  # one drill of a host at a time: the sweep leaves a running one's copy alone
            drills.sweep(ctx, drill)
            try:
                run = restore(ctx, drill)
                drill.report = judge(ctx, drill, run)
                if run is not None:
                    # restic check takes restic's exclusive lock: not while a backup writes into the repository
                    with hold(repository_lock(drill.source)):
                        drill.report = check_repository(ctx, drill)
            finally:
                if not keep_restore:
                    drills.clean_up(ctx, drill)
    except Exception as exc:  # every drill ends with a report
        drills.failed_step(drill.report, exc)
    report = drills.finish(drill)
    problems = publish(ctx, report, textfile)
    for problem in report.cleanup_problems + problems:
        logger.warning("%s", problem)
    if not report.passed or problems:
        raise DrillFailed(f"DR drill of {host} failed: " + " | ".join(report.failures + problems))
    return report.history_row()
