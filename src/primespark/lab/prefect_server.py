"""The lab's Prefect server: `prefect server start` on 127.0.0.1 with SQLite under the lab's state folder."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from primespark.errors import UserError
from primespark.secrets import atomic_write


class PrefectServer:
    def __init__(self, state_dir: Path, port: int) -> None:
        self.state_dir = state_dir
        self.port = port
        self.home = state_dir / "prefect"
        self.pid_file = state_dir / "prefect.pid"
        self.log_file = self.home / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def pid(self) -> int | None:
        """The server we started, if it still runs."""
        try:
            pid = int(self.pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if b"prefect" in cmdline and b"server" in cmdline else None

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=timeout) as reply:  # noqa: S310 (loopback)
                return reply.status == 200
        except OSError:
            return False

    def port_free(self) -> bool:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", self.port))
            except OSError:
                return False
        return True

    def preflight(self) -> None:
        if self.pid() is None and not self.port_free():
            raise UserError(
                f"port {self.port} (the lab's Prefect server) is taken by another program",
                fix=f"stop what listens there (`ss -ltnp 'sport = :{self.port}'`) or change lab.prefect_port "
                "in the fleet file",
            )

    def start(self) -> bool:
        """Start in the background unless ours already runs; True if it was started now."""
        if self.pid() is not None:
            return False
        self.preflight()
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        env = {**os.environ, "PREFECT_HOME": str(self.home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_API_URL": self.api_url, "PREFECT_UI_API_URL": self.api_url}
        env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)  # SQLite in PREFECT_HOME
        prefect = Path(sys.executable).with_name("prefect")
        with open(self.log_file, "ab") as log:
            process = subprocess.Popen(
                [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True, cwd=self.home,
            )
        atomic_write(self.pid_file, f"{process.pid}\n")
        atomic_write(self.state_dir / "prefect.env", f"PREFECT_API_URL={self.api_url}\n", mode=0o644)
        return True

    def wait_healthy(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.healthy():
                return
            if self.pid() is None:
                break
            time.sleep(0.5)
        tail = self.log_file.read_text(errors="replace").splitlines()[-10:] if self.log_file.is_file() else []
        raise UserError("the lab's Prefect server did not answer on " + f"{self.api_url}/health:\n" + "\n".join(tail),
                        fix=f"see {self.log_file}; `spark lab down` then `spark lab up` starts it afresh")

    def stop(self, timeout: float = 20) -> bool:
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True
