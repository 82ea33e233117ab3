"""Wall time of a no-change run of site.yml on the lab: our ansible.cfg against Ansible's defaults.

Ours: the committed ansible.cfg (Mitogen's strategy, pipelining, ControlPersist, 20 forks, smart gathering with
a JSON fact cache). The defaults: an ansible.cfg that holds only what is needed to read the fleet inventory
(the plugin's path and name), so everything else is as Ansible ships it (linear strategy, no pipelining,
5 forks, facts gathered in every play, ControlPersist 60 s). A third figure, for reference, runs ours with
ANSIBLE_STRATEGY=linear (the opt-out from Mitogen): what the rest of the tuning gives alone.
Target: ours at least 2x faster. Holds the lab lock; brings the lab up if needed and leaves it as it found it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from primespark.fleet import load_fleet
from primespark.lab import Lab
from primespark.lab.lock import lab_lock

REPO = Path(__file__).resolve().parents[1]
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def run_site(config: Path, env_extra: dict[str, str] | None = None) -> tuple[float, dict[str, tuple[int, ...]], str]:
    # Only the config file (and env_extra) may differ between runs: no ANSIBLE_* from the caller's shell.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env = {**inherited, "ANSIBLE_CONFIG": str(config), "ANSIBLE_NOCOLOR": "1", **(env_extra or {})}
    start = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", "inventory/lab.fleet.yml",
                           "site.yml"], cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    recap = {m[0]: tuple(int(x) for x in m[1:]) for m in RECAP.findall(done.stdout)}
    if done.returncode != 0:
        print(done.stdout[-4000:], done.stderr[-2000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"site.yml failed with {config}")
    return seconds, recap, done.stdout


def summary(recap: dict[str, tuple[int, ...]]) -> str:
    changed = sum(r[1] for r in recap.values())
    return f"{len(recap)} hosts, {sum(r[0] for r in recap.values())} ok, {changed} changed"


def main() -> None:
    fleet = load_fleet(str(REPO / "inventory" / "lab.yaml"))
    lab = Lab(fleet)
    load_before = os.getloadavg()
    with lab_lock(), tempfile.TemporaryDirectory(prefix="spark-bench-ansible-") as tmp:
        was_up = any(h.state == "running" for h in lab.status(check_ssh=False).hosts)
        lab.up()
        defaults = Path(tmp) / "defaults.cfg"
        defaults.write_text(
            "# Ansible's defaults, except what reading the fleet inventory needs.\n"
            f"[defaults]\ninventory_plugins = {REPO / 'src/primespark/ansible_plugins/inventory'}\n"
            "[inventory]\nenable_plugins = fleet\n"
        )
        ours, ours_env = REPO / "ansible.cfg", {"ANSIBLE_SSH_CONTROL_PATH_DIR": f"{tmp}/cp-ours"}
        # The figures are for runs with nothing to change: converge first where the lab is not configured.
        ours_s, ours_recap, _ = run_site(ours, ours_env)
        if any(r[1] for r in ours_recap.values()):
            print(f"converge run (not compared): {ours_s:.1f} s, {summary(ours_recap)}")
            ours_s, ours_recap, _ = run_site(ours, ours_env)
        default_s, default_recap, _ = run_site(defaults, {"ANSIBLE_SSH_CONTROL_PATH_DIR": f"{tmp}/cp-defaults"})
        try:
            linear_s, linear_recap, _ = run_site(ours, {**ours_env, "ANSIBLE_STRATEGY": "linear"})
        except SystemExit as failed:  # the reference figure: report the two main ones all the same
            print(f"the run with ANSIBLE_STRATEGY=linear failed: {failed}", file=sys.stderr)
            linear_s, linear_recap = float("inf"), {}
        if not was_up:
            lab.down()
    load = " ".join(f"{x:.2f}" for x in load_before), " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"no-change run of site.yml on the lab of fleet {fleet.name!r} ({len(ours_recap)} hosts); "
          f"{os.cpu_count()} CPUs, load average {load[0]} before, {load[1]} after")
    print(f"{'config':<46} {'wall':>8}  {'speed-up':>8}   result")
    for label, seconds, recap in (("Ansible defaults", default_s, default_recap),
                                  ("ours (ansible.cfg: Mitogen)", ours_s, ours_recap),
                                  ("ours with ANSIBLE_STRATEGY=linear (reference)", linear_s, linear_recap)):
        print(f"{label:<46} {seconds:>7.1f}s  {default_s / seconds:>7.2f}x   {summary(recap)}")
    speedup = default_s / ours_s
    print(f"target >= 2x faster than the defaults: {'met' if speedup >= 2 else 'MISSED'} ({speedup:.2f}x)")


if __name__ == "__main__":
    main()
