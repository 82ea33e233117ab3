"""`spark host drain|undrain|ls`: keep new agent tasks off a host (its drain marker, docs/agents.md), let them back,
and each host's state as placement reads it (reachable, drained, quiet)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated
from zoneinfo import ZoneInfo

import typer
from rich.markup import escape
from rich.table import Table

from primespark.cli.common import EnvOption, console, transport_of
from primespark.errors import UserError

if TYPE_CHECKING:
    from primespark.context import FleetContext

app = typer.Typer(help="Fleet hosts and agent tasks: drain a host (no new task is placed on it), undrain it, and "
                  "each host's state as placement reads it.", no_args_is_help=True)

HostArg = Annotated[str, typer.Argument(help="A host of the fleet, as the fleet file names it.", show_default=False)]
TransportOption = Annotated[str, typer.Option(
    help="ssh: the marker is on the host; local: every host is this machine (tests).")]
# How long `ls` waits for each host (in parallel); ssh gives up on an unreachable one after 10 s itself.
LS_TIMEOUT_SECONDS = 30
WAIT_POLL_SECONDS = 2.0  # how often `drain --wait` asks the host (one SSH connection each time)


@app.command("drain")
def drain(
    host: HostArg,
    reason: Annotated[str, typer.Option(
        "--reason", help="Why (kept on the host with who and when; `spark host ls` and the audit log show it).",
        show_default=False)],
    wait: Annotated[int, typer.Option(
        "--wait", min=0, metavar="SECONDS", help="Then wait up to SECONDS for the agent tasks running on HOST to end "
        "(they are not stopped); fails, the host still drained, if some still run by then. 0: do not wait.")] = 0,
    env: EnvOption = "lab",
    transport: TransportOption = "ssh",
) -> None:
    """Keep new agent tasks off HOST (tasks running there go on).

    Writes HOST's drain marker, /run/spark/drain, with who, when and --reason; placement then excludes the host
    ("drained"). Draining a drained host changes nothing and says since when, unless the edge role's power
    scripts drained it (quiet hours, a low battery): this drain replaces theirs, and outlasts it. A reboot clears
    the marker (/run is a tmpfs). With --wait, it returns once no agent task runs on HOST: the host is free for
    maintenance."""
    from primespark.agents.drain import check_host, note_now
    from primespark.agents.drain import drain as drain_on
    from primespark.audit.log import operator
    from primespark.context import FleetContext
    from primespark.fleet.loader import resolve

    if not reason.strip():
        raise UserError("--reason is empty", "say why the host takes no tasks, e.g. --reason 'disk swap'")
    ctx = FleetContext.load(env, transport_of(transport))
    check_host(ctx.fleet, str(resolve(env)), host)
    done = drain_on(ctx.hosts, host, note_now(operator(), reason.strip()))
    note = escape(str(done.note))
    if done.changed:
        console.print(f"[bold]{host}: drained[/bold] {note}. No new agent task is placed on it; tasks running there "
                      f"go on. Undo: spark host undrain {host} --env {env}", highlight=False)
        if done.replaced is not None:
            console.print(f"It replaces the drain {escape(str(done.replaced))}, which would have ended by itself; "
                          "this one stays until undrained.", highlight=False)
    else:
        console.print(f"{host}: already drained {note}; nothing changed (undrain it first to give another reason)",
                      highlight=False)
    if wait:
        _wait_for_tasks(ctx, host, wait, env)


def _wait_for_tasks(ctx: FleetContext, host: str, seconds: int, env: str) -> None:
    """Until no agent task runs on `host`, asked every WAIT_POLL_SECONDS; UserError when some still do after
    `seconds` (or when the host cannot be asked: a host that does not answer is not known to be free)."""
    from primespark.agents.execute import running_on

    deadline = time.monotonic() + seconds
    with console.status(f"{host}: looking for agent tasks running there") as status:
        while True:
            left = running_on(ctx.hosts, ctx.fleet, host)
            if not left:
                console.print(f"{host}: no agent task runs on it", highlight=False)
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UserError(f"{host}: {len(left)} agent task{'s' if len(left) != 1 else ''} still running after "
                                f"{seconds} s: {', '.join(left)}; {host} stays drained",
                                f"wait longer (--wait), or stop them: spark task cancel ID --env {env}")
            status.update(f"{host}: waiting for {len(left)} agent task{'s' if len(left) != 1 else ''} to end "
                          f"({', '.join(left)}), {remaining:.0f} s left")
            time.sleep(min(WAIT_POLL_SECONDS, remaining))


@app.command("undrain")
def undrain(
    host: HostArg,
    env: EnvOption = "lab",
    transport: TransportOption = "ssh",
) -> None:
    """Let HOST take agent tasks again.

    Removes HOST's drain marker. Undraining a host that is not drained changes nothing."""
    from primespark.agents.drain import check_host
    from primespark.agents.drain import undrain as undrain_on
    from primespark.context import FleetContext
    from primespark.fleet.loader import resolve

    ctx = FleetContext.load(env, transport_of(transport))
    check_host(ctx.fleet, str(resolve(env)), host)
    done = undrain_on(ctx.hosts, host)
    if done.changed:
        note = escape(str(done.note))
        console.print(f"[bold]{host}: undrained[/bold] (it was drained {note}). Agent tasks may be placed on it "
                      "again.", highlight=False)
    else:
        console.print(f"{host}: not drained; nothing changed", highlight=False)


@app.command("ls")
def ls(
    env: EnvOption = "lab",
    transport: TransportOption = "ssh",
) -> None:
    """Each host: reachable, drained, quiet, as agent-task placement reads them now.

    Read on every host in parallel: reachable or why not, drained (since when, by whom, why), quiet (the fleet's
    quiet hours, or the host's pause marker /run/spark/quiet) and its facts (CPUs and memory free, or why
    placement cannot read them). A KVM host runs no tasks."""
    from primespark.agents.facts import facts_of, read_reading
    from primespark.agents.placement import Unavailable, quiet_until
    from primespark.context import FleetContext
    from primespark.fleet.model import HostKind
    from primespark.hosts import on_each

    ctx = FleetContext.load(env, transport_of(transport))
    fleet = ctx.fleet
    names = sorted(fleet.hosts)
    readings = on_each(names, lambda h: read_reading(ctx.hosts, fleet, h, (), LS_TIMEOUT_SECONDS))
    local = datetime.now(UTC).astimezone(ZoneInfo(fleet.timezone))
    table = Table(title=f"hosts of {ctx.env} at {local:%Y-%m-%d %H:%M %Z}")
    for column in ("host", "site", "reachable", "drained", "quiet", "facts"):
        table.add_column(column, overflow="fold")
    for name in names:
        spec, reading = fleet.hosts[name], readings[name]
        until = quiet_until(spec, local.time())
        quiet = [f"quiet hours until {until}"] if until else []
        if isinstance(reading, Unavailable):
            table.add_row(name, spec.site, f"[red]no[/red]: {escape(reading.reason)}", "unknown",
                          ", ".join(quiet) or "unknown", "-")
            continue
        if reading.paused:
            quiet.append("paused (/run/spark/quiet)")
        drained = f"[yellow]yes[/yellow], {escape(str(reading.drain))}" if reading.drained else "no"
        if spec.kind is HostKind.kvm_host:
            facts = "a KVM host runs VMs, not tasks"
        else:
            found = facts_of(fleet, name, reading, worker_ready=True)
            facts = (f"unavailable: {escape(found.reason)}" if isinstance(found, Unavailable) else
                     f"{found.cpus_free:.1f} CPUs free, {found.memory_free_mb} MiB free")
        table.add_row(name, spec.site, "[green]yes[/green]", drained, ", ".join(quiet) or "no", facts)
    console.print(table)
