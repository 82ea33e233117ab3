"""`spark status`: the fleet at a glance, from Prometheus' HTTP API — hosts up, mesh pairs, the last backup and
drill of every host against the RPO, sync lag per link, tier fill, work pools, agent tasks running and failed, and
the alerts firing. What it reads is what the alerts read (the same registry, the same recording rules, the same
staleness limit of the Prefect export), so the terminal and the pager cannot disagree."""

from __future__ import annotations

import json
import math
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from primespark.errors import UserError
from primespark.fleet.model import Fleet, ServiceKind, Severity
from primespark.monitoring import metrics as m
from primespark.monitoring.alerts import EXPORT_STALE_SECONDS
from primespark.monitoring.promql import selector
from primespark.monitoring.scrape import NODE_JOB, monitored_hosts
from primespark.pki import serves_tls


@dataclass(frozen=True)
class Sample:
    labels: dict[str, str]
    value: float


class PrometheusApi:
    """The few calls `spark status` needs, over HTTP (stdlib), each with a deadline; over https, verified with
    `context` (the fleet CA's: `primespark.pki.client_context`)."""

    def __init__(self, url: str, timeout: float = 10.0, context: ssl.SSLContext | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.context = context

    def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=self.timeout,  # noqa: S310
                                        context=self.context) as reply:
                body = json.load(reply)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise UserError(f"Prometheus at {self.url} refused {path}: HTTP {exc.code} {detail}",
                            "check the query and Prometheus' log") from None
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read Prometheus at {self.url}: {exc}",
                            "check that the fleet's prometheus service runs and that this machine reaches it "
                            "(or point --prometheus at it)") from None
        if body.get("status") != "success":
            raise UserError(f"Prometheus at {self.url} answered {path} with an error: {body.get('error')}",
                            "check Prometheus' log")
        return body["data"]

    def query(self, expr: str) -> list[Sample]:
        data = self._get("/api/v1/query", {"query": expr})
        return [Sample(dict(r["metric"]), float(r["value"][1])) for r in data.get("result", [])]

    def alerts(self) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/alerts").get("alerts", []))


def prometheus_url(fleet: Fleet) -> str:
    service = next((s for _, s in sorted(fleet.services.items()) if s.kind is ServiceKind.prometheus), None)
    if service is None:
        raise UserError(f"fleet {fleet.name} places no prometheus service, so there is nothing to ask",
                        "add a service of kind prometheus to the fleet")
    return service_url(fleet, service.host, service.port)


def service_url(fleet: Fleet, host: str, port: int) -> str:
    """Where the controller reaches a fleet service: its host's LAN address, over https where it serves TLS (the
    address is in its certificate)."""
    scheme = "https" if serves_tls(fleet) else "http"
    return f"{scheme}://{fleet.hosts[host].address}:{port}"


@dataclass(frozen=True)
class FiringAlert:
    name: str
    severity: str
    host: str
    summary: str


@dataclass
class FleetStatus:
    fleet: str
    hosts: dict[str, float | None] = field(default_factory=dict)  # host → up (1/0), None: not scraped
    pairs: list[tuple[str, str, str, bool, float | None]] = field(default_factory=list)  # mesh, source, target, up, age
    backups: dict[str, dict[str, float]] = field(default_factory=dict)  # host → success, age
    drills: dict[str, dict[str, float]] = field(default_factory=dict)  # host → success, age
    tiers: list[tuple[str, str, float]] = field(default_factory=list)  # host, tier, fill
    # (job, source) → success of the last pass, its lag, time since the last success (nan: no data)
    sync: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    # pool → ready, workers online; nan for both where the export is missing or stale (never "ready" then)
    pools: dict[str, dict[str, float]] = field(default_factory=dict)
    export_age: float | None = None  # seconds since the Prefect export read the server; None: no Prefect server
    tasks_running: dict[str, float] = field(default_factory=dict)  # template → runs running now
    tasks_failed: dict[str, float] = field(default_factory=dict)  # template → failed or crashed in the window
    alerts: list[FiringAlert] = field(default_factory=list)
    rpo_seconds: float | None = None
    # host → (not before, not after) of its certificate from the fleet CA; None where the fleet has no CA
    certificates: dict[str, tuple[float, float]] | None = None

    @property
    def export_fresh(self) -> bool:
        return self.export_age is not None and not math.isnan(self.export_age) and \
            self.export_age <= EXPORT_STALE_SECONDS

    @property
    def exit_code(self) -> int:
        """2 when a critical alert fires, 1 when only warnings do, 0 otherwise."""
        severities = {a.severity for a in self.alerts}
        if Severity.critical.value in severities:
            return 2
        return 1 if Severity.warning.value in severities else 0


def _by(samples: list[Sample], label: str) -> dict[str, float]:
    return {s.labels.get(label, ""): s.value for s in samples}


def gather(fleet: Fleet, api: PrometheusApi) -> FleetStatus:
    status = FleetStatus(fleet.name)
    up = _by(api.query(selector(m.UP, job=NODE_JOB)), "host")
    status.hosts = {h: up.get(h) for h in monitored_hosts(fleet)}
    ages = {s.labels.get("source", "") + "\0" + s.labels.get("target", ""): s.value
            for s in api.query(selector(m.MESH_HANDSHAKE_AGE))}
    for s in sorted(api.query(selector(m.MESH_PAIR_UP)), key=lambda s: (s.labels.get("source", ""),
                                                                          s.labels.get("target", ""))):
        source, target = s.labels.get("source", ""), s.labels.get("target", "")
        status.pairs.append((s.labels.get("mesh", ""), source, target, s.value == 1,
                             ages.get(source + "\0" + target)))
    if fleet.backup is not None:
        status.rpo_seconds = fleet.backup.targets.rpo_hours * 3600
        success = _by(api.query(selector(m.BACKUP_SUCCESS)), "host")
        age = _by(api.query(selector(m.BACKUP_AGE)), "host")
        status.backups = {h: {"success": success.get(h, math.nan), "age": age.get(h, math.nan)}
                          for h in sorted(fleet.backup.plans)}
        passed = _by(api.query(selector(m.DRILL_SUCCESS)), "host")
        since = _by(api.query(selector(m.DRILL_AGE)), "host")
        status.drills = {h: {"success": passed.get(h, math.nan), "age": since.get(h, math.nan)}
                         for h in sorted(fleet.backup.plans)}
    for s in api.query(selector(m.STORAGE_USAGE, name=("=~", "tier-.*"))):
        status.tiers.append((s.labels.get("host", ""), s.labels.get("name", "").removeprefix("tier-"), s.value))
    status.tiers.sort()
    _certificates(fleet, api, status)
    _sync(fleet, api, status)
    _orchestration(fleet, api, status)
    for alert in api.alerts():
        if alert.get("state") != "firing":
            continue
        labels, notes = alert.get("labels", {}), alert.get("annotations", {})
        status.alerts.append(FiringAlert(labels.get("alertname", "?"), labels.get("severity", "none"),
                                         labels.get("host", "-"), notes.get("summary", "")))
    status.alerts.sort(key=lambda a: ({"critical": 0, "warning": 1}.get(a.severity, 2), a.name, a.host))
    return status


def _certificates(fleet: Fleet, api: PrometheusApi, status: FleetStatus) -> None:
    """Each host's certificate as its spark-tls-renew last published it (the host's own file, not another's)."""
    from primespark.pki import HOST_TLS_FOLDER, serves_tls

    if not serves_tls(fleet):
        return
    cert = str(HOST_TLS_FOLDER / "cert.pem")
    after = _by(api.query(selector(m.TLS_NOT_AFTER, certificate=cert)), "host")
    before = _by(api.query(selector(m.TLS_NOT_BEFORE, certificate=cert)), "host")
    status.certificates = {h: (before[h], after[h]) for h in status.hosts if h in before and h in after}


def certificate_state(not_before: float, not_after: float, now: float) -> tuple[str, str]:
    """What the hosts table says of a certificate, and its colour: renewal is due at two thirds of its life
    (primespark.tls_renewer), CertificateExpiry fires under a sixth left."""
    from primespark.tls_renewer import RENEW_AT

    life, left = not_after - not_before, not_after - now
    if left <= 0:
        return f"EXPIRED {human_age(-left)} ago", "bold red"
    if life > 0 and left < life / 6:
        return f"expires in {human_age(left)}, not renewed", "bold red"
    if life > 0 and now >= not_before + life * RENEW_AT:
        return f"renewal due, expires in {human_age(left)}", "yellow"
    return f"expires in {human_age(left)}", "green"


def _by_link(samples: list[Sample]) -> dict[tuple[str, str], float]:
    return {(s.labels.get("sync_job", ""), s.labels.get("source", "")): s.value for s in samples}


def _sync(fleet: Fleet, api: PrometheusApi, status: FleetStatus) -> None:
    """Every link of the fleet's sync jobs, those that never published included (no data)."""
    from primespark.data.layout import links

    found = links(fleet)
    if not found:
        return
    success, lag = _by_link(api.query(selector(m.SYNC_SUCCESS))), _by_link(api.query(selector(m.SYNC_LAG)))
    since = _by_link(api.query(selector(m.SYNC_SUCCESS_AGE)))
    for link in found:
        key = (link.job, link.source)
        status.sync[key] = {"success": success.get(key, math.nan), "lag": lag.get(key, math.nan),
                            "since": since.get(key, math.nan)}


def _orchestration(fleet: Fleet, api: PrometheusApi, status: FleetStatus) -> None:
    """The fleet's work pools and agent-task runs, as the Prefect export last wrote them. An export older than the
    alert's limit (or none) shows its pools as unknown, never as ready."""
    if fleet.orchestration is None:
        return
    from primespark.orchestration.naming import work_pool

    ages = [s.value for s in api.query(f"time() - {selector(m.PREFECT_EXPORT_TIME)}")]
    status.export_age = min(ages) if ages else math.nan
    ready, workers = _by(api.query(selector(m.WORK_POOL_READY)), "pool"), _by(
        api.query(selector(m.WORK_POOL_WORKERS)), "pool")
    fresh = status.export_fresh
    for pool in sorted(work_pool(site) for site in fleet.orchestration.workers):
        status.pools[pool] = {"ready": ready.get(pool, math.nan) if fresh else math.nan,
                              "workers": workers.get(pool, math.nan) if fresh else math.nan}
    if fresh:
        status.tasks_running = _by(api.query(selector(m.AGENT_TASK_RUNNING)), "template")
        status.tasks_failed = _by(api.query(selector(m.AGENT_TASK_FAILED)), "template")


def human_age(seconds: float) -> str:
    if math.isnan(seconds):
        return "never"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def render(status: FleetStatus, fleet: Fleet) -> list[Any]:
    """Rich renderables, top to bottom."""
    from rich.text import Text

    out: list[Any] = [_hosts(status, fleet)]
    if status.backups:
        out.append(_backups(status))
    if status.pairs:
        out.append(_mesh(status))
    if status.sync:
        out.append(_sync_table(status, fleet))
    if status.tiers:
        out.append(_tiers(status, fleet))
    if status.export_age is not None:
        out += [_pools(status), _tasks(status)]
    out.append(_alerts(status) if status.alerts else Text("no alerts firing", "green"))
    out.append(Text(f"as of {time.strftime('%Y-%m-%d %H:%M:%S')}", "dim"))
    return out


def _table(title: str, *columns: str) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    return table


def _hosts(status: FleetStatus, fleet: Fleet) -> Any:
    from rich.text import Text

    columns = ("host", "site", "kind", "node exporter") + (("certificate",) if status.certificates is not None else ())
    table = _table(f"fleet {status.fleet}: hosts", *columns)
    now = time.time()
    for name, up in status.hosts.items():
        host = fleet.hosts[name]
        state = (Text("up", "green") if up == 1 else Text("DOWN", "bold red") if up == 0
                 else Text("not scraped", "yellow"))
        cells = [name, host.site, host.kind.value, state]
        if status.certificates is not None:
            cert = status.certificates.get(name)
            cells.append(Text(*certificate_state(*cert, now)) if cert else Text("no expiry metrics", "yellow"))
        table.add_row(*cells)
    return table


def _backups(status: FleetStatus) -> Any:
    from rich.text import Text

    rpo = status.rpo_seconds or math.inf
    table = _table(f"backups and drills (RPO {human_age(rpo)})", "host", "last backup", "newest snapshot",
                   "last drill", "drilled")
    for name, backup in status.backups.items():
        drill = status.drills.get(name, {})
        age = backup["age"]
        table.add_row(name, _verdict(backup["success"]),
                      Text(human_age(age), "red" if math.isnan(age) or age > rpo else "green"),
                      _verdict(drill.get("success", math.nan)), human_age(drill.get("age", math.nan)))
    return table


def _mesh(status: FleetStatus) -> Any:
    from rich.text import Text

    down = [p for p in status.pairs if not p[3]]
    if not down:
        return Text(f"mesh: all {len(status.pairs)} pairs reachable", "green")
    table = _table(f"mesh: {len(status.pairs)} pairs, {len(down)} not reachable", "mesh", "from", "to",
                   "reachable", "handshake age")
    for name, source, target, _, age in down:
        table.add_row(name, source, target, Text("no", "bold red"), "-" if age is None else human_age(age))
    return table


def _sync_table(status: FleetStatus, fleet: Fleet) -> Any:
    from rich.text import Text

    from primespark.monitoring.alerts import sync_limits

    limits = {(x.job, x.source): x for x in sync_limits(fleet)}
    table = _table("sync", "job", "from", "last pass", "lag", "since last success", "limit")
    for (job, source), figures in status.sync.items():
        limit = limits.get((job, source))
        lag, since = figures["lag"], figures["since"]
        late = limit is not None and (
            (limit.lag is not None and not math.isnan(lag) and lag > limit.lag)
            or (limit.age is not None and (math.isnan(since) or since > limit.age)))
        colour = "red" if late else "yellow" if math.isnan(since) else ""  # never published: not healthy
        table.add_row(job, source, _verdict(figures["success"]),
                      Text("no data" if math.isnan(lag) else human_age(lag), colour), Text(human_age(since), colour),
                      "-" if limit is None else human_age(limit.longest))
    return table


def _pools(status: FleetStatus) -> Any:
    from rich.text import Text

    age = status.export_age if status.export_age is not None else math.nan
    title = (f"work pools (as read {human_age(age)} ago)" if status.export_fresh else
             f"work pools: NO CURRENT DATA (the Prefect export last ran {human_age(age)} ago)")
    table = _table(title, "pool", "status", "workers online")
    for pool, figures in status.pools.items():
        ready, workers = figures["ready"], figures["workers"]
        state = (Text("unknown", "yellow") if math.isnan(ready) else Text("READY", "green") if ready == 1
                 else Text("NOT READY", "bold red"))
        table.add_row(pool, state, "-" if math.isnan(workers) else f"{workers:.0f}")
    return table


def _tasks(status: FleetStatus) -> Any:
    from rich.text import Text

    if not status.export_fresh:
        return Text("agent tasks: unknown (no current Prefect export)", "yellow")
    window = human_age(m.AGENT_FAILURE_WINDOW_SECONDS)
    running, failed = sum(status.tasks_running.values()), sum(status.tasks_failed.values())
    named = ", ".join(f"{t} {n:.0f}" for t, n in sorted(status.tasks_failed.items()) if n)
    return Text(f"agent tasks: {running:.0f} running, {failed:.0f} failed or crashed in the last {window}"
                + (f" ({named})" if named else ""), "bold red" if failed else "green")


def _tiers(status: FleetStatus, fleet: Fleet) -> Any:
    from rich.text import Text

    table = _table("tiers", "host", "tier", "fill", "high watermark")
    for host, tier_name, fill in status.tiers:
        spec = next((t for n, t in fleet.tiers.items() if n.value == tier_name), None)
        high = spec.high_watermark if spec else math.inf
        table.add_row(host, tier_name, Text(f"{fill:.1%}", "red" if fill > high else "green"),
                      f"{high:.0%}" if spec else "-")
    return table


def _alerts(status: FleetStatus) -> Any:
    from rich.text import Text

    table = _table(f"alerts firing: {len(status.alerts)}", "severity", "alert", "host", "summary")
    for alert in status.alerts:
        colour = {"critical": "bold red", "warning": "yellow"}.get(alert.severity, "cyan")
        table.add_row(Text(alert.severity, colour), alert.name, alert.host, alert.summary)
    return table


def _verdict(value: float) -> Any:
    from rich.text import Text

    if math.isnan(value):
        return Text("no data", "yellow")
    return Text("ok", "green") if value == 1 else Text("FAILED", "bold red")
