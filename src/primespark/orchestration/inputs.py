"""Large task arguments (a transfer's 100,000 files, a tier pass's plan), handed to a task as they are."""

from __future__ import annotations

from typing import TypeVar, cast

from prefect.utilities.annotations import quote

T = TypeVar("T")


def as_is(value: T) -> T:
    """`value`, marked for Prefect not to walk: before a task runs, Prefect visits every element of its arguments
    looking for futures and states to resolve and link (about 5 s for a 100,000-file transfer report, three
    visits per element, at each task it is passed to). Quoted, the task gets the value itself without the walk;
    nothing we pass holds futures. The cast: `quote` unwraps before the task sees it."""
    return cast(T, quote(value))
