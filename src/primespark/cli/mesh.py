"""`spark mesh plan|show|render|rotate|check`: the WireGuard mesh derived from the fleet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from primespark.cli.common import Command, EnvOption, OldEnvArg, console, env_of, err_console
from primespark.context import FleetContext
from primespark.errors import UserError
from primespark.fleet.model import Fleet
from primespark.mesh.health import check_mesh, publish_metrics, write_metrics
from primespark.mesh.render import render_all
from primespark.mesh.rotate import rotate_host
from primespark.mesh.service import current_plan, plan_and_save

app = typer.Typer(help="The WireGuard mesh: plan addresses and keys, render configs, rotate keys, check health.",
                  no_args_is_help=True)

MeshOpt = Annotated[str | None, typer.Option("--mesh", "-m", help="The mesh (default: every mesh of the fleet).")]


def _meshes(fleet: Fleet, mesh: str | None) -> list[str]:
    if mesh is not None:
        if mesh not in fleet.meshes:
            raise UserError(f"fleet {fleet.name} has no mesh {mesh!r}", f"use one of: {', '.join(fleet.meshes)}")
        return [mesh]
    if not fleet.meshes:
        raise UserError(f"fleet {fleet.name} defines no mesh", "add a `meshes:` section to the fleet file")
    return list(fleet.meshes)


def _context(env: str, old_env: str | None = None) -> FleetContext:
    return FleetContext.load(env_of(env, old_env))


@app.command(cls=Command)
def plan(old_env: OldEnvArg = None, env: EnvOption = "lab", mesh: MeshOpt = None) -> None:
    """Plan the mesh: stable addresses, keys for new hosts, peers; save it and print what changed."""
    ctx = _context(env, old_env)
    for name in _meshes(ctx.fleet, mesh):
        planned = plan_and_save(ctx.fleet, name, ctx.state_dir, ctx.secrets)
        diff = planned.diff
        console.print(f"mesh [bold]{name}[/bold]: {len(planned.plan.hosts)} hosts, {planned.plan.spec.topology.value}"
                      f", saved to {planned.saved_to}")
        if diff.empty:
            console.print("  no change")
        for line in diff.lines():
            console.print(f"  {line}", markup=False)
        if planned.previous is not None and not diff.empty:
            console.print(f"  {diff.unchanged} host(s) unchanged")
        if planned.keys_created:
            console.print(f"  new keys for: {', '.join(planned.keys_created)}")
        for warning in planned.plan.warnings:
            err_console.print(f"[yellow]warning[/yellow]: {warning}")


@app.command(cls=Command)
def show(old_env: OldEnvArg = None, env: EnvOption = "lab", mesh: MeshOpt = None) -> None:
    """Show the saved plan: each host's overlay address, endpoint, NAT, peers and public key."""
    ctx = _context(env, old_env)
    fleet = ctx.fleet
    for name in _meshes(fleet, mesh):
        planned = current_plan(fleet, name, ctx.state_dir, ctx.secrets)
        spec = planned.plan.spec
        hub = f", hub {spec.hub}" if spec.hub else ""
        table = Table(title=f"mesh {name}: {spec.interface} {spec.overlay} port {spec.listen_port}, "
                            f"{spec.topology.value}{hub}, MTU {spec.mtu}")
        for column in ("host", "overlay", "site", "endpoint", "behind NAT", "peers", "keepalive to", "public key"):
            table.add_column(column)
        for host, config in planned.plan.hosts.items():
            spec_host = fleet.hosts[host]
            endpoint = f"{spec_host.public_address}:{spec.listen_port}" if spec_host.public_address else "-"
            keepalive = [p.name for p in config.peers if p.keepalive]
            table.add_row(host, str(config.address), spec_host.site, endpoint,
                          "yes" if fleet.behind_nat(host) else "no", str(len(config.peers)),
                          ", ".join(keepalive) if len(keepalive) <= 3 else f"{len(keepalive)} peers",
                          config.public_key)
        console.print(table)
        if planned.previous and planned.previous.retired:
            console.print("retired addresses (never reused): " + ", ".join(
                f"{a} ({h})" for a, h in planned.previous.retired.items()))


@app.command(cls=Command)
def render(
    old_env: OldEnvArg = None,
    env: EnvOption = "lab",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for <host>.<interface>.conf (mode 0700).")] = Path(
        "out/mesh"),
    mesh: MeshOpt = None,
    host: Annotated[list[str] | None, typer.Option("--host", help="Only these hosts (repeatable).")] = None,
) -> None:
    """Write one wg-quick config per host (mode 0600; they hold private keys) from the saved plan."""
    ctx = _context(env, old_env)
    for name in _meshes(ctx.fleet, mesh):
        planned = current_plan(ctx.fleet, name, ctx.state_dir, ctx.secrets)
        unknown = [h for h in host or [] if h not in planned.plan.hosts]
        if unknown:
            raise UserError(f"not in mesh {name}: {', '.join(unknown)}", f"members: {', '.join(planned.plan.hosts)}")
        written = render_all(planned.plan, planned.keys, out, host or None)
        console.print(f"mesh [bold]{name}[/bold]: {len(written)} config(s) in {written[0].parent if written else out}")


@app.command()
def rotate(
    host: Annotated[str, typer.Argument(help="The host whose key is replaced.")],
    env: EnvOption = "lab",
    mesh: MeshOpt = None,
) -> None:
    """Replace HOST's key without downtime: publish the new key to its peers, switch, retire the old one."""
    ctx = _context(env)
    fleet = ctx.fleet
    for name in _meshes(fleet, mesh):
        planned = current_plan(fleet, name, ctx.state_dir, ctx.secrets)
        if host not in planned.plan.hosts:
            if mesh is None and len(fleet.meshes) > 1:
                continue
            raise UserError(f"{host} is not a member of mesh {name}", f"members: {', '.join(planned.plan.hosts)}")
        report = rotate_host(fleet, planned, host, ctx.hosts, ctx.state_dir, ctx.secrets,
                             log=lambda line: console.print(f"  {line}", markup=False))
        console.print(f"mesh [bold]{name}[/bold]: {host} now uses {report.new_public_key} "
                      f"(was {report.old_public_key}); {len(report.peers)} peer(s) updated")


@app.command(cls=Command)
def check(
    old_env: OldEnvArg = None,
    env: EnvOption = "lab",
    mesh: MeshOpt = None,
    textfile: Annotated[Path | None, typer.Option(
        "--textfile", help="Write Prometheus metrics here (default: <state>/metrics/mesh_<mesh>.prom).")] = None,
    publish: Annotated[bool, typer.Option(
        "--publish", help="Also write each member's pairs onto that member, where Prometheus scrapes them.")] = False,
) -> None:
    """For every pair: latest handshake age and ping over the overlay. Exit 1 when a pair is down."""
    ctx = _context(env, old_env)
    failed = False
    for name in _meshes(ctx.fleet, mesh):
        planned = current_plan(ctx.fleet, name, ctx.state_dir, ctx.secrets)
        health = check_mesh(planned.plan, ctx.hosts)
        table = Table(title=f"mesh {name}: {len(health.pairs)} pairs, {len(health.down)} not ok")
        for column in ("from", "to", "path", "handshake age", "ping", "status"):
            table.add_column(column)
        for pair in health.pairs:
            age = f"{pair.handshake_age:.0f} s" if pair.handshake_age is not None else (
                "never" if pair.direct else "-")
            path = "direct" if pair.direct else f"via {planned.plan.spec.hub or '?'}"
            ping = f"{pair.rtt_ms:.2f} ms" if pair.rtt_ms is not None else "no answer"
            style = {"ok": "green", "stale": "yellow", "down": "red"}[pair.status]
            table.add_row(pair.source, pair.target, path, age, ping, f"[{style}]{pair.status}[/{style}]")
        console.print(table)
        for host, why in health.unreachable_hosts.items():
            err_console.print(f"[red]{host}[/red]: could not be probed: {why}")
        written = write_metrics(health, textfile or ctx.state_dir / "metrics" / f"mesh_{name}.prom")
        console.print(f"metrics: {written}")
        if publish:
            for host, where in publish_metrics(health, ctx.hosts, ctx.fleet).items():
                console.print(f"  {host}: {where}", markup=False)
        failed = failed or not health.healthy
    if failed:
        raise typer.Exit(1)
