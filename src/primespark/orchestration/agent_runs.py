"""The `agent-task` runs a Prefect API knows (`spark task ls`): each run's task id, template, state, the host it
ran on, when it started and how long it took.

The flow labels its own run (`label_run`): the task id once it is known, the host each time an attempt is placed
(or where an earlier run committed the result), with the task's CPUs and memory and when it was placed. A run made
before the labels existed shows its id from its parameters and no host.

While no host can take the task, the run says why in one more label (`waiting`), cleared when it is placed.

The same labels are the queue placement reads (`recently_placed`): runs placed within the last minute, whose load
their hosts' node_load1 does not hold yet, so that tasks submitted together spread instead of all taking the host
that looked freest a moment before. The flow reads them once more under the chosen host's lock before it labels
itself (`flows.agent_task._claim`), so two runs that read them at the same instant do not both take a host that
has room for one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the Prefect export imports this module every minute: only what it needs
    from primespark.agents.placement import Placed
    from primespark.context import FleetContext

FLOW = "agent-task"
TASK_ID_LABEL = "primespark.task.id"
HOST_LABEL = "primespark.task.host"
CPUS_LABEL = "primespark.task.cpus"
MEMORY_LABEL = "primespark.task.memory_mb"
PLACED_AT_LABEL = "primespark.task.placed_at"  # seconds since the epoch
WAITING_LABEL = "primespark.task.waiting"  # since when and why no host can take it; "" once placed
WAITING_CHARS = 400  # a label is for a glance: the decision table artifact has every host's reason
# node_load1 is a 1-minute average: a task placed longer ago is in its host's load (counting it too would count it
# twice); one placed since is not yet.
RECENT_SECONDS = 60.0
STATES = ("scheduled", "pending", "running", "completed", "failed", "cancelled", "crashed", "paused", "cancelling")
_PAGE = 200  # runs read per request while filtering by environment


def label_run(labels: dict[str, str]) -> str | None:
    """Set labels on the flow run this is called in (merged with those it has); None when they are set, else why
    not. A label is bookkeeping (`spark task ls`, the spread of tasks placed together), not the task: the run goes
    on without it. Prefect's server on SQLite answers this request (a read, then a write, in one deferred
    transaction) 503 while other writes keep landing, and its client gives up after five retries."""
    from uuid import UUID

    import httpx
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run_labels(UUID(str(flow_run.id)), dict(labels))
    except httpx.HTTPError as exc:  # an error status (PrefectHTTPStatusError is one) or no answer
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def placement_labels(host: str, cpus: float, memory_mb: int, at: float) -> dict[str, str]:
    """The labels of a run whose attempt was just placed on `host`: what `spark task ls` shows and the queue reads."""
    return {HOST_LABEL: host, CPUS_LABEL: repr(float(cpus)), MEMORY_LABEL: str(int(memory_mb)),
            PLACED_AT_LABEL: f"{at:.3f}", WAITING_LABEL: ""}


def waiting_label(since: str, excluded: Sequence[tuple[str, str]]) -> dict[str, str]:
    """The label of a run waiting for a host since `since` (HH:MM:SS): each reason once with its hosts (`excluded`:
    host, reason), cut short."""
    hosts: dict[str, list[str]] = {}
    for host, reason in excluded:
        hosts.setdefault(reason, []).append(host)
    text = f"since {since}: " + "; ".join(f"{', '.join(names)}: {reason}" for reason, names in hosts.items())
    return {WAITING_LABEL: text if len(text) <= WAITING_CHARS else text[:WAITING_CHARS - 1] + "…"}


def _placed_of(run: Any, env: str, since: float) -> Placed | None:
    """The share a running run's placement takes off its host, if it was placed for `env` after `since`."""
    from primespark.agents.placement import Placed

    labels = dict(run.labels or {})
    try:
        at, host = float(labels[PLACED_AT_LABEL]), str(labels[HOST_LABEL])
        cpus, memory = float(labels[CPUS_LABEL]), int(labels[MEMORY_LABEL])
    except (KeyError, ValueError):  # not placed yet (or by a run older than these labels)
        return None
    if at < since or not _same_env((run.parameters or {}).get("env"), env):
        return None
    return Placed(host, cpus, memory)


def recently_placed(env: str, now: float, exclude: str | None = None,
                    within: float = RECENT_SECONDS) -> list[Placed]:
    """The tasks of `env` placed within `within` seconds before `now` whose runs are still running (the flow's own
    run, `exclude`, aside): each one's host, CPUs and memory, for placement to take off that host's facts."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    running = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])),
                            id=FlowRunFilterId(not_any_=[UUID(exclude)]) if exclude else None)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW])),
                                     flow_run_filter=running, limit=_PAGE)
    return [placed for run in runs if (placed := _placed_of(run, env, now - within)) is not None]


def placed_note(placed: Sequence[Placed]) -> str:
    """What a decision's facts source adds for the tasks placed within the last minute."""
    return f"; {len(placed)} task{'s' if len(placed) != 1 else ''} placed within the last minute" if placed else ""


def task_runs_api(ctx: FleetContext) -> str:
    """Point this process at the API `spark task run` records its runs on (`runs.record_runs`: the fleet's
    server; one UserError naming the address tried when it does not answer); where none is set, the local Prefect
    database (a run started there went to a throwaway server on it)."""
    from primespark.orchestration.runs import record_runs

    where = record_runs(ctx)
    return where if where.startswith("http") else "the local Prefect database (no server set)"


@dataclass(frozen=True)
class AgentRun:
    task_id: str
    template: str  # the fleet's template, or `<name> (inline)`
    state: str  # the state's name, as the Prefect UI shows it
    host: str | None
    started: datetime | None
    duration: timedelta | None
    flow_run: str  # the flow run's name
    waiting: str | None = None  # a running run no host can take yet: since when and why


def _same_env(given: object, env: str) -> bool:
    """Whether a run's `env` parameter names the fleet file `env` names (`lab` and `inventory/lab.yaml` agree)."""
    from primespark.fleet.loader import resolve

    if not isinstance(given, str) or not given:
        return env == "lab"  # the flow's default
    return given == env or resolve(given).resolve() == resolve(env).resolve()


def _of(run: Any, now: datetime) -> AgentRun:
    from primespark.agents.execute import default_task_id

    parameters, labels = dict(run.parameters or {}), dict(run.labels or {})
    template, name = parameters.get("template"), parameters.get("name")
    task_id = labels.get(TASK_ID_LABEL) or parameters.get("task_id")
    if not task_id:
        try:
            task_id = default_task_id(template, name, run.id)
        except ValueError:
            task_id = "-"
    started = run.start_time
    duration = None if started is None else (run.end_time or now) - started
    state = (run.state.name if run.state is not None else None) or "unknown"
    waiting = str(labels.get(WAITING_LABEL) or "") if state == "Running" else ""
    return AgentRun(str(task_id), str(template) if template else f"{name or 'inline'} (inline)", state,
                    str(labels[HOST_LABEL]) if labels.get(HOST_LABEL) else None, started, duration, str(run.name),
                    waiting or None)


def agent_runs(env: str, states: Sequence[str] = (), limit: int = 50) -> list[AgentRun]:
    """The newest `limit` runs of `agent-task` for the environment `env` (its `env` parameter), newest first; only
    those in `states` (state types, lower case) when given."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    wanted = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
        any_=[StateType(s.upper()) for s in states]))) if states else None
    found: list[AgentRun] = []
    now = datetime.now(UTC)
    with get_client(sync_client=True) as client:
        offset = 0
        while len(found) < limit:
            page = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW])),
                                         flow_run_filter=wanted, sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                                         limit=_PAGE, offset=offset)
            found += [_of(run, now) for run in page if _same_env((run.parameters or {}).get("env"), env)]
            if len(page) < _PAGE:
                break
            offset += _PAGE
    return found[:limit]
