"""The `agent-task` flow: one agent task placed by capacity, power and data locality, run on the chosen host.

Steps: what the hosts know of the task id (a committed result ends the run there: nothing runs twice) → the hosts'
facts → the placement (pure; its table, every candidate with its reason, is an artifact of each attempt) → the
claim of the chosen host (under its lock: does it still take the task with the tasks placed meanwhile?) → the
run on the chosen host (`primespark.agents.execute`: limits, timeout, result committed once) → the result
artifact. An attempt that fails with the spec's `retries` left is placed again on fresh facts (the host may have
filled up or entered its quiet hours meanwhile). An attempt whose host was lost mid-task (`HostLost`: silent, and
no answer to a probe) is no failure of the task: the host is kept off for the rest of the run ("lost mid-task at
HH:MM:SS" in the next decision table) and the task placed again elsewhere. When no host can take the task now but
one may later (every exclusion is one that passes: quiet hours, battery, drained, busy, facts unreadable, pool not
ready), the run waits for one, placing it again every `poll_seconds` up to `wait_seconds` (default: the spec's
timeout) and saying why each time; when none ever can (architecture, labels, size: the fleet alone says so, or the
hosts are kept off), it fails at once. An attempt the
host's power script stopped (quiet hours began, or the battery ran low: `power-stopped`) is placed again the same
way without using a retry: the host drained itself. One run per task id at a time: a lock named after it; one
result per task id: a run is committed only once its answer is in.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture

from primespark.agents import execute
from primespark.agents.execute import default_task_id
from primespark.agents.placement import (
    Decision,
    Facts,
    NoEligibleHost,
    NoEligibleHostInTime,
    Placed,
    fits_after,
    may_take_later,
    place,
)
from primespark.context import FleetContext, Transport
from primespark.errors import StepFailed, UserError
from primespark.fleet.model import Fleet, TaskSpec
from primespark.hosts import HostLost, HostUnreachable
from primespark.orchestration import auditing
from primespark.orchestration.agent_runs import (
    HOST_LABEL,
    TASK_ID_LABEL,
    label_run,
    placed_note,
    placement_labels,
    recently_placed,
    waiting_label,
)
from primespark.orchestration.auditing import audited
from primespark.orchestration.locks import agent_task_lock, hold, placement_lock
from primespark.orchestration.retries import retrying, transient

# Re-placements after a power stop, at most: each one is on a host that was eligible then; a fleet whose hosts keep
# going quiet under the task ends the run rather than loop.
MAX_POWER_REQUEUES = 10


@task(name="agent-task-find", cache_policy=NO_CACHE, retry_condition_fn=transient)
def find_step(ctx: FleetContext, task_id: str, site: str | None = None) -> list[execute.Found]:
    return execute.find_task(ctx.hosts, ctx.fleet, task_id, site_scope(ctx.fleet, site)[0])


FactsRead = tuple[Facts, list[Placed], datetime, str]


@task(name="agent-task-facts", cache_policy=NO_CACHE, retry_condition_fn=transient)
def facts_step(ctx: FleetContext, env: str, spec: TaskSpec, facts_file: str | None,
               site: str | None = None) -> FactsRead:
    """The hosts' facts now (or from a facts file, as `spark task plan --facts`), what is placed, the time. Live:
    the tasks of the fleet placed within the last minute by other runs, whose load the facts do not show yet."""
    from prefect.runtime import flow_run

    from primespark.agents.facts import live_facts, load_facts_file

    now = datetime.now(UTC)
    if facts_file is None:
        placed = recently_placed(env, now.timestamp(), exclude=str(flow_run.id) if flow_run.id else None)
        # this run talks to the fleet's server already
        facts, source = live_facts(ctx, spec, connect=False, within=site_scope(ctx.fleet, site)[0])
        return facts, placed, now, source + placed_note(placed)
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


def _label(logger: Any, task_id: str, labels: dict[str, str]) -> None:
    missed = label_run(labels)
    if missed is not None:
        logger.warning("task %s: its run's labels %s are not set (%s): `spark task ls` and the tasks placed in the "
                       "next minute do not see them; the task goes on", task_id, ", ".join(sorted(labels)), missed)


def _claim(ctx: FleetContext, env: str, spec: TaskSpec, label: str, task_id: str, facts: Facts, now: datetime,
           decision: Decision, keep_off: dict[str, str]) -> list[Placed] | None:
    """Claim the host `decision` chose: under the host's lock, read the tasks placed by now (two runs that read them
    at the same instant each decided without the other) and, if the host still takes this one, write the run's
    placement labels: None. Else the tasks placed by now, to place again with. (When they cannot be read, the
    decision stands, with a warning: the labels are bookkeeping, as in `_label`.)"""
    import httpx
    from prefect.runtime import flow_run

    host = decision.host
    assert host is not None
    logger = get_run_logger()
    with hold(placement_lock(host)):
        try:
            placed = recently_placed(env, time.time(), exclude=str(flow_run.id))
        except httpx.HTTPError as exc:
            logger.warning("task %s: the tasks placed meanwhile are not read (%s); placed on %s as decided", task_id,
                           str(exc).splitlines()[0] if str(exc) else type(exc).__name__, host)
            placed = []
        if fits_after(ctx.fleet, spec, facts, placed, now, host, label, keep_off) is not None:
            return placed
        _label(logger, task_id, placement_labels(host, spec.cpus, spec.memory_mb, time.time()))
    return None


def artifact_key(task_id: str) -> str:
    """Artifact keys take lower-case letters, digits and dashes."""
    return "agent-task-" + re.sub(r"[^a-z0-9-]", "-", task_id)


def _decision_artifact(ctx: FleetContext, decision: Decision, task_id: str, attempt: int, source: str,
                       now: datetime, shown: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
    """The decision table, published unless it is the one `shown` last (a run waiting for a host places the task
    again every few seconds: one artifact per change, not per try)."""
    rows = [{"host": c.host, "site": ctx.fleet.hosts[c.host].site, "verdict": c.verdict, "why": c.reason}
            for c in decision.candidates]
    if rows != shown:
        create_table_artifact(rows, key=f"{artifact_key(task_id)}-placement",
                              description=f"task {decision.task} ({task_id}), attempt {attempt}, at "
                              f"{now.isoformat()}: where it runs and why (facts {source})")
    return rows


def _result_artifact(result: execute.TaskResult, why: str) -> None:
    lines = [f"# task {result.task_id}: {result.status}", "",
             f"- host: {result.host} ({why})", f"- exit status: {result.returncode}",
             f"- folder: `{result.path}`", f"- limits: {result.limits}",
             f"- ran earlier: {'yes, nothing ran now' if result.existing else 'no'}"]
    if result.stopped_by:
        lines.append(f"- stopped by: {result.stopped_by} (placed again on fresh facts)")
    create_markdown_artifact("\n".join(lines), key=f"{artifact_key(result.task_id)}-result",
                             description=f"task {result.task_id}: its result")


def _place_or_wait(ctx: FleetContext, env: str, spec: TaskSpec, label: str, where: str, task_id: str, attempt: int,
                   facts_file: str | None, kept_off: dict[str, str], options: dict[str, Any], wait_seconds: float,
                   poll_seconds: float, prefetched: PrefectFuture[FactsRead] | None = None,
                   site: str | None = None) -> Decision:
    """The decision of this attempt, published. No host can take the task now: while one may later (`may_take_later`)
    the task waits for one, placed again on fresh facts every `poll_seconds` for up to `wait_seconds` (each wait
    logged with every host's reason), and `NoEligibleHostInTime` after; when none ever can, or `wait_seconds` is 0,
    `NoEligibleHost` at once."""
    logger = get_run_logger()
    shown: list[dict[str, str]] | None = None
    published: list[dict[str, str]] | None = None  # the reasons the run's waiting label says
    since: str | None = None
    deadline: float | None = None
    again: FactsRead | None = None  # the same facts, with the tasks placed meanwhile
    while True:
        if again is not None:
            facts, placed, now, source = again
            again = None
        elif prefetched is not None:  # read while the earlier runs were looked for
            facts, placed, now, source = prefetched.result()
            prefetched = None
        else:
            facts, placed, now, source = facts_step.with_options(**options)(ctx, env, spec, facts_file, site)
        kept_off_by = {**site_scope(ctx.fleet, site)[1], **kept_off}
        decision = place(ctx.fleet, spec, facts, placed, now, label, kept_off_by)
        shown = _decision_artifact(ctx, decision, task_id, attempt, source, now, shown)
        if decision.host is not None:
            if facts_file is not None:  # a facts file's placement stands on the file alone (`spark task plan`)
                _label(logger, task_id, placement_labels(decision.host, spec.cpus, spec.memory_mb, time.time()))
                return decision
            meanwhile = _claim(ctx, env, spec, label, task_id, facts, now, decision, kept_off_by)
            if meanwhile is None:
                return decision
            logger.info("task %s: %s was taken meanwhile by tasks placed at the same moment; placing it again with "
                        "them", task_id, decision.host)
            again = facts, meanwhile, now, f"{source}; placed again with the tasks placed meanwhile"
            continue
        if wait_seconds <= 0 or not may_take_later(ctx.fleet, spec, kept_off_by):
            raise NoEligibleHost(where, decision)
        deadline = deadline if deadline is not None else time.monotonic() + wait_seconds
        left = deadline - time.monotonic()
        if left <= 0:
            raise NoEligibleHostInTime(where, decision, wait_seconds, task_id, again=bool(kept_off))
        logger.warning("task %s: no host can run it now; waiting for one (placed again every %.0f s, for %.0f s "
                       "more): %s", task_id, poll_seconds, left, "; ".join(decision.reasons()))
        if shown != published:  # the reasons changed: `spark task ls` says them
            since = since or _hhmmss(ctx, time.time())
            _label(logger, task_id, waiting_label(since, [(c.host, c.reason) for c in decision.candidates]))
            published = shown
        time.sleep(min(poll_seconds, left))


def _settle(ctx: FleetContext, task_id: str, known: list[execute.Found]) -> tuple[execute.TaskResult, str] | None:
    """What earlier runs of the id left decides this one: a committed result is reported; else a run that finished
    and was never committed (its host, or its controller, was lost before the commit) is committed now. Other
    finished runs are discarded: one result per id. None: the task is to run."""
    logger = get_run_logger()
    committed = [f for f in known if f.found == "committed" and f.result is not None]
    finished = sorted((f for f in known if f.found == "finished" and f.result is not None),
                      key=lambda f: (f.result.finished if f.result else 0, f.host))
    if committed:
        result, why = committed[0].result, "committed earlier"
    elif finished:
        keep = finished.pop(0)
        result = execute.commit_task(ctx.hosts, ctx.fleet, keep.host, task_id)
        why = "finished earlier, never committed (its host or its controller was lost): committed now"
    else:
        return None
    assert result is not None
    for extra in finished:  # a lost host's run that finished after the task ran elsewhere
        try:
            gone = execute.discard_task(ctx.hosts, ctx.fleet, extra.host, task_id)
        except StepFailed as exc:
            logger.warning("task %s: could not discard the uncommitted run on %s: %s", task_id, extra.host,
                           exc.message.splitlines()[0])
            continue
        logger.info("task %s: a run on %s finished and was never committed (%s); discarded: the result is on %s",
                    task_id, extra.host, gone, result.host)
    return result, why


def _hhmmss(ctx: FleetContext, when: float) -> str:
    """HH:MM:SS in the fleet's time zone, as quiet hours are read."""
    return datetime.fromtimestamp(when, ZoneInfo(ctx.fleet.timezone)).strftime("%H:%M:%S")


def site_scope(fleet: Fleet, site: str | None) -> tuple[set[str] | None, dict[str, str]]:
    """A site's run (`site`, its deployment's): the hosts it may place on, those its worker reaches over SSH, and
    why every other host is kept off. None and no reasons: every host (a run from the controller)."""
    from primespark.orchestration.placement import site_hosts

    if site is None:
        return None, {}
    if site not in fleet.sites:
        raise UserError(f"fleet {fleet.name} has no site {site!r}", f"use one of: {', '.join(fleet.sites)}")
    reach = set(site_hosts(fleet, site))
    return reach, {h: f"not reached by site {site}'s worker (this run places on its hosts)" for h in fleet.hosts
                   if h not in reach}


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
    runner serving a deployment): a run of an `agent-task-<site>` deployment, on its site's worker. A UI cancel of
    a run started by `spark task run` in its own process does not reach it (`spark task cancel` does)."""
    from primespark.fleet.loader import resolve

    parameters = dict(flow_run.parameters or {})
    task_id = parameters.get("task_id") or default_task_id(parameters.get("template"), parameters.get("name"),
                                                           flow_run.id)
    env = str(parameters.get("env", "lab"))
    ctx = FleetContext.load(env, parameters.get("transport", "ssh"))
    try:
        site = parameters.get("site")  # a site's run: the hosts its worker reaches
        found, unasked = execute.cancel_task(ctx.hosts, ctx.fleet, task_id, str(resolve(env)),
                                             within=site_scope(ctx.fleet, str(site) if site else None)[0])
    except UserError as exc:  # not started on any host yet: nothing to stop
        print(f"task {task_id}: nothing to stop: {exc.message}")
        return
    for one in found:
        print(f"task {task_id} on {one.host}: {one.found} (pid {one.pid}); {len(unasked)} host(s) not asked")


@flow(name="agent-task", flow_run_name="agent-task-{task_id}", log_prints=True, on_cancellation=[stop_on_host])
@audited(auditing.site)  # a site's run: its hosts; a run from the controller: the host it ran on is in its result
def agent_task(
    template: str | None = None,
    spec: TaskSpec | None = None,
    name: str | None = None,
    task_id: str | None = None,
    env: str = "lab",
    transport: Transport = "ssh",
    facts_file: str | None = None,
    retry_delay_seconds: float = 10.0,
    poll_seconds: float = 30.0,
    wait_seconds: float | None = None,
    site: str | None = None,
) -> dict[str, Any]:
    """Run one agent task: a `template` of the fleet (its `tasks:`) or an inline `spec` (named `name`), as
    `task_id` (default: from the name and the flow run's id; give an earlier id to rerun: a committed result is
    reported, not run again). `facts_file` takes the hosts' facts from a YAML file instead of their node
    exporters (docs/agents.md). A task no host can take now (or after its host was lost) waits for one at most
    `wait_seconds` (default: its timeout; 0: fail at once), placed again every `poll_seconds`; one no host can ever
    take fails at once. `site`: placed among that site's hosts only (its `agent-task-<site>` deployment's worker
    reaches those)."""
    logger = get_run_logger()
    ctx = FleetContext.load(env, transport)
    label, where, chosen = resolve_task(ctx, env, template, spec, name)
    site_scope(ctx.fleet, site)  # an unknown site stops the run here
    from prefect.runtime import flow_run

    task_id = execute.check_task_id(task_id) if task_id else default_task_id(template, name, flow_run.id)
    _label(logger, task_id, {TASK_ID_LABEL: task_id})  # `spark task ls` reads the id and the host from the labels
    # a host left unreachable is retried by Prefect; a failed command is an attempt of the spec's own
    options = retrying(2, retry_delay_seconds)
    with hold(agent_task_lock(task_id)):
        # the earlier runs of the id and the hosts' facts at once: two reads of the fleet, neither needs the other
        looked_for = find_step.with_options(**options).submit(ctx, task_id, site)
        facts_read = facts_step.with_options(**options).submit(ctx, env, chosen, facts_file, site)
        known = looked_for.result()
        settled = _settle(ctx, task_id, known)
        prefetched: PrefectFuture[FactsRead] | None = facts_read
        if settled is not None or any(f.found == "running" for f in known):
            facts_read.wait()  # not used: nothing runs, or a killed attempt's load was in those facts
            prefetched = None
        if settled is not None:
            result, why = settled
            _label(logger, task_id, {HOST_LABEL: result.host})
            logger.info("task %s: %s on %s (%s): nothing runs", task_id, why, result.host, result.path)
            _result_artifact(result, why)
            return {**asdict(result), "why": why, "attempts": 0, "kept_off": {}}
        for left in (f for f in known if f.found == "running"):
            # a killed attempt's command, still running there: it ends before the task runs anywhere again
            logger.warning("task %s: a killed attempt still runs on %s (pid %s); stopping it", task_id, left.host,
                           left.pid)
            # every host find_task reached
            execute.cancel_task(ctx.hosts, ctx.fleet, task_id, where, within=site_scope(ctx.fleet, site)[0])
        failed: execute.TaskRunFailed | None = None
        kept_off: dict[str, str] = {}  # hosts lost in this run, and why: never placed on again by it
        failures = attempt = requeued = 0
        wait = wait_seconds if wait_seconds is not None else chosen.timeout_minutes * 60
        while failures <= chosen.retries:
            attempt += 1
            decision = _place_or_wait(ctx, env, chosen, label, where, task_id, attempt, facts_file, kept_off, options,
                                      wait, poll_seconds, prefetched, site)
            prefetched = None
            assert decision.host is not None
            why = next(c.reason for c in decision.candidates if c.verdict == "chosen")
            logger.info("task %s, attempt %d: on %s: %s", task_id, attempt, decision.host, why)
            try:
                result = run_step.with_options(**options)(ctx, decision.host, task_id, chosen)
            except (HostLost, HostUnreachable) as exc:
                # not the task failing: its host went away. What ran there commits nothing (no answer, no commit)
                at = _hhmmss(ctx, exc.detected if isinstance(exc, HostLost) else time.time())
                kept_off[decision.host] = (f"lost mid-task at {at}" if isinstance(exc, HostLost)
                                           else f"unreachable when the task was to start at {at}")
                logger.warning("task %s, attempt %d: %s %s (%s); placing it on another host on fresh facts (not one "
                               "of its retries)", task_id, attempt, decision.host, kept_off[decision.host],
                               exc.message.splitlines()[0])
                continue
            _result_artifact(result, why)
            if result.status == "succeeded":
                return {**asdict(result), "why": why, "attempts": attempt, "kept_off": kept_off}
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
