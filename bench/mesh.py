"""Plan and render the WireGuard mesh for 50, 200 and 1,000 hosts, beside wg-meshconf given the same hosts.

wg-meshconf (PyPI) is driven through its Python API the way its CLI does it: one `addpeer` per host into its
CSV database, then `genconfig` for every peer. It only does full mesh, so the side-by-side rows are full mesh;
our hub-and-spoke row is the issue's second target (1,000 hosts under 2 s). "first" is a fresh state (every key
and preshared key generated and stored); "again" re-plans an unchanged fleet and re-renders.
Targets: faster than wg-meshconf at every size; 1,000-host hub-and-spoke under 2 s.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from pathlib import Path
from typing import Any

from primespark.fleet.generate import generate_fleet_data
from primespark.fleet.loader import validate_data
from primespark.fleet.model import Fleet
from primespark.mesh.render import render_all
from primespark.mesh.service import plan_and_save
from primespark.secrets import LocalSecretStore

SIZES = (50, 200, 1000)


def fleet_of(size: int, topology: str) -> Fleet:
    """Exactly `size` mesh members (the generator adds KVM hosts, which are not members)."""
    data: dict[str, Any] = generate_fleet_data(size + size // 10 + 4, topology=topology, name="bench")
    names = [n for n, h in data["hosts"].items() if h["kind"] != "kvm_host"]
    members = ["vm-1", *[n for n in names if n != "vm-1"][: size - 1]]
    data["meshes"]["fleet"]["members"] = members
    if topology == "hub_and_spoke":
        data["meshes"]["fleet"]["hub"] = "vm-1"  # a member with a public address
    return validate_data(data, "bench")


def ours(fleet: Fleet) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        state, out = Path(tmp) / "state", Path(tmp) / "out"
        store = LocalSecretStore(state / "secrets")
        start = time.perf_counter()
        planned = plan_and_save(fleet, "fleet", state, store)
        render_all(planned.plan, planned.keys, out)
        first = time.perf_counter() - start
        start = time.perf_counter()
        planned = plan_and_save(fleet, "fleet", state, store)
        render_all(planned.plan, planned.keys, out)
        again = time.perf_counter() - start
        peers = sum(len(h.peers) for h in planned.plan.hosts.values())
    return first, again, peers


def wg_meshconf(fleet: Fleet) -> tuple[float, float]:
    from wg_meshconf.database_manager import DatabaseManager

    members = fleet.mesh_members("fleet")
    overlay = fleet.meshes["fleet"].overlay
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        database = DatabaseManager(Path(tmp) / "database.csv")
        start = time.perf_counter()
        for index, name in enumerate(members):
            host = fleet.hosts[name]
            endpoint = str(host.public_address) if host.public_address else None
            keepalive = 25 if fleet.behind_nat(name) else None
            database.addpeer(name, [f"{overlay.network_address + index + 1}/{overlay.prefixlen}"],
                             Endpoint=endpoint, ListenPort=51820, PersistentKeepalive=keepalive, MTU=1420)
        added = time.perf_counter() - start
        start = time.perf_counter()
        database.genconfig(None, Path(tmp) / "out")
        generated = time.perf_counter() - start
    return added, generated


def main() -> None:
    print(f"{'hosts':>6} {'topology':<14} {'peers':>9} {'ours first':>11} {'ours again':>11} "
          f"{'wg-meshconf':>12} {'(addpeer+genconfig)':>20}  verdict")
    for size in SIZES:
        for topology in ("full_mesh", "hub_and_spoke"):
            fleet = fleet_of(size, topology)
            first, again, peers = ours(fleet)
            if topology == "full_mesh":
                added, generated = wg_meshconf(fleet)
                theirs = added + generated
                verdict = "faster" if first < theirs else "SLOWER"
                print(f"{len(fleet.mesh_members('fleet')):>6} {topology:<14} {peers:>9} {first:>10.3f}s "
                      f"{again:>10.3f}s {theirs:>11.3f}s {f'({added:.2f}+{generated:.2f})':>20}  {verdict}",
                      flush=True)
            else:
                verdict = ("under 2 s" if first < 2 else "OVER 2 s") if size == 1000 else ""
                print(f"{len(fleet.mesh_members('fleet')):>6} {topology:<14} {peers:>9} {first:>10.3f}s "
                      f"{again:>10.3f}s {'n/a':>12} {'(full mesh only)':>20}  {verdict}", flush=True)


if __name__ == "__main__":
    main()
