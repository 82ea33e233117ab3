"""`spark validate`, `spark show`, `spark inventory`: the fleet itself."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from primespark.cli.common import Command, EnvOption, OldEnvArg, console, env_of, fleet_for
from primespark.fleet.loader import resolve


def validate(old_env: OldEnvArg = None, env: EnvOption = "lab") -> None:
    """Validate a fleet file: every problem, located by file:line and field, with a fix."""
    env = env_of(env, old_env)
    fleet = fleet_for(env)
    console.print(
        f"[green]ok[/green] {resolve(env)}: fleet [bold]{fleet.name}[/bold], {len(fleet.hosts)} hosts, "
        f"{len(fleet.services)} services, {len(fleet.meshes)} mesh(es)"
    )


def show(old_env: OldEnvArg = None, env: EnvOption = "lab") -> None:
    """Show hosts, services, storage tiers, meshes and backups as tables."""
    fleet = fleet_for(env_of(env, old_env))
    hosts = Table(title=f"fleet {fleet.name}: hosts")
    for column in ("host", "kind", "site", "arch", "cpu", "mem MiB", "disk GB", "address", "public", "services"):
        hosts.add_column(column)
    for name, host in fleet.hosts.items():
        services = ", ".join(f"{s}:{svc.port}" for s, svc in fleet.services_on(name).items())
        on = f" (on {host.vm.kvm_host})" if host.vm else ""
        hosts.add_row(name, host.kind.value + on, host.site, host.arch.value, str(host.cpus), str(host.memory_mb),
                      str(host.disk_gb), str(host.address), str(host.public_address or "-"), services or "-")
    console.print(hosts)

    sites = Table(title="sites")
    for column in ("site", "kind", "LAN", "behind NAT", "public address"):
        sites.add_column(column)
    for name, site in fleet.sites.items():
        sites.add_row(name, site.kind.value, str(site.lan), "yes" if site.behind_nat else "no",
                      str(site.public_address or "-"))
    console.print(sites)

    if fleet.tiers:
        tiers = Table(title="storage tiers")
        for column in ("tier", "hosts", "path", "capacity GB", "max age (days)", "watermarks"):
            tiers.add_column(column)
        for tier_name, tier in fleet.tiers.items():
            tiers.add_row(tier_name.value, ", ".join(tier.hosts), tier.path, str(tier.capacity_gb),
                          str(tier.max_age_days or "-"), f"{tier.low_watermark:.0%} / {tier.high_watermark:.0%}")
        console.print(tiers)

    for mesh_name, mesh in fleet.meshes.items():
        hub = f", hub {mesh.hub}" if mesh.hub else ""
        console.print(f"mesh [bold]{mesh_name}[/bold]: {mesh.interface} {mesh.overlay} port {mesh.listen_port}, "
                      f"{mesh.topology.value}{hub}, {len(fleet.mesh_members(mesh_name))} members")
    if fleet.backup:
        backup = fleet.backup
        console.print(f"backup: {len(backup.repositories)} repositories ({', '.join(backup.repositories)}), "
                      f"{len(backup.plans)} plans, RPO {backup.targets.rpo_hours} h, RTO {backup.targets.rto_minutes}"
                      f" min, drills '{backup.drill.schedule}' on {backup.drill.scratch_host}")


def inventory(
    old_env: OldEnvArg = None,
    env: EnvOption = "lab",
    host: str | None = typer.Option(None, "--host", help="Print one host's variables (Ansible's --host)."),
) -> None:
    """Print the Ansible inventory derived from the fleet, as JSON (Ansible's --list format)."""
    from primespark.inventory import build_inventory  # it imports each role's variables: only for this command

    fleet = fleet_for(env_of(env, old_env))
    data = build_inventory(fleet)
    if host is not None:
        if host not in data["_meta"]["hostvars"]:
            raise typer.BadParameter(f"no managed host {host!r}; hosts: {', '.join(data['_meta']['hostvars'])}")
        data = data["_meta"]["hostvars"][host]
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


def register(app: typer.Typer) -> None:
    app.command(cls=Command)(validate)
    app.command(cls=Command)(show)
    app.command(cls=Command)(inventory)
