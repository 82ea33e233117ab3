"""`spark audit verify|show`, and the CLI's audit hook: which commands change something (one record each) and
which of them are destructive (no record, no run). docs/audit.md says the same in prose."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from primespark.cli.common import EnvOption, console, err_console
from primespark.errors import UserError

app = typer.Typer(help="The audit log: who ran what, where, with what result; verify that nobody rewrote it.",
                  no_args_is_help=True)

ALL_HOSTS = "*"


@dataclass(frozen=True)
class Audited:
    """A command that changes something. `hosts`: the parameters naming its target hosts (ALL_HOSTS: the whole
    fleet; none given, or the parameter empty: the whole fleet too). `destructive`: True, or the name of a flag that
    makes it so; `unless`: a flag under which it changes nothing (a dry run); `only_if`: a flag without which it
    changes nothing; `stops_signer`: it stops what signs the audit checkpoints (the lab's OpenBao)."""

    hosts: tuple[str, ...] = (ALL_HOSTS,)
    destructive: bool | str = False
    unless: str | None = None
    only_if: str | None = None
    stops_signer: bool = False

    def applies(self, params: dict[str, Any]) -> bool:
        return not (self.unless and params.get(self.unless)) and not (self.only_if and not params.get(self.only_if))

    def is_destructive(self, params: dict[str, Any]) -> bool:
        return bool(params.get(self.destructive)) if isinstance(self.destructive, str) else self.destructive


# Every command path that changes something; any other command only reads (or writes local files of its own).
AUDITED: dict[tuple[str, ...], Audited] = {
    ("up",): Audited(),
    ("destroy",): Audited(destructive=True),
    ("lab", "up"): Audited(),
    ("lab", "down"): Audited(stops_signer=True),
    ("mesh", "plan"): Audited(),
    ("mesh", "rotate"): Audited(hosts=("host",), destructive=True),
    ("backup", "now"): Audited(hosts=("host",)),
    ("backup", "init"): Audited(hosts=("client",), destructive=True),
    ("backup", "maintain"): Audited(),
    ("drill", "run"): Audited(hosts=("host",)),
    ("secrets", "migrate"): Audited(unless="dry_run"),
    ("flows", "deploy"): Audited(),
    ("sync", "run"): Audited(hosts=("source",), unless="dry_run", destructive="accept_empty_source"),
    ("sync", "check"): Audited(only_if="repair"),
    ("sync", "watch"): Audited(),
    ("audit", "ship"): Audited(),
    ("tls", "renew"): Audited(hosts=("host",), unless="dry_run"),
    ("host", "drain"): Audited(hosts=("host",)),
    ("host", "undrain"): Audited(hosts=("host",)),
}


def resolve(args: list[str]) -> tuple[tuple[str, ...], dict[str, Any]] | None:
    """The command path and its parameters (defaults filled in) that `args` name, parsed the way the command
    will be, without running it; None for help, or for what the command itself will refuse."""
    from primespark.cli.app import app as root

    if any(a in ("--help", "-h") for a in args):
        return None
    command = typer.main.get_command(root)
    path: list[str] = []
    params: dict[str, Any] = {}
    try:
        ctx = command.make_context("spark", list(args), resilient_parsing=True)
        while hasattr(ctx.command, "resolve_command"):  # a group (typer carries its own copy of click)
            rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
            if not rest:
                return None
            name, sub, remaining = ctx.command.resolve_command(ctx, rest)
            if sub is None or name is None:
                return None
            path.append(name)
            ctx = sub.make_context(name, remaining, parent=ctx, resilient_parsing=True)
        params = dict(ctx.params)
    except Exception:  # what does not parse here, the command itself refuses with its usage
        return None
    return tuple(path), params


def _targets(rule: Audited, params: dict[str, Any], all_hosts: list[str]) -> list[str]:
    for name in rule.hosts:
        if name == ALL_HOSTS:
            return all_hosts
        value = params.get(name)
        if value:
            return [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]
    return all_hosts


@contextmanager
def audited_command(args: list[str]) -> Iterator[None]:
    """The CLI's one audit hook: a command of `AUDITED` runs as one audited operation; others just run."""
    words = tuple(a for a in args if not a.startswith("-"))
    if words[:1] not in AUDITED and words[:2] not in AUDITED:  # groups take no options: a cheap first look
        yield
        return
    found = resolve(args)
    rule = AUDITED.get(found[0]) if found else None
    if found is None or rule is None or not rule.applies(found[1]):
        yield
        return
    path, params = found
    from primespark.audit.log import AuditLog, AuditUnavailable, Operation, audit_log, operation, operator
    from primespark.context import FleetContext

    env = str(params["old_env"] if params.get("old_env") is not None else params.get("env", "lab"))
    try:
        ctx: FleetContext | None = FleetContext.load(env, "local")
    except Exception:  # a fleet that does not load: the command says why itself
        ctx = None

    def open_log() -> AuditLog:
        if ctx is None:
            raise AuditUnavailable(f"the fleet of {env!r} does not load", f"`spark validate --env {env}` says why")
        return audit_log(ctx)

    destructive = rule.is_destructive(params)
    if ctx is None and not destructive:  # the command stops on that same fleet, and says why
        yield
        return
    hosts = _targets(rule, params, list(ctx.fleet.hosts) if ctx else [])
    op = Operation(f"spark {' '.join(path)}", ctx.env if ctx else env, hosts, params, operator())
    with operation(open_log, op, destructive,
                   lambda line: err_console.print(f"[yellow]warning[/yellow]: {line}", highlight=False),
                   rule.stops_signer):
        yield


# spark audit verify | show -------------------------------------------------------------------------------------


def _chains(folder: Path) -> list[Path]:
    """This machine's chain and any copied beside it (a worker's, under audit/<host>/)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*.jsonl") if not p.name.endswith(".checkpoints.jsonl"))


@app.command()
def ship(env: EnvOption = "lab") -> None:
    """Copy this machine's checkpoints to the NAS and the sites' workers, and each worker's to the others (over
    SSH): each copy only grows, and one that is not a prefix of its original is refused (one was edited or cut)."""
    from primespark.audit.checkpoints import checkpoints_path
    from primespark.audit.offsite import offsite_hosts, relay_workers
    from primespark.audit.offsite import ship as copy_to
    from primespark.context import FleetContext

    ctx = FleetContext.load(env)
    path = checkpoints_path(ctx.state_dir / "audit" / "log.jsonl")
    targets = offsite_hosts(ctx.fleet)
    if not targets:
        raise UserError(f"the fleet {ctx.fleet.name!r} has no NAS repository and no worker to copy checkpoints to",
                        "add a backup repository or an orchestration worker")
    data = path.read_bytes() if path.exists() else b""
    for host in targets:
        console.print(f"{host}: {copy_to(ctx.hosts, host, ctx.fleet.name, data)} bytes added")
    for worker, host, added in relay_workers(ctx):
        console.print(f"{host}: {added} bytes added of {worker}'s worker's checkpoints")


def _offsite_problems(ctx: Any) -> list[str]:
    from primespark.audit.checkpoints import checkpoints_path
    from primespark.audit.offsite import compare, fetch, offsite_hosts, worker_differences

    here_path = checkpoints_path(ctx.state_dir / "audit" / "log.jsonl")
    here = here_path.read_bytes() if here_path.exists() else b""
    found = []
    for host in offsite_hosts(ctx.fleet):
        difference = compare(host, here, fetch(ctx.hosts, host, ctx.fleet.name))
        if difference is not None:
            found.append(f"{here_path}: {difference.message}")
    return found + [difference.message for difference in worker_differences(ctx)]


@app.command()
def verify(env: EnvOption = "lab", offsite: Annotated[bool, typer.Option(
        "--offsite", help="Also compare this machine's and each worker's checkpoints with their copies on other "
                     "hosts (SSH).")] = False,
           ) -> None:
    """Check every chain and every checkpoint; name the first bad record (edited, inserted, reordered, deleted)
    or a truncated tail. Exit 1 when anything is wrong."""
    from primespark.audit.checkpoints import Signer, read_checkpoints
    from primespark.audit.log import audit_key, signer_for
    from primespark.audit.verify import verify_chain
    from primespark.context import FleetContext

    ctx = FleetContext.load(env, "local")
    folder = ctx.state_dir / "audit"
    chains = _chains(folder)
    if not chains:
        console.print(f"no audit log in {folder}" + ("" if offsite else " yet: nothing to verify"))
        if not offsite:
            return
    signer: Signer | None = None
    if any(read_checkpoints(c) for c in chains):
        signer = signer_for(ctx, lambda: audit_key(ctx), make=False)
    table = Table(title=f"audit chains of {ctx.env} in {folder}")
    for column in ("chain", "records", "checkpoints", "signed with", "verdict"):
        table.add_column(column, overflow="fold")
    bad = []
    for chain in chains:
        report = verify_chain(chain, signer)
        verdict = "[green]ok[/green]" if report.ok else f"[red]{report.problem.kind}[/red]" if report.problem else ""
        table.add_row(str(chain.relative_to(folder)), str(report.records), str(report.checkpoints),
                      ", ".join(sorted(report.signers)) or "-", verdict)
        if report.problem is not None:
            bad.append(f"{chain}: {report.problem.message}")
    console.print(table)
    if offsite:
        bad += _offsite_problems(FleetContext.load(env))
    for line in bad:
        err_console.print(f"[red]bad[/red] {line}", highlight=False)
    if bad:
        raise typer.Exit(1)


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|min|m|h|d)$")


def since_time(text: str, now: datetime | None = None) -> datetime:
    """`2h`, `30min`, `7d`, or an ISO date/time (UTC unless it says otherwise)."""
    now = now or datetime.now(UTC)
    found = _RELATIVE.match(text.strip())
    if found:
        seconds = {"s": 1, "min": 60, "m": 60, "h": 3600, "d": 86400}[found.group(2)]
        return now - timedelta(seconds=float(found.group(1)) * seconds)
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UserError(f"--since {text!r} is neither a duration nor a date",
                        "write e.g. 2h, 30min, 7d, or 2026-11-30T08:00") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@app.command()
def show(
    env: EnvOption = "lab",
    since: Annotated[str | None, typer.Option(help="Only records since: 2h, 7d, or an ISO date/time.")] = None,
    host: Annotated[str | None, typer.Option(help="Only operations that targeted this host.")] = None,
    operation: Annotated[str | None, typer.Option(help="Only operations whose name contains this.")] = None,
) -> None:
    """The records of every chain as a table, oldest first."""
    from primespark.audit.chain import records
    from primespark.context import FleetContext

    ctx = FleetContext.load(env, "local")
    folder = ctx.state_dir / "audit"
    start = since_time(since) if since else None
    rows = []
    for chain in _chains(folder):
        for record in records(chain):
            try:
                when = datetime.fromisoformat(str(record.get("time", "")).replace("Z", "+00:00"))
            except ValueError:
                continue
            if start and when < start:
                continue
            if host and host not in (record.get("hosts") or []):
                continue
            if operation and operation not in str(record.get("operation", "")):
                continue
            rows.append((when, chain, record))
    table = Table(title=f"audit records of {ctx.env} ({len(rows)})")
    for column in ("time", "actor", "operation", "hosts", "outcome", "duration", "flow run"):
        table.add_column(column, overflow="fold")
    for when, _chain, record in sorted(rows, key=lambda r: r[0]):
        actor = str(record.get("actor", ""))
        if record.get("deployment"):
            actor += f" ({record['deployment']})"
        outcome = str(record.get("outcome", ""))
        colour = "green" if outcome == "succeeded" else "red"
        table.add_row(when.strftime("%Y-%m-%d %H:%M:%S"), actor, str(record.get("operation", "")),
                      ", ".join(record.get("hosts") or []) or "-", f"[{colour}]{outcome}[/{colour}]",
                      f"{float(record.get('duration_seconds') or 0):.2f} s", str(record.get("flow_run_id") or "-"))
    console.print(table)
