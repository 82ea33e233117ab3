"""Preflight: the preconditions of a configuration run, checked in seconds before the slow part.

Overlapping networks (the fleet's against this machine's routes), SSH reachability, Python on the host,
free disk and clock skew. Remote checks go through Ansible's `raw` module with the repository's
ansible.cfg and the fleet inventory, so they use exactly the SSH settings the playbooks use, and need
no Python on the host (that is one of the things checked).
"""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Network
from pathlib import Path

from primespark.errors import UserError
from primespark.fleet import Fleet
from primespark.inventory import managed_hosts
from primespark.playbook import run_ansible
from primespark.settings import Settings, get_settings

MIN_PYTHON = (3, 8)  # the oldest target Python ansible-core 2.19 supports


class Status(StrEnum):
    ok = "ok"
    warn = "warn"
    fail = "FAIL"


@dataclass(frozen=True)
class Finding:
    host: str  # "-" for this machine
    check: str
    status: Status
    message: str
    fix: str = ""


@dataclass(frozen=True)
class Limits:
    min_free_gb: float = 1.0
    max_skew_seconds: float = 5.0
    connect_timeout: float = 5.0


def fleet_networks(fleet: Fleet) -> dict[str, IPv4Network]:
    nets = {f"sites.{name}.lan": site.lan for name, site in fleet.sites.items()}
    nets |= {f"meshes.{name}.overlay": mesh.overlay for name, mesh in fleet.meshes.items()}
    if fleet.lab is not None:
        nets["lab.wan"] = fleet.lab.wan
    return nets


def local_routes() -> list[tuple[IPv4Network, str]]:
    """This machine's IPv4 routes (network, device), from iproute2's JSON output."""
    done = subprocess.run(["ip", "-j", "-4", "route", "show", "table", "main"], capture_output=True, text=True)
    if done.returncode != 0:
        return []
    routes = []
    for route in json.loads(done.stdout or "[]"):
        dst = route.get("dst", "")
        if dst in ("", "default"):
            continue
        try:
            routes.append((IPv4Network(dst if "/" in dst else f"{dst}/32", strict=False), route.get("dev", "?")))
        except ValueError:
            continue
    return routes


def check_networks(fleet: Fleet, routes: list[tuple[IPv4Network, str]]) -> list[Finding]:
    """A fleet network that partly overlaps a network this machine routes elsewhere sends traffic astray.

    The same network routed here is how the controller reaches a site (its LAN, the lab's bridges, wg0),
    and is fine; a larger or smaller one that overlaps is not.
    """
    findings = []
    for field, net in fleet_networks(fleet).items():
        clashes = [(r, dev) for r, dev in routes if r.overlaps(net) and r != net and r.prefixlen < 32]
        if clashes:
            listed = ", ".join(f"{r} on {dev}" for r, dev in clashes)
            findings.append(Finding("-", "networks", Status.fail,
                                    f"{field} {net} overlaps this machine's route(s) {listed}",
                                    f"pick a {field} that overlaps nothing here, or remove the route"))
    if not findings:
        findings.append(Finding("-", "networks", Status.ok,
                                f"{len(fleet_networks(fleet))} fleet networks, none overlapping {len(routes)} routes"))
    return findings


def check_tcp(fleet: Fleet, hosts: list[str], timeout: float) -> dict[str, Finding]:
    def one(name: str) -> Finding:
        host = fleet.hosts[name]
        where = f"{host.ssh_address}:{host.ssh.port}"
        try:
            socket.create_connection((str(host.ssh_address), host.ssh.port), timeout=timeout).close()
        except TimeoutError:
            return Finding(name, "reachable", Status.fail, f"{where}: no answer within {timeout:g} s",
                           "is the host up and on the network? (the lab: `spark lab up`); check a firewall on "
                           "the way and hosts.<name>.ssh in the fleet file")
        except OSError as exc:
            return Finding(name, "reachable", Status.fail, f"{where}: {exc.strerror or exc}",
                           "is sshd running there, on the port the fleet file names (hosts.<name>.ssh.port)?")
        return Finding(name, "reachable", Status.ok, f"{where} accepts TCP")

    with ThreadPoolExecutor(max(1, min(32, len(hosts)))) as pool:
        return dict(zip(hosts, pool.map(one, hosts), strict=True))


# Runs under /bin/sh on the host: no Python needed to answer.
PROBE = (
    "echo \"time=$(date +%s.%N)\"; "
    "py=$(command -v python3 || true); echo \"python=$py\"; "
    "[ -n \"$py\" ] && echo \"pyver=$($py -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])')\"; "
    "for p in {paths}; do d=$p; while [ ! -e \"$d\" ]; do d=$(dirname \"$d\"); done; "
    "echo \"df=$p $(df -Pk \"$d\" | awk 'NR==2 {{print $2, $4}}')\"; done"
)


def tier_paths(fleet: Fleet, name: str) -> list[str]:
    return ["/", *(t.path for t in fleet.tiers.values() if name in t.hosts)]


def run_probe(inventory: Path, root: Path, fleet: Fleet, hosts: list[str],
              timeout: float) -> tuple[dict[str, dict], float, float]:
    """The probe on every host at once via `ansible -m raw`; results by host, and the local time window."""
    by_command: dict[str, list[str]] = {}
    for name in hosts:
        cmd = PROBE.format(paths=" ".join(shlex.quote(p) for p in tier_paths(fleet, name)))
        by_command.setdefault(cmd, []).append(name)
    results: dict[str, dict] = {}
    start = time.time()
    for cmd, names in by_command.items():
        run = run_ansible(inventory, module="raw", module_args=cmd, limit=",".join(names), root=root,
                          env={"ANSIBLE_TIMEOUT": str(max(1, int(timeout)))})
        for name, host_results in run.results.items():
            results[name] = host_results[-1]
    return results, start, time.time()


def evaluate(fleet: Fleet, name: str, result: dict, window: tuple[float, float], limits: Limits) -> list[Finding]:
    if result.get("unreachable") or (result.get("failed") and not result.get("stdout")):
        msg = (result.get("msg") or "").strip().splitlines()
        return [Finding(name, "ssh", Status.fail, f"SSH failed: {msg[-1] if msg else 'unreachable'}",
                        "check the SSH key and user (hosts.<name>.ssh.user) and known_hosts; "
                        "`ansible all -m ping -vvv` shows the details")]
    values: dict[str, list[str]] = {}
    for line in result.get("stdout", "").splitlines():
        key, _, value = line.strip().partition("=")
        values.setdefault(key, []).append(value)
    findings = [Finding(name, "ssh", Status.ok, "logged in with the playbooks' SSH settings")]

    python, version = values.get("python", [""])[0], values.get("pyver", [""])[0]
    if not python:
        findings.append(Finding(name, "python", Status.fail, "no python3 on the host: Ansible modules cannot run",
                                "install python3 (apt-get install python3), or add it to the image"))
    elif tuple(int(x) for x in version.split(".")) < MIN_PYTHON:
        findings.append(Finding(name, "python", Status.fail, f"python3 is {version}, Ansible needs "
                                f"{'.'.join(map(str, MIN_PYTHON))} or newer", "upgrade python3 on the host"))
    else:
        findings.append(Finding(name, "python", Status.ok, f"{python} {version}"))

    capacities = {t.path: t.capacity_gb for t in fleet.tiers.values() if name in t.hosts}
    for entry in values.get("df", []):
        parts = entry.split()
        if len(parts) != 3:
            findings.append(Finding(name, "disk", Status.warn, f"cannot read free space: {entry!r}"))
            continue
        path, size_gb, free_gb = parts[0], int(parts[1]) / 1e6 * 1.024, int(parts[2]) / 1e6 * 1.024
        if path == "/" and free_gb < limits.min_free_gb:
            findings.append(Finding(name, "disk", Status.fail, f"/ has {free_gb:.2f} GB free, "
                                    f"the run needs {limits.min_free_gb:g} GB", "free space on the host's root"))
        elif path in capacities and size_gb < capacities[path]:
            findings.append(Finding(name, "disk", Status.warn, f"tier {path}: its filesystem holds {size_gb:.0f} GB,"
                                    f" the fleet gives the tier {capacities[path]} GB (the quota guard uses the "
                                    "fleet's figure)", "lower tiers.<tier>.capacity_gb or give it a bigger disk"))
        else:
            findings.append(Finding(name, "disk", Status.ok, f"{path}: {free_gb:.1f} GB free of {size_gb:.1f} GB"))

    stamp = values.get("time", [""])[0]
    try:
        remote = float(stamp)
    except ValueError:
        findings.append(Finding(name, "clock", Status.warn, f"cannot read the host's clock ({stamp!r})"))
        return findings
    # The host read its clock some time inside the local window: any difference beyond it is skew.
    skew = max(window[0] - remote, remote - window[1], 0.0)
    if skew > limits.max_skew_seconds:
        findings.append(Finding(name, "clock", Status.fail, f"clock is off by at least {skew:.1f} s "
                                f"(limit {limits.max_skew_seconds:g} s): TLS, Vault tokens and backup ages go wrong",
                                "start time sync on the host (chrony), or set the clock"))
    else:
        findings.append(Finding(name, "clock", Status.ok, f"within {window[1] - window[0]:.2f} s of this machine"))
    return findings


def names_a_file(env: str) -> bool:
    return Path(env).suffix in (".yaml", ".yml")


def fleet_inventory(env: str, settings: Settings | None = None) -> Path:
    settings = settings or get_settings()
    path = settings.inventory_dir / f"{env}.fleet.yml"
    if not path.is_file():
        known = sorted(p.name.removesuffix(".fleet.yml") for p in settings.inventory_dir.glob("*.fleet.yml"))
        raise UserError(f"no Ansible inventory for environment {env!r} ({path})",
                        f"name one of: {', '.join(known) or 'none'}, or add inventory/{env}.fleet.yml")
    return path


@contextmanager
def inventory_for(env: str, fleet: Fleet, settings: Settings | None = None) -> Iterator[Path]:
    """The Ansible inventory of `env`: inventory/<env>.fleet.yml, or for a fleet file given by its path a
    temporary `<fleet name>.fleet.yml` for the same `fleet` plugin (its SSH files: the fleet name's state)."""
    if not names_a_file(env):
        yield fleet_inventory(env, settings)
        return
    with tempfile.TemporaryDirectory(prefix="spark-preflight-") as folder:
        path = Path(folder) / f"{fleet.name}.fleet.yml"
        path.write_text(f"# made by spark preflight for {env}\nplugin: fleet\n"
                        f"fleet: {json.dumps(str(Path(env).resolve()))}\nenv: {json.dumps(fleet.name)}\n")
        yield path


def preflight(fleet: Fleet, env: str, limits: Limits = Limits(), settings: Settings | None = None,
              routes: list[tuple[IPv4Network, str]] | None = None) -> list[Finding]:
    settings = settings or get_settings()
    with inventory_for(env, fleet, settings) as inventory:
        return _preflight(fleet, inventory, limits, settings, routes)


def _preflight(fleet: Fleet, inventory: Path, limits: Limits, settings: Settings,
               routes: list[tuple[IPv4Network, str]] | None) -> list[Finding]:
    findings = check_networks(fleet, local_routes() if routes is None else routes)
    hosts = managed_hosts(fleet)
    tcp = check_tcp(fleet, hosts, limits.connect_timeout)
    findings += tcp.values()
    reachable = [h for h in hosts if tcp[h].status is Status.ok]
    if reachable:
        results, start, end = run_probe(inventory, settings.root, fleet, reachable, limits.connect_timeout)
        for name in reachable:
            result = results.get(name, {"unreachable": True, "msg": "no result"})
            window = (result.get("_start", start), result.get("_end", end))
            findings += evaluate(fleet, name, result, window, limits)
    return findings

