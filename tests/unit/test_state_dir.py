"""The state directory and rendered configs: private folders made by spark, never a chmod of someone else's
folder, and one-line errors for a bad SPARK_STATE_DIR or --out."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from primespark.errors import UserError
from primespark.settings import Settings

SPARK = [sys.executable, "-m", "primespark.cli.app"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def spark(*args: str, state: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPARK_STATE_DIR": state, "COLUMNS": "200"}
    return subprocess.run([*SPARK, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


@pytest.mark.parametrize(("value", "said"), [
    ("", "SPARK_STATE_DIR is set but empty"),
    ("   ", "SPARK_STATE_DIR is set but empty"),
    ("state", "is a relative path"),
    ("./state", "is a relative path"),
])
def test_an_empty_or_relative_state_dir_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    value: str, said: str) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPARK_STATE_DIR", value)
    with pytest.raises(UserError, match=said):
        Settings().state_dir("lab")
    assert list(tmp_path.iterdir()) == [], "something was written into the current folder"


def test_a_missing_state_dir_is_made_private_and_an_existing_private_one_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path / "new"))
    made = Settings().state_dir("lab")
    assert made == tmp_path / "new" and mode(made) == 0o700
    own = tmp_path / "own"
    own.mkdir(mode=0o500)
    own.chmod(0o500)  # private, though stricter than ours: used, its mode left alone
    monkeypatch.setenv("SPARK_STATE_DIR", str(own))
    assert Settings().state_dir("lab") == own and mode(own) == 0o500


def test_a_shared_folder_is_refused_and_keeps_its_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # what /tmp is
    monkeypatch.setenv("SPARK_STATE_DIR", str(shared))
    with pytest.raises(UserError, match="open to other users") as refused:
        Settings().state_dir("lab")
    assert "does not exist yet" in refused.value.fix
    assert mode(shared) == 0o1777 and list(shared.iterdir()) == []


@pytest.mark.parametrize(("where", "said"), [
    ("file", "is a file, not a folder"),
    ("missing/state", "its parent folder"),
    ("file/state", "a file stands on its path"),
])
def test_a_bad_state_dir_is_one_line_not_a_traceback(tmp_path: Path, where: str, said: str) -> None:
    (tmp_path / "file").write_text("not a folder")
    done = spark("mesh", "plan", "--env", "lab", state=str(tmp_path / where), cwd=tmp_path)
    assert done.returncode == 1 and said in done.stderr and "SPARK_STATE_DIR" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) <= 2, done.stderr


def test_mesh_render_into_a_shared_folder_writes_into_a_folder_of_its_own(tmp_path: Path) -> None:
    from lab_fleets import lab_fleet

    state = tmp_path / "state"
    lab = lab_fleet(tmp_path, {"backend": "local"})  # its keys in a local store: the lab's OpenBao is not up here
    planned = spark("mesh", "plan", "--env", lab, state=str(state), cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    done = spark("mesh", "render", "--env", lab, "--out", str(shared), state=str(state), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert mode(shared) == 0o1777, "the shared folder's mode was changed"
    [folder] = list(shared.iterdir())
    assert folder.name == "spark-mesh-lab-fleet" and mode(folder) == 0o700
    assert str(folder) in done.stdout.replace("\n", "")
    configs = sorted(folder.iterdir())
    assert configs and all(mode(c) == 0o600 for c in configs)

    (tmp_path / "a-file").write_text("x")
    onto_file = spark("mesh", "render", "--env", lab, "--out", str(tmp_path / "a-file"), state=str(state),
                      cwd=tmp_path)
    assert onto_file.returncode == 1 and "is a file, not a folder" in onto_file.stderr, onto_file.stderr
    assert "Traceback" not in onto_file.stderr
