from __future__ import annotations

import stat
from pathlib import Path

import pytest

from primespark.fleet import load_fleet
from primespark.secrets import LocalSecretStore, SecretError, atomic_write, read_reference, store_for
from primespark.settings import Settings, settings_for


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_local_store_keeps_secrets_private(tmp_path: Path) -> None:
    store = LocalSecretStore(tmp_path / "secrets")
    store.put("restic/nas-primary", "s3cret")
    assert store.get("restic/nas-primary") == "s3cret"
    assert mode(tmp_path / "secrets") == 0o700
    assert mode(tmp_path / "secrets" / "restic") == 0o700
    assert mode(tmp_path / "secrets" / "restic" / "nas-primary") == 0o600
    assert store.list("restic/") == ["restic/nas-primary"]
    assert read_reference("local:restic/nas-primary", store) == "s3cret"
    store.delete("restic/nas-primary")
    assert not store.exists("restic/nas-primary")
    with pytest.raises(SecretError, match="not in the local store"):
        store.get("restic/nas-primary")


@pytest.mark.parametrize("key", ["../escape", "a/../../b", "/abs", ""])
def test_local_store_refuses_keys_that_leave_it(tmp_path: Path, key: str) -> None:
    with pytest.raises(SecretError, match="invalid secret key"):
        LocalSecretStore(tmp_path).put(key, "x")


def test_atomic_write_replaces_whole_files(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write(target, "old")
    atomic_write(target, "new", 0o640)
    assert target.read_text() == "new"
    assert mode(target) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"], "no temporary file is left behind"


def test_settings_come_from_the_environment_and_per_env_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPARK_STATE_DIR", raising=False)
    (tmp_path / ".env").write_text("SPARK_SECRET_BACKEND=local\nSPARK_VAULT_MOUNT=kv\n")
    (tmp_path / ".env.homelab").write_text("SPARK_SECRET_BACKEND=vault\n")
    monkeypatch.setenv("SPARK_STATE_HOME", str(tmp_path / "state"))
    assert Settings().vault_mount == "kv"
    assert Settings().secret_backend == "local"
    homelab = settings_for("homelab")
    assert homelab.secret_backend == "vault"
    state = homelab.state_dir()
    assert state == tmp_path / "state" / "homelab"
    assert mode(state) == 0o700
    # The fleet file says where secrets live; an older setting that disagrees is refused, never followed.
    fleet = load_fleet(str(Path(__file__).resolve().parents[1] / "fixtures/fleet/valid/mini-full.yaml"))
    with pytest.raises(SecretError, match=r"SPARK_SECRET_BACKEND=vault, but the fleet file has secrets\.backend: "
                                          r"local"):
        store_for(fleet, "homelab", homelab)
    assert isinstance(store_for(fleet, "lab", settings_for("lab")), LocalSecretStore)
