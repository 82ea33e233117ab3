"""`spark sync ls|run|status|check|watch`: the fleet's sync jobs, a pass now, where each link stands."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.table import Table

from primespark.cli.common import EnvOption, TransportOption, console, transport_of
from primespark.context import FleetContext
from primespark.data import sync as core
from primespark.data.layout import links
from primespark.data.transfer import human_size, rate_kib
from primespark.errors import UserError
from primespark.hosts import on_each

app = typer.Typer(help="One-way sync jobs between hosts: list them, run one now, see how far behind they are.",
                  no_args_is_help=True)

JobArg = Annotated[str, typer.Argument(help="A sync job of the fleet (`spark sync ls`).")]
SourceOption = Annotated[str | None, typer.Option("--source", help="Only the link from this source host.")]


def _ago(when: float | None, now: float) -> str:
    if when is None:
        return "never"
    seconds = max(0.0, now - when)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _size(value: int | None) -> str:
    return "—" if value is None else human_size(value)


@app.command("ls")
def ls(env: EnvOption = "lab") -> None:
    """Every job and its links: source → destination, mode, when it runs, its bandwidth and deletion limits."""
    ctx = FleetContext.load(env)
    if ctx.fleet.sync is None:
        console.print(f"fleet {ctx.fleet.name} has no sync jobs (add a `sync:` section)")
        return
    table = Table(title=f"sync jobs in {ctx.env}")
    for column in ("job", "mode", "source", "destination", "runs", "bandwidth", "max delete"):
        table.add_column(column, overflow="fold")
    for name, job in ctx.fleet.sync.jobs.items():
        runs = ", ".join([*(["continuous"] if job.continuous else []), *([job.schedule] if job.schedule else [])])
        bandwidth = ", ".join(f"{t} {r}" for t, r in sorted(job.bandwidth.items())) or "no limit"
        if job.pause_in_quiet_hours:
            bandwidth += "; paused in quiet hours"
        for link in links(ctx.fleet, name):
            table.add_row(name, job.mode.value, f"{link.source}:{link.source_path}",
                          f"{link.destination}:{link.destination_path}", runs or "on demand", bandwidth,
                          str(job.deletion_limit) if job.mode.value == "mirror" else "—")
    console.print(table)


def _print_passes(result: dict[str, Any]) -> None:
    table = Table(title=f"sync {result['job']}")
    for column in ("link", "pass", "status", "sent", "bytes", "deleted", "skipped", "verified", "differing",
                   "lag max"):
        table.add_column(column)
    for row in result["links"]:
        lag = "—" if row["lag_max"] is None else f"{row['lag_max']:.1f} s"
        table.add_row(f"{row['source']} → {row['destination']}", row["kind"], row["status"], str(row["files_sent"]),
                      human_size(row["bytes_sent"]), str(row["deleted"]), str(row["skipped"]), str(row["verified"]),
                      str(row["differing"]), lag)
    console.print(table)
    for row in result["links"]:
        if row["deletions"]:
            console.print(f"{row['source']} → {row['destination']}: would delete {row['deletion_count']}:")
            for path in row["deletions"]:
                console.print(f"  - {path}")
        if row["kind"] == "dry-run" and row["sent"]:
            console.print(f"{row['source']} → {row['destination']}: would send {row['files_sent']}:")
            for path in row["sent"][:50]:
                console.print(f"  + {path}")


@app.command("run")
def run(
    job: Annotated[str | None, typer.Argument(help="A sync job (`spark sync ls`); every job, in the fleet's order, "
                                              "if omitted.")] = None,
    env: EnvOption = "lab",
    source: SourceOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would change; change nothing.")] = False,
    bwlimit: Annotated[str | None, typer.Option(help="This run's rate, not the timetable's: 2M, 500K, off.")] = None,
    accept_empty_source: Annotated[bool, typer.Option(
        "--accept-empty-source", help="A mirror's source really was emptied: let it delete what it held.")] = False,
    transport: TransportOption = "ssh",
    as_json: Annotated[bool, typer.Option("--json", help="Print each run's result as one JSON line.")] = False,
) -> None:
    """A full pass of JOB now, here (every link, or `--source`'s): probe, transfer, delete (a mirror), verify."""
    ctx = FleetContext.load(env, transport_of(transport))
    jobs = [job] if job is not None else list(ctx.fleet.sync.jobs) if ctx.fleet.sync else []
    if not jobs:
        raise UserError(f"fleet {ctx.fleet.name} has no sync jobs", "add a `sync:` section to the fleet file")
    if source is not None and job is None:
        raise UserError("--source needs a JOB", "name the job: `spark sync run JOB --source HOST`")
    for name in jobs:  # a clear error for an unknown job or source, before Prefect loads
        core.links_of(ctx.fleet, name, source)
    if bwlimit is not None and bwlimit != "off":
        try:
            rate_kib(bwlimit)
        except ValueError:
            raise UserError(f"--bwlimit {bwlimit!r} is not a rate", "write e.g. 2M, 500K or off") from None
    from flows.sync import sync
    from primespark.orchestration.runs import record_runs, run_here

    record_runs(ctx)
    for name in jobs:
        result = run_here(sync, name, env, transport, source=source, dry_run=dry_run, bwlimit=bwlimit,
                          accept_empty_source=accept_empty_source)
        if as_json:
            typer.echo(json.dumps(result))
        else:
            _print_passes(result)


@app.command("status")
def status(
    job: Annotated[str | None, typer.Argument(help="One job; every job if omitted.")] = None,
    env: EnvOption = "lab",
    transport: TransportOption = "ssh",
) -> None:
    """Each link's last success, lag and pending changes (a dry run on the source host now).

    The lag is how far the destination is behind: the age of the oldest change not there yet."""
    ctx = FleetContext.load(env, transport_of(transport))
    if job is not None:
        core.job_of(ctx.fleet, job)
    selected = [link for link in links(ctx.fleet, job)]
    if not selected:
        console.print(f"fleet {ctx.fleet.name} has no sync jobs")
        return
    now = time.time()
    rows = on_each([link.name for link in selected],
                   lambda name: core.status_of(ctx, next(lk for lk in selected if lk.name == name), now))
    table = Table(title=f"sync status in {ctx.env}")
    for column in ("job", "link", "last success", "last pass", "lag", "pending", "pending bytes", "to delete"):
        table.add_column(column, overflow="fold")
    for row in rows.values():
        lag = "—" if row.lag_seconds is None else f"{row.lag_seconds:.0f} s"
        pending = row.error or ("—" if row.pending_files is None else str(row.pending_files))
        table.add_row(row.job, f"{row.source} → {row.destination}", _ago(row.last_success, now), row.last_status,
                      lag, pending, _size(row.pending_bytes),
                      "—" if row.pending_deletions is None or row.mode != "mirror" else str(row.pending_deletions),
                      style="red" if row.error or row.last_status in ("failed", "refused") else None)
    console.print(table)


@app.command("check")
def check(
    job: JobArg,
    env: EnvOption = "lab",
    repair: Annotated[bool, typer.Option(help="Send what is missing or differs again.")] = False,
    transport: TransportOption = "ssh",
) -> None:
    """Compare every file of JOB by size and XXH3-128 at both ends (like `rclone check`)."""
    ctx = FleetContext.load(env, transport_of(transport))
    core.job_of(ctx.fleet, job)
    from flows.sync import sync_check
    from primespark.orchestration.runs import record_runs, run_here

    record_runs(ctx)
    result = run_here(sync_check, job, env, transport, repair=repair)
    table = Table(title=f"sync check {job}")
    for column in ("link", "files", "matched", "missing", "differing", "stale", "extra"):
        table.add_column(column)
    for row in result["links"]:
        table.add_row(row["link"], str(row["source_files"]), str(row["matched"]), str(len(row["missing"])),
                      str(len(row["differing"])), str(len(row["stale"])),
                      "—" if row["extra"] is None else str(len(row["extra"])))
    console.print(table)
    if any(row["missing"] or row["differing"] or row["extra"] for row in result["links"]) and not repair:
        raise UserError(f"sync {job}: the destination differs from the source",
                        f"the next pass sends what is missing; `spark sync check {job} --repair` re-sends what differs")


@app.command("watch")
def watch(
    job: JobArg,
    env: EnvOption = "lab",
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds (default: until ^C).")] = None,
    transport: TransportOption = "ssh",
) -> None:
    """Run JOB continuously here, in the foreground (on a worker it runs as the `sync-watch-JOB` deployment)."""
    ctx = FleetContext.load(env, transport_of(transport))
    core.job_of(ctx.fleet, job)
    from flows.sync import sync_watch
    from primespark.orchestration.runs import record_runs, run_here

    record_runs(ctx)
    result = run_here(sync_watch, job, env, transport, duration_seconds=duration)
    console.print(result)
