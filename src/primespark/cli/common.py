"""Shared pieces of the CLI: the console, the environment option, loading a fleet for a command.

Every command names its environment the same way: `--env ENV` (or `-e`, or `SPARK_ENV`), where ENV is
`lab`, `homelab` (`inventory/<env>.yaml`) or a path to a fleet file. The older `spark COMMAND ENV` spelling of
some commands still works for this release, with a note.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperCommand

from primespark.context import Transport
from primespark.errors import UserError
from primespark.fleet import Fleet, load_fleet

# Piped output keeps whole table rows rather than wrapping at 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=200)
err_console = Console(stderr=True)

EnvOption = Annotated[str, typer.Option(
    "--env", "-e", envvar="SPARK_ENV",
    help="The environment: lab, homelab (inventory/<env>.yaml) or a path to a fleet file.")]
# `spark validate lab`: the spelling before --env, accepted for one more release. Its commands use `Command`.
OldEnvArg = Annotated[str | None, typer.Argument(hidden=True, show_default=False, metavar="")]

TransportOption = Annotated[str, typer.Option(
    help="ssh: the commands (restic, rsync) run on the hosts over SSH; local: on this machine.")]


def transport_of(transport: str) -> Transport:
    if transport == "ssh":
        return "ssh"
    if transport == "local":
        return "local"
    raise UserError(f"unknown transport {transport!r}", "use --transport ssh (hosts) or local (this machine)")


class Command(TyperCommand):
    """Typer's command, its usage line without hidden arguments (Typer 0.29 prints `OldEnvArg` there as `[]`)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:  # Any: the Context of Typer's own copy of click
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if not getattr(param, "hidden", False):
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


def env_of(env: str, old_positional: str | None) -> str:
    """The environment a command acts on; a positional one (the old spelling) wins, with a note."""
    if old_positional is None:
        return env
    err_console.print(f"[yellow]note[/yellow]: naming the environment without --env is deprecated: "
                      f"use `--env {old_positional}`")
    return old_positional


def fleet_for(env_or_file: str, skip: frozenset[str] = frozenset()) -> Fleet:
    return load_fleet(env_or_file, skip)
