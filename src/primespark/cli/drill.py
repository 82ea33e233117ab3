"""`spark drill run [HOST]` and `spark drill report`: DR drills now, and the last drills as a table."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from primespark.backup.drill import drill_source, load_history
from primespark.cli.backup import OnWorkerOption, planned_hosts
from primespark.cli.common import EnvOption, TransportOption, console, transport_of
from primespark.context import FleetContext
from primespark.errors import UserError

app = typer.Typer(help="DR drills: restore on a scratch host, verify, measure RTO/RPO.", no_args_is_help=True)


@app.command("run")
def run(
    host: Annotated[str | None, typer.Argument(help="A host with a backup plan; all of them if omitted.")] = None,
    env: EnvOption = "lab",
    transport: TransportOption = "ssh",
    repository: Annotated[str | None, typer.Option(
        help="Restore from this repository: the plan's own (the default) or one of its offsite copies.")] = None,
    on_worker: OnWorkerOption = False,
) -> None:
    """Drill HOST (or every host with a plan), one after the other; fail if any drill misses."""
    ctx = FleetContext.load(env, transport_of(transport))
    hosts = planned_hosts(ctx, host)
    for name in hosts:  # clear errors for a host without a plan or a wrong repository, before anything runs
        drill_source(ctx, name, repository)
    if on_worker:
        from primespark.cli.flows import on_workers

        # the reports are the runs' artifacts (drill-report-<host>) on the server: the history is the worker's
        on_workers(ctx, "dr-drill", hosts, {"repository": repository} if repository else {})
        return
    from flows.dr_drill import dr_drill  # Prefect loads only when a drill runs
    from primespark.orchestration.runs import in_process_runs, record_runs

    console.print(f"running here (this machine), recorded on {record_runs(ctx)}")
    failed = []
    for name in hosts:
        with in_process_runs():
            state = dr_drill(name, env, transport, repository=repository, return_state=True)
        if state.is_completed():
            console.print(f"[green]drill {name}: passed[/green]")
        else:
            failed.append(name)
            console.print(f"[red]drill {name}: {state.result(raise_on_failure=False)}[/red]")
    report(env=env, last=len(hosts))
    if failed:
        raise UserError(f"drills failed: {', '.join(failed)}", "read the report artifact `drill-report-<host>` "
                        f"in the Prefect UI, or `spark drill report --env {env}`")


@app.command("report")
def report(env: EnvOption = "lab",
           last: Annotated[int, typer.Option(min=1, help="How many drills (the newest), at least 1.")] = 20) -> None:
    """The last drills, newest last (read from the state directory: no secret store, no Prefect)."""
    ctx = FleetContext.load(env)  # its secret store is made on first use only: never here
    rows = load_history(ctx.settings.state_path(ctx.env))[-last:]
    if not rows:
        console.print(f"no drill has run in {env} yet: `spark drill run --env {env}`")
        return
    table = Table(title=f"DR drills in {env}")
    columns = ["started", "host", "scratch", "repository", "snapshot", "result", "rpo_h", "rto_min", "files", "reason"]
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        style = "green" if row.get("result") == "pass" else "red"
        table.add_row(*[str(row.get(c, "")) for c in columns], style=style)
    console.print(table)
