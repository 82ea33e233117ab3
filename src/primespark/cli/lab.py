"""`spark lab up | down | status | ssh HOST`: the lab fleet as containers on this machine."""

from __future__ import annotations

import os
import shlex
import subprocess
from typing import Annotated

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from primespark.cli.common import EnvOption, console, fleet_for
from primespark.errors import UserError
from primespark.lab import Lab
from primespark.lab.lock import lab_lock
from primespark.lab.ssh import ssh_argv

app = typer.Typer(help="The lab: every host of a lab fleet as a Docker container on this machine.",
                  no_args_is_help=True)


def _lab(env: str) -> Lab:
    return Lab(fleet_for(env))


@app.command()
def up(env: EnvOption = "lab") -> None:
    """Bring the lab up (idempotent): image, networks, NAT router, hosts, SSH keys, Prefect server, and the lab's
    OpenBao (started, initialised the first time, unsealed)."""
    lab = _lab(env)
    columns = (SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn())
    with lab_lock(), Progress(*columns, console=console, transient=True) as progress:
        step = progress.add_task("starting the lab")

        def report(message: str) -> None:
            progress.update(step, description=message)
            if not message.startswith(("waiting", "preflight")):
                progress.console.print(f"  {message}")
        result = lab.up(report, detail=lambda line: progress.update(step, description=line))
    verdict = "up" if result.changed else "already up, nothing changed"
    built = " (image built)" if result.image_built else ""
    console.print(f"[green]lab {lab.fleet.name} {verdict}[/green] in {result.seconds:.1f} s{built}: "
                  f"{sum(1 for s in lab.plan().containers if s.host)} hosts, image {result.image}")
    where = " (site.yml installs it on its host)" if lab.orchestrated else ""
    console.print(f"  Prefect UI {result.prefect_url}{where}   state {lab.state_dir}")
    if result.openbao is not None:
        console.print(f"  OpenBao {result.openbao_url} (unsealed; start + unseal {result.openbao.seconds:.1f} s)   "
                      "`eval \"$(spark lab env)\"` sets VAULT_ADDR for `bao`")
    console.print("  next: `spark lab status`, `spark lab ssh <host>`, "
                  "`ansible all -i inventory/lab.fleet.yml -m ping`")


@app.command()
def down(env: EnvOption = "lab") -> None:
    """Remove every container, network and volume the lab made (and nothing else); stop its Prefect server and
    its OpenBao (whose data, like Prefect's database, stays in the state folder)."""
    lab = _lab(env)
    with lab_lock(), console.status("taking the lab down"):
        containers, networks, volumes = lab.down(lambda m: console.print(f"  {m}"))
    console.print(f"[green]lab {lab.fleet.name} down[/green]: removed {containers} containers, "
                  f"{networks} networks, {volumes} volumes")


@app.command()
def status(env: EnvOption = "lab",
           no_ssh: Annotated[bool, typer.Option("--no-ssh", help="Skip the SSH login check.")] = False) -> None:
    """Each host: container state, addresses, SSH reachability; the Prefect UI and the OpenBao addresses."""
    lab = _lab(env)
    with console.status("checking the lab"):
        state = lab.status(check_ssh=not no_ssh)
    table = Table(title=f"lab {lab.fleet.name}")
    for column in ("host", "container", "state", "addresses", "ssh"):
        table.add_column(column)
    for row in state.hosts + state.routers:
        ssh = "-" if row.host not in lab.fleet.hosts else ("[green]ok[/green]" if row.ssh else "[red]no[/red]")
        colour = "green" if row.state == "running" else "red"
        table.add_row(row.host, row.container, f"[{colour}]{row.state}[/{colour}]",
                      ", ".join(f"{a} ({n.rsplit('-', 1)[-1]})" for n, a in row.addresses.items()), ssh)
    console.print(table)
    health = "[green]healthy[/green]" if state.prefect_healthy else "[red]not running[/red]"
    console.print(f"Prefect UI {state.prefect_url} ({health})   state {state.state_dir}")
    if state.openbao_url:
        colour = "green" if state.openbao_state == "unsealed" else "red"
        console.print(f"OpenBao {state.openbao_url} ([{colour}]{state.openbao_state}[/{colour}])")
    if not all(h.ssh or no_ssh for h in state.hosts):
        raise typer.Exit(1)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ssh(host: Annotated[str, typer.Argument(help="A host of the lab fleet, e.g. pi-1.")],
        command: Annotated[list[str] | None, typer.Argument(help="A command to run instead of a shell.")] = None,
        env: EnvOption = "lab") -> None:
    """Log in to a lab host as its fleet user, with the lab's key and known_hosts."""
    lab = _lab(env)
    if host not in lab.fleet.hosts or host not in {s.host for s in lab.plan().containers}:
        raise UserError(f"{host!r} is not a host of the lab {lab.fleet.name}",
                        fix="one of: " + ", ".join(s.host for s in lab.plan().containers if s.host))
    argv = ssh_argv(lab.state_dir, lab.fleet, host, *(command or []), batch=False)
    os.execvp(argv[0], argv)  # noqa: S606 (the operator asked for this ssh)


@app.command("env")
def env_(env: EnvOption = "lab",
         vault_token: Annotated[bool, typer.Option(
             "--vault-token", help="Also print VAULT_TOKEN: the lab's OpenBao root token (on stdout: mind where "
             "it goes).")] = False) -> None:
    """Shell lines for the lab (`eval "$(spark lab env)"`): PREFECT_API_URL (and the API's auth string and the
    fleet CA that verifies it, for the `prefect` CLI by hand), the state directory and, with the lab's OpenBao,
    VAULT_ADDR for your own `bao` commands. spark itself needs none of them."""
    lab = _lab(env)
    typer.echo(f"export PREFECT_API_URL={lab.prefect_url}/api")
    if lab.prefect_url.startswith("https:") and lab.fleet_ca_file is not None:  # Prefect's client: that CA only
        typer.echo(f"export PREFECT_API_SSL_CERT_FILE={lab.fleet_ca_file}")
    if lab.orchestrated:
        from primespark.context import FleetContext
        from primespark.orchestration.material import auth_string

        # The operator's own secret into the operator's own shell; it is what the UI asks for, too.
        typer.echo(f"export PREFECT_API_AUTH_STRING={shlex.quote(auth_string(FleetContext.load(env)))}")
    typer.echo(f"export SPARK_LAB_STATE={lab.state_dir}")
    if lab.openbao is not None:
        typer.echo(f"export VAULT_ADDR={lab.openbao.address}")
        if vault_token:
            from primespark.lab.openbao import lab_access

            typer.echo(f"export VAULT_TOKEN={lab_access(lab.fleet, lab.state_dir)[1]}")
    elif vault_token:
        raise UserError(f"the fleet {lab.fleet.name!r} keeps no secrets in a lab OpenBao",
                        fix="`secrets: {backend: vault, auth: lab}` in the fleet file gives the lab one")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def locked(command: Annotated[list[str], typer.Argument(help="The command, after `--`.")]) -> None:
    """Run a command holding the lab lock (like `flock /tmp/spark-lab.lock`, but no deadlock when nested)."""
    with lab_lock():
        raise typer.Exit(subprocess.run(command).returncode)
