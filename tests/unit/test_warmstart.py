"""Warm starts (primespark.orchestration.warmstart): a run forked by the warm server must look, to the worker
that started its client, like `python -m MODULE` itself: its output on the client's streams, its exit status,
the signals sent to the client, its environment and working directory; a client killed outright takes its run
along; without a server the client starts the module cold. A small module stands in for Prefect's engine here
(tests/unit/test_flows_deploy.py runs the real engine through a real worker)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

TARGET = '''
import os, signal, sys, time
mode, arg = sys.argv[1], sys.argv[2]
if mode == "echo":
    print(os.environ.get("MARK"), os.getcwd(), os.getppid(), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    sys.exit(int(arg))
if mode == "wait":  # note its pid and wait; on SIGTERM exit 3 (as Prefect's engine ends a cancelled run)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
    open(arg, "w").write(str(os.getpid()))
    time.sleep(120)
if mode == "wait-default":  # SIGTERM ends it the default way
    open(arg, "w").write(str(os.getpid()))
    time.sleep(120)
if mode == "count":  # note each SIGTERM and SIGUSR1; once told, take a while to finish (as the engine reports a crash)
    def note(signum, _frame):
        with open(arg, "a") as out:
            out.write(signal.Signals(signum).name + "\\n")
    signal.signal(signal.SIGTERM, note)
    signal.signal(signal.SIGUSR1, note)
    open(arg + ".pid", "w").write(str(os.getpid()))
    deadline = time.monotonic() + 60
    while not os.path.exists(arg + ".finish") and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(1)  # the report: a second SIGTERM would come in the middle of it
    sys.exit(3)
'''


# A guard against a hang, not a speed target (the unit tests run at a low priority beside the lab tests).
def until(what: str, check: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def pending(pid: int, signum: int) -> bool:
    """Whether `signum` waits to be delivered to `pid` (once it is not, its handler runs before the process goes
    on with what it was waiting for)."""
    fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if ":\t" in line)
    bit = 1 << (signum - 1)
    return any(int(fields[name], 16) & bit for name in ("SigPnd", "ShdPnd"))


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "warmtarget.py").write_text(TARGET)
    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "lib"), src]),
            "SPARK_WARMSTART_SOCKET": str(tmp_path / "run" / "warm.sock")}


@pytest.fixture
def server(tmp_path: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    sock = tmp_path / "run" / "warm.sock"
    proc = subprocess.Popen([sys.executable, "-m", "primespark.orchestration.warmstart", "serve", "--socket",
                             str(sock), "--module", "warmtarget"], env=env, stderr=subprocess.PIPE)
    until("the server listens", sock.exists)
    yield proc
    proc.terminate()
    proc.wait(timeout=30)


def client(env: dict[str, str], *args: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "primespark.orchestration.warmstart", "run", "warmtarget",
                             *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)  # type: ignore[call-overload]


def test_a_run_gets_the_clients_streams_environment_cwd_and_gives_back_its_status(
        tmp_path: Path, env: dict[str, str], server: subprocess.Popen[bytes]) -> None:
    work = tmp_path / "work"
    work.mkdir()
    done = client({**env, "MARK": "from-the-client"}, "echo", "7", cwd=work)
    out, err = done.communicate(timeout=30)  # returns only once every writer of the pipes is gone
    assert done.returncode == 7, err
    mark, cwd, parent = out.split()
    assert mark == "from-the-client" and cwd == str(work)
    assert int(parent) == server.pid, "forked by the server: no interpreter of its own"
    assert "to stderr" in err and "cold" not in err
    assert oct((tmp_path / "run" / "warm.sock").stat().st_mode & 0o777) == "0o600"


def test_a_signal_to_the_client_reaches_the_run_and_its_ending_is_the_clients(
        tmp_path: Path, env: dict[str, str], server: subprocess.Popen[bytes]) -> None:
    for mode, expected in (("wait", 3), ("wait-default", -signal.SIGTERM)):
        noted = tmp_path / f"{mode}.pid"
        proc = client(env, mode, str(noted))
        until("the run started", lambda: noted.exists() and noted.read_text() != "")  # noqa: B023
        run_pid = int(noted.read_text())
        assert run_pid != proc.pid
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == expected, mode
        until("the run ended", lambda: not alive(run_pid))  # noqa: B023


def test_a_client_killed_outright_takes_its_run_along(
        tmp_path: Path, env: dict[str, str], server: subprocess.Popen[bytes]) -> None:
    noted = tmp_path / "run.pid"
    proc = client(env, "wait", str(noted))
    until("the run started", lambda: noted.exists() and noted.read_text() != "")
    run_pid = int(noted.read_text())
    proc.kill()
    proc.communicate(timeout=30)
    until("the run ended", lambda: not alive(run_pid))


def test_a_stopped_server_ends_its_runs_and_removes_its_socket(
        tmp_path: Path, env: dict[str, str], server: subprocess.Popen[bytes]) -> None:
    noted = tmp_path / "run.pid"
    proc = client(env, "wait-default", str(noted))
    until("the run started", lambda: noted.exists() and noted.read_text() != "")
    server.terminate()
    assert server.wait(timeout=30) == 0
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM
    assert not alive(int(noted.read_text()))
    assert not (tmp_path / "run" / "warm.sock").exists()


def test_a_run_gets_sigterm_once_from_its_client_and_its_stopping_server(
        tmp_path: Path, env: dict[str, str], server: subprocess.Popen[bytes]) -> None:
    """The client relays SIGTERM, then the server stops (and ends its runs): the run gets one SIGTERM. Prefect's
    engine reports the crash on the first; a second, in the middle of that report, would abort it."""
    counted = tmp_path / "signals"
    noted = tmp_path / "signals.pid"
    proc = client(env, "count", str(counted))
    until("the run started", lambda: noted.exists() and noted.read_text() != "")
    proc.send_signal(signal.SIGTERM)
    until("the run got the relayed SIGTERM", lambda: counted.exists() and "SIGTERM" in counted.read_text())
    proc.send_signal(signal.SIGUSR1)
    until("the run got SIGUSR1, still relayed", lambda: "SIGUSR1" in counted.read_text())
    server.terminate()  # it ends its runs: SIGTERM (this one already had it), SIGKILL after the grace period
    until("the server took its SIGTERM", lambda: not pending(server.pid, signal.SIGTERM))
    (tmp_path / "signals.finish").touch()
    assert server.wait(timeout=30) == 0
    proc.communicate(timeout=30)
    assert proc.returncode == 3
    assert counted.read_text().split() == ["SIGTERM", "SIGUSR1"]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_stopping_server_waits_for_its_runs_without_spinning(
        tmp_path: Path, env: dict[str, str], server: subprocess.Popen[bytes]) -> None:
    """While its runs report their end (the grace period), the stopping server sleeps in select(): its clients'
    relays and the signal wake-ups are read, not left to wake it again at once."""
    counted = tmp_path / "signals"
    proc = client(env, "count", str(counted))
    until("the run started", lambda: (tmp_path / "signals.pid").exists())
    proc.send_signal(signal.SIGTERM)  # relayed while the server still serves
    until("the run got the relayed SIGTERM", lambda: counted.exists() and "SIGTERM" in counted.read_text())
    server.terminate()
    until("the server took its SIGTERM", lambda: not pending(server.pid, signal.SIGTERM))
    proc.send_signal(signal.SIGUSR1)  # a client message during the shutdown
    until("the run got SIGUSR1 from the stopping server", lambda: "SIGUSR1" in counted.read_text())
    before = cpu_seconds(server.pid)
    time.sleep(1.0)  # the window measured: the run is still running, the server waits for it
    used = cpu_seconds(server.pid) - before
    (tmp_path / "signals.finish").touch()
    assert server.wait(timeout=30) == 0
    proc.communicate(timeout=30)
    assert used < 0.3, f"the stopping server used {used:.2f} s of CPU in 1 s of waiting"


def test_without_a_server_the_client_starts_the_module_cold(tmp_path: Path, env: dict[str, str]) -> None:
    done = client({**env, "MARK": "cold"}, "echo", "5", cwd=tmp_path)
    out, err = done.communicate(timeout=60)
    assert done.returncode == 5 and out.split()[0] == "cold"
    assert int(out.split()[2]) == os.getpid(), "the client became the module (exec): its parent is this test"
    assert f"no warm server at {env['SPARK_WARMSTART_SOCKET']}" in err and "starting warmtarget cold" in err
    unset = {k: v for k, v in env.items() if k != "SPARK_WARMSTART_SOCKET"}
    done = client(unset, "echo", "0")
    out, err = done.communicate(timeout=60)
    assert done.returncode == 0 and "SPARK_WARMSTART_SOCKET is not set; starting warmtarget cold" in err


def test_a_server_of_another_module_declines_and_the_client_starts_cold(
        tmp_path: Path, env: dict[str, str], server: subprocess.Popen[bytes]) -> None:
    (tmp_path / "lib" / "othertarget.py").write_text(TARGET)
    done = subprocess.run([sys.executable, "-m", "primespark.orchestration.warmstart", "run", "othertarget", "echo",
                           "0"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "declined: this server starts warmtarget, not othertarget" in done.stderr


def test_the_worker_wrapper_becomes_the_worker_and_its_server_ends_with_it(tmp_path: Path,
                                                                         env: dict[str, str]) -> None:
    sock = tmp_path / "run" / "warm.sock"
    # the "worker": waits for the server, starts one run through it, reports, and exits
    worker = (f"import os, subprocess, sys, time\n"
              f"while not os.path.exists({str(sock)!r}): time.sleep(0.02)\n"
              "print('worker', os.getpid(), os.environ['SPARK_WARMSTART_SOCKET'], flush=True)\n"
              "done = subprocess.run([sys.executable, '-m', 'primespark.orchestration.warmstart', 'run',"
              " 'warmtarget', 'echo', '4'], capture_output=True, text=True)\n"
              "print('run', done.returncode, done.stdout.split()[2], flush=True)\n")
    unset = {k: v for k, v in env.items() if k != "SPARK_WARMSTART_SOCKET"}
    proc = subprocess.Popen([sys.executable, "-m", "primespark.orchestration.warmstart", "worker", "--socket",
                             str(sock), "--module", "warmtarget", "--", sys.executable, "-c", worker],
                            env=unset, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    pid, socket_path = lines["worker"].split()
    assert int(pid) == proc.pid, "the wrapper became the worker (exec): the service's main process"
    assert socket_path == str(sock)
    code, run_parent = lines["run"].split()
    assert code == "4" and int(run_parent) != proc.pid, "the run was forked by the server"
    # it removes its socket, then exits
    until("the server ended with its worker", lambda: not sock.exists() and not alive(int(run_parent)))


def test_a_server_silent_after_taking_the_request_is_a_failed_run_never_a_second_start(
        tmp_path: Path, env: dict[str, str]) -> None:
    """Once the request is sent, the server may have forked the run: only its explicit "no" allows a cold start."""
    sock = tmp_path / "run" / "warm.sock"
    sock.parent.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(str(sock))
        listener.listen(1)
        proc = client({**env, "MARK": "twice"}, "echo", "0")
        conn, _ = listener.accept()
        with conn:
            _data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, 3)
            for fd in fds:
                os.close(fd)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "twice" not in out, (out, err)
    assert f"the warm server at {sock} did not start the run" in err and "cold" not in err


def _fake_server(sock: Path) -> socket.socket:
    sock.parent.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(sock))
    listener.listen(1)
    return listener


def _take_request(listener: socket.socket) -> socket.socket:
    conn, _ = listener.accept()
    _data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, 3)
    for fd in fds:
        os.close(fd)
    return conn


def test_a_signal_before_the_run_is_forked_is_relayed_once_it_is(tmp_path: Path, env: dict[str, str]) -> None:
    """A cancel that comes while the server is still forking: the run gets it, rather than the client dying by it
    (which would SIGKILL the run on the server's side)."""
    with _fake_server(tmp_path / "run" / "warm.sock") as listener:
        proc = client(env, "echo", "0")
        with _take_request(listener) as conn:
            proc.send_signal(signal.SIGTERM)  # the server has the request, and has not answered yet
            until("the client took the signal", lambda: not pending(proc.pid, signal.SIGTERM))
            assert proc.poll() is None, "the client died by a signal it should have kept for the run"
            conn.sendall(json.dumps({"pid": 4242}).encode())
            relayed = json.loads(conn.recv(1 << 16))
            assert relayed == {"signal": signal.SIGTERM}
            conn.sendall(json.dumps({"status": -signal.SIGTERM}).encode())
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM


def test_a_signal_before_a_cold_start_ends_the_client_and_starts_nothing(tmp_path: Path,
                                                                         env: dict[str, str]) -> None:
    with _fake_server(tmp_path / "run" / "warm.sock") as listener:
        proc = client({**env, "MARK": "started"}, "echo", "0")
        with _take_request(listener) as conn:
            proc.send_signal(signal.SIGTERM)
            until("the client took the signal", lambda: not pending(proc.pid, signal.SIGTERM))
            conn.sendall(json.dumps({"error": "this server runs another module"}).encode())
            out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM and "started" not in out, (out, err)
    assert "cold" not in err
