"""`spark secrets migrate --env ENV --to vault`: move an environment's local 0600 store into Vault."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from primespark.cli.common import console
from primespark.errors import UserError

app = typer.Typer(help="The secret store: move an environment's secrets between backends.", no_args_is_help=True)

EnvOption = Annotated[str, typer.Option("--env", "-e", help="The environment whose secrets move (its state folder).")]


@app.command("migrate")
def migrate(
    env: EnvOption = "lab",
    to: Annotated[str, typer.Option("--to", help="Where the secrets go: vault (the fleet file's secrets section).")]
    = "vault",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would move; change nothing.")] = False,
    remove_local: Annotated[bool, typer.Option(
        "--remove-local", help="Delete each local copy once Vault is verified to hold the same value.")] = False,
) -> None:
    """Move the local store's entries into the fleet's Vault, each verified by reading it back.

    The fleet file's `secrets:` section names the Vault (backend: vault, address, auth). Each key goes where
    `local:` references read it: `<mount>/<prefix>/<env>/<key>`, field `value`. Safe to run again: an entry already
    in Vault with the same value is left as it is; a different value there is a conflict, reported and never
    overwritten. `spark lab up` does this by itself for the lab."""
    from primespark.context import FleetContext
    from primespark.secrets import LocalSecretStore, vault_store
    from primespark.secrets import migrate as run_migration

    if to != "vault":
        raise UserError(f"unknown target {to!r}", "use --to vault")
    ctx = FleetContext.load(env)
    root = ctx.settings.state_path(ctx.env) / "secrets"
    if not root.is_dir():
        raise UserError(f"no local secret store for {env!r} at {root}", "check --env and SPARK_STATE_DIR")
    vault = vault_store(ctx.fleet, ctx.env, ctx.settings, migrating=True)
    results = run_migration(LocalSecretStore(root), vault, dry_run=dry_run, remove_local=remove_local)

    where = f"{vault.addr} {vault.mount}/{vault.prefix}/"
    table = Table(title=f"{root} -> {where}" + (" (dry run)" if dry_run else ""))
    table.add_column("key")
    table.add_column("status")
    table.add_column("local copy")
    for item in results:
        colour = {"conflict": "red", "would move": "yellow"}.get(item.status, "green")
        local = "removed" if item.removed_local else ("kept" if not dry_run else "-")
        table.add_row(item.key, f"[{colour}]{item.status}[/{colour}]", local)
    console.print(table)
    conflicts = [i.key for i in results if i.status == "conflict"]
    if conflicts:
        raise UserError(f"{len(conflicts)} entr{'y' if len(conflicts) == 1 else 'ies'} differ in Vault and were "
                        f"left as they are: {', '.join(conflicts)}",
                        "decide which value is right, delete the other (`bao kv delete` or the local file) "
                        "and run again")
    if not results:
        console.print("nothing to migrate: the local store is empty")
