"""The `spark` application: command groups are registered here, each defined in its own module."""

from __future__ import annotations

import sys

import typer

from primespark.cli import audit as audit_commands
from primespark.cli import backup as backup_commands
from primespark.cli import drill as drill_commands
from primespark.cli import fleet as fleet_commands
from primespark.cli import flows as flows_commands
from primespark.cli import host as host_commands
from primespark.cli import lab as lab_commands
from primespark.cli import mesh as mesh_commands
from primespark.cli import monitoring as monitoring_commands
from primespark.cli import plan as plan_commands
from primespark.cli import preflight as preflight_commands
from primespark.cli import secrets as secrets_commands
from primespark.cli import sync as sync_commands
from primespark.cli import task as task_commands
from primespark.cli import tier as tier_commands
from primespark.cli import tls as tls_commands
from primespark.errors import UserError
from primespark.fleet import FleetError
from primespark.secrets import SecretError

app = typer.Typer(
    name="spark",
    help="Prime Spark: run a hybrid edge-cloud AI fleet as code, from one validated inventory.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
fleet_commands.register(app)
app.add_typer(lab_commands.app, name="lab")
app.add_typer(mesh_commands.app, name="mesh")
preflight_commands.register(app)
app.add_typer(backup_commands.app, name="backup")
app.add_typer(drill_commands.app, name="drill")
app.add_typer(secrets_commands.app, name="secrets")
app.add_typer(flows_commands.app, name="flows")
app.add_typer(sync_commands.app, name="sync")
app.add_typer(tier_commands.app, name="tier")
app.add_typer(task_commands.app, name="task")
app.add_typer(host_commands.app, name="host")
plan_commands.register(app)
monitoring_commands.register(app)
app.add_typer(audit_commands.app, name="audit")
app.add_typer(tls_commands.app, name="tls")


def main() -> None:
    try:
        # The one audit hook of commands: those in cli/audit.py's AUDITED table each append one record.
        with audit_commands.audited_command(sys.argv[1:]):
            app()
    except FleetError as exc:
        typer.echo(f"error: {exc.summary()}", err=True)
        sys.exit(1)
    except (UserError, SecretError) as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
