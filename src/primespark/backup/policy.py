"""The fleet's backup policy turned into restic clients: which repository, reached how, from which host.

Each client host owns its own restic repository inside the fleet repository's folder on the storage host
(`<repository path>/<client>/repo`, an SFTP-only account `backup-<client>` chrooted to `<path>/<client>`),
as `primespark.inventory.backup_accounts` lays out for the `nas` role: restic cannot share one repository
between Unix users. The offsite repository mirrors that layout, one copy per client.
"""

from __future__ import annotations

import fcntl
import secrets as pysecrets
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from primespark.errors import UserError
from primespark.fleet import Fleet, load_fleet
from primespark.fleet.model import Backup, BackupPlan
from primespark.restic import LocalRunner, ResticClient, Runner, StaleLockReport
from primespark.secrets import SecretError, SecretStore, resolve, secret_store
from primespark.settings import Settings, settings_for

TransportName = Literal["ssh", "local"]
BACKUP_TAG = "primespark-backup"
MANIFEST_TAG = "primespark-manifest"
SCRATCH_ROOT = "/var/tmp/primespark-drill"
# Last manifest per repository on each client host (0600, root): unchanged files keep their hash.
MANIFEST_CACHE_ROOT = "/var/cache/primespark/manifests"
# The folder each backup saves its manifest in, beside the data (0700, root; one file, this run's).
MANIFEST_ROOT = "/var/lib/primespark/manifests"


def account_for(client: str) -> str:
    return f"backup-{client}"[:32]


def limit_name(repository: str) -> str:
    """The Prefect global concurrency limit that lets one writer at a time into a fleet repository."""
    return f"restic-{repository}"


def secret_key(reference: str) -> str:
    """The store key `primespark.secrets.resolve` reads for a reference (to create missing secrets)."""
    kind, _, rest = reference.partition(":")
    if kind == "local":
        return rest
    path, _, key = rest.partition("#")
    return f"{path.split('/', 1)[-1]}/{key}"


def client_key_secret(client: str) -> str:
    return f"restic/ssh/{client}"


@dataclass(frozen=True)
class HostPlan:
    host: str
    repository: str
    paths: list[str]
    excludes: list[str]
    schedule: str


@dataclass(frozen=True)
class Location:
    url: str
    options: dict[str, str] = field(default_factory=dict)


class Transport(Protocol):
    def runner(self, host: str) -> Runner: ...
    def location(self, repository: str, client: str, via: str) -> Location: ...
    def scratch_root(self, host: str) -> str: ...
    def cache_file(self, host: str, repository: str) -> str: ...
    def manifest_dir(self, host: str, repository: str) -> str: ...
    def host_of_lock(self, hostname: str) -> str | None: ...


class SshTransport:
    """Production and lab: restic runs on the hosts, repositories are SFTP accounts on their storage hosts."""

    def __init__(self, fleet: Fleet, settings: Settings) -> None:
        self.fleet = fleet
        self.ssh_dir = settings.state_dir(fleet.name) / "ssh"

    def runner(self, host: str) -> Runner:
        from primespark.backup.remote import SshRunner

        spec = self.fleet.hosts[host]
        key = self.ssh_dir / "id_ed25519"
        known = self.ssh_dir / "known_hosts"
        return SshRunner(host, str(spec.ssh_address), spec.ssh.user, spec.ssh.port,
                         key if key.is_file() else None, known if known.is_file() else None)

    def address_from(self, via: str, target: str) -> str:
        """How `via` reaches `target`: on the same site its LAN address, across sites its public one."""
        src, dst = self.fleet.hosts[via], self.fleet.hosts[target]
        if src.site == dst.site or via == target:
            return str(dst.address)
        if dst.public_address is None:
            raise UserError(f"{via} cannot reach the repository host {target}: it is on another site and has "
                            "no public_address", f"give {target} a public_address in the fleet file")
        return str(dst.public_address)

    def location(self, repository: str, client: str, via: str) -> Location:
        """The SSH settings (key `<client_dir>/<account>.key`, known hosts, keepalives) come from the ssh_config
        drop-in the restic role installs, matched on the account name: `restic copy` opens two SFTP
        repositories in one process, and restic's `-o sftp.command` would send both to the same place."""
        repo = _backup(self.fleet).repositories[repository]
        port = self.fleet.hosts[repo.host].ssh.port
        return Location(f"sftp://{account_for(client)}@{self.address_from(via, repo.host)}:{port}//repo")

    def scratch_root(self, host: str) -> str:
        return SCRATCH_ROOT

    def cache_file(self, host: str, repository: str) -> str:
        return f"{MANIFEST_CACHE_ROOT}/{repository}.json"

    def manifest_dir(self, host: str, repository: str) -> str:
        return f"{MANIFEST_ROOT}/{repository}"

    def host_of_lock(self, hostname: str) -> str | None:
        short = hostname.split(".")[0]
        return short if short in self.fleet.hosts else None


class LocalTransport:
    """Tests and benchmarks: every host is this machine, every repository a local folder at its path."""

    def __init__(self, fleet: Fleet, scratch: str, cache: str, manifests: str) -> None:
        self.fleet = fleet
        self.scratch = scratch
        self.cache = cache
        self.manifests = manifests

    def runner(self, host: str) -> Runner:
        return LocalRunner(host)

    def location(self, repository: str, client: str, via: str) -> Location:
        repo = _backup(self.fleet).repositories[repository]
        return Location(f"{repo.path.rstrip('/')}/{client}/repo")

    def scratch_root(self, host: str) -> str:
        return f"{self.scratch}/{host}"

    def cache_file(self, host: str, repository: str) -> str:
        return f"{self.cache}/{host}/{repository}.json"

    def manifest_dir(self, host: str, repository: str) -> str:
        return f"{self.manifests}/{host}/{repository}"

    def host_of_lock(self, hostname: str) -> str | None:
        return next(iter(self.fleet.hosts)) if hostname == socket.gethostname() else None


def _backup(fleet: Fleet) -> Backup:
    if fleet.backup is None:
        raise UserError(f"the fleet {fleet.name!r} has no backup policy", "add a `backup:` section to the fleet file")
    return fleet.backup


@dataclass
class BackupContext:
    """Everything a flow needs: the fleet, where commands run, and the secret store."""

    env: str
    fleet: Fleet
    transport: Transport
    store: SecretStore
    settings: Settings

    @classmethod
    def load(cls, env: str, transport: TransportName = "ssh") -> BackupContext:
        fleet = load_fleet(env)
        name = fleet.name if Path(env).suffix in (".yaml", ".yml") else env
        settings = settings_for(name)
        chosen: Transport = (SshTransport(fleet, settings) if transport == "ssh"
                             else LocalTransport(fleet, *(str(settings.state_dir(name) / d) for d in
                                                          ("drill-scratch", "manifest-cache", "manifests"))))
        return cls(name, fleet, chosen, secret_store(name, settings), settings)

    @property
    def backup(self) -> Backup:
        return _backup(self.fleet)

    def plan(self, host: str) -> HostPlan:
        plans: dict[str, BackupPlan] = self.backup.plans
        if host not in plans:
            raise UserError(f"{host!r} has no backup plan in the fleet {self.fleet.name!r}",
                            f"back up one of: {', '.join(plans) or 'none'}, or add `backup.plans.{host}`")
        plan = plans[host]
        paths = list(dict.fromkeys([*plan.paths, *(p for s in self.fleet.services_on(host).values()
                                                    for p in s.backup_paths)]))
        return HostPlan(host, plan.repository, paths, list(plan.excludes), plan.schedule)

    def offsite_of(self, repository: str) -> list[str]:
        return [n for n, r in self.backup.repositories.items() if r.copy_from == repository]

    def password(self, repository: str, create: bool = False) -> str:
        reference = self.backup.repositories[repository].password
        try:
            return resolve(reference, self.store)
        except SecretError:
            if not create:
                raise UserError(f"no password for the restic repository {repository!r} ({reference})",
                                f"run `spark backup now <host> {self.env}` once: it creates the repository "
                                "and its password") from None
        value = pysecrets.token_urlsafe(32)
        self.store.put(secret_key(reference), value)
        return value

    def client_key(self, client: str) -> tuple[str, str]:
        """The client's SFTP key pair (private OpenSSH PEM, public line), made once into the secret store."""
        key = client_key_secret(client)
        if self.store.exists(key):
            private = serialization.load_ssh_private_key(self.store.get(key).encode(), password=None)
        else:
            private = Ed25519PrivateKey.generate()
            pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                        serialization.NoEncryption())
            self.store.put(key, pem.decode())
        public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        return self.store.get(key), f"{public.decode()} {account_for(client)}@{self.fleet.name}"

    def client(self, repository: str, client: str, via: str | None = None, create: bool = False) -> ResticClient:
        """The restic repository holding `client`'s data in `repository`, as host `via` reaches it."""
        via = via or client
        where = self.transport.location(repository, client, via)
        return ResticClient(where.url, self.password(repository, create), self.transport.runner(via), where.options)

    def clear_stale_locks(self, repository: str, client: str, via: str | None = None) -> StaleLockReport:
        def client_on(hostname: str) -> ResticClient | None:
            owner = self.transport.host_of_lock(hostname)
            return None if owner is None else self.client(repository, client, via=owner)

        return self.client(repository, client, via).clear_stale_locks(client_on)

    def scratch_dir(self, scratch: str, host: str, stamp: str) -> str:
        return f"{self.transport.scratch_root(scratch)}/{host}-{stamp}"


def host_material(env: str, host: str) -> dict[str, object]:
    """What the `restic` role installs on `host`: SFTP keys (its own; every client's on the drill's scratch
    host), repository passwords, and the public key the NAS must authorise. Made in the store on first use."""
    ctx = BackupContext.load(env, "ssh")
    # Ansible looks this up for many hosts at once, in parallel processes: make each secret exactly once.
    with open(ctx.settings.state_dir(ctx.env) / ".backup-material.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _host_material(ctx, host)


def _host_material(ctx: BackupContext, host: str) -> dict[str, object]:
    plans = ctx.backup.plans
    clients = [c for c in plans if c == host or host == ctx.backup.drill.scratch_host]
    keys, repositories, passwords = [], [], {}
    for client in clients:
        private, public = ctx.client_key(client)
        keys.append({"client": client, "account": account_for(client), "private_key": private,
                     "public_key": public})
        for repository in [plans[client].repository, *ctx.offsite_of(plans[client].repository)]:
            passwords[repository] = ctx.password(repository, create=True)
            where = ctx.transport.location(repository, client, host)
            repositories.append({"repository": repository, "client": client, "url": where.url})
    return {
        "client_keys": keys,
        "repositories": [{**r, "password": passwords[str(r["repository"])]} for r in repositories],
        "public_keys": [k["public_key"] for k in keys if k["client"] == host],
    }
