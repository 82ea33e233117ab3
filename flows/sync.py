"""Sync flows: `sync` (one pass over every link of a job, or one link), `sync-watch` (a continuous job: watchers on
the source hosts, a pass whenever changes are due) and `sync-check` (the full checksum compare).

Each pass: probe → transfer → (a mirror's full pass) delete → verify → flush, one task per core step of
`primespark.data.sync`, inside the link's lock; then the link's state, its metrics and the report artifact.
A refused pass (a missing, unmounted or emptied source; more deletions than max_delete) changes nothing at the
destination, says why, and publishes what it held back.
"""

from __future__ import annotations

import contextvars
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from primespark.context import FleetContext, Transport
from primespark.data import sync as core
from primespark.data.layout import Link
from primespark.data.transfer import Item, TransferReport
from primespark.data.watch import Batch, Watches
from primespark.errors import StepFailed, UserError
from primespark.fleet.model import FsyncMode
from primespark.monitoring.metrics import Textfile, publish, sync_metrics
from primespark.orchestration import auditing
from primespark.orchestration.auditing import audited
from primespark.orchestration.inputs import as_is
from primespark.orchestration.locks import BurstHolder, hold, sync_lock
from primespark.orchestration.retries import retrying, transient
from primespark.orchestration.runs import RunStillWanted


class SyncFailed(UserError):
    """A run with a link that failed or was refused (the report says which and why)."""


@task(name="sync-probe", cache_policy=NO_CACHE, retry_condition_fn=transient)
def probe_source(ctx: FleetContext, link: Link) -> core.Probe:
    return core.probe(ctx, link)


@task(name="sync-transfer", cache_policy=NO_CACHE, retry_condition_fn=transient)
def transfer(ctx: FleetContext, link: Link, found: core.Probe, files: list[str] | None, dry_run: bool,
             bwlimit: str | None, accept_empty: bool) -> TransferReport:
    logger = get_run_logger()
    return core.transfer_link(ctx, link, found, files=files, dry_run=dry_run, bwlimit=bwlimit,
                              accept_empty=accept_empty,
                              progress=lambda so_far: logger.info("%s", core.progress_line(link, so_far)))


@task(name="sync-delete", cache_policy=NO_CACHE, retry_condition_fn=transient)
def delete(ctx: FleetContext, link: Link, transferred: TransferReport, accept_empty: bool) -> TransferReport | None:
    return core.delete_link(ctx, link, transferred, accept_empty)


@task(name="sync-verify", cache_policy=NO_CACHE, retry_condition_fn=transient)
def verify(ctx: FleetContext, link: Link, sent: list[Item]) -> core.Verification:
    return core.verify_link(ctx, link, sent)


@task(name="sync-flush", cache_policy=NO_CACHE, retry_condition_fn=transient)
def flush(ctx: FleetContext, link: Link, report: TransferReport | None, deleted: TransferReport | None,
          flushed_boot: str | None = None) -> None:
    core.flush_pass(ctx, link, report, deleted, flushed_boot)


@task(name="sync-resend", cache_policy=NO_CACHE, retry_condition_fn=transient)
def resend(ctx: FleetContext, link: Link, files: list[str]) -> TransferReport:
    return core.resend(ctx, link, files)


@task(name="sync-check", cache_policy=NO_CACHE, retry_condition_fn=transient)
def check(ctx: FleetContext, link: Link) -> core.CheckResult:
    return core.check_link(ctx, link)


def _verified(ctx: FleetContext, link: Link, report: TransferReport, options: dict[str, Any]) -> core.Verification:
    """Verify what was sent; what differs is sent again by content, then must verify."""
    verification = verify.with_options(**options)(ctx, link, as_is(report.sent))
    if verification.differing:
        get_run_logger().warning("%s: %d file(s) differ after the transfer: sending them again by content",
                                 link.name, len(verification.differing))
        again_sent = resend.with_options(**options)(ctx, link, as_is(verification.differing))
        again = verify.with_options(**options)(ctx, link, as_is(again_sent.sent))
        if again.differing:
            raise core.VerificationFailed(link, again.differing)
        verification.changed_since += again.changed_since
        verification.boot = again.boot  # the flush that covers the files sent again too (or none)
    return verification


def link_pass(ctx: FleetContext, link: Link, *, kind: str, options: dict[str, Any], files: list[str] | None = None,
              changed_at: dict[str, float] | None = None, dry_run: bool = False, bwlimit: str | None = None,
              accept_empty: bool = False, textfile: str | None = None, locked: bool = False) -> core.PassResult:
    """One pass over one link, holding its lock (`locked`: the caller holds it); recorded (state, metrics) unless
    it is a dry run. A failure is recorded and raised; a refusal or a pause is recorded and returned."""
    started = time.time()
    found = None
    try:
        with nullcontext() if locked else hold(sync_lock(link.job, link.source)):
            found = probe_source.with_options(**options)(ctx, link)
            report = transfer.with_options(**options)(ctx, link, found, as_is(files), dry_run, bwlimit, accept_empty)
            if dry_run:
                return core.pass_result(link, "dry-run", started, report)
            deleted = delete.with_options(**options)(ctx, link, as_is(report), accept_empty) if files is None else None
            verification = _verified(ctx, link, report, options)
            flush.with_options(**options)(ctx, link, as_is(report), as_is(deleted), verification.boot)
        result = core.pass_result(link, kind, started, report, deleted, verification, changed_at)
    except core.SyncRefused as refusal:
        result = core.refused_result(link, kind, started, refusal)
    except core.SyncPaused as paused:
        result = core.PassResult(link.job, link.source, link.destination, kind, "paused", started, time.time(),
                                 reason=str(paused))
    except Exception as exc:
        if dry_run:
            raise
        failed = core.PassResult(link.job, link.source, link.destination, kind, "failed", started, time.time(),
                                 reason=str(exc))
        _publish_link(ctx, link, failed, None, textfile)
        raise
    if not dry_run:
        _publish_link(ctx, link, result, found, textfile)
    return result


def _publish_link(ctx: FleetContext, link: Link, result: core.PassResult, found: core.Probe | None,
                  textfile: str | None) -> None:
    state = core.record(ctx, link, result, found)
    _publish_metrics(ctx, link, textfile, sync_metrics(
        link.job, link.source, success=state.succeeded,
        finished=result.finished, last_success=state.last_success, lag_seconds=state.lag_seconds,
        sent_bytes=result.bytes_sent, sent_files=result.files_sent, deleted_files=result.deleted,
        differing_files=result.differing, errors_total=state.errors_total, refusals_total=state.refusals_total,
        check_finished=state.last_check,
        check_bad_files=None if state.check_differing is None else state.check_differing + (state.check_missing or 0)))


def _publish_metrics(ctx: FleetContext, link: Link, textfile: str | None, metrics: Textfile) -> None:
    """On the source host, whose node exporter serves them; a host that cannot take them is a warning (the pass's
    own outcome stands, and a host gone quiet raises its own alert)."""
    try:
        publish(ctx.hosts, ctx.fleet, link.source, f"sync_{link.job}_{link.source}", metrics, textfile)
    except StepFailed as exc:
        get_run_logger().warning("sync metrics of %s from %s not published: %s", link.job, link.source, exc)


def publish_report(job: str, results: list[core.PassResult]) -> None:
    """The run's report; what a mirror held back (or would delete, in a dry run) as an artifact of its own."""
    create_markdown_artifact(core.render_passes(job, results), key=f"sync-{job}", description=f"sync {job}")
    held = [r for r in results if r.deletions and r.status != "succeeded"]
    if held:
        create_markdown_artifact(core.render_passes(job, held), key=f"sync-{job}-held-deletions",
                                 description=f"sync {job}: deletions held back (a dry run of them)")


def _in_threads(fn: Any, items: list[Any]) -> list[Future[Any]]:
    """Run `fn(item)` for each item in threads that see this flow run (Prefect keeps its context in contextvars)."""
    pool = ThreadPoolExecutor(max_workers=max(1, min(8, len(items))))
    futures = [pool.submit(contextvars.copy_context().run, fn, item) for item in items]
    pool.shutdown(wait=True)
    return futures


@flow(name="sync", flow_run_name="sync-{job}", log_prints=True)
@audited(auditing.sync_links, destructive=auditing.mirror_past_guard)
def sync(
    job: str,
    env: str = "lab",
    transport: Transport = "ssh",
    source: str | None = None,
    dry_run: bool = False,
    bwlimit: str | None = None,
    accept_empty_source: bool = False,
    retries: int = 2,
    retry_delay_seconds: float = 10.0,
    textfile: str | None = None,
) -> dict[str, Any]:
    """A full pass over every link of `job` (or the one from `source`). `bwlimit` overrides the timetable for this
    run (`off`, `2M`, …); `dry_run` lists what would change and changes nothing."""
    ctx = FleetContext.load(env, transport)
    selected = core.links_of(ctx.fleet, job, source)
    options = retrying(retries, retry_delay_seconds)
    kind = "dry-run" if dry_run else "full"
    futures = _in_threads(lambda link: link_pass(ctx, link, kind=kind, options=options, dry_run=dry_run,
                                                 bwlimit=bwlimit, accept_empty=accept_empty_source,
                                                 textfile=textfile), selected)
    results, errors = [], []
    for link, future in zip(selected, futures, strict=True):
        try:
            results.append(future.result())
        except Exception as exc:
            errors.append(f"{link.name}: {exc}")
            results.append(core.PassResult(link.job, link.source, link.destination, kind, "failed", time.time(),
                                           time.time(), reason=str(exc)))
    publish_report(job, results)
    summary = {"job": job, "links": [asdict(r) for r in results]}
    bad = [r for r in results if r.status in ("refused", "failed")]
    if bad:
        raise SyncFailed(f"sync {job}: " + "; ".join(r.reason.splitlines()[0] for r in bad),
                         bad[0].reason.partition("fix: ")[2] or "see the run's report artifact")
    return summary


@flow(name="sync-check", flow_run_name="sync-check-{job}", log_prints=True)
@audited(auditing.sync_links)
def sync_check(
    job: str,
    env: str = "lab",
    transport: Transport = "ssh",
    repair: bool = True,
    retries: int = 2,
    retry_delay_seconds: float = 10.0,
    textfile: str | None = None,
) -> dict[str, Any]:
    """Compare every file of every link by size and XXH3-128 at both ends (like `rclone check`); with `repair`,
    send what is missing or differs again, by content."""
    ctx = FleetContext.load(env, transport)
    selected = core.links_of(ctx.fleet, job)
    options = retrying(retries, retry_delay_seconds)

    def one(link: Link) -> core.CheckResult:
        with hold(sync_lock(link.job, link.source)):
            result = check.with_options(**options)(ctx, link)
            if repair and (result.missing or result.differing):
                if core.job_of(ctx.fleet, job).fsync is FsyncMode.pass_:
                    core.settle(ctx, link, core.load_state(ctx, link))
                sent = resend.with_options(**options)(ctx, link, as_is([*result.missing, *result.differing]))
                flush.with_options(**options)(ctx, link, as_is(sent), None)
        state = core.record_check(ctx, link, result)
        _publish_metrics(ctx, link, textfile, sync_metrics(
            link.job, link.source, success=state.succeeded,
            finished=state.last_run or time.time(), last_success=state.last_success, lag_seconds=state.lag_seconds,
            sent_bytes=state.bytes_sent, sent_files=state.files_sent, deleted_files=state.deleted,
            differing_files=state.differing, errors_total=state.errors_total, refusals_total=state.refusals_total,
            check_finished=state.last_check, check_bad_files=len(result.missing) + len(result.differing)))
        return result

    results = [f.result() for f in _in_threads(one, selected)]
    create_markdown_artifact(core.render_check(job, results), key=f"sync-check-{job}",
                             description=f"full checksum compare of sync {job}")
    return {"job": job, "repaired": repair, "links": [asdict(r) for r in results]}


@flow(name="sync-watch", flow_run_name="sync-watch-{job}", log_prints=True)
@audited(auditing.sync_links)
def sync_watch(
    job: str,
    env: str = "lab",
    transport: Transport = "ssh",
    duration_seconds: float | None = None,
    quiet_seconds: float = 1.0,
    max_wait_seconds: float = 5.0,
    rescan_seconds: float = 3600.0,
    retries: int = 2,
    retry_delay_seconds: float = 5.0,
    textfile: str | None = None,
    state_check_seconds: float = 30.0,
) -> dict[str, Any]:
    """Keep `job` in sync continuously: a watcher on each source host, a full pass when it starts (and whenever
    it restarts, and every `rescan_seconds`), then a pass of the changed files once they are due. Runs until
    cancelled, or for `duration_seconds`. A quiet source makes no passes between those full ones; each pass that
    moved something publishes its report. Every `state_check_seconds` it asks the server whether the run is still
    wanted, and stops once it is cancelled or marked crashed (a replacement may be starting: never two at once);
    the run then ends Cancelled.
    A link's lock is kept across a burst of passes (`BurstHolder`)."""
    logger = get_run_logger()
    ctx = FleetContext.load(env, transport)
    selected = core.links_of(ctx.fleet, job)
    options = retrying(retries, retry_delay_seconds)
    watches = Watches(ctx, selected, quiet_seconds, max_wait_seconds, rescan_seconds)
    ready = watches.start()
    logger.info("watching %s", ", ".join(f"{n} ({'ready' if ok else 'not ready'})" for n, ok in ready.items()))
    totals = {"passes": 0, "full_passes": 0, "files_sent": 0, "bytes_sent": 0, "refused": 0, "failed": 0}
    deadline = None if duration_seconds is None else time.monotonic() + duration_seconds
    # one thread per link, holding the link's lock across a burst of passes (a take per pass could stall)
    passers = {link.name: BurstHolder(sync_lock(link.job, link.source), label=link.name) for link in selected}
    running: dict[str, tuple[Future[core.PassResult], Batch]] = {}
    wanted = RunStillWanted(state_check_seconds)

    def run_batch(link: Link, batch: Batch) -> core.PassResult:
        result = link_pass(ctx, link, kind="full" if batch.full else "changes", options=options,
                           files=None if batch.full else sorted(batch.changed), changed_at=batch.changed,
                           textfile=textfile, locked=True)
        if result.files_sent or result.deleted or result.status != "succeeded":
            publish_report(job, [result])
        return result

    try:
        while (deadline is None or time.monotonic() < deadline) and wanted.unwanted is None:
            for name, (future, batch) in list(running.items()):
                if future.done():
                    del running[name]
                    ok = _tally(totals, future, batch, logger)
                    watches.links[name].passed(batch, ok)
            for watch, batch in watches.due(set(running)):
                logger.info("%s: %s pass (%s)", watch.link.name, "full" if batch.full else "changes", batch.why)
                running[watch.link.name] = (passers[watch.link.name].submit(run_batch, watch.link, batch), batch)
            watches.wait(0.25)
    finally:
        wanted.close()
        watches.stop()
        for passer in passers.values():
            passer.close()
        for future, batch in running.values():
            _tally(totals, future, batch, logger)
    if wanted.unwanted is not None:
        logger.warning("the server holds this run %s: the watch stopped", wanted.unwanted)
    return wanted.final_state({"job": job, **totals})  # a Cancelled state once the run was not wanted


def _tally(totals: dict[str, int], future: Future[core.PassResult], batch: Batch, logger: Any) -> bool:
    try:
        result = future.result()
    except Exception as exc:
        totals["failed"] += 1
        logger.warning("pass failed (%s): %s", batch.why, exc)
        return False
    totals["passes"] += 1
    totals["full_passes"] += int(batch.full)
    totals["files_sent"] += result.files_sent
    totals["bytes_sent"] += result.bytes_sent
    if result.status == "refused":
        totals["refused"] += 1
        logger.warning("%s", result.reason)
    return result.status == "succeeded"
