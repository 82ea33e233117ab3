"""The Prefect server (API, UI and its services) listening on several addresses: `python -m
primespark.orchestration.serve_api --port 4200 --bind <LAN address> --bind <mesh address>`.

`prefect server start` binds one address; the fleet's server must answer on its LAN (its site's worker, the
controller) and on its mesh address (the other sites' workers), and nowhere else. This runs the same app
`prefect server start` runs in the foreground (`create_app(final=True)`, services included) under uvicorn with one
socket per address. The sockets are bound with IP_FREEBIND, so the server starts before the WireGuard interface
that carries its mesh address is up (at boot), and answers there once it is. With `--tls served.pem` it serves only
TLS with the host's certificate, and serves a renewed one without a restart (CertificateReload).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
# How often the server looks whether the tls role replaced its certificate: a renewal is due hours before the old
# certificate expires, and a forced rotation (a key that may have leaked) is served within this.
RELOAD_SECONDS = 5.0


def bound(address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
    try:
        sock.bind((address, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"cannot listen on {address}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def served_context(served: Path) -> ssl.SSLContext:
    """The server's TLS context: TLS 1.2 at least, with the host's key and certificate from `served` (served.pem,
    both in one file, as the tls role installs it)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(served)
    return context


class CertificateReload:
    """uvicorn loads its TLS context once; the tls role replaces served.pem (by a rename) when it renews. This loads
    the new file into the same live context, on the event loop between connections: new handshakes get the new
    certificate, open connections keep theirs, and the server never restarts (its clients never see it go)."""

    def __init__(self, context: ssl.SSLContext, served: Path) -> None:
        self.context, self.served = context, served
        self.seen = self._identity()

    def _identity(self) -> tuple[int, int, int]:
        found = self.served.stat()
        return found.st_ino, found.st_mtime_ns, found.st_size

    def check(self) -> bool:
        """Load the file again if it changed; True if it did. A file that does not load (half a pair, gone) keeps
        the certificate being served, and says so; the next change is tried again."""
        try:
            now = self._identity()
            if now == self.seen:
                return False
            self.context.load_cert_chain(self.served)
        except (OSError, ssl.SSLError) as exc:
            print(f"kept the served certificate: {self.served} did not load: {exc}", file=sys.stderr, flush=True)
            return False
        self.seen = now
        print(f"serving the certificate renewed in {self.served}", flush=True)
        return True

    async def watch(self, every: float = RELOAD_SECONDS) -> None:
        while True:
            await asyncio.sleep(every)
            self.check()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", action="append", required=True, help="An address to listen on (repeat).")
    parser.add_argument("--port", type=int, default=4200)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--tls", type=Path, help="Serve only TLS with this key and certificate (served.pem, both in "
                        "one file), loaded again when it is replaced.")
    args = parser.parse_args(argv)
    sockets = [bound(address, args.port) for address in dict.fromkeys(args.bind)]
    context = served_context(args.tls) if args.tls else None

    import uvicorn
    from prefect.server.api.server import create_app
    from prefect.settings import (
        PREFECT_SERVER_API_KEEPALIVE_TIMEOUT,
        PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL,
        PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT,
    )

    config = uvicorn.Config(
        app=create_app(final=True), timeout_keep_alive=PREFECT_SERVER_API_KEEPALIVE_TIMEOUT.value(),
        ws_ping_interval=PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL.value(),
        ws_ping_timeout=PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT.value(), log_level=args.log_level,
        ssl_context_factory=None if context is None else lambda _config, _default: context)
    scheme = "https" if context else "http"
    print(f"Prefect server on {', '.join(f'{scheme}://{a}:{args.port}' for a in dict.fromkeys(args.bind))}",
          flush=True)
    server = uvicorn.Server(config)
    reload = CertificateReload(context, args.tls) if context is not None and args.tls else None
    asyncio.run(serve(server, sockets, reload))


async def serve(server: Any, sockets: list[socket.socket], reload: CertificateReload | None) -> None:
    """uvicorn's `Server.run`, with the certificate watched beside it."""
    watcher = asyncio.create_task(reload.watch()) if reload is not None else None
    try:
        await server.serve(sockets=sockets)
    finally:
        if watcher is not None:
            watcher.cancel()


if __name__ == "__main__":
    main(sys.argv[1:])
