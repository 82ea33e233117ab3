"""`dr_drill`: restore a host's newest snapshot onto the fleet's scratch host, verify it (restic --verify and
content hashes against the source as of the snapshot), run the host's service checks, measure RTO and RPO against the
fleet's targets, publish the report (markdown) and the drill history (table), fail the run on any miss."""

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
from primespark.monitoring.metrics import drill_metrics, publish

HISTORY_ROWS = 30


class DrillFailed(Exception):
    pass


@task(name="drill-restore", cache_policy=NO_CACHE)
def restore(ctx: FleetContext, drill: drills.Drill) -> RestoreRun | None:
    return drills.restore(ctx, drill)


@task(name="drill-judge", cache_policy=NO_CACHE)
def judge(ctx: FleetContext, drill: drills.Drill, run: RestoreRun | None) -> drills.DrillReport:
    return drills.judge(ctx, drill, run)


@flow(name="dr-drill", flow_run_name="dr-drill-{host}", log_prints=True)
def dr_drill(
    host: str,
    env: str = "lab",
    transport: Transport = "ssh",
    keep_restore: bool = False,
    textfile: str | None = None,
    repository: str | None = None,
) -> dict[str, Any]:
    """`repository`: the plan's primary by default, or one of its offsite copies."""
    logger = get_run_logger()
    ctx = FleetContext.load(env, transport)
    drill = drills.plan_drill(ctx, host, repository)
    try:
        drill.report = judge(ctx, drill, restore(ctx, drill))
    except StepFailed as exc:
        drill.report.failures.append(str(exc))
    finally:
        if not keep_restore:
            drills.clean_up(ctx, drill)
    report = drills.finish(drill)
    markdown = drills.render_markdown(report)
    create_markdown_artifact(markdown, key=f"drill-report-{host}", description=f"DR drill of {host}")
    rows = drills.append_history(ctx.state_dir, report)
    create_table_artifact(rows[-HISTORY_ROWS:], key="drill-history", description="the last DR drills, all hosts")
    metrics = drill_metrics(host, passed=report.passed, finished=time.time(), rto_seconds=report.rto_seconds,
                            rpo_seconds=report.rpo_seconds, rto_target_seconds=report.rto_target_seconds,
                            rpo_target_seconds=report.rpo_target_seconds)
    try:  # on the drilled host, whose node exporter serves them; a host that cannot take them is a warning
        publish(ctx.hosts, ctx.fleet, host, f"drill_{host}", metrics, textfile)
    except StepFailed as exc:
        logger.warning("drill metrics of %s not published: %s", host, exc)
    logger.info(markdown)
    if not report.passed:
        raise DrillFailed(f"DR drill of {host} failed: " + " | ".join(report.failures))
    return report.history_row()
