"""`spark plan` (the Pulumi program under mocks + every policy) for homelab and a generated 100-VM fleet.

Target: under 5 s for 100 VMs. In-process figures are the best of three runs; the CLI figure is one
`spark plan` subprocess, interpreter start and imports included.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from timing import best_of

from primespark.cloud.plan import plan
from primespark.fleet.generate import generate_fleet_data
from primespark.settings import get_settings

RUNS = 3
TARGET_S = 5.0



def cli(target: str, state: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "primespark.cli.app", "plan", "--env", target], check=False,
                   capture_output=True, env={**os.environ, "SPARK_STATE_DIR": state})
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["SPARK_STATE_DIR"] = scratch
        get_settings.cache_clear()
        data = generate_fleet_data(250, vm_share=0.4, name="scale")
        fleet_file = Path(scratch) / "scale.yaml"
        fleet_file.write_text(yaml.safe_dump(data, sort_keys=False))
        vms = sum(1 for h in data["hosts"].values() if h["kind"] == "vm")
        print(f"{'fleet':<22} {'resources':>9} {'in-process':>11} {'spark plan (CLI)':>17}  target")
        for label, target in (("homelab (4 VMs)", "homelab"), (f"generated ({vms} VMs)", str(fleet_file))):
            result = plan(target)
            seconds = best_of(lambda target=target: plan(target), RUNS)
            wall = cli(target, scratch)
            goal = f"< {TARGET_S:g} s {'met' if wall < TARGET_S else 'MISSED'}" if vms and "generated" in label else ""
            print(f"{label:<22} {len(result.graph.resources):>9} {seconds:>10.2f}s {wall:>16.2f}s  {goal}")
            print(f"{'':<22} violations: {len(result.violations)} ({len(result.mandatory)} mandatory)")


if __name__ == "__main__":
    main()
