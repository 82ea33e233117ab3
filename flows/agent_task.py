"""The `agent-task` flow: one agent task placed by capacity, power and data locality, run on the chosen host.

Steps: what the hosts know of the task id (a committed result ends the run there: nothing runs twice) → the hosts'
facts → the placement (pure; its table, every candidate with its reason, is an artifact of each attempt) → the
run on the chosen host (`primespark.agents.execute`: limits, timeout, result committed once) → the result
artifact. An attempt that fails with the spec's `retries` left is placed again on fresh facts (the host may have
filled up or entered its quiet hours meanwhile). An attempt the host's power script stopped (quiet hours began, or
the battery ran low: `power-stopped`) is placed again the same way without using a retry: the host drained itself,
so fresh facts keep it off. One run per task id at a time: a lock named after it.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from primespark.agents import execute
from primespark.agents.execute import default_task_id
from primespark.agents.placement import Decision, Facts, NoEligibleHost, Placed, place
from primespark.context import FleetContext, Transport
from primespark.errors import UserError
from primespark.fleet.model import TaskSpec
from primespark.orchestration.agent_runs import HOST_LABEL, TASK_ID_LABEL, label_run
from primespark.orchestration.locks import agent_task_lock, hold
from primespark.orchestration.retries import retrying, transient

# Re-placements after a power stop, at most: each one is on a host that was eligible then; a fleet whose hosts keep
# going quiet under the task ends the run rather than loop.
MAX_POWER_REQUEUES = 10


@task(name="agent-task-find", cache_policy=NO_CACHE, retry_condition_fn=transient)
def find_step(ctx: FleetContext, task_id: str) -> list[execute.Found]:
    return execute.find_task(ctx.hosts, ctx.fleet, task_id)


@task(name="agent-task-facts", cache_policy=NO_CACHE, retry_condition_fn=transient)
def facts_step(ctx: FleetContext, spec: TaskSpec, facts_file: str | None) -> tuple[Facts, list[Placed], datetime,
                                                                                     str]:
    """The hosts' facts now (or from a facts file, as `spark task plan --facts`), what is placed, the time."""
    from primespark.agents.facts import live_facts, load_facts_file

    now = datetime.now(UTC)
    if facts_file is None:
        facts, source = live_facts(ctx, spec, connect=False)  # this run talks to the fleet's server already
        return facts, [], now, source
    given = load_facts_file(Path(facts_file))
    facts, placed = given.facts(ctx.fleet, facts_file)
    if given.now is not None and given.now.tzinfo is None:
        raise UserError(f"{facts_file}: now: {given.now.isoformat()} has no time zone",
                        "write it with its offset, e.g. 2026-11-30T22:30:00Z")
    return facts, placed, given.now or now, f"from {facts_file}"


@task(name="agent-task-run", cache_policy=NO_CACHE, retry_condition_fn=transient)
def run_step(ctx: FleetContext, host: str, task_id: str, spec: TaskSpec) -> execute.TaskResult:
    logger = get_run_logger()

    def log(stream: str, line: str) -> None:  # each line of the command's output as it comes
        (logger.info if stream == "stdout" else logger.warning)("%s %s: %s", host, stream, line)

    return execute.run_task(ctx.hosts, ctx.fleet, host, task_id, spec, on_output=log)


def artifact_key(task_id: str) -> str:
    """Artifact keys take lower-case letters, digits and dashes."""
    return "agent-task-" + re.sub(r"[^a-z0-9-]", "-", task_id)


def _decision_artifact(ctx: FleetContext, decision: Decision, task_id: str, attempt: int, source: str,
                       now: datetime) -> None:
    rows = [{"host": c.host, "site": ctx.fleet.hosts[c.host].site, "verdict": c.verdict, "why": c.reason}
            for c in decision.candidates]
    create_table_artifact(rows, key=f"{artifact_key(task_id)}-placement",
                          description=f"task {decision.task} ({task_id}), attempt {attempt}, at {now.isoformat()}: "
                          f"where it runs and why (facts {source})")


def _result_artifact(result: execute.TaskResult, why: str) -> None:
    lines = [f"# task {result.task_id}: {result.status}", "",
             f"- host: {result.host} ({why})", f"- exit status: {result.returncode}",
             f"- folder: `{result.path}`", f"- limits: {result.limits}",
             f"- committed earlier: {'yes, nothing ran now' if result.existing else 'no'}"]
    if result.stopped_by:
        lines.append(f"- stopped by: {result.stopped_by} (placed again on fresh facts)")
    create_markdown_artifact("\n".join(lines), key=f"{artifact_key(result.task_id)}-result",
                             description=f"task {result.task_id}: its result")


def resolve_task(ctx: FleetContext, env: str, template: str | None, spec: TaskSpec | None,
                 name: str | None) -> tuple[str, str, TaskSpec]:
    """(name, where it is written, the task): a template of the fleet, or an inline spec checked as one."""
    from primespark.fleet.checks import task_problems
    from primespark.fleet.loader import resolve

    fleet_file = resolve(env)
    if (spec is None) == (template is None):
        raise UserError("name one task: a template or an inline spec",
                        f"templates of {ctx.fleet.name}: {', '.join(ctx.fleet.tasks) or 'none'}")
    if template is not None:
        if template not in ctx.fleet.tasks:
            raise UserError(f"fleet {ctx.fleet.name} has no task template named {template!r}",
                            f"use one of: {', '.join(ctx.fleet.tasks) or 'none (add a tasks: section)'}")
        return template, f"{fleet_file}: tasks.{template}", ctx.fleet.tasks[template]
    assert spec is not None
    label = name or "inline"
    problems = list(task_problems(ctx.fleet.model_copy(update={"tasks": {label: spec}})))
    if problems:
        raise UserError("\n".join(f"inline task {label}: {p.message}" + (f" (fix: {p.fix})" if p.fix else "")
                                  for p in problems))
    return label, f"inline task {label}", spec


def stop_on_host(flow: Any, flow_run: Any, state: Any) -> None:
    """Cancellation hook: a run cancelled (from the UI) stops its task's processes on their host, as
    `spark task cancel` does. Prefect calls it where it runs the flow and sees the cancellation (a worker or
    runner serving a deployment): `agent-task` has no deployment yet, so a UI cancel of a run started by
    `spark task run` does not reach it."""
    from primespark.fleet.loader import resolve

    parameters = dict(flow_run.parameters or {})
    task_id = parameters.get("task_id") or default_task_id(parameters.get("template"), parameters.get("name"),
                                                           flow_run.id)
    env = str(parameters.get("env", "lab"))
    ctx = FleetContext.load(env, parameters.get("transport", "ssh"))
    try:
        found, unasked = execute.cancel_task(ctx.hosts, ctx.fleet, task_id, str(resolve(env)))
    except UserError as exc:  # not started on any host yet: nothing to stop
        print(f"task {task_id}: nothing to stop: {exc.message}")
        return
    for one in found:
        print(f"task {task_id} on {one.host}: {one.found} (pid {one.pid}); {len(unasked)} host(s) not asked")


@flow(name="agent-task", flow_run_name="agent-task-{task_id}", log_prints=True, on_cancellation=[stop_on_host])
def agent_task(
    template: str | None = None,
    spec: TaskSpec | None = None,
    name: str | None = None,
    task_id: str | None = None,
    env: str = "lab",
    transport: Transport = "ssh",
    facts_file: str | None = None,
    retry_delay_seconds: float = 10.0,
) -> dict[str, Any]:
    """Run one agent task: a `template` of the fleet (its `tasks:`) or an inline `spec` (named `name`), as
    `task_id` (default: from the name and the flow run's id; give an earlier id to rerun: a committed result is
    reported, not run again). `facts_file` takes the hosts' facts from a YAML file instead of their node
    exporters (docs/agents.md)."""
    logger = get_run_logger()
    ctx = FleetContext.load(env, transport)
    label, where, chosen = resolve_task(ctx, env, template, spec, name)
    from prefect.runtime import flow_run

    task_id = execute.check_task_id(task_id) if task_id else default_task_id(template, name, flow_run.id)
    label_run({TASK_ID_LABEL: task_id})  # `spark task ls` reads the id and the host from the run's labels
    # a host left unreachable is retried by Prefect; a failed command is an attempt of the spec's own
    options = retrying(2, retry_delay_seconds)
    with hold(agent_task_lock(task_id)):
        known = find_step.with_options(**options)(ctx, task_id)
        committed = [f for f in known if f.result is not None]
        if committed:
            result = committed[0].result
            assert result is not None
            label_run({HOST_LABEL: result.host})
            logger.info("task %s: committed earlier on %s (%s): nothing runs", task_id, result.host, result.path)
            _result_artifact(result, "committed earlier")
            return {**asdict(result), "why": "committed earlier", "attempts": 0}
        for left in (f for f in known if f.found == "running"):
            # a killed attempt's command, still running there: it ends before the task runs anywhere again
            logger.warning("task %s: a killed attempt still runs on %s (pid %s); stopping it", task_id, left.host,
                           left.pid)
            execute.cancel_task(ctx.hosts, ctx.fleet, task_id, where)  # every host: find_task reached them all
        failed: execute.TaskRunFailed | None = None
        attempt, failures, requeued = 0, 0, 0
        while failures <= chosen.retries:
            attempt += 1
            facts, placed, now, source = facts_step.with_options(**options)(ctx, chosen, facts_file)
            decision = place(ctx.fleet, chosen, facts, placed, now, label)
            _decision_artifact(ctx, decision, task_id, attempt, source, now)
            if decision.host is None:
                raise NoEligibleHost(where, decision)
            why = next(c.reason for c in decision.candidates if c.verdict == "chosen")
            label_run({HOST_LABEL: decision.host})
            logger.info("task %s, attempt %d: on %s: %s", task_id, attempt, decision.host, why)
            result = run_step.with_options(**options)(ctx, decision.host, task_id, chosen)
            _result_artifact(result, why)
            if result.status == "succeeded":
                return {**asdict(result), "why": why, "attempts": attempt}
            failed = execute.failure(result)
            if result.status == "cancelled":
                break  # cancelled by hand: not tried again
            if result.status == "power-stopped":  # not the task's fault: placed again, its retries kept
                requeued += 1
                if requeued > MAX_POWER_REQUEUES:
                    logger.error("task %s: stopped for power %d times; not placed again", task_id, requeued)
                    break
                logger.warning("task %s, attempt %d: %s; placing it again on fresh facts (retries kept)", task_id,
                               attempt, failed.message.splitlines()[0])
                continue
            failures += 1
            if failures <= chosen.retries:
                logger.warning("task %s, attempt %d failed: %s; placing it again on fresh facts", task_id, attempt,
                               failed.message.splitlines()[0])
        assert failed is not None
        raise failed
