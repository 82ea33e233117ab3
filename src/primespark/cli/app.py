"""The `spark` application: command groups are registered here, each defined in its own module."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from primespark.cli import audit as audit_commands
from primespark.cli import fleet as fleet_commands
from primespark.cli import monitoring as monitoring_commands
from primespark.cli import plan as plan_commands
from primespark.cli import preflight as preflight_commands
from primespark.errors import UserError
from primespark.fleet import FleetError
from primespark.secrets import SecretError

# The command groups, in `spark --help`'s order after the commands. Each group's module is imported when the group is
# used: `spark sync run` then loads what a sync needs, not the lab's Docker client or the Pulumi program's helpers
# (0.4-0.5 s of every command's start). `monitoring` also adds a command (`status`): it is loaded with the app.
ORDER = ("lab", "mesh", "backup", "drill", "secrets", "flows", "sync", "tier", "task", "host", "monitoring", "audit",
         "tls")
GROUPS = {name: f"primespark.cli.{name}" for name in ORDER if name != "monitoring"}


class Spark(TyperGroup):
    """The top-level group: its own commands, then the groups of GROUPS, each loaded on first use."""

    def list_commands(self, ctx: Any) -> list[str]:  # Any: the Context of Typer's own copy of click
        return [*(name for name in self.commands if name not in ORDER), *ORDER]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in self.commands and cmd_name in GROUPS:
            group = typer.main.get_group(importlib.import_module(GROUPS[cmd_name]).app)
            group.name = cmd_name
            self.commands[cmd_name] = group
        return self.commands.get(cmd_name)

    def resolve_command(self, ctx: Any, args: list[str]) -> tuple[str | None, Any, list[str]]:
        if args and args[0] not in self.commands and args[0] not in GROUPS:  # a typo: "did you mean" sees every name
            for name in GROUPS:
                self.get_command(ctx, name)
        return super().resolve_command(ctx, args)


app = typer.Typer(
    name="spark",
    cls=Spark,
    help="Prime Spark: run a hybrid edge-cloud AI fleet as code, from one validated inventory.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
fleet_commands.register(app)
preflight_commands.register(app)
plan_commands.register(app)
monitoring_commands.register(app)


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
