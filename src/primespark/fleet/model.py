"""The fleet model: one typed description of sites, hosts, VMs, mesh, storage tiers, backups and services.

Field-level rules live here (pydantic); rules that relate several parts of the fleet live in `checks.py`,
so that every violation is reported with its own location, all at once.
"""

from __future__ import annotations

import re
from enum import StrEnum
from functools import cached_property
from ipaddress import IPv4Address, IPv4Network
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

NAME_PATTERN = r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$"
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
CRON_PATTERN = r"^(\S+\s+){4}\S+$"
CRON_FIELDS = "minute 0-59, hour 0-23, day of month 1-31, month 1-12 or jan-dec, day of week 0-7 or sun-sat"


def cron_accepted(expression: str) -> bool:
    """Whether Prefect's schedules take `expression`: croniter's validation (Prefect vendors croniter) without
    its random (R) and hashed (H) fields, as Prefect refuses those. The standalone croniter loads in
    milliseconds where importing Prefect takes seconds; tests/unit/test_fleet_model.py checks that the two
    agree."""
    from croniter import croniter

    fields = expression.split()
    return croniter.is_valid(expression) and not any(f.casefold() in ("r", "h") for f in fields)


def _cron(expression: str) -> str:
    if not cron_accepted(expression):
        raise PydanticCustomError(
            "cron", "Prefect does not accept this cron expression (a field out of range or not cron syntax)",
            {"fix": f"write five fields within their ranges ({CRON_FIELDS}), e.g. `0 2 * * *`"})
    return expression


# Five fields first (the loader's fix names them), then Prefect's own validation of the fields.
Cron = Annotated[str, StringConstraints(pattern=CRON_PATTERN), AfterValidator(_cron)]

# A secret reference, never a secret: `vault:<mount>/<path>#<key>` or `local:<path>`. The pattern tells a
# reference from a secret written inline; `_secret_ref` then checks that the path stays inside its store.
SECRET_REF_PATTERN = r"^(vault|local):[A-Za-z0-9_./#-]+$"
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _secret_ref(reference: str) -> str:
    kind, _, rest = reference.partition(":")
    path, hash_sign, key = rest.partition("#")
    segments = path.split("/")
    if kind == "local" and hash_sign:
        problem = "a local reference names a file of the store; it takes no `#key`"
    elif kind == "vault" and not re.fullmatch(r"[A-Za-z0-9_-]+", key):
        problem = "a vault reference needs one `#key` (letters, digits, `_` and `-`) after its path"
    elif path.startswith("/"):
        problem = "the path is absolute"
    elif "" in segments:
        problem = "the path has an empty segment (`//` or a trailing `/`)"
    elif any(s in (".", "..") for s in segments):
        problem = "the path climbs out of the secret store (`.` or `..`)"
    elif not all(_SEGMENT.fullmatch(s) for s in segments):
        problem = "a path segment starts with a dot or a dash"
    elif kind == "vault" and len(segments) < 2:
        problem = "a vault reference needs a mount and a path below it"
    else:
        return reference
    fix = ("write `vault:<mount>/<path>#<key>`, e.g. `vault:secret/primespark/restic#nas-primary`"
           if kind == "vault" else "write `local:<name>` relative to the secret store, e.g. `local:restic/nas-primary`")
    raise PydanticCustomError("secret-reference", problem, {"fix": fix})


SecretRef = Annotated[str, StringConstraints(pattern=SECRET_REF_PATTERN), AfterValidator(_secret_ref)]


# Upper bounds no homelab reaches, so that a typo (`1e400`, an extra dozen zeros) is an error, not a plan.
MAX_GB = 1_000_000  # a petabyte
CENTURY_DAYS = 36_525


class Strict(BaseModel):
    # No float field takes inf or nan (`rpo_hours: 1e400` is inf to pydantic).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SiteKind(StrEnum):
    edge = "edge"
    cloud = "cloud"


class HostKind(StrEnum):
    pi = "pi"
    nas = "nas"
    kvm_host = "kvm_host"
    vm = "vm"


class Arch(StrEnum):
    aarch64 = "aarch64"
    armv7l = "armv7l"
    x86_64 = "x86_64"


class ServiceKind(StrEnum):
    kafka = "kafka"
    timescaledb = "timescaledb"
    redis = "redis"
    mlflow = "mlflow"
    prometheus = "prometheus"
    grafana = "grafana"
    alertmanager = "alertmanager"
    prefect = "prefect"
    api = "api"


class Topology(StrEnum):
    full_mesh = "full_mesh"
    hub_and_spoke = "hub_and_spoke"


class Site(Strict):
    kind: SiteKind
    lan: IPv4Network = Field(description="The site's LAN CIDR.")
    behind_nat: bool = Field(
        default=False, description="Hosts here reach the WAN through a NAT router (a home connection)."
    )
    public_address: IPv4Address | None = Field(
        default=None, description="The router's WAN address, for a site behind NAT."
    )

    @property
    def gateway(self) -> IPv4Address:
        """The router on the LAN: by convention the first usable address."""
        return self.lan.network_address + 1


class Ssh(Strict):
    address: IPv4Address | None = Field(default=None, description="Defaults to the host's LAN address.")
    user: Annotated[str, StringConstraints(pattern=r"^[a-z_][a-z0-9_-]{0,31}$")] = "spark"
    port: int = Field(default=22, ge=1, le=65535)


class Governor(StrEnum):
    ondemand = "ondemand"
    powersave = "powersave"
    performance = "performance"
    schedutil = "schedutil"
    conservative = "conservative"


HHMM = Annotated[str, StringConstraints(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")]


class PowerProfile(Strict):
    governor: Governor = Governor.ondemand
    quiet_hours: tuple[HHMM, HHMM] | None = Field(
        default=None, description="[start, end]: the CPU runs powersave and agent tasks pause."
    )
    ups_signal: Literal["none", "gpio", "nut"] = "none"
    shutdown_battery_percent: int = Field(default=15, ge=1, le=90)


class VmSpec(Strict):
    kvm_host: Name = Field(description="The KVM host this VM runs on.")
    image: Name = Field(description="A base image from `images:`.")
    autostart: bool = True


class Host(Strict):
    kind: HostKind
    site: Name
    arch: Arch = Arch.x86_64
    cpus: int = Field(ge=1, le=512)
    memory_mb: int = Field(ge=256, le=4_194_304)
    disk_gb: int = Field(ge=1, le=MAX_GB)
    address: IPv4Address = Field(description="The host's address on its site's LAN.")
    public_address: IPv4Address | None = Field(
        default=None, description="An address reachable from outside the site (a WireGuard endpoint)."
    )
    ssh: Ssh = Ssh()
    labels: dict[Name, str] = Field(default_factory=dict)
    power: PowerProfile | None = None
    vm: VmSpec | None = None
    container_runtime: bool = Field(default=False, description="Run agent tasks in containers (Pis).")

    @model_validator(mode="after")
    def _kind_specific(self) -> Host:
        if self.kind is HostKind.vm and self.vm is None:
            raise ValueError("a host of kind vm needs a `vm:` section (kvm_host, image)")
        if self.kind is not HostKind.vm and self.vm is not None:
            raise ValueError(f"only hosts of kind vm take a `vm:` section, this one is {self.kind.value}")
        if self.power is not None and self.kind is not HostKind.pi:
            raise ValueError(f"a power profile is for Pis only, this host is {self.kind.value}")
        return self

    @property
    def ssh_address(self) -> IPv4Address:
        return self.ssh.address or self.address


class Image(Strict):
    url: Annotated[str, StringConstraints(pattern=r"^(https?|file)://\S+$")]
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    os: str = "debian-12"


class Mesh(Strict):
    interface: Annotated[str, StringConstraints(pattern=r"^wg[0-9]{1,3}$")] = "wg0"
    overlay: IPv4Network
    listen_port: int = Field(default=51820, ge=1, le=65535)
    topology: Topology = Topology.full_mesh
    hub: Name | None = Field(default=None, description="The hub host for hub_and_spoke.")
    members: list[Name] | None = Field(default=None, description="Default: every host but KVM hosts.")
    keepalive_seconds: int = Field(default=25, ge=1, le=3600)
    mtu: int = Field(default=1420, ge=1280, le=9000)
    preshared_keys: bool = True

    @model_validator(mode="after")
    def _hub_matches_topology(self) -> Mesh:
        if self.topology is Topology.hub_and_spoke and self.hub is None:
            raise ValueError("topology hub_and_spoke needs `hub:` (a host with a public address)")
        if self.topology is Topology.full_mesh and self.hub is not None:
            raise ValueError("`hub:` is only for topology hub_and_spoke")
        return self


class TierName(StrEnum):
    hot = "hot"
    warm = "warm"
    cold = "cold"


TIER_ORDER = (TierName.hot, TierName.warm, TierName.cold)

Fraction = Annotated[float, Field(gt=0, le=1)]
AbsPath = Annotated[str, StringConstraints(pattern=r"^/[^\x00]*$")]


PIN_MARKER_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
DAY_MINUTES = 24 * 60


class Tier(Strict):
    hosts: list[Name] = Field(min_length=1)
    path: AbsPath
    # A fraction of a GB is allowed (a small test fleet's tier); the guard and preflight read it as GB.
    capacity_gb: int | float = Field(gt=0, le=MAX_GB)
    max_age_days: int | None = Field(
        default=None, ge=1, le=CENTURY_DAYS, description="Data older than this moves down a tier.")
    low_watermark: Fraction = 0.70
    high_watermark: Fraction = 0.85
    pinned: list[Annotated[str, StringConstraints(min_length=1, pattern=r"^[^/\x00][^\x00]*$")]] = Field(
        default_factory=list, description="Globs (relative to the tier's path, `**` for any depth) of files that "
        "never move down.")
    pin_marker: Annotated[str, StringConstraints(pattern=PIN_MARKER_PATTERN)] = Field(
        default=".spark-pin", description="A file of this name in a folder keeps the folder (and below) here.")
    min_age_minutes: int = Field(
        default=15, ge=0, le=DAY_MINUTES, description="A file modified this recently never moves (it may be "
        "being written by a process that closes and reopens it).")
    schedule: Cron | None = Field(
        default=None, description="Passes from this tier down to the next on this schedule (none: on demand).")
    catalog: AbsPath | None = Field(
        default=None, description="The migration catalog (SQLite), on the tier's first host; only the warm tier "
        "holds it, inside its path (backed up with it). Default: <path>/.spark-tier/catalog.sqlite.")
    recall: bool = Field(
        default=False, description="Files moved down from this tier can be recalled over SSH: the lower tiers' "
        "hosts get a key into an account on this tier's hosts, confined by rrsync (write-only, no deletions) to "
        "`<path>/.spark-tier-recall`, from where the recall renames each file into place.")

    @model_validator(mode="after")
    def _watermarks(self) -> Tier:
        if self.low_watermark >= self.high_watermark:
            raise ValueError(
                f"low_watermark ({self.low_watermark}) must be below high_watermark ({self.high_watermark})"
            )
        return self


class Retention(Strict):
    """restic's --keep-* counts; each at most a century's worth of its period."""

    keep_last: int | None = Field(default=None, ge=1, le=100_000)
    keep_hourly: int | None = Field(default=None, ge=1, le=CENTURY_DAYS * 24)
    keep_daily: int | None = Field(default=None, ge=1, le=CENTURY_DAYS)
    keep_weekly: int | None = Field(default=None, ge=1, le=5_218)
    keep_monthly: int | None = Field(default=None, ge=1, le=1_200)
    keep_yearly: int | None = Field(default=None, ge=1, le=100)

    @model_validator(mode="after")
    def _keeps_something(self) -> Retention:
        if not any(v for v in self.model_dump().values()):
            raise ValueError("retention keeps nothing: set at least one keep_* value")
        return self


class Repository(Strict):
    host: Name = Field(description="The host that stores the repository.")
    path: AbsPath
    password: SecretRef
    copy_from: Name | None = Field(default=None, description="Another repository this one copies (offsite).")


class BackupPlan(Strict):
    repository: Name
    paths: list[AbsPath] = Field(min_length=1)
    excludes: list[str] = Field(default_factory=list)
    schedule: Cron = "0 2 * * *"


_SUBSET_UNITS = {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SUBSET_FORMS = "`n/t` with 1 ≤ n ≤ t ≤ 256, a percentage above 0 and at most 100 such as `5%`, or a size such as `1G`"


def _read_data_subset(value: str) -> str:
    """What `restic check --read-data-subset` takes (restic 0.14: cmd_check.go), in its plain decimal forms."""
    if match := re.fullmatch(r"(\d+)/(\d+)", value):
        part, total = int(match[1]), int(match[2])
        problem = "" if 1 <= part <= total <= 256 else "n/t needs 1 ≤ n ≤ t and t at most 256 (restic's limit)"
    elif match := re.fullmatch(r"(\d+(?:\.\d+)?)%", value):
        problem = "" if 0 < float(match[1]) <= 100 else "a percentage must be above 0% and at most 100%"
    elif match := re.fullmatch(r"(\d+)([bBkKmMgGtT])", value):
        size = int(match[1]) * _SUBSET_UNITS[match[2].lower()]
        problem = "" if 0 < size < 2**63 else "a size must be above 0 and below 8 EiB"
    else:
        problem = "not a form restic's --read-data-subset takes"
    if problem:
        raise PydanticCustomError("read-data-subset", problem, {"fix": f"use {_SUBSET_FORMS}"})
    return value


class Check(Strict):
    schedule: Cron = "0 4 * * 0"
    read_data_subset: Annotated[str, AfterValidator(_read_data_subset)] = Field(
        default="5%", description=f"How much pack data `restic check` reads: {_SUBSET_FORMS}.")


class Targets(Strict):
    rpo_hours: float = Field(gt=0, le=8_760, description="The newest snapshot may be at most this old (≤ a year).")
    rto_minutes: float = Field(
        gt=0, le=43_200, description="A restore must be verified within this time (≤ 30 days).")


class Drill(Strict):
    schedule: Cron = "0 5 * * 6"
    scratch_host: Name = Field(description="Where drills restore; never the source host.")


class Timeouts(Strict):
    """How long a step on a host may run before it is stopped, on the host too (`timeout`), its locks freed.

    A long step (a backup, a drill's restore, an offsite copy, prune, check) gets the data it moves at
    `throughput_mb_s`, but at least `minimum_minutes` and at most `maximum_hours`; one whose size is not known
    yet (a first backup) gets `maximum_hours`. Short steps (listing snapshots or locks, reading the repository's
    config, forget, unlock) get `command_seconds`."""

    command_seconds: float = Field(default=300, ge=1, le=86_400, description="Short steps, each (≤ a day).")
    throughput_mb_s: float = Field(
        default=2.0, gt=0, le=100_000, description="The slowest rate (MB/s) a long step's data is expected to move at.")
    minimum_minutes: float = Field(default=30, gt=0, le=10_080, description="A long step's least time (≤ a week).")
    maximum_hours: float = Field(default=24, gt=0, le=720, description="A long step's most time (≤ 30 days).")

    @model_validator(mode="after")
    def _ordered(self) -> Timeouts:
        if self.minimum_minutes > self.maximum_hours * 60:
            raise ValueError(f"minimum_minutes ({self.minimum_minutes:g}) is more than maximum_hours "
                             f"({self.maximum_hours:g} h)")
        return self


class Backup(Strict):
    client_dir: AbsPath = Field(
        default="/etc/primespark/restic", description="On backup clients: the SFTP key and known hosts (restic role)."
    )
    repositories: dict[Name, Repository] = Field(min_length=1)
    plans: dict[Name, BackupPlan] = Field(default_factory=dict, description="Keyed by host name.")
    retention: Retention
    check: Check = Check()
    targets: Targets
    drill: Drill
    max_shrink: Fraction = Field(
        default=0.5,
        description="The largest fall in a snapshot's file count, as a fraction of the previous snapshot's, that a "
        "backup accepts (0 < x ≤ 1): 0.5 fails a backup that lost more than half of the files; a snapshot with no "
        "files fails whatever this says. A run told the fall is expected (`spark backup now --accept-shrink`, "
        "the backup flow's `accept_shrink`) takes it.",
    )
    timeouts: Timeouts = Timeouts()


# `[registry[:port]/]path[:tag][@sha256:digest]` with a tag or a digest: a moving reference (no tag, `latest`)
# would let the same fleet run different code from one boot to the next.
_IMAGE_NAME = r"([a-zA-Z0-9.-]+(:[0-9]+)?/)?[a-z0-9]+([._-]+[a-z0-9]+)*(/[a-z0-9]+([._-]+[a-z0-9]+)*)*"
_IMAGE_PATTERN = re.compile(
    rf"{_IMAGE_NAME}(?P<tag>:[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?(?P<digest>@sha256:[0-9a-f]{{64}})?")


def _container_image(reference: str) -> str:
    match = _IMAGE_PATTERN.fullmatch(reference)
    if match is None:
        problem = "not a container image reference"
    elif match["digest"] is None and match["tag"] in (None, ":latest"):
        problem = "the image is not pinned: it needs a version tag (not `latest`) or a digest"
    else:
        return reference
    raise PydanticCustomError("image-reference", problem, {
        "fix": "name a pinned image such as `registry.example.org/primespark/api:1.4.2` or `name@sha256:<digest>`"})


ContainerImage = Annotated[str, AfterValidator(_container_image)]


class Service(Strict):
    kind: ServiceKind
    host: Name
    image: ContainerImage | None = Field(
        default=None, description="The container image, pinned by a version tag or a digest; default: the kind's "
        "own (primespark.cloud.catalog). The api kind has no public image, so an api service must name one.",
    )
    port: int = Field(ge=1, le=65535)
    check: Literal["tcp", "http", "none"] = "tcp"
    backup_paths: list[AbsPath] = Field(default_factory=list)
    restore_check: str | None = Field(
        default=None,
        description="A shell command a DR drill runs on the scratch host after a restore; {root} is the "
        "restored tree, e.g. `test -s {root}/var/lib/postgresql/15/main/PG_VERSION`.",
    )


SSH_KEY_PATTERN = r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp\d+|sk-\S+) [A-Za-z0-9+/=]+( .*)?$"
SshPublicKey = Annotated[str, StringConstraints(pattern=SSH_KEY_PATTERN)]
UserName = Annotated[str, StringConstraints(pattern=r"^[a-z_][a-z0-9_-]{0,31}$")]


class Operator(Strict):
    keys: list[SshPublicKey] = Field(default_factory=list, description="SSH public keys allowed to log in.")
    sudo: bool = Field(default=True, description="May run any command as root without a password.")


# A Prometheus duration, its units largest first: `30s`, `5m`, `1h30m`, `0s`.
DURATION_PATTERN = r"^(0|([0-9]+y)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?)$"
Duration = Annotated[str, StringConstraints(pattern=DURATION_PATTERN, min_length=1)]
ALERT_NAME_PATTERN = r"^[A-Z][A-Za-z0-9]{1,62}$"
AlertName = Annotated[str, StringConstraints(pattern=ALERT_NAME_PATTERN)]


class Severity(StrEnum):
    critical = "critical"
    warning = "warning"
    info = "info"


# Which fields each kind of receiver needs and takes (besides `kind` and `send_resolved`).
RECEIVER_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "webhook": (frozenset({"url"}), frozenset({"url", "bearer_token"})),
    "email": (frozenset({"to", "sender", "smarthost"}),
              frozenset({"to", "sender", "smarthost", "username", "password", "require_tls"})),
    "slack": (frozenset({"api_url"}), frozenset({"api_url", "channel"})),
}


class Receiver(Strict):
    """Where Alertmanager delivers alerts. Secrets (a Slack webhook URL, an SMTP password, a bearer token) are
    references into the secret store; the deployments write them to files that Alertmanager reads."""

    kind: Literal["webhook", "email", "slack"]
    url: Annotated[str, StringConstraints(pattern=r"^https?://[^\s]+$")] | None = Field(
        default=None, description="webhook: where alerts are POSTed (not a secret; put tokens in bearer_token).")
    bearer_token: SecretRef | None = Field(default=None, description="webhook: sent as `Authorization: Bearer`.")
    to: Annotated[str, StringConstraints(pattern=r"^[^@\s]+@[^@\s]+$")] | None = None
    sender: Annotated[str, StringConstraints(pattern=r"^[^@\s]+@[^@\s]+$")] | None = Field(
        default=None, description="email: the From address.")
    smarthost: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9.-]+:[0-9]{1,5}$")] | None = Field(
        default=None, description="email: the SMTP server, `host:port`.")
    username: str | None = None
    password: SecretRef | None = None
    require_tls: bool = True
    api_url: SecretRef | None = Field(default=None, description="slack: the incoming-webhook URL (a secret).")
    channel: str | None = None
    send_resolved: bool = True

    @model_validator(mode="after")
    def _fields_of_kind(self) -> Receiver:
        needed, taken = RECEIVER_FIELDS[self.kind]
        given = self.model_fields_set - {"kind", "send_resolved"}
        if missing := sorted(needed - given):
            raise PydanticCustomError(
                "receiver", "a {kind} receiver needs {fields}",
                {"kind": self.kind, "fields": ", ".join(f"`{f}`" for f in missing),
                 "fix": f"add {', '.join(f'`{f}:`' for f in missing)} to this receiver"})
        if extra := sorted(given - taken):
            raise PydanticCustomError(
                "receiver", "{fields} is not for a {kind} receiver",
                {"kind": self.kind, "fields": ", ".join(f"`{f}`" for f in extra),
                 "fix": f"a {self.kind} receiver takes {', '.join(sorted(taken))}"})
        return self


class Monitoring(Strict):
    node_exporter_port: int = Field(default=9100, ge=1, le=65535)
    textfile_dir: AbsPath = Field(
        default="/var/lib/prometheus/node-exporter", description="Flows write *.prom files here."
    )
    scrape_interval: Duration = "30s"
    evaluation_interval: Duration = "30s"
    retention: Duration = Field(default="30d", description="How long Prometheus keeps samples.")
    receivers: dict[Name, Receiver] = Field(default_factory=dict)
    routes: dict[Severity, list[Name]] = Field(
        default_factory=dict, description="Per severity, the receivers its alerts go to (none: only the UIs).")
    group_wait: Duration = Field(default="30s", description="Alertmanager: wait this long to batch a new group.")
    group_interval: Duration = Field(default="5m", description="Alertmanager: between updates of a group.")
    repeat_interval: Duration = Field(default="4h", description="Alertmanager: re-send a firing alert this often.")
    alert_for: dict[AlertName, Duration] = Field(
        default_factory=dict,
        description="How long a condition must hold before its alert fires, per alert (default: the rule's own).")
    runbook_base_url: Annotated[str, StringConstraints(pattern=r"^https?://[^\s]+$")] | None = Field(
        default=None, description="Where docs/runbooks/ is browsable (e.g. the repository's web view); default: "
        "alerts link the runbook by its path in the repository.")


# --- sync: one-way jobs between hosts (primespark.data.sync) ----------------------------------------------


class SyncMode(StrEnum):
    copy = "copy"  # never deletes at the destination
    mirror = "mirror"  # deletes what the source no longer has (guarded: max_delete, a missing or empty source)


class FsyncMode(StrEnum):
    """When a sync's copies reach the destination's disk (docs/sync.md, "Durability")."""

    file = "file"  # each file flushed before its rename (rsync's --fsync): one disk flush per file
    pass_ = "pass"  # one flush of the destination's filesystem after the pass, before the pass counts as done
    off = "off"  # whenever the destination's kernel writes back


def _fsync_mode(value: object) -> object:
    # YAML 1.1 reads `off` as false (and `on` as true); a boolean was this field's earlier type
    if value is False:
        return FsyncMode.off.value
    if value is True:
        return FsyncMode.file.value
    return value


# `sync-<job>` is the job's account on its destinations: a Unix name of at most 32 characters.
SYNC_JOB_PATTERN = r"^[a-z][a-z0-9-]{0,25}[a-z0-9]$"
SyncJobName = Annotated[str, StringConstraints(pattern=SYNC_JOB_PATTERN)]
# rclone's timetable values: a rate in bytes per second (K, M, G: KiB, MiB, GiB; bare: KiB), `off` (no limit),
# and ours: `pause` (no transfers in that window).
RATE_PATTERN = r"^(off|pause|[0-9]+(\.[0-9]+)?[KMG]?)$"


def _rate(value: str) -> str:
    if not re.fullmatch(RATE_PATTERN, value):
        raise PydanticCustomError("rate", "not a rate", {"fix": "write a rate in bytes per second such as 2M (MiB/s) "
                                  "or 500K (KiB/s), `off` (no limit) or `pause` (no transfers)"})
    return value


Rate = Annotated[str, AfterValidator(_rate)]
FilterPattern = Annotated[str, StringConstraints(pattern=r"^[^\x00\n\r]+$")]
_ENDPOINT = re.compile(r"^(?P<host>[^:/\s]+):(?P<path>/\S*)$")
_HOST_GLOB = re.compile(r"^[a-z0-9*?\[\]!-]+$")
MAX_DELETE_DEFAULT = 100


def _clean_path(path: str, what: str, fix: str) -> None:
    segments = path.split("/")[1:]
    if path != "/" and ("" in segments or any(s in (".", "..") for s in segments)):
        raise PydanticCustomError("sync-endpoint", f"the {what} path is not in its plain form (`//`, a trailing `/`, "
                                  "`.` or `..`)", {"fix": fix})


def _sync_source(value: str) -> str:
    match = _ENDPOINT.match(value)
    fix = "write `HOST:/path` or `PATTERN:/path`, e.g. `pi-*:/srv/hot` (every host whose name matches)"
    if match is None or not _HOST_GLOB.match(match["host"]):
        raise PydanticCustomError("sync-endpoint", "not a source of the form `host:/path`", {"fix": fix})
    if "{" in match["path"]:
        raise PydanticCustomError("sync-endpoint", "a source path takes no placeholder", {"fix": fix})
    _clean_path(match["path"], "source", fix)
    return value


def _sync_destination(value: str) -> str:
    match = _ENDPOINT.match(value)
    fix = "write `HOST:/path`, with `{host}` standing for each source host, e.g. `nas-1:/srv/warm/{host}`"
    if match is None or not re.fullmatch(NAME_PATTERN, match["host"]):
        raise PydanticCustomError("sync-endpoint", "not a destination of the form `host:/path`", {"fix": fix})
    if re.sub(r"\{host\}", "", match["path"]).count("{") or match["path"].count("}") != match["path"].count("{"):
        raise PydanticCustomError("sync-endpoint", "the only placeholder a destination takes is `{host}`",
                                  {"fix": fix})
    _clean_path(match["path"], "destination", fix)
    return value


SyncSource = Annotated[str, AfterValidator(_sync_source)]
SyncDestination = Annotated[str, AfterValidator(_sync_destination)]


class SyncJob(Strict):
    source: SyncSource = Field(description="`host:/path`, or a host pattern such as `pi-*:/srv/hot`: one link per "
                               "matching host.")
    destination: SyncDestination = Field(description="`host:/path`; `{host}` stands for the source host.")
    mode: SyncMode = SyncMode.copy
    include: list[FilterPattern] = Field(default_factory=list, description="rsync patterns kept despite excludes.")
    exclude: list[FilterPattern] = Field(default_factory=list, description="rsync patterns never synced.")
    bandwidth: dict[HHMM, Rate] = Field(
        default_factory=dict, description="A timetable in the fleet's time zone, e.g. {\"07:00\": \"2M\", "
        "\"23:00\": \"off\"}: each rate holds from its time until the next one (off: no limit; pause: no transfer).")
    pause_in_quiet_hours: bool = Field(
        default=False, description="No transfers during the source host's power.quiet_hours.")
    max_delete: int | None = Field(
        default=None, ge=0, le=100_000_000,
        description=f"A mirror deletes at most this many files and folders in one run, else none (default "
        f"{MAX_DELETE_DEFAULT}).")
    continuous: bool = Field(default=False, description="Changes reach the destination within seconds (a watcher "
                             "on the source host; a full pass when it starts).")
    schedule: Cron | None = Field(default=None, description="Full passes on this schedule.")
    check_schedule: Cron | None = Field(
        default="30 4 * * *", description="A full checksum compare (XXH3-128) of source and destination.")
    timeout_minutes: int = Field(default=360, ge=1, le=7 * 24 * 60, description="How long one pass may take.")
    fsync: Annotated[FsyncMode, BeforeValidator(_fsync_mode)] = Field(
        default=FsyncMode.pass_, description="When copies reach the destination's disk: `pass` (one flush of its "
        "filesystem before the pass counts as done), `file` (each file before its rename: one flush per file), "
        "`off`.")

    @model_validator(mode="after")
    def _mode_options(self) -> SyncJob:
        if self.mode is SyncMode.copy and self.max_delete is not None:
            raise PydanticCustomError("sync-mode", "max_delete is for mirrors: a copy never deletes",
                                      {"fix": "remove max_delete, or set `mode: mirror`"})
        return self

    @property
    def source_pattern(self) -> str:
        return self.source.split(":", 1)[0]

    @property
    def source_path(self) -> str:
        return self.source.split(":", 1)[1]

    @property
    def destination_host(self) -> str:
        return self.destination.split(":", 1)[0]

    @property
    def destination_path(self) -> str:
        """The destination path, `{host}` unexpanded."""
        return self.destination.split(":", 1)[1]

    @property
    def deletion_limit(self) -> int:
        return MAX_DELETE_DEFAULT if self.max_delete is None else self.max_delete


class Sync(Strict):
    client_dir: AbsPath = Field(
        default="/etc/primespark/sync", description="On source hosts: the sync key and known hosts (sync role).")
    jobs: dict[SyncJobName, SyncJob] = Field(min_length=1)


class Lab(Strict):
    wan: IPv4Network = Field(description="The WAN between the sites, made as a container network.")
    prefect_port: int = Field(default=4200, ge=1024, le=65535)
    openbao_port: int = Field(
        default=8200, ge=1024, le=65534,
        description="The lab's OpenBao (with `secrets.auth: lab`); raft's cluster listener takes the next port.")


class SecretBackend(StrEnum):
    local = "local"  # 0600 files under the environment's state directory
    vault = "vault"  # a Vault-API server (HashiCorp Vault or OpenBao), KV v2


class VaultAuth(StrEnum):
    token = "token"  # VAULT_TOKEN, or the token helper's ~/.vault-token
    approle = "approle"  # role_id from the fleet, the secret-id from VAULT_SECRET_ID or secret_id_file
    lab = "lab"  # the lab's own OpenBao: `spark lab up` runs it; its root token is in the lab's state directory


VaultUrl = Annotated[str, StringConstraints(pattern=r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?/?$")]
VaultPath = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")]


class Secrets(Strict):
    """Where the environment's secrets live; fleet files only ever hold references to them."""

    backend: SecretBackend = SecretBackend.local
    address: VaultUrl | None = Field(default=None, description="The Vault server, e.g. https://vault.example:8200.")
    auth: VaultAuth = VaultAuth.token
    mount: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]+$")] = Field(
        default="secret", description="The KV v2 mount of the environment's own keys (`local:` references).")
    prefix: VaultPath = Field(
        default="primespark", description="Keys live at <mount>/<prefix>/<environment>/<key>, field `value`.")
    role_id: str | None = Field(default=None, description="The AppRole role-id (auth: approle); not a secret.")
    secret_id_file: AbsPath | None = Field(
        default=None, description="A 0600 file holding the AppRole secret-id (auth: approle), if VAULT_SECRET_ID "
        "is not set.")


class Tls(Strict):
    """The fleet's certificate authority (primespark.pki): one certificate per host for its names and its LAN
    and mesh addresses, issued by the PKI engine of the fleet's Vault/OpenBao."""

    lifetime_hours: int = Field(
        default=24, ge=1, le=8_760, description="How long a host's certificate is valid (≤ a year); it is renewed "
        "at two thirds of its life, so short lifetimes need no revocation.")


class Audit(Strict):
    """The audit log (primespark.audit), on the controller and on every worker alike."""

    checkpoint_every: int = Field(
        default=100, ge=1, le=1_000_000, description="A signed checkpoint of the chain every this many records "
        "(SPARK_AUDIT_CHECKPOINT_EVERY on a machine overrides it).")


DEPLOYMENT_NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}[a-z0-9]$"
DeploymentName = Annotated[str, StringConstraints(pattern=DEPLOYMENT_NAME_PATTERN)]


def _host_shorthand(value: object) -> object:
    """`server: ops-1` and `edge: nas-1` stand for `{host: ops-1}` and `{host: nas-1}`."""
    return {"host": value} if isinstance(value, str) else value


class PrefectServer(Strict):
    host: Name = Field(description="The host the Prefect server (API and UI) runs on: the cloud ops VM.")
    port: int = Field(default=4200, ge=1024, le=65535)
    database: SecretRef | None = Field(
        default=None, description="A reference to a PostgreSQL connection URL (postgresql+asyncpg://…) the server "
        "uses; default: SQLite on the server's host.")
    postgresql: bool = Field(
        default=False, description="Keep the server's database in Debian's PostgreSQL on the server's own host, "
        "reached over its Unix socket with peer authentication (no port, no password). SQLite, the default, lets "
        "one writer in at a time: under concurrent flow runs the API answers some requests 503, which Prefect's "
        "client retries after 2, 4, 8 and 16 s.")

    @model_validator(mode="after")
    def _one_database(self) -> PrefectServer:
        if self.postgresql and self.database is not None:
            raise ValueError("`postgresql: true` runs the server's own database; `database` names another one: "
                             "keep one of them")
        return self


class Worker(Strict):
    host: Name = Field(description="The host this site's worker runs on (a host of the site).")
    limit: int = Field(default=4, ge=1, le=64, description="Flow runs the worker runs at once.")


class DeploymentPlacement(Strict):
    pool: Name | None = Field(default=None, description="The work pool (`spark-<site>`) instead of the one of "
                              "the site whose hosts the deployment touches.")
    paused: bool = Field(default=False, description="Created with its schedule paused.")
    crash_retries: int | None = Field(
        default=None, ge=0, le=10, description="Instead of orchestration.crash_retries for this deployment.")


class Orchestration(Strict):
    """Where flows run: one Prefect server, one `process` work pool per site (`spark-<site>`) with one worker."""

    server: Annotated[PrefectServer, BeforeValidator(_host_shorthand)]
    workers: dict[Name, Annotated[Worker, BeforeValidator(_host_shorthand)]] = Field(
        default_factory=dict, description="Keyed by site: the host of that site's worker.")
    auth: SecretRef = Field(
        default="local:orchestration/prefect-auth",
        description="The Prefect API's basic-auth string (`user:password`), made on first use: the server, "
        "its workers and the CLI use it.")
    poll_seconds: float = Field(
        default=1, ge=0.5, le=60, description="How often a worker asks for runs to start (Prefect's default: 10): "
        "one small query per worker each time; a run waits half of it on average before its worker takes it.")
    heartbeat_seconds: int = Field(
        default=30, ge=30, le=3600, description="Flow-run heartbeats of worker runs; a run silent for two "
        "intervals is marked Crashed.")
    crash_retries: int = Field(
        default=1, ge=0, le=10, description="How often a deployment's run that crashed (its worker died) is "
        "scheduled again.")
    deployments: dict[DeploymentName, DeploymentPlacement] = Field(
        default_factory=dict, description="Per deployment (e.g. backup-pi-1): another pool, or paused.")


# --- agent tasks (primespark.agents): templates of AI and compute jobs, placed by capacity, power and data -------

# Where a task's data is: `host:/path` (that host's copy, and the copies sync and tier migration keep below it), or
# `/path` in a tier (on every host of that tier).
DATA_REF_PATTERN = r"^([a-z][a-z0-9-]{0,30}[a-z0-9]:)?/[^\x00\s]*$"
DataRef = Annotated[str, StringConstraints(pattern=DATA_REF_PATTERN)]


def _one_or_more(value: object) -> object:
    """`arch: aarch64` stands for `arch: [aarch64]`."""
    return [value] if isinstance(value, str) else value


class TaskPower(Strict):
    run_in_quiet_hours: bool = Field(
        default=False, description="May start on a Pi during its power.quiet_hours (default: never).")
    min_battery_percent: int = Field(
        default=50, ge=1, le=100, description="On a host running on battery, start only above this charge (and "
        "never at or below the host's shutdown_battery_percent).")
    on_power_loss: Literal["requeue", "pause"] = Field(
        default="requeue", description="When quiet hours start or the battery runs low on its host while it runs and "
        "it may not run then: `requeue` stops it (placed again elsewhere, its retries kept), `pause` stops its "
        "processes (SIGSTOP) until quiet hours end (a low-battery halt requeues it all the same).")


class TaskSpec(Strict):
    """One agent task: what it runs, what it needs, what it reads, how it may use power."""

    command: Annotated[str, StringConstraints(min_length=1, pattern=r"^[^\x00]*\S[^\x00]*$")] = Field(
        description="A shell command line, run on the chosen host (inside `image` where one is given).")
    image: ContainerImage | None = Field(
        default=None, description="A pinned container image: only hosts with container_runtime take the task.")
    cpus: float = Field(default=1.0, gt=0, le=512, description="CPUs the task keeps busy (fractions allowed).")
    memory_mb: int = Field(default=256, ge=1, le=4_194_304, description="Memory the task needs (MiB).")
    arch: Annotated[list[Arch], BeforeValidator(_one_or_more)] = Field(
        default_factory=list, description="Architectures it runs on (one or a list); empty: any.")
    labels: dict[Name, str] = Field(default_factory=dict, description="Host labels the host must carry, all of "
                                    "them with these values.")
    data: list[DataRef] = Field(default_factory=list, description="What it reads: `host:/path` or a tier path "
                                "`/srv/hot/...`; placement prefers hosts (then sites) that hold it.")
    priority: int = Field(default=50, ge=0, le=100, description="Higher runs first when the queue is ordered.")
    timeout_minutes: int = Field(default=60, ge=1, le=7 * 24 * 60, description="How long one attempt may run.")
    retries: int = Field(default=0, ge=0, le=10, description="Attempts after a failed one.")
    power: TaskPower = TaskPower()
    prefer_edge: bool = Field(default=True, description="Other things equal, an edge host over a cloud one.")



class Fleet(Strict):
    name: Name
    domain: Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")] = "fleet.internal"
    timezone: str = "UTC"
    sites: dict[Name, Site] = Field(min_length=1)
    hosts: dict[Name, Host] = Field(min_length=1)
    images: dict[Name, Image] = Field(default_factory=dict)
    meshes: dict[Name, Mesh] = Field(default_factory=dict)
    tiers: dict[TierName, Tier] = Field(default_factory=dict)
    backup: Backup | None = None
    sync: Sync | None = Field(default=None, description="One-way sync jobs between hosts (primespark.data.sync).")
    services: dict[Name, Service] = Field(default_factory=dict)
    lab: Lab | None = None
    secrets: Secrets = Secrets()
    tls: Tls = Field(default_factory=Tls, description="Host certificates from the fleet CA (primespark.pki).")
    audit: Audit = Field(default_factory=Audit, description="The audit log's checkpoints (primespark.audit).")
    orchestration: Orchestration | None = Field(
        default=None, description="The Prefect server and one worker per site; without it flows run where `spark` "
        "runs.")
    tasks: dict[Name, TaskSpec] = Field(
        default_factory=dict, description="Named agent task templates (`spark task plan --template NAME`).")
    operators: dict[UserName, Operator] = Field(
        default_factory=dict, description="People who log in to every managed host, besides its SSH user."
    )
    monitoring: Monitoring = Monitoring()
    admin_networks: list[IPv4Network] = Field(
        default_factory=list,
        description="Where operators reach hosts that have a public address from; empty: anywhere (keys only).",
    )
    ntp_servers: list[str] = Field(
        default_factory=lambda: ["pool.ntp.org"], description="Time sources (none in the lab)."
    )

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_]+(/[A-Za-z0-9_+-]+)*", value):
            raise ValueError(f"{value!r} is not an IANA time zone name such as Europe/Berlin")
        return value

    # Derived views: consumers ask the model rather than re-deriving.
    def hosts_of(self, *kinds: HostKind) -> dict[str, Host]:
        return {n: h for n, h in self.hosts.items() if h.kind in kinds}

    def vms_on(self, kvm_host: str) -> dict[str, Host]:
        return {n: h for n, h in self.hosts.items() if h.vm is not None and h.vm.kvm_host == kvm_host}

    @cached_property
    def _services_by_host(self) -> dict[str, dict[str, Service]]:
        index: dict[str, dict[str, Service]] = {}
        for name, service in self.services.items():
            index.setdefault(service.host, {})[name] = service
        return index

    @cached_property
    def _mesh_members(self) -> dict[str, list[str]]:
        return {
            mesh: list(spec.members) if spec.members is not None
            else [n for n, h in self.hosts.items() if h.kind is not HostKind.kvm_host]
            for mesh, spec in self.meshes.items()
        }

    def services_on(self, host: str) -> dict[str, Service]:
        return dict(self._services_by_host.get(host, {}))

    def mesh_members(self, mesh: str) -> list[str]:
        return list(self._mesh_members[mesh])

    @cached_property
    def _mesh_member_sets(self) -> dict[str, frozenset[str]]:
        return {mesh: frozenset(members) for mesh, members in self._mesh_members.items()}

    def in_mesh(self, mesh: str, host: str) -> bool:
        return host in self._mesh_member_sets[mesh]

    def behind_nat(self, host: str) -> bool:
        return self.sites[self.hosts[host].site].behind_nat

    def secret_references(self) -> dict[tuple[str, ...], str]:
        """Every secret reference in the fleet, by where it is written."""
        if self.backup is None:
            return {}
        return {("backup", "repositories", name, "password"): repo.password
                for name, repo in self.backup.repositories.items()}

    def vault_mounts(self) -> list[str]:
        """The KV v2 mounts the fleet's secrets use: the environment's own and every `vault:` reference's."""
        if self.secrets.backend is not SecretBackend.vault:
            return []
        mounts = [self.secrets.mount]
        for reference in self.secret_references().values():
            kind, _, rest = reference.partition(":")
            if kind == "vault":
                mounts.append(rest.split("/", 1)[0])
        return list(dict.fromkeys(mounts))
