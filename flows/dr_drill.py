"""`dr_drill`: restore a host's newest snapshot onto the fleet's scratch host, verify it (restic --verify and
content hashes against the source as of the snapshot), run the host's service checks, measure RTO and RPO against the
fleet's targets, publish the report (markdown) and the drill history (table), fail the run on any miss."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from primespark.backup.drill import append_history, render_markdown, run_drill
from primespark.backup.metrics import write_drill_metrics
from primespark.backup.orchestration import textfile_dir
from primespark.backup.policy import BackupContext, TransportName

HISTORY_ROWS = 30


class DrillFailed(Exception):
    pass


@task(name="drill-step", cache_policy=NO_CACHE)
def drill_step(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def _step(fn: Callable[..., Any], *args: Any) -> Any:
    return drill_step.with_options(task_run_name=f"drill-{fn.__name__.replace('_', '-')}")(fn, *args)


@flow(name="dr-drill", flow_run_name="dr-drill-{host}", log_prints=True)
def dr_drill(
    host: str,
    env: str = "lab",
    transport: TransportName = "ssh",
    keep_restore: bool = False,
    textfile: str | None = None,
    repository: str | None = None,
) -> dict[str, Any]:
    """`repository`: the plan's primary by default, or one of its offsite copies."""
    logger = get_run_logger()
    ctx = BackupContext.load(env, transport)
    report = run_drill(ctx, host, keep_restore=keep_restore, step=_step, repository=repository)
    markdown = render_markdown(report)
    create_markdown_artifact(markdown, key=f"drill-report-{host}", description=f"DR drill of {host}")
    rows = append_history(ctx, report)
    create_table_artifact(rows[-HISTORY_ROWS:], key="drill-history", description="the last DR drills, all hosts")
    write_drill_metrics(textfile_dir(ctx, textfile), host, passed=report.passed, finished=time.time(),
                        rto_seconds=report.rto_seconds, rpo_seconds=report.rpo_seconds,
                        rto_target_seconds=report.rto_target_seconds, rpo_target_seconds=report.rpo_target_seconds)
    logger.info(markdown)
    if not report.passed:
        raise DrillFailed(f"DR drill of {host} failed: " + " | ".join(report.failures))
    return report.history_row()


if __name__ == "__main__":
    import sys

    dr_drill(sys.argv[1], *(sys.argv[2:3]))
