"""When a task is tried again: only for failures that can pass on a second try."""

from __future__ import annotations

from typing import Any

from prefect.tasks import exponential_backoff


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only what can pass on a second try: an unreachable host or repository, a live lock, a timeout
    (errors whose class says `transient = True`)."""
    try:
        state.result()
    except Exception as exc:
        return bool(getattr(exc, "transient", False))
    return False


def retrying(retries: int, delay_seconds: float) -> dict[str, Any]:
    """Task options for `retries` tries after the first, backing off exponentially from `delay_seconds`."""
    return {"retries": retries, "retry_delay_seconds": exponential_backoff(delay_seconds)(retries),
            "retry_jitter_factor": 0.2, "retry_condition_fn": transient}
