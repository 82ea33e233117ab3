"""What runs on the chosen host for an agent task: the command under resource limits, its timeout, its result
committed once.

Shipped as source and run with the host's own `python3 -c SOURCE OP` (standard library only, as
`data/tierside.py`): a JSON request on stdin, one JSON object out (the last line).

Operations:
- `run`: the task's command, unless its result is already committed or finished here (then that result, and
  nothing runs). It works in `<root>/.staging/<task-id>/` (`out/` is the command's working folder and
  `$SPARK_TASK_OUTPUT`; `stdout.log` and `stderr.log` hold its output; `run.json` the host and pid, for `cancel`).
  While it runs, each line of its output is sent back as a JSON line `{"stream": ..., "line": ...}`, and
  `{"alive": <time>}` when nothing else went for `heartbeat` seconds (the controller's sign that the host is
  there); the answer is the last line. On exit 0 the run is *finished*: `result.json` says succeeded, and the
  folder stays in staging until the controller commits it. A failed, timed-out or cancelled run leaves its staging
  folder for inspection; the next run of the id replaces it, after ending whatever a killed run left behind. One
  run per task id at a time on a host (a lock file). While it runs, `<root>/.staging/<task-id>.running.json`
  (beside the staging folder) says which processes are the task's and its power policy: the edge role's power
  scripts (spark-power, spark-ups-guard) read it to requeue or pause the task at the start of quiet hours or on a
  low battery. A run stopped by them (the file `power-stopped` in its staging folder says why) ends
  `power-stopped`, not failed; time spent paused (SIGSTOP) does not count toward the timeout.
- `commit`: a finished run's folder renamed to `<root>/<task-id>/` and flushed with its parent: a result is there
  whole or not at all. Only the controller asks for it, once it has the run's answer: a host that was lost
  mid-task, and whose task went on to finish while the task was run elsewhere, never commits a second result.
- `discard`: a finished (or stopped) run's staging folder removed (its result was committed elsewhere).
- `find`: the task's committed result here, or its staging folder: running, finished or stopped.
- `cancel`: the task's processes on this host stopped (SIGTERM to their groups, SIGKILL after a grace).
- `running`: the tasks running on this host now (their `<id>.running.json`, and processes of theirs alive), for
  `spark host drain --wait`.

Limits: `systemd-run --scope -p CPUQuota= -p MemoryMax=` when systemd is PID 1 and this runs as root; else a
cgroup v2 group of its own under /sys/fs/cgroup/primespark-tasks when that is writable; else none, and the
result says "not enforced: <why>". The command and every process it starts carry SPARK_TASK_ID and
SPARK_TASK_HOST in their environment: that is how a later run or a cancel finds them, even those that left the
process group.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

STAGING = ".staging"
GRACE_SECONDS = 10.0  # between SIGTERM and SIGKILL
TAIL_BYTES = 64 * 1024  # of each stream, sent back to the flow (the whole output stays in the result folder)
POLL_SECONDS = 0.1  # how often the output files are read while the command runs
STREAM_LINES = 10_000  # lines sent to the controller per run (all of them stay in the task's folder)
HEARTBEAT_SECONDS = 5.0  # at least this often a line goes to the controller, output or not (hosts.Liveness)
SYSTEMD_BOOTED = "/run/systemd/system"  # present when systemd is PID 1 (sd_booted(3))
CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_PARENT = "primespark-tasks"
RUNNING_SUFFIX = ".running.json"  # `<id>.running.json` beside the staging folder, while the run is under way
POWER_STOPPED = "power-stopped"  # in the staging folder: a power script stopped the run (JSON: by, at, reason)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: str, data: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _marked(task_id: str, host: str) -> list[int]:
    """Processes of this task on this host: they carry its id and host in their environment."""
    wanted = {f"SPARK_TASK_ID={task_id}".encode(), f"SPARK_TASK_HOST={host}".encode()}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                env = set(handle.read().split(b"\0"))
            with open(f"/proc/{entry}/stat", "rb") as handle:
                state = handle.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if wanted <= env and state != b"Z":  # a zombie has ended already; only its parent can reap it
            found.append(int(entry))
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.killpg(os.getpgid(pid), sig)
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def _stop(task_id: str, host: str, group: int | None, cgroup: str | None, grace: float) -> list[int]:
    """End the task's processes: its process group and every marked process, SIGTERM then SIGKILL."""
    pids = _marked(task_id, host)
    stopped = list(pids)
    if group is not None:
        with contextlib.suppress(OSError):
            os.killpg(group, signal.SIGTERM)
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _marked(task_id, host) and time.monotonic() < deadline:
        time.sleep(0.05)
    if group is not None:
        with contextlib.suppress(OSError):
            os.killpg(group, signal.SIGKILL)
    if cgroup is not None and os.path.exists(os.path.join(cgroup, "cgroup.kill")):
        with contextlib.suppress(OSError), open(os.path.join(cgroup, "cgroup.kill"), "w") as handle:
            handle.write("1")
    left = _marked(task_id, host)
    _signal_all(left, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _marked(task_id, host) and time.monotonic() < deadline:
        time.sleep(0.05)
    return sorted(set(stopped) | set(left))


PROC = "/proc"


def _stat(pid: int | str) -> list[bytes]:
    """The fields of /proc/PID/stat after the command's name: state, parent, process group, …"""
    with open(f"{PROC}/{pid}/stat", "rb") as handle:
        return handle.read().rsplit(b")", 1)[1].split()


def _paused(pid: int) -> bool:
    """Whether the task whose process group `pid` leads is stopped by a signal (SIGSTOP to the group: a power script
    paused it). Its leader shows T; or, when the stop caught the shell between vfork and its child's exec (dash runs
    each command so), the child is stopped and the shell waits on it in state D until both are continued: then a
    member of the group is stopped and none runs or sleeps."""
    try:
        leader = _stat(pid)[0]
    except (OSError, IndexError):
        return False
    if leader != b"D":
        return leader == b"T"
    states = set()
    for entry in os.listdir(PROC):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = _stat(entry)
                if int(fields[2]) == pid:
                    states.add(fields[0])
    return b"T" in states and states <= {b"T", b"D", b"Z"}


def _power_stop(staging: str) -> str | None:
    """Who stopped the run for power and why ("spark-power: quiet hours"), or None when no power script did."""
    try:
        with open(os.path.join(staging, POWER_STOPPED), encoding="utf-8") as handle:
            note = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return "a power script"
    return f"{note.get('by') or 'a power script'}: {note.get('reason') or 'no reason given'}"


def _limits(task_id: str, cpus: float, memory_mb: int) -> tuple[list[str], str | None, str]:
    """(argv prefix, cgroup folder, what is enforced and how, or why not)."""
    quota = max(1, round(cpus * 100))
    if os.path.isdir(SYSTEMD_BOOTED) and shutil.which("systemd-run"):
        if os.geteuid() == 0:
            unit = f"spark-task-{task_id}-{os.getpid()}"
            return (["systemd-run", "--scope", "--quiet", "--collect", f"--unit={unit}", "-p", f"CPUQuota={quota}%",
                     "-p", f"MemoryMax={memory_mb}M", "--"], None,
                    f"enforced by systemd-run --scope: CPUQuota={quota}%, MemoryMax={memory_mb}M")
        systemd = "systemd is PID 1, but a system scope needs root"
    else:
        systemd = "systemd is not PID 1" if not os.path.isdir(SYSTEMD_BOOTED) else "no systemd-run"
    if not os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers")):
        return [], None, f"not enforced: {systemd}; no cgroup v2 at {CGROUP_ROOT}"
    parent = os.path.join(CGROUP_ROOT, CGROUP_PARENT)
    group = os.path.join(parent, task_id)
    try:
        os.makedirs(parent, exist_ok=True)
        for folder in (CGROUP_ROOT, parent):  # the controllers must be on for the children of each
            with open(os.path.join(folder, "cgroup.subtree_control"), "w") as handle:
                handle.write("+cpu +memory")
        if os.path.isdir(group):
            os.rmdir(group)
        os.mkdir(group)
        with open(os.path.join(group, "cpu.max"), "w") as handle:
            handle.write(f"{quota * 1000} 100000")
        with open(os.path.join(group, "memory.max"), "w") as handle:
            handle.write(str(memory_mb * 1024 * 1024))
    except OSError as exc:
        return [], None, (f"not enforced: {systemd}; cgroup v2 at {CGROUP_ROOT} is not writable here "
                          f"({exc.strerror})")
    return [], group, f"enforced by cgroup v2 {group}: cpu.max {quota * 1000}/100000, memory.max {memory_mb}M"


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.path.getsize(path) - TAIL_BYTES))
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def _flush_tree(folder: str) -> None:
    for root, dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                _fsync_path(os.path.join(root, name))
        for name in dirs:
            _fsync_path(os.path.join(root, name))
    _fsync_path(folder)


class _Channel:
    """This script's stdout to the controller, one JSON line per message; a heartbeat when nothing else went for
    `heartbeat` seconds. If the controller is gone (its SSH session closed), sending stops and the run goes on."""

    def __init__(self, heartbeat: float) -> None:
        self.heartbeat = heartbeat
        self.last = 0.0
        self.open = True

    def send(self, message: dict[str, Any]) -> None:
        if not self.open:
            return
        try:
            sys.stdout.write(json.dumps(message) + "\n")
            sys.stdout.flush()
        except OSError:  # the controller is gone: the run goes on, its output in the files
            self.open = False
        self.last = time.monotonic()

    def beat(self) -> None:
        if time.monotonic() - self.last >= self.heartbeat:
            self.send({"alive": time.time()})


class _Follow:
    """The command's output files followed as they grow: each whole line is sent to this script's stdout as one
    JSON line (the controller logs it as it comes). The command writes to files, not to this script: if this
    script or its SSH session dies, the command's output still lands, and a lost controller ends the sending
    only, not the run."""

    def __init__(self, staging: str, channel: _Channel) -> None:
        self.files = {name: open(os.path.join(staging, f"{name}.log"), "rb")  # noqa: SIM115 - closed in close()
                      for name in ("stdout", "stderr")}
        self.partial = dict.fromkeys(self.files, b"")
        self.sent = 0
        self.channel = channel

    def _emit(self, stream: str, line: bytes) -> None:
        if self.sent == STREAM_LINES:
            message = {"stream": "stderr", "line": f"(more output than {STREAM_LINES} lines: the rest is in the "
                       "task's folder only)"}
        elif self.sent > STREAM_LINES:
            return
        else:
            message = {"stream": stream, "line": line.decode(errors="replace")}
        self.sent += 1
        self.channel.send(message)

    def pump(self, final: bool) -> None:
        for name, handle in self.files.items():
            lines = (self.partial[name] + handle.read()).split(b"\n")
            self.partial[name] = lines.pop()
            if final and self.partial[name]:
                lines.append(self.partial[name])
                self.partial[name] = b""
            for line in lines:
                self._emit(name, line)
        self.channel.beat()

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()


def _lock(staging_root: str, task_id: str, wait: float = 0.0) -> Any:
    """The task id's lock on this host (held until this script ends), or None if another run holds it for
    longer than `wait` seconds."""
    os.makedirs(staging_root, exist_ok=True)
    lock = open(os.path.join(staging_root, task_id + ".lock"), "a")  # noqa: SIM115 - held for the whole run
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock
        except BlockingIOError:
            if time.monotonic() >= deadline:
                lock.close()
                return None
            time.sleep(0.05)


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _finished(staging: str, host: str) -> dict[str, Any] | None:
    """The result of this host's run that succeeded and is not committed yet, if its staging folder holds one."""
    record = _read_json(os.path.join(staging, "run.json"))
    result = _read_json(os.path.join(staging, "result.json"))
    if record is None or result is None or record.get("host") != host or result.get("host") != host:
        return None
    return result if result.get("status") == "succeeded" else None


def _with_tails(result: dict[str, Any], path: str, existing: bool, committed: bool) -> dict[str, Any]:
    return {**result, "existing": existing, "committed": committed, "path": path,
            "stdout_tail": _tail(os.path.join(path, "stdout.log")),
            "stderr_tail": _tail(os.path.join(path, "stderr.log"))}


def run(req: dict[str, Any]) -> dict[str, Any]:
    task_id, host, root = req["task_id"], req["host"], req["root"]
    final = os.path.join(root, task_id)
    staging_root = os.path.join(root, STAGING)
    staging = os.path.join(staging_root, task_id)
    channel = _Channel(float(req.get("heartbeat", HEARTBEAT_SECONDS)))
    lock = _lock(staging_root, task_id)
    if lock is None:
        return {"status": "busy", "path": staging}
    channel.beat()  # started: from here on the controller hears from this host at least every heartbeat
    committed = _read_json(os.path.join(final, "result.json"))
    if committed is not None:
        return {**committed, "existing": True, "committed": True, "path": final}
    finished = _finished(staging, host)
    if finished is not None:  # an earlier run's that finished and was never committed: its result, not a rerun
        return _with_tails(finished, staging, existing=True, committed=False)
    if os.path.exists(staging):  # a failed or killed run's: end what it left running, then start afresh
        _stop(task_id, host, None, None, GRACE_SECONDS)
        shutil.rmtree(staging)
    out = os.path.join(staging, "out")
    os.makedirs(out)
    prefix, cgroup, limits = _limits(task_id, float(req["cpus"]), int(req["memory_mb"]))

    def join_cgroup() -> None:  # in the child, before exec: it and all it starts are in the group
        if cgroup is not None:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as handle:
                handle.write("0")

    env = {**os.environ, "SPARK_TASK_ID": task_id, "SPARK_TASK_HOST": host, "SPARK_TASK_OUTPUT": out}
    started = time.time()
    with open(os.path.join(staging, "stdout.log"), "wb") as stdout, \
            open(os.path.join(staging, "stderr.log"), "wb") as stderr:
        # a session of its own: the timeout and a cancel end its whole process group, not this script
        proc = subprocess.Popen([*prefix, "sh", "-c", req["command"]], cwd=out, stdin=subprocess.DEVNULL,
                                stdout=stdout, stderr=stderr, env=env, start_new_session=True,
                                preexec_fn=join_cgroup if cgroup is not None else None)
    record = {"task_id": task_id, "host": host, "pid": proc.pid, "monitor_pid": os.getpid(), "started": started,
              "limits": limits}
    _write_json(os.path.join(staging, "run.json"), record)
    # for the power scripts: the process group (a session of its own: pgid = pid) and what the spec allows
    running = os.path.join(staging_root, task_id + RUNNING_SUFFIX)
    _write_json(running, {**record, "pgid": proc.pid, "staging": staging, "power": dict(req.get("power") or {})})
    try:
        return _monitor(req, proc, staging, cgroup, limits, started, channel)
    finally:  # the lock (held by this frame) goes after
        with contextlib.suppress(FileNotFoundError):  # the power scripts wait for it to go: the result is written
            os.unlink(running)


def _monitor(req: dict[str, Any], proc: subprocess.Popen[bytes], staging: str, cgroup: str | None, limits: str,
             started: float, channel: _Channel) -> dict[str, Any]:
    """Follow the running command to its end, then write its result: finished, not committed (only the controller
    commits, once it has this answer: `commit`)."""
    task_id, host = req["task_id"], req["host"]
    timed_out = False
    out_stream = _Follow(staging, channel)
    deadline = time.monotonic() + float(req["timeout"])
    last = time.monotonic()
    while True:
        returncode = proc.poll()
        out_stream.pump(final=returncode is not None)
        if returncode is not None:
            break
        now = time.monotonic()
        if _paused(proc.pid):  # paused for quiet hours: that time is not the task's
            deadline += now - last
        last = now
        if now >= deadline:
            timed_out = True
            _stop(task_id, host, proc.pid, cgroup, float(req.get("grace", GRACE_SECONDS)))
            returncode = proc.wait()
            out_stream.pump(final=True)
            break
        time.sleep(POLL_SECONDS)
    out_stream.close()
    # what the command left running in the background ends with it: a task's processes never outlive its result
    _stop(task_id, host, proc.pid, cgroup, 1.0)
    if cgroup is not None:
        with contextlib.suppress(OSError):
            os.rmdir(cgroup)
    cancelled = os.path.exists(os.path.join(staging, "cancelled"))
    power_stop = _power_stop(staging)
    # stopped for power: whatever it exited with, it did not finish here (a SIGTERM handler may exit 0)
    status = ("timed-out" if timed_out else "cancelled" if cancelled else "power-stopped" if power_stop
              else "succeeded" if returncode == 0 else "failed")
    result = {"task_id": task_id, "host": host, "status": status, "returncode": returncode, "started": started,
              "finished": time.time(), "limits": limits, "pid": proc.pid, "stopped_by": power_stop or ""}
    _write_json(os.path.join(staging, "result.json"), result)
    return _with_tails(result, staging, existing=False, committed=False)


def commit(req: dict[str, Any]) -> dict[str, Any]:
    """The finished run's folder renamed into place: the result is there whole, or not at all. A result committed
    here already is returned as it is; a run that is not finished (or another host's) is `missing`."""
    task_id, host, root = req["task_id"], req["host"], req["root"]
    final = os.path.join(root, task_id)
    staging_root = os.path.join(root, STAGING)
    staging = os.path.join(staging_root, task_id)
    lock = _lock(staging_root, task_id, float(req.get("wait", 10.0)))  # the run that finished may still be ending
    if lock is None:
        return {"status": "busy", "path": staging}
    committed = _read_json(os.path.join(final, "result.json"))
    if committed is not None:
        return _with_tails(committed, final, existing=True, committed=True)
    finished = _finished(staging, host)
    if finished is None:
        return {"status": "missing", "path": staging}
    _flush_tree(staging)
    os.rename(staging, final)  # the commit
    _fsync_path(root)
    _fsync_path(staging_root)
    del lock
    return _with_tails(finished, final, existing=False, committed=True)


def discard(req: dict[str, Any]) -> dict[str, Any]:
    """A finished or stopped run's staging folder removed: its result was committed on another host."""
    staging_root = os.path.join(req["root"], STAGING)
    lock = _lock(staging_root, req["task_id"])
    if lock is None:
        return {"discarded": None, "found": "running"}
    found = find(req)
    if found["found"] not in ("finished", "stopped"):
        return {"discarded": None, "found": found["found"]}
    shutil.rmtree(found["path"])
    del lock
    return {"discarded": found["path"], "found": found["found"]}


def find(req: dict[str, Any]) -> dict[str, Any]:
    """The task's committed result on this host, or whether a run of it is left in staging (and still running)."""
    task_id, host, root = req["task_id"], req["host"], req["root"]
    final = os.path.join(root, task_id)
    try:
        with open(os.path.join(final, "result.json"), encoding="utf-8") as handle:
            result = json.load(handle)
    except (OSError, ValueError):
        result = None
    if result is not None and result.get("host") == host:
        return {"found": "committed", "path": final, "result": result}
    try:
        with open(os.path.join(root, STAGING, task_id, "run.json"), encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return {"found": None}
    if record.get("host") != host:  # another host's run (hosts that share this folder, as in tests)
        return {"found": None}
    staging = os.path.join(root, STAGING, task_id)
    if _marked(task_id, host):
        return {"found": "running", "path": staging, "pid": record["pid"]}
    finished = _finished(staging, host)
    if finished is not None:  # succeeded and never committed (its controller lost it, or was lost)
        return {"found": "finished", "path": staging, "pid": record["pid"], "result": finished}
    return {"found": "stopped", "path": staging, "pid": record["pid"]}


def cancel(req: dict[str, Any]) -> dict[str, Any]:
    found = find(req)
    if found["found"] != "running":
        return {k: v for k, v in found.items() if k != "result"}
    # the monitor reads this marker when the command ends: the result says cancelled, not failed
    with open(os.path.join(found["path"], "cancelled"), "w", encoding="utf-8") as handle:
        handle.write(str(time.time()))
    stopped = _stop(req["task_id"], req["host"], None, None, float(req.get("grace", GRACE_SECONDS)))
    return {**found, "stopped": stopped}


def running(req: dict[str, Any]) -> dict[str, Any]:
    """The ids of the tasks running on this host now, with when each started, oldest first."""
    host, staging_root = req["host"], os.path.join(req["root"], STAGING)
    try:
        names = sorted(n for n in os.listdir(staging_root) if n.endswith(RUNNING_SUFFIX))
    except FileNotFoundError:
        return {"running": []}
    tasks = []
    for name in names:
        record = _read_json(os.path.join(staging_root, name))
        if record is None or record.get("host") != host:  # gone meanwhile, or another host's (a shared folder)
            continue
        task_id = str(record.get("task_id"))
        if _marked(task_id, host):
            tasks.append({"task_id": task_id, "started": record.get("started")})
    return {"running": sorted(tasks, key=lambda t: (t["started"] or 0, t["task_id"]))}


if __name__ == "__main__":
    operation = {"run": run, "commit": commit, "discard": discard, "find": find, "cancel": cancel,
                 "running": running}[sys.argv[1]]
    answer = operation(json.loads(sys.stdin.read()))
    with contextlib.suppress(OSError):  # nobody to tell (the controller gone): what was done stays done
        print(json.dumps(answer), flush=True)
