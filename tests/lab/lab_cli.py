"""What lab tests share beyond the fixtures: the `spark` CLI run as an operator runs it, and waiting for a
condition with a deadline (never a bare sleep)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv running the tests: its `spark`, `ansible-playbook`
SPARK = str(BIN / "spark")


def spark(*args: str, timeout: float = 600, columns: int | None = None,
          extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`spark ARGS` from the repo; `columns`: the width its tables are drawn to (rich folds cells to fit); `extra`:
    environment variables added."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # the CLI finds the server itself
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return subprocess.run([SPARK, *args], capture_output=True, text=True, timeout=timeout,
                          env={**env, **(extra or {})}, cwd=REPO)


def until(what: str, predicate: Callable[[], Any], timeout: float, every: float = 1.0,
          tolerate: tuple[type[Exception], ...] = ()) -> Any:
    """Poll `predicate` until it returns something true, or fail naming `what` and its last value; `tolerate`:
    errors that mean "not yet" (a service still starting)."""
    deadline = time.monotonic() + timeout
    value: Any = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except tolerate as exc:
            value = exc
        else:
            if value:
                return value
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s (last: {value!r})")


FLEET_CA = "/etc/ssl/primespark/ca.pem"  # on every host of a fleet with a CA (the tls role)
TLS_PLAYBOOK = """\
- name: The hosts' certificates only
  hosts: all
  become: true
  roles:
    - tls
"""
# Runs inside a lab host: a TLS connection to ADDRESS:PORT verified against CA, and the peer's certificate.
_PEER = ("import json, socket, ssl, sys; address, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]; "
         "context = ssl.create_default_context(cafile=ca); "
         "tls = context.wrap_socket(socket.create_connection((address, port), timeout=10), server_hostname=address); "
         "print(json.dumps(tls.getpeercert()))")


def served_certificate(run_on: Callable[[str, str], subprocess.CompletedProcess[str]], host: str, address: str,
                       port: int) -> dict[str, Any]:
    """The certificate served at ADDRESS:PORT as `host` sees it (run_on: the lab's exec), verified against the fleet
    CA there (Python's getpeercert: subject, subjectAltName, serialNumber, …); AssertionError if it does not
    verify."""
    import json

    peer = run_on(host, f"python3 -c '{_PEER}' {address} {port} {FLEET_CA}")
    assert peer.returncode == 0, f"{host} -> {address}:{port}: {peer.stderr.strip()[-500:]}"
    return dict(json.loads(peer.stdout))

