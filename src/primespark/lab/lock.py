"""The machine-wide lab lock (/tmp/spark-lab.lock), taken with flock like `flock /tmp/spark-lab.lock CMD`.

Taking it inside a command already run under `flock /tmp/spark-lab.lock` would wait forever (a new open
file is a new lock), so a lock held by one of our ancestors counts as ours.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path

LOCK_PATH = Path("/tmp/spark-lab.lock")


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pids


def lock_holders(path: Path = LOCK_PATH) -> set[int]:
    """PIDs holding a flock on `path`, from /proc/locks."""
    st = path.stat()
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
                holders.add(int(fields[4]))
    return holders


@contextlib.contextmanager
def lab_lock(path: Path = LOCK_PATH, wait_message: bool = True) -> Iterator[None]:
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holders = lock_holders(path)
            if holders & _ancestors():
                yield  # our caller holds it
                return
            if wait_message:
                print(f"waiting for the lab lock {path} (held by pid {', '.join(map(str, holders)) or '?'})",
                      file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
