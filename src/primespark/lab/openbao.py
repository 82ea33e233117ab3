"""The lab's OpenBao: `bao server` on this machine with its data in the lab's state folder, initialised and
unsealed by `spark lab up`, stopped by `spark lab down` (its data stays, as the Prefect server's database does).

Not dev mode: the data outlives the process, and a started server is sealed until `spark lab up` unseals it
with the key kept at init. That key and the root token are the only secrets in the lab's state folder
(`openbao/init.json`, 0600); the restic passwords, SFTP keys, mesh keys and service secrets are in OpenBao.
OpenBao 2 has no `file` storage backend: integrated storage (raft, one node) keeps its files there instead.
On loopback it speaks plain HTTP (the controller's commands); on the lab's bridges, where hosts log in and receive
their secrets and their certificates' keys, only TLS, with a certificate from a CA of the lab's own that
`spark lab up` makes in the state folder (`openbao/tls/`): the listener's CA, not the fleet CA, which lives inside
OpenBao and cannot certify the server it needs to start first. Production's Vault has its own TLS, as here.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
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
    return plan.openbao.address_on(gateway)


# The listener's certificate: a year, made again at `spark lab up` when under a month is left or the bridges moved.
LISTENER_DAYS = 365
LISTENER_RENEW = timedelta(days=30)


def listener_ca_file(state_dir: Path) -> Path:
    """The CA of the lab's OpenBao listeners on the bridges (public): what hosts verify the server with."""
    return state_dir / "openbao" / "tls" / "ca.pem"


def listener_ca_pem(fleet: Fleet, state_dir: Path) -> str:
    """The listeners' CA as hosts get it (the tls and prefect_worker roles); an error before `spark lab up`."""
    path = listener_ca_file(state_dir)
    try:
        return path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise SecretError(f"the lab's OpenBao has no listener CA yet ({path})",
                          f"run `spark lab up --env {fleet.name}`: it makes it and starts OpenBao with TLS") from None


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
        self.tls_dir = self.home / "tls"
        self.listener_cert = self.tls_dir / "listener.pem"
        self.listener_key = self.tls_dir / "listener-key.pem"
        self._started: subprocess.Popen[bytes] | None = None  # the server this object started, if it did

    @property
    def address(self) -> str:
        return self.spec.address

    def config(self) -> str:
        """The server's configuration: raft storage in the state folder, a listener per planned address (raft's
        cluster listener on the next port), short raft timings (one node on one machine: no need to wait out a
        network's jitter before it leads)."""
        port = self.spec.port
        listeners = [{"tcp": {"address": f"{ip}:{port}", "cluster_address": f"{ip}:{port + 1}", **self._tls(ip)}}
                     for ip in self.spec.listen]
        return json.dumps({
            "storage": {"raft": {"path": str(self.data_dir), "node_id": "lab", "performance_multiplier": 1}},
            "listener": listeners, "api_addr": self.address, "cluster_addr": f"http://127.0.0.1:{port + 1}",
            "ui": False, "log_level": "info",
        }, indent=2, sort_keys=True) + "\n"

    def _tls(self, ip: IPv4Address) -> dict[str, Any]:
        """Plain HTTP on loopback (this machine's commands); TLS 1.2 at least everywhere else."""
        if ip.is_loopback:
            return {"tls_disable": True}
        return {"tls_cert_file": str(self.listener_cert), "tls_key_file": str(self.listener_key),
                "tls_min_version": "tls12"}

    # --- the listeners' certificate -------------------------------------------------------------------------
    def ensure_listener_tls(self) -> bool:
        """The CA (made once) and a certificate for every bridge address the server listens on, made again when
        the addresses changed or under a month of it is left; True if a new certificate was written."""
        from cryptography import x509

        bridges = sorted(str(ip) for ip in self.spec.listen if not ip.is_loopback)
        if not bridges:
            return False
        self.tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca_key, ca_cert = self._listener_ca()
        try:
            current = x509.load_pem_x509_certificate(self.listener_cert.read_bytes())
            sans = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            named = sorted(str(a) for a in sans.get_values_for_type(x509.IPAddress))
            fresh = current.not_valid_after_utc - datetime.now(UTC) > LISTENER_RENEW
            if named == bridges and fresh and current.issuer == ca_cert.subject and self.listener_key.is_file():
                return False
        except (FileNotFoundError, ValueError, x509.ExtensionNotFound):
            pass
        key, cert = _certificate("Prime Spark lab OpenBao", ca_key, ca_cert,
                                 [IPv4Address(a) for a in bridges], LISTENER_DAYS, ca=False)
        atomic_write(self.listener_key, key, mode=0o600)  # both in place before the server reads them (start, SIGHUP)
        atomic_write(self.listener_cert, cert, mode=0o644)
        return True

    def _listener_ca(self) -> tuple[Any, Any]:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        ca_file, ca_key_file = listener_ca_file(self.state_dir), self.tls_dir / "ca-key.pem"
        if ca_file.is_file() and ca_key_file.is_file():
            return (serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None),
                    x509.load_pem_x509_certificate(ca_file.read_bytes()))
        key_pem, cert_pem = _certificate("Prime Spark lab OpenBao listener CA", None, None, [], 3650, ca=True)
        atomic_write(ca_key_file, key_pem, mode=0o600)
        atomic_write(ca_file, cert_pem, mode=0o644)
        return (serialization.load_pem_private_key(key_pem.encode(), password=None),
                x509.load_pem_x509_certificate(cert_pem.encode()))

    # --- the process ----------------------------------------------------------------------------------------
    def pid_number(self) -> int | None:
        """The pid file's number, whatever runs under it now."""
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def pid(self) -> int | None:
        """Our server, if it runs: the pid file's process, started with this lab's configuration file."""
        pid = self.pid_number()
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if pid is not None else b""
        except OSError:
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
        renewed = self.ensure_listener_tls()
        config = self.config()
        if self.pid() is not None:
            if self.config_file.is_file() and self.config_file.read_text() == config:
                if renewed:  # same files, new certificate: the server loads it on SIGHUP, no restart, no seal
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid() or 0, signal.SIGHUP)
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
        self._started = process
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
        self._started = None
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
            ended = self._ended()
            if ended is not None:
                raise UserError(f"the lab's OpenBao stopped before it could {what} ({ended}):\n{self.log_tail()}",
                                fix=f"see {self.log_file}; `spark lab up` starts it again")
            if time.monotonic() > deadline:
                raise UserError(f"the lab's OpenBao did not {what} on {self.address} in time (last answer: "
                                f"{status}):\n{self.log_tail()}", fix=f"see {self.log_file}")
            time.sleep(0.05)

    def _ended(self) -> str | None:
        """How the server ended, or None while it runs. One this object started is asked directly (its exit
        status); another is looked for by its pid file."""
        started = self._started
        if started is not None and started.pid == self.pid_number():
            code = started.poll()
            if code is None:
                return None
            return f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        return "no longer running" if self.pid() is None else None

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


def _certificate(name: str, issuer_key: Any, issuer: Any, addresses: list[IPv4Address], days: int,
                 ca: bool) -> tuple[str, str]:
    """A key (EC P-256) and its certificate: a self-signed CA (`issuer_key` None), or a server certificate for
    `addresses` signed by it. PEM texts: the key's is a secret, written 0600 only."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(subject if issuer is None else issuer.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
               .not_valid_after(now + timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                        critical=True)
    else:
        builder = (builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(a) for a in addresses]),
                                         critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    cert = builder.sign(key if issuer_key is None else issuer_key, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return key_pem, cert.public_bytes(serialization.Encoding.PEM).decode()
