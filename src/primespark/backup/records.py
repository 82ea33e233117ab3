"""Which restic repositories this environment initialised, so that a missing one is never silently made again.

A NAS volume that is not mounted, or a moved folder, looks to restic exactly like "no repository here". If a
backup then ran `restic init`, it would succeed into a brand-new empty repository, the old snapshots would be
invisible and the drill would pass against the new one. So a repository is created only on its first use —
when the state directory has no record of it — or on purpose (`spark backup init`); each creation is recorded
with the repository's own config id (`restic cat config`). Later runs find it there with that id, or refuse.

Only the controller (the operator's machine) makes or adopts a repository. A site's Prefect worker keeps a state
directory of its own, and a worker set up while a volume was not mounted would otherwise make an empty repository
on "first use": its records are a read-only copy of the controller's for the repositories its site's deployments
open (delivered by `spark flows deploy`, and with its material when the role installs it); a repository they do
not name is refused there, neither made nor adopted.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

from primespark.errors import StepFailed
from primespark.restic import ResticClient, ResticError
from primespark.secrets import atomic_write

RECORDS_FILE = "backup-repositories.json"


class RepositoryMissing(StepFailed):
    """A repository this environment initialised is not at its location (unmounted volume, moved folder)."""


class RepositoryReplaced(StepFailed):
    """Another repository than the one this environment initialised is at the location."""


class RepositoryNotRecorded(StepFailed):
    """A site's worker has no record of a repository: it neither makes nor adopts one (the controller does)."""


@dataclass(frozen=True)
class Record:
    repository: str
    client: str
    url: str
    id: str
    recorded: str  # when (ISO 8601, UTC)
    how: str  # "initialised" (made by spark) or "found" (there already, adopted)


def key(repository: str, client: str) -> str:
    return f"{repository}/{client}"


def records_path(state_dir: Path) -> Path:
    return state_dir / RECORDS_FILE


@contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """One writer of the records file at a time (backups of several clients run in parallel)."""
    with open(state_dir / f".{RECORDS_FILE}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


UNREADABLE_FIX = ("restore the file from a backup, or remove it to adopt the repositories as they are now (each is "
                  "then recorded again on its next use)")


def parse(text: str, origin: str, fix: str = UNREADABLE_FIX) -> dict[str, Record]:
    """Records from their JSON text (`origin` names the file, for the error). Anything else fails: read as empty, the
    next backup would re-create missing repositories, and the guard must not fail open."""
    try:
        data = json.loads(text)
    except ValueError:
        raise StepFailed(f"the repository records {origin} cannot be read (not JSON)", fix) from None
    names = {f.name for f in fields(Record)}
    if not isinstance(data, dict) or not all(
            isinstance(v, dict) and set(v) == names and all(isinstance(x, str) for x in v.values())
            for v in data.values()):
        raise StepFailed(f"the repository records {origin} cannot be read (not a map of records)", fix)
    return {str(k): Record(**v) for k, v in data.items()}


def dumps(found: Mapping[str, Record]) -> str:
    """The records file's text: one form wherever it is written (a delivery that changes nothing is seen as such)."""
    return json.dumps({k: asdict(r) for k, r in found.items()}, indent=1, sort_keys=True)


def load(state_dir: Path, fix: str = UNREADABLE_FIX) -> dict[str, Record]:
    path = records_path(state_dir)
    return parse(path.read_text(), str(path), fix) if path.is_file() else {}


def find(state_dir: Path, repository: str, client: str, fix: str = UNREADABLE_FIX) -> Record | None:
    return load(state_dir, fix).get(key(repository, client))


def _write(state_dir: Path, found: Mapping[str, Record]) -> None:
    atomic_write(records_path(state_dir), dumps(found), 0o600)


def save(state_dir: Path, record: Record) -> None:
    with _locked(state_dir):
        found = load(state_dir)
        found[key(record.repository, record.client)] = record
        _write(state_dir, found)


def adopt(state_dir: Path, others: Mapping[str, Record]) -> list[str]:
    """Add the records of `others` (a worker's, made before workers got the controller's) this state directory
    lacks; those it has stay as they are. Returns the keys added."""
    with _locked(state_dir):
        found = load(state_dir)
        added = sorted(k for k in others if k not in found)
        if added:
            _write(state_dir, {**found, **{k: others[k] for k in added}})
    return added


def select(state_dir: Path, pairs: Iterable[tuple[str, str]]) -> dict[str, Record]:
    """The records of the (repository, client) pairs that are recorded."""
    found = load(state_dir)
    return {k: found[k] for k in sorted({key(r, c) for r, c in pairs}) if k in found}


def forget(state_dir: Path, repository: str | None = None, client: str | None = None) -> list[str]:
    """Drop the records of `repository` (every client's, or `client`'s), or all records: what they named is gone
    on purpose (`spark backup init`, `spark lab down`). Returns the keys dropped."""
    if not records_path(state_dir).is_file():
        return []
    with _locked(state_dir):
        found = load(state_dir)
        dropped = [k for k, v in found.items() if (repository is None or v.repository == repository)
                   and (client is None or v.client == client)]
        for k in dropped:
            del found[k]
        _write(state_dir, found)
    return dropped


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Opened:
    id: str
    created: bool  # initialised by this call


def open_repository(state_dir: Path, restic: ResticClient, repository: str, client: str, *, create: bool,
                    where: str, start_over: str, delivered: str | None = None) -> Opened | None:
    """The client's repository at `restic.repository`, checked against the record of it.

    - there with the recorded id: fine;
    - there without a record: recorded now (made before records were kept, or by hand);
    - there with another id: `RepositoryReplaced`;
    - missing but recorded: `RepositoryMissing` — never re-created;
    - missing, never recorded: its first use: made when `create`, else None.

    `where` says where the repository's folder is (for the operator to check); `start_over` is the command
    that starts over with a new repository on purpose. `delivered`: the records here are the copy the controller
    delivers to a site's worker with this command; they are never written here, and a repository they do not name
    is `RepositoryNotRecorded` (missing when it would be made, or there), never made or adopted."""
    path = records_path(state_dir)
    again = f"`{start_over}`"
    fix = UNREADABLE_FIX
    if delivered is not None:
        again += f" from the operator's machine, then `{delivered}` to give the workers its record"
        fix = (f"the controller delivers this file: run `{delivered}` from the operator's machine to write it "
               "again (a worker never makes a repository without it)")
    record = find(state_dir, repository, client, fix)
    found = restic.config_id()
    if found is not None:
        if record is None and delivered is not None:
            raise RepositoryNotRecorded(
                f"the restic repository of {client} in {repository} at {where} is not in this worker's records "
                f"({path}): this environment never recorded it, or its record has not reached this worker; a worker "
                "adopts no repository on its own (another volume mounted in its place would look the same)",
                f"run `{delivered}` from the operator's machine: it checks and records every backup plan's "
                "repository and gives each worker its site's records")
        if record is None:
            save(state_dir, Record(repository, client, restic.repository, found, now(), "found"))
        elif record.id != found:
            raise RepositoryReplaced(
                f"the restic repository of {client} in {repository} ({restic.repository}) is not the one this "
                f"environment {record.how} on {record.recorded}: its id is {found[:8]}, the record says "
                f"{record.id[:8]}",
                f"check that {where} is the right volume and folder (a volume mounted from another disk?); if this "
                f"repository is the one to use from now on: {again}")
        return Opened(found, False)
    if record is not None:
        raise RepositoryMissing(
            f"the restic repository of {client} in {repository} is missing at {restic.repository}: this "
            f"environment {record.how} it there on {record.recorded} (id {record.id[:8]}); refusing to start a "
            "new, empty one in its place",
            f"check that the storage is mounted and {where} is where the repository is (a moved or renamed "
            f"folder, a volume that did not mount); to start over with a new, empty repository on purpose: {again}")
    if not create:
        return None
    if delivered is not None:
        # A worker set up while the volume was not mounted sees exactly this: no repository, no record.
        raise RepositoryNotRecorded(
            f"the restic repository of {client} in {repository} was never initialised by this environment: there "
            f"is none at {where} and this worker's records ({path}) name none; a worker never makes one (storage "
            "that did not mount looks the same)",
            f"run `{delivered}` from the operator's machine: it initialises every backup plan's repository (and "
            f"offsite copy) and gives each worker its site's records; to start this one over on purpose: {again}")
    made = restic.init()
    repository_id = restic.config_id()
    if repository_id is None:
        raise ResticError(f"restic init of {restic.repository} on {restic.host} left no repository behind")
    save(state_dir, Record(repository, client, restic.repository, repository_id, now(),
                           "initialised" if made else "found"))
    return Opened(repository_id, made)
