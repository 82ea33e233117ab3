"""`spark preflight ENV`: the preconditions of a configuration run, before the slow part."""

from __future__ import annotations

import typer
from rich.table import Table

from primespark.cli.common import Command, EnvOption, OldEnvArg, console, env_of, fleet_for

STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}  # by the names of primespark.preflight.Status


def preflight_command(
    old_env: OldEnvArg = None,
    env: EnvOption = "lab",
    min_free_gb: float = typer.Option(1.0, help="Free space the root filesystem of each host needs, in GB."),
    max_skew: float = typer.Option(5.0, help="Largest clock difference from this machine, in seconds."),
    timeout: float = typer.Option(5.0, help="Seconds to wait for each host's SSH port."),
) -> None:
    """Check networks, SSH reachability, Python, free disk and clock skew on every managed host."""
    from primespark.preflight import Limits, Status, preflight  # it loads the inventory: only for this command

    env = env_of(env, old_env)
    fleet = fleet_for(env)
    findings = preflight(fleet, env, Limits(min_free_gb=min_free_gb, max_skew_seconds=max_skew,
                                            connect_timeout=timeout))
    table = Table(title=f"preflight: {fleet.name}")
    for column in ("host", "check", "status", "detail"):
        table.add_column(column)
    for finding in findings:
        detail = finding.message + (f"\n[dim]fix: {finding.fix}[/dim]" if finding.fix and
                                    finding.status is not Status.ok else "")
        table.add_row(finding.host, finding.check, f"[{STYLE[finding.status.name]}]{finding.status.value}[/]", detail)
    console.print(table)
    failed = [f for f in findings if f.status is Status.fail]
    if failed:
        console.print(f"[bold red]{len(failed)} check(s) failed[/]: fix them before running the playbooks")
        raise typer.Exit(1)
    console.print("[green]preflight passed[/green]: `ansible-playbook site.yml` can run")


def register(app: typer.Typer) -> None:
    app.command(name="preflight", cls=Command)(preflight_command)
