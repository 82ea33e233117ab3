"""A service without systemd (the lab's containers): `python -m primespark.orchestration.supervise --name NAME
[--env-file FILE] [--log FILE] -- COMMAND…`, started by the roles with `setsid --fork`.

What systemd gives a unit and a bare `nohup` does not: when the service's main process dies, whatever it started
dies with it (systemd's KillMode=control-group). A Prefect worker runs each flow in a child process of its own
session; without this, `kill -9` of the worker would leave its flow runs running unsupervised. The supervisor
is a child subreaper (prctl PR_SET_CHILD_SUBREAPER): the orphans of its service are re-parented to it, and once
the service exits it ends them (SIGTERM, then SIGKILL after a grace period) and exits with the service's code.
It does not restart the service (a lab test must see a dead worker stay dead); under systemd, Restart= does.

`--status NAME` exits 0 when the service runs, 1 when not; `--stop NAME` stops it (SIGTERM to the supervisor).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36
RUN_DIR = Path("/run/primespark")
GRACE_SECONDS = 10.0


def pid_file(name: str, run_dir: Path = RUN_DIR) -> Path:
    return run_dir / f"{name}.pid"


def running(name: str, run_dir: Path = RUN_DIR) -> int | None:
    """The supervisor's pid, if it runs (its pid file names a live supervisor of that service)."""
    try:
        pid = int(pid_file(name, run_dir).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if b"primespark.orchestration.supervise" in cmdline and name.encode() in cmdline else None


def read_env_file(path: Path) -> dict[str, str]:
    """systemd's EnvironmentFile= format, as the roles write it: KEY=VALUE lines, # comments."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value
    return out


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def end_orphans(grace: float = GRACE_SECONDS) -> list[int]:
    """SIGTERM every remaining child (the service's re-parented orphans), SIGKILL those alive after `grace`."""
    ended = _children(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _children(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _children(os.getpid()):
            _reap()
            time.sleep(0.1)
        _reap()
    return ended


def supervise(name: str, command: list[str], env: dict[str, str], log: Path | None, run_dir: Path) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise SystemExit(f"prctl(PR_SET_CHILD_SUBREAPER) failed: errno {ctypes.get_errno()}")
    run_dir.mkdir(parents=True, exist_ok=True)
    pid_file(name, run_dir).write_text(f"{os.getpid()}\n")
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (held for the service's life)
    service = subprocess.Popen(command, env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=out,
                               stderr=subprocess.STDOUT)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            service.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    code = _wait_reaping(service.pid)
    service.returncode = code  # reaped here: Popen must not wait for it again
    ended = end_orphans()
    if log:
        with open(log, "a") as handle:
            handle.write(f"supervise: {name} exited with {code}; ended {len(ended)} processes it left\n")
    with contextlib.suppress(OSError):
        if running(name, run_dir) == os.getpid():
            pid_file(name, run_dir).unlink()
    return code if code >= 0 else 128 - code


def _wait_reaping(pid: int) -> int:
    """Wait for the service (its exit code, negative for a signal, as Popen's), reaping meanwhile the orphans that
    were re-parented here and have exited: a daemon the service started (an ssh ControlMaster ends 60 s after its
    last command) would otherwise stay a zombie for the service's whole life, one more each time."""
    while True:
        found, status = os.waitpid(-1, 0)
        if found == pid:
            return os.waitstatus_to_exitcode(status)


def _alive(pid: int) -> bool:
    """Running (an exited process waiting for its parent to reap it is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop(name: str, run_dir: Path, timeout: float = 30.0) -> bool:
    pid = running(name, run_dir)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(pid), signal.SIGKILL)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="The service's name (its pid file).")
    parser.add_argument("--env-file", type=Path)
    parser.add_argument("--log", type=Path)
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR)
    parser.add_argument("--status", action="store_true", help="Exit 0 if the service runs, 1 if not.")
    parser.add_argument("--stop", action="store_true", help="Stop the service.")
    parser.add_argument("command", nargs="*")
    args = parser.parse_args(argv)
    if args.status:
        return 0 if running(args.name, args.run_dir) else 1
    if args.stop:
        stop(args.name, args.run_dir)
        return 0
    if not args.command:
        parser.error("the service's command follows `--`")
    if running(args.name, args.run_dir):
        print(f"{args.name} already runs", file=sys.stderr)
        return 0
    env = read_env_file(args.env_file) if args.env_file else {}
    return supervise(args.name, args.command, env, args.log, args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
