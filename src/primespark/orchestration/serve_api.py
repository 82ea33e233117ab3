"""The Prefect server (API, UI and its services) listening on several addresses: `python -m
primespark.orchestration.serve_api --port 4200 --bind <LAN address> --bind <mesh address>`.

`prefect server start` binds one address; the fleet's server must answer on its LAN (its site's worker, the
controller) and on its mesh address (the other sites' workers), and nowhere else. This runs the same app
`prefect server start` runs in the foreground (`create_app(final=True)`, services included) under uvicorn with one
socket per address. The sockets are bound with IP_FREEBIND, so the server starts before the WireGuard interface
that carries its mesh address is up (at boot), and answers there once it is.
"""

from __future__ import annotations

import argparse
import socket
import sys

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", action="append", required=True, help="An address to listen on (repeat).")
    parser.add_argument("--port", type=int, default=4200)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    sockets = [bound(address, args.port) for address in dict.fromkeys(args.bind)]

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
        ws_ping_timeout=PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT.value(), log_level=args.log_level)
    print(f"Prefect server on {', '.join(f'{a}:{args.port}' for a in dict.fromkeys(args.bind))}", flush=True)
    uvicorn.Server(config).run(sockets=sockets)


if __name__ == "__main__":
    main(sys.argv[1:])
