"""The lab lock: exclusive between runs, but never a deadlock under `flock /tmp/spark-lab.lock`."""

from __future__ import annotations

import select
import subprocess
import sys
import time

INNER = ("import sys; from pathlib import Path; from primespark.lab.lock import lab_lock\n"
         "with lab_lock(Path(sys.argv[1]), wait_message=sys.argv[3] == 'say'): "
         "print('inside', Path(sys.argv[2]).exists(), flush=True)")


def test_nested_under_flock_does_not_wait(tmp_path):
    lock, marker = tmp_path / "lab.lock", tmp_path / "marker"
    done = subprocess.run(["flock", str(lock), sys.executable, "-c", INNER, str(lock), str(marker), "quiet"],
                          capture_output=True, text=True, timeout=20)
    assert done.stdout.strip() == "inside False", done.stderr


def wait_for(condition, seconds: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_someone_elses_lock_makes_us_wait_until_it_is_released(tmp_path):
    """The holder keeps the lock until told to let go and leaves a mark just before it does. We must say we
    wait (that line comes only when the lock is taken), get in only after the release, and see the mark."""
    lock, marker, held, release = (tmp_path / n for n in ("lab.lock", "marker", "held", "release"))
    holder = subprocess.Popen(["flock", str(lock), "sh", "-c",
                               f"touch {held}; i=0; while [ ! -e {release} ] && [ $i -lt 1200 ]; do sleep 0.05; "
                               f"i=$((i+1)); done; touch {marker}"])
    inner = None
    try:
        wait_for(held.exists, 20, "the holder never took the lock")
        inner = subprocess.Popen([sys.executable, "-c", INNER, str(lock), str(marker), "say"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([inner.stderr], [], [], 30)
        said = inner.stderr.readline() if ready else ""  # type: ignore[union-attr]
        assert "waiting for the lab lock" in said, f"we did not wait for the lock: {said!r}"
        assert inner.poll() is None, "we got in while the lock was held"
        release.touch()
        out, err = inner.communicate(timeout=30)
    finally:
        release.touch()
        holder.wait(timeout=30)
        if inner is not None and inner.poll() is None:
            inner.kill()
    assert out.strip() == "inside True", err
