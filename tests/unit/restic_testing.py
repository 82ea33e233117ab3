"""What only the tests ask of restic (production backs up through the host-side session, never restores
through the client): a plain backup, ls, stats, restore and the version, on top of the production client."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import fields
from datetime import datetime

from pydantic import BaseModel, ConfigDict

from primespark.restic import BackupSummary, ResticClient, ResticError, ResticNotInstalled, RestoreFailed


class Node(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    path: str
    type: str
    size: int = 0
    mtime: datetime | None = None


class Stats(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    total_size: int = 0
    total_file_count: int = 0
    snapshots_count: int = 0


def parse_version(text: str) -> tuple[int, int, int]:
    match = re.search(r"restic (\d+)\.(\d+)\.(\d+)", text)
    if not match:
        raise ResticError(f"cannot read restic's version from {text.strip()!r}")
    return int(match[1]), int(match[2]), int(match[3])


class ResticTestClient(ResticClient):
    @classmethod
    def of(cls, client: ResticClient) -> ResticTestClient:
        return cls(**{f.name: getattr(client, f.name) for f in fields(client)})

    def version(self) -> tuple[int, int, int]:
        proc = self.runner.run([self.binary, "version"], timeout=60)
        if proc.returncode != 0:
            raise ResticNotInstalled(f"restic does not run on {self.host}: {proc.stderr.strip()}")
        return parse_version(proc.stdout.decode())

    def backup(self, paths: Sequence[str], *, excludes: Sequence[str] = (), tags: Sequence[str] = (),
               host: str | None = None, time: datetime | None = None) -> BackupSummary:
        proc = self._call("backup", *self.backup_args(paths, excludes=excludes, tags=tags, host=host, time=time),
                          ok=(0, 3))
        return self.backup_result(proc.returncode, proc.stderr, self._summary(proc))

    def ls(self, snapshot_id: str) -> list[Node]:
        proc = self._call("ls", "ls", snapshot_id)
        lines = [json.loads(ln) for ln in proc.stdout.decode().splitlines() if ln.startswith("{")]
        return [Node.model_validate(m) for m in lines if m.get("struct_type") == "node"]

    def stats(self, snapshot_id: str | None = None, mode: str = "restore-size") -> Stats:
        args = ["stats", "--mode", mode] + ([snapshot_id] if snapshot_id else [])
        return Stats.model_validate(json.loads(self._call("stats", *args).stdout))

    def restore(self, snapshot_id: str, target: str, *, verify: bool = True) -> None:
        args = ["restore", snapshot_id, "--target", target] + (["--verify"] if verify else [])
        try:
            self._call("restore", *args, json_output=False)
        except ResticError as exc:
            if type(exc) is not ResticError:
                raise
            problems = [ln.strip() for ln in exc.stderr.splitlines()
                        if ln.strip() and not ln.startswith("Fatal: There were")]
            raise RestoreFailed(f"restic restore of {snapshot_id} on {self.host} failed: " + "; ".join(problems[:8]),
                                problems, returncode=exc.returncode, stderr=exc.stderr) from None
