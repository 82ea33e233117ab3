"""Warm starts for a worker's flow runs: a process that has already imported Prefect's engine forks each run,
instead of a fresh interpreter importing it (1 s of the 2 s from "taken" to "running" on a lab host; more on a Pi).

`python -m primespark.orchestration.warmstart worker --socket PATH -- prefect worker start …` is the worker's
service: it forks the warm server, then becomes the worker itself (exec), so the worker stays the service's main
process and what kills it (systemd, the lab's supervisor, `kill -9`) still ends its runs.

`python -m primespark.orchestration.warmstart run prefect.engine` is what the deployments start per run (they name
it as their command). It hands the server its standard streams (the fds themselves), its environment, its working
directory and its arguments; the server forks a process that runs the module in them, in a process group of its
own. The client relays the signals it gets to that group and exits with the run's status, so the worker sees what
it would have seen of `python -m prefect.engine`: the output on its pipes, the exit code, SIGTERM on cancellation.
A client killed outright (SIGKILL) takes its run along: the server sees the connection close and kills the group.
Without a server to reach (none configured, not started yet, gone), the client becomes `python -m MODULE` itself:
a cold start, slower, never wrong.

Written on the standard library alone: the client must start in milliseconds, and no process pool of a library
forks a process that then runs as another process's stand-in (its streams, exit status and signals).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import json
import os
import pkgutil
import runpy
import selectors
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SOCKET_ENV = "SPARK_WARMSTART_SOCKET"
PR_SET_PDEATHSIG = 1
GRACE_SECONDS = 10.0  # as the lab's supervisor gives a service's runs, before SIGKILL
MAX_MESSAGE = 1 << 20  # a run's environment, with room to spare
ANSWER_SECONDS = 120.0
RELAYED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


@dataclass(frozen=True)
class Request:
    """What a run's client hands the server: the run's module, arguments, environment, cwd and stream fds."""

    module: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    fds: list[int] = field(default_factory=list)


def _pdeathsig(sig: int) -> None:
    """Linux: this process gets `sig` when its parent dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def _send(conn: socket.socket, message: dict[str, object], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(conn, [data], fds)
    else:
        conn.send(data)


# --- the client: the deployments' command --------------------------------------------------------------------


def _end_by(signum: int) -> None:
    """End this process by `signum`, as the module itself would have ended on it."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _cold(module: str, argv: list[str], why: str, signalled: list[int] | None = None) -> int:
    if signalled:  # stopped before anything ran (a cancel): nothing starts
        _end_by(signalled[0])
    print(f"warmstart: {why}; starting {module} cold", file=sys.stderr, flush=True)
    os.execv(sys.executable, [sys.executable, "-m", module, *argv])  # noqa: S606 (becomes the module)
    return 127  # not reached


def run(module: str, argv: list[str]) -> int:
    # Signals are taken from the start: one that comes before the run is forked is kept and relayed once it is (or,
    # with no run to come, ends this process by it), never the default ending that would SIGKILL a forked run.
    signalled: list[int] = []
    forked: list[socket.socket] = []

    def relay(signum: int, _frame: object) -> None:
        if not forked:
            signalled.append(signum)
            return
        with contextlib.suppress(OSError):
            _send(forked[0], {"signal": signum})

    for sig in RELAYED_SIGNALS:
        signal.signal(sig, relay)
    path = os.environ.get(SOCKET_ENV)
    if not path:
        return _cold(module, argv, f"{SOCKET_ENV} is not set", signalled)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.settimeout(5)
        conn.connect(path)
        _send(conn, {"module": module, "argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}, [0, 1, 2])
    except OSError as exc:  # the server has nothing (a packet is sent whole or not at all)
        conn.close()
        return _cold(module, argv, f"no warm server at {path} ({exc})", signalled)
    # From here the server may have forked the run: only its explicit "no" allows a cold start, never a silence
    # (that would run the flow twice); it answers at once, the timeout is for a server that hangs.
    try:
        conn.settimeout(ANSWER_SECONDS)
        answer = json.loads(conn.recv(MAX_MESSAGE) or b"{}")
    except (OSError, ValueError) as exc:
        answer = {"lost": str(exc)}
    if "error" in answer:
        conn.close()
        return _cold(module, argv, f"the warm server at {path} declined: {answer['error']}", signalled)
    if "pid" not in answer:
        print(f"warmstart: the warm server at {path} did not start the run ({answer.get('lost', 'it went away')})",
              file=sys.stderr, flush=True)
        return 1
    conn.settimeout(None)
    forked.append(conn)
    for signum in signalled:  # those that came before the run was forked
        with contextlib.suppress(OSError):
            _send(conn, {"signal": signum})
    message = conn.recv(MAX_MESSAGE)
    if not message:
        print(f"warmstart: the warm server at {path} went away; run {answer['pid']} ended with it",
              file=sys.stderr, flush=True)
        return 1
    status = int(json.loads(message)["status"])
    if status < 0:  # ended by a signal: end the same way, as `python -m MODULE` would have
        _end_by(-status)
    return status


# --- the server ----------------------------------------------------------------------------------------------


def _peer_uid(conn: socket.socket) -> int:
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
    return int(uid)


def _receive(conn: socket.socket) -> Request:
    data, fds, _flags, _addr = socket.recv_fds(conn, MAX_MESSAGE, 3)
    try:
        body = json.loads(data)
        request = Request(module=str(body["module"]), argv=[str(a) for a in body["argv"]],
                          env={str(k): str(v) for k, v in body["env"].items()}, cwd=str(body["cwd"]), fds=fds)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"a malformed request ({exc})") from exc
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"a request with {len(fds)} stream fds, not 3")
    return request


class Server:
    """Accepts runs on a unix socket, forks each, relays signals and exit statuses; single-threaded (it forks)."""

    def __init__(self, path: Path, module: str) -> None:
        self.path, self.module = path, module
        self.pid = os.getpid()
        self.runs: dict[int, socket.socket] = {}  # run pid → its client's connection
        self.terminated: set[int] = set()  # runs sent SIGTERM (relayed from the client, or by shutdown)
        self.stopping = False
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def listen(self) -> None:
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._stop)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a dead server's socket
        old = os.umask(0o177)
        try:
            self.listener.bind(str(self.path))
        finally:
            os.umask(old)
        self.listener.listen(16)
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")

    def _stop(self, _signum: int, _frame: object) -> None:
        self.stopping = True

    def serve(self) -> Request | None:
        """Until stopped: None in the server; a forked run's process returns its request instead."""
        while not self.stopping:
            for key, _ in self.selector.select(timeout=1.0):
                if key.data == "accept":
                    request = self._accept()
                    if request is not None:
                        return request
                elif key.data == "wake":
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wake_r, 512)
                else:
                    self._from_client(key.data, key.fileobj)  # type: ignore[arg-type]
            self._reap()
        self.shutdown()
        return None

    def _accept(self) -> Request | None:
        conn, _ = self.listener.accept()
        try:
            conn.settimeout(5)
            if _peer_uid(conn) != os.getuid():
                raise ValueError("a client of another user")
            request = _receive(conn)
        except (OSError, ValueError) as exc:
            with contextlib.suppress(OSError):
                _send(conn, {"error": str(exc)})
            conn.close()
            return None
        if request.module != self.module:
            _send(conn, {"error": f"this server starts {self.module}, not {request.module}"})
            for fd in request.fds:
                os.close(fd)
            conn.close()
            return None
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self._become_run(conn)
            return request
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)  # also done by the run itself: whichever comes first, the group exists
        for fd in request.fds:
            os.close(fd)  # the run holds them; the worker's pipes must end when the run does
        conn.settimeout(None)
        self.runs[pid] = conn
        self.selector.register(conn, selectors.EVENT_READ, pid)
        print(f"warmstart: run {pid} forked ({' '.join([self.module, *request.argv])})", file=sys.stderr, flush=True)
        try:
            _send(conn, {"pid": pid})
        except OSError:
            self._kill(pid, signal.SIGKILL)
        return None

    def _become_run(self, conn: socket.socket) -> None:
        """In the forked process: nothing of the server's is left (sockets, signal handlers, wake-up fd)."""
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
        _pdeathsig(signal.SIGKILL)  # a server that dies outright takes its runs along, as a worker's would
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        self.selector.close()
        for other in (self.listener, conn, *self.runs.values()):
            other.close()
        for fd in (self.wake_r, self.wake_w):
            os.close(fd)
        self.runs = {}

    def _from_client(self, pid: int, conn: socket.socket) -> None:
        try:
            message = conn.recv(MAX_MESSAGE)
        except OSError:
            message = b""
        if not message:  # the client is gone (killed outright): so is its run
            self._kill(pid, signal.SIGKILL)
            self._forget(pid)
            return
        with contextlib.suppress(ValueError, KeyError, TypeError):
            self._kill(pid, int(json.loads(message)["signal"]))

    def _kill(self, pid: int, sig: int) -> None:
        if sig == signal.SIGTERM:  # once per run: Prefect's engine reports its crash on the first, a second aborts that
            if pid in self.terminated:
                return
            self.terminated.add(pid)
        with contextlib.suppress(OSError):
            os.killpg(pid, sig)

    def _forget(self, pid: int) -> None:
        self.terminated.discard(pid)  # the pid may be a later run's
        conn = self.runs.pop(pid, None)
        if conn is not None:
            self.selector.unregister(conn)
            conn.close()

    def _reap(self) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.runs.get(pid)
            if conn is not None:
                with contextlib.suppress(OSError):
                    _send(conn, {"status": os.waitstatus_to_exitcode(wait_status)})
                self._forget(pid)

    def shutdown(self) -> None:
        """Runs end with their server, as with a worker: SIGTERM to each group, SIGKILL after the grace period.
        Meanwhile the wake-up pipe is drained and the clients' messages read (their relays, or their end): left
        unread they would keep select() returning at once, a busy loop beside the runs' crash reports."""
        self.selector.unregister(self.listener)
        self.listener.close()  # no new runs: a client that comes now starts cold
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in list(self.runs):
                self._kill(pid, sig)
            deadline = time.monotonic() + GRACE_SECONDS
            while self.runs and time.monotonic() < deadline:
                self._reap()
                if not self.runs:
                    break
                for key, _ in self.selector.select(timeout=0.1):
                    if key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            os.read(self.wake_r, 512)
                    elif key.data in self.runs:
                        self._from_client(key.data, key.fileobj)  # type: ignore[arg-type]
        if os.getpid() == self.pid:
            with contextlib.suppress(OSError):
                self.path.unlink()


def serve(path: Path, module: str, preload: list[str]) -> Request | None:
    """Import what runs need (before listening: a client that comes earlier starts cold), then serve."""
    for name in [module, *preload]:
        if name.endswith(".*"):  # every module of a package (the flows: one module per flow)
            package = importlib.import_module(name[:-2])
            for found in pkgutil.iter_modules(package.__path__, f"{package.__name__}."):
                importlib.import_module(found.name)
        else:
            importlib.import_module(name)
    server = Server(path, module)
    server.listen()
    print(f"warmstart: serving {module} on {path} (pid {os.getpid()})", file=sys.stderr, flush=True)
    return server.serve()


def become_run(request: Request) -> None:
    """The forked process turns into `python -m MODULE ARGV…` in the client's streams, environment and cwd."""
    for target, fd in enumerate(request.fds):
        os.dup2(fd, target)
        if fd > 2:
            os.close(fd)
    os.chdir(request.cwd)
    os.environ.clear()
    os.environ.update(request.env)
    settings = sys.modules.get("prefect.context")
    if settings is not None:  # Prefect read its settings from the server's environment when imported
        settings.refresh_global_settings_context()
    sys.argv = [request.module, *request.argv]
    # as under `python -m`, the module runs as __main__ only (its preloaded copy stays with those that imported it)
    sys.modules.pop(request.module, None)
    runpy.run_module(request.module, run_name="__main__", alter_sys=True)


def start_worker(path: Path, module: str, preload: list[str], command: list[str]) -> int:
    """Fork the warm server, then become the worker (whose runs inherit where to find it)."""
    worker = os.getpid()
    pid = os.fork()
    if pid == 0:
        _pdeathsig(signal.SIGTERM)  # the worker gone, the server (and with it the runs) ends
        if os.getppid() != worker:
            os._exit(0)
        try:
            request = serve(path, module, preload)
        except BaseException as exc:  # the worker goes on, its runs start cold
            print(f"warmstart: the warm server stopped: {exc!r}", file=sys.stderr, flush=True)
            os._exit(1)
        if request is None:
            os._exit(0)
        become_run(request)
        return 0
    os.environ[SOCKET_ENV] = str(path)
    os.execvp(command[0], command)  # noqa: S606 (becomes the worker: the service's main process)
    return 127  # not reached


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m primespark.orchestration.warmstart",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    client = sub.add_parser("run", help="Start MODULE warm (the deployments' command), or cold without a server.")
    client.add_argument("module")
    client.add_argument("args", nargs=argparse.REMAINDER)
    for name, text in (("worker", "Fork the warm server, then exec COMMAND (the worker)."),
                       ("serve", "The warm server alone, in the foreground.")):
        one = sub.add_parser(name, help=text)
        one.add_argument("--socket", type=Path, required=True, help="The unix socket it listens on (made 0600).")
        one.add_argument("--module", default="prefect.engine", help="What each run runs (`python -m` style).")
        one.add_argument("--preload", action="append", default=[],
                         help="More modules imported once, before serving; `PACKAGE.*`: each of its modules.")
        if name == "worker":
            one.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.action == "run":
        return run(args.module, args.args)
    if args.action == "worker":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            parser.error("the worker's command follows `--`")
        return start_worker(args.socket, args.module, args.preload, command)
    request = serve(args.socket, args.module, args.preload)
    if request is not None:
        become_run(request)
    return 0


if __name__ == "__main__":
    sys.exit(main())
