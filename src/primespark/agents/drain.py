"""Draining a host: its drain marker (`agents.facts.DRAIN_MARKER`) written or removed on the host, through the
fleet's way of reaching it (`primespark.hosts`). Placement keeps new agent tasks off a drained host; tasks already
running there go on.

The marker holds a note (JSON: who, when, why). It is made create-only (a temporary file linked into place), so
two drains at once leave one whole note, the first one's; the other is told the host was drained already. The one
exception: a drain the edge role's power scripts made (quiet hours, a low battery), which they remove themselves
when it is over, is replaced by an operator's, so that the operator's outlasts it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from primespark.agents.facts import DRAIN_MARKER, MARKER_DIR_VARIABLE, DrainNote
from primespark.errors import StepFailed, UserError
from primespark.fleet.model import Fleet, HostKind
from primespark.hosts import HostAccess

# Drain and undrain wait this long for the host; ssh's own ConnectTimeout (10 s) ends an unreachable one first.
TIMEOUT_SECONDS = 60
# The `by` of the drains roles/edge/files/spark-power and spark-ups-guard make; spark-power removes its own when
# quiet hours end. An operator's drain replaces theirs (a whole file renamed over it: there whole or not at all).
POWER_SCRIPTS = ("spark-power", "spark-ups-guard")

# Runs on the host with its own Python (standard library only): a JSON request in argv, one JSON answer out.
_HOST_SCRIPT = r"""
import json, os, sys, tempfile
args = json.loads(sys.argv[1])
moved = os.environ.get(args["moved_by"])
path = os.path.join(moved, os.path.basename(args["marker"])) if moved else args["marker"]
def note():
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read(4096)
    except FileNotFoundError:
        return None
def by(text):
    try:
        return json.loads(text or "").get("by")
    except (ValueError, AttributeError):
        return None
replaced = None
if args["op"] == "drain":
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".drain.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(args["note"])
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, path)  # create-only and whole: a note already there is kept
            made = True
        except FileExistsError:
            made = False
            was = note()
            if by(was) in args["power_scripts"]:  # theirs ends by itself: the operator's replaces it
                os.rename(tmp, path)
                made, replaced = True, was
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    dirfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
    print(json.dumps({"changed": made, "note": note(), "replaced": replaced}))
else:
    was = note()
    try:
        os.unlink(path)
        changed = True
    except FileNotFoundError:
        changed = False
    print(json.dumps({"changed": changed, "note": was}))
"""


@dataclass(frozen=True)
class Drain:
    """What `drain` or `undrain` did on the host: whether it changed anything, and the marker's note (drain: the
    one in place now; undrain: the one removed)."""

    host: str
    changed: bool
    note: DrainNote | None
    replaced: DrainNote | None = None  # drain: a power script's drain this one replaced


def check_host(fleet: Fleet, fleet_file: str, host: str) -> None:
    """A host of the fleet that can run agent tasks, or a UserError naming the fleet file and its hosts."""
    if host not in fleet.hosts:
        raise UserError(f"{fleet_file}: no host named {host!r} in fleet {fleet.name}",
                        f"use one of its hosts: {', '.join(sorted(fleet.hosts))}")
    if fleet.hosts[host].kind is HostKind.kvm_host:
        vms = sorted(fleet.vms_on(host))
        raise UserError(f"{fleet_file}: {host} is a KVM host: it runs VMs, never agent tasks, so there is nothing "
                        "to drain", f"drain its VMs instead: {', '.join(vms) or 'it has none'}")


def note_now(by: str, reason: str, now: datetime | None = None) -> DrainNote:
    return DrainNote(by, (now or datetime.now(UTC)).isoformat(timespec="seconds").replace("+00:00", "Z"), reason)


def _on_host(hosts: HostAccess, host: str, request: dict[str, object], doing: str) -> Drain:
    runner = hosts.runner(host)
    request = {**request, "marker": DRAIN_MARKER, "moved_by": MARKER_DIR_VARIABLE}
    try:
        done = runner.run([runner.python, "-c", _HOST_SCRIPT, json.dumps(request)], timeout=TIMEOUT_SECONDS)
    except StepFailed as exc:  # unreachable, timed out, no python3: one line, with what was tried
        raise UserError(f"{host}: not {doing}: {exc.message.splitlines()[0]}",
                        "check that the host is up and reachable, then run the command again") from None
    try:
        answer = json.loads(done.text) if done.returncode == 0 else None
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        said = (done.stderr.strip().splitlines() or done.text.strip().splitlines() or ["no answer"])[-1]
        raise UserError(f"{host}: not {doing}: {DRAIN_MARKER} could not be changed there (exit {done.returncode}): "
                        f"{said[:300]}", "the fleet's SSH user needs sudo on the host (or to be root)")
    note, replaced = answer.get("note"), answer.get("replaced")
    return Drain(host, bool(answer.get("changed")), None if note is None else DrainNote.parse(note),
                 None if replaced is None else DrainNote.parse(replaced))


def drain(hosts: HostAccess, host: str, note: DrainNote) -> Drain:
    """Write the drain marker with `note` on `host`, unless one is there (then it is kept, and returned)."""
    text = json.dumps({"by": note.by, "at": note.at, "reason": note.reason}, sort_keys=True) + "\n"
    return _on_host(hosts, host, {"op": "drain", "note": text, "power_scripts": list(POWER_SCRIPTS)}, "drained")


def undrain(hosts: HostAccess, host: str) -> Drain:
    """Remove the drain marker on `host`, if there is one (its note is returned)."""
    return _on_host(hosts, host, {"op": "undrain"}, "undrained")
