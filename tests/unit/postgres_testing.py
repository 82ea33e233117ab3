"""Debian's PostgreSQL for unit tests (`make setup` installs it): a scratch folder, and a server started and waited
for, stopped however the test ends."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

POSTGRES = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
BIN = POSTGRES[-1].parent if POSTGRES else Path("/nonexistent")


def scratch_folder(why_root: str) -> Path:
    """A folder other users may enter (the server runs as one); skips without the package or without root."""
    if not POSTGRES:
        pytest.skip("Debian's postgresql is not installed: `make setup` installs it")
    if os.geteuid() != 0:
        pytest.skip(why_root)
    work = Path(tempfile.mkdtemp(prefix="spark-pg-"))
    work.chmod(0o755)
    return work


@contextmanager
def running(command: list[str], ready: list[str]) -> Iterator[subprocess.Popen[str]]:
    """`command` (a postgres) in the background until `pg_isready` with `ready` answers; stopped on the way out."""
    server = subprocess.Popen(command, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([str(BIN / "pg_isready"), *ready], capture_output=True, timeout=10,
                             check=False).returncode != 0:
            assert server.poll() is None, server.stdout.read() if server.stdout else "postgres exited"
            assert time.monotonic() < deadline, "postgres did not start within 60 s"
            time.sleep(0.2)  # polling the condition (pg_isready), not waiting for time to pass
        yield server
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
