"""Wall time of a no-change run of site.yml on the lab: our ansible.cfg against Ansible's defaults.

Ours: pipelining, ControlPersist, 20 forks, smart gathering with a JSON fact cache. The defaults: an
ansible.cfg that holds only what is needed to read the fleet inventory (the plugin's path and name), so
everything else is as Ansible ships it (no pipelining, 5 forks, facts gathered in every play, ControlPersist 60 s).
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
    env = {**os.environ, "ANSIBLE_CONFIG": str(config), "ANSIBLE_NOCOLOR": "1", **(env_extra or {})}
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
        # Converge first (and fill our fact cache): the figures are for runs that have nothing to change.
        converge, recap, _ = run_site(ours, ours_env)
        print(f"converge run (not compared): {converge:.1f} s, {summary(recap)}")
        default_s, default_recap, _ = run_site(defaults, {"ANSIBLE_SSH_CONTROL_PATH_DIR": f"{tmp}/cp-defaults"})
        ours_s, ours_recap, _ = run_site(ours, ours_env)
        if not was_up:
            lab.down()
    speedup = default_s / ours_s
    print(f"no-change run of site.yml on the {fleet.name} lab ({len(ours_recap)} hosts)")
    print(f"{'config':<30} {'wall':>8}   result")
    print(f"{'Ansible defaults':<30} {default_s:>7.1f}s   {summary(default_recap)}")
    print(f"{'ours (ansible.cfg)':<30} {ours_s:>7.1f}s   {summary(ours_recap)}")
    print(f"speed-up {speedup:.2f}x (target >= 2x: {'met' if speedup >= 2 else 'MISSED'})")


if __name__ == "__main__":
    main()
