"""The lab lock: exclusive between runs, but never a deadlock under `flock /tmp/spark-lab.lock`."""

from __future__ import annotations

import subprocess
import sys
import time

INNER = ("import sys; from pathlib import Path; from primespark.lab.lock import lab_lock\n"
         "with lab_lock(Path(sys.argv[1]), wait_message=False): print('inside', Path(sys.argv[2]).exists())")


def test_nested_under_flock_does_not_wait(tmp_path):
    lock, marker = tmp_path / "lab.lock", tmp_path / "marker"
    done = subprocess.run(["flock", str(lock), sys.executable, "-c", INNER, str(lock), str(marker)],
                          capture_output=True, text=True, timeout=20)
    assert done.stdout.strip() == "inside False", done.stderr


def test_someone_elses_lock_makes_us_wait_until_it_is_released(tmp_path):
    lock, marker = tmp_path / "lab.lock", tmp_path / "marker"
    # The holder leaves a mark just before it lets go: we must see it once we are inside.
    holder = subprocess.Popen(["flock", str(lock), "sh", "-c", f"sleep 1; touch {marker}"])
    try:
        while not lock.exists():
            time.sleep(0.05)
        time.sleep(0.2)
        done = subprocess.run([sys.executable, "-c", INNER, str(lock), str(marker)],
                              capture_output=True, text=True, timeout=20)
    finally:
        holder.wait()
    assert done.stdout.strip() == "inside True", done.stderr
