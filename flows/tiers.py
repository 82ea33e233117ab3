"""Tier migration flows: `tier` (one pass over one boundary: hot → warm, or warm → cold), `tier-recall` (a file
back to its original place) and `tier-rebuild` (the catalog from the tiers' contents).

A pass: plan (scan the upper tier's hosts and the lower tier's usage) → replay what a killed pass left → move
the plan's batches (one task per batch; a retried batch replays its journal) → usage after → the report artifact
and the metrics, published on each upper-tier host. The flow holds one lock per tier host it writes (the
upper tier's hosts and the lower tier's), so there is one writer per tier host; core code takes no lock.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from primespark.context import FleetContext, Transport
from primespark.data import migrate
from primespark.data.tiers import TierPlan, next_tier, render_plan
from primespark.errors import StepFailed, UserError
from primespark.fleet.model import TierName
from primespark.monitoring.metrics import TierHostFigures, publish, tier_metrics
from primespark.orchestration.inputs import as_is
from primespark.orchestration.locks import hold, tier_lock
from primespark.orchestration.retries import retrying, transient


class TierFailed(UserError):
    """A pass with a batch that failed (the report says which)."""


@task(name="tier-plan", cache_policy=NO_CACHE, retry_condition_fn=transient)
def plan_task(ctx: FleetContext, tier: TierName, hosts: list[str] | None) -> tuple[TierPlan, str]:
    return migrate.plan_pass(ctx, tier, hosts)


@task(name="tier-replay", cache_policy=NO_CACHE, retry_condition_fn=transient)
def replay_task(ctx: FleetContext, source: str, dest: str) -> migrate.BatchResult | None:
    return migrate.replay(ctx, source, dest)


@task(name="tier-move", cache_policy=NO_CACHE, retry_condition_fn=transient)
def move_task(ctx: FleetContext, batch: migrate.Batch) -> migrate.BatchResult:
    return migrate.move_or_resume(ctx, batch, progress=get_run_logger().info)


@task(name="tier-usage", cache_policy=NO_CACHE, retry_condition_fn=transient)
def usage_task(ctx: FleetContext, plan: TierPlan) -> list[migrate.HostAfter]:
    return migrate.usage_after(ctx, plan)


def tier_of_name(ctx: FleetContext, tier: str) -> tuple[TierName, TierName]:
    try:
        upper = TierName(tier)
    except ValueError:
        raise UserError(f"no tier named {tier!r}", "use hot, warm or cold") from None
    if upper not in ctx.fleet.tiers:
        raise UserError(f"fleet {ctx.fleet.name} has no {tier} tier", "see `tiers:` in the fleet file")
    lower = next_tier(upper, list(ctx.fleet.tiers))
    if lower is None:
        raise UserError(f"the {tier} tier is the fleet's last: nothing lies below it", "run a pass of an upper tier")
    return upper, lower


def _publish(ctx: FleetContext, plan: TierPlan, results: list[migrate.BatchResult], after: list[migrate.HostAfter],
             success: bool, textfile: str | None) -> None:
    assert plan.to is not None
    boundary = f"{plan.tier.value}-{plan.to.value}"
    backlog = migrate.backlog(ctx)
    now = time.time()
    for host in [h for h in plan.usage if h in ctx.fleet.tiers[plan.tier].hosts]:
        mine = [r for r in results if r.source_host == host]
        figures = TierHostFigures(
            boundary, host, success, now, now if success else None, sum(r.moved for r in mine),
            sum(r.bytes for r in mine),
            sum(1 for s in plan.skipped if s.host == host) + sum(1 for w in plan.waiting if w.host == host)
            + sum(sum(r.abandoned.values()) for r in mine),
            sum(n for name, n in backlog.items() if name.startswith(f"{host}--")),
            tuple((a.tier, a.host, a.used, a.ratio, a.oldest_age) for a in after if a.host == host
                  or a.tier == plan.to.value))
        try:  # on the host, whose node exporter serves them; a host that cannot take them is a warning
            publish(ctx.hosts, ctx.fleet, host, f"tier_{boundary}_{host}", tier_metrics(figures), textfile)
        except StepFailed as exc:
            get_run_logger().warning("tier metrics of %s not published: %s", host, exc)


@flow(name="tier", flow_run_name="tier-{tier}", log_prints=True)
def tier(
    tier: str = "hot",
    env: str = "lab",
    transport: Transport = "ssh",
    hosts: list[str] | None = None,
    dry_run: bool = False,
    retries: int = 2,
    retry_delay_seconds: float = 10.0,
    textfile: str | None = None,
) -> dict[str, Any]:
    """One pass from `tier` down to the next tier (from every host of the tier, or `hosts`); `dry_run` plans and
    reports what would move, and moves nothing."""
    ctx = FleetContext.load(env, transport)
    upper, lower = tier_of_name(ctx, tier)
    chosen = hosts or list(ctx.fleet.tiers[upper].hosts)
    options = retrying(retries, retry_delay_seconds)
    key = f"tier-{upper.value}-{lower.value}"
    with hold(*(tier_lock(h) for h in [*chosen, *ctx.fleet.tiers[lower].hosts])):
        plan, algorithm = plan_task.with_options(**options)(ctx, upper, chosen)
        if dry_run:
            create_markdown_artifact(render_plan(plan), key=f"{key}-plan", description=f"tier {key}: the plan")
            return {"tier": upper.value, "to": lower.value, "dry_run": True, "moves": len(plan.moves),
                    "bytes": plan.bytes, "waiting": len(plan.waiting), "skipped": plan.skipped_by_reason()}
        results: list[migrate.BatchResult] = []
        error: Exception | None = None
        try:
            results = migrate.run_plan(ctx, plan, algorithm,
                                       step=lambda batch: move_task.with_options(**options)(ctx, as_is(batch)))
        except Exception as exc:  # reported and published, then raised
            error = exc
        after = usage_task.with_options(**options)(ctx, as_is(plan))
    create_markdown_artifact(migrate.render_pass(plan, results, after), key=key, description=f"tier {key}")
    _publish(ctx, plan, results, after, error is None, textfile)
    if error is not None:
        if isinstance(error, UserError):
            raise TierFailed(f"tier {key}: {error.message}", error.fix) from error
        raise error
    return {"tier": upper.value, "to": lower.value, "dry_run": False,
            "results": [asdict(r) for r in results], "after": [asdict(a) for a in after],
            "skipped": plan.skipped_by_reason()}


@flow(name="tier-recall", flow_run_name="tier-recall", log_prints=True)
def tier_recall(path: str, env: str = "lab", transport: Transport = "ssh") -> dict[str, Any]:
    """Bring a moved file (`PATH` or `HOST:PATH`, its original place) back, through the journaled move."""
    ctx = FleetContext.load(env, transport)
    found = migrate.where(ctx, path)
    hosts = {h for row in found for h in (row["host"], row["origin_host"])}
    with hold(*(tier_lock(h) for h in sorted(hosts))):
        return asdict(migrate.recall(ctx, path))


@flow(name="tier-rebuild", flow_run_name="tier-rebuild", log_prints=True)
def tier_rebuild(env: str = "lab", transport: Transport = "ssh") -> dict[str, Any]:
    """The catalog rebuilt from the lower tiers' contents, holding every tier host's lock."""
    ctx = FleetContext.load(env, transport)
    every = sorted({h for spec in ctx.fleet.tiers.values() for h in spec.hosts})
    with hold(*(tier_lock(h) for h in every)):
        return {"entries": migrate.rebuild(ctx)}
