"""The lab's OpenBao: `bao server` on this machine with its data in the lab's state folder, initialised and
unsealed by `spark lab up`, stopped by `spark lab down` (its data stays, as the Prefect server's database does).

Not dev mode: the data outlives the process, and a started server is sealed until `spark lab up` unseals it
with the key kept at init. That key and the root token are the only secrets in the lab's state folder
(`openbao/init.json`, 0600); the restic passwords, SFTP keys, mesh keys and service secrets are in OpenBao.
OpenBao 2 has no `file` storage backend: integrated storage (raft, one node) keeps its files there instead.
The lab speaks plain HTTP on loopback and on its own bridges; production's Vault uses TLS.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from primespark.errors import UserError
from primespark.fleet.model import Fleet
from primespark.lab.topology import OpenBaoSpec
from primespark.pki import PkiApplied
from primespark.secrets import SecretError, atomic_write
from primespark.vault_server import health_status, spawn_bao


def credentials_file(state_dir: Path) -> Path:
    """The unseal key and root token, written once at init (0600)."""
    return state_dir / "openbao" / "init.json"


def lab_access(fleet: Fleet, state_dir: Path) -> tuple[str, str]:
    """The lab's OpenBao address and root token, for commands on this machine (`secrets.auth: lab`)."""
    assert fleet.lab is not None  # fleet/checks.py: lab-vault-without-lab
    path = credentials_file(state_dir)
    try:
        token = str(json.loads(path.read_text(encoding="utf-8"))["root_token"])
    except FileNotFoundError:
        raise SecretError(f"the lab's OpenBao has not been set up: {path} does not exist",
                          f"run `spark lab up --env {fleet.name}`: it starts, initialises and unseals it") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SecretError(f"the lab's OpenBao credentials in {path} cannot be read ({type(exc).__name__})",
                          "restore the file from a backup of the state folder") from None
    return f"http://127.0.0.1:{fleet.lab.openbao_port}", token


def address_for(fleet: Fleet, host: str) -> str:
    """The lab's OpenBao as `host` (a lab container) reaches it: at the bridge of its site's LAN."""
    from primespark.lab.topology import network_name, plan_lab

    plan = plan_lab(fleet, "")
    lan = network_name(fleet, fleet.hosts[host].site)
    gateway = next((n.gateway for n in plan.networks if n.name == lan), None)
    if plan.openbao is None or gateway is None or gateway not in plan.openbao.listen:
        raise SecretError(f"the lab's OpenBao does not listen on {host}'s LAN",
                          "run services or a Prefect worker on that site (the lab then listens there)")
    return f"http://{gateway}:{plan.openbao.port}"


@dataclass
class Readiness:
    """What bringing the lab's OpenBao to readiness did."""

    started: bool = False
    initialised: bool = False
    unsealed: bool = False
    mounts_enabled: list[str] = field(default_factory=list)
    seconds: float = 0.0  # starting it, waiting for it, initialising and unsealing

    @property
    def changed(self) -> bool:
        return self.started or self.initialised or self.unsealed or bool(self.mounts_enabled)


class LabOpenBao:
    def __init__(self, state_dir: Path, spec: OpenBaoSpec) -> None:
        self.spec = spec
        self.state_dir = state_dir
        self.home = state_dir / "openbao"
        self.data_dir = self.home / "data"
        self.config_file = self.home / "config.json"
        self.log_file = self.home / "server.log"
        self.credentials_file = credentials_file(state_dir)
        self.pid_file = state_dir / "openbao.pid"

    @property
    def address(self) -> str:
        return self.spec.address

    def config(self) -> str:
        """The server's configuration: raft storage in the state folder, a listener per planned address (raft's
        cluster listener on the next port), short raft timings (one node on one machine: no need to wait out a
        network's jitter before it leads)."""
        port = self.spec.port
        listeners = [{"tcp": {"address": f"{ip}:{port}", "cluster_address": f"{ip}:{port + 1}", "tls_disable": True}}
                     for ip in self.spec.listen]
        return json.dumps({
            "storage": {"raft": {"path": str(self.data_dir), "node_id": "lab", "performance_multiplier": 1}},
            "listener": listeners, "api_addr": self.address, "cluster_addr": f"http://127.0.0.1:{port + 1}",
            "ui": False, "log_level": "info",
        }, indent=2, sort_keys=True) + "\n"

    # --- the process ----------------------------------------------------------------------------------------
    def pid(self) -> int | None:
        """Our server, if it runs: the pid file's process, started with this lab's configuration file."""
        try:
            pid = int(self.pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if f"-config={self.config_file}".encode() in cmdline else None

    def ports_free(self) -> bool:
        for port in (self.spec.port, self.spec.port + 1):
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    return False
        return True

    def preflight(self) -> None:
        if self.pid() is None and not self.ports_free():
            port = self.spec.port
            raise UserError(f"port {port} or {port + 1} (the lab's OpenBao) is taken by another program",
                            fix=f"stop what listens there (`ss -ltnp 'sport = :{port} or sport = :{port + 1}'`) or "
                            "change lab.openbao_port in the fleet file")

    def start(self) -> bool:
        """Start it in the background unless ours runs with this configuration; True if started now. Started,
        it is sealed: `ensure_ready` unseals it."""
        config = self.config()
        if self.pid() is not None:
            if self.config_file.is_file() and self.config_file.read_text() == config:
                return False
            # It listens elsewhere now: start it afresh. (A bridge re-made with the same address needs nothing:
            # a listening socket outlives its address and answers again when the address is back.)
            self.stop()
        self.preflight()
        for folder in (self.home, self.data_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder.chmod(0o700)
        atomic_write(self.config_file, config, mode=0o600)
        process = spawn_bao(["server", f"-config={self.config_file}"], self.home, self.log_file, new_session=True)
        atomic_write(self.pid_file, f"{process.pid}\n")
        return True

    def stop(self, timeout: float = 20) -> bool:
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pid() is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reap it if this process started it
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True

    # --- init and unseal ------------------------------------------------------------------------------------
    def client(self, token: str | None = None) -> Any:
        import hvac

        return hvac.Client(url=self.address, token=token, timeout=10)

    def root_client(self) -> Any:
        return self.client(self.credentials()[1])

    def state(self) -> str:
        """not running, not initialised, sealed, or unsealed."""
        status = health_status(self.address)
        return {None: "not running", 501: "not initialised", 503: "sealed"}.get(status, "unsealed")

    def ensure_ready(self, timeout: float = 60) -> Readiness:
        """Start it if it does not run, initialise it the first time (one unseal key), unseal it, and enable the
        KV v2 engines the fleet uses. Safe to run again: a ready server is left as it is."""
        started = time.monotonic()
        deadline = started + timeout
        result = Readiness(started=self.start())
        with self.explained():
            self._wait(deadline, lambda status: status is not None, "answer")
            client = self.client()
            if not client.sys.is_initialized():
                self._initialise(client)
                result.initialised = True
            unseal_key, client.token = self.credentials()
            if client.sys.read_seal_status()["sealed"]:
                if client.sys.submit_unseal_key(unseal_key)["sealed"]:
                    raise UserError(f"the unseal key in {self.credentials_file} does not unseal the lab's OpenBao",
                                    fix=self._start_afresh())
                result.unsealed = True
            self._wait(deadline, lambda status: status == 200, "become active")
            result.mounts_enabled = self._ensure_mounts(client, deadline)
        result.seconds = time.monotonic() - started
        return result

    def ensure_pki(self, fleet: Fleet) -> PkiApplied:
        """The fleet CA with its hosts' PKI roles, policies and AppRoles (primespark.pki), as `spark up` puts them
        into production's Vault: the same plan and apply. Idempotent, and the CA made on the first run stays (its
        data is on disk with the rest; a restart keeps it)."""
        from primespark.pki import apply_pki, mesh_overlays, pki_plan

        with self.explained():
            return apply_pki(self.root_client(), pki_plan(fleet, mesh_overlays(fleet, self.state_dir)))

    def _initialise(self, client: Any) -> None:
        answer = client.sys.initialize(secret_shares=1, secret_threshold=1)
        # Written before anything else happens: without it the data can never be read again.
        atomic_write(self.credentials_file, json.dumps({"unseal_key": answer["keys_base64"][0],
                                                        "root_token": answer["root_token"]}), mode=0o600)

    def credentials(self) -> tuple[str, str]:
        try:
            data = json.loads(self.credentials_file.read_text(encoding="utf-8"))
            return str(data["unseal_key"]), str(data["root_token"])
        except FileNotFoundError:
            raise UserError(f"the lab's OpenBao is initialised, but its unseal key is gone ({self.credentials_file} "
                            "does not exist)", fix=self._start_afresh()) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{self.credentials_file} cannot be read ({type(exc).__name__})",
                            fix="restore it from a backup of the state folder, or " + self._start_afresh()) from None

    def _start_afresh(self) -> str:
        return (f"its data cannot be read without it: `spark lab down`, remove {self.data_dir}, then `spark lab up` "
                "starts an empty OpenBao (the lab's secrets are made anew)")

    def _ensure_mounts(self, client: Any, deadline: float) -> list[str]:
        mounted = client.sys.list_mounted_secrets_engines()["data"]
        enabled = []
        for mount in self.spec.mounts:
            found = mounted.get(f"{mount}/")
            if found is None:
                client.sys.enable_secrets_engine("kv", path=mount, options={"version": "2"})
                enabled.append(mount)
            elif found.get("type") != "kv" or (found.get("options") or {}).get("version") != "2":
                raise UserError(f"the lab's OpenBao has a {found.get('type')} engine at {mount}/, not KV version 2",
                                fix=f"disable it (`bao secrets disable {mount}`) and run `spark lab up` again")
        for mount in enabled:
            self._wait_serving(client, mount, deadline)
        return enabled

    def _wait_serving(self, client: Any, mount: str, deadline: float) -> None:
        """A new KV v2 engine upgrades its storage for a moment and refuses requests meanwhile."""
        import hvac.exceptions

        while True:
            try:
                client.secrets.kv.v2.read_configuration(mount_point=mount)
                return
            except hvac.exceptions.InvalidRequest as exc:
                if "upgrading" not in str(exc).lower() or time.monotonic() > deadline:
                    raise
            time.sleep(0.05)

    def _wait(self, deadline: float, ready: Any, what: str) -> None:
        while True:
            status = health_status(self.address)
            if ready(status):
                return
            if self.pid() is None:
                raise UserError(f"the lab's OpenBao stopped before it could {what}:\n{self.log_tail()}",
                                fix=f"see {self.log_file}; `spark lab up` starts it again")
            if time.monotonic() > deadline:
                raise UserError(f"the lab's OpenBao did not {what} on {self.address} in time (last answer: "
                                f"{status}):\n{self.log_tail()}", fix=f"see {self.log_file}")
            time.sleep(0.05)

    @contextlib.contextmanager
    def explained(self) -> Iterator[None]:
        """hvac's and requests' failures as one clear error."""
        import hvac.exceptions
        import requests

        try:
            yield
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            raise UserError(f"the lab's OpenBao at {self.address} failed a set-up step: {exc}\n{self.log_tail()}",
                            fix=f"see {self.log_file}; run `spark lab up` again") from None

    def log_tail(self, lines: int = 10) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
