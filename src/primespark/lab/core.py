"""`spark lab up | down | status`: the fleet of a lab fleet file as containers on this machine."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import docker.errors

from primespark.backup import records
from primespark.errors import UserError
from primespark.fleet.model import Fleet
from primespark.hosts import SshFiles, SshHosts
from primespark.inventory import build_inventory
from primespark.lab import ssh
from primespark.lab.image import ImageBuilder, default_recipe_dir, image_exists, image_tag, prune_old_images
from primespark.lab.openbao import LabOpenBao, Readiness
from primespark.lab.prefect_server import PrefectServer
from primespark.lab.runtime import LabRuntime, docker_client, ssh_banner, wait_for_ssh
from primespark.lab.topology import ContainerSpec, LabPlan, plan_lab
from primespark.pki import CONTROLLER_CA, PkiApplied, ca_certificate, mount_of, save_fleet_ca, serves_tls
from primespark.secrets import LocalSecretStore, Migrated, atomic_write, migrate, vault_store
from primespark.settings import Settings, get_settings

Report = Callable[[str], None]
GIB = 1024**3


@dataclass
class UpResult:
    image: str
    image_built: bool
    containers: dict[str, str] = field(default_factory=dict)  # name -> kept / started / created / removed
    networks_created: int = 0
    prefect_started: bool = False
    prefect_url: str = ""
    openbao: Readiness | None = None  # None: the fleet keeps no secrets in the lab's OpenBao
    openbao_url: str = ""
    secrets_moved: list[Migrated] = field(default_factory=list)  # the local store's entries moved into OpenBao
    pki: PkiApplied | None = None  # the fleet CA and the hosts' PKI roles in the lab's OpenBao
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return (self.image_built or self.networks_created > 0 or self.prefect_started
                or (self.openbao is not None and self.openbao.changed) or bool(self.secrets_moved)
                or (self.pki is not None and self.pki.changed)
                or any(v != "kept" for v in self.containers.values()))


@dataclass
class HostStatus:
    host: str
    container: str
    state: str
    addresses: dict[str, str]
    ssh: bool


@dataclass
class LabStatus:
    hosts: list[HostStatus]
    routers: list[HostStatus]
    prefect_url: str
    prefect_healthy: bool
    state_dir: Path
    openbao_url: str = ""
    openbao_state: str = ""  # not running, not initialised, sealed, unsealed; "" without a lab OpenBao


class Lab:
    def __init__(self, fleet: Fleet, settings: Settings | None = None) -> None:
        if fleet.lab is None:
            plan_lab(fleet, "")  # raises the explanatory error
        assert fleet.lab is not None
        self.fleet = fleet
        self.settings = settings or get_settings()
        self.state_dir = self.settings.state_dir(fleet.name)
        self.recipe_dir = default_recipe_dir(self.settings.root)
        # A fleet with an orchestration section runs its Prefect server on the host it names (site.yml installs
        # it there); one without gets a server on this machine's loopback, started by `up`.
        self.prefect = PrefectServer(self.state_dir, fleet.lab.prefect_port)
        spec = plan_lab(fleet, "").openbao
        self.openbao = LabOpenBao(self.state_dir, spec) if spec is not None else None
        self.orchestrated = fleet.orchestration is not None

    @property
    def prefect_url(self) -> str:
        """The Prefect UI (its API under /api), as this machine reaches it."""
        spec = self.fleet.orchestration
        if spec is None:
            return self.prefect.url
        scheme = "https" if serves_tls(self.fleet) else "http"
        return f"{scheme}://{self.fleet.hosts[spec.server.host].address}:{spec.server.port}"

    @property
    def fleet_ca_file(self) -> Path | None:
        """The fleet CA that verifies the lab's TLS endpoints (saved by `up` from its OpenBao); None without one."""
        path = self.state_dir / CONTROLLER_CA
        return path if serves_tls(self.fleet) and path.is_file() else None

    def prefect_healthy(self) -> bool:
        if not self.orchestrated:
            return self.prefect.healthy()
        import urllib.request

        from primespark.pki import client_context

        ca = self.fleet_ca_file
        if self.prefect_url.startswith("https:") and ca is None:
            return False  # no CA to verify it with: not known to be healthy
        try:
            context = client_context(ca.read_text()) if ca is not None else None
            with urllib.request.urlopen(f"{self.prefect_url}/api/health", timeout=2,  # noqa: S310 (the lab)
                                        context=context) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    def plan(self) -> LabPlan:
        return plan_lab(self.fleet, ssh.operator_key(self.state_dir, f"spark-{self.fleet.name}-operator"))

    # --- up ----------------------------------------------------------------------------------------
    def preflight(self, runtime: LabRuntime, image_missing: bool) -> None:
        tun = Path("/dev/net/tun")
        if not (tun.exists() and stat.S_ISCHR(tun.stat().st_mode)):
            raise UserError("/dev/net/tun is missing: lab hosts need it for wireguard-go",
                            fix="`modprobe tun`, or `mkdir -p /dev/net && mknod /dev/net/tun c 10 200`")
        needed = 3 * GIB if image_missing else GIB // 2
        docker_root = runtime.client.info().get("DockerRootDir", "/var/lib/docker")
        for where in {docker_root, str(self.state_dir)}:
            free = shutil.disk_usage(where).free if os.path.exists(where) else needed
            if free < needed:
                raise UserError(f"only {free / GIB:.1f} GiB free under {where}; the lab needs {needed / GIB:.1f} GiB",
                                fix="free some disk space (`docker system prune` removes unused images)")
        if not self.orchestrated:
            self.prefect.preflight()
        if self.openbao is not None:
            self.openbao.preflight()
        runtime.check_overlaps()

    def up(self, report: Report = lambda _: None, detail: Report = lambda _: None) -> UpResult:
        started = time.monotonic()
        client = docker_client()
        tag = image_tag(self.recipe_dir)
        plan = self.plan()
        runtime = LabRuntime(client, plan, tag)
        report("preflight checks")
        self.preflight(runtime, image_missing=not image_exists(tag))
        # The server warms up (imports, migrations) while the image and the hosts come up.
        prefect_started = False if self.orchestrated else self.prefect.start()
        if prefect_started:
            report(f"starting the Prefect server on {self.prefect.url}")
        tag, built = ImageBuilder(self.recipe_dir, self.state_dir, report, detail).ensure()
        result = UpResult(image=tag, image_built=built, prefect_url=self.prefect_url, prefect_started=prefect_started)
        try:
            result.networks_created = runtime.ensure_networks(report)
            result.containers = runtime.ensure_containers(report)
            report("waiting for sshd on every host")
            entries = self._collect_host_keys(runtime, plan)
        except docker.errors.DockerException as exc:
            raise UserError(f"Docker refused a step of `lab up`: {exc}",
                            fix="run `spark lab up` again (it picks up where it stopped); if it fails the same "
                            "way, `spark lab down` then `spark lab up`") from None
        if ssh.write_known_hosts(self.state_dir, entries):
            report("known_hosts updated")
        self._write_inventory()
        if self.openbao is not None:
            # After the hosts: it listens on their bridges, and takes no CPU from their first start (sshd's keys).
            result.openbao = self._openbao_up(report)
            result.openbao_url = self.openbao.address
            result.pki = self._pki_up(report)
            result.secrets_moved = self._move_local_secrets(report)
        if built:
            for old in prune_old_images(keep=tag):
                report(f"removed the outdated image {old}")
        if not self.orchestrated:
            report("waiting for the Prefect server")
            self.prefect.wait_healthy()
        result.seconds = time.monotonic() - started
        return result

    def _openbao_up(self, report: Report) -> Readiness:
        """Started if it does not run, initialised the first time, unsealed, its engines enabled; the fleet's
        service secrets, host policies and AppRoles in it, as `spark up` puts them into production's Vault."""
        from primespark.cloud.vault_spec import apply_spec, vault_spec

        assert self.openbao is not None
        report("waiting for the lab's OpenBao")
        ready = self.openbao.ensure_ready()
        for done, message in ((ready.started, f"started the lab's OpenBao on {self.openbao.address}"),
                              (ready.initialised, "initialised the lab's OpenBao (unseal key and root token: "
                               f"{self.openbao.credentials_file}, 0600)"),
                              (ready.unsealed, "unsealed the lab's OpenBao")):
            if done:
                report(message)
        for mount in ready.mounts_enabled:
            report(f"enabled the KV v2 engine {mount}/ in the lab's OpenBao")
        with self.openbao.explained():
            apply_spec(self.openbao.root_client(), vault_spec(self.fleet, self.fleet.secrets.mount))
        return ready

    def _pki_up(self, report: Report) -> PkiApplied:
        """The fleet CA and each host's PKI role, policy and AppRole, from the same plan `spark up` applies."""
        assert self.openbao is not None
        done = self.openbao.ensure_pki(self.fleet)
        # the controller's copy, for its clients of the lab's TLS endpoints (PREFECT_API_SSL_CERT_FILE, …)
        save_fleet_ca(self.state_dir, ca_certificate(self.openbao.root_client(), mount_of(self.fleet.name)))
        if done.ca_generated:
            report("generated the fleet CA in the lab's OpenBao (it stays: later runs never rotate it)")
        if done.roles or done.removed:
            report(f"updated the TLS roles of {len(done.roles)} host(s) in the lab's OpenBao"
                   + (f", removed {len(done.removed)} left over" if done.removed else ""))
        return done

    def _move_local_secrets(self, report: Report) -> list[Migrated]:
        """Secrets a local store still holds (kept there before the lab used OpenBao) move into OpenBao: each
        verified by reading it back, then its file removed. The lab's state directory keeps no secret but
        OpenBao's key and token, so a local value that OpenBao holds differently does not stay either: OpenBao's
        value stands, the local one is kept beside it in OpenBao (`local-conflicts/<key>`), nothing is lost."""
        root = self.state_dir / "secrets"
        if not root.is_dir():
            return []
        local = LocalSecretStore(root)
        vault = vault_store(self.fleet, self.fleet.name, self.settings, migrating=True)
        moved = migrate(local, vault, remove_local=True)
        for item in moved:
            if item.status == "conflict":
                aside = f"local-conflicts/{item.key}"
                value = local.get(item.key)
                vault.put(aside, value)  # a new version if an earlier conflict is there: history keeps both
                if vault.get(aside) == value:
                    local.delete(item.key)
                    report(f"warning: {item.key} differed in the local store and the lab's OpenBao: OpenBao's value "
                           f"stands; the local one is kept in OpenBao at {vault.mount}/{vault.prefix}/{aside}")
        if any(m.removed_local for m in moved):
            report(f"moved {sum(1 for m in moved if m.removed_local)} secrets of the local store into the lab's "
                   "OpenBao")
        for folder in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only empty ones go
        with contextlib.suppress(OSError):
            root.rmdir()
        return [m for m in moved if m.removed_local]

    def _collect_host_keys(self, runtime: LabRuntime, plan: LabPlan) -> dict[str, tuple[list[str], list[str]]]:
        def one(host: str) -> tuple[str, tuple[list[str], list[str]]]:
            spec = plan.container(host)
            fleet_host = self.fleet.hosts[host]
            keys = runtime.host_keys(spec)
            if not wait_for_ssh(str(fleet_host.ssh_address), fleet_host.ssh.port):
                raise UserError(f"sshd on {host} ({fleet_host.ssh_address}:{fleet_host.ssh.port}) does not answer",
                                fix=f"see `docker logs {spec.name}`")
            return host, (ssh.known_host_names(host, fleet_host), keys)

        hosts = [s.host for s in plan.containers if s.host is not None]
        with ThreadPoolExecutor(max_workers=8) as pool:
            return dict(pool.map(one, hosts))

    def _write_inventory(self) -> None:
        """The inventory Ansible sees, kept beside the keys for reference and for tools that want a file."""
        text = json.dumps(build_inventory(self.fleet, self.fleet.name, self.settings), indent=2, sort_keys=True)
        path = self.state_dir / "inventory.json"
        if not path.is_file() or path.read_text() != text:
            atomic_write(path, text, mode=0o600)

    # --- down --------------------------------------------------------------------------------------
    def down(self, report: Report = lambda _: None) -> tuple[int, int, int]:
        client = docker_client()
        runtime = LabRuntime(client, LabPlan(self.fleet.name, [], []), "")
        SshHosts(self.fleet, SshFiles.of(self.state_dir)).close_shared()  # before their hosts go
        removed = runtime.remove_all(report)
        if self.prefect.stop():
            report("stopped the Prefect server")
        if self.openbao is not None and self.openbao.stop():
            report(f"stopped the lab's OpenBao (its data stays in {self.openbao.home})")
        # The next `up` makes new host keys; stale ones would only cause warnings.
        SshFiles.of(self.state_dir).known_hosts.unlink(missing_ok=True)
        # The repositories lived in the NAS and offsite containers, gone now on purpose: so is what was recorded
        # of them (the next backups make new ones) and of the last backups (their file counts).
        records.forget(self.state_dir)
        shutil.rmtree(self.state_dir / "backup", ignore_errors=True)
        return removed

    # --- status ------------------------------------------------------------------------------------
    def status(self, check_ssh: bool = True) -> LabStatus:
        client = docker_client()
        plan = self.plan()
        runtime = LabRuntime(client, plan, "")
        existing = runtime.containers()

        def one(spec: ContainerSpec) -> HostStatus:
            container = existing.get(spec.name)
            state = container.status if container is not None else "absent"
            reachable = False
            if spec.host is not None and state == "running" and check_ssh:
                host = self.fleet.hosts[spec.host]
                if ssh_banner(str(host.ssh_address), host.ssh.port):
                    reachable = ssh.ssh_run(self.state_dir, self.fleet, spec.host, "true", timeout=15).returncode == 0
            return HostStatus(spec.host or spec.hostname, spec.name, state,
                              {k: str(v) for k, v in spec.addresses.items()}, reachable)

        with ThreadPoolExecutor(max_workers=8) as pool:
            rows = list(pool.map(one, plan.containers))
        return LabStatus(
            hosts=[r for r, s in zip(rows, plan.containers, strict=True) if s.host is not None],
            routers=[r for r, s in zip(rows, plan.containers, strict=True) if s.host is None],
            prefect_url=self.prefect_url,
            prefect_healthy=self.prefect_healthy(),
            state_dir=self.state_dir,
            openbao_url=self.openbao.address if self.openbao is not None else "",
            openbao_state=self.openbao.state() if self.openbao is not None else "",
        )

    def exec(self, host: str, command: list[str] | str, user: str = "root") -> tuple[int, str]:
        runtime = LabRuntime(docker_client(), self.plan(), "")
        argv = ["sh", "-c", command] if isinstance(command, str) else command
        return runtime.exec(runtime.plan.container(host).name, argv, user=user)
