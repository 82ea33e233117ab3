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


@app.command("now")
def now(
    host: Annotated[str | None, typer.Argument(help="A host with a backup plan; every such host if omitted.")] = None,
    env: EnvOption = "lab",
    transport: TransportOption = "ssh",
) -> None:
    """Back up HOST (or every host with a plan) now: the plan's paths into its repository, then the offsite copy."""
    ctx = FleetContext.load(env, transport_of(transport))
    hosts = planned_hosts(ctx, host)
    from flows.backup import backup  # Prefect loads only when a backup runs
    from primespark.orchestration.runs import run_here, use_lab_prefect

    use_lab_prefect(ctx.fleet)
    for name in hosts:
        result = run_here(backup, name, env, transport)
        table = Table(title=f"backup of {name}", show_header=False)
        for key, value in result.items():
            if key != "write_window":
                table.add_row(key, str(value))
        console.print(table)


@app.command("maintain")
def maintain(
    repository: Annotated[str | None, typer.Argument(
        help="A repository that is not an offsite copy; every such repository if omitted.")] = None,
    env: EnvOption = "lab",
    transport: TransportOption = "ssh",
    check: Annotated[bool, typer.Option(help="Run `restic check` too (its metrics feed the check alerts).")] = True,
) -> None:
    """Maintain REPOSITORY now, as its schedule would: catch up the offsite copy, forget and prune by the
    retention, check every client repository (primary and offsite); fail naming what check found."""
    ctx = FleetContext.load(env, transport_of(transport))
    if ctx.fleet.backup is None:
        raise UserError(f"fleet {ctx.env} has no backup section", "add `backup:` to the fleet file")
    primaries = [n for n, r in ctx.fleet.backup.repositories.items() if r.copy_from is None]
    if repository is not None and repository not in primaries:
        raise UserError(f"{repository!r} is not a primary repository of {ctx.env}",
                        f"maintain one of: {', '.join(primaries)} (offsite copies are maintained with their source)")
    from flows.maintenance import maintenance  # Prefect loads only when maintenance runs
    from primespark.orchestration.runs import run_here, use_lab_prefect

    use_lab_prefect(ctx.fleet)
    for name in [repository] if repository else primaries:
        result = run_here(maintenance, name, env, transport, check=check)
        console.print(f"[green]maintenance of {name}: done[/green] (checked: {result['checked']})")
