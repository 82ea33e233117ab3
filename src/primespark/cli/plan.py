"""`spark plan | preview | up | destroy ENV`: the cloud side, offline under mocks or for real through Pulumi."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from typing import TYPE_CHECKING

import typer
from rich.text import Text
from rich.tree import Tree

from primespark.cli.common import Command, EnvOption, OldEnvArg, console, env_of
from primespark.errors import UserError

if TYPE_CHECKING:  # the Pulumi SDK loads only when a cloud command runs
    from primespark.cloud.mockengine import Recorded
    from primespark.cloud.plan import PlanResult

GIB = 1024**3


def _key_props(r: Recorded) -> str:
    p = r.outputs
    short = r.type.rsplit(":", 1)[-1]
    match short:
        case "Domain":
            labels = json.loads(p.get("description") or "{}").get("primespark", {}).get("labels", {})
            return (f"{p.get('vcpu', 0):g} vCPU, {p.get('memory', 0):g} MiB, autostart={p.get('autostart')}, "
                    f"backup={labels.get('backup', '-')}")
        case "Volume":
            return (f"{p.get('size', 0) / GIB:g} GiB on base" if p.get("baseVolumeId")
                    else f"source {p.get('source')}")
        case "Network":
            return f"{p.get('mode')} {', '.join(p.get('addresses') or [])}"
        case "Pool":
            return f"{p.get('type')} {p.get('path')}"
        case "CloudInitDisk":
            return f"user-data {len(p.get('userData') or '')} bytes"
        case "KvmHost":
            return f"{p.get('cpus', 0):g} CPU, {p.get('memoryMb', 0):g} MiB, {p.get('diskGb', 0):g} GB"
        case "VirtualMachine":
            public = f", public {p['publicAddress']}" if p.get("publicAddress") else ""
            return f"{p.get('address')}{public}"
        case "ServiceStack":
            return ", ".join(f"{n}:{s.get('port', 0):g}" for n, s in (p.get("services") or {}).items())
        case "Secrets":
            return f"{len(p.get('secrets') or {})} secret paths, {len(p.get('roles') or {})} AppRoles"
        case "WireGuardMesh":
            return f"{len(p.get('public_keys') or {})} peers"
    if r.type.startswith("pulumi:providers:"):
        return str(p.get("uri", ""))
    return ""


def _tree(result: PlanResult) -> Tree:
    children: dict[str | None, list[Recorded]] = defaultdict(list)
    for r in result.graph.resources:
        children[r.parent].append(r)
    root = Tree(Text.assemble((result.stack_urn.rsplit("::", 1)[-1], "bold"), " (pulumi:pulumi:Stack)"))

    def add(node: Tree, urn: str | None) -> None:
        for r in children.get(urn, []):
            label = Text.assemble((r.type, "cyan"), " ", (r.name, "bold"), ("  " + _key_props(r), "dim"))
            add(node.add(label), r.urn)

    add(root, result.stack_urn)
    add(root, None)
    return root


def plan(old_env: OldEnvArg = None, env: EnvOption = "lab") -> None:
    """Run the Pulumi program offline under mocks: the resource tree and every policy's verdict."""
    from primespark.cloud.plan import plan as run_plan

    result = run_plan(env_of(env, old_env))
    console.print(_tree(result))
    for note in result.notes:
        console.print(f"[yellow]note[/yellow] {note}")
    for v in result.violations:
        colour = "red" if v.mandatory else "yellow"
        console.print(Text.assemble((v.level, colour), f" [{v.policy}] {v.message}"), soft_wrap=True)
    console.print(f"{len(result.graph.resources)} resources, {len(result.violations)} violations "
                  f"({len(result.mandatory)} mandatory)")
    if result.mandatory:
        raise typer.Exit(1)


def _drive(action: str, env: str) -> None:
    from primespark.cloud import automation
    from primespark.fleet import load_fleet

    automation.require_cli()
    if action == "up":
        from primespark.cloud.plan import FLEET_SKIP, stack_config
        from primespark.settings import get_settings

        fleet = load_fleet(stack_config(env).get("fleet", env), skip=FLEET_SKIP)
        cache = stack_config(env).get("imageCache") or str(get_settings().state_dir(env) / "images")
        from pathlib import Path

        automation.ensure_images(fleet, Path(cache))
    result = automation.run(action, env, on_output=lambda line: console.print(line, end="", markup=False))
    if action == "up":
        outputs = {k: v.value for k, v in result.outputs.items() if not v.secret}
        console.print(f"stack outputs written to {automation.write_outputs(env, outputs)}")


def preview(old_env: OldEnvArg = None, env: EnvOption = "lab") -> None:
    """`pulumi preview` of ENV with the policy pack attached (local file backend under the state dir)."""
    _drive("preview", env_of(env, old_env))


def up(old_env: OldEnvArg = None, env: EnvOption = "lab") -> None:
    """`pulumi up` of ENV with the policy pack attached; writes the stack outputs for Ansible and the flows."""
    _drive("up", env_of(env, old_env))


def destroy(
    old_env: OldEnvArg = None,
    env: EnvOption = "lab",
    yes: bool = typer.Option(False, "--yes", "-y", help="Destroy without asking (what is destroyed is still shown)."),
) -> None:
    """`pulumi destroy` of ENV: shows what it destroys and asks first (or takes --yes)."""
    env = env_of(env, old_env)
    if not yes and not sys.stdin.isatty():
        raise UserError(f"`spark destroy` deletes every resource of the {env} stack (VMs and their disks, networks; "
                        "the Vault secrets it manages, every version); refusing without --yes where no one can "
                        "answer", f"run `spark destroy --env {env}` at a terminal to see the list and confirm, or "
                        f"add --yes")
    from primespark.cloud import automation

    automation.require_cli()
    resources = automation.stack_resources(env)
    if not resources:
        console.print(f"the {env} stack holds no resources: nothing to destroy")
        return
    console.print(f"[bold red]spark destroy {env}[/bold red] deletes these {len(resources)} resources:")
    for kind, name in resources:
        console.print(f"  {kind} [bold]{name}[/bold]", highlight=False)
    if any(kind.startswith("vault:") for kind, _ in resources):
        console.print("[yellow]the Vault secrets above are deleted with every version they have[/yellow]")
    if not yes and not typer.confirm(f"Destroy all {len(resources)} of them?", default=False):
        console.print("nothing destroyed")
        raise typer.Exit(1)
    _drive("destroy", env)


def register(app: typer.Typer) -> None:
    for command in (plan, preview, up, destroy):
        app.command(cls=Command)(command)
