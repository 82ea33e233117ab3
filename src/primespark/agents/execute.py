"""Running a placed agent task on its host, through the fleet's way of reaching hosts (`primespark.hosts`).

The host-side half is `taskside.py` (shipped as source, standard library only): it applies the limits, the
timeout and the commit-once rule on the host itself, so a controller or worker that dies mid-run leaves a
staging folder and nothing committed. This module builds its requests and reads its answers.

Output is streamed: the command writes to files in the task's folder, the host-side script follows them and
sends each line as it comes (through `primespark.hosts.stream`), and `run_task` passes it to `on_output`; the
last 64 KiB of each stream also come back with the result. The script sends a heartbeat when it has nothing else
to say, so a host that goes silent and does not answer a probe ends the run with `HostLost` (`LIVENESS`).

A run that succeeds is committed by a second call (`commit`), made only once its answer is in: a host lost
mid-task, whose run goes on and finishes after the task was placed elsewhere, is never asked to, and so never
commits a second result. Its finished run stays in staging until a later run of the id discards it (or, when no
host committed the id, commits it).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from primespark.agents import taskside
from primespark.errors import StepFailed, UserError
from primespark.fleet.model import Fleet, HostKind, TaskSpec, TierName
from primespark.hosts import HostAccess, Liveness, on_each, stream

SOURCE = Path(taskside.__file__).read_text()
# Where a host without a hot tier keeps task results (a host with one: `<hot tier>/tasks`, so sync carries them).
FALLBACK_ROOT = "/var/lib/primespark/tasks"
RESULTS_FOLDER = "tasks"  # below the hot tier's folder
# Below the hot tier's folder: runs still writing, or left for inspection. Tier migration never moves them.
HOT_TIER_STAGING = f"{RESULTS_FOLDER}/{taskside.STAGING}"
TASK_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
# The runner waits this much longer than the task's timeout: the host-side script ends the command itself first.
RUNNER_GRACE_SECONDS = 120
# How a running task's host is watched: heartbeat from the host-side script, silence before a probe, the probe's
# time: a host that goes silent is found lost within LIVENESS.within (about 30 s), inside the 60 s promised.
LIVENESS = Liveness(heartbeat=taskside.HEARTBEAT_SECONDS, silent_after=15.0, probe_timeout=10.0)
COMMIT_TRIES = 3  # a commit whose answer did not come is asked again (it is idempotent) this many times in all
# A task that pauses for quiet hours (power.on_power_loss: pause) may wait this much longer: its timeout counts
# running time only, and quiet hours last less than a day.
PAUSE_ALLOWANCE_SECONDS = 24 * 3600

# power-stopped: the host's power script stopped it at the start of quiet hours or on a low battery (not a failure:
# the flow places it again, without using a retry)
Status = Literal["succeeded", "failed", "timed-out", "cancelled", "power-stopped"]


class TaskRunFailed(StepFailed):
    """The command ran and did not succeed (exit status, timeout, cancel): the attempt failed."""


class TaskBusy(StepFailed):
    """Another run of the same task id holds the host's lock: worth trying again later."""

    transient = True


class CommitUncertain(StepFailed):
    """The task finished on its host, and whether its commit there happened is unknown (the host stopped
    answering). Not retried, nor placed elsewhere: that could commit a second result."""


@dataclass(frozen=True)
class TaskResult:
    task_id: str
    host: str
    status: Status
    returncode: int
    path: str  # the committed folder (succeeded), or the staging folder left for inspection
    limits: str  # what was enforced and how, or "not enforced: <why>"
    existing: bool  # the result is an earlier run's (committed, or finished and committed now); nothing ran now
    started: float
    finished: float
    pid: int  # the command's process (and group) on the host
    stdout_tail: str = ""
    stderr_tail: str = ""
    stopped_by: str = ""  # power-stopped: which power script and why ("spark-power: quiet hours")


def results_root(fleet: Fleet, host: str) -> str:
    """The folder holding a host's task results: `<hot tier>/tasks` on a hot-tier host, else FALLBACK_ROOT."""
    hot = fleet.tiers.get(TierName.hot)
    if hot is not None and host in hot.hosts:
        return f"{hot.path.rstrip('/')}/{RESULTS_FOLDER}"
    return FALLBACK_ROOT


def check_task_id(task_id: str) -> str:
    if not TASK_ID.match(task_id):
        raise UserError(f"task id {task_id!r} is not a plain name",
                        "use lower-case letters, digits, '.', '_' and '-' (at most 128), starting with a letter "
                        "or digit: it names the task's result folder")
    return task_id


def new_task_id(name: str, now: datetime | None = None) -> str:
    """`<name>-<UTC time>-<4 hex>`: a fresh id per submission (pass an id again to rerun idempotently)."""
    stamp = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dt%H%M%S")
    base = re.sub(r"[^a-z0-9._-]", "-", name.lower()).strip("-._") or "task"
    return check_task_id(f"{base[:100]}-{stamp}-{secrets.token_hex(2)}")


def default_task_id(template: str | None, name: str | None, run_id: object) -> str:
    """An `agent-task` run's task id when none is given: from its name and the flow run's id, so that the
    cancellation hook and `spark task ls` (which have only the run's parameters and id) find the same one."""
    label = template or name or "inline"
    base = re.sub(r"[^a-z0-9._-]", "-", label.lower()).strip("-._") or "task"
    return check_task_id(f"{base[:100]}-{str(run_id)[:8]}")


OnOutput = Callable[[str, str], None]  # (stream: stdout or stderr, the line)


def _output_line(line: str) -> tuple[str, str] | None:
    """(stream, line) of a line of the command's output, as the host-side script sends it; None for its answer."""
    try:
        message = json.loads(line)
    except json.JSONDecodeError:
        return None
    if isinstance(message, dict) and set(message) == {"stream", "line"}:
        return str(message["stream"]), str(message["line"])
    return None


def _is_answer(line: str) -> bool:
    """The host-side script's answer, not a line of output or a heartbeat."""
    try:
        message = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(message, dict) and set(message) not in ({"stream", "line"}, {"alive"})


def _side(hosts: HostAccess, host: str, op: str, request: dict[str, Any], timeout: float,
          on_output: OnOutput | None = None, liveness: Liveness | None = None) -> dict[str, Any]:
    runner = hosts.runner(host)

    def on_line(line: str) -> None:
        message = _output_line(line)
        if message is not None and on_output is not None:
            on_output(*message)

    done = stream(runner, [runner.python, "-c", SOURCE, op], on_line=on_line, stdin=json.dumps(request).encode(),
                  timeout=timeout, liveness=liveness)
    try:
        last = done.text.strip().splitlines()[-1]
        if not _is_answer(last):  # the script ended before its answer (killed)
            raise IndexError
        answer: dict[str, Any] = json.loads(last)
    except (json.JSONDecodeError, IndexError):
        raise StepFailed(f"{host}: the task's host-side script gave no answer (exit {done.returncode}): "
                         f"{(done.stderr or done.text).strip()[-400:]}",
                         "check that python3 runs on the host and that its task folder is writable",
                         returncode=done.returncode, stderr=done.stderr) from None
    return answer


def _result(answer: dict[str, Any], **update: Any) -> TaskResult:
    fields = TaskResult.__dataclass_fields__
    return TaskResult(**{k: v for k, v in {**answer, **update}.items() if k in fields})


def run_task(hosts: HostAccess, fleet: Fleet, host: str, task_id: str, task: TaskSpec,
             grace_seconds: float = taskside.GRACE_SECONDS, timeout_seconds: float | None = None,
             on_output: OnOutput | None = None, liveness: Liveness | None = None) -> TaskResult:
    """Run `task` on `host` as `task_id` (or find its committed result): the result of that attempt, whatever its
    status, committed when it succeeded; `TaskBusy` when another run of the id is under way there; `HostLost`
    when the host went silent mid-task (nothing is committed then: see the module's docstring). `timeout_seconds`
    replaces the task's `timeout_minutes` (tests: a spec counts in minutes). `on_output(stream, line)` gets each
    line of the command's output as it comes. `liveness`: how the host is watched (default `LIVENESS`)."""
    if task.image is not None:
        raise UserError(f"task {task_id}: running a container image is not built yet",
                        "give the task a command instead of an image (docs/agents.md)")
    check_task_id(task_id)
    watch = liveness or LIVENESS
    timeout = task.timeout_minutes * 60 if timeout_seconds is None else timeout_seconds
    request = {"task_id": task_id, "host": host, "root": results_root(fleet, host), "command": task.command,
               "cpus": task.cpus, "memory_mb": task.memory_mb, "timeout": timeout, "grace": grace_seconds,
               "heartbeat": watch.heartbeat, "power": task.power.model_dump(mode="json")}
    waits = timeout + grace_seconds + RUNNER_GRACE_SECONDS
    if task.power.on_power_loss == "pause":
        waits += PAUSE_ALLOWANCE_SECONDS
    answer = _side(hosts, host, "run", request, waits, on_output, watch)
    if answer["status"] == "busy":
        raise TaskBusy(f"task {task_id} is running on {host} already ({answer['path']})",
                       f"wait for it, or stop it: spark task cancel {task_id}")
    if answer["status"] != "succeeded" or answer.get("committed", True):
        return _result(answer)
    return _result(_commit(hosts, fleet, host, task_id), existing=answer["existing"])


def _commit(hosts: HostAccess, fleet: Fleet, host: str, task_id: str) -> dict[str, Any]:
    """The finished run on `host` committed there: its answer. A commit whose answer does not come is asked again
    (it is idempotent); one still unanswered is `CommitUncertain`, never a reason to run the task elsewhere."""
    request = {"task_id": task_id, "host": host, "root": results_root(fleet, host)}
    why = ""
    for _ in range(COMMIT_TRIES):
        try:
            answer = _side(hosts, host, "commit", request, 120)
        except StepFailed as exc:  # unreachable, timed out, no answer: the rename may or may not have happened
            why = exc.message.splitlines()[0]
            continue
        if answer["status"] == "busy":
            raise TaskBusy(f"task {task_id} on {host} finished, and another run of it holds its lock there",
                           f"run it again with the same id: its finished result is committed then ({task_id})")
        if answer["status"] == "missing":
            raise StepFailed(f"task {task_id} on {host}: no finished run to commit in {answer['path']}",
                             "run it again with the same id")
        return answer
    raise CommitUncertain(f"task {task_id} finished on {host}, and whether its result was committed there is "
                          f"unknown: {why}",
                          f"once {host} answers, run it again with the same id (--id {task_id}): a committed "
                          "result is reported, a finished one committed, and nothing runs twice")


def commit_task(hosts: HostAccess, fleet: Fleet, host: str, task_id: str) -> TaskResult:
    """A run of `task_id` that finished on `host` and was never committed, committed now (`existing`: it was
    committed already)."""
    check_task_id(task_id)
    return _result(_commit(hosts, fleet, host, task_id))


def discard_task(hosts: HostAccess, fleet: Fleet, host: str, task_id: str) -> str | None:
    """The staging folder of a finished or stopped run of `task_id` on `host` removed (its result is committed on
    another host): its path, or None when there was none to remove (or it runs)."""
    check_task_id(task_id)
    answer = _side(hosts, host, "discard", {"task_id": task_id, "host": host, "root": results_root(fleet, host)},
                   120)
    discarded = answer.get("discarded")
    return str(discarded) if discarded else None


def failure(result: TaskResult) -> TaskRunFailed:
    """The error of an attempt that did not succeed: its status, exit code and the tail of its stderr."""
    tail = "\n".join(result.stderr_tail.rstrip().splitlines()[-20:])
    what = {"failed": f"exited {result.returncode}", "timed-out": "ran past its timeout and was stopped",
            "cancelled": "was cancelled", "succeeded": "succeeded",
            "power-stopped": f"was stopped by {result.stopped_by or 'its power script'}"}[result.status]
    return TaskRunFailed(f"task {result.task_id} on {result.host} {what} (exit {result.returncode}); its folder: "
                         f"{result.path}" + (f"\nstderr (last lines):\n{tail}" if tail else ""),
                         "see stdout.log and stderr.log in its folder; run it again with the same id to retry",
                         returncode=result.returncode, stderr=result.stderr_tail)


@dataclass(frozen=True)
class Found:
    """What a host knows of a task id: its committed result, or a run left in staging (running or not)."""

    task_id: str
    host: str
    found: Literal["running", "stopped", "finished", "committed"]
    path: str
    pid: int | None
    result: TaskResult | None = None  # the committed result, or the finished one not committed yet


def _task_hosts(fleet: Fleet, within: Collection[str] | None = None) -> list[str]:
    """Every host that could have run a task (of those `within`: a site's run asks the hosts its worker reaches):
    its run record and result live in its own task folder."""
    return sorted(h for h, spec in fleet.hosts.items()
                  if spec.kind is not HostKind.kvm_host and (within is None or h in within))


def _ask(hosts: HostAccess, fleet: Fleet, task_id: str, op: str, host: str, grace_seconds: float) -> Found | None:
    answer = _side(hosts, host, op, {"task_id": task_id, "host": host, "root": results_root(fleet, host),
                                     "grace": grace_seconds}, 120 + grace_seconds)
    if answer["found"] is None:
        return None
    result = _result(answer["result"], path=answer["path"], existing=True) if "result" in answer else None
    return Found(task_id, host, answer["found"], answer["path"], answer.get("pid"), result)


def find_task(hosts: HostAccess, fleet: Fleet, task_id: str, within: Collection[str] | None = None) -> list[Found]:
    """Every host's knowledge of `task_id` (none: never run, or its staging folder was removed); `within`: those
    hosts only. A host that cannot be asked fails it (the first such error): a result committed there would go
    unseen, and the task would run twice."""
    check_task_id(task_id)
    answers = on_each(_task_hosts(fleet, within),
                      lambda h: _ask(hosts, fleet, task_id, "find", h, taskside.GRACE_SECONDS))
    return [found for _, found in sorted(answers.items()) if found is not None]


def running_on(hosts: HostAccess, fleet: Fleet, host: str, timeout: float = 60) -> list[str]:
    """The ids of the agent tasks running on `host` now, oldest first (a host that cannot be asked fails it)."""
    answer = _side(hosts, host, "running", {"host": host, "root": results_root(fleet, host)}, timeout)
    return [str(t["task_id"]) for t in answer["running"]]


def cancel_task(hosts: HostAccess, fleet: Fleet, task_id: str, where: str,
                grace_seconds: float = taskside.GRACE_SECONDS,
                within: Collection[str] | None = None) -> tuple[list[Found], dict[str, str]]:
    """Stop task `task_id` wherever it runs (SIGTERM to its processes, SIGKILL after `grace_seconds`): what each
    host that knows the id said, and the hosts that could not be asked (why). `where` locates the error when no
    host knows it."""
    check_task_id(task_id)

    def ask(host: str) -> Found | str | None:
        try:
            return _ask(hosts, fleet, task_id, "cancel", host, grace_seconds)
        except StepFailed as exc:  # a host down must not keep the task from being stopped where it runs
            return exc.message.splitlines()[0]

    answers = on_each(_task_hosts(fleet, within), ask)
    found = [a for _, a in sorted(answers.items()) if isinstance(a, Found)]
    unasked = {h: a for h, a in sorted(answers.items()) if isinstance(a, str)}
    if not found:
        asked = [h for h in _task_hosts(fleet, within) if h not in unasked]
        missed = f"; could not ask: {'; '.join(f'{h}: {why}' for h, why in unasked.items())}" if unasked else ""
        raise UserError(f"{where}: no host knows task {task_id} (asked: {', '.join(asked)}{missed})",
                        "check the id: `spark task run` prints it" + (
                            "; or ask again once those hosts answer" if unasked else ""))
    return found, unasked
