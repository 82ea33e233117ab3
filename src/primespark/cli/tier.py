"""`spark tier plan|run|where|ls|recall|rebuild`: tier migration (hot → warm → cold) and its catalog."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from primespark.cli.common import EnvOption, TransportOption, console, transport_of
from primespark.context import FleetContext
from primespark.data import migrate
from primespark.data.tiers import next_tier
from primespark.data.transfer import human_size
from primespark.errors import UserError
from primespark.fleet.model import TierName

app = typer.Typer(help="Tier migration: what would move and why, a pass now, where a moved file is, recall, "
                  "rebuild the catalog.", no_args_is_help=True)

TierOption = Annotated[str, typer.Option("--tier", help="The upper tier of the boundary: hot (→ warm) or warm "
                                                        "(→ cold).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as one JSON line.")]


def _tier(ctx: FleetContext, tier: str) -> TierName:
    try:
        name = TierName(tier)
    except ValueError:
        raise UserError(f"no tier named {tier!r}", "use hot, warm or cold") from None
    present = list(ctx.fleet.tiers)
    if name not in present or next_tier(name, present) is None:
        upper = ", ".join(t.value for t in present if next_tier(t, present) is not None)
        raise UserError(f"fleet {ctx.fleet.name} has no tier below {tier}", f"tiers with one below: {upper}")
    return name


def _when(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _rows(title: str, rows: list[dict[str, Any]]) -> None:
    table = Table(title=title)
    for column in ("original", "tier", "now at", "size", "hash", "moved at"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(f"{row['origin_host']}:{row['origin_path']}", row["tier"], f"{row['host']}:{row['path']}",
                      human_size(row["size"]), row["hash"][:24] + "…", _when(row["moved_at"]))
    console.print(table)


@app.command("plan")
def plan(
    host: Annotated[str | None, typer.Argument(help="One host of the tier; every host if omitted.")] = None,
    env: EnvOption = "lab",
    tier: TierOption = "hot",
    transport: TransportOption = "ssh",
    as_json: JsonOption = False,
) -> None:
    """What a pass would move and why (and what stays, and why); nothing is moved."""
    ctx = FleetContext.load(env, transport_of(transport))
    found, _ = migrate.plan_pass(ctx, _tier(ctx, tier), [host] if host else None)
    if as_json:
        typer.echo(json.dumps({"moves": [m.__dict__ for m in found.moves],
                               "waiting": [w.__dict__ for w in found.waiting],
                               "skipped": [s.__dict__ for s in found.skipped]}))
        return
    table = Table(title=f"tier {found.tier.value} → {found.to.value if found.to else '—'} in {ctx.env}")
    for column in ("host", "file", "size", "to", "why"):
        table.add_column(column, overflow="fold")
    for move in found.moves[:500]:
        table.add_row(move.host, move.path, human_size(move.size), move.destination, move.reason)
    for wait in found.waiting[:200]:
        table.add_row(wait.host, wait.path, human_size(wait.size), "—", wait.reason, style="yellow")
    for kept in found.skipped[:200]:
        table.add_row(kept.host, kept.path, human_size(kept.size), "stays", kept.reason, style="dim")
    console.print(table)
    for usage in found.usage.values():
        console.print(f"{usage.host} ({usage.tier}): {usage.ratio(usage.before):.0%} used, "
                      f"{usage.ratio(usage.after):.0%} after the moves")
    console.print(f"{len(found.moves)} files ({human_size(found.bytes)}) would move, "
                  f"{len(found.waiting)} wait for room")


@app.command("run")
def run(
    env: EnvOption = "lab",
    tier: TierOption = "hot",
    host: Annotated[list[str] | None, typer.Option("--host", help="Only from this host (repeatable).")] = None,
    transport: TransportOption = "ssh",
    as_json: JsonOption = False,
) -> None:
    """A pass now, here: the plan's files moved one journaled step at a time (a killed pass is replayed first)."""
    ctx = FleetContext.load(env, transport_of(transport))
    name = _tier(ctx, tier)
    chosen = migrate.pass_hosts(ctx, name, host)  # a wrong --host is told here, not from inside a flow run
    from flows.tiers import tier as tier_flow
    from primespark.orchestration.runs import record_runs, run_here

    record_runs(ctx)
    result = run_here(tier_flow, name.value, env, transport, hosts=host or None)
    if as_json:
        typer.echo(json.dumps(result))
        return
    table = Table(title=f"tier {result['tier']} → {result['to']}")
    for column in ("source", "to", "moved", "bytes", "already there", "replayed", "stayed"):
        table.add_column(column)
    for row in result["results"]:
        table.add_row(row["source_host"], row["dest_host"], str(row["moved"]), human_size(row["bytes"]),
                      str(row["already_there"]), str(row["replayed"]),
                      ", ".join(f"{k}: {v}" for k, v in row["abandoned"].items()) or "—")
    console.print(table)
    for after in result["after"]:
        console.print(f"{after['host']} ({after['tier']}): {after['used'] / after['capacity']:.0%} used")
    for reason, count in sorted(result["skipped"].items()):
        console.print(f"stayed: {reason}: {count}")
    example = next((row["example"] for row in result["results"] if row.get("example")), "")
    if example:
        _rows(f"where one moved file is now (spark tier where {example} --env {env})", migrate.where(ctx, example))
        return
    # nothing moved now (a scheduled pass may have just run): where the last file an earlier pass moved went
    last = migrate.latest(ctx, chosen)
    if last is not None:
        _rows(f"nothing moved in this pass; the last file an earlier one moved (spark tier where "
              f"{last['origin_host']}:{last['origin_path']} --env {env})", [last])


@app.command("where")
def where(
    path: Annotated[str, typer.Argument(help="A file's original path, or HOST:PATH.")],
    env: EnvOption = "lab",
    transport: TransportOption = "ssh",
    as_json: JsonOption = False,
) -> None:
    """Where a file that moved is now (from the catalog)."""
    ctx = FleetContext.load(env, transport_of(transport))
    rows = migrate.where(ctx, path)
    if as_json:
        typer.echo(json.dumps(rows))
        return
    if not rows:
        raise UserError(f"{path} is not in the catalog: it never moved down a tier (or was recalled)",
                        "`spark tier ls HOST:/FOLDER` lists what moved from a folder")
    _rows(f"where {path}", rows)


@app.command("ls")
def ls(
    place: Annotated[str, typer.Argument(help="HOST or HOST:/FOLDER (original places).")],
    env: EnvOption = "lab",
    transport: TransportOption = "ssh",
    as_json: JsonOption = False,
) -> None:
    """The files that moved from HOST (below FOLDER), and where each is now."""
    ctx = FleetContext.load(env, transport_of(transport))
    rows = migrate.ls(ctx, place)
    if as_json:
        typer.echo(json.dumps(rows))
        return
    _rows(f"moved from {place}: {len(rows)} files", rows)


@app.command("recall")
def recall(
    path: Annotated[str, typer.Argument(help="A moved file's original path, or HOST:PATH.")],
    env: EnvOption = "lab",
    transport: TransportOption = "ssh",
) -> None:
    """Bring a moved file back to its original place (copied, verified, renamed, catalogued, then removed below)."""
    ctx = FleetContext.load(env, transport_of(transport))
    if not migrate.where(ctx, path):
        raise UserError(f"{path} is not in the catalog: it never moved (or was recalled already)",
                        "`spark tier ls HOST:/FOLDER` lists what moved")
    from flows.tiers import tier_recall
    from primespark.orchestration.runs import record_runs, run_here

    record_runs(ctx)
    result = run_here(tier_recall, path, env, transport)
    if result["moved"] != 1:
        raise UserError(f"{path} was not recalled: {result['abandoned']}", "run it again; the file is where it was")
    console.print(f"recalled {path}")


@app.command("rebuild")
def rebuild(
    env: EnvOption = "lab",
    transport: TransportOption = "ssh",
) -> None:
    """The catalog rebuilt from the lower tiers' contents (after it was lost): every moved file found again."""
    ctx = FleetContext.load(env, transport_of(transport))
    migrate.catalog_place(ctx.fleet)
    from flows.tiers import tier_rebuild
    from primespark.orchestration.runs import record_runs, run_here

    record_runs(ctx)
    result = run_here(tier_rebuild, env, transport)
    console.print(f"the catalog holds {result['entries']} entries")
