#!/usr/bin/python3
"""spark-tls-renew: a host renews its own certificate from the fleet CA, on a timer (docs/tls.md).

The tls role installs this file on every host as /usr/local/sbin/spark-tls-renew, with its configuration
(/etc/spark/tls-renew.json) and its AppRole secret-id (0600), and runs it from cron every hour and once at each
site.yml run. It uses the standard library and the `openssl` command only: the Pis have Python 3 (Ansible needs it)
and openssl (ca-certificates needs it) but no spark venv. primespark.pki takes its renewal rules from here, so the
controller and the hosts decide alike.

A run logs in with the host's TLS AppRole, reads the host's PKI role (its names, addresses and lifetime as the last
apply left them), and issues a new certificate when there is none, when two thirds of its life are over, when it no
longer names exactly the role's names and addresses, or with --force. The new files are written to temporary files,
fsynced, checked (the key is the certificate's, the certificate names the host), then renamed: served.pem (key and
certificate, 0640 root:<group>) first, then ca.pem and cert.pem, which the next run judges by; a run cut between
them serves the new pair and renews early, never late. Most servers re-read the files by themselves; for those that
do not (the compose stack's Postgres, Redis, Kafka, MLflow), the configuration lists a reload command each, run after a
renewal. A reload that fails is tried again at every later run until it succeeds (a marker file), and fails the run.
Last, the certificate's validity goes to node exporter's textfile folder, renewed or not, for the expiry alert.

Fails closed: a store that does not answer, is sealed or refuses stops the run with one line on stderr and exit
status 1, and leaves the files as they were (their expiry metrics are still written, so the alert sees the clock
run down). Every request has a timeout. The private key is never printed or put in argv.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import grp
import json
import os
import re
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import Any

CONFIG = "/etc/spark/tls-renew.json"
RENEW_AT = 2 / 3  # step-ca's rule: renew at two thirds of a certificate's life
TIMEOUT_SECONDS = 30.0  # every request to the store
LOCK_WAIT_SECONDS = 120.0  # a run from cron and one from site.yml never write at once
PRIVATE_KEY_FORMAT = "pkcs8"  # PKCS#8 PEM: Kafka's PEM key store reads no other; every other server reads it
RELOAD_SECONDS = 60.0  # each reload command (a `docker-compose exec` included)
RELOAD_PENDING = ".reload-pending"  # in the folder: a renewal whose reloads have not all succeeded yet
# primespark.monitoring.metrics: TLS_NOT_BEFORE and TLS_NOT_AFTER (a unit test keeps the names equal)
NOT_BEFORE = "primespark_tls_certificate_not_before_timestamp_seconds"
NOT_AFTER = "primespark_tls_certificate_not_after_timestamp_seconds"


class RenewError(Exception):
    """A run that cannot renew: one line for the log and stderr."""


# --- the rules (primespark.pki uses these) -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CertInfo:
    """What a renewal judges a certificate by."""

    not_before: datetime.datetime
    not_after: datetime.datetime
    names: frozenset[str]
    addresses: frozenset[str]


def renew_at(not_before: datetime.datetime, not_after: datetime.datetime) -> datetime.datetime:
    return not_before + (not_after - not_before) * RENEW_AT


def due(not_before: datetime.datetime, not_after: datetime.datetime, now: datetime.datetime) -> bool:
    """Due from two thirds of its life on (and when expired, or not yet valid: a clock or a CA that moved)."""
    return now < not_before or now >= renew_at(not_before, not_after)


def reason(current: CertInfo | None, names: Sequence[str], addresses: Sequence[str], now: datetime.datetime,
           force: bool = False) -> str | None:
    """Why a new certificate is needed now, or None: none yet, forced, names or addresses changed, or due."""
    if current is None:
        return "no certificate yet"
    if force:
        return "forced"
    if current.names != frozenset(names) or current.addresses != frozenset(addresses):
        return "its names or addresses changed"
    if due(current.not_before, current.not_after, now):
        return "two thirds of its life are over"
    return None


# --- reading certificates with openssl -----------------------------------------------------------------------


def _openssl(args: list[str], stdin: str) -> str:
    """openssl with its input on stdin (a key never goes into argv)."""
    try:
        done = subprocess.run(["openssl", *args], input=stdin, capture_output=True, text=True, timeout=30,
                              check=False, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"})
    except FileNotFoundError:
        raise RenewError("openssl is not installed: install Debian's openssl package") from None
    if done.returncode != 0:
        raise RenewError(f"openssl {args[0]} failed: {done.stderr.strip().splitlines()[-1:] or ['no output']}")
    return done.stdout


def _timestamp(value: str) -> datetime.datetime:
    # openssl -dateopt iso_8601 prints e.g. 2026-12-03 10:00:00Z
    return datetime.datetime.strptime(value.strip(), "%Y-%m-%d %H:%M:%SZ").replace(tzinfo=datetime.UTC)


def cert_info(pem: str) -> CertInfo:
    """The validity and the subject alternative names of a PEM certificate."""
    text = _openssl(["x509", "-noout", "-dateopt", "iso_8601", "-startdate", "-enddate", "-ext", "subjectAltName"],
                    pem)
    fields: dict[str, str] = {}
    names: set[str] = set()
    addresses: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key in ("notBefore", "notAfter"):
            fields[key] = value
        elif line.startswith(" "):  # the SAN line under its heading: DNS:a, DNS:b, IP Address:1.2.3.4
            for entry in line.strip().split(", "):
                kind, _, san = entry.partition(":")
                (names if kind == "DNS" else addresses if kind == "IP Address" else set()).add(san)
    if set(fields) != {"notBefore", "notAfter"}:
        raise RenewError("openssl did not print the certificate's validity")
    return CertInfo(_timestamp(fields["notBefore"]), _timestamp(fields["notAfter"]), frozenset(names),
                    frozenset(addresses))


def load_info(path: str) -> CertInfo | None:
    """The host's current certificate, or None when there is none (or it is not a certificate)."""
    try:
        with open(path, encoding="ascii") as handle:
            pem = handle.read()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    try:
        return cert_info(pem)
    except RenewError:
        return None


def same_key(certificate: str, private_key: str) -> bool:
    """Whether the private key is the certificate's (compared by their public keys)."""
    return _openssl(["x509", "-noout", "-pubkey"], certificate) == _openssl(["pkey", "-pubout"], private_key)


# --- the store: Vault's HTTP API (OpenBao's is the same) ---------------------------------------------------------


class Store:
    """The few calls a renewal makes, each with a timeout. Errors become one RenewError naming the address."""

    def __init__(self, addr: str, ca_file: str | None = None, what: str = "") -> None:
        if not addr.startswith(("http://", "https://")):
            raise RenewError(f"vault_addr {addr!r} is not an http(s) URL: run site.yml's tls role again")
        self.addr = addr.rstrip("/")
        self.context = ssl.create_default_context(cafile=ca_file) if addr.startswith("https:") else None
        self.what = what
        self.token: str | None = None

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             refusals: tuple[int, ...] = (403,)) -> dict[str, Any]:
        request = urllib.request.Request(f"{self.addr}/v1/{path}", method=method,  # noqa: S310 http(s): __init__
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Content-Type": "application/json"})
        if self.token:
            request.add_header("X-Vault-Token", self.token)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS,  # noqa: S310 http(s) only: __init__
                                        context=self.context) as answer:
                return dict(json.loads(answer.read() or b"{}"))
        except urllib.error.HTTPError as exc:
            errors = "; ".join(_errors(exc)) or exc.reason
            if exc.code == 503:
                raise RenewError(f"secret store unreachable: Vault at {self.addr} is sealed or standby ({errors}) "
                                 f"while {self.what}") from None
            if exc.code in refusals:
                raise RenewError(f"Vault at {self.addr} refused {path} ({errors}) while {self.what}: check the "
                                 "host's TLS AppRole and its secret-id (site.yml's tls role installs them)") from None
            raise RenewError(f"Vault at {self.addr} answered {exc.code} to {path} ({errors}) while "
                             f"{self.what}") from None
        except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
            why = getattr(exc, "reason", None) or type(exc).__name__
            raise RenewError(f"secret store unreachable: no answer from Vault at {self.addr} ({why}) while "
                             f"{self.what}") from None

    def login(self, role_id: str, secret_id: str) -> None:
        # a wrong secret-id is a 400 on Vault and OpenBao: a refusal, as a 403 is
        answer = self.call("POST", "auth/approle/login", {"role_id": role_id, "secret_id": secret_id}, (400, 403))
        self.token = str(answer["auth"]["client_token"])


def _errors(exc: urllib.error.HTTPError) -> list[str]:
    try:
        return [str(e) for e in json.loads(exc.read() or b"{}").get("errors") or []]
    except (ValueError, OSError):
        return []


@dataclasses.dataclass(frozen=True)
class Role:
    """The host's PKI role as the server holds it: what its certificate names, and for how long."""

    names: tuple[str, ...]  # the host's own name first: the certificate's CN
    addresses: tuple[str, ...]
    lifetime_seconds: int


def policy_addresses(policy: str) -> tuple[str, ...]:
    """The IP addresses a host's TLS policy lets it ask for (the `ip_sans` values of its issue path, JSON lists as
    primespark.pki renders them: the whole comma list, then each address)."""
    found = re.search(r'"ip_sans"\s*=\s*(\[[^\]]*\])', policy)
    if found is None:
        raise RenewError("the host's TLS policy names no ip_sans: apply the fleet again (`spark up`)")
    values = json.loads(found.group(1))
    return tuple(dict.fromkeys(a for value in values for a in str(value).split(",") if a))


def role_of(data: dict[str, Any], host: str, policy_text: Callable[[], str]) -> Role:
    """A host's PKI role as the server answered it (primespark.pki.served_plan reads it the same way): names and
    lifetime from the role; addresses from the role where the server keeps them there (OpenBao's
    allowed_ip_sans_cidr), else (HashiCorp Vault, whose roles have no such field) from the host's own policy, which
    allows exactly the last apply's."""
    names = tuple(sorted(data["allowed_domains"], key=lambda n: (n != host, n)))  # the host's name first: the CN
    if "allowed_ip_sans_cidr" in data:
        addresses = tuple(str(c).removesuffix("/32") for c in data["allowed_ip_sans_cidr"] or [])
    else:
        addresses = policy_addresses(policy_text())
    return Role(names, addresses, int(data["max_ttl"]))


def read_role(store: Store, mount: str, host: str, policy: str) -> Role:
    return role_of(store.call("GET", f"{mount}/roles/{host}")["data"], host,
                   lambda: store.call("GET", f"sys/policies/acl/{policy}")["data"]["policy"])


@dataclasses.dataclass(frozen=True, repr=False)
class Issued:
    """A new certificate. `private_key` is a secret: no repr, written 0640 to served.pem only."""

    certificate: str
    private_key: str
    ca: str


def issue(store: Store, mount: str, host: str, role: Role) -> Issued:
    params = {"common_name": role.names[0], "alt_names": ",".join(role.names[1:]),
              "ip_sans": ",".join(role.addresses), "ttl": f"{role.lifetime_seconds}s",
              "private_key_format": PRIVATE_KEY_FORMAT}
    data = store.call("POST", f"{mount}/issue/{host}", params)["data"]
    return Issued(data["certificate"], data["private_key"], data["issuing_ca"])


# --- the files ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """/etc/spark/tls-renew.json, written by the tls role."""

    host: str
    vault_addr: str
    mount: str
    role_id: str
    secret_id_file: str
    folder: str = "/etc/ssl/primespark"
    group: str = "primespark-tls"
    textfile_dir: str | None = None
    vault_ca_file: str | None = None
    reload: tuple[tuple[str, ...], ...] = ()  # argv each, run after a renewal (primespark.cloud.service_tls)

    @classmethod
    def read(cls, path: str) -> Config:
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            raise RenewError(f"{path}: no such file: site.yml's tls role writes it") from None
        except ValueError as exc:
            raise RenewError(f"{path}: not JSON ({exc}): run site.yml's tls role again") from None
        fields = {f.name: f for f in dataclasses.fields(cls)}
        known = data if isinstance(data, dict) else {}
        missing = [name for name, f in fields.items() if f.default is dataclasses.MISSING and name not in known]
        unknown = sorted(set(known) - set(fields))
        wrong = [name for name, value in known.items() if name in fields and name != "reload"
                 and not isinstance(value, str | None)]
        reload = known.get("reload", [])
        if not (isinstance(reload, list) and all(isinstance(c, list) and c and all(isinstance(a, str) for a in c)
                                                 for c in reload)):
            wrong.append("reload (a list of commands, each a list of strings)")
        if not isinstance(data, dict) or missing or unknown or wrong:
            said = "; ".join(part for part in (
                "not a JSON object" if not isinstance(data, dict) else "",
                f"missing {', '.join(missing)}" if missing else "", f"unknown {', '.join(unknown)}" if unknown else "",
                f"not text: {', '.join(wrong)}" if wrong else "") if part)
            raise RenewError(f"{path}: not a renewal configuration ({said}): run site.yml's tls role again")
        return cls(**{**known, "reload": tuple(tuple(c) for c in reload)})

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)


def write_atomic(path: str, text: str, mode: int, gid: int = 0) -> None:
    """Write, fsync, set owner and mode, rename, fsync the folder: the file is the old one or the new one."""
    folder = os.path.dirname(path)
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        os.fchmod(fd, 0o600)  # before any byte of a key lands in it
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
            if os.geteuid() == 0:
                os.fchown(handle.fileno(), 0, gid)
            os.fchmod(handle.fileno(), mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def install(config: Config, issued: Issued, role: Role) -> CertInfo:
    """Check the new certificate, then put it in place (served.pem first, cert.pem last)."""
    fresh = cert_info(issued.certificate)
    if fresh.names != frozenset(role.names) or fresh.addresses != frozenset(role.addresses):
        raise RenewError(f"the CA issued a certificate for {sorted(fresh.names | fresh.addresses)}, not for "
                         f"{config.host}'s {sorted(role.names + role.addresses)}: kept the current one")
    if not same_key(issued.certificate, issued.private_key):
        raise RenewError("the issued key is not the certificate's: kept the current one")
    try:
        gid = grp.getgrnam(config.group).gr_gid
    except KeyError:
        raise RenewError(f"no group {config.group}: site.yml's tls role makes it") from None
    os.makedirs(config.folder, mode=0o755, exist_ok=True)
    write_atomic(config.path("served.pem"), issued.private_key.strip() + "\n" + issued.certificate.strip() + "\n",
                 0o640, gid)
    write_atomic(config.path("ca.pem"), issued.ca.strip() + "\n", 0o644)
    write_atomic(config.path("cert.pem"), issued.certificate.strip() + "\n", 0o644)
    return fresh


def metrics_text(certificate: str, info: CertInfo) -> str:
    """The certificate's validity in node exporter's text format (the expiry alert reads it)."""
    label = certificate.replace("\\", "\\\\").replace('"', '\\"')
    lines = []
    for name, help_text, value in ((NOT_AFTER, "When the certificate expires", info.not_after),
                                   (NOT_BEFORE, "When the certificate became valid", info.not_before)):
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge",
                  f'{name}{{certificate="{label}"}} {value.timestamp():.1f}']
    return "\n".join(lines) + "\n"


def write_metrics(config: Config, info: CertInfo) -> None:
    """Best effort: a metrics file that cannot be written is said on stderr, and never hides the run's own outcome."""
    if config.textfile_dir is None or not os.path.isdir(config.textfile_dir):
        return
    target = os.path.join(config.textfile_dir, f"primespark_tls_{config.host}.prom")
    try:
        write_atomic(target, metrics_text(config.path("cert.pem"), info), 0o644)
    except OSError as exc:
        print(f"spark-tls-renew: warning: cannot write {target}: {exc.strerror}", file=sys.stderr)


@contextlib.contextmanager
def locked(folder: str) -> Iterator[None]:
    os.makedirs(folder, mode=0o755, exist_ok=True)
    fd = os.open(os.path.join(folder, ".renew.lock"), os.O_CREAT | os.O_RDWR, 0o600)
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RenewError(f"another renewal holds {folder}/.renew.lock for {LOCK_WAIT_SECONDS:.0f} s") \
                        from None
                time.sleep(0.5)  # a lock held by another run: poll until it ends or the wait is over
        yield
    finally:
        os.close(fd)


def run_reloads(config: Config) -> tuple[int, list[str]]:
    """Run the reload commands while a renewal's are owed (the marker `run` writes before it installs a new
    certificate). Returns how many ran and what failed (nothing: all done, and the marker is gone)."""
    marker = config.path(RELOAD_PENDING)
    if not os.path.exists(marker):
        return 0, []
    failed = []
    for command in config.reload:
        try:
            done = subprocess.run(list(command), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=RELOAD_SECONDS, check=False)
        except subprocess.TimeoutExpired:
            failed.append(f"{command[0]} … timed out after {RELOAD_SECONDS:.0f} s")
            continue
        except OSError as exc:
            failed.append(f"{command[0]}: {exc.strerror}")
            continue
        if done.returncode != 0:
            last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
            failed.append(f"`{' '.join(command)}` exited {done.returncode}: {last[0][:200]}")
    if not failed:
        os.unlink(marker)
    return len(config.reload), failed


# --- a run ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Outcome:
    renewed: bool
    reason: str
    info: CertInfo | None
    reloaded: int = 0  # reload commands run and succeeded

    def line(self, host: str, dry_run: bool) -> str:
        verb = "renewed" if self.renewed else ("would renew" if dry_run and self.reason != "not due" else "kept")
        if self.info is None:
            return f"{host}: {verb} ({self.reason})"
        until = self.info.not_after.strftime("%Y-%m-%d %H:%M")
        when = renew_at(self.info.not_before, self.info.not_after).strftime("%Y-%m-%d %H:%M")
        reloaded = f"; reloaded {self.reloaded} service(s)" if self.reloaded else ""
        return f"{host}: {verb} ({self.reason}); valid until {until} UTC, due for renewal from {when} UTC{reloaded}"


def run(config: Config, force: bool = False, dry_run: bool = False,
        now: datetime.datetime | None = None) -> Outcome:
    now = now or datetime.datetime.now(datetime.UTC)
    with locked(config.folder):
        current = load_info(config.path("cert.pem"))
        try:
            store = Store(config.vault_addr, config.vault_ca_file, f"renewing {config.host}'s certificate")
            try:
                with open(config.secret_id_file, encoding="utf-8") as handle:
                    secret_id = handle.read().strip()
            except OSError as exc:
                raise RenewError(f"cannot read the TLS AppRole's secret-id {config.secret_id_file}: "
                                 f"{exc.strerror}") from None
            store.login(config.role_id, secret_id)
            role = read_role(store, config.mount, config.host, config.role_id)  # the AppRole's name is the policy's
            why = reason(current, role.names, role.addresses, now, force)
            if dry_run:
                return Outcome(False, why or "not due", current)
            if why is not None:
                issued = issue(store, config.mount, config.host, role)
                if config.reload:  # before the files move: a run killed after them still owes the reloads
                    write_atomic(config.path(RELOAD_PENDING), "", 0o600)
                current = install(config, issued, role)
            ran, failed = run_reloads(config)
            if failed:
                raise RenewError(f"{'renewed' if why else 'kept'} the certificate, but the servers that do not "
                                 f"re-read it were not all reloaded (tried again at the next run): {'; '.join(failed)}")
            return Outcome(why is not None, why or "not due", current, ran)
        finally:
            if current is not None and not dry_run:
                write_metrics(config, current)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="spark-tls-renew",
        description="Renew this host's certificate from the fleet CA when it has none, when two thirds of its life "
        "are over, or when it no longer names the host's names and addresses; else keep it. Writes its expiry "
        "metrics for node exporter. Exit status 0: the certificate is good; 1: the run failed (the reason on "
        "stderr).")
    parser.add_argument("--config", default=CONFIG, help=f"the renewal's configuration (default {CONFIG})")
    parser.add_argument("--force", action="store_true", help="a new certificate and key now, due or not")
    parser.add_argument("--dry-run", action="store_true", help="only say whether it is due; change nothing")
    args = parser.parse_args(argv)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        config = Config.read(args.config)
        outcome = run(config, force=args.force, dry_run=args.dry_run)
    except RenewError as exc:
        print(f"{stamp} spark-tls-renew: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a folder or file it cannot write: the files it had not renamed yet stay as they were
        print(f"{stamp} spark-tls-renew: error: {exc.filename or 'a file'}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"{stamp} {outcome.line(config.host, args.dry_run)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
