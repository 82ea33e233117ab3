"""The live facts placement reads: from each host's node exporter (and the UPS guard's textfile metrics in it), its
drain marker and the size of the task's data there; the work pools' readiness from the Prefect server; or all of
it from a file (`spark task plan --facts FILE`, the tests).

Free CPU is the CPUs minus the 1-minute load (`node_load1`): `node_cpu_seconds_total` only counts time spent, and
a rate of it needs two scrapes. Both the CPU count and available memory are capped at what the fleet gives the
host, so a container or VM that sees its machine's CPUs does not offer them all; in the lab, whose hosts share one
machine's kernel, a host's load is its share of the machine's. A host whose facts cannot be read
is `Unavailable`, with why: placement excludes it rather than guess.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from primespark.agents.placement import Facts, HostFacts, Placed, Unavailable, data_places, static_exclusions
from primespark.errors import StepFailed, UserError
from primespark.fleet.model import Fleet, TaskSpec
from primespark.hosts import HostAccess, on_each
from primespark.monitoring import metrics as m
from primespark.pki import HOST_TLS_FOLDER, serves_tls

if TYPE_CHECKING:
    from primespark.context import FleetContext

# `spark host drain HOST` writes it (JSON: who, when, why; agents/drain.py) and `spark host undrain HOST` removes
# it: placement keeps new tasks off the host. /run is a tmpfs: a reboot undrains the host.
DRAIN_MARKER = "/run/spark/drain"
# spark-power (quiet hours) and spark-ups-guard (low power, before a halt) write it: agent tasks pause.
QUIET_MARKER = "/run/spark/quiet"
# On a host, this variable moves both markers into its folder: the tests' hosts are folders of one machine.
MARKER_DIR_VARIABLE = "SPARK_RUN_DIR"
# spark-ups-guard reads the UPS every minute (roles/edge: edge_ups_check_schedule); a reading this old is stale.
POWER_STALE_SECONDS = 300
_MIB = 1024 * 1024

Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse_metrics(text: str) -> Samples:
    """The samples of a Prometheus text exposition, by sample name (prometheus_client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


def _one(samples: Samples, metric: m.Metric) -> float | None:
    found = samples.get(metric.name)
    return found[0][1] if found else None


def _power(fleet: Fleet, host: str, samples: Samples) -> tuple[bool | None, float | None, bool] | str:
    """(on mains, battery charge, battery low) from the UPS guard's metrics, or why they are missing."""
    profile = fleet.hosts[host].power
    signal = profile.ups_signal if profile is not None else "none"
    if signal == "none":
        return True, None, False  # no UPS: mains is the host's only supply
    if _one(samples, m.POWER_CHECK_TIME) is None:
        return (f"its ups_signal is {signal} but its metrics hold no {m.POWER_CHECK_TIME.name} "
                "(spark-ups-guard has not run)")
    checked, clock = _one(samples, m.POWER_CHECK_TIME) or 0.0, _one(samples, m.NODE_TIME)
    if clock is None:
        return f"its metrics hold no {m.NODE_TIME.name}, so the age of its UPS reading is unknown"
    if clock - checked > POWER_STALE_SECONDS:
        return (f"its UPS reading is {(clock - checked) / 60:.0f} min old (spark-ups-guard reads it every minute; "
                "is its cron running?)")
    on_battery = _one(samples, m.POWER_ON_BATTERY)
    return (None if on_battery is None else not on_battery, _one(samples, m.POWER_BATTERY_CHARGE),
            bool(_one(samples, m.POWER_BATTERY_LOW)))


def facts_from_metrics(
    fleet: Fleet, host: str, text: str, *, drained: bool = False, paused: bool = False, worker_ready: bool = True,
    data_bytes: Mapping[str, int] | None = None,
) -> HostFacts | Unavailable:
    """A host's facts from its node exporter's metrics text."""
    try:
        samples = parse_metrics(text)
    except ValueError as exc:
        return Unavailable(f"its metrics cannot be read: {exc}")
    spec = fleet.hosts[host]
    cpus = len({labels.get("cpu") for labels, _ in samples.get(m.NODE_CPU.name, [])})
    load = _one(samples, m.NODE_LOAD1)
    available = _one(samples, m.NODE_MEM_AVAILABLE)
    missing = [name for name, value in ((m.NODE_CPU.name, cpus or None), (m.NODE_LOAD1.name, load),
                                        (m.NODE_MEM_AVAILABLE.name, available)) if value is None]
    if missing or load is None or available is None:
        return Unavailable(f"its metrics hold no {', '.join(missing)}")
    power = _power(fleet, host, samples)
    if isinstance(power, str):
        return Unavailable(power)
    on_mains, charge, low = power
    if fleet.lab is not None:
        # The lab's hosts are containers of one machine: each node exporter reads the machine's load (one kernel),
        # so a host's share of it is the load over the lab's hosts, not all of it.
        load /= len(fleet.hosts)
    return HostFacts(cpus_free=max(0.0, min(cpus, spec.cpus) - load),
                     memory_free_mb=min(int(available // _MIB), spec.memory_mb), on_mains=on_mains,
                     battery_percent=charge, battery_low=low, drained=drained, paused=paused, worker_ready=worker_ready,
                     data_bytes=dict(data_bytes or {}))


# Runs on the host with its own Python (standard library only): the exporter's page, the markers (the drain marker's
# note too), and the bytes under each data path (apparent sizes, as the tiers count them; a path that is not there
# holds 0).
_HOST_SCRIPT = r"""
import http.client, json, os, ssl, sys
args = json.loads(sys.argv[1])
def marker(path):
    moved = os.environ.get(args["moved_by"])
    return os.path.join(moved, os.path.basename(path)) if moved else path
note = None
try:
    with open(marker(args["drain"]), encoding="utf-8") as handle:
        note = handle.read(4096)
except OSError:
    pass
out = {"drained": os.path.exists(marker(args["drain"])), "paused": os.path.exists(marker(args["quiet"])),
       "note": note, "bytes": {}, "metrics": None, "error": ""}
class Verified(http.client.HTTPSConnection):
    # on loopback, but verified as the host's name: its certificate names the host, not 127.0.0.1
    def connect(self):
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=args["tls"]["name"])
try:
    if args["tls"]:
        context = ssl.create_default_context(cafile=args["tls"]["ca"])
        connection = Verified("127.0.0.1", args["port"], timeout=10, context=context)
    else:
        connection = http.client.HTTPConnection("127.0.0.1", args["port"], timeout=10)
    connection.request("GET", "/metrics")
    page = connection.getresponse()
    if page.status != 200:
        raise OSError(f"HTTP {page.status} {page.reason}")
    out["metrics"] = page.read().decode()
except (OSError, http.client.HTTPException) as exc:
    out["error"] = f"node exporter on port {args['port']} did not answer: {exc}"
for path in args["paths"]:
    total = 0
    if os.path.isfile(path):
        total = os.lstat(path).st_size
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    out["bytes"][path] = total
print(json.dumps(out))
"""


@dataclass(frozen=True)
class DrainNote:
    """Who drained a host, when and why, as the marker says (`spark host drain`); empty where it does not say
    (a marker made by hand)."""

    by: str = ""
    at: str = ""
    reason: str = ""

    @classmethod
    def parse(cls, text: str | None) -> DrainNote:
        try:
            data = json.loads(text or "")
        except ValueError:
            return cls()
        if not isinstance(data, dict):
            return cls()
        return cls(*(str(data.get(key) or "") for key in ("by", "at", "reason")))

    def __str__(self) -> str:
        if not (self.by or self.at):
            return f"its marker {DRAIN_MARKER} says nothing of who or why (made by hand?)"
        said = f"since {self.at or 'an unknown time'} by {self.by or 'someone unknown'}"
        return f"{said}: {self.reason}" if self.reason else said


@dataclass(frozen=True)
class HostReading:
    """What the host-side script found, before placement's judgement: the markers, node exporter's page (or why
    there is none) and the bytes under each path asked for."""

    drained: bool
    paused: bool
    drain: DrainNote | None  # the drain marker's note, when the host is drained
    metrics: str | None
    error: str
    data_bytes: dict[str, int]


def read_reading(hosts: HostAccess, fleet: Fleet, host: str, paths: Iterable[str] = (),
                 timeout: float = 60, tls_folder: Path = HOST_TLS_FOLDER) -> HostReading | Unavailable:
    """What one host holds now, read on the host through the fleet's way of reaching it (primespark.hosts); the
    host unavailable, with why, when it cannot be read. The exporter's page over TLS where the fleet has a CA,
    verified against the fleet CA in `tls_folder` on the host."""
    runner = hosts.runner(host)
    tls = {"ca": str(tls_folder / "ca.pem"), "name": host} if serves_tls(fleet) else None
    request = {"port": fleet.monitoring.node_exporter_port, "tls": tls, "drain": DRAIN_MARKER,
               "quiet": QUIET_MARKER, "moved_by": MARKER_DIR_VARIABLE, "paths": sorted(set(paths))}
    try:
        done = runner.run([runner.python, "-c", _HOST_SCRIPT, json.dumps(request)], timeout=timeout)
    except StepFailed as exc:
        return Unavailable(exc.message.splitlines()[0])
    if done.returncode != 0:
        return Unavailable(f"reading them failed (exit {done.returncode}): {done.stderr.strip()[:200]}")
    try:
        found = json.loads(done.text)
    except json.JSONDecodeError:
        return Unavailable(f"reading them gave no answer: {done.text.strip()[:200]}")
    return HostReading(bool(found["drained"]), bool(found["paused"]),
                       DrainNote.parse(found["note"]) if found["drained"] else None, found["metrics"],
                       str(found["error"]), {str(k): int(v) for k, v in found["bytes"].items()})


def facts_of(fleet: Fleet, host: str, reading: HostReading | Unavailable,
             worker_ready: bool) -> HostFacts | Unavailable:
    """Placement's facts of a host from what was read there."""
    if isinstance(reading, Unavailable):
        return reading
    if reading.metrics is None:
        return Unavailable(reading.error)
    return facts_from_metrics(fleet, host, reading.metrics, drained=reading.drained, paused=reading.paused,
                              worker_ready=worker_ready, data_bytes=reading.data_bytes)


def read_host(hosts: HostAccess, fleet: Fleet, host: str, paths: Iterable[str], worker_ready: bool,
              timeout: float = 60) -> HostFacts | Unavailable:
    """One host's facts, read on the host through the fleet's way of reaching it (primespark.hosts)."""
    return facts_of(fleet, host, read_reading(hosts, fleet, host, paths, timeout), worker_ready)


def hosts_to_read(fleet: Fleet, task: TaskSpec) -> dict[str, list[str]]:
    """The hosts whose facts the decision needs, each with the data paths to measure there: those the fleet does
    not rule out, and those holding a copy of the task's data (their bytes count for their site)."""
    wanted: dict[str, list[str]] = {n: [] for n, h in fleet.hosts.items() if not static_exclusions(h, task)}
    for ref in task.data:
        for host, path in data_places(fleet, ref):
            wanted.setdefault(host, []).append(path)
    return wanted


def pool_readiness(fleet: Fleet, ready_pools: Mapping[str, bool]) -> dict[str, bool]:
    """Per site: whether its work pool has a worker online. A fleet without orchestration runs its flows where
    `spark` runs, so no worker stands between a task and its host."""
    from primespark.orchestration.naming import work_pool

    if fleet.orchestration is None:
        return dict.fromkeys(fleet.sites, True)
    return {site: ready_pools.get(work_pool(site), False) for site in fleet.sites}


def read_facts(hosts: HostAccess, fleet: Fleet, task: TaskSpec, ready: Mapping[str, bool] | str,
               within: Collection[str] | None = None) -> dict[str, HostFacts | Unavailable]:
    """Every needed host's facts (of those `within`, when given), read in parallel; `ready` is each site's worker
    readiness, or why it is unknown (then every host is unavailable: a task is never placed where no worker may be
    listening)."""
    wanted = {h: paths for h, paths in hosts_to_read(fleet, task).items() if within is None or h in within}
    if isinstance(ready, str):
        return {host: Unavailable(f"its site's worker state is unknown: {ready}") for host in wanted}
    return on_each(wanted, lambda host: read_host(hosts, fleet, host, wanted[host], ready.get(
        fleet.hosts[host].site, False)))


# --- a facts file: what `spark task plan --facts FILE` reads instead of the hosts ----------------------------------

class _FileHost(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cpus_free: float = Field(default=0, ge=0)
    memory_free_mb: int = Field(default=0, ge=0)
    on_mains: bool | None = True
    battery_percent: float | None = Field(default=None, ge=0, le=100)
    battery_low: bool = False
    drained: bool = False
    paused: bool = False
    worker_ready: bool = True
    data_bytes: dict[str, int] = Field(default_factory=dict)
    unavailable: str | None = Field(default=None, description="Why the host's facts are not known (it is excluded).")


class _FilePlaced(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str
    cpus: float = Field(gt=0)
    memory_mb: int = Field(ge=0)


class FactsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    now: datetime | None = Field(default=None, description="The time to decide at (default: now).")
    hosts: dict[str, _FileHost] = Field(default_factory=dict)
    placed: list[_FilePlaced] = Field(default_factory=list)

    def facts(self, fleet: Fleet, file: str) -> tuple[Facts, list[Placed]]:
        unknown = sorted(set(self.hosts) - set(fleet.hosts) | {p.host for p in self.placed} - set(fleet.hosts))
        if unknown:
            raise UserError(f"{file}: no host named {', '.join(unknown)} in fleet {fleet.name}",
                            f"use the fleet's hosts: {', '.join(fleet.hosts)}")
        facts: dict[str, HostFacts | Unavailable] = {
            name: Unavailable(f"not in {file}") for name in fleet.hosts if name not in self.hosts}
        for name, spec in self.hosts.items():
            if spec.unavailable is not None:
                facts[name] = Unavailable(spec.unavailable)
            else:
                facts[name] = HostFacts(**spec.model_dump(exclude={"unavailable"}))
        return facts, [Placed(p.host, p.cpus, p.memory_mb) for p in self.placed]


def load_facts_file(path: Path) -> FactsFile:
    from primespark.fleet.loader import line_of, parse_yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{path}: cannot read the facts file: {exc.strerror}", "name a YAML or JSON facts file") \
            from None
    data, lines = parse_yaml(text, str(path))
    try:
        return FactsFile.model_validate(data or {})
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in error["loc"])
        line = line_of(lines, tuple(error["loc"]))
        raise UserError(f"{path}:{line or ''}: {where}: {error['msg']}",
                        "see docs/agents.md for the facts file's form") from None


def facts_summary(facts: Mapping[str, Any]) -> dict[str, Any]:
    """The facts as plain data (for a `--json` plan and for saving a captured set as a facts file)."""
    out: dict[str, Any] = {}
    for host, found in sorted(facts.items()):
        if isinstance(found, Unavailable):
            out[host] = {"unavailable": found.reason}
        else:
            out[host] = {**found.__dict__, "data_bytes": dict(found.data_bytes)}
    return out


# --- live: the work pools from the Prefect server, the rest from the hosts -----------------------------------------

def ready_pools(ctx: FleetContext, connect: bool = True) -> dict[str, bool] | str:
    """Each work pool's readiness on the fleet's Prefect server (READY: a worker is online), or why it is not
    known. `connect=False` in a flow run: its process talks to the fleet's server already."""
    from primespark.orchestration.placement import pools

    if ctx.fleet.orchestration is None:
        return {}
    try:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        from primespark.orchestration.api import use_fleet_prefect

        if connect:
            use_fleet_prefect(ctx)
        ready = {}
        with get_client(sync_client=True) as client:
            for pool in pools(ctx.fleet):
                try:
                    found = client.read_work_pool(pool)
                except ObjectNotFound:
                    ready[pool] = False
                    continue
                ready[pool] = found.status is not None and found.status.value == "READY"
        return ready
    except UserError as exc:
        return exc.message
    except Exception as exc:  # the server answered badly (HTTP, auth): the plan says why instead of stopping
        return f"{type(exc).__name__}: {exc}"


def live_facts(ctx: FleetContext, task: TaskSpec, connect: bool = True,
               within: Collection[str] | None = None) -> tuple[Facts, str]:
    """Every needed host's facts read now (`spark task plan`, the `agent-task` flow), and where they came from;
    `within`: only those hosts (a worker's run reaches its own site's)."""
    pools = ready_pools(ctx, connect)
    ready = pools if isinstance(pools, str) else pool_readiness(ctx.fleet, pools)
    return read_facts(ctx.hosts, ctx.fleet, task, ready, within), "read now from the hosts' node exporters"
