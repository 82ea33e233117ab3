"""`spark task plan|run|cancel|ls`: where an agent task would run now and why (per host of the fleet), running it
there (the `agent-task` flow, in this process), stopping it on its host, and the runs the Prefect API knows.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated
from zoneinfo import ZoneInfo

import typer
from pydantic import ValidationError
from rich.table import Table

from primespark.agents.placement import Decision, Facts, NoEligibleHost, Placed, place
from primespark.cli.common import EnvOption, console, fleet_for, transport_of
from primespark.errors import UserError
from primespark.fleet.errors import Problem
from primespark.fleet.model import Fleet, Name, Strict, TaskSpec

app = typer.Typer(help="Agent tasks: where one would run and why (placement by capacity, power and data), run "
                  "one there, cancel one, list the runs.",
                  no_args_is_help=True)

SpecArg = Annotated[Path | None, typer.Argument(
    help="A task spec file (YAML: command, cpus, memory_mb, arch, labels, data, power, …).", show_default=False)]
TemplateOption = Annotated[str | None, typer.Option(
    "--template", "-t", help="A task template of the fleet (its `tasks:` section), instead of SPEC.",
    show_default=False)]
FactsOption = Annotated[Path | None, typer.Option(
    "--facts", help="Host facts from this YAML file instead of the hosts' node exporters (docs/agents.md).",
    show_default=False)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the decision as one JSON line.")]
TransportOption = Annotated[str, typer.Option(
    help="ssh: the facts are read on the hosts; local: every host is this machine (tests).")]


class _OneTask(Strict):
    """A spec file checked as the fleet checks a template: its errors name the same fields and fixes."""

    tasks: dict[Name, TaskSpec]


def load_spec(path: Path, fleet: Fleet) -> TaskSpec:
    """A task spec file, validated as a template of `fleet` would be; every problem located in the file."""
    from primespark.fleet.checks import task_problems
    from primespark.fleet.loader import line_of, parse_yaml, problems_of_validation

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{path}: cannot read the task spec: {exc.strerror}", "name a YAML task spec file") from None
    data, lines = parse_yaml(text, str(path))
    # the spec's fields sit at tasks.<name> of a fleet: the loader's fixes (e.g. "did you mean") then apply as is
    prefix = ("tasks", "spec")
    nested = {(*prefix, *where): line for where, line in lines.items()}
    try:
        spec = _OneTask.model_validate({"tasks": {"spec": data}}).tasks["spec"]
    except ValidationError as exc:
        problems = problems_of_validation(exc, str(path), nested)
    else:
        problems = [p.located(str(path), line_of(nested, p.path))
                    for p in task_problems(fleet.model_copy(update={"tasks": {"spec": spec}}))]
    if problems:
        # one block per problem, as `spark validate` prints them, located in the spec file
        raise UserError("\n".join(str(Problem(p.path[len(prefix):], p.message, p.fix, p.code, p.file, p.line))
                                  for p in problems))
    return spec


def _chosen_task(fleet: Fleet, env: str, spec: Path | None, template: str | None) -> tuple[str, str, TaskSpec]:
    """(name, where it is written, the task)."""
    from primespark.fleet.loader import resolve

    if (spec is None) == (template is None):
        raise UserError("name one task: a SPEC file or --template NAME",
                        f"templates of {fleet.name}: {', '.join(fleet.tasks) or 'none (add a tasks: section)'}")
    if template is not None:
        if template not in fleet.tasks:
            raise UserError(f"fleet {fleet.name} has no task template named {template!r}",
                            f"use one of: {', '.join(fleet.tasks) or 'none (add a tasks: section to the fleet file)'}")
        return template, f"{resolve(env)}: tasks.{template}", fleet.tasks[template]
    assert spec is not None
    return spec.stem, str(spec), load_spec(spec, fleet)


def _live_facts(env: str, transport: str, task: TaskSpec) -> tuple[Facts, str]:
    from primespark.agents.facts import live_facts
    from primespark.context import FleetContext

    return live_facts(FleetContext.load(env, transport_of(transport)), task)


def render(decision: Decision, fleet: Fleet, title: str) -> Table:
    table = Table(title=title)
    for column in ("host", "site", "verdict", "why"):
        table.add_column(column, overflow="fold")
    styles = {"chosen": "bold green", "eligible": "", "excluded": "dim"}
    for candidate in decision.candidates:
        table.add_row(candidate.host, fleet.hosts[candidate.host].site, candidate.verdict, candidate.reason,
                      style=styles[candidate.verdict])
    return table


@app.command("plan")
def plan(
    spec: SpecArg = None,
    template: TemplateOption = None,
    env: EnvOption = "lab",
    facts_file: FactsOption = None,
    transport: TransportOption = "ssh",
    as_json: JsonOption = False,
) -> None:
    """Where the task would run now, and why, for every host of the fleet; nothing is run.

    Hard constraints exclude a host (architecture, labels, free CPU and memory minus what is placed, its site's
    worker, quiet hours, battery, drained); the rest are ranked by the task's data on the host, then on its site,
    then fewest tasks placed, the edge, free CPUs. A host whose facts cannot be read is excluded, and says why.
    Exits 1 when no host can run the task now."""
    fleet = fleet_for(env)
    name, where, task = _chosen_task(fleet, env, spec, template)
    placed: list[Placed] = []
    now = datetime.now(UTC)
    if facts_file is not None:
        from primespark.agents.facts import load_facts_file

        given = load_facts_file(facts_file)
        facts, placed = given.facts(fleet, str(facts_file))
        now = given.now if given.now is not None else now
        if now.tzinfo is None:
            raise UserError(f"{facts_file}: now: {now.isoformat()} has no time zone",
                            "write it with its offset, e.g. 2026-11-30T22:30:00Z")
        source = f"from {facts_file}"
    else:
        facts, source = _live_facts(env, transport, task)
        if fleet.orchestration is not None:  # live_facts pointed this process at the fleet's server
            from primespark.orchestration.agent_runs import placed_note, recently_placed

            try:
                placed = recently_placed(env, now.timestamp())
            except Exception as exc:  # the server's trouble is in the workers' verdicts already; say it once more
                source += f"; the tasks placed within the last minute unknown ({type(exc).__name__})"
            else:
                source += placed_note(placed)
    decision = place(fleet, task, facts, placed, now, name)
    if as_json:
        typer.echo(json.dumps({"task": name, "host": decision.host, "at": now.isoformat(), "facts": source,
                               "candidates": [c.__dict__ for c in decision.candidates]}))
    else:
        console.print(render(decision, fleet, f"task {name} in {fleet.name} at "
                             f"{now.astimezone(ZoneInfo(fleet.timezone)).strftime('%Y-%m-%d %H:%M %Z')} "
                             f"(facts {source})"))
    if decision.host is None:
        raise NoEligibleHost(where, decision)
    if not as_json:
        console.print(f"[bold green]{name} would run on {decision.host}[/bold green] (nothing was run)")



@app.command("run")
def run(
    spec: SpecArg = None,
    template: TemplateOption = None,
    env: EnvOption = "lab",
    task_id: Annotated[str | None, typer.Option(
        "--id", help="The task's id (its result folder). Default: a fresh one. An id whose result is committed "
        "runs nothing and prints that result.", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan only, as `spark task plan`: nothing runs.")] = False,
    facts_file: FactsOption = None,
    transport: TransportOption = "ssh",
    as_json: JsonOption = False,
    on_worker: Annotated[bool, typer.Option(
        "--on-worker", help="Submit it to a site's `agent-task-SITE` deployment and wait for the run of that site's "
        "worker (placed among the site's hosts), instead of running the flow here.")] = False,
    site: Annotated[str | None, typer.Option(
        "--site", help="With --on-worker: the site. Default: the site holding the task's data.",
        show_default=False)] = None,
    wait: Annotated[float | None, typer.Option(
        "--wait", min=0, metavar="SECONDS", help="When no host can take it now but one may later (quiet hours, "
        "drained, busy, …): wait for one this long, placing it again every 30 s. Default: the task's timeout; 0: "
        "fail at once. A task no host can ever take fails at once.", show_default=False)] = None,
) -> None:
    """Run the task on the host placement chooses (the `agent-task` flow, in this process), and print where it
    ran, why, and its result folder. No host can take it now: it waits for one (--wait). A failed attempt is placed
    again on fresh facts while the spec's `retries` last. The id is printed first: `spark task cancel ID` stops
    it."""
    if dry_run:
        plan(spec, template, env, facts_file, transport, as_json)
        return
    if on_worker:
        _run_on_worker(env, spec, template, task_id, site, as_json, wait)
        return
    if site is not None:
        raise UserError("--site places a task among a site's hosts on that site's worker", "add --on-worker")
    from flows.agent_task import agent_task
    from primespark.agents.execute import check_task_id, new_task_id
    from primespark.context import FleetContext
    from primespark.orchestration.runs import record_runs, run_here

    fleet = fleet_for(env)
    name, _, task = _chosen_task(fleet, env, spec, template)
    task_id = check_task_id(task_id) if task_id else new_task_id(name)
    if not as_json:
        console.print(f"task id: {task_id} (stop it: spark task cancel {task_id} --env {env})")
    record_runs(FleetContext.load(env, transport_of(transport)))
    result = run_here(agent_task, template=template, spec=None if template else task, name=name, task_id=task_id,
                      env=env, transport=transport_of(transport),
                      facts_file=None if facts_file is None else str(facts_file), wait_seconds=wait)
    if as_json:
        typer.echo(json.dumps(result))
        return
    if result["existing"]:
        console.print(f"[bold green]{task_id} on {result['host']}[/bold green]: {result['why']}; nothing ran")
    else:
        for host, why in result.get("kept_off", {}).items():
            console.print(f"[yellow]{host}: {why}[/yellow]; the task was placed again elsewhere")
        console.print(f"[bold green]{task_id} ran on {result['host']}[/bold green] (attempt {result['attempts']}): "
                      f"{result['why']}")
    console.print(f"result: {result['host']}:{result['path']}")
    console.print(f"limits: {result['limits']}")


@app.command("cancel")
def cancel(
    task_id: Annotated[str, typer.Argument(help="The task's id, as `spark task run` printed it.")],
    env: EnvOption = "lab",
    transport: TransportOption = "ssh",
) -> None:
    """Stop a running task on its host: SIGTERM to its processes (the whole process group, and any that left
    it), SIGKILL 10 s later. Every host that runs tasks is asked: its run record is in its task folder."""
    from primespark.agents.execute import cancel_task
    from primespark.context import FleetContext
    from primespark.fleet.loader import resolve

    ctx = FleetContext.load(env, transport_of(transport))
    found_on, unasked = cancel_task(ctx.hosts, ctx.fleet, task_id, str(resolve(env)))
    for host, why in unasked.items():
        console.print(f"[yellow]{host} could not be asked[/yellow]: {why}")
    for found in found_on:
        what = {"running": f"stopped (pid {found.pid})", "stopped": "was not running (its attempt had ended)",
                "committed": "had finished: its result is committed"}[found.found]
        console.print(f"{task_id} on {found.host}: {what}; its folder: {found.host}:{found.path}")


def _duration(value: timedelta | None) -> str:
    if value is None:
        return "-"
    seconds = value.total_seconds()
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


@app.command("ls")
def ls(
    env: EnvOption = "lab",
    state: Annotated[list[str] | None, typer.Option(
        "--state", help="Only runs in this state (repeatable): scheduled, pending, running, completed, failed, "
        "cancelled, crashed, paused, cancelling.", show_default=False)] = None,
    limit: Annotated[int, typer.Option(help="At most this many runs, the newest.", min=1)] = 50,
) -> None:
    """The agent-task runs of the environment, newest first: task id, template, state, the host it ran on,
    when it started and how long it took; a run waiting for a host, since when and why.

    Read from the Prefect API `spark task run` records them on: PREFECT_API_URL, else the lab's server, else the
    local Prefect database. A server that does not answer is one error naming the address tried."""
    from primespark.orchestration.agent_runs import STATES, agent_runs, task_runs_api

    states = [s.strip().lower() for s in state or []]
    unknown = [s for s in states if s not in STATES]
    if unknown:
        raise UserError(f"--state {unknown[0]!r} is not a state of a Prefect run", f"use one of: {', '.join(STATES)}")
    from primespark.context import FleetContext

    fleet = fleet_for(env)
    where = task_runs_api(FleetContext.load(env))
    runs = agent_runs(env, states, limit)
    which = f" ({', '.join(states)})" if states else ""
    if not runs:
        console.print(f"no agent-task runs{which} of {env} on {where.removesuffix('/api')}", highlight=False)
        return
    zone = ZoneInfo(fleet.timezone)
    table = Table(title=f"agent-task runs{which} of {env} on {where.removesuffix('/api')}, newest first")
    waiting = any(run.waiting for run in runs)
    for column in ("task id", "template", "state", "host", "started", "duration", *(["waiting"] if waiting else [])):
        table.add_column(column, overflow="fold")
    colours = {"Completed": "green", "Failed": "red", "Crashed": "red", "Running": "yellow"}
    for run in runs:
        colour = colours.get(run.state, "")
        table.add_row(run.task_id, run.template, f"[{colour}]{run.state}[/{colour}]" if colour else run.state,
                      run.host or "-",
                      run.started.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S %Z") if run.started else "-",
                      _duration(run.duration), *([run.waiting or ""] if waiting else []))
    console.print(table)


def _data_site(fleet: Fleet, task: TaskSpec) -> str | None:
    """The site holding the task's first data reference (where its own host, or its tier's first host, is)."""
    from primespark.agents.placement import data_places

    for ref in task.data:
        for host, _ in data_places(fleet, ref):
            if host in fleet.hosts:
                return fleet.hosts[host].site
    return None


def _run_on_worker(env: str, spec: Path | None, template: str | None, task_id: str | None, site: str | None,
                   as_json: bool, wait: float | None = None) -> None:
    """`spark task run --on-worker`: the `agent-task-SITE` deployment's run, as the UI's Run button makes it."""
    from primespark.agents.execute import check_task_id, new_task_id
    from primespark.cli.flows import on_workers
    from primespark.context import FleetContext
    from primespark.orchestration.agent_runs import agent_runs
    from primespark.orchestration.placement import pools

    ctx = FleetContext.load(env)
    name, _, task = _chosen_task(ctx.fleet, env, spec, template)
    with_workers = sorted(pools(ctx.fleet).values())
    site = site or _data_site(ctx.fleet, task)
    if site is None or site not in with_workers:
        why = ("name one with --site" if site is None else f"site {site} has none" if site in ctx.fleet.sites
               else f"fleet {ctx.fleet.name} has no site {site!r}")
        raise UserError(f"no site's worker to run it on: {why}",
                        f"sites with a worker: {', '.join(with_workers) or 'none (the fleet has no orchestration)'}")
    task_id = check_task_id(task_id) if task_id else new_task_id(name)
    parameters: dict[str, object] = {"task_id": task_id}
    if wait is not None:
        parameters["wait_seconds"] = wait
    if template is not None:
        parameters["template"] = template
    else:
        parameters.update(spec=task.model_dump(mode="json", exclude_unset=True), name=name)
    if not as_json:
        console.print(f"task id: {task_id} (stop it: spark task cancel {task_id} --env {env})")
    on_workers(ctx, "agent-task", [site], parameters)
    found = next((r for r in agent_runs(env, limit=200) if r.task_id == task_id), None)
    if as_json:
        typer.echo(json.dumps({"task_id": task_id, "site": site, "host": found.host if found else None,
                               "state": found.state if found else None}))
    elif found is not None:
        console.print(f"[bold green]{task_id} on {found.host}[/bold green]: {found.state} (`spark task ls`)")
