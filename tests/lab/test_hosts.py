"""The host layer over real SSH: a step past its timeout is stopped on the host itself, not only here."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.lab


def test_a_remote_step_past_its_timeout_is_stopped_on_the_host_too(lab):
    """Killing ssh alone would leave the command (restic, holding its lock) running on the host."""
    from primespark.context import FleetContext
    from primespark.hosts import CommandTimeout

    runner = FleetContext.load("lab", "ssh").hosts.runner("pi-2")
    probe = "sleep 271"  # a command line nothing else on the lab host runs
    started = time.monotonic()
    with pytest.raises(CommandTimeout, match="did not finish within 3 s"):
        runner.run(["sh", "-c", f"{probe}; echo never"], timeout=3)
    assert time.monotonic() - started < 90
    deadline = time.monotonic() + 40
    while lab.exec("pi-2", f"pgrep -f '^{probe}$'").returncode == 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert lab.exec("pi-2", f"pgrep -f '^{probe}$'").returncode != 0, "the command still runs on the host"
