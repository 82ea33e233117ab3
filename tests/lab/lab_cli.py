"""What lab tests share beyond the fixtures: the `spark` CLI run as an operator runs it, and waiting for a
condition with a deadline (never a bare sleep)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SPARK = str(REPO / ".venv" / "bin" / "spark")


def spark(*args: str, timeout: float = 600, columns: int | None = None) -> subprocess.CompletedProcess[str]:
    """`spark ARGS` from the repo; `columns`: the width its tables are drawn to (rich folds cells to fit)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # the CLI finds the server itself
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return subprocess.run([SPARK, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def until(what: str, predicate: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")
