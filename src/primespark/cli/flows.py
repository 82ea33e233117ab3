"""`spark flows deploy | status | serve | wheelhouse`: the fleet's deployments on its Prefect server's work pools."""

from __future__ import annotations

from typing import Annotated

import typer

from primespark.cli.common import EnvOption, console
from primespark.context import FleetContext

app = typer.Typer(help="Flows on the fleet's Prefect server: work pools per site, deployments, workers.",
                  no_args_is_help=True)


@app.command()
def wheelhouse(
    arch: Annotated[str, typer.Option(help="The host's CPU architecture (uname -m).")],
    python: Annotated[str, typer.Option(help="The host's Python, MAJOR.MINOR.MICRO.")],
    glibc: Annotated[str, typer.Option(help="The host's glibc (getconf GNU_LIBC_VERSION).")],
) -> None:
    """Build (or reuse) the wheelhouse a host installs the project from; print where it is (JSON, for the roles)."""
    from primespark.orchestration.wheelhouse import Target, build, describe
    from primespark.settings import get_settings

    house = build(Target(arch, python, glibc), get_settings().root)
    typer.echo(describe(house))



@app.command()
def deploy(
    env: EnvOption = "lab",
    watch: Annotated[bool, typer.Option(help="start a watch run of each continuous sync job that has none "
                                             "(--no-watch: deploy only; start them later from the UI)")] = True,
) -> None:
    """Make the fleet's Prefect server match the fleet: work pools and queues per site, every deployment on its
    site's pool with the fleet's schedules, the automations for runs whose worker died, a running watch per
    continuous sync job (idempotent).

    First, the workers get what they open: every backup plan's repository and its offsite copies are opened from
    here (made on their first use, and recorded), and each worker gets this machine's records of its site's. A
    worker never makes a repository: one it has no record of is refused there."""
    from primespark.errors import StepFailed
    from primespark.orchestration.api import use_fleet_prefect
    from primespark.orchestration.deploy import DeployReport, prepare_workers
    from primespark.orchestration.deploy import deploy as apply
    from primespark.orchestration.material import orchestration_of

    ctx = FleetContext.load(env)
    orchestration_of(ctx.fleet)
    url = use_fleet_prefect(ctx)
    report = DeployReport()
    problems = prepare_workers(ctx, report)
    apply(ctx, report, start_watches=watch)
    for verdict, colour in (("created", "green"), ("updated", "yellow"), ("removed", "red"), ("skipped", "yellow"),
                            ("started", "green")):
        for what in getattr(report, verdict):
            console.print(f"  [{colour}]{verdict}[/{colour}] {what}")
    summary = (f"{len(report.created)} created, {len(report.updated)} updated, {len(report.removed)} removed, "
               f"{len(report.started)} watch runs started, {len(report.unchanged)} unchanged" if report.changed else
               f"nothing changed ({len(report.unchanged)} objects as the fleet says)")
    console.print(f"[bold]{ctx.env}[/bold] on {url.removesuffix('/api')}: {summary}")
    if problems:  # the deployments are there; the workers refuse these repositories until they are fixed
        raise StepFailed(f"{len(problems)} repositories could not be opened, their deployments fail on the "
                         "workers:\n" + "\n".join(f"  - {p}" for p in problems),
                         f"fix each as it says, then `spark flows deploy --env {ctx.env}` again")


@app.command()
def status(env: EnvOption = "lab") -> None:
    """The fleet's work pools (READY when a worker is online), their workers, and the deployments on them."""
    from prefect.client.orchestration import get_client
    from rich.table import Table

    from primespark.orchestration.api import use_fleet_prefect
    from primespark.orchestration.material import orchestration_of
    from primespark.orchestration.placement import planned_deployments, pools

    ctx = FleetContext.load(env)
    orchestration_of(ctx.fleet)
    url = use_fleet_prefect(ctx)
    table = Table(title=f"work pools of {ctx.env} on {url.removesuffix('/api')}")
    for column in ("pool", "status", "workers", "deployments"):
        table.add_column(column)
    placed = planned_deployments(ctx.fleet, ctx.env)
    with get_client(sync_client=True) as client:
        for pool in pools(ctx.fleet):
            from prefect.exceptions import ObjectNotFound

            try:
                found = client.read_work_pool(pool)
            except ObjectNotFound:
                table.add_row(pool, "[red]missing[/red]", "-", f"`spark flows deploy --env {ctx.env}`")
                continue
            workers = client.read_workers_for_work_pool(pool)
            state = found.status.value if found.status else "unknown"
            colour = "green" if state == "READY" else "red"
            table.add_row(pool, f"[{colour}]{state}[/{colour}]",
                          ", ".join(f"{w.name} ({w.status.value})" for w in workers) or "none",
                          ", ".join(d.name for d in placed if d.pool(ctx.fleet) == pool))
    console.print(table)


@app.command()
def probe(site: Annotated[str, typer.Argument(help="A site with a worker, e.g. edge.")],
          env: EnvOption = "lab") -> None:
    """Run `probe-SITE` on the site's worker: where its flows run and which of its hosts they reach over SSH."""
    on_workers(FleetContext.load(env), "probe", [site])


@app.command()
def serve(env: EnvOption = "lab") -> None:
    """Serve the fleet's deployments from this machine (a fleet without workers: a laptop-only setup)."""
    from prefect import serve as prefect_serve

    from flows.deployments import build_deployments
    from primespark.cli.common import fleet_for
    from primespark.errors import UserError

    fleet = fleet_for(env)
    if fleet.orchestration is not None:
        raise UserError(f"the fleet {fleet.name!r} runs its flows on its workers (orchestration section)",
                        f"create them there: `spark flows deploy --env {env}`; `serve` is for a fleet without one")
    prefect_serve(*build_deployments(fleet, env, on_pools=False), limit=4)


def on_workers(ctx: FleetContext, flow: str, subjects: list[str], parameters: dict[str, object] | None = None) -> None:
    """Submit `<flow>-<subject>` for each subject to its work pool and follow each run to its end, saying where it
    ran; a UserError naming those that did not complete."""
    from primespark.errors import UserError
    from primespark.orchestration.api import use_fleet_prefect
    from primespark.orchestration.material import orchestration_of
    from primespark.orchestration.naming import deployment
    from primespark.orchestration.submit import run_on_worker

    orchestration_of(ctx.fleet)
    url = use_fleet_prefect(ctx)
    console.print(f"on the workers: submitting to the work pools of {url.removesuffix('/api')}")
    failed = []
    for subject in subjects:
        run = run_on_worker(flow, deployment(flow, subject), parameters, said=lambda m: console.print(f"  {m}"))
        colour = "green" if run.completed else "red"
        console.print(f"[{colour}]{run.flow_run_name}: {run.state}[/{colour}] on {run.worker_host or 'no worker'} "
                      f"(pool {run.pool}){': ' + run.message if run.message and not run.completed else ''}")
        if not run.completed:
            failed.append(run.flow_run_name)
    if failed:
        raise UserError(f"runs that did not complete: {', '.join(failed)}",
                        "see them in the Prefect UI (their logs say why)")
