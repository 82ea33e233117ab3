"""`spark status`: the fleet at a glance from Prometheus; `spark monitoring render|alerts`: the monitoring files
and the alerts they hold."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from primespark.cli.common import Command, EnvOption, OldEnvArg, console, env_of, fleet_for
from primespark.context import FleetContext
from primespark.errors import UserError

app = typer.Typer(help="Monitoring: the Prometheus, Alertmanager and Grafana files generated from the fleet.",
                  no_args_is_help=True)


@app.command()
def render(
    env: EnvOption = "lab",
    out: Annotated[Path, typer.Option("--out", help="An empty or new folder for the files.")] = Path("monitoring"),
) -> None:
    """Write prometheus.yml, the rules, alertmanager.yml and Grafana's provisioning and dashboards into OUT."""
    from primespark.monitoring.files import monitoring_files, overlays_of, write_files

    ctx = FleetContext.load(env)
    files = monitoring_files(ctx.fleet, overlays_of(ctx.fleet, ctx.state_dir))
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder", "name a folder for --out")
    for path in write_files(files, out):
        console.print(str(path), markup=False)


@app.command()
def alerts(env: EnvOption = "lab") -> None:
    """The alerts the fleet gets: severity, how long each must hold, its runbook."""
    from primespark.monitoring.alerts import fleet_alerts, runbook_url

    fleet = fleet_for(env)
    table = Table(title=f"fleet {fleet.name}: alerts")
    for column in ("alert", "severity", "for", "summary", "runbook"):
        table.add_column(column)
    for alert in fleet_alerts(fleet):
        table.add_row(alert.name, alert.severity.value, alert.held(fleet), alert.summary,
                      runbook_url(fleet, alert.name))
    console.print(table)


@app.command()
def urls(env: EnvOption = "lab") -> None:
    """Where the fleet's monitoring answers (the services that run in this environment), one per line."""
    from primespark.monitoring.scrape import running_services
    from primespark.monitoring.status import service_url

    fleet = fleet_for(env)
    titles = {"prometheus": "Prometheus", "alertmanager": "Alertmanager", "grafana": "Grafana", "prefect": "Prefect"}
    for name, kind in running_services(fleet).items():
        if kind.value in titles:
            svc = fleet.services[name]
            typer.echo(f"{titles[kind.value]:<20}{service_url(fleet, svc.host, svc.port)}")


def status(
    old_env: OldEnvArg = None,
    env: EnvOption = "lab",
    prometheus: Annotated[str | None, typer.Option(
        "--prometheus", help="Prometheus' URL (default: the fleet's prometheus service).")] = None,
) -> None:
    """The fleet at a glance from Prometheus: hosts, backups and drills against the RPO, mesh, tiers, alerts.
    Exit 2 while a critical alert fires, 1 while a warning does, 0 otherwise."""
    from primespark.monitoring.status import PrometheusApi, gather, prometheus_url, render

    env = env_of(env, old_env)
    fleet = fleet_for(env)
    url = prometheus or prometheus_url(fleet)
    context = None
    if url.startswith("https:"):  # verified against the fleet CA only
        from primespark.cli.tls import fleet_client_context

        context = fleet_client_context(env)
    api = PrometheusApi(url, context=context)
    found = gather(fleet, api)
    for part in render(found, fleet):
        console.print(part)
    if found.exit_code:
        raise typer.Exit(found.exit_code)


def register(root: typer.Typer) -> None:
    root.command("status", cls=Command)(status)
    root.add_typer(app, name="monitoring")
