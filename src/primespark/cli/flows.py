"""`spark flows deploy | status | serve | wheelhouse`: the fleet's deployments on its Prefect server's work pools."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(help="Flows on the fleet's Prefect server: work pools per site, deployments, workers.",
                  no_args_is_help=True)


@app.command()
def wheelhouse(
    arch: Annotated[str, typer.Option(help="The host's CPU architecture (uname -m).")],
    python: Annotated[str, typer.Option(help="The host's Python, MAJOR.MINOR.")],
    glibc: Annotated[str, typer.Option(help="The host's glibc (getconf GNU_LIBC_VERSION).")],
) -> None:
    """Build (or reuse) the wheelhouse a host installs the project from; print where it is (JSON, for the roles)."""
    from primespark.orchestration.wheelhouse import Target, build, describe
    from primespark.settings import get_settings

    house = build(Target(arch, python, glibc), get_settings().root)
    typer.echo(describe(house))

