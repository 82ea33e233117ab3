"""`spark backup now [HOST]`: run the backup flow for one host (or every host with a plan) now, here."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from primespark.backup.repositories import backup_of, clients_of, location, repository_folder
from primespark.cli.common import EnvOption, TransportOption, console, transport_of
from primespark.context import FleetContext
from primespark.errors import UserError

app = typer.Typer(help="Backups with restic: run one now (schedules run as Prefect deployments).",
                  no_args_is_help=True)

def planned_hosts(ctx: FleetContext, host: str | None) -> list[str]:
    """HOST, or every host with a backup plan; a clear error for a host without one or a fleet without backups."""
    plans = list(backup_of(ctx.fleet).plans)
    if host is not None and host not in plans:
        raise UserError(f"{host!r} has no backup plan in {ctx.env}", f"back up one of: {', '.join(plans) or 'none'}")
    if not plans:
        raise UserError(f"the fleet {ctx.fleet.name!r} has a backup section but no plan",
                        "add `backup.plans.<host>` with the host's paths and repository")
    return [host] if host else plans


OnWorkerOption = Annotated[bool, typer.Option(
    "--on-worker", help="Submit to the work pool of the host's site and wait for its worker's run, instead of "
    "running here.")]


@app.command("now")
def now(
    host: Annotated[str | None, typer.Argument(help="A host with a backup plan; every such host if omitted.")] = None,
    env: EnvOption = "lab",
    transport: TransportOption = "ssh",
    accept_shrink: Annotated[bool, typer.Option(
        "--accept-shrink", help="This run may back up fewer files than the last: a plan path that is not there, "
        "no files at all, or a fall beyond backup.max_shrink is expected (each fails the backup otherwise).")] = False,
    on_worker: OnWorkerOption = False,
) -> None:
    """Back up HOST (or every host with a plan) now: the plan's paths into its repository, then the offsite copy."""
    ctx = FleetContext.load(env, transport_of(transport))
    hosts = planned_hosts(ctx, host)
    if on_worker:
        from primespark.cli.flows import on_workers

        on_workers(ctx, "backup", hosts, {"accept_shrink": True} if accept_shrink else {})
        return
    from flows.backup import backup  # Prefect loads only when a backup runs
    from primespark.orchestration.runs import record_runs, run_here

    console.print(f"running here (this machine), recorded on {record_runs(ctx)}")
    for name in hosts:
        result = run_here(backup, name, env, transport, accept_shrink=accept_shrink)
        table = Table(title=f"backup of {name}", show_header=False)
        for key, value in result.items():
            if key != "write_window":
                table.add_row(key, str(value))
        console.print(table)


@app.command("init")
def init(
    repository: Annotated[str, typer.Argument(help="A repository of the fleet's backup section.")],
    env: EnvOption = "lab",
    client: Annotated[list[str] | None, typer.Option(
        help="Only this client's repository (repeatable); every client of REPOSITORY if omitted.")] = None,
    transport: TransportOption = "ssh",
) -> None:
    """Start REPOSITORY over on purpose: a new, empty restic repository for each client where there is none.

    Backups make a repository on its first use only: once this environment has made one, a backup that finds it
    missing (a NAS volume not mounted, a moved folder) fails instead of starting a new, empty one. When the old
    repository is really gone, this command makes the new one. Where a repository is there, it is kept and
    recorded as the one to use. Nothing is ever deleted."""
    ctx = FleetContext.load(env, transport_of(transport))
    repositories = backup_of(ctx.fleet).repositories
    if repository not in repositories:
        raise UserError(f"no repository {repository!r} in the fleet {ctx.fleet.name!r}",
                        f"use one of: {', '.join(repositories)}")
    clients = clients_of(ctx, repository)
    unknown = [c for c in client or [] if c not in clients]
    if unknown:
        raise UserError(f"{', '.join(unknown)} back(s) up into another repository than {repository}",
                        f"clients of {repository}: {', '.join(clients) or 'none'}")
    from primespark.backup.jobs import start_over

    for name, opened in start_over(ctx, repository, list(client or clients)).items():
        url = location(ctx, repository, name, name).url
        what = "made a new, empty repository" if opened.created else "kept the repository that is there"
        console.print(f"{repository}/{name}: {what} at {url} ({repository_folder(ctx, repository, name)}), "
                      f"id {opened.id[:8]}: recorded")
    if ctx.fleet.orchestration is not None and ctx.fleet.orchestration.workers:
        # a worker opens only what its records name, and refuses the old record's repository as replaced
        console.print(f"the workers get the new records with `spark flows deploy --env {ctx.env}`")


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
    primaries = [n for n, r in backup_of(ctx.fleet).repositories.items() if r.copy_from is None]
    if repository is not None and repository not in primaries:
        raise UserError(f"{repository!r} is not a primary repository of {ctx.env}",
                        f"maintain one of: {', '.join(primaries)} (offsite copies are maintained with their source)")
    from flows.maintenance import maintenance  # Prefect loads only when maintenance runs
    from primespark.orchestration.runs import record_runs, run_here

    console.print(f"running here (this machine), recorded on {record_runs(ctx)}")
    for name in [repository] if repository else primaries:
        result = run_here(maintenance, name, env, transport, check=check)
        console.print(f"[green]maintenance of {name}: done[/green] (checked: {result['checked']})")
