"""Shared pieces of the CLI: the console, the environment argument, loading a fleet for a command."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

from primespark.fleet import Fleet, load_fleet

# Piped output keeps whole table rows rather than wrapping at 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=200)
err_console = Console(stderr=True)

EnvArg = Annotated[
    str, typer.Argument(help="An environment (lab, homelab: inventory/<env>.yaml) or a path to a fleet file.")
]


def fleet_for(env_or_file: str, skip: frozenset[str] = frozenset()) -> Fleet:
    return load_fleet(env_or_file, skip)
