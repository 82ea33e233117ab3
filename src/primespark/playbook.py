"""Run Ansible (a playbook or one module) through ansible-runner, with the repository's ansible.cfg.

One connection layer for configuration and operations: the same inventory plugin, SSH settings
(ControlPersist socket directory included) and callbacks, with per-host results to inspect.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import ansible_runner

from primespark.errors import UserError
from primespark.hosts import SshFiles
from primespark.settings import get_settings


@dataclass
class RunResult:
    rc: int
    status: str
    seconds: float
    stats: dict[str, dict[str, int]]  # host -> ok, changed, failures, unreachable, skipped
    results: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # host -> task results, in order
    changed_tasks: list[str] = field(default_factory=list)
    failed_tasks: list[str] = field(default_factory=list)
    output: str = ""

    @property
    def hosts(self) -> set[str]:
        return set(self.stats)


def ansible_config(root: Path | None = None) -> Path:
    return (root or get_settings().root) / "ansible.cfg"


def control_path_dir(inventory: Path) -> str:
    env = inventory.name.removesuffix(".yml").removesuffix(".yaml").removesuffix(".fleet")
    known_hosts = SshFiles.of(get_settings().state_path(env)).known_hosts
    digest = hashlib.sha256(known_hosts.read_bytes() if known_hosts.is_file() else b"").hexdigest()[:10]
    return f"/tmp/spark-ansible-cp/{digest}"


def run_ansible(
    inventory: Path,
    *,
    playbook: str | None = None,
    module: str | None = None,
    module_args: str = "",
    hosts: str = "all",
    limit: str | None = None,
    extravars: dict[str, Any] | None = None,
    config: Path | None = None,
    root: Path | None = None,
    env: dict[str, str] | None = None,
) -> RunResult:
    """A playbook (relative to the repository root) or an ad-hoc module on `hosts`."""
    root = root or get_settings().root
    config = config or ansible_config(root)
    bin_dir = Path(sys.executable).parent
    # ansible-runner starts `ansible`/`ansible-playbook` from PATH: the ones beside this Python come first.
    envvars = {"ANSIBLE_CONFIG": str(config), "ANSIBLE_NOCOLOR": "1",
               "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", **(env or {})}
    if config == ansible_config(root):
        # ansible-runner would put ControlPersist sockets in its throw-away directory; keep them across runs,
        # but per set of host keys: a master still open to a host that was since re-created (a lab torn down
        # and brought up again) would take new sessions and hang them.
        envvars.setdefault("ANSIBLE_SSH_CONTROL_PATH_DIR", control_path_dir(inventory))
    if module == "raw":
        # raw must work on a host without Python (preflight finds those); Mitogen runs even raw in a Python there.
        envvars["ANSIBLE_STRATEGY"] = "linear"
    with tempfile.TemporaryDirectory(prefix="spark-runner-") as private:
        kwargs: dict[str, Any] = {
            "private_data_dir": private, "project_dir": str(root), "inventory": str(root / inventory),
            "envvars": envvars, "extravars": extravars or {}, "quiet": True, "limit": limit,
        }
        start = time.monotonic()
        if playbook is not None:
            runner = ansible_runner.run(playbook=str(root / playbook), **kwargs)
        elif module is not None:
            runner = ansible_runner.run(module=module, module_args=module_args, host_pattern=hosts, **kwargs)
        else:
            raise ValueError("name a playbook or a module")
        result = _result(runner, time.monotonic() - start)
    if runner.status not in ("successful", "failed"):
        raise UserError(f"ansible did not run ({runner.status}): {result.output.strip()[-800:]}",
                        "run the same command with ansible-playbook directly to see why")
    return result


def _result(runner: Any, seconds: float) -> RunResult:
    """Per-host stats and task results from ansible-runner's events."""
    stats = runner.stats or {}
    result = RunResult(rc=runner.rc, status=runner.status, seconds=seconds, stats={}, output=runner.stdout.read())
    names = set().union(*(stats.get(k, {}) for k in ("ok", "changed", "failures", "dark", "skipped")))
    for name in sorted(names):
        result.stats[name] = {"ok": stats.get("ok", {}).get(name, 0),
                              "changed": stats.get("changed", {}).get(name, 0),
                              "failures": stats.get("failures", {}).get(name, 0),
                              "unreachable": stats.get("dark", {}).get(name, 0),
                              "skipped": stats.get("skipped", {}).get(name, 0)}
    for event in runner.events:
        kind, data = event.get("event", ""), event.get("event_data", {})
        if kind not in ("runner_on_ok", "runner_on_failed", "runner_on_unreachable"):
            continue
        res = dict(data.get("res") or {})
        res["unreachable"] = kind == "runner_on_unreachable"
        res["failed"] = kind == "runner_on_failed" and not data.get("ignore_errors")
        # When the controller started and finished this host's task (epoch seconds): timing and clock checks.
        for key in ("start", "end"):
            if data.get(key):
                res[f"_{key}"] = datetime.fromisoformat(str(data[key])).timestamp()
        host, task = data.get("host", "?"), data.get("task", "?")
        result.results.setdefault(host, []).append({"task": task, **res})
        if kind == "runner_on_ok" and res.get("changed"):
            result.changed_tasks.append(f"{host}: {task}")
        if res["failed"] or res["unreachable"]:
            result.failed_tasks.append(f"{host}: {task}: {res.get('msg', '')} {res.get('stderr', '')}".strip())
    return result
