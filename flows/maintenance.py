"""`maintenance`: per fleet repository — catch up the offsite copy, forget by retention, prune, check
(`--read-data-subset`) every client repository in it, primary and offsite; fail naming what check found."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from primespark.backup import jobs
from primespark.backup.metrics import write_check_metrics
from primespark.backup.orchestration import textfile_dir, transient, writer_slot
from primespark.backup.policy import BackupContext, TransportName


class MaintenanceFailed(Exception):
    pass


@task(name="copy-offsite", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=exponential_backoff(30),
      retry_condition_fn=transient)
def catch_up_offsite(ctx: BackupContext, repository: str, client: str) -> list[str]:
    return jobs.copy_offsite(ctx, repository, client, None, writer_slot)


@task(name="forget-prune-check", cache_policy=NO_CACHE)
def forget_prune_check(ctx: BackupContext, repository: str, check: bool, subset: str | None) -> jobs.MaintenanceOutcome:
    return jobs.maintain(ctx, repository, check=check, read_data_subset=subset, slot=writer_slot)


@flow(name="maintenance", flow_run_name="maintenance-{repository}", log_prints=True)
def maintenance(
    repository: str,
    env: str = "lab",
    transport: TransportName = "ssh",
    check: bool = True,
    read_data_subset: str | None = None,
    offsite: bool = True,
    textfile: str | None = None,
) -> dict[str, Any]:
    logger = get_run_logger()
    ctx = BackupContext.load(env, transport)
    if repository not in ctx.backup.repositories:
        raise MaintenanceFailed(f"no repository {repository!r}; the fleet has {', '.join(ctx.backup.repositories)}")
    copy_errors: dict[str, str] = {}
    if offsite:
        for client in jobs.clients_of(ctx, repository):
            if ctx.offsite_of(repository):
                try:
                    catch_up_offsite(ctx, repository, client)
                except Exception as exc:
                    copy_errors[client] = f"offsite copy failed: {exc}"
    outcomes = [forget_prune_check(ctx, name, check, read_data_subset)
                for name in [repository, *(ctx.offsite_of(repository) if offsite else [])]]
    finished = time.time()
    lines = []
    for out in outcomes:
        if check:
            write_check_metrics(textfile_dir(ctx, textfile), out.repository, out.checked, finished)
        for client in sorted({*out.checked, *out.errors}):
            verdict = ("error: " + out.errors[client]) if client in out.errors else (
                "check passed" if out.checked.get(client) else "CHECK FAILED: " + "; ".join(out.problems[client]))
            lines.append(f"- `{out.repository}/{client}`: forgot {out.forgotten.get(client, 0)} snapshots, "
                         f"{out.orphan_manifests.get(client, 0)} orphan manifests; {verdict}")
    lines += [f"- `{repository}/{c}`: {e}" for c, e in copy_errors.items()]
    report = f"# Maintenance of {repository}\n\n" + "\n".join(lines) + "\n"
    create_markdown_artifact(report, key=f"maintenance-{repository}", description=f"maintenance of {repository}")
    logger.info(report)
    failed = [o for o in outcomes if not o.ok]
    if failed or copy_errors:
        reasons = [f"{o.repository}/{c}: {'; '.join(p)}" for o in failed for c, p in o.problems.items()]
        reasons += [f"{o.repository}/{c}: {e}" for o in failed for c, e in o.errors.items()]
        reasons += [f"{repository}/{c}: {e}" for c, e in copy_errors.items()]
        raise MaintenanceFailed("maintenance found problems: " + " | ".join(reasons))
    return {"repository": repository, "checked": {o.repository: o.checked for o in outcomes}}


if __name__ == "__main__":
    import sys

    maintenance(sys.argv[1], *(sys.argv[2:3]))
