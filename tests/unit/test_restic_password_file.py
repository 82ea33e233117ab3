"""A repository opened with the password file on the host restic runs on (a worker copying into another site's
repository holds no password for it): real restic, a copy between two repositories where the target's password
is only a file."""

from __future__ import annotations

from pathlib import Path

import pytest
from restic_testing import ResticTestClient

from primespark.hosts import LocalRunner
from primespark.restic import ResticClient, WrongPassword


def test_a_copy_into_a_repository_known_by_its_password_file_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "readme.txt").write_text("hello\n")
    source = ResticTestClient.of(ResticClient(str(tmp_path / "primary"), "primary-secret", LocalRunner("pi-1")))
    source.init()
    snapshot = source.backup([str(data)]).snapshot_id
    on_host = tmp_path / "offsite.password"
    on_host.write_text("offsite-secret\n")
    target = ResticClient(str(tmp_path / "offsite"), "", LocalRunner("pi-1"), password_file=str(on_host))
    assert target.environment() == {"RESTIC_PASSWORD_FILE": str(on_host)}
    target.init()
    target.copy(source, [snapshot])
    assert [(s.original or "")[:8] for s in target.snapshots()] == [snapshot[:8]]
    # and the other way round: a source known by its file only
    back = ResticTestClient.of(ResticClient(str(tmp_path / "back"), "back-secret", LocalRunner("pi-1")))
    back.init()
    back.copy(target)
    assert len(back.snapshots()) == 1
    # the file is the password: the repository does not open with another one
    with pytest.raises(WrongPassword):
        ResticClient(str(tmp_path / "offsite"), "primary-secret", LocalRunner("pi-1")).exists()
