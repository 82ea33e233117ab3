"""Copies of a machine's checkpoints on other hosts (the NAS, the cloud worker): root here can cut the chain and its
checkpoints together, but not the copies elsewhere (whose root is someone else, or at least another machine).

`ship` appends to each copy what it does not hold yet, and refuses when the copy is not a prefix of this machine's
file (a checkpoint here was edited or cut since the last copy); `compare` says how a copy and this machine's file
differ. A worker's own checkpoints are relayed by the controller (`relay_workers`: a worker's key reaches only its
own site's hosts, the controller's every host) to the other hosts, filed under `worker-<host>`. Copies live on
each host in `/var/lib/primespark/audit-copies/<fleet>/<origin>/` (root's, 0700; the variable SPARK_AUDIT_COPIES
on the host moves it, for tests).
"""

from __future__ import annotations

import re
import shlex
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from primespark.errors import UserError
from primespark.fleet import Fleet
from primespark.hosts import HostAccess, run_on
from primespark.hosts.runner import CommandFailed

if TYPE_CHECKING:
    from primespark.context import FleetContext

_NAME = re.compile(r"[^A-Za-z0-9._-]")


def origin() -> str:
    """This machine's name, as its copies are filed under."""
    return _NAME.sub("_", socket.gethostname()) or "controller"


def offsite_hosts(fleet: Fleet) -> list[str]:
    """Where copies go: the hosts of the primary backup repositories (the NAS) and the sites' workers."""
    found: list[str] = []
    if fleet.backup is not None:
        found += [r.host for r in fleet.backup.repositories.values() if r.copy_from is None]
    if fleet.orchestration is not None:
        found += [w.host for w in fleet.orchestration.workers.values()]
    return list(dict.fromkeys(found))


COPIES = "/var/lib/primespark/audit-copies"


def _folder(fleet: str, source: str) -> str:
    return f'"${{SPARK_AUDIT_COPIES:-{COPIES}}}/{_NAME.sub("_", fleet)}/{_NAME.sub("_", source)}"'


def ship(hosts: HostAccess, host: str, fleet: str, checkpoints: bytes, source: str | None = None) -> int:
    """Append to `host`'s copy what it lacks; the bytes added. UserError when the copy is not a prefix of ours."""
    folder = _folder(fleet, source or origin())
    script = f"""set -eu
umask 077; d={folder}; mkdir -p "$d"; chmod 700 "$d"
f="$d/log.checkpoints.jsonl"; new="$d/.incoming"
cat > "$new"; touch "$f"; chmod 600 "$f"
size=$(wc -c < "$f")
if ! head -c "$size" "$new" | cmp -s - "$f"; then rm -f "$new"; echo differs >&2; exit 3; fi
tail -c +$((size + 1)) "$new" >> "$f"
echo $(( $(wc -c < "$new") - size )); rm -f "$new"
"""
    try:
        added = run_on(hosts, host, script, stdin=checkpoints.decode())
    except CommandFailed as exc:
        if exc.returncode == 3:
            raise UserError(f"the checkpoints here are not the ones already copied to {host}: one was edited or "
                            "cut here since", "`spark audit verify --offsite` says which") from None
        raise
    return int(added.strip() or 0)


def fetch(hosts: HostAccess, host: str, fleet: str, source: str | None = None) -> bytes:
    folder = _folder(fleet, source or origin())
    return run_on(hosts, host, f'cat {folder}/log.checkpoints.jsonl 2>/dev/null || true').encode()


@dataclass(frozen=True)
class Difference:
    host: str
    message: str


def compare(host: str, here: bytes, copy: bytes) -> Difference | None:
    """None when the copy is this file or an earlier state of it (a copy may lag behind)."""
    if here.startswith(copy):
        return None
    ours, theirs = here.splitlines(), copy.splitlines()
    if copy.startswith(here):
        return Difference(host, f"truncated: the copy on {host} holds {len(theirs)} checkpoints, this machine "
                                f"{len(ours)}: checkpoints {len(ours) + 1}-{len(theirs)} were cut here")
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                 min(len(ours), len(theirs))) + 1
    return Difference(host, f"checkpoint {first} differs from its copy on {host}: edited here or there")


def worker_checkpoints(ctx: FleetContext, hosts: HostAccess | None = None) -> dict[str, bytes]:
    """Each site worker's own checkpoints, read from its host (none yet: empty); a file that cannot be read fails."""
    from primespark.orchestration.material import worker_state_dir

    found: dict[str, bytes] = {}
    for worker in (ctx.fleet.orchestration.workers.values() if ctx.fleet.orchestration is not None else ()):
        path = shlex.quote(f"{worker_state_dir(ctx, worker.host)}/audit/log.checkpoints.jsonl")
        found[worker.host] = run_on(hosts or ctx.hosts, worker.host,
                                    f"if [ -e {path} ]; then cat {path}; fi").encode()
    return found


def worker_source(host: str) -> str:
    """What a worker's relayed copies are filed under (apart from a controller that has the same name)."""
    return f"worker-{host}"


def relay_workers(ctx: FleetContext, hosts: HostAccess | None = None) -> list[tuple[str, str, int]]:
    """Each worker's checkpoints copied to the offsite hosts other than its own, as `ship` copies this machine's:
    (worker, host, bytes added). A copy that is not a prefix of the worker's file is refused (UserError)."""
    hosts = hosts or ctx.hosts
    added = []
    for worker, data in worker_checkpoints(ctx, hosts).items():
        for host in offsite_hosts(ctx.fleet):
            if host != worker:
                added.append((worker, host, ship(hosts, host, ctx.fleet.name, data, worker_source(worker))))
    return added


def worker_differences(ctx: FleetContext, hosts: HostAccess | None = None) -> list[Difference]:
    """How each worker's checkpoints differ from their copies on the other hosts (a copy may lag behind)."""
    hosts = hosts or ctx.hosts
    found = []
    for worker, data in worker_checkpoints(ctx, hosts).items():
        for host in offsite_hosts(ctx.fleet):
            if host != worker:
                copy = fetch(hosts, host, ctx.fleet.name, worker_source(worker))
                difference = compare(host, data, copy)
                if difference is not None:
                    found.append(Difference(host, f"{worker}'s worker: {difference.message}"))
    return found
