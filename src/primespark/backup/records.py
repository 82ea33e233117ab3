"""Which restic repositories this environment initialised, so that a missing one is never silently made again.

A NAS volume that is not mounted, or a moved folder, looks to restic exactly like "no repository here". If a
backup then ran `restic init`, it would succeed into a brand-new empty repository, the old snapshots would be
invisible and the drill would pass against the new one. So a repository is created only on its first use —
when the state directory has no record of it — or on purpose (`spark backup init`); each creation is recorded
with the repository's own config id (`restic cat config`). Later runs find it there with that id, or refuse.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from primespark.errors import StepFailed
from primespark.restic import ResticClient, ResticError
from primespark.secrets import atomic_write

RECORDS_FILE = "backup-repositories.json"


class RepositoryMissing(StepFailed):
    """A repository this environment initialised is not at its location (unmounted volume, moved folder)."""


class RepositoryReplaced(StepFailed):
    """Another repository than the one this environment initialised is at the location."""


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


def _read(state_dir: Path) -> dict[str, Any]:
    path = records_path(state_dir)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError:
        # Read as empty, the next backup would re-create missing repositories: the guard must not fail open.
        raise StepFailed(f"the repository records {path} cannot be read (not JSON)",
                         "restore the file from a backup, or remove it to adopt the repositories as they are "
                         "now (each is then recorded again on its next use)") from None
    return dict(data) if isinstance(data, dict) else {}


def load(state_dir: Path) -> dict[str, Record]:
    return {k: Record(**v) for k, v in _read(state_dir).items()}


def find(state_dir: Path, repository: str, client: str) -> Record | None:
    return load(state_dir).get(key(repository, client))


def save(state_dir: Path, record: Record) -> None:
    with _locked(state_dir):
        data = _read(state_dir)
        data[key(record.repository, record.client)] = asdict(record)
        atomic_write(records_path(state_dir), json.dumps(data, indent=1, sort_keys=True), 0o600)


def forget(state_dir: Path, repository: str | None = None, client: str | None = None) -> list[str]:
    """Drop the records of `repository` (every client's, or `client`'s), or all records: what they named is gone
    on purpose (`spark backup init`, `spark lab down`). Returns the keys dropped."""
    if not records_path(state_dir).is_file():
        return []
    with _locked(state_dir):
        data = _read(state_dir)
        dropped = [k for k, v in data.items() if (repository is None or v.get("repository") == repository)
                   and (client is None or v.get("client") == client)]
        for k in dropped:
            del data[k]
        atomic_write(records_path(state_dir), json.dumps(data, indent=1, sort_keys=True), 0o600)
    return dropped


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Opened:
    id: str
    created: bool  # initialised by this call


def open_repository(state_dir: Path, restic: ResticClient, repository: str, client: str, *, create: bool,
                    where: str, start_over: str) -> Opened | None:
    """The client's repository at `restic.repository`, checked against the record of it.

    - there with the recorded id: fine;
    - there without a record: recorded now (made before records were kept, or by hand);
    - there with another id: `RepositoryReplaced`;
    - missing but recorded: `RepositoryMissing` — never re-created;
    - missing, never recorded: its first use: made when `create`, else None.

    `where` says where the repository's folder is (for the operator to check); `start_over` is the command
    that starts over with a new repository on purpose."""
    found = restic.config_id()
    record = find(state_dir, repository, client)
    if found is not None:
        if record is None:
            save(state_dir, Record(repository, client, restic.repository, found, now(), "found"))
        elif record.id != found:
            raise RepositoryReplaced(
                f"the restic repository of {client} in {repository} ({restic.repository}) is not the one this "
                f"environment {record.how} on {record.recorded}: its id is {found[:8]}, the record says "
                f"{record.id[:8]}",
                f"check that {where} is the right volume and folder (a volume mounted from another disk?); if this "
                f"repository is the one to use from now on: `{start_over}`")
        return Opened(found, False)
    if record is not None:
        raise RepositoryMissing(
            f"the restic repository of {client} in {repository} is missing at {restic.repository}: this "
            f"environment {record.how} it there on {record.recorded} (id {record.id[:8]}); refusing to start a "
            "new, empty one in its place",
            f"check that the storage is mounted and {where} is where the repository is (a moved or renamed "
            f"folder, a volume that did not mount); to start over with a new, empty repository on purpose: "
            f"`{start_over}`")
    if not create:
        return None
    made = restic.init()
    repository_id = restic.config_id()
    if repository_id is None:
        raise ResticError(f"restic init of {restic.repository} on {restic.host} left no repository behind")
    save(state_dir, Record(repository, client, restic.repository, repository_id, now(),
                           "initialised" if made else "found"))
    return Opened(repository_id, made)
