"""A fleet for agent task tests on this machine: the agent-tasks fixture with its hot tier (pi-1, pi-2) in a folder
of the test's and the test's own templates."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "fleet" / "valid" / "agent-tasks.yaml"


def agent_fleet(root: Path, tasks: dict[str, Any] | None = None) -> str:
    data = yaml.safe_load(FIXTURE.read_text())
    data["tiers"]["hot"]["path"] = str(root / "hot")
    del data["backup"]  # its plans name /srv/hot, which is no tier folder here
    data["tasks"] = tasks or {}
    (root / "hot").mkdir(exist_ok=True)
    path = root / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@contextlib.contextmanager
def node_exporter(metrics: str) -> Iterator[int]:
    """A stand-in node exporter on loopback serving `metrics`; its port. Stopped on leaving."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = metrics.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
