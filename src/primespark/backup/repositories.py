"""Which restic repository holds a host's backups, how a host reaches it, and with which credentials.

Each client host owns its own restic repository inside the fleet repository's folder on the storage host
(`<repository path>/<client>/repo`, an SFTP-only account `backup-<client>` chrooted to `<path>/<client>`),
as `primespark.inventory.backup_accounts` lays out for the `nas` role: restic cannot share one repository
between Unix users. The offsite repository mirrors that layout, one copy per client.

With the local transport (tests, benchmarks) every host is this machine and every repository a folder at its
path; the folders a host keeps (manifests, their cache, drill scratch) then live under the state directory,
one per host.
"""

from __future__ import annotations

import fcntl
import secrets as pysecrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from primespark.context import FleetContext
from primespark.errors import UserError
from primespark.fleet import Fleet
from primespark.fleet.model import Backup
from primespark.hosts import Completed, Runner
from primespark.restic import ResticClient, StaleLockReport
from primespark.secrets import SecretNotFound, ensure_reference, read_reference, ssh_key_pair

# Where a backup keeps its manifest on the host (0700, root; one file, this run's), the last manifest per
# repository (its cache: unchanged files keep their hash), and where drills restore.
MANIFEST_ROOT = "/var/lib/primespark/manifests"
MANIFEST_CACHE_ROOT = "/var/cache/primespark/manifests"
SCRATCH_ROOT = "/var/tmp/primespark-drill"


def account_for(client: str) -> str:
    return f"backup-{client}"[:32]


def client_key_secret(client: str) -> str:
    return f"restic/ssh/{client}"


def backup_of(fleet: Fleet) -> Backup:
    if fleet.backup is None:
        raise UserError(f"the fleet {fleet.name!r} has no backup policy", "add a `backup:` section to the fleet file")
    return fleet.backup


@dataclass(frozen=True)
class HostPlan:
    host: str
    repository: str
    paths: list[str]
    excludes: list[str]
    schedule: str


def plan_of(ctx: FleetContext, host: str) -> HostPlan:
    """The host's plan, with the backup paths of the services it runs."""
    plans = backup_of(ctx.fleet).plans
    if host not in plans:
        raise UserError(f"{host!r} has no backup plan in the fleet {ctx.fleet.name!r}",
                        f"back up one of: {', '.join(plans) or 'none'}, or add `backup.plans.{host}`")
    plan = plans[host]
    paths = list(dict.fromkeys([*plan.paths, *(p for s in ctx.fleet.services_on(host).values()
                                                for p in s.backup_paths)]))
    return HostPlan(host, plan.repository, paths, list(plan.excludes), plan.schedule)


def offsite_of(ctx: FleetContext, repository: str) -> list[str]:
    """The repositories that copy `repository` (its offsite copies)."""
    return [n for n, r in backup_of(ctx.fleet).repositories.items() if r.copy_from == repository]


def clients_of(ctx: FleetContext, repository: str) -> list[str]:
    """The hosts whose backups are in `repository` (or in the primary it copies)."""
    backup = backup_of(ctx.fleet)
    primary = backup.repositories[repository].copy_from or repository
    return [h for h, p in backup.plans.items() if p.repository == primary]


# --- where things are --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    url: str
    options: dict[str, str] = field(default_factory=dict)


def address_from(fleet: Fleet, via: str, target: str) -> str:
    """How `via` reaches `target`: on the same site its LAN address, across sites its public one."""
    src, dst = fleet.hosts[via], fleet.hosts[target]
    if src.site == dst.site or via == target:
        return str(dst.address)
    if dst.public_address is None:
        raise UserError(f"{via} cannot reach the repository host {target}: it is on another site and has "
                        "no public_address", f"give {target} a public_address in the fleet file")
    return str(dst.public_address)


def location(ctx: FleetContext, repository: str, client: str, via: str) -> Location:
    """`client`'s repository inside `repository`, as host `via` reaches it.

    Over SSH the settings (key `<client_dir>/<account>.key`, known hosts, keepalives) come from the ssh_config
    drop-in the restic role installs, matched on the account name: `restic copy` opens two SFTP repositories
    in one process, and restic's `-o sftp.command` would send both to the same place."""
    repo = backup_of(ctx.fleet).repositories[repository]
    if ctx.transport == "local":
        return Location(f"{repo.path.rstrip('/')}/{client}/repo")
    port = ctx.fleet.hosts[repo.host].ssh.port
    return Location(f"sftp://{account_for(client)}@{address_from(ctx.fleet, via, repo.host)}:{port}//repo")


@dataclass(frozen=True)
class HostFolders:
    """The folders a host keeps for backups and drills."""

    manifests: str
    cache: str
    scratch: str

    def manifest_dir(self, repository: str) -> str:
        return f"{self.manifests}/{repository}"

    def cache_file(self, repository: str) -> str:
        return f"{self.cache}/{repository}.json"


def repository_folder(ctx: FleetContext, repository: str, client: str) -> str:
    """Where `client`'s repository inside `repository` lives, for an operator to look: a folder on a host."""
    repo = backup_of(ctx.fleet).repositories[repository]
    folder = f"{repo.path.rstrip('/')}/{client}/repo"
    return folder if ctx.transport == "local" else f"{folder} on {repo.host}"


def start_over_command(ctx: FleetContext, repository: str, client: str) -> str:
    """The command that starts a client's repository over on purpose."""
    return f"spark backup init {repository} --client {client} --env {ctx.env}"


def folders_on(ctx: FleetContext, host: str) -> HostFolders:
    if ctx.transport == "local":  # every host is this machine: one set of folders per host, in the state dir
        base = ctx.state_dir
        return HostFolders(f"{base}/manifests/{host}", f"{base}/manifest-cache/{host}", f"{base}/drill-scratch/{host}")
    return HostFolders(MANIFEST_ROOT, MANIFEST_CACHE_ROOT, SCRATCH_ROOT)


def host_of_lock(ctx: FleetContext, hostname: str) -> str | None:
    """The fleet host a restic lock's hostname names (with the local transport, any lock taken here)."""
    if ctx.transport == "local":
        import socket

        return next(iter(ctx.fleet.hosts)) if hostname == socket.gethostname() else None
    short = hostname.split(".")[0]
    return short if short in ctx.fleet.hosts else None


# --- credentials and clients -------------------------------------------------------------------------------


def password(ctx: FleetContext, repository: str, create: bool = False) -> str:
    """The repository's password, where its reference points; made there on first use (`create`)."""
    reference = backup_of(ctx.fleet).repositories[repository].password
    if create:
        return ensure_reference(reference, ctx.secrets, lambda: pysecrets.token_urlsafe(32))
    try:
        return read_reference(reference, ctx.secrets)
    except SecretNotFound:
        raise UserError(f"no password for the restic repository {repository!r} ({reference})",
                        f"run `spark backup now --env {ctx.env}` once: it creates the repository "
                        "and its password") from None


def client_key(ctx: FleetContext, client: str) -> tuple[str, str]:
    """The client's SFTP key pair (private OpenSSH PEM, public line), made once into the secret store."""
    return ssh_key_pair(f"local:{client_key_secret(client)}", ctx.secrets, f"{account_for(client)}@{ctx.fleet.name}")


def held_here(ctx: FleetContext, repository: str) -> bool:
    """Whether this process holds the repository's password: anywhere but on a site's worker, which holds only
    its own site's (`placement.worker_repositories`)."""
    site = ctx.settings.worker_site
    if site is None:
        return True
    from primespark.orchestration.placement import worker_repositories

    return repository in worker_repositories(ctx.fleet, site)


def password_file(ctx: FleetContext, repository: str) -> str:
    """Where the restic role put the repository's password on a backup client."""
    return f"{backup_of(ctx.fleet).client_dir}/{repository}.password"


def restic_for(ctx: FleetContext, repository: str, client: str, via: str | None = None,
               create: bool = False) -> ResticClient:
    """The restic repository holding `client`'s data in `repository`, as host `via` (default: the client)
    reaches it. Each call has a timeout: a short step's unless the call gives a longer one (`long_step`). A
    repository whose password this process does not hold (a worker copying into another site's repository) is
    opened with the password file on `via`."""
    via = via or client
    where = location(ctx, repository, client, via)
    timeout = backup_of(ctx.fleet).timeouts.command_seconds
    if ctx.transport == "ssh" and not held_here(ctx, repository):
        return ResticClient(where.url, "", ctx.hosts.runner(via), where.options,
                            password_file=password_file(ctx, repository), timeout=timeout)
    return ResticClient(where.url, password(ctx, repository, create), ctx.hosts.runner(via), where.options,
                        timeout=timeout)


# --- how long a step may run ---------------------------------------------------------------------------------


def long_step(ctx: FleetContext, size_bytes: float | None) -> float:
    """Seconds a step moving `size_bytes` may take (backup.timeouts): the size at the slowest expected rate,
    within the fleet's minimum and maximum; the maximum when the size is not known yet."""
    limits = backup_of(ctx.fleet).timeouts
    if size_bytes is None:
        return limits.maximum_hours * 3600
    return min(max(limits.minimum_minutes * 60, size_bytes / (limits.throughput_mb_s * 1e6)),
               limits.maximum_hours * 3600)


class AsAccount:
    """A host's runner whose commands run as one backup account (`runuser`): restic then writes files that
    account owns, as if it came over SFTP."""

    def __init__(self, runner: Runner, account: str) -> None:
        self.runner = runner
        self.account = account
        self.name = runner.name
        self.remote = runner.remote
        self.python = runner.python

    def run(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, stdin: bytes | None = None,
            timeout: float | None = None) -> Completed:
        # the account's home is its chroot (root's): restic keeps its cache elsewhere
        cache = {"RESTIC_CACHE_DIR": f"/var/tmp/primespark-restic-{self.account}"}
        return self.runner.run(["runuser", "-u", self.account, "--", *argv], env={**cache, **(env or {})},
                               stdin=stdin, timeout=timeout)

    def pid_alive(self, pid: int) -> bool:
        return self.runner.pid_alive(pid)


def restic_on_store(ctx: FleetContext, repository: str, client: str) -> ResticClient:
    """`client`'s repository inside `repository`, opened on the repository's own host as the client's backup
    account (no SFTP, no key): how a site's worker maintains the repositories its site stores."""
    repo = backup_of(ctx.fleet).repositories[repository]
    if ctx.transport == "local":
        return restic_for(ctx, repository, client)
    url = f"{repo.path.rstrip('/')}/{client}/repo"
    runner = AsAccount(ctx.hosts.runner(repo.host), account_for(client))
    return ResticClient(url, password(ctx, repository), runner, timeout=backup_of(ctx.fleet).timeouts.command_seconds)


def reachable(ctx: FleetContext, host: str) -> bool:
    """Whether this process reaches `host`: a site's worker reaches its own site's hosts only."""
    site = ctx.settings.worker_site
    return site is None or ctx.fleet.hosts[host].site == site


def clear_stale_locks(ctx: FleetContext, repository: str, client: str, via: str | None = None,
                      on_store: bool = False) -> StaleLockReport:
    store = backup_of(ctx.fleet).repositories[repository].host

    def client_on(hostname: str) -> ResticClient | None:
        owner = host_of_lock(ctx, hostname)
        if owner is None or not reachable(ctx, owner):
            return None  # a lock of a host out of reach stays (unresolved): never remove a live writer's
        if on_store and owner == store:
            return restic_on_store(ctx, repository, client)
        return restic_for(ctx, repository, client, via=owner)

    start = restic_on_store(ctx, repository, client) if on_store else restic_for(ctx, repository, client, via)
    return start.clear_stale_locks(client_on)


# --- what the restic role installs -------------------------------------------------------------------------


def host_material(env: str, host: str) -> dict[str, object]:
    """What the `restic` role installs on `host`: SFTP keys (its own; every client's on the drill's scratch
    host), repository passwords, and the public key the NAS must authorise. Made in the store on first use."""
    ctx = FleetContext.load(env, "ssh")
    # Ansible looks this up for many hosts at once, in parallel processes: make each secret exactly once.
    with open(ctx.state_dir / ".backup-material.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _host_material(ctx, host)


def _host_material(ctx: FleetContext, host: str) -> dict[str, object]:
    backup = backup_of(ctx.fleet)
    clients = [c for c in backup.plans if c == host or host == backup.drill.scratch_host]
    keys, repositories, passwords = [], [], {}
    for client in clients:
        private, public = client_key(ctx, client)
        keys.append({"client": client, "account": account_for(client), "private_key": private,
                     "public_key": public})
        for repository in [backup.plans[client].repository, *offsite_of(ctx, backup.plans[client].repository)]:
            passwords[repository] = password(ctx, repository, create=True)
            where = location(ctx, repository, client, host)
            repositories.append({"repository": repository, "client": client, "url": where.url})
    return {
        "client_keys": keys,
        "repositories": [{**r, "password": passwords[str(r["repository"])]} for r in repositories],
        "public_keys": [k["public_key"] for k in keys if k["client"] == host],
    }
