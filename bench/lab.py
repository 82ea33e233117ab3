"""The lab's start-up times: cold `up` (image cached, no containers), a no-change re-run, and `down`.

Targets for the 8-host lab: cold up < 60 s, no-change re-run < 10 s. Anchor: khuedoan/homelab's k3d sandbox
"builds in 15-30 min" (its docs), a bigger job but the same promise of a hardware-free copy of the fleet.
Holds the lab lock; leaves the lab as it found it (up or down).
"""

from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path

from primespark.fleet import load_fleet
from primespark.inventory import managed_hosts
from primespark.lab import Lab
from primespark.lab.lock import lab_lock

REPO = Path(__file__).resolve().parents[1]
RERUNS = 3


def timed(fn) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    fleet = load_fleet(str(REPO / "inventory" / "lab.yaml"))
    lab = Lab(fleet)
    with lab_lock():
        was_up = any(h.state == "running" for h in lab.status(check_ssh=False).hosts)
        build, first = timed(lab.up)  # builds the image if the recipe changed; not part of the figures
        if first.image_built:  # type: ignore[attr-defined]
            print(f"(image built first: {build:.1f} s, not counted)")
        down, _ = timed(lab.down)
        cold, _ = timed(lab.up)
        reruns = [timed(lab.up)[0] for _ in range(RERUNS)]
        ping, done = timed(lambda: subprocess.run(
            [str(REPO / ".venv/bin/ansible"), "all", "-i", "inventory/lab.fleet.yml", "-m", "ping"],
            cwd=REPO, capture_output=True, text=True))
        pinged = done.stdout.count("SUCCESS")  # type: ignore[attr-defined]
        if not was_up:
            lab.down()
    rerun = statistics.median(reruns)
    hosts = len(managed_hosts(fleet))
    print(f"lab {fleet.name}: {hosts} hosts + NAT router, 3 networks, Prefect server")
    print(f"{'figure':<34} {'ours':>9}  {'target':>8}  verdict   anchor")
    print(f"{'cold up (image cached)':<34} {cold:>8.1f}s  {'< 60 s':>8}  {'met' if cold < 60 else 'MISSED':<8}"
          f"  khuedoan/homelab sandbox: 15-30 min")
    print(f"{'no-change re-run (median of 3)':<34} {rerun:>8.1f}s  {'< 10 s':>8}  "
          f"{'met' if rerun < 10 else 'MISSED':<8}  -")
    print(f"{'down':<34} {down:>8.1f}s  {'':>8}  {'':<8}  -")
    print(f"{'ansible all -m ping':<34} {ping:>8.1f}s  {'':>8}  {pinged}/{hosts} hosts answered")


if __name__ == "__main__":
    main()
