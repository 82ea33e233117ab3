"""A host lost mid-command, as the runners see it: a real sshd on loopback frozen with SIGSTOP (a host that hangs
or drops off the network) or killed with all it started (a stopped container, sshd gone) ends a watched stream
with `HostLost` within the liveness budget, while a command that fails, exits 255 itself or times out on a live
host does not."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sshd_testing import Sshd, loopback_sshd

from primespark.hosts import CommandTimeout, HostLost, Liveness, SshRunner, stream
from primespark.hosts.connection import SERVER_ALIVE_COUNT_MAX, SERVER_ALIVE_INTERVAL

# scaled down from the defaults so that a test takes seconds; the defaults' budget is checked below
FAST = Liveness(heartbeat=0.2, silent_after=1.0, probe_timeout=2.0)
TICKS = ["sh", "-c", "while :; do echo tick; sleep 0.2; done"]


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    with loopback_sshd(tmp_path / "sshd") as server:
        yield server


def test_the_default_budget_notices_a_silent_host_within_60_s() -> None:
    assert Liveness().within <= 60
    # ssh's own keepalive ends a dead session, and the probe that follows it fits too
    assert SERVER_ALIVE_INTERVAL * (SERVER_ALIVE_COUNT_MAX + 1) + Liveness().probe_timeout <= 60


def test_a_frozen_host_ends_the_stream_as_lost_within_the_budget(sshd: Sshd) -> None:
    runner = SshRunner(sshd.connection("pi-9"))
    frozen: list[float] = []

    def on_line(line: str) -> None:
        if line == "tick" and not frozen:
            sshd.freeze()  # sshd, its sessions and the command stop answering, the kernel still takes connections
            frozen.append(time.monotonic())

    with pytest.raises(HostLost) as lost:
        stream(runner, TICKS, on_line=on_line, timeout=120, liveness=FAST)
    took = time.monotonic() - frozen[0]
    assert took <= FAST.within + 2, f"lost after {took:.1f} s"
    assert lost.value.host == "pi-9" and "was lost mid-command" in lost.value.message
    assert "root@127.0.0.1" in lost.value.message and lost.value.fix
    assert lost.value.last_seen <= lost.value.detected


def test_a_host_whose_sshd_and_processes_are_gone_is_lost(sshd: Sshd) -> None:
    runner = SshRunner(sshd.connection("pi-9"))
    killed: list[float] = []

    def on_line(line: str) -> None:
        if not killed:
            sshd.kill()  # the connection closes at once; a new one is refused
            killed.append(time.monotonic())

    with pytest.raises(HostLost, match="its SSH session ended and a new connection got no answer"):
        stream(runner, TICKS, on_line=on_line, timeout=120, liveness=FAST)
    assert time.monotonic() - killed[0] <= FAST.within + 2


def test_a_failing_command_a_255_of_its_own_and_a_timeout_on_a_live_host_are_not_host_loss(sshd: Sshd) -> None:
    runner = SshRunner(sshd.connection("pi-9"))
    lines: list[str] = []
    failed = stream(runner, ["sh", "-c", "echo started; exit 3"], on_line=lines.append, liveness=FAST)
    assert failed.returncode == 3 and lines == ["started"]
    # killed by a signal or exiting 255, ssh says 255 as for a lost session: the host answers the probe
    own = stream(runner, ["sh", "-c", "echo started; exit 255"], on_line=lines.append, liveness=FAST)
    assert own.returncode == 255
    # silent for longer than `silent_after`: probed, it answers, and the command goes on to its end
    quiet = stream(runner, ["sh", "-c", "echo started; sleep 3; echo done"], on_line=lines.append, liveness=FAST)
    assert quiet.returncode == 0 and lines[-1] == "done"
    with pytest.raises(CommandTimeout):
        stream(runner, ["sh", "-c", "echo started; sleep 30"], on_line=lines.append, timeout=1, liveness=FAST)
