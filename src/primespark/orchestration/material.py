"""What the Prefect server's host and each worker's host get from the controller (the roles' lookups read this).

A worker holds only what its site needs (docs/workers.md): its own SSH key (one per worker, made in the secret
store, authorised for the fleet user on its site's hosts), the known host keys of those hosts, the passwords of
the repositories its pool's deployments open (`placement.worker_repositories`), the API's auth string, and the
controller's records of the client repositories those deployments open (`placement.worker_client_repositories`):
a worker makes no repository, so it opens only those (`backup/records.py`). The controller's own key is never
part of it.
"""

from __future__ import annotations

import secrets as pysecrets
import subprocess
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from primespark.backup import records
from primespark.context import FleetContext
from primespark.errors import UserError
from primespark.fleet.loader import resolve
from primespark.fleet.model import Fleet, Orchestration, SecretBackend, VaultAuth
from primespark.hosts import SshFiles
from primespark.orchestration.naming import work_pool
from primespark.orchestration.placement import site_hosts, worker_client_repositories, worker_repositories
from primespark.pki import HOST_TLS_FOLDER, HOST_VAULT_CA, serves_tls
from primespark.secrets import ensure_reference, read_reference, ssh_key_pair

# Where things live on the hosts (the roles' defaults say the same; tests/unit/test_orchestration_roles.py checks).
WORKER_HOME = "/var/lib/primespark/worker"
SERVER_HOME = "/var/lib/primespark/prefect-server"
# orchestration.server.postgresql: the prefect_server role's cluster on the server's host, over its Unix socket
# (asyncpg takes the socket's folder as `host`); peer authentication maps the server's OS user (root) to `prefect`
LOCAL_POSTGRESQL_URL = "postgresql+asyncpg://prefect@/prefect?host=/var/run/postgresql"
AUTH_USER = "spark"


def orchestration_of(fleet: Fleet) -> Orchestration:
    if fleet.orchestration is None:
        raise UserError(f"the fleet {fleet.name!r} has no orchestration section: flows run where `spark` runs",
                        "add `orchestration: {server: <host>, workers: {<site>: <host>}}` (docs/workers.md)")
    return fleet.orchestration


def auth_string(ctx: FleetContext) -> str:
    """`user:password` for Prefect's basic auth, made once in the secret store."""
    spec = orchestration_of(ctx.fleet)
    return ensure_reference(spec.auth, ctx.secrets, lambda: f"{AUTH_USER}:{pysecrets.token_urlsafe(24)}")


def mesh_address(ctx: FleetContext, host: str, peer: str | None = None) -> IPv4Address | None:
    """`host`'s address on the first mesh it shares with `peer` (any mesh when no peer), from the saved plan."""
    for mesh in ctx.fleet.meshes:
        if ctx.fleet.in_mesh(mesh, host) and (peer is None or ctx.fleet.in_mesh(mesh, peer)):
            return _address_in(ctx, mesh, host)
    return None


def server_addresses(ctx: FleetContext) -> list[str]:
    """Where the server listens: its LAN address and its mesh addresses, nothing else."""
    spec = orchestration_of(ctx.fleet)
    server = spec.server.host
    found = [str(ctx.fleet.hosts[server].address)]
    found += [str(a) for m in ctx.fleet.meshes if ctx.fleet.in_mesh(m, server)
              if (a := _address_in(ctx, m, server)) is not None]
    return list(dict.fromkeys(found))


def _address_in(ctx: FleetContext, mesh: str, host: str) -> IPv4Address | None:
    from primespark.mesh.plan import load_state

    state = load_state(ctx.state_dir, mesh)
    if state is None or host not in state.hosts:
        raise UserError(f"mesh {mesh} has no saved plan with {host} yet",
                        f"run `spark mesh plan --env {ctx.env}` (site.yml's wireguard play does) first")
    return state.address_of(host)


def api_url(ctx: FleetContext, from_host: str | None = None) -> str:
    """The API as `from_host` reaches it: on the server's LAN from its own site (and from the controller, which
    reaches the LAN), over the mesh from another site."""
    spec = orchestration_of(ctx.fleet)
    server = spec.server.host
    address: IPv4Address | None = ctx.fleet.hosts[server].address
    if from_host is not None and ctx.fleet.hosts[from_host].site != ctx.fleet.hosts[server].site:
        address = mesh_address(ctx, server, from_host)
        if address is None:
            raise UserError(f"{from_host} shares no mesh with the Prefect server {server}",
                            "put both in one mesh (the fleet check says the same)")
    return f"{'https' if serves_tls(ctx.fleet) else 'http'}://{address}:{spec.server.port}/api"


def server_material(env: str, host: str) -> dict[str, Any]:
    ctx = FleetContext.load(env, "ssh")
    spec = orchestration_of(ctx.fleet)
    if spec.server.host != host:
        raise UserError(f"{host} is not the fleet's Prefect server ({spec.server.host})", "apply the role there")
    database = read_reference(spec.server.database, ctx.secrets) if spec.server.database else None
    if spec.server.postgresql:
        database = LOCAL_POSTGRESQL_URL
    # what the Prefect export (primespark.monitoring.prefect_export) writes a figure for, 0 or not
    # with a fleet CA the server serves only TLS, with the host's key and certificate from the tls role
    served = str(HOST_TLS_FOLDER / "served.pem") if serves_tls(ctx.fleet) else None
    return {"addresses": server_addresses(ctx), "port": spec.server.port, "auth_string": auth_string(ctx),
            "served": served, "ca_file": str(HOST_TLS_FOLDER / "ca.pem") if served else None,
            "database_url": database, "postgresql": spec.server.postgresql, "home": SERVER_HOME,
            "pools": sorted(work_pool(site) for site in spec.workers), "templates": sorted(ctx.fleet.tasks)}


@dataclass(frozen=True)
class WorkerKey:
    private_pem: str
    public_line: str


def worker_key_reference(site: str) -> str:
    return f"local:orchestration/workers/{site}/ssh-key"


def worker_key(ctx: FleetContext, site: str) -> WorkerKey:
    """The SSH key of `site`'s worker: made once in the secret store, never the controller's own."""
    return WorkerKey(*ssh_key_pair(worker_key_reference(site), ctx.secrets, f"spark-worker-{site}@{ctx.fleet.name}"))


def worker_site(fleet: Fleet, host: str) -> str:
    spec = orchestration_of(fleet)
    sites = [site for site, worker in spec.workers.items() if worker.host == host]
    if not sites:
        raise UserError(f"{host} runs no worker in the fleet {fleet.name!r}",
                        f"workers: {', '.join(f'{s}: {w.host}' for s, w in spec.workers.items()) or 'none'}")
    return sites[0]


def known_hosts(files: SshFiles, fleet: Fleet, hosts: list[str]) -> list[str]:
    """The controller's known_hosts lines for `hosts` (hashed entries too: ssh-keygen -F looks them up)."""
    if files.known_hosts_if_present() is None:
        raise UserError(f"no known_hosts at {files.known_hosts}: a worker checks every host key",
                        "collect the hosts' keys there first (`spark lab up` does in the lab; `ssh-keyscan` "
                        "checked by hand elsewhere)")
    lines: list[str] = []
    for host in hosts:
        spec = fleet.hosts[host]
        name = str(spec.ssh_address) if spec.ssh.port == 22 else f"[{spec.ssh_address}]:{spec.ssh.port}"
        found = subprocess.run(["ssh-keygen", "-F", name, "-f", str(files.known_hosts)],
                               capture_output=True, text=True, check=False)
        entries = [ln for ln in found.stdout.splitlines() if ln and not ln.startswith("#")]
        if not entries:
            raise UserError(f"{files.known_hosts} has no host key for {host} ({name})",
                            "add it (ssh-keyscan, checked by hand) before installing the worker")
        lines += [f"{name} {ln.split(None, 1)[1]}" for ln in entries]
    return list(dict.fromkeys(lines))


def worker_state_dir(ctx: FleetContext, host: str) -> str:
    """The worker's state directory on `host` (the role's `prefect_worker_home`/state). With the local transport
    (tests) every host is this machine: a folder per worker host under the state directory."""
    if ctx.transport == "local":
        return str(ctx.state_dir / "workers" / host / "state")
    return f"{WORKER_HOME}/state"


def worker_records(ctx: FleetContext, site: str) -> str:
    """The worker's records file: this environment's records of the client repositories its site's deployments open
    (its own site's only), as `records` writes them."""
    return records.dumps(records.select(ctx.state_dir, worker_client_repositories(ctx.fleet, site)))


def worker_material(env: str, host: str) -> dict[str, Any]:
    """Everything the prefect_worker role installs on `host` (private: the tasks using it set no_log)."""
    ctx = FleetContext.load(env, "ssh")
    spec = orchestration_of(ctx.fleet)
    site = worker_site(ctx.fleet, host)
    key = worker_key(ctx, site)
    repositories = worker_repositories(ctx.fleet, site)
    backup = ctx.fleet.backup
    passwords = {}
    for name in repositories:
        assert backup is not None
        reference = backup.repositories[name].password
        # made here on first use, as the restic role does: a worker's store is read-only
        from primespark.backup.repositories import password

        passwords[reference] = password(ctx, name, create=True)
    # the audit log's HMAC key: a worker's records HMAC secrets as the controller's do (its store only reads)
    from primespark.audit.log import KEY_REFERENCE, audit_key

    passwords[KEY_REFERENCE] = audit_key(ctx).decode()
    vault = None
    if ctx.fleet.secrets.backend is SecretBackend.vault:  # the worker logs in with an AppRole of its own
        from primespark.orchestration.vault import ensure_worker_access

        vault = ensure_worker_access(ctx, site)
        if ctx.fleet.secrets.auth is VaultAuth.lab:  # the lab's OpenBao: at the bridge of the worker's LAN
            from primespark.lab.openbao import address_for

            vault["addr"] = address_for(ctx.fleet, host)  # over TLS, verified with the CA the tls role put there
            vault["ca_file"] = str(HOST_VAULT_CA)
    return {
        "vault": vault,
        "site": site,
        "pool": work_pool(site),
        "name": f"{host}",
        "limit": spec.workers[site].limit,
        "api_url": api_url(ctx, host),
        # the fleet CA the tls role put on the host: the worker and its runs trust it only, for the API over TLS
        "api_ca_file": str(HOST_TLS_FOLDER / "ca.pem") if serves_tls(ctx.fleet) else None,
        "auth_string": auth_string(ctx),
        "poll_seconds": spec.poll_seconds,
        "heartbeat_seconds": spec.heartbeat_seconds,
        "ssh_private_key": key.private_pem,
        "ssh_public_key": key.public_line,
        "known_hosts": known_hosts(SshFiles.of(ctx.state_dir), ctx.fleet, site_hosts(ctx.fleet, site)),
        "secrets": [] if vault else [{"reference": ref, "key": ref.removeprefix("local:"), "value": value}
                                     for ref, value in sorted(passwords.items())],
        "repositories": repositories,
        # installed when the worker has none yet; `spark flows deploy` keeps them up to date
        "repository_records": worker_records(ctx, site),
        "home": WORKER_HOME,
        "env": ctx.env,
        "fleet_file": str(resolve(env)),
    }


def authorized_worker_keys(env: str, host: str) -> list[str]:
    """The public keys of the workers that may log in to `host`: its own site's worker's only."""
    ctx = FleetContext.load(env, "ssh")
    spec = orchestration_of(ctx.fleet)
    site = ctx.fleet.hosts[host].site
    return [worker_key(ctx, site).public_line] if site in spec.workers else []
