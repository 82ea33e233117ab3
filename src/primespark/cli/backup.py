"""`spark backup now [HOST]`: run the backup flow for one host (or every host with a plan) now, here."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from primespark.cli.common import EnvOption, console
from primespark.context import FleetContext, Transport
from primespark.errors import UserError

app = typer.Typer(help="Backups with restic: run one now (schedules run as Prefect deployments).",
                  no_args_is_help=True)

TransportOption = Annotated[str, typer.Option(help="ssh: restic runs on the hosts; local: on this machine.")]


def transport_of(transport: str) -> Transport:
    if transport == "ssh":
        return "ssh"
    if transport == "local":
        return "local"
    raise UserError(f"unknown transport {transport!r}", "use --transport ssh (hosts) or local (this machine)")


def planned_hosts(ctx: FleetContext, host: str | None) -> list[str]:
    """HOST, or every host with a backup plan; a clear error for a host without one or a fleet without backups."""
    plans = list(ctx.fleet.backup.plans) if ctx.fleet.backup else []
    if host is not None and host not in plans:
        raise UserError(f"{host!r} has no backup plan in {ctx.env}", f"back up one of: {', '.join(plans) or 'none'}")
    return [host] if host else plans


OnWorkerOption = Annotated[bool, typer.Option(
    "--on-worker", help="Submit to the work pool of the host's site and wait for its worker's run, instead of "
    "running here.")]


@app.command("now")
def now(
    host: Annotated[str | None, typer.Argument(help="A host with a backup plan; every such host if omitted.")] = None,
    env: EnvOption = "lab",
    transport: TransportOption = "ssh",
    on_worker: OnWorkerOption = False,
) -> None:
    """Back up HOST (or every host with a plan) now: the plan's paths into its repository, then the offsite copy."""
    ctx = FleetContext.load(env, transport_of(transport))
    hosts = planned_hosts(ctx, host)
    if on_worker:
        from primespark.cli.flows import on_workers

        on_workers(ctx, "backup", hosts)
        return
    from flows.backup import backup  # Prefect loads only when a backup runs
    from primespark.orchestration.runs import record_runs, run_here

    console.print(f"running here (this machine), recorded on {record_runs(ctx)}")
    for name in hosts:
        result = run_here(backup, name, env, transport)
        table = Table(title=f"backup of {name}", show_header=False)
        for key, value in result.items():
            if key != "write_window":
                table.add_row(key, str(value))
        console.print(table)
