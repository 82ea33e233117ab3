"""Shared by the benchmarks (run as `python bench/<name>.py`, so this folder is on sys.path)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def best_of(fn: Callable[[], Any], runs: int) -> float:
    """The fastest of `runs` calls, in seconds: the least disturbed by whatever else the machine is doing."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
