"""Work pools, workers and agent-task runs as node-exporter textfile metrics, read from the fleet's Prefect API:
`python -m primespark.monitoring.prefect_export --textfile-dir DIR [--pool spark-edge ...] [--template NAME ...]`.

Prefect's server exports only HTTP counters, so this reads its REST API (stdlib HTTP: no Prefect import, a few
hundred milliseconds each minute on the server's host) with a deadline per request. The address and the auth string
come from the environment (PREFECT_API_URL, PREFECT_API_AUTH_STRING), never the command line. Every pool and
template named is written, with 0 where there is nothing to count, so dashboards and alerts have data.

A server that cannot be read (down, refusing the auth string, answering garbage) is one line on stderr and exit 1,
and the previous file is left as it was: its timestamp then goes stale, which WorkerPoolNotReady's no-data rule
catches. The file is written whole (a temporary file and a rename).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from primespark.errors import UserError
from primespark.monitoring import metrics as m
from primespark.orchestration.agent_runs import FLOW
from primespark.orchestration.api import api_context

NAME = "prefect_export"  # the file: primespark_prefect_export.prom
INLINE = "(inline)"  # the template label of a run of an inline spec
PAGE = 200  # the API's largest page
TIMEOUT = 10.0


@dataclass
class Export:
    ready: dict[str, bool] = field(default_factory=dict)
    workers: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    running: dict[str, int] = field(default_factory=dict)
    at: float = 0.0

    def textfile(self) -> m.Textfile:
        out = m.Textfile(m.WORK_POOL_READY, m.WORK_POOL_WORKERS, m.AGENT_TASK_FAILED, m.AGENT_TASK_RUNNING,
                         m.PREFECT_EXPORT_TIME)
        for pool in sorted(self.ready):
            out.set(m.WORK_POOL_READY, 1.0 if self.ready[pool] else 0.0, pool=pool)
            out.set(m.WORK_POOL_WORKERS, self.workers.get(pool, 0), pool=pool)
        for template in sorted(set(self.failed) | set(self.running)):
            out.set(m.AGENT_TASK_FAILED, self.failed.get(template, 0), template=template)
            out.set(m.AGENT_TASK_RUNNING, self.running.get(template, 0), template=template)
        out.set(m.PREFECT_EXPORT_TIME, self.at)
        return out


class Api:
    """POST/GET JSON on the Prefect REST API, each request with a deadline; failures are one UserError."""

    def __init__(self, url: str, auth: str | None, timeout: float = TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json"}
        if auth:
            self.headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, missing_ok: bool = False) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method,  # noqa: S310
                                         headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout,  # noqa: S310 (the fleet's server)
                                        context=api_context(self.url)) as reply:
                return json.load(reply)
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and missing_ok:
                return None
            if exc.code == 401:
                raise UserError(f"the Prefect server at {self.url} refused the API auth string (401)",
                                "PREFECT_API_AUTH_STRING must be the server's (its env file)") from None
            raise UserError(f"the Prefect server at {self.url} answered HTTP {exc.code} to {path}",
                            "see the server's log") from None
        except (OSError, ValueError) as exc:  # refused, timed out, not JSON
            raise UserError(f"the Prefect server at {self.url} is unreachable: {getattr(exc, 'reason', None) or exc}",
                            "start it (site.yml's prefect_server play), or fix PREFECT_API_URL") from None


def _template(run: dict[str, Any]) -> str:
    template = (run.get("parameters") or {}).get("template")
    return str(template) if template else INLINE


def _runs(api: Api, flow_runs: dict[str, Any]) -> list[dict[str, Any]]:
    """Every agent-task run matching `flow_runs` (a FlowRunFilter as JSON), page by page."""
    found: list[dict[str, Any]] = []
    while True:
        page = api.call("POST", "/flow_runs/filter", {"flows": {"name": {"any_": [FLOW]}}, "flow_runs": flow_runs,
                                                      "limit": PAGE, "offset": len(found)})
        if not isinstance(page, list):
            raise UserError(f"the Prefect server at {api.url} answered /flow_runs/filter with no list",
                            "check that PREFECT_API_URL is the fleet's Prefect API (…/api)")
        found += page
        if len(page) < PAGE:
            return found


def _count(runs: list[dict[str, Any]], templates: list[str]) -> dict[str, int]:
    counts = dict.fromkeys([*templates, INLINE], 0)  # every template with its 0, so a panel has data
    for run in runs:
        counts[_template(run)] = counts.get(_template(run), 0) + 1
    return counts


def read(api: Api, pools: list[str], templates: list[str], now: datetime | None = None) -> Export:
    """The pools (all the server has, when none are named), their online workers, and agent-task runs."""
    now = now or datetime.now(UTC)
    out = Export(at=now.timestamp())
    if not pools:
        found = api.call("POST", "/work_pools/filter", {"limit": PAGE})
        pools = sorted(str(p["name"]) for p in found or [])
    for pool in pools:
        quoted = urllib.parse.quote(pool, safe="")
        found = api.call("GET", f"/work_pools/{quoted}", missing_ok=True)
        # READY: a worker online and not paused; NOT_READY, PAUSED, or no pool at all are not ready
        out.ready[pool] = found is not None and found.get("status") == "READY"
        workers = [] if found is None else api.call("POST", f"/work_pools/{quoted}/workers/filter",
                                                    {"workers": {"status": {"any_": ["ONLINE"]}}, "limit": PAGE})
        out.workers[pool] = len(workers or [])
    since = (now - timedelta(seconds=m.AGENT_FAILURE_WINDOW_SECONDS)).isoformat()
    out.failed = _count(_runs(api, {"state": {"type": {"any_": ["FAILED", "CRASHED"]}},
                                    "end_time": {"after_": since}}), templates)
    out.running = _count(_runs(api, {"state": {"type": {"any_": ["RUNNING"]}}}), templates)
    return out


def export(textfile_dir: Path, pools: list[str], templates: list[str], timeout: float = TIMEOUT) -> Path:
    url = os.environ.get("PREFECT_API_URL", "").strip()
    if not url:
        raise UserError("PREFECT_API_URL is not set: the export does not know which server to read",
                        "run it with the server's environment (the prefect_server role's cron file does)")
    if not textfile_dir.is_dir():
        raise UserError(f"{textfile_dir} is not a folder", "give the node exporter's textfile directory "
                        "(the monitoring_agent role makes it)")
    try:
        found = read(Api(url, os.environ.get("PREFECT_API_AUTH_STRING") or None, timeout), pools, templates)
    except (AttributeError, KeyError, TypeError) as exc:  # JSON, but not the shape Prefect's API answers with
        raise UserError(f"the server at {url} answered in a shape that is not the Prefect API's ({exc!r})",
                        "check that PREFECT_API_URL is the fleet's Prefect API (…/api)") from None
    return found.textfile().write(m.textfile_path(textfile_dir, NAME))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--textfile-dir", type=Path, required=True, help="The node exporter's textfile directory.")
    parser.add_argument("--pool", action="append", default=[], help="A work pool of the fleet (repeat); "
                        "default: every pool on the server.")
    parser.add_argument("--template", action="append", default=[], help="An agent-task template of the fleet "
                        "(repeat): written with 0 when it has no runs.")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="Seconds per API request.")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        export(args.textfile_dir, args.pool, args.template, args.timeout)
    except UserError as exc:
        # one line (cron mails or logs it); the previous file stays and goes stale
        print(f"prefect_export: {exc.message} ({exc.fix}; after {time.monotonic() - started:.1f} s)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
