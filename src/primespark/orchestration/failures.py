"""Expected failures end with their reason in a line or two, on the terminal and in the Prefect UI.

A host or NAS unreachable, a repository refused, an RPO breached, a drill failed: these are outcomes, not bugs,
and a Python stack under them only hides the reason. Prefect logs every failed task and flow with its stack
(`exc_info=True`), so every flow imports this module, which filters Prefect's run loggers: a record whose
exception is a `UserError` (the operator's problem to fix, `StepFailed` among them) keeps its message and
loses its stack; anything else — a bug — keeps its traceback. Flows fail with `RunFailed` (a `UserError`),
which `run_here` and the CLI print as one line.
"""

from __future__ import annotations

import logging

from primespark.errors import UserError

# The loggers of Prefect's flow and task engines: their handlers print to the terminal and send to the API.
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class RunFailed(UserError):
    """A flow run failed for an expected reason (its message says which); logged without a stack."""


def expected(exc: BaseException | None) -> bool:
    """An outcome the operator can act on, not a bug."""
    return isinstance(exc, UserError)


class WithoutStack(logging.Filter):
    """Drops the traceback of records about expected failures; the message (with the reason) stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and expected(record.exc_info[1]):
            record.exc_info = None
            record.exc_text = None
        return True


_FILTER = WithoutStack()


def install() -> None:
    """Filter Prefect's run loggers (idempotent: one filter however often it is called)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


install()
